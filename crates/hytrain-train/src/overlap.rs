//! Gradient allreduces overlapped with backward, as PyTorch DDP's reducer does it: libtorch calls a hook (installed
//! by the C++ shim in `csrc/grad_hook.cpp`) as soon as a parameter's gradient is final; once every gradient of a
//! bucket is in, and every earlier bucket has been launched, the bucket goes to a communication thread that packs,
//! allreduces and unpacks it while backward computes the rest.
//!
//! Buckets are launched strictly in bucket order and the communication thread takes them first in, first out, so
//! every rank runs the same allreduces in the same order whatever order its gradients arrive in: the results are
//! bit-identical to [`crate::Ddp::sync_gradients`]. A bucket with a parameter whose hook never fired (a parameter
//! unused in this forward) is launched after backward returns, in its place in the order.
//!
//! On a GPU the buckets go through the device collective (NCCL), and the communication thread queues its work on
//! a [`SideStream`]: before packing a bucket the side stream waits for what backward queued so far on the compute
//! stream (the gradients just accumulated), and after the round the compute stream waits for the side stream, so
//! backward's kernels never queue behind an allreduce and the optimizer reads averaged gradients.

use std::ffi::{c_char, c_int, c_void};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use hytrain_cuda::{CudaError, DeviceCollective, SideStream, StreamHandle};
use tch::Tensor;

use crate::bucket::Bucket;
use crate::shim::{handle, shim_message};
use crate::{Collective, CommError};

type GradReadyFn = extern "C" fn(ctx: *const c_void, index: usize);
type ReleaseFn = extern "C" fn(ctx: *const c_void);

extern "C" {
    fn hyt_set_grad_ready_hook(
        tensor: *mut c_void,
        callback: GradReadyFn,
        ctx: *const c_void,
        index: usize,
        release: ReleaseFn,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn hyt_clear_grad_ready_hook(tensor: *mut c_void) -> c_int;
}

/// What the hooks share with the training thread: which bucket each parameter belongs to, and this step's progress.
struct Readiness {
    /// Bucket of each parameter (by index into the engine's parameter list).
    bucket_of: Vec<usize>,
    /// Number of parameters in each bucket.
    members: Vec<usize>,
    /// At most this many launched buckets may still be unreduced when a hook returns: the hook that launched
    /// one waits for the communication thread (see [`Overlap::new`]). `None`: no bound.
    in_flight: Option<usize>,
    round: Mutex<Round>,
    /// Signalled each time the communication thread finishes a bucket.
    progress: Condvar,
}

/// One synchronising backward pass. Only an armed round reacts to hooks, so backward passes of non-final
/// micro-batches, evaluation, or a caller's own `backward` launch nothing.
struct Round {
    armed: Option<Sender<usize>>,
    seen: Vec<bool>,
    pending: Vec<usize>,
    /// The next bucket to launch; all before it are queued.
    next: usize,
    /// How many of the queued buckets the communication thread has finished (reduced, or skipped after a failure).
    finished: usize,
    /// The communication thread has ended (a panic included): nothing more will finish.
    closed: bool,
}

impl Readiness {
    fn lock(&self) -> MutexGuard<'_, Round> {
        // The critical sections cannot panic halfway through an update, so a poisoned lock holds consistent state.
        self.round.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn grad_ready(&self, index: usize) {
        let mut round = self.lock();
        let Some(tx) = round.armed.clone() else { return };
        if index >= self.bucket_of.len() || std::mem::replace(&mut round.seen[index], true) {
            return;
        }
        round.pending[self.bucket_of[index]] -= 1;
        while round.next < self.members.len() && round.pending[round.next] == 0 {
            // The receiver lives until the round is finished, which disarms first; a send cannot fail before.
            let _ = tx.send(round.next);
            round.next += 1;
        }
        if let Some(limit) = self.in_flight {
            // Backward waits here, so no further gradient is computed while more buckets than the bound are being
            // reduced. The communication thread counts every bucket it is sent, even after a failure, and says when
            // it ends, so this ends.
            let _round = self
                .progress
                .wait_while(round, |r| !r.closed && r.next > r.finished + limit)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The communication thread finished one more bucket.
    fn finished_one(&self) {
        self.lock().finished += 1;
        self.progress.notify_all();
    }
}

/// Held by the communication thread: when it ends, normally or by a panic, hooks stop waiting for it.
struct Closes<'a>(&'a Readiness);

impl Drop for Closes<'_> {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.progress.notify_all();
    }
}

extern "C" fn grad_ready(ctx: *const c_void, index: usize) {
    // SAFETY: `ctx` is an `Arc<Readiness>` pointer of which the calling hook holds one strong count (given in
    // `Overlap::new`, released in `release`), so it is alive.
    let readiness = unsafe { &*ctx.cast::<Readiness>() };
    // A panic must not unwind into libtorch's C++ frames.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| readiness.grad_ready(index)));
}

