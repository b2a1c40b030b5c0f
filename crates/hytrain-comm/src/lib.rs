//! How hytrain workers find each other and exchange data.
//!
//! Every rank calls [`Store::rendezvous`]: global rank 0 hosts a small key-value store at `master_addr:master_port`
//! in a background thread, every rank connects to it (retrying DNS and connection until `rendezvous_timeout`) and
//! waits until all `world_size` ranks have joined. On top of the store, [`Ring`] links the ranks in a TCP ring and
//! implements the [`Collective`] operations (allreduce, broadcast, allgather, barrier, and the sharded optimizer's
//! in-place reduce_scatter and allgather_blocks) on plain slices, chunked and pipelined so that a large allreduce
//! runs near link bandwidth. When several ranks share a node, [`init`] by
//! default reduces between them through a shared-memory segment instead, and across nodes through a ring of the
//! nodes' local rank 0s ([`Transport`]). With the `mpi` feature and a job started by `mpirun`, [`init`] picks the
//! MPI backend instead.
//!
//! This crate never reads launcher environment variables: the caller (hytrain-cluster) says who this rank is with a
//! [`Membership`].
//!
//! Every connection, to the store and between ring peers, starts with a challenge-response over the job's secret
//! ([`CommOptions::job_token`], a [`JobToken`]), in both directions, so a process that does not hold the secret
//! can neither join the job nor feed data into a collective.
//!
//! Every rank also keeps a liveness watch on the store (see [`Liveness`]): when a rank dies, stops or is cut off,
//! every other rank learns within the peer timeout ([`CommOptions::peer_timeout`]) which rank it was, and a
//! collective blocked on it returns [`CommError::RankLost`] instead of waiting for the collective timeout. Only the start of each connection is authenticated;
//! the data that follows is not encrypted, so run jobs on a private network.
//!
//! ## Layout
//!
//! - `rendezvous/`: finding each other. `protocol.rs` (the store's requests as bytes), `server.rs` (the store rank 0
//!   hosts; it knows no client), `client.rs` ([`Store`] and the rendezvous), `liveness/` ([`Liveness`], both ends of
//!   the watch; it sees the store only through a small interface), `auth.rs` (the handshake every connection opens
//!   with, keyed on the [`JobToken`]), `wire.rs` (the byte encoding).
//! - `backend/`: the [`Collective`] implementations. `ring/` (the TCP [`Ring`]: `links.rs` connects it,
//!   `schedule.rs` plans a collective, `pipeline.rs` runs the plan), `shm/` (shared memory inside a node), `mpi.rs`
//!   (feature `mpi`), `failure.rs` (how a backend records its failure for the other ranks).
//! - `transport.rs`: which backend a job gets ([`Transport`]) and [`connect`]ing it over a joined store.
//! - `recorder.rs`: the collective flight recorder ([`recorder::Recorded`] records every call; dumps and their
//!   diagnosis after a hang or a loss).
//! - `error.rs`: [`CommError`]; `net.rs`: socket helpers.
//! - `testing.rs` (feature `testing`, and this crate's own tests): `InProcess`, N exact ranks as threads of one
//!   process; `FailingCollective`, which fails a chosen call; `free_port` and `on_ranks`.
//! - `tests/conformance/`: one set of exactness cases (`cases.rs`) run over every backend.
//!
//! ```no_run
//! use hytrain_comm::{init, Buffer, CommOptions, Membership, ReduceOp};
//!
//! # fn main() -> Result<(), hytrain_comm::CommError> {
//! let me = Membership {
//!     rank: 0, world_size: 2, local_rank: 0, local_world_size: 2,
//!     master_addr: "127.0.0.1".into(), master_port: 29500,
//! };
//! let mut comm = init(&me, false, &CommOptions::default())?;
//! let mut grads = vec![1.0f32; 1 << 20];
//! comm.allreduce(Buffer::F32(&mut grads), ReduceOp::Avg)?;
//! # Ok(()) }
//! ```

