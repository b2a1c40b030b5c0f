//! The training loop: resume, epochs or max steps, metrics lines, evaluation reduced over ranks, checkpoints,
//! graceful stop, export. It pulls batches from a [`BatchSource`] and knows nothing of files or S3.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tch::{Kind, Reduction, Tensor};

use crate::batches::{Batch, BatchError, BatchSource};
use crate::checkpoint::{AsyncCheckpointer, Checkpoint, CheckpointMeta, CheckpointStore, RngState, ShardedWriter};
use crate::config::TrainConfig;
use crate::model;
use crate::optim::Optimizer;
use crate::position::{self, Shape};
use crate::precision::GradScaler;
use crate::schedule::Schedule;
use crate::{Ddp, ReduceOp, Result, ShardMode, TrainError};

/// Where a run reads and writes.
#[derive(Debug, Clone, Default)]
pub struct RunPaths {
    /// Checkpoints go here and a run resumes from here: a folder or an `s3://bucket/prefix` URL (`None`: no
    /// checkpoints).
    pub checkpoint_dir: Option<PathBuf>,
    /// The trained model is exported here by rank 0 (`None`: no export). For an `s3://` URL the model is exported
    /// into a local folder, reported as [`Summary::exported_to`], for the caller to upload
    /// ([`crate::export::upload`]) once it has added what it records there.
    pub model_dir: Option<PathBuf>,
    /// `metrics.jsonl` goes here (`None`: no metrics file).
    pub output_dir: Option<PathBuf>,
    /// How `s3://` checkpoint and model locations are reached (endpoint, region, credentials).
    pub s3: hytrain_data::source::S3Options,
}

/// What a run did. Every rank gets the same numbers except the time split, which is this rank's.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Optimizer steps completed, counting those before a resume.
    pub steps: u64,
    /// Optimizer steps taken by this run.
    pub steps_run: u64,
    /// Epochs completed, counting those before a resume.
    pub epochs: u64,
    /// Training samples processed by this run over all ranks.
    pub samples: u64,
    /// `samples` over the run's wall time.
    pub samples_per_sec: f64,
    /// Wall time of the run in seconds.
    pub elapsed_secs: f64,
    /// Seconds this rank waited for batches.
    pub data_wait_secs: f64,
    /// Seconds this rank spent in forward, backward and update, allreduce excluded.
    pub compute_secs: f64,
    /// Seconds this rank spent in gradient allreduces.
    pub allreduce_secs: f64,
    /// Mean training loss over all ranks of the last logging window.
    pub train_loss: Option<f64>,
    /// Mean validation cross-entropy of the last evaluation.
    pub val_loss: Option<f64>,
    /// Validation accuracy of the last evaluation, as a fraction.
    pub val_accuracy: Option<f64>,
    /// Validation samples counted in the last evaluation, over all ranks.
    pub val_samples: u64,
    /// The run stopped early on request (SIGTERM) after writing a checkpoint.
    pub stopped: bool,
    /// The checkpoint the run resumed from.
    pub resumed_from: Option<PathBuf>,
    /// The last checkpoint this run wrote (rank 0 only).
    pub last_checkpoint: Option<PathBuf>,
    /// Seconds the step loop was held by checkpoints: host copies of the state, and waits for a previous
    /// background write still running (rank 0 only; the other ranks never wait for a checkpoint). With `--shard`,
    /// the whole synchronous sharded write, which every rank waits for.
    pub checkpoint_secs: f64,
    /// Where the model was exported (rank 0 only): the model folder, or for an `s3://` one the local folder to
    /// upload from.
    pub exported_to: Option<PathBuf>,
    /// Optimizer steps of this run skipped because the fp16 gradients overflowed.
    pub skipped_steps: u64,
    /// Each rank's peak resident host memory in bytes over its whole process so far (the kernel's high-water mark,
    /// `ru_maxrss`), in rank order; empty where the kernel does not report it.
    pub peak_host_bytes: Vec<u64>,
    /// The fp16 loss scale at the end (`None` for fp32 and bf16).
    pub loss_scale: Option<f64>,
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = |s: f64| if self.elapsed_secs > 0.0 { 100.0 * s / self.elapsed_secs } else { 0.0 };
        writeln!(f, "steps            {} ({} this run), epochs {}", self.steps, self.steps_run, self.epochs)?;
        if let Some(scale) = self.loss_scale {
            writeln!(
                f,
                "fp16 loss scale  {} at the end, {} steps skipped on inf/NaN gradients",
                Value::Lr(scale).text(),
                self.skipped_steps
            )?;
        }
        writeln!(
            f,
            "samples          {} at {:.1}/s over {:.1} s",
            self.samples, self.samples_per_sec, self.elapsed_secs
        )?;
        writeln!(f, "data wait        {:>9.2} s  {:5.1}%", self.data_wait_secs, pct(self.data_wait_secs))?;
        writeln!(f, "compute          {:>9.2} s  {:5.1}%", self.compute_secs, pct(self.compute_secs))?;
        writeln!(f, "allreduce        {:>9.2} s  {:5.1}%", self.allreduce_secs, pct(self.allreduce_secs))?;
        if let Some((rank, peak)) = self.peak_host_bytes.iter().enumerate().max_by_key(|(_, b)| **b) {
            let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
            let all: Vec<String> = self.peak_host_bytes.iter().map(|b| format!("{:.0}", mib(*b))).collect();
            writeln!(f, "peak host memory {:>9.1} MiB on rank {rank} (MiB by rank: {})", mib(*peak), all.join(" "))?;
        }
        if let Some(path) = &self.last_checkpoint {
            writeln!(
                f,
                "checkpoints      {:>9.2} s  {:5.1}%  (training held for host copies and waits; last {})",
                self.checkpoint_secs,
                pct(self.checkpoint_secs),
                path.display()
            )?;
        }
        writeln!(
            f,
            "validation       loss {} accuracy {} on {} samples{}",
            opt(self.val_loss, 4),
            opt(self.val_accuracy, 4),
            self.val_samples,
            if self.stopped { " (stopped early)" } else { "" }
        )?;
        write!(
            f,
            "steps={} train_loss={} val_loss={} val_accuracy={} samples_per_sec={:.1}",
            self.steps,
            opt(self.train_loss, 4),
            opt(self.val_loss, 4),
            opt(self.val_accuracy, 4),
            self.samples_per_sec
        )
    }
}

