//! Checkpoints written in the background: at the step boundary the state is copied to host memory and training
//! goes on while a thread encodes, checksums and writes (or uploads) the copy.
//!
//! One thread, started with the checkpointer, writes every checkpoint of the run. The copy is the only cost to the
//! step loop: host tensors are copied in memory, into the buffers of the previous checkpoint once it is written
//! (so after the first checkpoint a copy allocates nothing and takes no page faults; the price is one copy of the
//! state kept in host memory between checkpoints, as PyTorch's asynchronous checkpointing keeps its staging
//! buffers); device tensors are copied into pinned host memory (libtorch's pinned allocator keeps its blocks for
//! reuse) without blocking, with one synchronisation per device after all copies are queued. At most
//! one write is in flight: a checkpoint due while the previous is still being written waits for it, and says how
//! long. A write's error comes back at the next checkpoint or at [`AsyncCheckpointer::finish`], and ends the job as
//! a synchronous write's would; the previous checkpoint stays the one a restart resumes from.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tch::{Device, Tensor};

use super::{encode, Checkpoint, CheckpointStore};
use crate::{Result, TrainError};

/// Writes checkpoints of one store in the background, one at a time.
#[derive(Debug)]
pub struct AsyncCheckpointer {
    store: Arc<CheckpointStore>,
    /// Checkpoints to write, to the writer thread; `None` once it is told to end.
    jobs: Option<Sender<Checkpoint>>,
    /// What the writer thread made of each checkpoint, in order, and the host copy it wrote, for reuse.
    done: Receiver<(Result<PathBuf>, Checkpoint)>,
    /// The host copy of the last checkpoint written, whose buffers the next copy fills.
    spare: Option<Checkpoint>,
    writer: Option<JoinHandle<()>>,
    in_flight: Option<InFlight>,
    last: Option<PathBuf>,
    held_secs: f64,
}

#[derive(Debug)]
struct InFlight {
    step: u64,
    started: Instant,
}

/// Host copies of `tensors`, taken now: into `spare`'s buffers where it holds a host tensor of the same name, shape
/// and dtype for a host tensor, else fresh. Device tensors are copied asynchronously into pinned memory and waited
/// for once per device, not once per tensor.
pub(super) fn snapshot(tensors: &[(String, Tensor)], spare: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
    let reusable = spare.len() == tensors.len()
        && spare.iter().zip(tensors).all(|((n1, a), (n2, b))| {
            n1 == n2 && a.size() == b.size() && a.kind() == b.kind() && b.device() == Device::Cpu
        });
    if reusable {
        let mut host = spare;
        for ((name, dst), (_, src)) in host.iter_mut().zip(tensors) {
            dst.f_copy_(&src.detach()).map_err(|e| TrainError::torch(format!("copying {name} to host memory"), e))?;
        }
        return Ok(host);
    }
    let copy = |t: &Tensor| -> std::result::Result<Tensor, tch::TchError> {
        let on_device = t.device() != Device::Cpu;
        // copy=true: a host tensor is copied too, since training changes it in place from the next step.
        t.f_detach()?.f_to_device_(Device::Cpu, t.kind(), on_device, true)
    };
    let mut devices = Vec::new();
    let mut host = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        if let Device::Cuda(index) = t.device() {
            if !devices.contains(&index) {
                devices.push(index);
            }
        }
        host.push((name.clone(), copy(t).map_err(|e| TrainError::torch(format!("copying {name} to host memory"), e))?));
    }
    for index in devices {
        tch::Cuda::synchronize(index as i64);
    }
    Ok(host)
}