#[cfg(target_endian = "big")]
compile_error!("hytrain-comm sends values in the host's byte order and supports little-endian hosts only");

use std::time::Duration;

use hytrain_cluster::JobToken;

// Lets the conformance cases (tests/conformance/cases.rs), which name this crate as `hytrain_comm`, run in its unit
// tests too.
#[cfg(test)]
extern crate self as hytrain_comm;

mod backend;
/// The conformance cases of tests/conformance, run by the backends' unit tests with tiny segments and slots.
#[cfg(test)]
#[path = "../tests/conformance/cases.rs"]
mod conformance;
mod error;
mod net;
pub mod recorder;
mod rendezvous;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod transport;

#[cfg(feature = "mpi")]
pub use backend::mpi::Mpi;
pub use backend::ring::{Ring, DEFAULT_SEGMENT_BYTES};
pub use error::{CommError, RankList};
pub use rendezvous::client::{Admitted, NodeRange, Store};
pub use rendezvous::liveness::{Liveness, LostRank};
pub use rendezvous::standalone::StandaloneStore;
pub use transport::{connect, Transport};

/// Entry points for the fuzz targets (`fuzz/`) and the tests that replay their corpus: decoders run on arbitrary
/// bytes, which must return without panicking, hanging or allocating more than the bytes justify. Not API.
#[doc(hidden)]
pub mod fuzzing {
    /// The rendezvous store's wire format as its server reads it: a client's greeting, then requests until the
    /// bytes end or one is malformed. Returns the number of requests decoded.
    pub fn store_wire(bytes: &[u8]) -> usize {
        crate::rendezvous::protocol::decode_stream(bytes)
    }
}

/// Who this rank is and where the master is; built by the caller from the launcher's view of the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Number of processes in the job.
    pub world_size: usize,
    /// Rank among the processes on this node.
    pub local_rank: usize,
    /// Number of processes on this node.
    pub local_world_size: usize,
    /// Host name or address of the node running global rank 0.
    pub master_addr: String,
    /// Port of the rendezvous store on the master.
    pub master_port: u16,
}

impl Membership {
    /// Checks the fields against each other; every later error assumes they are consistent.
    pub fn validate(&self) -> Result<(), CommError> {
        let bad = |m: String| Err(CommError::InvalidMembership(m));
        if self.world_size == 0 {
            return bad("world_size is 0; it must count at least this process".into());
        }
        if self.rank >= self.world_size {
            return bad(format!("rank {} is not below world_size {}", self.rank, self.world_size));
        }
        if self.local_world_size == 0 || self.local_world_size > self.world_size {
            return bad(format!(
                "local_world_size {} must be between 1 and world_size {}",
                self.local_world_size, self.world_size
            ));
        }
        if self.local_rank >= self.local_world_size {
            return bad(format!(
                "local_rank {} is not below local_world_size {}",
                self.local_rank, self.local_world_size
            ));
        }
        if self.master_addr.trim().is_empty() {
            return bad("master_addr is empty; set it to the host name or address of rank 0".into());
        }
        if self.master_port == 0 {
            return bad("master_port is 0; pick a fixed port that every rank can reach on the master".into());
        }
        Ok(())
    }
}

