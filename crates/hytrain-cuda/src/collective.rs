//! Collectives on GPU memory through NCCL: the device-side counterpart of hytrain-comm's `Collective`, which works
//! on host slices.
//!
//! Streams: libtorch runs every tch operation on the current CUDA stream of the calling thread (the legacy default
//! stream, stream 0, unless something set another). [`NcclCollective`] queues its NCCL calls on a communication
//! stream of its own (non-blocking, so it does not serialise with stream 0 behind the scenes) and orders the two
//! with events: the communication stream waits for an event recorded on the compute stream after the buffer was
//! written, and the compute stream waits for the event recorded after the NCCL call, so later kernels read the
//! result. The compute stream is stream 0 unless [`NcclCollective::follow_current_stream`] (libtorch's current
//! stream at each call, through [`TorchStreams`]) or [`NcclCollective::set_compute_stream`] says otherwise.
//!
//! Timeouts: every operation is watched until its completion event fires. The watchdog polls the event and
//! `ncclCommGetAsyncError`; an asynchronous error, or no completion within the collective timeout, aborts the
//! communicator (`ncclCommAbort`, which also unblocks the hung kernel) and fails with a message naming the
//! operation. Because the host waits for the event before returning, a borrowed [`DeviceSlice`] outlives every
//! use NCCL makes of it.

use std::ffi::{c_int, c_void};
use std::fmt;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

use crate::driver::CudaDriver;
use crate::nccl::{Nccl, UniqueId, UNIQUE_ID_BYTES};
use crate::side_stream::{OwnedStream, Stream};
use crate::stream::TorchStreams;
use crate::CudaError;

/// How values from all ranks are combined on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceReduceOp {
    /// Element-wise sum (`ncclSum`).
    Sum,
    /// Element-wise mean over ranks (`ncclAvg`).
    Avg,
}

impl DeviceReduceOp {
    fn nccl(self) -> c_int {
        match self {
            DeviceReduceOp::Sum => 0,
            DeviceReduceOp::Avg => 4,
        }
    }
}

/// Element types NCCL reduces for hytrain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// 32-bit float (`ncclFloat32`).
    F32,
    /// IEEE half (`ncclFloat16`).
    F16,
    /// bfloat16 (`ncclBfloat16`).
    Bf16,
    /// 64-bit float (`ncclFloat64`).
    F64,
}

impl DType {
    /// The `ncclDataType_t` value from nccl.h.
    pub fn nccl(self) -> c_int {
        match self {
            DType::F16 => 6,
            DType::F32 => 7,
            DType::F64 => 8,
            DType::Bf16 => 9,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::Bf16 => 2,
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::F64 => "f64",
        })
    }
}

/// `count` elements of `dtype` in device memory, borrowed for `'a` from whatever owns the allocation (a tch
/// tensor, a [`crate::device::DeviceBuffer`]).
#[derive(Debug)]
pub struct DeviceSlice<'a> {
    address: u64,
    dtype: DType,
    count: usize,
    _owner: PhantomData<&'a mut ()>,
}

impl<'a> DeviceSlice<'a> {
    /// A view of device memory.
    ///
    /// # Safety
    /// `address` must be a device allocation of the collective's GPU holding at least `count` elements of
    /// `dtype`, not freed and not used by anything else on another stream while `'a` lasts.
    pub unsafe fn from_raw(address: u64, dtype: DType, count: usize) -> DeviceSlice<'a> {
        DeviceSlice { address, dtype, count, _owner: PhantomData }
    }

    /// The device address.
    pub fn address(&self) -> u64 {
        self.address
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there is no element.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Elements `range` of this slice, borrowed from it.
    pub fn part(&mut self, range: std::ops::Range<usize>) -> Result<DeviceSlice<'_>, CudaError> {
        if range.start > range.end || range.end > self.count {
            return Err(CudaError::Shape(format!(
                "elements {range:?} are not inside a slice of {} {} elements",
                self.count, self.dtype
            )));
        }
        Ok(DeviceSlice {
            address: self.address + (range.start * self.dtype.size()) as u64,
            dtype: self.dtype,
            count: range.len(),
            _owner: PhantomData,
        })
    }
}