impl AsyncCheckpointer {
    /// Writes into `store` from a thread of its own.
    pub fn new(store: CheckpointStore) -> Self {
        let store = Arc::new(store);
        let (jobs, todo) = mpsc::channel::<Checkpoint>();
        let (report, done) = mpsc::channel();
        let writing = store.clone();
        let writer = std::thread::Builder::new()
            .name("hytrain-checkpoint".into())
            .spawn(move || {
                for copy in todo {
                    let written = encode(&copy).and_then(|encoded| writing.write(encoded));
                    if report.send((written, copy)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| tracing::error!("cannot start the checkpoint writer thread: {e}"))
            .ok();
        AsyncCheckpointer {
            store,
            jobs: Some(jobs),
            done,
            spare: None,
            writer,
            in_flight: None,
            last: None,
            held_secs: 0.0,
        }
    }

    /// The store written to.
    pub fn store(&self) -> &CheckpointStore {
        &self.store
    }

    /// Where checkpoints go (a folder or an `s3://` URL).
    pub fn location(&self) -> &Path {
        self.store.dir()
    }

    /// The result of the write in flight, waiting for it when `block`; `None` when it is still running. Its host
    /// copy becomes the spare.
    fn collect(&mut self, in_flight: &InFlight, block: bool) -> Option<Result<PathBuf>> {
        let answer = if block {
            self.done.recv().ok()
        } else {
            match self.done.try_recv() {
                Ok(answer) => Some(answer),
                Err(mpsc::TryRecvError::Empty) => return None,
                Err(mpsc::TryRecvError::Disconnected) => None,
            }
        };
        Some(match answer {
            Some((written, copy)) => {
                self.spare = Some(copy);
                written
            }
            None => Err(TrainError::Checkpoint {
                path: self.store.dir().to_path_buf(),
                detail: format!(
                    "the checkpoint writer thread ended while writing step {}; this is a bug in hytrain",
                    in_flight.step
                ),
            }),
        })
    }

    /// The result of the write in flight, waiting for it.
    fn wait(&mut self, in_flight: &InFlight) -> Result<PathBuf> {
        self.collect(in_flight, true).expect("a blocking wait has an answer")
    }

    /// Copies `ckpt` to host memory now and writes it in the background. Waits first for the previous write, if
    /// still running (at most one in flight), and returns its error if it failed.
    pub fn save(&mut self, ckpt: &Checkpoint) -> Result<()> {
        let held = Instant::now();
        if let Some(previous) = self.in_flight.take() {
            let result = match self.collect(&previous, false) {
                Some(result) => result,
                None => {
                    let result = self.wait(&previous);
                    tracing::warn!(
                        previous = previous.step,
                        step = ckpt.meta.step,
                        waited_secs = format!("{:.2}", held.elapsed().as_secs_f64()),
                        write_secs = format!("{:.2}", previous.started.elapsed().as_secs_f64()),
                        "the previous checkpoint was still being written, so training waited for it; checkpoints \
                         come faster than they are written: raise --checkpoint-every"
                    );
                    result
                }
            };
            self.last = Some(result?);
        }
        let (model, optimizer) = match self.spare.take() {
            Some(spare) => (spare.model, spare.optimizer),
            None => (Vec::new(), Vec::new()),
        };
        let copy = Checkpoint {
            model: snapshot(&ckpt.model, model)?,
            optimizer: snapshot(&ckpt.optimizer, optimizer)?,
            meta: ckpt.meta.clone(),
        };
        let step = ckpt.meta.step;
        let handed_over = self.jobs.as_ref().is_some_and(|jobs| jobs.send(copy).is_ok());
        if !handed_over {
            return Err(TrainError::Checkpoint {
                path: self.store.dir().to_path_buf(),
                detail: format!("the checkpoint writer thread is not running, so step {step} cannot be written"),
            });
        }
        self.in_flight = Some(InFlight { step, started: Instant::now() });
        self.held_secs += held.elapsed().as_secs_f64();
        Ok(())
    }

    /// Waits for the write in flight, if any; returns the newest checkpoint this checkpointer wrote.
    pub fn finish(&mut self) -> Result<Option<PathBuf>> {
        if let Some(in_flight) = self.in_flight.take() {
            let held = Instant::now();
            self.last = Some(self.wait(&in_flight)?);
            self.held_secs += held.elapsed().as_secs_f64();
        }
        Ok(self.last.clone())
    }

    /// Whether a write is in flight.
    pub fn writing(&self) -> Option<u64> {
        self.in_flight.as_ref().map(|w| w.step)
    }

    /// Seconds the caller was held by [`AsyncCheckpointer::save`] and [`AsyncCheckpointer::finish`]: host copies
    /// and waits for writes.
    pub fn held_secs(&self) -> f64 {
        self.held_secs
    }
}

impl Drop for AsyncCheckpointer {
    /// A write in flight when the run fails is finished, not cut off: it may be the checkpoint a restart needs.
    fn drop(&mut self) {
        if let Some(in_flight) = self.in_flight.take() {
            let step = in_flight.step;
            tracing::info!(step, "waiting for the checkpoint being written before exiting");
            match self.wait(&in_flight) {
                Ok(path) => tracing::info!(step, path = %path.display(), "checkpoint written"),
                Err(e) => tracing::error!(step, error = %e, "the checkpoint being written failed"),
            }
        }
        // Closing the queue ends the writer thread.
        self.jobs = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}
