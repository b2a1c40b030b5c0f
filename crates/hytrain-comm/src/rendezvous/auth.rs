//! The challenge-response every connection of a job starts with, keyed on the job token.
//!
//! The token is hytrain-cluster's [`JobToken`], the one the plan carries: it is found where the launcher's
//! environment is read, and this crate only proves it. Both ends hold the job's secret. The side that connects (the initiator) sends a fresh random nonce with its
//! hello; the side that accepts (the responder) answers with its own nonce; the initiator proves it holds the
//! secret with HMAC-SHA256 over a label, the connection's context (protocol, job, ranks) and both nonces; only
//! then does the responder prove the same with a different label. So:
//! - a client without the secret learns nothing it could reuse and is refused before it can send a request;
//! - a recorded handshake cannot be replayed, since the responder's nonce is new on every connection;
//! - a proof cannot be reflected back, since initiator and responder proofs carry different labels;
//! - a rank that reached an impostor (something listening where the master or a peer should be) finds out before
//!   it sends anything else.
//!
//! The secret never goes over the wire, and nothing here logs or formats it. The handshake authenticates the
//! start of a connection only: what follows is neither encrypted nor integrity-protected, so an attacker who
//! controls the network path itself is out of scope (run jobs on a private network).

use std::borrow::Cow;
use std::io::{self, Read, Write};

use hmac::{Hmac, Mac};
use hytrain_cluster::JobToken;
use sha2::Sha256;

use super::wire::{get_bytes_max, put_bytes};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of each nonce and proof.
pub(crate) const NONCE_LEN: usize = 32;
const PROOF_LEN: usize = 32;

pub(crate) const ACCEPTED: u8 = 0;
pub(crate) const REFUSED: u8 = 2;

/// Longest reason an unauthenticated peer may send for refusing; anything longer is not our protocol.
pub(crate) const MAX_REASON: usize = 4096;

/// Domain separation: these proofs are for hytrain connections of protocol version 1 and nothing else.
const DOMAIN: &[u8] = b"hytrain-job-token-handshake-v1\0";
const INITIATOR: &[u8] = b"initiator\0";
const RESPONDER: &[u8] = b"responder\0";
/// Prefix of the key derived for a job without a configured secret (the default token).
const UNCONFIGURED: &[u8] = b"hytrain-unconfigured-job-token-v1\0";

/// The HMAC key of `token`: the secret itself, or for the default token (and a token without a secret) the
/// identity it derives from, behind a prefix of its own so that it does not meet a configured secret by accident.
/// Rank 0 warns once when a job of several ranks runs on the default (see `Store::rendezvous`).
fn key(token: &JobToken) -> Cow<'_, [u8]> {
    if token.is_default() {
        let mut key = UNCONFIGURED.to_vec();
        key.extend_from_slice(token.secret());
        Cow::Owned(key)
    } else {
        Cow::Borrowed(token.secret())
    }
}

fn mac(token: &JobToken, label: &[u8], context: &[u8], initiator: &[u8], responder: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(&key(token)).expect("HMAC takes any key");
    mac.update(DOMAIN);
    mac.update(label);
    mac.update(&(context.len() as u64).to_le_bytes());
    mac.update(context);
    mac.update(initiator);
    mac.update(responder);
    mac
}

fn prove(token: &JobToken, label: &[u8], context: &[u8], ni: &[u8], nr: &[u8]) -> [u8; PROOF_LEN] {
    mac(token, label, context, ni, nr).finalize().into_bytes().into()
}

/// Checks a proof in constant time.
fn check(token: &JobToken, label: &[u8], context: &[u8], ni: &[u8], nr: &[u8], proof: &[u8]) -> bool {
    mac(token, label, context, ni, nr).verify_slice(proof).is_ok()
}

/// A fresh nonce from the operating system's random source.
pub(crate) fn nonce() -> io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut n)
        .map_err(|e| io::Error::other(format!("the operating system gave no random bytes for a nonce: {e}")))?;
    Ok(n)
}