/// Refuses a slice that does not split into `world` equal blocks, naming the padded length the caller needs (as
/// hytrain-comm's collectives do).
pub(crate) fn check_blocks(op: &str, buf: &DeviceSlice<'_>, world: usize) -> Result<(), CudaError> {
    if world == 0 || !buf.count.is_multiple_of(world) {
        return Err(CudaError::Shape(format!(
            "{op} of {} {} elements: they do not split into {world} equal blocks (one per rank); the caller pads \
             the buffer to a multiple of world_size ({} elements)",
            buf.count,
            buf.dtype,
            buf.count.next_multiple_of(world.max(1))
        )));
    }
    Ok(())
}

/// Collective operations over all ranks on GPU memory. Like hytrain-comm's `Collective`, every rank must call the
/// same operations in the same order with matching sizes, and after an operation fails every later call fails.
/// Each call returns once the operation has completed on the device (or failed, or timed out).
pub trait DeviceCollective: Send {
    /// This rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// "nccl".
    fn backend(&self) -> &'static str;
    /// Combines `buf` element-wise across ranks, in place.
    fn allreduce(&mut self, buf: DeviceSlice<'_>, op: DeviceReduceOp) -> Result<(), CudaError>;
    /// Copies rank `root`'s `buf` into every rank's.
    fn broadcast(&mut self, buf: DeviceSlice<'_>, root: usize) -> Result<(), CudaError>;
    /// Concatenates every rank's `input` in rank order into `output` (`world_size` times as long).
    fn allgather(&mut self, input: DeviceSlice<'_>, output: DeviceSlice<'_>) -> Result<(), CudaError>;
    /// Whether the addresses this collective takes are host memory rather than GPU memory: `false` for NCCL.
    /// A stand-in for NCCL in tests on machines without a GPU says `true`, so the engine's GPU path (buckets,
    /// buffers and their collectives) runs there on CPU tensors.
    fn host_memory(&self) -> bool {
        false
    }

    /// Reduces `buf` across ranks in place and leaves rank `r` its block reduced: elements `[r * n / w, (r + 1) *
    /// n / w)` of the `n` elements, `w` the world size. The rest of `buf` is unspecified afterwards. `n` must be a
    /// multiple of the world size (the caller pads), else [`CudaError::Shape`] before anything runs.
    ///
    /// The default runs [`allreduce`](DeviceCollective::allreduce) (correct, twice a reduce-scatter's traffic),
    /// for test doubles; NCCL implements it with `ncclReduceScatter`.
    fn reduce_scatter(&mut self, buf: DeviceSlice<'_>, op: DeviceReduceOp) -> Result<(), CudaError> {
        check_blocks("reduce_scatter", &buf, self.world_size())?;
        self.allreduce(buf, op)
    }

    /// The in-place allgather of equal blocks: rank `r` contributes its block `[r * n / w, (r + 1) * n / w)` of
    /// `buf` and every rank ends with every block. `n` must be a multiple of the world size, as for
    /// [`reduce_scatter`](DeviceCollective::reduce_scatter).
    ///
    /// The default broadcasts each block from its owner (correct, `world_size` calls), for test doubles; NCCL
    /// implements it with an in-place `ncclAllGather`.
    fn allgather_blocks(&mut self, mut buf: DeviceSlice<'_>) -> Result<(), CudaError> {
        let world = self.world_size();
        check_blocks("allgather_blocks", &buf, world)?;
        let block = buf.len() / world;
        for root in 0..world {
            self.broadcast(buf.part(root * block..(root + 1) * block)?, root)?;
        }
        Ok(())
    }
}

type Comm = *mut c_void;

#[repr(C)]
#[derive(Clone, Copy)]
struct RawUniqueId([u8; UNIQUE_ID_BYTES]);

type CommInitRank = unsafe extern "C" fn(*mut Comm, c_int, RawUniqueId, c_int) -> c_int;
type CommOnly = unsafe extern "C" fn(Comm) -> c_int;
type CommAsyncError = unsafe extern "C" fn(Comm, *mut c_int) -> c_int;
type AllReduce = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int;
type Broadcast = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int;
type AllGather = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, Stream) -> c_int;
type ReduceScatter = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int;

const NCCL_NEED: &str = "hytrain needs NCCL 2.18 or newer (pip install nvidia-nccl-cu13)";
/// `CUDA_ERROR_NOT_READY`: the event has not fired yet.
const NOT_READY: c_int = 600;
/// `ncclInProgress`: a non-blocking call still running, not an error.
const NCCL_IN_PROGRESS: c_int = 7;

/// NCCL's functions.
struct Api {
    init_rank: CommInitRank,
    abort: CommOnly,
    destroy: CommOnly,
    async_error: CommAsyncError,
    all_reduce: AllReduce,
    broadcast: Broadcast,
    all_gather: AllGather,
    reduce_scatter: ReduceScatter,
}

/// What the backend is doing, for errors.
struct Op {
    name: &'static str,
    dtype: DType,
    count: usize,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of {} {} elements", self.name, self.count, self.dtype)
    }
}

