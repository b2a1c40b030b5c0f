//! How a backend records its failure in the store for the other ranks, so that every rank names the same root
//! cause: one line per field, the reporting rank first. Used by the ring and the shared-memory backend.

use crate::CommError;

fn static_op(name: &str) -> &'static str {
    match name {
        "allreduce" => "allreduce",
        "broadcast" => "broadcast",
        "allgather" => "allgather",
        "barrier" => "barrier",
        "reduce_scatter" => "reduce_scatter",
        "allgather_blocks" => "allgather_blocks",
        _ => "a collective",
    }
}

/// One line per field: `reporter`, kind, then the kind's fields.
pub(crate) fn encode_failure(reporter: usize, e: &CommError) -> String {
    match e {
        CommError::PeerLost { rank, during, cause } => format!("{reporter}\nlost\n{rank}\n{during}\n{cause}"),
        CommError::Timeout { rank, during, secs } => {
            format!("{reporter}\ntimeout\n{rank}\n{during}\n{secs}")
        }
        other => format!("{reporter}\nother\n{other}"),
    }
}

pub(crate) fn decode_failure(b: &[u8]) -> Option<CommError> {
    let s = std::str::from_utf8(b).ok()?;
    let mut f = s.splitn(5, '\n');
    let reporter: usize = f.next()?.parse().ok()?;
    match f.next()? {
        "lost" => Some(CommError::PeerLost {
            rank: f.next()?.parse().ok()?,
            during: static_op(f.next()?),
            cause: f.next()?.to_string(),
        }),
        "timeout" => Some(CommError::Timeout {
            rank: f.next()?.parse().ok()?,
            during: static_op(f.next()?),
            secs: f.next()?.parse().ok()?,
        }),
        "other" => Some(CommError::Remote { rank: reporter, message: s.splitn(3, '\n').nth(2)?.to_string() }),
        _ => None,
    }
}