/// Deadlines and naming shared by the store and the backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommOptions {
    /// How long ranks wait for each other to join, and how long a store `get`/`wait`/`barrier` may block.
    /// Default 900 s: cluster nodes and their DNS names can take minutes to appear.
    pub rendezvous_timeout: Duration,
    /// A peer silent this long during a collective counts as failed. Default 300 s.
    pub collective_timeout: Duration,
    /// A rank whose liveness watch sent no heartbeat for this long counts as lost (its process stopped, hung or
    /// was cut off from the network); a rank that dies outright is noticed at once. Default 30 s.
    pub peer_timeout: Duration,
    /// Prefix of every store key, and checked when ranks connect, so two jobs that share a master address and
    /// port cannot mix. Default "hytrain".
    pub job_id: String,
    /// The secret every rank proves it holds when it connects to the store or to a ring peer; every rank must get
    /// the same: the plan's token as hytrain-cluster found it, or [`JobToken::new`] of a secret of the program's
    /// own. `None` (the default): [`JobToken::default_for`] `job_id`, which keeps other jobs and stray clients out
    /// by accident but not by design, and makes rank 0 warn once.
    pub job_token: Option<JobToken>,
    /// How ranks exchange data: by default ([`Transport::Auto`]) through shared memory between the processes of
    /// a node (and a ring among the nodes' local rank 0s) whenever ranks share a node, else the TCP ring.
    pub transport: Transport,
    /// Whether the store runs outside this job's ranks (a standalone `hytrain rendezvous`, or a pod of the job
    /// other than this process's): every rank, rank 0 included, then joins it at `master_addr:master_port` as a
    /// client, and losing rank 0 is a loss like any other. `false` (the default): global rank 0 hosts it.
    pub external_store: bool,
}

impl CommOptions {
    /// Checks the deadlines: each must be positive (a zero deadline would fail every wait at once).
    pub fn validate(&self) -> Result<(), CommError> {
        for (name, value) in [
            ("rendezvous_timeout", self.rendezvous_timeout),
            ("collective_timeout", self.collective_timeout),
            ("peer_timeout", self.peer_timeout),
        ] {
            if value.is_zero() {
                return Err(CommError::InvalidOptions(format!("{name} is 0; give a positive number of seconds")));
            }
        }
        Ok(())
    }

    /// The token connections are authenticated with: `job_token`, else the default derived from `job_id`.
    pub fn token(&self) -> JobToken {
        self.job_token.clone().unwrap_or_else(|| JobToken::default_for(&self.job_id))
    }
}

impl Default for CommOptions {
    fn default() -> Self {
        CommOptions {
            rendezvous_timeout: Duration::from_secs(900),
            collective_timeout: Duration::from_secs(300),
            peer_timeout: Duration::from_secs(30),
            job_id: "hytrain".into(),
            job_token: None,
            transport: Transport::Auto,
            external_store: false,
        }
    }
}

/// How values from all ranks are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise sum divided by `world_size` (after summing, so integer-valued inputs stay exact until then).
    Avg,
}

/// A buffer reduced in place.
#[derive(Debug)]
pub enum Buffer<'a> {
    /// 32-bit floats.
    F32(&'a mut [f32]),
    /// 64-bit floats.
    F64(&'a mut [f64]),
    /// bfloat16 values; summed in f32 and rounded once at the end.
    Bf16(&'a mut [half::bf16]),
}

impl Buffer<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Buffer::F32(b) => b.len(),
            Buffer::F64(b) => b.len(),
            Buffer::Bf16(b) => b.len(),
        }
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        match self {
            Buffer::F32(b) => std::mem::size_of_val(*b),
            Buffer::F64(b) => std::mem::size_of_val(*b),
            Buffer::Bf16(b) => std::mem::size_of_val(*b),
        }
    }

    /// Whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type's name as used in messages ("f32", "f64", "bf16").
    pub fn dtype(&self) -> &'static str {
        match self {
            Buffer::F32(_) => "f32",
            Buffer::F64(_) => "f64",
            Buffer::Bf16(_) => "bf16",
        }
    }

    /// The elements' bytes, for collectives that only move data.
    pub(crate) fn as_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Buffer::F32(b) => bytemuck::cast_slice_mut(b),
            Buffer::F64(b) => bytemuck::cast_slice_mut(b),
            Buffer::Bf16(b) => bytemuck::cast_slice_mut(b),
        }
    }
}

