//! Test doubles for the crates above this one (feature `testing`): a [`FailingCollective`] that wraps a real
//! collective and fails one chosen call the way a lost or silent rank fails it, for tests of what a training step, a
//! checkpoint or an evaluation does when a collective fails mid-way. Everything else goes to the real collective.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::{Buffer, Collective, CommError, Liveness, LostRank, ReduceOp};

/// How a [`FailingCollective`] fails its chosen call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// As when the job lost `rank` (what every surviving rank's collective returns).
    RankLost {
        /// The rank reported lost.
        rank: usize,
    },
    /// As when `rank` was silent for the collective timeout.
    Timeout {
        /// The rank reported silent.
        rank: usize,
    },
}

/// A real collective whose call number `fail_at` (counting every collective call from 0) fails with `fault`
/// instead of running, as do all calls after it (a lost rank does not come back). Give every rank of a job the
/// same `fail_at` and the failure reaches them all at the same point, as a loss does.
pub struct FailingCollective {
    inner: Box<dyn Collective>,
    fail_at: usize,
    calls: Arc<AtomicUsize>,
    fault: Fault,
}

impl FailingCollective {
    /// Wraps `inner`; `fail_at == usize::MAX` never fails (to count the calls a run makes).
    pub fn new(inner: Box<dyn Collective>, fail_at: usize, fault: Fault) -> Self {
        FailingCollective { inner, fail_at, calls: Arc::default(), fault }
    }

    /// The count of collective calls made so far (failed ones included), readable after the collective has been
    /// handed to the code under test.
    pub fn calls(&self) -> Arc<AtomicUsize> {
        self.calls.clone()
    }

    fn next(&mut self, op: &'static str) -> Result<(), CommError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if call < self.fail_at {
            return Ok(());
        }
        Err(match self.fault {
            Fault::RankLost { rank } => CommError::RankLost(LostRank {
                rank,
                host: "127.0.0.1".into(),
                cause: format!("injected by FailingCollective at call {call} ({op})"),
            }),
            Fault::Timeout { rank } => CommError::Timeout { rank, during: op, secs: 0 },
        })
    }
}

impl Collective for FailingCollective {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn allreduce(&mut self, buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError> {
        self.next("allreduce")?;
        self.inner.allreduce(buf, op)
    }

    fn broadcast(&mut self, bytes: &mut [u8], root: usize) -> Result<(), CommError> {
        self.next("broadcast")?;
        self.inner.broadcast(bytes, root)
    }

    fn allgather(&mut self, input: &[u8], output: &mut [u8]) -> Result<(), CommError> {
        self.next("allgather")?;
        self.inner.allgather(input, output)
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.next("barrier")?;
        self.inner.barrier()
    }

    fn liveness(&self) -> Option<Liveness> {
        self.inner.liveness()
    }
}