extern "C" fn release(ctx: *const c_void) {
    // SAFETY: each hook owns exactly one strong count of the Arc, given by `Arc::into_raw` in `Overlap::new`, and
    // libtorch drops each hook once.
    drop(unsafe { Arc::from_raw(ctx.cast::<Readiness>()) });
}

/// Hooks on every parameter and the bookkeeping that turns them into bucket launches.
pub(crate) struct Overlap {
    readiness: Arc<Readiness>,
    /// Shallow copies of the hooked parameters, to remove the hooks again.
    hooked: Vec<Tensor>,
    /// Where the communication thread queues GPU work; `None` for a model on the CPU.
    side: Option<SideStream>,
}

/// Where a round's buckets are averaged.
pub(crate) enum Reducer<'a> {
    /// In host memory, through hytrain-comm.
    Host(&'a mut dyn Collective),
    /// In GPU memory, through NCCL, on the overlap's side stream.
    Device(&'a mut dyn DeviceCollective),
}

impl std::fmt::Debug for Overlap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlap").field("buckets", &self.readiness.members.len()).finish_non_exhaustive()
    }
}

/// What the communication thread did in one round.
#[derive(Debug, Default)]
pub(crate) struct Reduced {
    /// Bytes allreduced.
    pub bytes: u64,
    /// Seconds spent packing, allreducing and unpacking.
    pub busy_secs: f64,
    /// Buckets launched by hooks before backward returned.
    pub launched_in_backward: u64,
}

/// Why a round failed.
#[derive(Debug)]
pub(crate) enum RoundError {
    /// A parameter of this bucket had no gradient after backward.
    MissingGradient(String),
    /// libtorch failed packing or unpacking this bucket.
    Torch(usize, tch::TchError),
    /// The allreduce of this bucket failed.
    Comm(usize, CommError),
    /// The device allreduce of this bucket failed.
    Device(usize, CudaError),
    /// Ordering the side stream against the compute stream failed (what was being done, why).
    Stream(&'static str, CudaError),
}

impl Overlap {
    /// Installs a grad-ready hook on every parameter that requires a gradient. `buckets` lists parameter indices
    /// per bucket in launch order. Parameters that require no gradient are left unhooked: their buckets are
    /// launched after backward. A model on a GPU comes with the side stream its buckets are reduced on.
    ///
    /// With `in_flight`, a hook that launches a bucket returns only once at most that many launched buckets are
    /// still being reduced, so backward does not run ahead of the communication thread: at `Some(0)` each
    /// bucket's gradients are reduced (and, under ZeRO-2, released) before backward computes the next bucket's,
    /// which bounds the gradient memory alive at once to about one bucket, at the cost of computing and
    /// communicating in turn. `None` lets backward run ahead (PyTorch DDP's reducer does the same).
    pub(crate) fn new(
        params: &[(String, Tensor)],
        buckets: &[Bucket],
        side: Option<SideStream>,
        in_flight: Option<usize>,
    ) -> Result<Self, String> {
        let mut bucket_of = vec![usize::MAX; params.len()];
        for (b, bucket) in buckets.iter().enumerate() {
            for &m in bucket.members() {
                bucket_of[m] = b;
            }
        }
        let readiness = Arc::new(Readiness {
            bucket_of,
            members: buckets.iter().map(|b| b.members().len()).collect(),
            in_flight,
            round: Mutex::new(Round {
                armed: None,
                seen: vec![false; params.len()],
                pending: Vec::new(),
                next: 0,
                finished: 0,
                closed: false,
            }),
            progress: Condvar::new(),
        });
        let mut overlap = Overlap { readiness, hooked: Vec::new(), side };
        for (index, (name, p)) in params.iter().enumerate() {
            if !p.requires_grad() {
                continue;
            }
            let ctx = Arc::into_raw(Arc::clone(&overlap.readiness)).cast::<c_void>();
            // SAFETY: `p` is a live tensor borrowed for the call, which does not keep it; `ctx` carries one strong
            // count that the shim hands to the hook (or releases on failure).
            shim_message(|err, err_len| unsafe {
                hyt_set_grad_ready_hook(handle(p), grad_ready, ctx, index, release, err, err_len)
            })
            .map_err(|why| format!("installing the gradient hook of parameter {name}: {why}"))?;
            overlap.hooked.push(p.shallow_clone());
        }
        Ok(overlap)
    }

