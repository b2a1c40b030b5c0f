//! The implementations of [`Collective`](crate::Collective), one per way of moving data:
//!
//! - `ring`: a TCP ring between all ranks (also the single-process backend: a ring of one rank reduces to itself).
//! - `shm`: shared memory between the ranks of a node, and a ring of the nodes' local rank 0s across nodes.
//! - `mpi` (feature `mpi`): Open MPI's collectives, for jobs started by `mpirun`.
//!
//! Which one a job gets is decided in [`transport`](crate::transport) and [`init`](crate::init).

pub(crate) mod failure;
#[cfg(feature = "mpi")]
pub(crate) mod mpi;
pub(crate) mod ring;
pub(crate) mod shm;
