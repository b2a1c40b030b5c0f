//! The CPU backend: ranks linked in a TCP ring, each sending to `rank + 1` and receiving from `rank - 1`.
//!
//! A collective is a plan (see `schedule`) of steps cut into segments. A long-lived sender thread per ring writes
//! the send segments while the calling thread reads the receive segments and reduces them into the caller's buffer,
//! so the link carries data in both directions at once. Segment `j` of step `t` is only sent once segment `j` of
//! step `t - 1` has been received and reduced, which is all the ordering the ring needs.
//!
//! Both threads work on the caller's buffer through one raw pointer. They never touch the same bytes at the same
//! time: within a step the send and receive ranges are different chunks, and a chunk sent at step `t` can only be
//! written again by the receiver after the data derived from it has gone all the way around the ring, which
//! requires that the kernel has already copied it out of the buffer. Every collective waits for the sender to
//! finish (also when it fails or unwinds) before the borrow of the buffer ends.
//!
//! Every collective starts with a 32-byte header so that ranks calling different collectives, or the same one with
//! different sizes, fail with a message naming both calls instead of silently mixing data.
//!
//! - `links`: connecting the ring (addresses through the store, hello and job-token handshake both ways) and
//!   [`Links`], what a linked ring holds.
//! - `schedule`: the plan of a collective: which chunk each rank sends, receives and reduces at each step.
//! - `pipeline`: running a plan: the header, the sender thread, the receive-and-reduce loop, naming a failure.
//! - this file: [`Ring`] and its [`Collective`] operations, which pick a plan and run it.

mod links;
mod pipeline;
mod schedule;
#[cfg(test)]
mod tests;

use bytemuck::Pod;
use half::bf16;

use crate::{
    block_range, check_blocks, Buffer, Collective, CommError, CommOptions, Liveness, Membership, ReduceOp, Store,
};
use links::{link, Links};
use pipeline::Header;
pub(crate) use schedule::chunk;
use schedule::Step;

/// Default segment: large enough that per-segment overhead (a syscall, a lock) is noise, small enough that the next
/// rank starts forwarding long before a chunk is complete.
pub const DEFAULT_SEGMENT_BYTES: usize = 512 << 10;

const OP_ALLREDUCE: u8 = 1;
const OP_BROADCAST: u8 = 2;
const OP_ALLGATHER: u8 = 3;
const OP_BARRIER: u8 = 4;
const OP_REDUCE_SCATTER: u8 = 5;
const OP_ALLGATHER_BLOCKS: u8 = 6;

const DT_U8: u8 = 0;
pub(crate) const DT_F32: u8 = 1;
pub(crate) const DT_F64: u8 = 2;
pub(crate) const DT_BF16: u8 = 3;

/// TCP ring collectives for CPU buffers (see the crate docs). Built with [`Ring::connect`] after a rendezvous.
pub struct Ring {
    rank: usize,
    world: usize,
    links: Option<Links>,
    seq: u64,
    broken: Option<String>,
    segment_bytes: usize,
    steps: Vec<Step>,
    send_steps: Vec<Step>,
    scratch: Vec<u64>,
    widened: Vec<f32>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("rank", &self.rank).field("world_size", &self.world).finish()
    }
}

impl Ring {
    /// Links this rank into the ring: listens on an ephemeral port, publishes its address in the store, connects to
    /// `rank + 1` and accepts `rank - 1`. Both ends check job id, ring generation and rank, and prove to each
    /// other that they hold the job token (`opts`' [`CommOptions::token`]), so a stray, stale or hostile
    /// connection is refused and cannot inject data. Every rank must call this the same number of times, in the
    /// same order.
    pub fn connect(store: &Store, m: &Membership, opts: &CommOptions) -> Result<Ring, CommError> {
        m.validate()?;
        if store.rank() != m.rank || store.world_size() != m.world_size {
            return Err(CommError::InvalidMembership(format!(
                "the store was joined as rank {} of {} but the ring is asked for rank {} of {}",
                store.rank(),
                store.world_size(),
                m.rank,
                m.world_size
            )));
        }
        let mut ring = Ring::unlinked(m);
        if m.world_size == 1 {
            return Ok(ring);
        }
        let generation = store.next_generation("ring");
        ring.links = Some(link(store, m, opts, generation)?);
        Ok(ring)
    }