/// The stream whose work a collective waits for, and which waits for the collective.
enum ComputeStream {
    /// One stream for every call (null: the legacy default stream).
    Fixed(Stream),
    /// libtorch's current stream of the GPU on the calling thread, read at each call.
    Current(TorchStreams),
}

/// This rank's NCCL communicator on one GPU, with its communication stream and the collective timeout.
pub struct NcclCollective {
    nccl: Nccl,
    api: Api,
    comm: Comm,
    /// The communication stream; its first event marks the compute stream's work before an operation ("ready"),
    /// its second the operation's end on the communication stream ("done").
    own: OwnedStream,
    compute_stream: ComputeStream,
    /// The GPU's index as libtorch numbers it (`cuda:N`).
    gpu: u32,
    rank: usize,
    world_size: usize,
    timeout: Duration,
    /// Why the communicator was aborted, once it was; every later call fails with it.
    aborted: Option<String>,
}

// SAFETY: the handles are CUDA's and NCCL's, usable from any thread once the context is made current, which
// every method does first; `&mut self` keeps calls on one thread at a time.
unsafe impl Send for NcclCollective {}

impl fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("gpu", &self.gpu)
            .field("nccl", &self.nccl.version())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl NcclCollective {
    /// Joins the communicator of `world_size` ranks named by `id` as `rank`, on GPU `ordinal` (its index after
    /// CUDA_VISIBLE_DEVICES, as in `cuda:N`). Blocks until every rank has joined (`ncclCommInitRank`). Operations
    /// not complete within `timeout` abort the communicator. NCCL reads its own `NCCL_*` variables from the
    /// environment; hytrain sets none of them here.
    pub fn new(
        driver: CudaDriver,
        nccl: Nccl,
        ordinal: u32,
        id: &UniqueId,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<NcclCollective, CudaError> {
        if rank >= world_size {
            return Err(CudaError::Shape(format!("NCCL rank {rank} is not below world size {world_size}")));
        }
        let n = nccl.loaded();
        // SAFETY: the signatures are the driver API's (cuda.h; the _v2 names are what its macros call) and NCCL's
        // (nccl.h).
        let api = unsafe {
            Api {
                init_rank: n.function("ncclCommInitRank", NCCL_NEED)?,
                abort: n.function("ncclCommAbort", NCCL_NEED)?,
                destroy: n.function("ncclCommDestroy", NCCL_NEED)?,
                async_error: n.function("ncclCommGetAsyncError", NCCL_NEED)?,
                all_reduce: n.function("ncclAllReduce", NCCL_NEED)?,
                broadcast: n.function("ncclBroadcast", NCCL_NEED)?,
                all_gather: n.function("ncclAllGather", NCCL_NEED)?,
                reduce_scatter: n.function("ncclReduceScatter", NCCL_NEED)?,
            }
        };
        // From here on the stream's and the collective's Drop release what was made, so an error below leaks
        // nothing.
        let mut this = NcclCollective {
            nccl,
            api,
            comm: std::ptr::null_mut(),
            own: OwnedStream::new(driver, ordinal)?,
            compute_stream: ComputeStream::Fixed(std::ptr::null_mut()),
            gpu: ordinal,
            rank,
            world_size,
            timeout,
            aborted: None,
        };
        let started = Instant::now();
        // SAFETY: writes one communicator handle; the id goes by value, as nccl.h declares.
        let result = unsafe {
            (this.api.init_rank)(&mut this.comm, world_size as c_int, RawUniqueId(*id.as_bytes()), rank as c_int)
        };
        if result != 0 {
            this.comm = std::ptr::null_mut();
            return Err(CudaError::Nccl {
                call: "ncclCommInitRank",
                code: result,
                message: this.nccl.error_string(result),
            });
        }
        tracing::info!(
            rank,
            world_size,
            "NCCL {} communicator ready on cuda:{ordinal} in {:.1} s ({}); collectives on their own stream, \
             timeout {} s",
            this.nccl.version(),
            started.elapsed().as_secs_f64(),
            this.nccl.path().display(),
            timeout.as_secs()
        );
        Ok(this)
    }

    /// Orders operations after work on `stream` instead of the legacy default stream (stream 0, the default).
    ///
    /// # Safety
    /// `stream` must be a live CUDA stream of this collective's GPU for as long as this collective uses it.
    pub unsafe fn set_compute_stream(&mut self, stream: *mut c_void) {
        self.compute_stream = ComputeStream::Fixed(stream);
    }

    /// Orders each operation after work on libtorch's current stream of this collective's GPU, read through
    /// `streams` at each call on the calling thread, as PyTorch's own NCCL process group does; the current stream
    /// then waits for the operation.
    pub fn follow_current_stream(&mut self, streams: TorchStreams) {
        self.compute_stream = ComputeStream::Current(streams);
    }

    /// The compute stream for an operation starting now.
    fn compute_stream(&self) -> Result<Stream, CudaError> {
        match &self.compute_stream {
            ComputeStream::Fixed(stream) => Ok(*stream),
            ComputeStream::Current(streams) => streams.current(self.gpu as usize),
        }
    }

    /// The timeout every operation gets.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Queues `call` on the communication stream between the two events, then watches it until it completes.
    fn run(
        &mut self,
        op: Op,
        call: impl FnOnce(&Api, Comm, Stream) -> c_int,
        nccl_call: &'static str,
    ) -> Result<(), CudaError> {
        if let Some(reason) = &self.aborted {
            return Err(CudaError::CommunicatorAborted { rank: self.rank, op: op.to_string(), reason: reason.clone() });
        }
        if op.count == 0 {
            return Ok(());
        }
        self.own.make_current()?;
        let compute = self.compute_stream()?;
        let (d, cuda, comm_stream) = (&self.own.driver, &self.own.api, self.own.stream);
        let [ready, done] = self.own.events;
        // SAFETY: events and streams are this collective's own, or libtorch's current stream, or the caller's (see
        // set_compute_stream); the buffers the call reads are borrowed until `watch` returns.
        unsafe {
            d.check("cuEventRecord", (cuda.event_record)(ready, compute))?;
            d.check("cuStreamWaitEvent", (cuda.stream_wait)(comm_stream, ready, 0))?;
        }
        let result = call(&self.api, self.comm, comm_stream);
        if result != 0 && result != NCCL_IN_PROGRESS {
            let message = self.nccl.error_string(result);
            self.abort(format!("{nccl_call} failed: {message}"));
            return Err(CudaError::CollectiveFailed {
                rank: self.rank,
                op: op.to_string(),
                call: nccl_call,
                code: result,
                message,
            });
        }
        let (d, cuda) = (&self.own.driver, &self.own.api);
        // SAFETY: as above.
        unsafe {
            d.check("cuEventRecord", (cuda.event_record)(done, comm_stream))?;
            d.check("cuStreamWaitEvent", (cuda.stream_wait)(compute, done, 0))?;
        }
        self.watch(&op)
    }

    /// The watchdog: polls the completion event and NCCL's asynchronous error until the op is done, failed or late.
    fn watch(&mut self, op: &Op) -> Result<(), CudaError> {
        let started = Instant::now();
        let deadline = started + self.timeout;
        let mut pause = Duration::from_micros(1);
        loop {
            let done = self.own.events[1];
            // SAFETY: the event is this collective's own, created with it and destroyed only when it drops.
            match unsafe { (self.own.api.event_query)(done) } {
                0 => return Ok(()),
                NOT_READY => {}
                code => {
                    let error = self.own.driver.check("cuEventQuery", code).unwrap_err();
                    self.abort(format!("cuEventQuery failed: {error}"));
                    return Err(error);
                }
            }
            let mut state: c_int = 0;
            // SAFETY: writes one ncclResult_t.
            let result = unsafe { (self.api.async_error)(self.comm, &mut state) };
            let (call, code) =
                if result != 0 { ("ncclCommGetAsyncError", result) } else { ("ncclCommGetAsyncError", state) };
            if code != 0 && code != NCCL_IN_PROGRESS {
                let message = self.nccl.error_string(code);
                self.abort(format!("{op} failed asynchronously: {message}"));
                return Err(CudaError::CollectiveFailed { rank: self.rank, op: op.to_string(), call, code, message });
            }
            let now = Instant::now();
            if now >= deadline {
                self.abort(format!("{op} did not finish within {} s", self.timeout.as_secs_f64()));
                return Err(CudaError::CollectiveTimeout {
                    rank: self.rank,
                    op: op.to_string(),
                    timeout: self.timeout,
                });
            }
            // Spin briefly for small ops, then back off so a long wait does not burn a core.
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    /// Aborts the communicator once; NCCL then stops its kernels and threads, and no later call is attempted.
    fn abort(&mut self, reason: String) {
        if self.aborted.is_some() || self.comm.is_null() {
            return;
        }
        tracing::error!(rank = self.rank, "aborting the NCCL communicator: {reason}");
        // SAFETY: the communicator is live and aborted once; abort also frees it.
        let result = unsafe { (self.api.abort)(self.comm) };
        if result != 0 {
            tracing::warn!(rank = self.rank, "ncclCommAbort failed: {}", self.nccl.error_string(result));
        }
        self.comm = std::ptr::null_mut();
        self.aborted = Some(reason);
    }
}

impl DeviceCollective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn allreduce(&mut self, buf: DeviceSlice<'_>, op: DeviceReduceOp) -> Result<(), CudaError> {
        let (address, dtype, count) = (buf.address, buf.dtype, buf.count);
        let name = match op {
            DeviceReduceOp::Sum => "allreduce (sum)",
            DeviceReduceOp::Avg => "allreduce (avg)",
        };
        self.run(
            Op { name, dtype, count },
            // SAFETY: in place on `count` elements the caller lent for the call.
            |api, comm, stream| unsafe {
                (api.all_reduce)(
                    address as *const c_void,
                    address as *mut c_void,
                    count,
                    dtype.nccl(),
                    op.nccl(),
                    comm,
                    stream,
                )
            },
            "ncclAllReduce",
        )
    }

    fn broadcast(&mut self, buf: DeviceSlice<'_>, root: usize) -> Result<(), CudaError> {
        let (address, dtype, count) = (buf.address, buf.dtype, buf.count);
        if root >= self.world_size {
            return Err(CudaError::Shape(format!(
                "NCCL broadcast from rank {root}, but the job has {} ranks",
                self.world_size
            )));
        }
        self.run(
            Op { name: "broadcast", dtype, count },
            // SAFETY: in place on `count` elements the caller lent for the call.
            |api, comm, stream| unsafe {
                (api.broadcast)(
                    address as *const c_void,
                    address as *mut c_void,
                    count,
                    dtype.nccl(),
                    root as c_int,
                    comm,
                    stream,
                )
            },
            "ncclBroadcast",
        )
    }

    /// `ncclReduceScatter` in place (the result block at `buf + rank * block`, as NCCL's in-place form asks),
    /// with `ncclAvg` for averages as in allreduce. NCCL picks its algorithm per call, so the blocks equal an
    /// allreduce's within rounding, not necessarily bit for bit.
    fn reduce_scatter(&mut self, buf: DeviceSlice<'_>, op: DeviceReduceOp) -> Result<(), CudaError> {
        let (address, dtype, count) = (buf.address, buf.dtype, buf.count);
        let (recv, block) = self.own_block("reduce_scatter", &buf)?;
        let name = match op {
            DeviceReduceOp::Sum => "reduce_scatter (sum)",
            DeviceReduceOp::Avg => "reduce_scatter (avg)",
        };
        self.run(
            Op { name, dtype, count },
            // SAFETY: reads the `count` elements the caller lent for the call and writes `block` of them, this
            // rank's block, inside the same buffer.
            |api, comm, stream| unsafe {
                (api.reduce_scatter)(
                    address as *const c_void,
                    recv as *mut c_void,
                    block,
                    dtype.nccl(),
                    op.nccl(),
                    comm,
                    stream,
                )
            },
            "ncclReduceScatter",
        )
    }

    /// `ncclAllGather` in place: this rank's block (at `buf + rank * block`) is the input, the whole buffer the
    /// output.
    fn allgather_blocks(&mut self, buf: DeviceSlice<'_>) -> Result<(), CudaError> {
        let (address, dtype, count) = (buf.address, buf.dtype, buf.count);
        let (send, block) = self.own_block("allgather_blocks", &buf)?;
        self.run(
            Op { name: "allgather_blocks", dtype, count },
            // SAFETY: reads this rank's block and writes the `count` elements around it, all lent for the call.
            |api, comm, stream| unsafe {
                (api.all_gather)(send as *const c_void, address as *mut c_void, block, dtype.nccl(), comm, stream)
            },
            "ncclAllGather",
        )
    }

    fn allgather(&mut self, input: DeviceSlice<'_>, output: DeviceSlice<'_>) -> Result<(), CudaError> {
        let (send, dtype, count) = (input.address, input.dtype, input.count);
        let op = Op { name: "allgather", dtype, count };
        if output.dtype != dtype {
            return Err(CudaError::Shape(format!(
                "NCCL {op}: the output holds {} elements, not {dtype}",
                output.dtype
            )));
        }
        if output.count != count * self.world_size {
            return Err(CudaError::Shape(format!(
                "NCCL {op}: the output holds {} elements, not {} ({count} for each of {} ranks)",
                output.count,
                count * self.world_size,
                self.world_size
            )));
        }
        let recv = output.address;
        self.run(
            op,
            // SAFETY: reads `count` elements and writes `count * world_size`, both lent for the call.
            |api, comm, stream| unsafe {
                (api.all_gather)(send as *const c_void, recv as *mut c_void, count, dtype.nccl(), comm, stream)
            },
            "ncclAllGather",
        )
    }
}

impl NcclCollective {
    /// Where this rank's block of `buf` starts, and its length: NCCL's in-place reduce-scatter and allgather take
    /// the whole buffer on one side and this block of it on the other.
    fn own_block(&self, op: &str, buf: &DeviceSlice<'_>) -> Result<(u64, usize), CudaError> {
        check_blocks(&format!("NCCL {op}"), buf, self.world_size)?;
        let block = buf.count / self.world_size;
        Ok((buf.address + (self.rank * block * buf.dtype.size()) as u64, block))
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        // The stream, its events and the context go after this, when `own` drops.
        if self.comm.is_null() {
            return;
        }
        let _ = self.own.make_current();
        // SAFETY: the communicator was made by this collective and is destroyed once; a null one was never made
        // or was aborted, which frees it.
        unsafe { (self.api.destroy)(self.comm) };
    }
}