/// A metric value as written in a line and in JSON.
enum Value {
    Int(u64),
    Float(f64, usize),
    Lr(f64),
}

impl Value {
    fn text(&self) -> String {
        match *self {
            Value::Int(n) => n.to_string(),
            Value::Float(x, d) => format!("{x:.d$}"),
            // Shortest form that still shows small rates: 0.01, not 0.010000; 1e-5 as 0.00001.
            Value::Lr(x) => {
                let s = format!("{x:.8}");
                let s = s.trim_end_matches('0').trim_end_matches('.');
                if s.is_empty() {
                    "0".into()
                } else {
                    s.to_string()
                }
            }
        }
    }

    fn json(&self) -> serde_json::Value {
        match *self {
            Value::Int(n) => n.into(),
            Value::Float(x, _) | Value::Lr(x) => x.into(),
        }
    }
}

/// Runs the training loop; see [`Trainer::run`].
pub struct Trainer {
    out: Box<dyn Write + Send>,
    progress: bool,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer").field("progress", &self.progress).finish_non_exhaustive()
    }
}

impl Default for Trainer {
    fn default() -> Self {
        Self::new()
    }
}

/// State shared by the loop's helpers.
struct Run<'a> {
    ddp: &'a mut Ddp,
    optimizer: &'a mut dyn Optimizer,
    schedule: &'a Schedule,
    config: &'a TrainConfig,
    checkpoints: Option<AsyncCheckpointer>,
    jsonl: Option<(PathBuf, File)>,
    out: &'a mut (dyn Write + Send),
    batches_per_epoch: u64,
    /// What decides which samples a rank reads at which step, recorded with each checkpoint's position.
    shape: Shape,
    /// Steps of this run skipped on fp16 overflow.
    skipped_steps: u64,
    /// With a sharded engine, every rank's writer of the checkpoint location: each writes and reads its own shards.
    sharded: Option<ShardedWriter>,
}

impl Trainer {
    /// Metrics lines go to stdout; a progress bar shows on rank 0 when stderr is a terminal.
    pub fn new() -> Self {
        Trainer { out: Box::new(std::io::stdout()), progress: std::io::stderr().is_terminal() }
    }

    /// Metrics lines (rank 0's) go to `out` instead of stdout.
    pub fn with_metrics_writer(mut self, out: Box<dyn Write + Send>) -> Self {
        self.out = out;
        self
    }

    /// Forces the progress bar on or off.
    pub fn with_progress_bar(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }

