//! The store's wire protocol: the greeting every connection opens with, the requests a client sends and the
//! status bytes the server answers with, and the decoder the server (and the fuzz targets) read requests with.
//!
//! A connection starts with `HELLO`, the job id and the client's challenge nonce, then the job-token handshake
//! (see [`auth`](super::auth)); after that, one request at a time: an `OP_*` byte and its fields, answered by an
//! `ST_*` byte and the answer's fields. `OP_WATCH` turns the connection into a liveness watch
//! (see [`liveness`](super::liveness)), which speaks its own one-byte messages from then on.

use std::io::{self, Read};
use std::time::Duration;

use super::admission::Ask;
use super::auth::NONCE_LEN;
use super::wire::*;

/// Version 3 of the store protocol: every connection starts with the job-token handshake (see `auth`); a join
/// is answered with whether rank 0's process hosts the store, and a loss notice says whether the store was lost.
pub(crate) const HELLO: &[u8; 8] = b"HYTSTOR3";
/// Longest job id a client may send before it has authenticated.
pub(crate) const MAX_JOB_ID: usize = 4096;
/// Most keys one wait request may name: a rank waits for one key per rank at most.
pub(crate) const MAX_WAIT_KEYS: usize = 1 << 20;

pub(crate) const OP_SET: u8 = 1;
pub(crate) const OP_GET: u8 = 2;
pub(crate) const OP_ADD: u8 = 3;
pub(crate) const OP_WAIT: u8 = 4;
pub(crate) const OP_SET_IF_ABSENT: u8 = 5;
/// Registers a rank; answered `ST_OK` and one byte, 1 when global rank 0's process hosts the store.
pub(crate) const OP_JOIN: u8 = 6;
pub(crate) const OP_AWAIT_JOINED: u8 = 7;
/// Turns the connection into a liveness watch of one rank (see `liveness`).
pub(crate) const OP_WATCH: u8 = 8;
/// Asks a standalone store to admit this node to a round of MIN to MAX nodes (see `admission`); answered `ST_OK`
/// with the node rank and node count, `ST_TIMEOUT` with how many nodes came and how many were needed, or `ST_ERR`.
pub(crate) const OP_ADMIT: u8 = 9;

pub(crate) const ST_OK: u8 = 0;
pub(crate) const ST_TIMEOUT: u8 = 1;
pub(crate) const ST_ERR: u8 = 2;
/// A blocking request ended because the job lost a rank; the loss follows.
pub(crate) const ST_LOST: u8 = 3;

/// A client's greeting: the protocol magic, its job id and its challenge nonce. Read before the client has
/// proved anything, so every length in it is bounded.
pub(crate) fn read_hello(r: &mut impl Read) -> io::Result<(Vec<u8>, [u8; NONCE_LEN])> {
    let mut hello = [0u8; 8];
    r.read_exact(&mut hello)?;
    if &hello != HELLO {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "client did not greet as a hytrain store client"));
    }
    let job = get_bytes_max(r, MAX_JOB_ID)?;
    let mut nonce = [0u8; NONCE_LEN];
    r.read_exact(&mut nonce)?;
    Ok((job, nonce))
}

/// One request of an authenticated client, as decoded off the wire.
#[derive(Debug)]
pub(crate) enum Request {
    Set {
        key: String,
        value: Vec<u8>,
    },
    SetIfAbsent {
        key: String,
        value: Vec<u8>,
    },
    Get {
        key: String,
        timeout_ms: u64,
    },
    Add {
        key: String,
        delta: i64,
    },
    Wait {
        keys: Vec<String>,
        timeout_ms: u64,
    },
    Join {
        job: String,
        rank: usize,
        world: usize,
    },
    AwaitJoined {
        timeout_ms: u64,
    },
    /// Turns the connection into `rank`'s liveness watch (see [`liveness`](super::liveness)).
    Watch {
        rank: usize,
        timeout_ms: u64,
    },
    /// Admission of a node to a round (see [`admission`](super::admission)).
    Admit {
        job: String,
        ask: Ask,
        timeout_ms: u64,
    },
}

