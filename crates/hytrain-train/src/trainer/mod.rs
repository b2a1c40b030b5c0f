//! The training loop: resume, epochs or max steps, metrics lines, evaluation reduced over ranks, checkpoints,
//! graceful stop, export. It pulls batches from a [`BatchSource`] and knows nothing of files or S3.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use hytrain_data::{Readers, Regroup};
use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

use crate::batches::{Batch, BatchError, BatchSource};
use crate::checkpoint::{AsyncCheckpointer, Checkpoint, CheckpointMeta, CheckpointStore, RngState, ShardedWriter};
use crate::config::TrainConfig;
use crate::model;
use crate::optim::Optimizer;
use crate::position::{self, Shape};
use crate::precision::GradScaler;
use crate::schedule::{LrPlan, Schedule};
use crate::{Ddp, ReduceOp, Result, ShardMode, TrainError};

mod resume;
mod summary;

pub(crate) use resume::{state_layout, zeros_of_layout};
pub use summary::Summary;

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
    /// Where the next run starts instead of resuming from a checkpoint ([`Trainer::continue_at`]).
    start: Option<Start>,
    /// Where the last run stood after its last completed step.
    at: Progress,
    /// The last run's schedule and planned end.
    lr: Option<LrPlan>,
    /// Asked on global rank 0 at step boundaries, at most every [`JOIN_CHECK`]: whether nodes wait to join.
    join_watch: Option<JoinWatch>,
}

/// Whether nodes wait to join the job (see [`Trainer::watch_for_joiners`]).
pub type JoinWatch = Box<dyn FnMut() -> bool + Send>;

/// How often global rank 0 asks its [`JoinWatch`].
const JOIN_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Where a run stood after its last completed step: what the ranks that carry on after a change of ranks continue
/// from ([`Progress::next_start`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer steps completed.
    pub step: u64,
    /// The epoch in progress.
    pub epoch: u64,
    /// Batches of the epoch this rank consumed (of its regrouped share, in a regrouped epoch).
    pub batches: u64,
    /// Batches the epoch has on this rank (those whole steps take).
    pub epoch_batches: u64,
    /// The epoch's regroup, when its ranks already changed part-way.
    pub regroup: Option<Regroup>,
}

impl Progress {
    /// Where the ranks continue once the `world_size` ranks that stood here (with `batch_size` samples a batch)
    /// gave way to others: the epoch's remaining samples regrouped among them, or the next epoch when this one is
    /// done.
    pub fn next_start(&self, world_size: usize, batch_size: usize) -> Start {
        if self.batches >= self.epoch_batches {
            return Start { step: self.step, epoch: self.epoch + 1, regroup: None, lr: None };
        }
        let mut before =
            self.regroup.as_ref().filter(|r| r.epoch == self.epoch).map_or(Vec::new(), |r| r.before.clone());
        before.push(Readers { world_size, consumed: self.batches as usize * batch_size });
        Start { step: self.step, epoch: self.epoch, regroup: Some(Regroup { epoch: self.epoch, before }), lr: None }
    }
}