    /// Trains `ddp` with `optimizer` and learning rate `config.lr * schedule.factor(step)` on `train`, evaluating
    /// on `eval`, until `config.max_steps` steps or `config.epochs` epochs are done or `stop` is set.
    ///
    /// Every rank calls it with the same configuration. It resumes from the newest valid checkpoint in
    /// `paths.checkpoint_dir` (read by rank 0 and broadcast, so the directory need not be shared) unless
    /// `config.no_resume`. Each step costs one tiny allreduce besides the gradients: the ranks agree on `stop` and
    /// on every rank having its batches, so they stop at the same step and a rank whose data fails makes every
    /// rank fail instead of hang. Rank 0 prints metrics lines, appends `metrics.jsonl`, writes checkpoints every
    /// `config.checkpoint_every` steps, at each epoch end and when stopping, and exports the model at the end.
    ///
    /// With a sharded engine (`--shard`) every rank writes and reads its own optimizer shards
    /// ([`crate::checkpoint::sharded`]): a checkpoint folder must then be shared by every rank, or be an `s3://`
    /// prefix.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        ddp: &mut Ddp,
        optimizer: &mut dyn Optimizer,
        schedule: &Schedule,
        config: &TrainConfig,
        train: &mut dyn BatchSource,
        mut eval: Option<&mut dyn BatchSource>,
        paths: &RunPaths,
        stop: &AtomicBool,
    ) -> Result<Summary> {
        config.validate()?;
        let rank = ddp.rank();
        let accum = config.grad_accum as u64;
        if ddp.options().grad_accum != config.grad_accum {
            return Err(TrainError::option(
                "grad-accum",
                format!(
                    "is {} in the configuration but {} in the Ddp options",
                    config.grad_accum,
                    ddp.options().grad_accum
                ),
            ));
        }
        let batches_per_epoch = train.batches_per_epoch();
        let steps_per_epoch = batches_per_epoch / accum;
        if steps_per_epoch == 0 {
            return Err(TrainError::option(
                "batch-size",
                format!(
                    "an epoch has {batches_per_epoch} batches per rank, fewer than grad-accum {accum}: no step fits"
                ),
            ));
        }
        let total = config.total_steps(steps_per_epoch);
        let checkpoints = match (&paths.checkpoint_dir, rank) {
            (Some(dir), 0) => Some(AsyncCheckpointer::new(CheckpointStore::at(dir, &paths.s3, config.keep)?)),
            _ => None,
        };
        let jsonl = match (&paths.output_dir, rank) {
            (Some(dir), 0) => {
                std::fs::create_dir_all(dir).map_err(|e| TrainError::io("create", dir, e))?;
                let path = dir.join("metrics.jsonl");
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| TrainError::io("open", &path, e))?;
                Some((path, f))
            }
            _ => None,
        };
        let shape = Shape {
            world_size: ddp.world_size() as u64,
            batch_size: config.batch_size as u64,
            grad_accum: accum,
            seed: config.seed,
            stream_window: train.stream_window().map_or(0, |w| w as u64),
            batches_per_epoch: steps_per_epoch * accum,
        };
        let mut run = Run {
            ddp,
            optimizer,
            schedule,
            config,
            checkpoints,
            jsonl,
            out: self.out.as_mut(),
            batches_per_epoch: steps_per_epoch * accum,
            shape,
            skipped_steps: 0,
            sharded: None,
        };
        if let (Some(dir), ShardMode::Optimizer | ShardMode::Gradients) = (&paths.checkpoint_dir, run.ddp.shard_mode())
        {
            run.sharded = Some(ShardedWriter::new(CheckpointStore::at(dir, &paths.s3, config.keep)?));
        }

        let resumed = run.resume(paths)?;
        let (mut step, mut epoch, mut start_batch) = match &resumed {
            Some((path, meta)) => {
                let at = position::continue_from(meta, path, &shape, config.restart_epoch_on_change)?;
                (at.step, at.epoch, at.start_batch)
            }
            None => (0, 0, 0),
        };
        let resumed_from = resumed.map(|(p, _)| p);
        let first_step = step;

        let bar = if self.progress && rank == 0 {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps {msg} [{elapsed_precise}<{eta}]")
                    .expect("static template parses"),
            );
            bar.set_position(step);
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };

        let started = Instant::now();
        let allreduce_at_start = run.ddp.stats().allreduce_secs;
        let (mut data_wait, mut step_secs) = (0.0, 0.0);
        let (mut samples_local, mut window) = (0u64, Window::new());
        let mut train_loss = None;
        let (mut val, mut val_at) = (None::<Eval>, None::<u64>);
        let mut last_saved = resumed_from.as_ref().map(|_| step);
        let mut input: Option<(Vec<i64>, Kind)> = None;
        let mut stopped = false;
        // The epoch the last evaluation belongs to when the run ends mid-epoch or right after one.
        let mut last_epoch = epoch;

        while step < total && !stopped {
            let mut consumed = start_batch;
            {
                let mut batches = train.epoch(epoch, start_batch).map_err(|source| TrainError::Data {
                    during: format!("starting epoch {} of the training data", epoch + 1),
                    source,
                })?;
                let device = model::device_of(run.ddp.model());
                if device != tch::Device::Cpu {
                    batches = crate::batches::one_ahead(batches, move |b| crate::batches::to_device_async(device, b));
                }
                while consumed < run.batches_per_epoch && step < total {
                    let waited = Instant::now();
                    let mut micro: Vec<Batch> = Vec::with_capacity(accum as usize);
                    let mut failure: Option<TrainError> = None;
                    for i in 0..accum {
                        match batches.next() {
                            Some(Ok(b)) => micro.push(b),
                            Some(Err(source)) => {
                                failure = Some(TrainError::Data {
                                    during: format!("training batch {} of epoch {}", consumed + i + 1, epoch + 1),
                                    source,
                                });
                                break;
                            }
                            None => {
                                failure = Some(TrainError::Data {
                                    during: format!("training data of epoch {}", epoch + 1),
                                    source: format!(
                                        "ended after {} batches, but the source announced {batches_per_epoch}",
                                        consumed + i
                                    )
                                    .into(),
                                });
                                break;
                            }
                        }
                    }
                    data_wait += waited.elapsed().as_secs_f64();
                    // With them, whether this rank's sharded checkpoint shard is written: a checkpoint in flight
                    // completes once every rank's is, and costs no collective of its own.
                    let mut flags = [
                        f64::from(u8::from(stop.load(Ordering::SeqCst))),
                        f64::from(u8::from(failure.is_some())),
                        run.sharded.as_ref().map_or(0.0, ShardedWriter::done_here),
                    ];
                    run.ddp.allreduce_f64(&mut flags, ReduceOp::Sum)?;
                    if let Some(sharded) = run.sharded.as_mut() {
                        sharded.observe(run.ddp, flags[2])?;
                    }
                    if let Some(e) = failure {
                        return Err(e);
                    }
                    if flags[1] > 0.0 {
                        return Err(TrainError::Data {
                            during: format!("step {} of epoch {}", step + 1, epoch + 1),
                            source: "another rank's training data failed or ended early (see its log)".into(),
                        });
                    }
                    if flags[0] > 0.0 {
                        tracing::warn!(rank, step, "stop requested: writing a checkpoint and stopping");
                        stopped = true;
                        break;
                    }
                    if input.is_none() {
                        input = micro.first().map(|(xs, _)| (xs.size()[1..].to_vec(), xs.kind()));
                    }
                    let lr = config.lr * run.schedule.factor(step);
                    let computing = Instant::now();
                    let out = run.ddp.train_step(&micro, &mut *run.optimizer, lr)?;
                    step_secs += computing.elapsed().as_secs_f64();
                    step += 1;
                    consumed += accum;
                    run.skipped_steps += u64::from(out.skipped);
                    samples_local += out.samples as u64;
                    window.add(&out.loss, out.samples as u64)?;
                    bar.set_position(step);
                    if step % config.log_interval == 0 {
                        let loss = run.log_train(&mut window, epoch, step, lr)?;
                        bar.set_message(format!("loss {loss:.4}"));
                        train_loss = Some(loss);
                    }
                    if config.checkpoint_every.is_some_and(|k| step % k == 0) {
                        run.save(step, epoch, consumed)?;
                        last_saved = Some(step);
                    }
                }
            }
            let epoch_done = consumed >= run.batches_per_epoch;
            last_epoch = epoch;
            if epoch_done && config.eval_every_epoch {
                if let Some(source) = eval.as_deref_mut() {
                    val = Some(run.evaluate(source, epoch)?);
                    val_at = Some(step);
                }
            }
            // A stop right after a resume or a checkpoint has nothing new to save: the checkpoint of this step
            // holds exactly this state, and writing it again would only replace it.
            if last_saved != Some(step) {
                run.save(step, epoch, consumed)?;
                last_saved = Some(step);
            } else if stopped {
                tracing::info!(rank, step, "stopping: step {step} is already checkpointed");
            }
            if epoch_done {
                epoch += 1;
                start_batch = 0;
            } else {
                break;
            }
        }
        bar.finish_and_clear();
        let (last_checkpoint, checkpoint_secs) = run.finish_checkpoints(stopped)?;

        if window.count > 0 {
            train_loss = Some(run.reduce_window(&mut window)?.0);
        }
        if !stopped && val_at != Some(step) {
            if let Some(source) = eval {
                val = Some(run.evaluate(source, last_epoch)?);
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let allreduce_secs = run.ddp.stats().allreduce_secs - allreduce_at_start;
        let mut samples = [samples_local as f64];
        run.ddp.allreduce_f64(&mut samples, ReduceOp::Sum)?;
        let samples = samples[0] as u64;
        let peak_host_bytes = peak_host_by_rank(run.ddp)?;
        let mut summary = Summary {
            steps: step,
            steps_run: step - first_step,
            epochs: epoch,
            samples,
            samples_per_sec: if elapsed > 0.0 { samples as f64 / elapsed } else { 0.0 },
            elapsed_secs: elapsed,
            data_wait_secs: data_wait,
            compute_secs: (step_secs - allreduce_secs).max(0.0),
            allreduce_secs,
            train_loss,
            val_loss: val.as_ref().map(|v| v.loss),
            val_accuracy: val.as_ref().map(|v| v.accuracy),
            val_samples: val.as_ref().map_or(0, |v| v.samples),
            stopped,
            resumed_from,
            last_checkpoint,
            checkpoint_secs,
            exported_to: None,
            skipped_steps: run.skipped_steps,
            peak_host_bytes,
            loss_scale: run.ddp.grad_scaler().map(GradScaler::scale),
        };
        if rank == 0 && !stopped {
            if let Some(dir) = &paths.model_dir {
                let (shape, kind) = match input {
                    Some(input) => input,
                    None => first_input(train)?,
                };
                let net = run.ddp.model();
                let example = model::example_input(&shape, kind, model::device_of(net))?;
                let logits = tch::no_grad(|| net.forward_t(&example, false))
                    .map_err(|e| TrainError::torch("running the model once to learn its class count", e))?;
                let classes = logits.size().last().copied().unwrap_or(0);
                let extra = serde_json::json!({ "summary": &summary, "config": config });
                // An S3 model location gets the model through a local folder, uploaded by the caller.
                let local = match dir.to_str().filter(|d| d.starts_with("s3://")) {
                    Some(_) => std::env::temp_dir().join(format!("hytrain-model-{}", std::process::id())),
                    None => dir.clone(),
                };
                crate::export(net, &local, classes, &shape, extra)?;
                summary.exported_to = Some(local);
            }
        }
        tracing::info!(rank, steps = summary.steps, stopped, "training finished");
        Ok(summary)
    }
}

