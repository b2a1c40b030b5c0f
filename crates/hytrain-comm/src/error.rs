//! The one error type of this crate.

use std::fmt;

/// Everything that can go wrong while ranks find each other or exchange data.
///
/// Every message is one line that names the rank, the peer, host and port involved, so a log line from any rank of
/// a large job says where to look.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// The input describing this rank is inconsistent (caught before any network traffic).
    #[error("invalid membership: {0}")]
    InvalidMembership(String),

    /// The deadlines given are unusable.
    #[error("invalid options: {0}")]
    InvalidOptions(String),

    /// The job lost a rank (it died, stopped or was cut off), as the liveness watch established.
    #[error("{0}")]
    RankLost(crate::LostRank),

    /// A collective was called with arguments that cannot work (lengths, root rank).
    #[error("invalid {op} call: {detail}")]
    InvalidArgument {
        /// The collective that was called.
        op: &'static str,
        /// What was wrong and what was expected.
        detail: String,
    },

    /// Rank 0 could not open the rendezvous port.
    #[error(
        "rank 0 could not host the rendezvous store on port {port}: {source}; \
         is another job using it? pick a different MASTER_PORT"
    )]
    Bind {
        /// The port rank 0 tried to listen on.
        port: u16,
        /// What the operating system said.
        source: std::io::Error,
    },

    /// A rank other than 0 gave up on the rendezvous: it never reached the master, or not every rank joined.
    #[error("rank {rank} could not reach master {host}:{port} after {secs} s ({detail})")]
    Unreachable {
        /// This rank.
        rank: usize,
        /// The master address as configured.
        host: String,
        /// The master port.
        port: u16,
        /// How long it tried.
        secs: u64,
        /// `not connected: <last error>` or `ranks still missing: 3, 5`.
        detail: String,
    },

    /// A job whose node count is a range (`--nnodes MIN:MAX`) saw fewer than MIN nodes at the store before the
    /// rendezvous deadline.
    #[error(
        "only {came} of the at least {needed} nodes the job needs (--nnodes {needed}:{max}) came to the rendezvous \
         store at {host}:{port} within {secs} s; start more nodes or lower MIN"
    )]
    TooFewNodes {
        /// Nodes at the store when this one gave up, itself included.
        came: usize,
        /// MIN.
        needed: usize,
        /// MAX.
        max: usize,
        /// The store's address.
        host: String,
        /// The store's port.
        port: u16,
        /// How long this node waited.
        secs: u64,
    },

    /// Rank 0 hosted the rendezvous but not every rank joined before the deadline.
    #[error("rank 0 timed out after {secs} s hosting the rendezvous at {host}:{port} (ranks still missing: {missing}{note})")]
    RanksMissing {
        /// The master address as configured.
        host: String,
        /// The master port.
        port: u16,
        /// How long it waited.
        secs: u64,
        /// The ranks that never joined, ranges compressed ("4-7, 9").
        missing: RankList,
        /// Empty, or "; refused 2 connections that failed the job token check, the last from 10.0.0.7:40112".
        note: String,
    },

    /// The other end of a connection does not hold the same job token as this rank.
    #[error("rank {rank}: job token mismatch with {peer} at {addr}: {detail}")]
    TokenMismatch {
        /// This rank.
        rank: usize,
        /// "the rendezvous store" or "rank 3".
        peer: String,
        /// The `host:port` this rank connected to.
        addr: String,
        /// Which side failed the check and what to do.
        detail: String,
    },

    /// The master refused this rank (a different job, world size or a rank that already joined).
    #[error("rank {rank}: master {host}:{port} refused the rendezvous: {detail}")]
    Rejected {
        /// This rank.
        rank: usize,
        /// The master address.
        host: String,
        /// The master port.
        port: u16,
        /// The master's reason.
        detail: String,
    },

    /// The connection to the store broke or answered nonsense.
    #[error("rank {rank}: rendezvous store at {host}:{port} failed during {op}: {detail}")]
    Store {
        /// This rank.
        rank: usize,
        /// The master address.
        host: String,
        /// The master port.
        port: u16,
        /// The store operation (set, get, add, wait, barrier).
        op: &'static str,
        /// What happened.
        detail: String,
    },

    /// A blocking store operation did not complete before its deadline.
    #[error("rank {rank} waited {secs} s at store {host}:{port} for {what}")]
    StoreTimeout {
        /// This rank.
        rank: usize,
        /// The master address.
        host: String,
        /// The master port.
        port: u16,
        /// How long it waited.
        secs: u64,
        /// What it waited for: keys or barrier and, where known, the ranks that did not arrive.
        what: String,
    },

    /// A ring peer could not be reached or answered with the wrong identity while the ring was being built.
    #[error("rank {rank}: could not connect the ring to rank {peer} at {addr}: {detail}")]
    RingSetup {
        /// This rank.
        rank: usize,
        /// The peer rank.
        peer: usize,
        /// The peer's published address.
        addr: String,
        /// What went wrong.
        detail: String,
    },

    /// A peer closed its connection or the connection broke during a collective.
    #[error("lost rank {rank} ({cause} during {during})")]
    PeerLost {
        /// The rank whose connection was lost.
        rank: usize,
        /// The collective in progress.
        during: &'static str,
        /// "connection closed", "connection reset", or the operating system's words.
        cause: String,
    },

    /// A peer sent or accepted nothing for the collective timeout.
    #[error(
        "rank {rank} was silent for {secs} s during {during} (collective timeout; is that rank stuck or much slower?)"
    )]
    Timeout {
        /// The rank this one was waiting on.
        rank: usize,
        /// The collective in progress.
        during: &'static str,
        /// The collective timeout.
        secs: u64,
    },

    /// Ranks called different collectives, or the same one with different sizes, at the same point.
    #[error("collective mismatch: {0}")]
    Mismatch(String),

    /// Another rank failed first; this is what it reported.
    #[error("rank {rank} failed first: {message}")]
    Remote {
        /// The rank that recorded the failure.
        rank: usize,
        /// Its error message.
        message: String,
    },

    /// An earlier collective failed; the ring cannot be used again.
    #[error("the ring is unusable after an earlier failure: {0}")]
    Broken(String),

    /// An MPI call failed or MPI could not start.
    #[error("MPI: {0}")]
    Mpi(String),
}

/// A set of ranks shown compactly: `0-3, 7, 9-10`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankList(pub Vec<usize>);

impl fmt::Display for RankList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ranks = self.0.clone();
        ranks.sort_unstable();
        ranks.dedup();
        let mut i = 0;
        let mut first = true;
        while i < ranks.len() {
            let mut j = i;
            while j + 1 < ranks.len() && ranks[j + 1] == ranks[j] + 1 {
                j += 1;
            }
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            if j == i {
                write!(f, "{}", ranks[i])?;
            } else {
                write!(f, "{}-{}", ranks[i], ranks[j])?;
            }
            i = j + 1;
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_list_compresses_runs_and_sorts() {
        assert_eq!(RankList(vec![9, 1, 2, 3, 7, 10]).to_string(), "1-3, 7, 9-10");
        assert_eq!(RankList(vec![4]).to_string(), "4");
        assert_eq!(RankList(vec![]).to_string(), "none");
    }

    #[test]
    fn peer_lost_message_names_the_rank_and_the_collective() {
        let e = CommError::PeerLost { rank: 2, during: "allreduce", cause: "connection closed".into() };
        assert_eq!(e.to_string(), "lost rank 2 (connection closed during allreduce)");
    }
}