/// How a handshake ended when it did not succeed.
#[derive(Debug)]
pub(crate) enum Handshake {
    /// The connection broke or timed out.
    Io(io::Error),
    /// The responder refused before any proof: wrong job, rank or generation. Its reason, as it sent it.
    Refused(String),
    /// The responder refused this side's proof: the two sides hold different tokens.
    ProofRefused,
    /// The responder's proof is wrong: it does not hold this job's token.
    BadProof,
}

impl From<io::Error> for Handshake {
    fn from(e: io::Error) -> Self {
        Handshake::Io(e)
    }
}

/// Initiator side, after it has sent its hello carrying `mine` (its nonce): proves itself and checks the
/// responder's proof.
pub(crate) fn initiate(
    s: &mut (impl Read + Write),
    token: &JobToken,
    context: &[u8],
    mine: &[u8; NONCE_LEN],
) -> Result<(), Handshake> {
    match read_u8(s)? {
        ACCEPTED => {}
        REFUSED => {
            let reason = get_bytes_max(s, MAX_REASON)?;
            return Err(Handshake::Refused(String::from_utf8_lossy(&reason).into_owned()));
        }
        other => {
            return Err(Handshake::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected handshake status {other}"),
            )))
        }
    }
    let mut theirs = [0u8; NONCE_LEN];
    s.read_exact(&mut theirs)?;
    s.write_all(&prove(token, INITIATOR, context, mine, &theirs))?;
    s.flush()?;
    match read_u8(s)? {
        ACCEPTED => {}
        REFUSED => return Err(Handshake::ProofRefused),
        other => {
            return Err(Handshake::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected handshake status {other}"),
            )))
        }
    }
    let mut proof = [0u8; PROOF_LEN];
    s.read_exact(&mut proof)?;
    if check(token, RESPONDER, context, mine, &theirs, &proof) {
        Ok(())
    } else {
        Err(Handshake::BadProof)
    }
}

/// Responder side, after it has read the initiator's hello carrying `theirs` and found its identity acceptable:
/// challenges the initiator and, once it has proved itself, proves this side.
pub(crate) fn respond(
    s: &mut (impl Read + Write),
    token: &JobToken,
    context: &[u8],
    theirs: &[u8; NONCE_LEN],
) -> Result<(), Handshake> {
    let mine = nonce()?;
    let mut out = Vec::with_capacity(1 + NONCE_LEN);
    out.push(ACCEPTED);
    out.extend_from_slice(&mine);
    s.write_all(&out)?;
    s.flush()?;
    let mut proof = [0u8; PROOF_LEN];
    s.read_exact(&mut proof)?;
    if !check(token, INITIATOR, context, theirs, &mine, &proof) {
        let _ = s.write_all(&[REFUSED]);
        let _ = s.flush();
        return Err(Handshake::BadProof);
    }
    let mut out = Vec::with_capacity(1 + PROOF_LEN);
    out.push(ACCEPTED);
    out.extend_from_slice(&prove(token, RESPONDER, context, theirs, &mine));
    s.write_all(&out)?;
    s.flush()?;
    Ok(())
}

/// Responder side: refuses the initiator before any proof, telling it why (its reason must not hold secrets).
pub(crate) fn refuse(s: &mut impl Write, reason: &str) -> io::Result<()> {
    let mut out = vec![REFUSED];
    let reason = &reason.as_bytes()[..reason.len().min(MAX_REASON)];
    put_bytes(&mut out, reason);
    s.write_all(&out)?;
    s.flush()
}

fn read_u8(r: &mut impl Read) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

/// `context` fields joined unambiguously (each one length-prefixed).
pub(crate) fn context(fields: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in fields {
        put_bytes(&mut out, f);
    }
    out
}