/// One input's shape and kind, from the first training batch.
fn first_input(train: &mut dyn BatchSource) -> Result<(Vec<i64>, Kind)> {
    let during = || "reading one training batch to learn the input shape for export".to_string();
    let mut it = train.epoch(0, 0).map_err(|source| TrainError::Data { during: during(), source })?;
    match it.next() {
        Some(Ok((xs, _))) => Ok((xs.size()[1..].to_vec(), xs.kind())),
        Some(Err(source)) => Err(TrainError::Data { during: during(), source }),
        None => Err(TrainError::Data { during: during(), source: "the training data is empty".into() }),
    }
}

/// Training losses since the last metrics line. Their sum stays on the model's device and is read once, when the
/// window is reduced, so steps between metrics lines never wait for the GPU.
struct Window {
    loss_sum: Option<Tensor>,
    count: u64,
    samples: u64,
    since: Instant,
}

impl Window {
    fn new() -> Self {
        Window { loss_sum: None, count: 0, samples: 0, since: Instant::now() }
    }

    fn add(&mut self, loss: &Tensor, samples: u64) -> Result<()> {
        let torch = |e| TrainError::torch("adding up the training loss", e);
        match &mut self.loss_sum {
            Some(sum) => drop(sum.f_add_(loss).map_err(torch)?),
            None => self.loss_sum = Some(loss.f_to_dtype(Kind::Double, false, true).map_err(torch)?),
        }
        self.count += 1;
        self.samples += samples;
        Ok(())
    }