/// Collective operations over all ranks of the job. Every rank must call the same operations in the same order
/// with matching sizes; the ring backend checks this and fails with a message naming both calls.
///
/// After an operation fails the backend is unusable: every later call returns an error.
pub trait Collective: Send {
    /// This rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// "ring", "shm", "mpi" or "in-process".
    fn backend(&self) -> &'static str;
    /// Combines `buf` element-wise across all ranks; every rank ends with the result.
    fn allreduce(&mut self, buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError>;
    /// Copies `bytes` from rank `root` to every rank; all ranks pass buffers of the same length.
    fn broadcast(&mut self, bytes: &mut [u8], root: usize) -> Result<(), CommError>;
    /// Concatenates every rank's `input` in rank order into `output` (`output.len() == input.len() * world_size`).
    fn allgather(&mut self, input: &[u8], output: &mut [u8]) -> Result<(), CommError>;
    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<(), CommError>;
    /// This rank's view of the job's liveness, where the backend keeps one (the ring does, for two or more
    /// ranks): which rank was lost, and the goodbye when this rank is done.
    fn liveness(&self) -> Option<Liveness> {
        None
    }

    /// Reduces `buf` across all ranks, in place, and leaves each rank only its own block reduced: afterwards rank
    /// `r`'s block ([`block_range`]`(buf.len(), world_size, r)`) holds the same values, bit for bit, that
    /// [`allreduce`](Collective::allreduce) with the same `op` on the same buffers would leave there (the same
    /// additions in the same order, the same division for [`ReduceOp::Avg`], bf16 summed in f32 and rounded once).
    /// What the rest of `buf` holds afterwards is unspecified (partial sums, the input, or the full result).
    ///
    /// `buf.len()` must be a multiple of `world_size` (the caller pads); otherwise the call fails with
    /// [`CommError::InvalidArgument`] before any data moves, and the backend stays usable. Failures of the job
    /// (a lost or silent rank, mismatched calls) are reported as for `allreduce`.
    ///
    /// The default runs `allreduce`, which is correct but moves twice the data of a ring reduce-scatter; the
    /// job's backends (ring, shm, MPI) implement it natively.
    fn reduce_scatter(&mut self, buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError> {
        check_blocks("reduce_scatter", &buf, self.world_size())?;
        self.allreduce(buf, op)
    }

    /// The in-place allgather of equal blocks, the counterpart of [`reduce_scatter`](Collective::reduce_scatter):
    /// each rank `r` contributes its block [`block_range`]`(buf.len(), world_size, r)` of `buf`, and afterwards
    /// every rank's `buf` holds every rank's block. Only bits move, so a 2-byte type other than bf16 (IEEE half)
    /// can be gathered as [`Buffer::Bf16`] through `bytemuck::cast_slice_mut`.
    ///
    /// `buf.len()` must be a multiple of `world_size` (the caller pads), as for `reduce_scatter`.
    ///
    /// The default broadcasts each block from its owner (correct, with the same bytes on the wire as a ring
    /// allgather but `world_size` rounds of latency); the job's backends implement it natively.
    fn allgather_blocks(&mut self, buf: Buffer<'_>) -> Result<(), CommError> {
        check_blocks("allgather_blocks", &buf, self.world_size())?;
        let world = self.world_size();
        let mut buf = buf;
        let bytes = buf.as_bytes_mut();
        let block = bytes.len() / world;
        if block > 0 {
            for (root, part) in bytes.chunks_exact_mut(block).enumerate() {
                self.broadcast(part, root)?;
            }
        }
        Ok(())
    }
}

/// The elements of rank `rank`'s block when `len` elements (a multiple of `world_size`) are split into
/// `world_size` equal blocks in rank order: what [`Collective::reduce_scatter`] leaves reduced on that rank and
/// what it contributes to [`Collective::allgather_blocks`].
pub fn block_range(len: usize, world_size: usize, rank: usize) -> std::ops::Range<usize> {
    let block = len / world_size.max(1);
    rank * block..(rank + 1) * block
}

/// Refuses a buffer that does not split into `world` equal blocks, naming the padded length the caller needs.
pub(crate) fn check_blocks(op: &'static str, buf: &Buffer<'_>, world: usize) -> Result<(), CommError> {
    let len = buf.len();
    if world == 0 || !len.is_multiple_of(world) {
        return Err(CommError::InvalidArgument {
            op,
            detail: format!(
                "{len} {} elements do not split into {world} equal blocks (one per rank); the caller pads the \
                 buffer to a multiple of world_size ({} elements)",
                buf.dtype(),
                len.next_multiple_of(world.max(1))
            ),
        });
    }
    Ok(())
}

/// Starts this rank's collective backend: MPI when the process was launched by `mpirun` (the caller decides, e.g.
/// from `OMPI_COMM_WORLD_SIZE`) and the `mpi` feature is built, otherwise a rendezvous through the [`Store`] and
/// the transport [`CommOptions::transport`] selects: shared memory inside each node ("shm", hierarchical across
/// nodes) or a TCP [`Ring`] ("ring").
pub fn init(m: &Membership, launched_by_mpirun: bool, opts: &CommOptions) -> Result<Box<dyn Collective>, CommError> {
    m.validate()?;
    if launched_by_mpirun {
        #[cfg(feature = "mpi")]
        {
            let mpi = Mpi::init()?;
            if mpi.rank() != m.rank || mpi.world_size() != m.world_size {
                return Err(CommError::Mpi(format!(
                    "MPI says rank {} of {} but the launcher environment says rank {} of {}",
                    mpi.rank(),
                    mpi.world_size(),
                    m.rank,
                    m.world_size
                )));
            }
            return Ok(Box::new(mpi));
        }
        #[cfg(not(feature = "mpi"))]
        tracing::info!(rank = m.rank, "launched by mpirun but built without the `mpi` feature; using the TCP ring");
    }
    let store = Store::rendezvous(m, opts)?;
    connect(&store, m, opts)
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    pub use crate::testing::{free_port, on_ranks};

    pub fn member(rank: usize, world_size: usize, port: u16) -> Membership {
        Membership {
            rank,
            world_size,
            local_rank: rank,
            local_world_size: world_size,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        }
    }

    pub fn opts(rendezvous_s: u64, collective_s: u64) -> CommOptions {
        CommOptions {
            rendezvous_timeout: Duration::from_secs(rendezvous_s),
            collective_timeout: Duration::from_secs(collective_s),
            peer_timeout: Duration::from_secs(30),
            job_id: "test".into(),
            job_token: None,
            transport: Transport::Auto,
            external_store: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_rejects_rank_not_below_world_size() {
        let m = testutil::member(4, 4, 29500);
        let e = m.validate().unwrap_err().to_string();
        assert!(e.contains("rank 4 is not below world_size 4"), "{e}");
    }

    #[test]
    fn membership_rejects_empty_master_and_zero_port() {
        let mut m = testutil::member(0, 2, 29500);
        m.master_addr = " ".into();
        assert!(m.validate().unwrap_err().to_string().contains("master_addr is empty"));
        let mut m = testutil::member(0, 2, 0);
        m.master_port = 0;
        assert!(m.validate().unwrap_err().to_string().contains("master_port is 0"));
        let mut m = testutil::member(0, 2, 1);
        m.local_rank = 2;
        assert!(m.validate().unwrap_err().to_string().contains("local_rank 2"));
        let m = testutil::member(0, 0, 1);
        assert!(m.validate().unwrap_err().to_string().contains("world_size is 0"));
    }

    #[test]
    fn single_rank_init_needs_no_peers_and_reduces_to_itself() {
        let m = testutil::member(0, 1, testutil::free_port());
        let mut c = init(&m, false, &testutil::opts(10, 10)).unwrap();
        assert_eq!(c.backend(), "ring");
        let mut v = vec![1.0f32, 2.0, 3.0];
        c.allreduce(Buffer::F32(&mut v), ReduceOp::Avg).unwrap();
        assert_eq!(v, [1.0, 2.0, 3.0]);
        let mut out = vec![0u8; 3];
        c.allgather(b"abc", &mut out).unwrap();
        assert_eq!(&out, b"abc");
        c.barrier().unwrap();
    }
}