/// Test helper: plays a responder that does not hold the token: accepts any proof and answers with a made-up one.
#[cfg(test)]
pub(crate) fn respond_without_token(s: &mut (impl Read + Write)) -> io::Result<()> {
    let mut out = vec![ACCEPTED];
    out.extend_from_slice(&nonce()?);
    s.write_all(&out)?;
    let mut proof = [0u8; PROOF_LEN];
    s.read_exact(&mut proof)?;
    let mut out = vec![ACCEPTED];
    out.extend_from_slice(&nonce()?);
    s.write_all(&out)?;
    s.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hytrain_cluster::TokenSource;
    use std::net::{TcpListener, TcpStream};

    /// A token holding a configured secret, as `HYTRAIN_JOB_TOKEN` gives one.
    fn configured(secret: &str) -> JobToken {
        JobToken::new(TokenSource::Env, secret)
    }

    /// One handshake over a real loopback connection: the responder's and the initiator's outcomes.
    fn handshake(initiator: &JobToken, responder: &JobToken) -> (Result<(), Handshake>, Result<(), Handshake>) {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let responder = responder.clone();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut theirs = [0u8; NONCE_LEN];
            s.read_exact(&mut theirs).unwrap();
            respond(&mut s, &responder, b"ctx", &theirs)
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let mine = nonce().unwrap();
        c.write_all(&mine).unwrap();
        let client = initiate(&mut c, initiator, b"ctx", &mine);
        drop(c);
        (server.join().unwrap(), client)
    }

    #[test]
    fn equal_tokens_complete_the_handshake_both_ways() {
        let t = configured("s3cret-token-of-the-job");
        let (server, client) = handshake(&t, &t);
        assert!(server.is_ok(), "{server:?}");
        assert!(client.is_ok(), "{client:?}");
    }

    #[test]
    fn different_tokens_are_refused_by_the_responder() {
        let (server, client) = handshake(&configured("token-a"), &configured("token-b"));
        assert!(matches!(server, Err(Handshake::BadProof)), "{server:?}");
        assert!(matches!(client, Err(Handshake::ProofRefused)), "{client:?}");
    }

    #[test]
    fn nonces_differ_on_every_call() {
        let a = nonce().unwrap();
        let b = nonce().unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0u8; NONCE_LEN]);
    }

    #[test]
    fn a_proof_depends_on_label_context_and_both_nonces() {
        let t = configured("k");
        let base = prove(&t, INITIATOR, b"c", b"n1", b"n2");
        assert!(check(&t, INITIATOR, b"c", b"n1", b"n2", &base));
        assert!(!check(&t, RESPONDER, b"c", b"n1", b"n2", &base));
        assert!(!check(&t, INITIATOR, b"d", b"n1", b"n2", &base));
        assert!(!check(&t, INITIATOR, b"c", b"n3", b"n2", &base));
        assert!(!check(&t, INITIATOR, b"c", b"n1", b"n3", &base));
        assert!(!check(&configured("k2"), INITIATOR, b"c", b"n1", b"n2", &base));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let t = configured("very-secret-value");
        let shown = format!("{t:?} {:?}", JobToken::default_for("job-identity"));
        assert!(!shown.contains("very-secret-value"), "{shown}");
        assert!(!shown.contains("job-identity"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }

    #[test]
    fn an_empty_secret_counts_as_the_default() {
        // A plan read back from JSON has a source but no secret; it must not pass for a configured token.
        let empty = configured("");
        assert!(empty.is_default());
        let (server, client) = handshake(&empty, &JobToken::default_for(""));
        assert!(server.is_ok() && client.is_ok(), "{server:?} {client:?}");
        let (server, _) = handshake(&empty, &configured("a-real-secret"));
        assert!(matches!(server, Err(Handshake::BadProof)), "{server:?}");
    }

    #[test]
    fn tokens_key_by_secret_and_kind() {
        let accepts = |a: &JobToken, b: &JobToken| handshake(a, b).0.is_ok();
        assert!(accepts(&configured("a"), &configured("a")));
        assert!(!accepts(&configured("a"), &configured("b")));
        assert!(accepts(&JobToken::default_for("j"), &JobToken::default_for("j")));
        assert!(!accepts(&JobToken::default_for("j"), &JobToken::default_for("k")));
        assert!(!accepts(&JobToken::default_for("j"), &configured("j")));
    }
}