    /// The summed loss as a number (0 for an empty window); on a GPU this waits for the window's last step.
    fn loss_sum(&self) -> Result<f64> {
        self.loss_sum
            .as_ref()
            .map_or(Ok(0.0), |s| s.f_double_value(&[]).map_err(|e| TrainError::torch("reading the training loss", e)))
    }
}

/// One evaluation's results over all ranks.
struct Eval {
    loss: f64,
    accuracy: f64,
    samples: u64,
}

/// What rank 0 tells the others about the checkpoint it resumes from.
#[derive(serde::Serialize, serde::Deserialize)]
struct ResumeHeader {
    error: Option<String>,
    path: Option<PathBuf>,
    meta: Option<CheckpointMeta>,
    /// Optimizer state entries: name, shape, kind.
    optimizer: Vec<(String, Vec<i64>, String)>,
}

pub(crate) fn kind_from_name(name: &str) -> Option<Kind> {
    Some(match name {
        "Float" => Kind::Float,
        "Double" => Kind::Double,
        "Half" => Kind::Half,
        "BFloat16" => Kind::BFloat16,
        "Int64" => Kind::Int64,
        "Int" => Kind::Int,
        "Int16" => Kind::Int16,
        "Int8" => Kind::Int8,
        "Uint8" => Kind::Uint8,
        "Bool" => Kind::Bool,
        _ => return None,
    })
}