    /// `m`'s place in a ring with no links yet: what a world of one keeps, and what [`Ring::connect`] and
    /// [`Ring::connect_group`] link.
    fn unlinked(m: &Membership) -> Ring {
        let mut ring = Ring {
            rank: m.rank,
            world: m.world_size,
            links: None,
            seq: 0,
            broken: None,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            steps: Vec::new(),
            send_steps: Vec::new(),
            scratch: Vec::new(),
            widened: Vec::new(),
        };
        ring.set_segment_bytes(DEFAULT_SEGMENT_BYTES);
        ring
    }

    /// Links a ring of a subset of the job's ranks (the node leaders of the shared-memory transport): `m` gives
    /// this rank's place in the subset, whose rank 0 must be the job's rank 0 (it hosts the store). Every member
    /// of the subset must call this the same number of times; generations are counted apart from [`Ring::connect`]
    /// and offset so that their store keys and handshakes never match a whole-job ring's.
    pub(crate) fn connect_group(store: &Store, m: &Membership, opts: &CommOptions) -> Result<Ring, CommError> {
        m.validate()?;
        let mut ring = Ring::unlinked(m);
        if m.world_size > 1 {
            let generation = (1 << 32) + store.next_generation("ring-group");
            ring.links = Some(link(store, m, opts, generation)?);
        }
        Ok(ring)
    }

    /// Changes the segment size (bytes, rounded down to whole elements, at least one element). Use the same value
    /// on every rank; the default is [`DEFAULT_SEGMENT_BYTES`].
    pub fn set_segment_bytes(&mut self, bytes: usize) {
        self.segment_bytes = bytes.max(8);
        self.scratch = vec![0u64; self.segment_bytes.div_ceil(8)];
    }

    fn usable(&self) -> Result<(), CommError> {
        match &self.broken {
            Some(why) => Err(CommError::Broken(why.clone())),
            None => Ok(()),
        }
    }

    /// Runs the plan in `self.steps` over `buf`; a failure marks the ring unusable.
    fn run<T: Pod>(
        &mut self,
        during: &'static str,
        op: u8,
        dtype: u8,
        aux: u64,
        buf: &mut [T],
        reduce: fn(&mut [T], &[T]),
    ) -> Result<(), CommError> {
        self.usable()?;
        let header = Header { op, dtype, seq: self.seq, len: buf.len() as u64, aux };
        self.seq += 1;
        let outcome = self.exchange(during, header, buf, reduce);
        if let Err(e) = &outcome {
            self.broken = Some(e.to_string());
        }
        outcome
    }

    fn allreduce_typed<T: Pod>(
        &mut self,
        buf: &mut [T],
        op: u8,
        dtype: u8,
        reduce: fn(&mut [T], &[T]),
    ) -> Result<(), CommError> {
        self.usable()?;
        if self.world == 1 {
            return Ok(());
        }
        schedule::allreduce(buf.len(), self.world, self.rank, &mut self.steps);
        self.run(if op == OP_BARRIER { "barrier" } else { "allreduce" }, op, dtype, 0, buf, reduce)
    }

    /// The reduce-scatter half of the allreduce plan: this rank's block of `buf` ends reduced. With a length that
    /// splits into equal blocks, the allreduce's chunks are these blocks, so the block sums are the allreduce's.
    fn reduce_scatter_typed<T: Pod>(
        &mut self,
        buf: &mut [T],
        dtype: u8,
        reduce: fn(&mut [T], &[T]),
    ) -> Result<(), CommError> {
        self.usable()?;
        if self.world == 1 {
            return Ok(());
        }
        let block = buf.len() / self.world;
        schedule::reduce_scatter_chunks(self.world, self.rank, |c| c * block..(c + 1) * block, &mut self.steps);
        self.run("reduce_scatter", OP_REDUCE_SCATTER, dtype, 0, buf, reduce)
    }

