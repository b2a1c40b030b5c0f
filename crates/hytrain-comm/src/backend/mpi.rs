//! The MPI backend (feature `mpi`): the collectives of the job's `MPI_COMM_WORLD`, for jobs started by `mpirun`.
//!
//! MPI's default error handler aborts the whole job on a communication failure, so this backend returns errors
//! only for bad arguments and start-up; a lost peer ends the job through `mpirun`.

use half::bf16;
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;

use crate::{block_range, check_blocks, Buffer, Collective, CommError, ReduceOp};

/// Collectives over `MPI_COMM_WORLD` (Open MPI). Finalizes MPI when dropped.
pub struct Mpi {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    send_f32: Vec<f32>,
    recv_f32: Vec<f32>,
    send_f64: Vec<f64>,
    recv_f64: Vec<f64>,
    // Declared last so MPI is finalized after the communicator above is dropped.
    _universe: Universe,
}

// SAFETY: MPI is initialised with MPI_THREAD_SERIALIZED (checked in `init`), which allows calls from any thread as
// long as no two run at once; every call goes through `&mut self`, so they cannot.
unsafe impl Send for Mpi {}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mpi").field("rank", &self.rank).field("world_size", &self.size).finish()
    }
}

impl Mpi {
    /// Initialises MPI (once per process) and takes `MPI_COMM_WORLD`.
    pub fn init() -> Result<Mpi, CommError> {
        let (universe, provided) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| CommError::Mpi("MPI was already initialised in this process".into()))?;
        if provided < Threading::Serialized {
            return Err(CommError::Mpi(format!(
                "the MPI library offers thread level {provided:?}, but hytrain needs Serialized; \
                 use an Open MPI built with thread support"
            )));
        }
        let world = universe.world();
        let rank = world.rank() as usize;
        let size = world.size() as usize;
        tracing::info!(rank, world_size = size, "MPI backend initialised");
        Ok(Mpi {
            world,
            rank,
            size,
            send_f32: Vec::new(),
            recv_f32: Vec::new(),
            send_f64: Vec::new(),
            recv_f64: Vec::new(),
            _universe: universe,
        })
    }
}