/// The next request, or `None` when the client closed the connection between requests.
pub(crate) fn read_request(r: &mut impl Read) -> io::Result<Option<Request>> {
    let op = match get_u8(r) {
        Ok(op) => op,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(Some(match op {
        OP_SET => Request::Set { key: get_string(r)?, value: get_bytes(r)? },
        OP_SET_IF_ABSENT => Request::SetIfAbsent { key: get_string(r)?, value: get_bytes(r)? },
        OP_GET => Request::Get { key: get_string(r)?, timeout_ms: get_u64(r)? },
        OP_ADD => Request::Add { key: get_string(r)?, delta: get_u64(r)? as i64 },
        OP_WAIT => {
            let n = get_count(r, MAX_WAIT_KEYS, "keys")?;
            let keys = (0..n).map(|_| get_string(r)).collect::<io::Result<Vec<_>>>()?;
            Request::Wait { keys, timeout_ms: get_u64(r)? }
        }
        OP_JOIN => Request::Join { job: get_string(r)?, rank: get_u64(r)? as usize, world: get_u64(r)? as usize },
        OP_AWAIT_JOINED => Request::AwaitJoined { timeout_ms: get_u64(r)? },
        OP_WATCH => Request::Watch { rank: get_u64(r)? as usize, timeout_ms: get_u64(r)? },
        OP_ADMIT => {
            let job = get_string(r)?;
            let node = get_string(r)?;
            let (min, max) = (get_u64(r)? as usize, get_u64(r)? as usize);
            let last_call = Duration::from_millis(get_u64(r)?.min(u32::MAX as u64));
            let local_world_size = get_u64(r)? as usize;
            Request::Admit { job, ask: Ask { node, min, max, last_call, local_world_size }, timeout_ms: get_u64(r)? }
        }
        other => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unknown store request {other}"))),
    }))
}

/// Decodes a client's greeting and then requests from `bytes` until they end or one is malformed, returning how
/// many requests decoded: the store's wire format without a socket, for the fuzz targets.
pub(crate) fn decode_stream(bytes: &[u8]) -> usize {
    let mut r = bytes;
    if read_hello(&mut r).is_err() {
        return 0;
    }
    let mut n = 0;
    while let Ok(Some(_)) = read_request(&mut r) {
        n += 1;
    }
    n
}

/// The `OP_ADMIT` request for `ask` in job `job`, waiting at most `timeout`.
pub(crate) fn admit_request(job: &str, ask: &Ask, timeout: Duration) -> Vec<u8> {
    let mut frame = Vec::new();
    put_u8(&mut frame, OP_ADMIT);
    put_bytes(&mut frame, job.as_bytes());
    put_bytes(&mut frame, ask.node.as_bytes());
    put_u64(&mut frame, ask.min as u64);
    put_u64(&mut frame, ask.max as u64);
    put_u64(&mut frame, ask.last_call.as_millis() as u64);
    put_u64(&mut frame, ask.local_world_size as u64);
    put_u64(&mut frame, timeout.as_millis() as u64);
    frame
}

/// The `OP_WATCH` request: rank and peer timeout.
pub(crate) fn watch_request(rank: usize, peer_timeout: Duration) -> Vec<u8> {
    let mut frame = Vec::new();
    put_u8(&mut frame, OP_WATCH);
    put_u64(&mut frame, rank as u64);
    put_u64(&mut frame, peer_timeout.as_millis() as u64);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(job: &[u8]) -> Vec<u8> {
        let mut out = HELLO.to_vec();
        put_bytes(&mut out, job);
        out.extend_from_slice(&[7u8; NONCE_LEN]);
        out
    }

    #[test]
    fn requests_framed_as_the_client_frames_them_decode_back() {
        let mut f = hello(b"job-1");
        put_u8(&mut f, OP_SET);
        put_bytes(&mut f, b"job/k");
        put_bytes(&mut f, b"value");
        put_u8(&mut f, OP_WAIT);
        put_u64(&mut f, 2);
        put_bytes(&mut f, b"a");
        put_bytes(&mut f, b"b");
        put_u64(&mut f, 1500);
        put_u8(&mut f, OP_JOIN);
        put_bytes(&mut f, b"job-1");
        put_u64(&mut f, 3);
        put_u64(&mut f, 4);
        let mut r = &f[..];
        assert_eq!(read_hello(&mut r).unwrap().0, b"job-1");
        assert!(
            matches!(read_request(&mut r).unwrap(), Some(Request::Set { key, value }) if key == "job/k" && value == b"value")
        );
        assert!(
            matches!(read_request(&mut r).unwrap(), Some(Request::Wait { keys, timeout_ms: 1500 }) if keys == ["a", "b"])
        );
        assert!(matches!(read_request(&mut r).unwrap(), Some(Request::Join { rank: 3, world: 4, .. })));
        let ask = Ask { node: "n".into(), min: 1, max: 3, last_call: Duration::from_secs(2), local_world_size: 2 };
        f.extend(admit_request("job-1", &ask, Duration::from_secs(9)));
        let mut r = &f[f.len() - admit_request("job-1", &ask, Duration::from_secs(9)).len()..];
        assert!(
            matches!(read_request(&mut r).unwrap(), Some(Request::Admit { job, ask: a, timeout_ms: 9000 }) if job == "job-1" && a == ask)
        );
        assert_eq!(decode_stream(&f), 4);
    }

    #[test]
    fn a_wait_naming_more_keys_than_the_limit_is_refused_before_any_is_read() {
        let mut f = vec![OP_WAIT];
        put_u64(&mut f, MAX_WAIT_KEYS as u64 + 1);
        let e = read_request(&mut &f[..]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains(&format!("exceed the protocol limit of {MAX_WAIT_KEYS}")), "{e}");
    }

    #[test]
    fn a_greeting_with_an_oversized_job_id_is_refused_before_it_is_read() {
        let mut f = HELLO.to_vec();
        put_u64(&mut f, MAX_JOB_ID as u64 + 1);
        let e = read_hello(&mut &f[..]).unwrap_err();
        assert!(e.to_string().contains(&format!("exceeds the protocol limit of {MAX_JOB_ID} bytes")), "{e}");
        let e = read_request(&mut &[42u8][..]).unwrap_err();
        assert!(e.to_string().contains("unknown store request 42"), "{e}");
    }
}