    fn allgather_blocks_typed<T: Pod>(&mut self, buf: &mut [T], dtype: u8) -> Result<(), CommError> {
        self.usable()?;
        if self.world == 1 {
            return Ok(());
        }
        schedule::allgather(buf.len() / self.world, self.world, self.rank, &mut self.steps);
        self.run("allgather_blocks", OP_ALLGATHER_BLOCKS, dtype, 0, buf, copy_only)
    }

    /// Sums `buf` over the ring where the plan's chunk `c` is `chunk(c)` (disjoint ranges, one per rank; elements
    /// outside every chunk are left alone): with `scatter_only` rank `r` ends with chunk `r` summed (the
    /// reduce-scatter half), else every rank with every chunk. For the node leaders of the shared-memory
    /// transport, whose pieces are slices of every node's region; `piece` goes into the header so that ranks on
    /// different pieces fail as a mismatch.
    pub(crate) fn sum_chunks<T: Pod>(
        &mut self,
        buf: &mut [T],
        dtype: u8,
        reduce: fn(&mut [T], &[T]),
        scatter_only: bool,
        piece: u64,
        chunk: impl Fn(usize) -> std::ops::Range<usize>,
    ) -> Result<(), CommError> {
        self.usable()?;
        if self.world == 1 {
            return Ok(());
        }
        let (during, op) = match scatter_only {
            true => {
                schedule::reduce_scatter_chunks(self.world, self.rank, chunk, &mut self.steps);
                ("reduce_scatter", OP_REDUCE_SCATTER)
            }
            false => {
                schedule::allreduce_chunks(self.world, self.rank, chunk, &mut self.steps);
                ("allreduce", OP_ALLREDUCE)
            }
        };
        self.run(during, op, dtype, piece, buf, reduce)
    }

    /// Gathers chunk `c = chunk(c)` of `buf` from rank `c` to every rank (see [`Ring::sum_chunks`]).
    pub(crate) fn gather_chunks<T: Pod>(
        &mut self,
        buf: &mut [T],
        dtype: u8,
        piece: u64,
        chunk: impl Fn(usize) -> std::ops::Range<usize>,
    ) -> Result<(), CommError> {
        self.usable()?;
        if self.world == 1 {
            return Ok(());
        }
        schedule::allgather_chunks(self.world, self.rank, chunk, &mut self.steps);
        self.run("allgather_blocks", OP_ALLGATHER_BLOCKS, dtype, piece, buf, copy_only)
    }
}