    /// Runs `backward` with the hooks armed and a communication thread reducing buckets as they complete; after
    /// backward, launches the buckets still waiting (in order) and waits for all. `reducer`, `buckets` and `params`
    /// belong to the communication thread meanwhile. Returns backward's own error, if any, after the launched
    /// buckets finished, so the collective is never left mid-operation. A [`Reducer::Device`] needs the side
    /// stream given to [`Overlap::new`].
    pub(crate) fn run<E>(
        &self,
        reducer: Reducer<'_>,
        buckets: &mut [Bucket],
        params: &mut [(String, Tensor)],
        backward: impl FnOnce() -> Result<(), E>,
    ) -> Result<Result<Reduced, RoundError>, E> {
        let on_device = match (&reducer, &self.side) {
            (Reducer::Host(_), _) => None,
            (Reducer::Device(_), Some(side)) => match side.current_stream() {
                // The training thread's current stream, which backward computes on.
                Ok(compute) => Some((side, compute)),
                Err(e) => return Ok(Err(RoundError::Stream("reading libtorch's current stream", e))),
            },
            (Reducer::Device(_), None) => unreachable!("a device overlap is made with its side stream"),
        };
        let (tx, rx) = std::sync::mpsc::channel::<usize>();
        {
            let mut round = self.readiness.lock();
            round.seen.iter_mut().for_each(|s| *s = false);
            round.pending = self.readiness.members.clone();
            round.next = 0;
            round.finished = 0;
            round.closed = false;
            round.armed = Some(tx);
        }
        let mut launched_in_backward = 0;
        let readiness = &*self.readiness;
        std::thread::scope(|scope| {
            let worker = scope.spawn(move || communicate(reducer, on_device, buckets, params, rx, readiness));
            let backward_result = backward();
            let tx = {
                let mut round = self.readiness.lock();
                let tx = round.armed.take().expect("armed above");
                launched_in_backward = round.next as u64;
                if backward_result.is_ok() {
                    for b in round.next..self.readiness.members.len() {
                        let _ = tx.send(b);
                    }
                    round.next = self.readiness.members.len();
                }
                tx
            };
            // Closing the channel lets the thread finish once the queue is empty.
            drop(tx);
            let mut reduced = worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            if let Some((side, compute)) = on_device {
                // Even after a failure: what the side stream wrote to the gradients lands before later kernels.
                let joined = side.join_into(compute).map_err(|e| RoundError::Stream("joining the compute stream", e));
                reduced = reduced.and_then(|r| joined.map(|()| r));
            }
            backward_result.map(|()| reduced.map(|r| Reduced { launched_in_backward, ..r }))
        })
    }
}

/// The communication thread: each bucket index received is packed, allreduced and unpacked, in arrival order; on
/// a GPU (`on_device`: the side stream and the compute stream) on the side stream, after the compute stream's work
/// so far. After the first failure the rest are skipped (the step fails anyway).
fn communicate(
    mut reducer: Reducer<'_>,
    on_device: Option<(&SideStream, StreamHandle)>,
    buckets: &mut [Bucket],
    params: &mut [(String, Tensor)],
    rx: Receiver<usize>,
    readiness: &Readiness,
) -> Result<Reduced, RoundError> {
    let _closes = Closes(readiness);
    let mut reduced = Reduced::default();
    let mut failed = None;
    let _entered = match on_device.map(|(side, _)| side.enter()).transpose() {
        Ok(entered) => entered,
        Err(e) => {
            // Nothing is reduced; the receiver stays until the round ends, as the hooks expect.
            rx.iter().for_each(|_| readiness.finished_one());
            return Err(RoundError::Stream("making the side stream current", e));
        }
    };
    for b in rx {
        if failed.is_none() {
            let started = Instant::now();
            let bucket = &mut buckets[b];
            let result = reduce(&mut reducer, on_device, bucket, b, params);
            reduced.busy_secs += started.elapsed().as_secs_f64();
            match result {
                Ok(()) => reduced.bytes += bucket.bytes() as u64,
                Err(e) => failed = Some(e),
            }
        }
        readiness.finished_one();
    }
    failed.map_or(Ok(reduced), Err)
}

/// Packs bucket `b`, averages it over all ranks (reduce-scatters it when sharded) and unpacks it into the
/// gradients (keeps this rank's block when sharded).
fn reduce(
    reducer: &mut Reducer<'_>,
    on_device: Option<(&SideStream, StreamHandle)>,
    bucket: &mut Bucket,
    b: usize,
    params: &mut [(String, Tensor)],
) -> Result<(), RoundError> {
    if let Some((side, compute)) = on_device {
        side.wait_for(compute).map_err(|e| RoundError::Stream("waiting for the compute stream", e))?;
    }
    match bucket.pack(params) {
        Err(e) => return Err(RoundError::Torch(b, e)),
        Ok(Err(name)) => return Err(RoundError::MissingGradient(name)),
        Ok(Ok(())) => {}
    }
    match reducer {
        Reducer::Host(comm) => bucket.reduce(*comm).map_err(|e| RoundError::Comm(b, e))?,
        Reducer::Device(comm) => bucket.reduce_on_device(*comm).map_err(|e| RoundError::Device(b, e))?,
    }
    bucket.finish(params).map_err(|e| RoundError::Torch(b, e))
}

impl Drop for Overlap {
    fn drop(&mut self) {
        // The model may outlive the engine (`Ddp::into_parts`): take the hooks off so its later backward passes
        // call nothing. Each hook's release drops its count of `readiness`.
        for p in &self.hooked {
            // SAFETY: `p` is a live tensor handle owned here.
            unsafe { hyt_clear_grad_ready_hook(handle(p)) };
        }
    }
}
