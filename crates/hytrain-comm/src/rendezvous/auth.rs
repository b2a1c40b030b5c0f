//! The job token and the challenge-response every connection of a job starts with.
//!
//! Both ends hold the job's secret. The side that connects (the initiator) sends a fresh random nonce with its
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

use std::io::{self, Read, Write};
use std::sync::Arc;

use hmac::{Hmac, Mac};
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
/// Prefix of the key derived for a job without a configured secret.
const UNCONFIGURED: &[u8] = b"hytrain-unconfigured-job-token-v1\0";

/// The per-job secret every rank proves it holds before the store or a ring peer accepts its connection.
///
/// [`JobToken::new`] takes a real secret (what `HYTRAIN_JOB_TOKEN` or a mounted secret file gives).
/// [`JobToken::unconfigured`] derives one from the job's identity for jobs where nobody configured a secret: every
/// rank computes the same value, so ranks of other jobs and stray clients are kept out, but anyone who knows the
/// identity can compute it too. It guards against accidents, not attackers, and rank 0 logs a warning once when a
/// multi-rank job runs with it.
///
/// `Debug` shows only whether a secret was configured; the secret cannot be printed.
#[derive(Clone)]
pub struct JobToken {
    key: Arc<[u8]>,
    configured: bool,
}

impl JobToken {
    /// A token from a configured secret (any bytes, at least one). Surrounding whitespace is the caller's business:
    /// every rank must pass exactly the same bytes.
    pub fn new(secret: impl AsRef<[u8]>) -> Result<JobToken, crate::CommError> {
        let secret = secret.as_ref();
        if secret.is_empty() {
            return Err(crate::CommError::InvalidToken(
                "the job token is empty; give every rank the same non-empty secret".into(),
            ));
        }
        Ok(JobToken { key: secret.into(), configured: true })
    }

    /// The default token of a job without a configured secret, derived from `identity` (a job id or run id that
    /// every rank of the job shares). Protects against accidents only: see the type's documentation.
    pub fn unconfigured(identity: &str) -> JobToken {
        let mut key = UNCONFIGURED.to_vec();
        key.extend_from_slice(identity.as_bytes());
        JobToken { key: key.into(), configured: false }
    }

    /// Whether this token is a configured secret rather than the default derived from the job's identity.
    pub fn is_configured(&self) -> bool {
        self.configured
    }

    fn mac(&self, label: &[u8], context: &[u8], initiator: &[u8], responder: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(DOMAIN);
        mac.update(label);
        mac.update(&(context.len() as u64).to_le_bytes());
        mac.update(context);
        mac.update(initiator);
        mac.update(responder);
        mac
    }

    fn prove(&self, label: &[u8], context: &[u8], ni: &[u8], nr: &[u8]) -> [u8; PROOF_LEN] {
        self.mac(label, context, ni, nr).finalize().into_bytes().into()
    }

    /// Checks a proof in constant time.
    fn check(&self, label: &[u8], context: &[u8], ni: &[u8], nr: &[u8], proof: &[u8]) -> bool {
        self.mac(label, context, ni, nr).verify_slice(proof).is_ok()
    }
}

impl std::fmt::Debug for JobToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.configured { "JobToken(configured, redacted)" } else { "JobToken(unconfigured default)" })
    }
}

impl PartialEq for JobToken {
    fn eq(&self, other: &Self) -> bool {
        // Compared through MACs so that equality takes the same time however many leading bytes agree.
        self.configured == other.configured
            && self.key.len() == other.key.len()
            && self.prove(b"eq", b"", b"", b"") == other.prove(b"eq", b"", b"", b"")
    }
}

impl Eq for JobToken {}

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
    s.write_all(&token.prove(INITIATOR, context, mine, &theirs))?;
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
    if token.check(RESPONDER, context, mine, &theirs, &proof) {
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
    if !token.check(INITIATOR, context, theirs, &mine, &proof) {
        let _ = s.write_all(&[REFUSED]);
        let _ = s.flush();
        return Err(Handshake::BadProof);
    }
    let mut out = Vec::with_capacity(1 + PROOF_LEN);
    out.push(ACCEPTED);
    out.extend_from_slice(&token.prove(RESPONDER, context, theirs, &mine));
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
    use std::net::{TcpListener, TcpStream};

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
        let t = JobToken::new("s3cret-token-of-the-job").unwrap();
        let (server, client) = handshake(&t, &t);
        assert!(server.is_ok(), "{server:?}");
        assert!(client.is_ok(), "{client:?}");
    }

    #[test]
    fn different_tokens_are_refused_by_the_responder() {
        let (server, client) = handshake(&JobToken::new("token-a").unwrap(), &JobToken::new("token-b").unwrap());
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
        let t = JobToken::new("k").unwrap();
        let base = t.prove(INITIATOR, b"c", b"n1", b"n2");
        assert!(t.check(INITIATOR, b"c", b"n1", b"n2", &base));
        assert!(!t.check(RESPONDER, b"c", b"n1", b"n2", &base));
        assert!(!t.check(INITIATOR, b"d", b"n1", b"n2", &base));
        assert!(!t.check(INITIATOR, b"c", b"n3", b"n2", &base));
        assert!(!t.check(INITIATOR, b"c", b"n1", b"n3", &base));
        assert!(!JobToken::new("k2").unwrap().check(INITIATOR, b"c", b"n1", b"n2", &base));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let t = JobToken::new("very-secret-value").unwrap();
        let shown = format!("{t:?} {:?}", JobToken::unconfigured("job-identity"));
        assert!(!shown.contains("very-secret-value"), "{shown}");
        assert!(!shown.contains("job-identity"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }

    #[test]
    fn an_empty_secret_is_refused() {
        let e = JobToken::new("").unwrap_err().to_string();
        assert!(e.contains("job token is empty"), "{e}");
    }

    #[test]
    fn tokens_compare_by_secret_and_kind() {
        assert_eq!(JobToken::new("a").unwrap(), JobToken::new("a").unwrap());
        assert_ne!(JobToken::new("a").unwrap(), JobToken::new("b").unwrap());
        assert_eq!(JobToken::unconfigured("j"), JobToken::unconfigured("j"));
        assert_ne!(JobToken::unconfigured("j"), JobToken::unconfigured("k"));
    }
}
