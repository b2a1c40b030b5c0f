//! A CUDA stream of hytrain's own beside libtorch's compute stream, for GPU work that a second host thread queues
//! while the training thread keeps queuing backward on the compute stream: gradient buckets packed, allreduced
//! and unpacked during backward, as PyTorch DDP's reducer does on its own stream.
//!
//! The side stream is non-blocking, so it never waits for the legacy default stream behind the scenes (nor that
//! stream for it, which would stall backward behind every allreduce). The two are ordered with events only:
//! before a bucket is packed, the side stream waits for everything queued on the compute stream so far (the
//! gradients just accumulated); after the last bucket, the compute stream waits for everything queued on the side
//! stream (the averaged gradients), before the optimizer reads them. While a thread has [`SideStream::enter`]ed,
//! libtorch queues that thread's tensor operations on the side stream, and the NCCL backend (which follows
//! libtorch's current stream) orders its collectives after them.
//!
//! Also what [`crate::NcclCollective`] shares: the driver's stream and event functions, and a stream of one's own
//! with its context and events ([`OwnedStream`]).

use std::ffi::{c_int, c_uint, c_void};
use std::fmt;
use std::sync::Mutex;

use crate::driver::CudaDriver;
use crate::stream::TorchStreams;
use crate::CudaError;

type Context = *mut c_void;
pub(crate) type Stream = *mut c_void;
type Event = *mut c_void;

type PrimaryCtxRetain = unsafe extern "C" fn(*mut Context, c_int) -> c_int;
type PrimaryCtxRelease = unsafe extern "C" fn(c_int) -> c_int;
type CtxSetCurrent = unsafe extern "C" fn(Context) -> c_int;
type StreamCreate = unsafe extern "C" fn(*mut Stream, c_uint) -> c_int;
type StreamDestroy = unsafe extern "C" fn(Stream) -> c_int;
type StreamWaitEvent = unsafe extern "C" fn(Stream, Event, c_uint) -> c_int;
type EventCreate = unsafe extern "C" fn(*mut Event, c_uint) -> c_int;
type EventDestroy = unsafe extern "C" fn(Event) -> c_int;
type EventRecord = unsafe extern "C" fn(Event, Stream) -> c_int;
type EventQuery = unsafe extern "C" fn(Event) -> c_int;

const DRIVER_NEED: &str = "the NVIDIA driver is too old; install a driver for CUDA 13 (580 or newer)";
/// `CU_STREAM_NON_BLOCKING`: the stream does not synchronise implicitly with stream 0.
const STREAM_NON_BLOCKING: c_uint = 1;
/// `CU_EVENT_DISABLE_TIMING`: the cheapest event, all ordering needs.
const EVENT_DISABLE_TIMING: c_uint = 2;

/// The driver API's primary context, stream and event functions (cuda.h; the _v2 names are what its macros call).
pub(crate) struct StreamApi {
    pub retain: PrimaryCtxRetain,
    pub release: PrimaryCtxRelease,
    pub set_current: CtxSetCurrent,
    pub stream_create: StreamCreate,
    pub stream_destroy: StreamDestroy,
    pub stream_wait: StreamWaitEvent,
    pub event_create: EventCreate,
    pub event_destroy: EventDestroy,
    pub event_record: EventRecord,
    pub event_query: EventQuery,
}

impl StreamApi {
    pub(crate) fn load(driver: &CudaDriver) -> Result<StreamApi, CudaError> {
        let d = driver.loaded();
        // SAFETY: the signatures are the driver API's, as declared above.
        unsafe {
            Ok(StreamApi {
                retain: d.function("cuDevicePrimaryCtxRetain", DRIVER_NEED)?,
                release: d.function("cuDevicePrimaryCtxRelease_v2", DRIVER_NEED)?,
                set_current: d.function("cuCtxSetCurrent", DRIVER_NEED)?,
                stream_create: d.function("cuStreamCreate", DRIVER_NEED)?,
                stream_destroy: d.function("cuStreamDestroy_v2", DRIVER_NEED)?,
                stream_wait: d.function("cuStreamWaitEvent", DRIVER_NEED)?,
                event_create: d.function("cuEventCreate", DRIVER_NEED)?,
                event_destroy: d.function("cuEventDestroy_v2", DRIVER_NEED)?,
                event_record: d.function("cuEventRecord", DRIVER_NEED)?,
                event_query: d.function("cuEventQuery", DRIVER_NEED)?,
            })
        }
    }
}

/// One GPU's primary context, retained, with a non-blocking stream and two events of its own, all released on drop:
/// what the NCCL backend and [`SideStream`] each keep.
pub(crate) struct OwnedStream {
    pub driver: CudaDriver,
    pub api: StreamApi,
    device: c_int,
    context: Context,
    pub stream: Stream,
    pub events: [Event; 2],
}

impl OwnedStream {
    /// Retains GPU `gpu`'s primary context (its index after CUDA_VISIBLE_DEVICES, as in `cuda:N`) and makes the
    /// stream and events in it.
    pub(crate) fn new(driver: CudaDriver, gpu: u32) -> Result<OwnedStream, CudaError> {
        let api = StreamApi::load(&driver)?;
        let device = driver.device_handle(gpu)?;
        let mut context: Context = std::ptr::null_mut();
        // SAFETY: writes one context handle.
        driver.check("cuDevicePrimaryCtxRetain", unsafe { (api.retain)(&mut context, device) })?;
        // From here on Drop releases what was made, so an error below leaks nothing.
        let mut this = OwnedStream {
            driver,
            api,
            device,
            context,
            stream: std::ptr::null_mut(),
            events: [std::ptr::null_mut(); 2],
        };
        this.make_current()?;
        let (api, driver) = (&this.api, &this.driver);
        // SAFETY: each call writes one handle.
        unsafe {
            driver.check("cuStreamCreate", (api.stream_create)(&mut this.stream, STREAM_NON_BLOCKING))?;
            for event in &mut this.events {
                driver.check("cuEventCreate", (api.event_create)(event, EVENT_DISABLE_TIMING))?;
            }
        }
        Ok(this)
    }

