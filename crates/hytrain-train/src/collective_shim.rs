//! The `Collective` contract of hytrain-comm, copied verbatim until that crate builds; the engine codes against
//! exactly this so switching to `hytrain_comm::Collective` is a one-line change in lib.rs.

/// How an allreduce combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum over ranks.
    Sum,
    /// Element-wise mean over ranks.
    Avg,
}

/// A typed, mutable view of the data an allreduce works on in place.
#[derive(Debug)]
pub enum Buffer<'a> {
    /// 32-bit floats.
    F32(&'a mut [f32]),
    /// 64-bit floats.
    F64(&'a mut [f64]),
    /// bfloat16 values.
    Bf16(&'a mut [half::bf16]),
}

/// Why a collective failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CommError(pub String);

/// One rank's handle on a process group.
pub trait Collective: Send {
    /// This process's global rank.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn world_size(&self) -> usize;
    /// Short backend name ("ring", "nccl", "mpi").
    fn backend(&self) -> &'static str;
    /// Combines `buf` over all ranks in place.
    fn allreduce(&mut self, buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError>;
    /// Copies `bytes` of rank `root` into every other rank's `bytes`.
    fn broadcast(&mut self, bytes: &mut [u8], root: usize) -> Result<(), CommError>;
    /// Concatenates every rank's `input`, in rank order, into `output` (`input.len() * world_size` bytes).
    fn allgather(&mut self, input: &[u8], output: &mut [u8]) -> Result<(), CommError>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), CommError>;
}