/// Where a run starts when it continues a run in memory rather than from a checkpoint: after the job's ranks
/// changed, every rank continues from global rank 0's [`Progress`] and learning-rate plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Start {
    /// Optimizer steps completed.
    pub step: u64,
    /// The epoch to continue, from its first batch (of what is left of it, when regrouped).
    pub epoch: u64,
    /// The epoch's regroup: the ranks read only what its earlier readers left.
    pub regroup: Option<Regroup>,
    /// Global rank 0's schedule and planned end before the change, which the run continues
    /// ([`LrPlan::continued`]); `None`: the caller's schedule.
    #[serde(default)]
    pub lr: Option<LrPlan>,
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
    /// The run's schedule: the caller's, or global rank 0's continued after a change of ranks.
    schedule: Schedule,
    config: &'a TrainConfig,
    checkpoints: Option<AsyncCheckpointer>,
    jsonl: Option<(PathBuf, File)>,
    out: &'a mut (dyn Write + Send),
    /// The regroup of the epoch in progress, recorded with each checkpoint's position.
    regroup: Option<Regroup>,
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
        Trainer {
            out: Box::new(std::io::stdout()),
            progress: std::io::stderr().is_terminal(),
            start: None,
            at: Progress::default(),
            lr: None,
            join_watch: None,
        }
    }

    /// On global rank 0, `watch` is asked at step boundaries (about once a second) whether nodes wait to join the
    /// job; when it says so, every rank stops at the same boundary and the run fails with
    /// [`TrainError::NodesWaiting`], so the caller can make room for them and continue ([`Trainer::continue_at`]).
    pub fn watch_for_joiners(&mut self, watch: Option<JoinWatch>) {
        self.join_watch = watch;
    }

    /// The next [`Trainer::run`] starts at `start` instead of resuming from the checkpoint folder: the ranks
    /// carry on in memory after the job's ranks changed. Its model and optimizer state must already be the same
    /// on every rank.
    pub fn continue_at(&mut self, start: Start) {
        self.start = Some(start);
    }

    /// Where the last run stood after its last completed step (also after it failed).
    pub fn progress(&self) -> &Progress {
        &self.at
    }

    /// The last run's learning-rate schedule and planned end, which the ranks take from global rank 0 after a
    /// change of ranks ([`crate::elastic::Carried`]); `None` before any run.
    pub fn lr_plan(&self) -> Option<&LrPlan> {
        self.lr.as_ref()
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
            schedule: schedule.clone(),
            config,
            checkpoints,
            jsonl,
            out: self.out.as_mut(),
            regroup: None,
            shape,
            skipped_steps: 0,
            sharded: None,
        };
        if let (Some(dir), ShardMode::Optimizer | ShardMode::Gradients) = (&paths.checkpoint_dir, run.ddp.shard_mode())
        {
            run.sharded = Some(ShardedWriter::new(CheckpointStore::at(dir, &paths.s3, config.keep)?));
        }

        let in_memory = self.start.is_some();
        let mut carried_lr = None;
        let (mut step, mut epoch, mut start_batch, resumed_from) = match self.start.take() {
            Some(start) => {
                run.regroup = start.regroup;
                carried_lr = start.lr;
                (start.step, start.epoch, 0, None)
            }
            None => match run.resume(paths)? {
                Some((path, meta)) => {
                    let at = position::continue_from(&meta, &path, &shape, config.restart_epoch_on_change)?;
                    run.regroup = at.regroup;
                    (at.step, at.epoch, at.start_batch, Some(path))
                }
                None => (0, 0, 0, None),
            },
        };
        // Whole steps of an epoch: a regrouped epoch's share may end in batches too few for a step.
        let epoch_batches = |train: &dyn BatchSource, epoch: u64| train.batches_in_epoch(epoch) / accum * accum;
        if let Some(regroup) = &run.regroup {
            train.regroup(Some(regroup.clone())).map_err(|source| TrainError::Data {
                during: format!("continuing epoch {} with this job's ranks", regroup.epoch + 1),
                source,
            })?;
        }
        let mut total = total;
        if (in_memory || run.regroup.is_some()) && config.max_steps.is_none() {
            // The steps so far were taken by other ranks, at another epoch length: this epoch's rest, then whole
            // epochs of this job's shape.
            let rest = epoch_batches(train, epoch).saturating_sub(start_batch) / accum;
            total = step + rest + config.epochs.saturating_sub(epoch + 1) * steps_per_epoch;
            // The rest of the run covers the rest of rank 0's schedule (in updates with --max-steps: unchanged).
            if let Some(plan) = &carried_lr {
                run.schedule = plan.continued(step, total).schedule;
            }
        } else if let Some(plan) = carried_lr {
            run.schedule = plan.schedule;
        }
        self.lr = Some(LrPlan { schedule: run.schedule.clone(), end: total });
        self.at = Progress {
            step,
            epoch,
            batches: start_batch,
            epoch_batches: epoch_batches(train, epoch),
            regroup: run.regroup.clone(),
        };
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
        let mut join_checked = started;
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
            let in_epoch = epoch_batches(train, epoch);
            {
                let mut batches = train.epoch(epoch, start_batch).map_err(|source| TrainError::Data {
                    during: format!("starting epoch {} of the training data", epoch + 1),
                    source,
                })?;
                let device = model::device_of(run.ddp.model());
                if device != tch::Device::Cpu {
                    batches = crate::batches::one_ahead(batches, move |b| crate::batches::to_device_async(device, b));
                }
                while consumed < in_epoch && step < total {
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
                                        "ended after {} batches, but the source announced {in_epoch}",
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
                    let joiners = match self.join_watch.as_mut() {
                        Some(watch) if rank == 0 && join_checked.elapsed() >= JOIN_CHECK => {
                            join_checked = Instant::now();
                            watch()
                        }
                        _ => false,
                    };
                    let mut flags = [
                        f64::from(u8::from(stop.load(Ordering::SeqCst))),
                        f64::from(u8::from(failure.is_some())),
                        run.sharded.as_ref().map_or(0.0, ShardedWriter::done_here),
                        f64::from(u8::from(joiners)),
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
                    if flags[3] > 0.0 {
                        tracing::info!(rank, step, "nodes wait to join the job: stopping at this step boundary");
                        if run.sharded.is_some() {
                            // Each rank holds only its part of the optimizer state: the next round's ranks take
                            // it from a checkpoint of this step, which every rank finishes before leaving.
                            if last_saved != Some(step) {
                                run.save(step, epoch, consumed)?;
                            }
                            run.finish_checkpoints(false)?;
                        }
                        return Err(TrainError::NodesWaiting { step });
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
                    self.at = Progress {
                        step,
                        epoch,
                        batches: consumed,
                        epoch_batches: in_epoch,
                        regroup: run.regroup.clone(),
                    };
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
            let epoch_done = consumed >= in_epoch;
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
                if run.regroup.take().is_some() {
                    // A whole epoch again.
                    train.regroup(None).map_err(|source| TrainError::Data {
                        during: format!("starting epoch {}", epoch + 1),
                        source,
                    })?;
                }
                self.at =
                    Progress { step, epoch, batches: 0, epoch_batches: epoch_batches(train, epoch), regroup: None };
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

impl Run<'_> {
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
        if let Some(regroup) = &self.regroup {
            position.insert("regroup".into(), serde_json::to_value(regroup).expect("a regroup serialises"));
        }
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