impl Run<'_> {
    /// Rank 0 finds and loads the newest valid checkpoint, then broadcasts its step, position, weights and
    /// optimizer state, so every rank continues from it whether or not it can see the directory.
    fn resume(&mut self, paths: &RunPaths) -> Result<Option<(PathBuf, CheckpointMeta)>> {
        if let Some(store) = self.sharded.as_ref().map(ShardedWriter::store) {
            // Every rank reads its own optimizer shards; rank 0 the model, broadcast.
            if self.config.no_resume {
                return Ok(None);
            }
            let Some(found) = store.resume_sharded(self.ddp, self.optimizer)? else {
                return Ok(None);
            };
            self.restore_generators(&found.path, &found.meta)?;
            tracing::info!(
                rank = self.ddp.rank(),
                path = %found.path.display(),
                step = found.meta.step,
                epoch = found.meta.epoch + 1,
                position = %found.meta.data_position,
                shards = ?found.read,
                "resuming from checkpoint"
            );
            return Ok(Some((found.path, found.meta)));
        }
        let rank = self.ddp.rank();
        let mut header = ResumeHeader { error: None, path: None, meta: None, optimizer: Vec::new() };
        let mut optimizer_state = Vec::new();
        if rank == 0 && !self.config.no_resume {
            match self.load_latest() {
                Ok(Some((path, meta, state))) => {
                    header.optimizer = state
                        .iter()
                        .map(|(n, t): &(String, Tensor)| (n.clone(), t.size(), format!("{:?}", t.kind())))
                        .collect();
                    header.path = Some(path);
                    header.meta = Some(meta);
                    optimizer_state = state;
                }
                Ok(None) => {}
                Err(e) => header.error = Some(e.to_string()),
            }
        }
        if self.ddp.world_size() > 1 {
            let mut bytes =
                if rank == 0 { serde_json::to_vec(&header).expect("header serialises") } else { Vec::new() };
            let mut len = (bytes.len() as u64).to_le_bytes();
            let comm = |e| TrainError::Comm { during: "resume decision broadcast".into(), source: e };
            self.ddp.collective().broadcast(&mut len, 0).map_err(comm)?;
            bytes.resize(u64::from_le_bytes(len) as usize, 0);
            self.ddp.collective().broadcast(&mut bytes, 0).map_err(comm)?;
            header = serde_json::from_slice(&bytes).map_err(|e| TrainError::Checkpoint {
                path: paths.checkpoint_dir.clone().unwrap_or_default(),
                detail: format!("resume header from rank 0 does not parse: {e}"),
            })?;
        }
        if let Some(detail) = header.error {
            return Err(TrainError::Checkpoint { path: paths.checkpoint_dir.clone().unwrap_or_default(), detail });
        }
        let (Some(path), Some(meta)) = (header.path, header.meta) else {
            return Ok(None);
        };
        self.restore_generators(&path, &meta)?;
        if self.ddp.world_size() > 1 {
            let weights = model::state_tensors(self.ddp.model());
            self.ddp.broadcast_tensors(&weights, "checkpoint weights broadcast from rank 0")?;
            if rank != 0 {
                optimizer_state = header
                    .optimizer
                    .iter()
                    .map(|(name, shape, kind)| {
                        let kind = kind_from_name(kind).ok_or_else(|| {
                            TrainError::OptimizerState(format!(
                                "entry {name} has dtype {kind}, which hytrain cannot load"
                            ))
                        })?;
                        Tensor::f_zeros(shape.as_slice(), (kind, model::device_of(self.ddp.model())))
                            .map(|t| (name.clone(), t))
                            .map_err(|e| TrainError::torch("allocating optimizer state", e))
                    })
                    .collect::<Result<_>>()?;
            }
            self.ddp.broadcast_tensors(&optimizer_state, "optimizer state broadcast from rank 0")?;
            if rank != 0 {
                self.ddp.load_optimizer_state(self.optimizer, &optimizer_state)?;
            }
        }
        tracing::info!(
            rank,
            path = %path.display(),
            step = meta.step,
            epoch = meta.epoch + 1,
            position = %meta.data_position,
            "resuming from checkpoint"
        );
        Ok(Some((path, meta)))
    }

    /// The loss scaler and the random generators as `meta` recorded them.
    fn restore_generators(&mut self, path: &Path, meta: &CheckpointMeta) -> Result<()> {
        // Every rank has the header, so every rank's scaler continues alike. A checkpoint of another precision
        // (or from before fp16 existed) has no scaler state: the scaler then starts afresh.
        if let (Some(state), Some(scaler)) = (&meta.grad_scaler, self.ddp.grad_scaler_mut()) {
            *scaler = GradScaler::from_state(state.clone());
        }
        // Rank 0's generators are every rank's (all seed and draw alike), so dropout continues as if uninterrupted.
        crate::rng::restore(model::device_of(self.ddp.model()), &meta.rng.state).map_err(|e| TrainError::Checkpoint {
            path: path.to_path_buf(),
            detail: format!(
                "libtorch's random generator state does not load: {e} (written by another libtorch?); resume \
                     with the libtorch that wrote it, or start afresh with --no-resume"
            ),
        })
    }

    /// Rank 0: the newest valid checkpoint loaded into the model and optimizer.
    #[allow(clippy::type_complexity)]
    fn load_latest(&mut self) -> Result<Option<(PathBuf, CheckpointMeta, Vec<(String, Tensor)>)>> {
        let Some(checkpoints) = &self.checkpoints else {
            return Ok(None);
        };
        let Some(resume) = checkpoints.store().latest_valid()? else {
            return Ok(None);
        };
        let ckpt = resume.checkpoint;
        model::load_state_tensors(self.ddp.model(), &ckpt.model)?;
        self.ddp.load_optimizer_state(self.optimizer, &ckpt.optimizer)?;
        Ok(Some((resume.path, ckpt.meta, ckpt.optimizer)))
    }

    /// Waits for the checkpoint being written in the background (rank 0; with sharding every rank), saying so when
    /// the run was asked to stop (the platform's grace period is running); the last checkpoint written and the
    /// seconds checkpoints held the step loop.
    fn finish_checkpoints(&mut self, stopped: bool) -> Result<(Option<PathBuf>, f64)> {
        if let Some(sharded) = self.sharded.as_mut() {
            if let (Some(step), true) = (sharded.writing(), stopped) {
                tracing::warn!(
                    step,
                    location = %sharded.location().display(),
                    "stop requested: finishing the sharded checkpoint of step {step} before exiting"
                );
            }
            let last = sharded.finish(self.ddp)?;
            return Ok((last, sharded.held_secs()));
        }
        let Some(checkpoints) = self.checkpoints.as_mut() else {
            return Ok((None, 0.0));
        };
        if let (Some(step), true) = (checkpoints.writing(), stopped) {
            tracing::warn!(
                step,
                location = %checkpoints.location().display(),
                "stop requested: finishing the checkpoint write of step {step} before exiting (SageMaker allows 120 s \
                 after a spot interruption notice, Kubernetes the pod's terminationGracePeriodSeconds)"
            );
        }
        let waited = std::time::Instant::now();
        let last = checkpoints.finish()?;
        if stopped {
            if let Some(path) = &last {
                tracing::warn!(
                    path = %path.display(),
                    secs = format!("{:.2}", waited.elapsed().as_secs_f64()),
                    "stop requested: the final checkpoint is complete; exiting"
                );
            }
        }
        Ok((last, checkpoints.held_secs()))
    }

    /// Rank 0 copies the state at `step`, with the data position, and writes it in the background; other ranks do
    /// nothing. With a sharded engine every rank copies its optimizer blocks and writes its shard in the background,
    /// and rank 0 the model and the manifest once all are written (see [`ShardedWriter`]).
    fn save(&mut self, step: u64, epoch: u64, consumed: u64) -> Result<()> {
        let Some(checkpoints) = self.checkpoints.as_ref() else {
            if let Some(sharded) = self.sharded.as_mut() {
                sharded.save(self.ddp, &*self.optimizer, None, step)?;
            }
            return Ok(());
        };
        let mut position = serde_json::Map::new();
        position.insert("epoch".into(), epoch.into());
        position.insert("batches".into(), consumed.into());
        self.shape.record(&mut position);
        let generators = crate::rng::state(model::device_of(self.ddp.model())).map_err(|e| TrainError::Checkpoint {
            path: checkpoints.location().to_path_buf(),
            detail: format!("cannot read libtorch's random generator state for step {step}: {e}"),
        })?;
        let sharded = self.sharded.is_some();
        let ckpt = Checkpoint {
            model: model::state_tensors(self.ddp.model()),
            optimizer: if sharded { Vec::new() } else { self.optimizer.state() },
            meta: CheckpointMeta {
                step,
                epoch,
                data_position: position.into(),
                rng: RngState { seed: self.config.seed, state: generators },
                config: serde_json::to_value(self.config).expect("configuration serialises"),
                schedule: self.schedule.clone(),
                model: self.ddp.model().name().to_string(),
                optimizer: self.optimizer.name().to_string(),
                grad_scaler: self.ddp.grad_scaler().map(|s| s.state().clone()),
            },
        };
        if let Some(writer) = self.sharded.as_mut() {
            return writer.save(self.ddp, &*self.optimizer, Some(&ckpt), step);
        }
        let Some(checkpoints) = self.checkpoints.as_mut() else {
            return Ok(());
        };
        checkpoints.save(&ckpt)
    }

    /// Mean loss over ranks and steps of the window, and samples per second over all ranks; resets the window.
    /// Every rank calls it at the same step.
    fn reduce_window(&mut self, w: &mut Window) -> Result<(f64, f64)> {
        let mut sums = [w.loss_sum()?, w.count as f64, w.samples as f64];
        self.ddp.allreduce_f64(&mut sums, ReduceOp::Sum)?;
        let secs = w.since.elapsed().as_secs_f64();
        *w = Window::new();
        Ok((sums[0] / sums[1].max(1.0), if secs > 0.0 { sums[2] / secs } else { 0.0 }))
    }

    fn log_train(&mut self, w: &mut Window, epoch: u64, step: u64, lr: f64) -> Result<f64> {
        let (loss, rate) = self.reduce_window(w)?;
        let mut fields = vec![
            ("epoch", Value::Int(epoch + 1)),
            ("step", Value::Int(step)),
            ("train_loss", Value::Float(loss, 4)),
            ("lr", Value::Lr(lr)),
            ("samples_per_sec", Value::Float(rate, 1)),
        ];
        if let Some(scaler) = self.ddp.grad_scaler() {
            fields.push(("loss_scale", Value::Lr(scaler.scale())));
            fields.push(("skipped_steps", Value::Int(self.skipped_steps)));
        }
        self.emit(&fields)?;
        Ok(loss)
    }

    /// Rank 0 writes `key=value ...` to the metrics writer and the log, and one JSON object to `metrics.jsonl`.
    fn emit(&mut self, fields: &[(&str, Value)]) -> Result<()> {
        if self.ddp.rank() != 0 {
            return Ok(());
        }
        let line = fields.iter().map(|(k, v)| format!("{k}={}", v.text())).collect::<Vec<_>>().join(" ");
        tracing::debug!(rank = 0, "{line}");
        let stdout_err = |e| TrainError::io("write metrics to", "the metrics writer", e);
        writeln!(self.out, "{line}").and_then(|_| self.out.flush()).map_err(stdout_err)?;
        if let Some((path, file)) = &mut self.jsonl {
            let obj: serde_json::Map<String, serde_json::Value> =
                fields.iter().map(|(k, v)| (k.to_string(), v.json())).collect();
            let mut text = serde_json::to_string(&obj).expect("metrics serialise");
            text.push('\n');
            file.write_all(text.as_bytes()).map_err(|e| TrainError::io("write", path.clone(), e))?;
        }
        Ok(())
    }

    /// Loss and accuracy of the model on `source`: each rank sums over its own samples, then one allreduce adds
    /// the ranks' sums, so every sample counts once however unevenly the ranks' shares are sized.
    fn evaluate(&mut self, source: &mut dyn BatchSource, epoch: u64) -> Result<Eval> {
        // BatchNorm statistics differ slightly between ranks after training; evaluate rank 0's on all.
        self.ddp.sync_buffers()?;
        let mut sums = [0.0f64; 5]; // loss, correct, targets, samples, failed ranks
                                    // Loss and correct predictions add up where the model computes them and are read once, after the last batch.
        let mut on_device: Option<Tensor> = None;
        let mut failure = None;
        match source.epoch(epoch, 0) {
            Err(source) => failure = Some(TrainError::Data { during: "starting the validation data".into(), source }),
            Ok(batches) => {
                for (i, batch) in batches.enumerate() {
                    let result = batch
                        .map_err(|source: BatchError| TrainError::Data {
                            during: format!("validation batch {}", i + 1),
                            source,
                        })
                        .and_then(|(xs, ys)| self.eval_batch(&xs, &ys));
                    let added = result.and_then(|(loss_correct, targets, samples)| {
                        sums[2] += targets;
                        sums[3] += samples;
                        let Some(acc) = &mut on_device else {
                            on_device = Some(loss_correct);
                            return Ok(());
                        };
                        acc.f_add_(&loss_correct)
                            .map(drop)
                            .map_err(|e| TrainError::torch("adding up the validation loss", e))
                    });
                    if let Err(e) = added {
                        failure = Some(e);
                        break;
                    }
                }
            }
        }
        if let Some(acc) = on_device.filter(|_| failure.is_none()) {
            match Vec::<f64>::try_from(&acc) {
                Ok(read) => sums[..2].copy_from_slice(&read),
                Err(e) => failure = Some(TrainError::torch("reading the validation loss", e)),
            }
        }
        sums[4] = f64::from(u8::from(failure.is_some()));
        self.ddp.allreduce_f64(&mut sums, ReduceOp::Sum)?;
        if let Some(e) = failure {
            return Err(e);
        }
        if sums[4] > 0.0 {
            return Err(TrainError::Data {
                during: "evaluation".into(),
                source: "another rank's validation data failed (see its log)".into(),
            });
        }
        let n = sums[2];
        let eval = Eval {
            loss: if n > 0.0 { sums[0] / n } else { f64::NAN },
            accuracy: if n > 0.0 { sums[1] / n } else { f64::NAN },
            samples: sums[3] as u64,
        };
        self.emit(&[
            ("epoch", Value::Int(epoch + 1)),
            ("val_loss", Value::Float(eval.loss, 4)),
            ("val_accuracy", Value::Float(eval.accuracy, 4)),
        ])?;
        Ok(eval)
    }

    /// Summed cross-entropy and correct predictions of one validation batch (a float64 tensor `[2]` on the model's
    /// device, nothing read back), and its targets and samples. A target is a sample's class label, or for a
    /// language model each position's next token: loss and accuracy are per token.
    fn eval_batch(&mut self, xs: &Tensor, ys: &Tensor) -> Result<(Tensor, f64, f64)> {
        let logits = tch::no_grad(|| self.ddp.forward_t(xs, false))?;
        let torch = |e| TrainError::torch(format!("evaluating a batch of shape {:?}", xs.size()), e);
        let classes = logits.size().last().copied().unwrap_or(1);
        let logits = logits.f_reshape([-1, classes]).map_err(torch)?;
        let ys = ys
            .f_to_kind(Kind::Int64)
            .and_then(|t| t.f_to_device(logits.device()))
            .and_then(|t| t.f_reshape([-1]))
            .map_err(torch)?;
        let loss = logits
            .f_cross_entropy_loss::<Tensor>(&ys, None, Reduction::Sum, -100, 0.0)
            .and_then(|l| l.f_to_kind(Kind::Double))
            .map_err(torch)?;
        let correct = logits
            .f_argmax(-1, false)
            .and_then(|p| p.f_eq_tensor(&ys))
            .and_then(|c| c.f_sum(Kind::Double))
            .map_err(torch)?;
        let loss_correct = Tensor::f_stack(&[loss, correct], 0).map_err(torch)?;
        let samples = xs.size().first().copied().unwrap_or(0);
        Ok((loss_correct, ys.size()[0] as f64, samples as f64))
    }
}

/// Every rank's peak resident host memory (`peak_host_bytes`), in rank order, through one allreduce (each rank's
/// value in its own slot); empty when a rank's kernel does not report it.
fn peak_host_by_rank(ddp: &mut Ddp) -> Result<Vec<u64>> {
    let mut slots = vec![0.0f64; ddp.world_size()];
    slots[ddp.rank()] = peak_host_bytes().map_or(-1.0, |b| b as f64);
    ddp.allreduce_f64(&mut slots, ReduceOp::Sum)?;
    Ok(if slots.iter().any(|b| *b < 0.0) { Vec::new() } else { slots.iter().map(|b| *b as u64).collect() })
}

/// This process's peak resident set in bytes (`getrusage`'s `ru_maxrss`, which Linux gives in KiB), or `None` if
/// the call fails.
fn peak_host_bytes() -> Option<u64> {
    // SAFETY: rusage is a plain C struct of integers (all-zero is valid) that getrusage fills.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    u64::try_from(usage.ru_maxrss).ok().map(|kib| kib * 1024)
}