    /// Makes the context current on the calling thread, as every driver call on these handles needs.
    pub(crate) fn make_current(&self) -> Result<(), CudaError> {
        // SAFETY: the context is retained while `self` lives.
        self.driver.check("cuCtxSetCurrent", unsafe { (self.api.set_current)(self.context) })
    }
}

impl Drop for OwnedStream {
    fn drop(&mut self) {
        let _ = self.make_current();
        // SAFETY: each handle was created here and is released once; a null one was never made.
        unsafe {
            for event in self.events {
                if !event.is_null() {
                    (self.api.event_destroy)(event);
                }
            }
            if !self.stream.is_null() {
                (self.api.stream_destroy)(self.stream);
            }
            (self.api.release)(self.device);
        }
    }
}

/// A CUDA stream as libtorch's current stream was on some thread, to hand to another thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHandle(usize);

impl StreamHandle {
    fn raw(self) -> Stream {
        self.0 as Stream
    }
}

/// A non-blocking stream on one GPU, ordered against libtorch's compute stream with events (see the module docs).
pub struct SideStream {
    /// The stream; its first event is recorded on the compute stream for the side stream to wait on, its second
    /// on the side stream for the compute stream to wait on.
    own: OwnedStream,
    streams: TorchStreams,
    /// The GPU's index as libtorch numbers it (`cuda:N`).
    gpu: u32,
    /// Held while an event is recorded and waited on, so another thread never records it in between.
    ordering: Mutex<()>,
}

// SAFETY: the handles are CUDA's, usable from any thread once the context is made current, which every method does
// first; the events are used under `ordering`, so a record and the wait on it are never split by another thread.
unsafe impl Send for SideStream {}
// SAFETY: as above.
unsafe impl Sync for SideStream {}

impl fmt::Debug for SideStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SideStream").field("gpu", &self.gpu).field("stream", &self.own.stream).finish_non_exhaustive()
    }
}

impl SideStream {
    /// Creates the stream on GPU `gpu` (its index after CUDA_VISIBLE_DEVICES, as in `cuda:N`). `streams` reads and
    /// sets libtorch's current stream, so libtorch's CUDA backend must be loaded.
    pub fn new(driver: CudaDriver, gpu: u32, streams: TorchStreams) -> Result<SideStream, CudaError> {
        Ok(SideStream { own: OwnedStream::new(driver, gpu)?, streams, gpu, ordering: Mutex::new(()) })
    }

    /// libtorch's current stream of this GPU on the calling thread: the compute stream to order against.
    pub fn current_stream(&self) -> Result<StreamHandle, CudaError> {
        Ok(StreamHandle(self.streams.current(self.gpu as usize)? as usize))
    }

    /// Makes the side stream wait for all work queued on `compute` so far, from any thread.
    pub fn wait_for(&self, compute: StreamHandle) -> Result<(), CudaError> {
        self.order(self.own.events[0], compute.raw(), self.own.stream)
    }

    /// Makes `compute` wait for all work queued on the side stream so far.
    pub fn join_into(&self, compute: StreamHandle) -> Result<(), CudaError> {
        self.order(self.own.events[1], self.own.stream, compute.raw())
    }

    /// Makes the side stream libtorch's current stream of this GPU on the calling thread until the guard drops
    /// and restores the stream that was current before.
    pub fn enter(&self) -> Result<Entered<'_>, CudaError> {
        let before = self.current_stream()?;
        // SAFETY: the stream lives as long as `self`, which the guard borrows.
        unsafe { self.streams.set_current(self.gpu as usize, self.own.stream)? };
        Ok(Entered { side: self, before })
    }

    /// Records `event` on `first` and makes `then` wait for it.
    fn order(&self, event: Event, first: Stream, then: Stream) -> Result<(), CudaError> {
        let _held = self.ordering.lock().unwrap_or_else(|p| p.into_inner());
        let (driver, api) = (&self.own.driver, &self.own.api);
        self.own.make_current()?;
        // SAFETY: the event and side stream are this stream's own; the other stream is libtorch's, live on the
        // thread it was read on for as long as libtorch keeps its streams (the process).
        unsafe {
            driver.check("cuEventRecord", (api.event_record)(event, first))?;
            driver.check("cuStreamWaitEvent", (api.stream_wait)(then, event, 0))
        }
    }
}

/// While alive, libtorch queues the calling thread's work for the GPU on the side stream.
#[derive(Debug)]
pub struct Entered<'a> {
    side: &'a SideStream,
    before: StreamHandle,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        // SAFETY: the stream was current before, so it is libtorch's and live.
        let restored = unsafe { self.side.streams.set_current(self.side.gpu as usize, self.before.raw()) };
        if let Err(e) = restored {
            tracing::warn!(gpu = self.side.gpu, "the side stream stays current on this thread: {e}");
        }
    }
}