fn check_count(op: &'static str, len: usize) -> Result<(), CommError> {
    if len > i32::MAX as usize {
        return Err(CommError::InvalidArgument {
            op,
            detail: format!("{len} elements exceed MPI's count limit of {}; split the buffer", i32::MAX),
        });
    }
    Ok(())
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn allreduce(&mut self, buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError> {
        check_count("allreduce", buf.len())?;
        let n = self.size;
        // rsmpi has no MPI_IN_PLACE for allreduce, so the input is copied into a send buffer kept between calls.
        match buf {
            Buffer::F32(b) => {
                self.send_f32.clear();
                self.send_f32.extend_from_slice(b);
                self.world.all_reduce_into(&self.send_f32[..], b, SystemOperation::sum());
                if op == ReduceOp::Avg {
                    b.iter_mut().for_each(|x| *x /= n as f32);
                }
            }
            Buffer::F64(b) => {
                self.send_f64.clear();
                self.send_f64.extend_from_slice(b);
                self.world.all_reduce_into(&self.send_f64[..], b, SystemOperation::sum());
                if op == ReduceOp::Avg {
                    b.iter_mut().for_each(|x| *x /= n as f64);
                }
            }
            Buffer::Bf16(b) => {
                // MPI has no bf16 type; sum in f32 and round once.
                self.send_f32.clear();
                self.send_f32.extend(b.iter().map(|x| x.to_f32()));
                self.recv_f32.clear();
                self.recv_f32.resize(b.len(), 0.0);
                self.world.all_reduce_into(&self.send_f32[..], &mut self.recv_f32[..], SystemOperation::sum());
                let scale = if op == ReduceOp::Avg { n as f32 } else { 1.0 };
                for (d, s) in b.iter_mut().zip(&self.recv_f32) {
                    *d = bf16::from_f32(*s / scale);
                }
            }
        }
        Ok(())
    }

    fn broadcast(&mut self, bytes: &mut [u8], root: usize) -> Result<(), CommError> {
        if root >= self.size {
            return Err(CommError::InvalidArgument {
                op: "broadcast",
                detail: format!("root {root} is not a rank (world_size {})", self.size),
            });
        }
        check_count("broadcast", bytes.len())?;
        // Open MPI refuses (and aborts the job on) a broadcast of zero bytes; every rank passes the same length.
        if bytes.is_empty() {
            return Ok(());
        }
        self.world.process_at_rank(root as i32).broadcast_into(bytes);
        Ok(())
    }

    fn allgather(&mut self, input: &[u8], output: &mut [u8]) -> Result<(), CommError> {
        if input.len().checked_mul(self.size) != Some(output.len()) {
            return Err(CommError::InvalidArgument {
                op: "allgather",
                detail: format!(
                    "output has {} bytes but must hold {} ranks x {} input bytes",
                    output.len(),
                    self.size,
                    input.len()
                ),
            });
        }
        check_count("allgather", output.len())?;
        if output.is_empty() {
            return Ok(());
        }
        self.world.all_gather_into(input, output);
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.world.barrier();
        Ok(())
    }

    /// `MPI_Reduce_scatter_block` into a block-sized buffer kept between calls, copied into this rank's block (an
    /// in-place `MPI_IN_PLACE` reduce-scatter would leave the result at the start of the buffer, not at the block).
    /// bf16 is widened to f32 as in allreduce. Open MPI picks the order of the additions for each collective, so
    /// the blocks equal allreduce's within rounding, not necessarily bit for bit. Outside this rank's block `buf`
    /// keeps its input.
    fn reduce_scatter(&mut self, buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError> {
        check_blocks("reduce_scatter", &buf, self.size)?;
        check_count("reduce_scatter", buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let n = self.size;
        let mine = block_range(buf.len(), n, self.rank);
        match buf {
            Buffer::F32(b) => {
                self.recv_f32.clear();
                self.recv_f32.resize(mine.len(), 0.0);
                self.world.reduce_scatter_block_into(&b[..], &mut self.recv_f32[..], SystemOperation::sum());
                for (d, s) in b[mine].iter_mut().zip(&self.recv_f32) {
                    *d = if op == ReduceOp::Avg { *s / n as f32 } else { *s };
                }
            }
            Buffer::F64(b) => {
                self.recv_f64.clear();
                self.recv_f64.resize(mine.len(), 0.0);
                self.world.reduce_scatter_block_into(&b[..], &mut self.recv_f64[..], SystemOperation::sum());
                for (d, s) in b[mine].iter_mut().zip(&self.recv_f64) {
                    *d = if op == ReduceOp::Avg { *s / n as f64 } else { *s };
                }
            }
            Buffer::Bf16(b) => {
                self.send_f32.clear();
                self.send_f32.extend(b.iter().map(|x| x.to_f32()));
                self.recv_f32.clear();
                self.recv_f32.resize(mine.len(), 0.0);
                self.world.reduce_scatter_block_into(
                    &self.send_f32[..],
                    &mut self.recv_f32[..],
                    SystemOperation::sum(),
                );
                let scale = if op == ReduceOp::Avg { n as f32 } else { 1.0 };
                for (d, s) in b[mine].iter_mut().zip(&self.recv_f32) {
                    *d = bf16::from_f32(*s / scale);
                }
            }
        }
        Ok(())
    }

    /// `MPI_Allgather` of this rank's block, copied out first (rsmpi offers no `MPI_IN_PLACE`), into the whole
    /// buffer; bf16 travels as its 16 bits.
    fn allgather_blocks(&mut self, buf: Buffer<'_>) -> Result<(), CommError> {
        check_blocks("allgather_blocks", &buf, self.size)?;
        check_count("allgather_blocks", buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let mine = block_range(buf.len(), self.size, self.rank);
        match buf {
            Buffer::F32(b) => {
                self.send_f32.clear();
                self.send_f32.extend_from_slice(&b[mine]);
                self.world.all_gather_into(&self.send_f32[..], b);
            }
            Buffer::F64(b) => {
                self.send_f64.clear();
                self.send_f64.extend_from_slice(&b[mine]);
                self.world.all_gather_into(&self.send_f64[..], b);
            }
            Buffer::Bf16(b) => {
                let bits: &mut [u16] = bytemuck::cast_slice_mut(b);
                let own: Vec<u16> = bits[mine].to_vec();
                self.world.all_gather_into(&own[..], bits);
            }
        }
        Ok(())
    }
}