pub(crate) fn add_f32(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

pub(crate) fn add_f64(dst: &mut [f64], src: &[f64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

fn copy_only<T>(_: &mut [T], _: &[T]) {}

impl Collective for Ring {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn backend(&self) -> &'static str {
        "ring"
    }

    fn allreduce(&mut self, buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError> {
        let n = self.world;
        match buf {
            Buffer::F32(b) => {
                self.allreduce_typed(b, OP_ALLREDUCE, DT_F32, add_f32)?;
                if op == ReduceOp::Avg && n > 1 {
                    b.iter_mut().for_each(|x| *x /= n as f32);
                }
            }
            Buffer::F64(b) => {
                self.allreduce_typed(b, OP_ALLREDUCE, DT_F64, add_f64)?;
                if op == ReduceOp::Avg && n > 1 {
                    b.iter_mut().for_each(|x| *x /= n as f64);
                }
            }
            Buffer::Bf16(b) => {
                if n == 1 {
                    return self.usable();
                }
                // Partial sums travel as f32 so the only rounding to bf16 is the final one.
                let mut wide = std::mem::take(&mut self.widened);
                wide.clear();
                wide.extend(b.iter().map(|x| x.to_f32()));
                let result = self.allreduce_typed(&mut wide, OP_ALLREDUCE, DT_BF16, add_f32);
                if result.is_ok() {
                    let scale = if op == ReduceOp::Avg { n as f32 } else { 1.0 };
                    for (d, s) in b.iter_mut().zip(&wide) {
                        *d = bf16::from_f32(*s / scale);
                    }
                }
                self.widened = wide;
                result?;
            }
        }
        Ok(())
    }

    fn broadcast(&mut self, bytes: &mut [u8], root: usize) -> Result<(), CommError> {
        if root >= self.world {
            return Err(CommError::InvalidArgument {
                op: "broadcast",
                detail: format!("root {root} is not a rank (world_size {})", self.world),
            });
        }
        self.usable()?;
        if self.world == 1 {
            return Ok(());
        }
        schedule::broadcast(bytes.len(), self.world, self.rank, root, &mut self.steps);
        self.run("broadcast", OP_BROADCAST, DT_U8, root as u64, bytes, copy_only)
    }

    fn allgather(&mut self, input: &[u8], output: &mut [u8]) -> Result<(), CommError> {
        if input.len().checked_mul(self.world) != Some(output.len()) {
            return Err(CommError::InvalidArgument {
                op: "allgather",
                detail: format!(
                    "output has {} bytes but must hold {} ranks x {} input bytes",
                    output.len(),
                    self.world,
                    input.len()
                ),
            });
        }
        self.usable()?;
        let block = input.len();
        output[self.rank * block..(self.rank + 1) * block].copy_from_slice(input);
        if self.world == 1 {
            return Ok(());
        }
        schedule::allgather(block, self.world, self.rank, &mut self.steps);
        self.run("allgather", OP_ALLGATHER, DT_U8, 0, output, copy_only)
    }

    fn liveness(&self) -> Option<Liveness> {
        self.links.as_ref().and_then(|l| l.reporter.liveness.clone())
    }

    /// The first half of the ring allreduce (`world - 1` steps of `len / world` elements), so each block is summed
    /// exactly as [`allreduce`](Collective::allreduce) sums it; Avg divides the own block as allreduce does, bf16
    /// travels as f32 and is rounded once. Outside the own block `buf` holds partial sums afterwards (f32 and
    /// f64) or its input (bf16).
    fn reduce_scatter(&mut self, buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError> {
        check_blocks("reduce_scatter", &buf, self.world)?;
        let (n, mine) = (self.world, block_range(buf.len(), self.world, self.rank));
        match buf {
            Buffer::F32(b) => {
                self.reduce_scatter_typed(b, DT_F32, add_f32)?;
                if op == ReduceOp::Avg && n > 1 {
                    b[mine].iter_mut().for_each(|x| *x /= n as f32);
                }
            }
            Buffer::F64(b) => {
                self.reduce_scatter_typed(b, DT_F64, add_f64)?;
                if op == ReduceOp::Avg && n > 1 {
                    b[mine].iter_mut().for_each(|x| *x /= n as f64);
                }
            }
            Buffer::Bf16(b) => {
                if n == 1 {
                    return self.usable();
                }
                let mut wide = std::mem::take(&mut self.widened);
                wide.clear();
                wide.extend(b.iter().map(|x| x.to_f32()));
                let result = self.reduce_scatter_typed(&mut wide, DT_BF16, add_f32);
                if result.is_ok() {
                    let scale = if op == ReduceOp::Avg { n as f32 } else { 1.0 };
                    for (d, s) in b[mine.clone()].iter_mut().zip(&wide[mine]) {
                        *d = bf16::from_f32(*s / scale);
                    }
                }
                self.widened = wide;
                result?;
            }
        }
        Ok(())
    }

    /// The second half of the ring allreduce: `world - 1` steps passing blocks on, the same bytes as
    /// [`allgather`](Collective::allgather) without its copy into a separate output.
    fn allgather_blocks(&mut self, buf: Buffer<'_>) -> Result<(), CommError> {
        check_blocks("allgather_blocks", &buf, self.world)?;
        match buf {
            Buffer::F32(b) => self.allgather_blocks_typed(b, DT_F32),
            Buffer::F64(b) => self.allgather_blocks_typed(b, DT_F64),
            Buffer::Bf16(b) => self.allgather_blocks_typed(b, DT_BF16),
        }
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        // A one-element allreduce: its result depends on every rank, so no rank can leave before all arrived.
        let mut one = [1.0f32];
        self.allreduce_typed(&mut one, OP_BARRIER, DT_F32, add_f32)?;
        if one[0] != self.world as f32 {
            return Err(CommError::Mismatch(format!("barrier counted {} ranks instead of {}", one[0], self.world)));
        }
        Ok(())
    }
}
