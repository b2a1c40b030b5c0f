//! Data parallelism over a [`Collective`]: identical start on every rank, averaged gradients in buckets,
//! gradient accumulation, clipping, BatchNorm buffers from rank 0, mixed precision. The model check and the
//! broadcasts from rank 0 are in `ddp/replicas.rs`.

use std::time::Instant;

use tch::{Device, Kind, Reduction, Tensor};

use crate::bucket::{assign_buckets, reducible, Bucket, MB};
use crate::model::Model;
use crate::optim::Optimizer;
use crate::overlap::{Overlap, Reducer, RoundError};
use crate::precision::{Autocast, GradScaler, GradScalerState, Precision};
use crate::{Buffer, Collective, ReduceOp, Result, TrainError};

mod replicas;
mod shard;

pub use shard::ShardMode;
use shard::ZERO2_BUCKETS_IN_FLIGHT;

/// How [`Ddp`] splits and synchronises gradients.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DdpOptions {
    /// Bucket cap in MiB (`--bucket-mb`); a bucket closes once it holds at least this much.
    pub bucket_mb: f64,
    /// Cap of the first bucket in MiB: small, like PyTorch's 1 MiB, so the first allreduce starts early.
    pub first_bucket_mb: f64,
    /// Micro-batches per optimizer step (`--grad-accum`); gradients are averaged only after the last one.
    pub grad_accum: usize,
    /// Clip gradients to this global L2 norm after averaging (`--clip-grad-norm`).
    pub max_grad_norm: Option<f64>,
    /// Copy rank 0's buffers (BatchNorm running statistics) to every rank before each training forward, as
    /// PyTorch DDP's `broadcast_buffers=True` does.
    pub broadcast_buffers: bool,
    /// Start each bucket's allreduce on a communication thread as soon as backward has produced its gradients,
    /// instead of after backward (`--overlap`). Results are bit-identical either way. On the CPU this needs more
    /// than one rank; on a GPU, a side stream given to [`Ddp::with_device_collective`].
    #[serde(default = "overlap_by_default")]
    pub overlap: bool,
    /// Arithmetic of the forward pass (`--precision`): [`Ddp::train_step`] runs forward and loss under autocast
    /// for bf16 and fp16, and scales the loss for fp16 (see [`crate::precision`]).
    #[serde(default)]
    pub precision: Precision,
    /// The fp16 loss scale to start from (`--init-loss-scale`; torch.amp.GradScaler's `init_scale`, 2^16).
    #[serde(default = "init_loss_scale_by_default")]
    pub init_loss_scale: f64,
    /// What is sharded across ranks (`--shard`): nothing (DDP), the optimizer state (ZeRO-1) or the optimizer
    /// state and the gradients (ZeRO-2); see [`ShardMode`]. A sharded engine is driven by [`Ddp::train_step`]
    /// with an optimizer from [`Ddp::build_optimizer`].
    #[serde(default)]
    pub shard: ShardMode,
}

fn init_loss_scale_by_default() -> f64 {
    GradScalerState::default().scale.into()
}

fn overlap_by_default() -> bool {
    true
}

impl Default for DdpOptions {
    fn default() -> Self {
        DdpOptions {
            bucket_mb: 25.0,
            first_bucket_mb: 1.0,
            grad_accum: 1,
            max_grad_norm: None,
            broadcast_buffers: true,
            overlap: true,
            precision: Precision::Fp32,
            init_loss_scale: init_loss_scale_by_default(),
            shard: ShardMode::None,
        }
    }
}

impl DdpOptions {
    /// Refuses values the engine cannot use, naming the flag.
    pub fn validate(&self) -> Result<()> {
        for (flag, v) in [("--bucket-mb", self.bucket_mb), ("first bucket size", self.first_bucket_mb)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(TrainError::option(flag, format!("must be a positive number of MiB, got {v}")));
            }
        }
        if self.grad_accum == 0 {
            return Err(TrainError::option("--grad-accum", "must be at least 1"));
        }
        let s = self.init_loss_scale;
        if !(s.is_finite() && s >= 1.0 && s <= f64::from(f32::MAX)) {
            return Err(TrainError::option(
                "--init-loss-scale",
                format!("must be a number from 1 to {:e} (a float32), got {s}", f32::MAX),
            ));
        }
        if let Some(n) = self.max_grad_norm {
            if !(n.is_finite() && n > 0.0) {
                return Err(TrainError::option("--clip-grad-norm", format!("must be a positive number, got {n}")));
            }
        }
        Ok(())
    }
}

/// Time and volume spent communicating since the engine started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DdpStats {
    /// Seconds the training thread spent on gradient allreduces (pack and unpack included): with overlap, only the
    /// part not hidden behind backward, from backward's end until the last bucket is reduced.
    pub allreduce_secs: f64,
    /// Seconds of gradient allreduce work (pack and unpack included) wherever it ran; without overlap the same as
    /// `allreduce_secs`.
    pub allreduce_busy_secs: f64,
    /// Seconds broadcasting parameters and buffers.
    pub broadcast_secs: f64,
    /// Gradient bytes this rank sent into allreduces.
    pub allreduce_bytes: u64,
    /// Gradient synchronisations (optimizer steps).
    pub syncs: u64,
    /// Buckets whose allreduce started while backward was still running (overlap on); the others started after it.
    pub buckets_launched_in_backward: u64,
}

/// What one optimizer step did. The loss and the norm stay where the model computed them (a 0-dim tensor on its
/// device), so a step never waits for the GPU; read them when they are needed ([`StepOutput::loss_value`]), as the
/// training loop does once per logging window.
#[derive(Debug)]
pub struct StepOutput {
    /// Mean training loss of this rank's micro-batches (not averaged over ranks), detached.
    pub loss: Tensor,
    /// Global gradient norm before clipping, when clipping is on.
    pub grad_norm: Option<Tensor>,
    /// Samples this rank processed.
    pub samples: usize,
    /// The optimizer step was skipped because the fp16 gradients overflowed (the same on every rank).
    pub skipped: bool,
}

impl StepOutput {
    /// The loss as a number; on a GPU this waits for the step to finish.
    pub fn loss_value(&self) -> Result<f64> {
        self.loss.f_double_value(&[]).map_err(|e| TrainError::torch("reading the loss", e))
    }

    /// The gradient norm before clipping as a number, when clipping is on; on a GPU this waits for the step.
    pub fn grad_norm_value(&self) -> Result<Option<f64>> {
        let read = |n: &Tensor| n.f_double_value(&[]).map_err(|e| TrainError::torch("reading the gradient norm", e));
        self.grad_norm.as_ref().map(read).transpose()
    }
}

/// The layout of one gradient bucket, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketLayout {
    /// Parameter names in buffer order.
    pub params: Vec<String>,
    /// Buffer size in bytes.
    pub bytes: usize,
}

/// A model trained data-parallel: every rank holds a replica and gradients are averaged before each update.
///
/// Construction checks that all ranks built the same model and copies rank 0's parameters and buffers to all.
pub struct Ddp {
    model: Box<dyn Model>,
    comm: Box<dyn Collective>,
    params: Vec<(String, Tensor)>,
    buffers: Vec<(String, Tensor)>,
    buckets: Vec<Bucket>,
    options: DdpOptions,
    micro_step: usize,
    stats: DdpStats,
    scratch: Vec<u8>,
    /// Gradient hooks when allreduces overlap backward (`options.overlap`, and more than one rank on the CPU or a
    /// side stream on a GPU).
    overlap: Option<Overlap>,
    /// Gradient buckets are reduced here, in GPU memory, when set (see [`Ddp::with_device_collective`]).
    device_comm: Option<Box<dyn hytrain_cuda::DeviceCollective>>,
    /// Loss scaling when the precision is fp16.
    scaler: Option<GradScaler>,
    /// The last synchronisation found inf or NaN in the fp16 gradients.
    overflowed: bool,
    /// Gradients are views of the buckets, always defined, or released between steps (ZeRO-2): whether a
    /// parameter got one is read from the graph.
    grads_are_views: bool,
    /// What is sharded across ranks: the option, or nothing alone.
    shard: ShardMode,
    /// Parameters some backward has reached since the engine started (with `grads_are_views`).
    reached: Vec<u8>,
}

impl std::fmt::Debug for Ddp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ddp")
            .field("model", &self.model.name())
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .field("buckets", &self.buckets.len())
            .field("options", &self.options)
            .finish()
    }
}

/// What an error during the allreduce of bucket `b` says it was doing.
fn allreduce_of(b: usize, bytes: usize) -> String {
    format!("gradient allreduce of bucket {b} ({bytes} bytes)")
}

fn comm_err(during: impl Into<String>) -> impl FnOnce(crate::CommError) -> TrainError {
    let during = during.into();
    move |source| TrainError::Comm { during, source }
}

impl Ddp {
    /// Wraps `model` for data-parallel training over `comm`.
    ///
    /// Every rank must call this at the same point. All ranks first exchange a hash of every parameter's and
    /// buffer's name, shape and dtype; any difference fails on every rank with an error naming the first rank and
    /// tensor that differ. Then rank 0's parameters and buffers are broadcast, so replicas start identical.
    pub fn new(model: Box<dyn Model>, comm: Box<dyn Collective>, options: DdpOptions) -> Result<Self> {
        options.validate()?;
        if model.compiled_step().is_some() && options.precision != Precision::Fp32 {
            return Err(TrainError::option(
                "--precision",
                format!(
                    "is {:?}, but {} is an exported model whose step is compiled in float32; train it with \
                     --precision fp32",
                    options.precision,
                    model.name()
                ),
            ));
        }
        let params = model.named_parameters();
        let buffers = model.named_buffers();
        let mut ddp = Ddp {
            model,
            comm,
            params,
            buffers,
            buckets: Vec::new(),
            options,
            micro_step: 0,
            stats: DdpStats::default(),
            scratch: Vec::new(),
            overlap: None,
            device_comm: None,
            scaler: None,
            overflowed: false,
            grads_are_views: false,
            reached: Vec::new(),
            shard: ShardMode::None,
        };
        if ddp.options.precision == Precision::Fp16 {
            ddp.scaler = Some(GradScaler::from_state(GradScalerState {
                scale: ddp.options.init_loss_scale as f32,
                ..Default::default()
            }));
        }
        ddp.verify_same_model()?;
        for (name, p) in &ddp.params {
            if !reducible(p.kind()) {
                return Err(TrainError::ModelConfig {
                    model: ddp.model.name().to_string(),
                    detail: format!(
                        "parameter {name} has dtype {:?}; gradient buckets hold float32, float64 or bfloat16",
                        p.kind()
                    ),
                });
            }
        }
        let mut all: Vec<(String, Tensor)> = ddp.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        all.extend(ddp.buffers.iter().map(|(n, t)| (n.clone(), t.shallow_clone())));
        ddp.broadcast_tensors(&all, "parameter and buffer broadcast from rank 0")?;
        // The broadcast's staging buffer held the largest chunk of the model (a whole layer when one outgrows the
        // bucket cap); later broadcasts (BatchNorm buffers) need a fraction of it.
        ddp.scratch = Vec::new();
        let sizes: Vec<(usize, Kind)> = ddp.params.iter().map(|(_, p)| (p.numel(), p.kind())).collect();
        let to_bytes = |mb: f64| ((mb * MB as f64) as usize).max(1);
        // ZeRO-2 gives each parameter of a bucket's size or more a bucket of its own (reduced in place).
        let alone = ddp.world_size() > 1 && ddp.options.shard == ShardMode::Gradients;
        // ZeRO-2's buckets allocate their gradient buffer only while reducing: none is allocated up front.
        ddp.buckets =
            assign_buckets(&sizes, to_bytes(ddp.options.first_bucket_mb), to_bytes(ddp.options.bucket_mb), alone)
                .into_iter()
                .map(|members| match alone {
                    true => Bucket::unallocated(members, &ddp.params),
                    false => Bucket::new(members, &ddp.params),
                })
                .collect::<Result<_, _>>()
                .map_err(|e| TrainError::torch("allocating gradient buckets", e))?;
        // Alone there is nothing to shard: the engine runs as DDP does.
        if ddp.world_size() > 1 && ddp.options.shard != ShardMode::None {
            ddp.shard_buckets()?;
        }
        let on_cpu = ddp.params.iter().all(|(_, p)| p.device() == Device::Cpu);
        // Buckets are in host memory here; a model on a GPU gets its gradient views once they move there. Alone,
        // nothing is reduced: gradients stay libtorch's own, and one no backward reaches stays undefined.
        if on_cpu && ddp.world_size() > 1 {
            ddp.view_gradients()?;
        }
        // A compiled step returns every gradient at once at its end: there is no backward to overlap with.
        let autograd = ddp.model.compiled_step().is_none();
        if ddp.options.overlap && ddp.world_size() > 1 && on_cpu && autograd {
            ddp.overlap = Some(ddp.hooks(None)?);
        }
        tracing::debug!(
            rank = ddp.rank(),
            overlap = ddp.overlap.is_some(),
            buckets = ddp.buckets.len(),
            bytes = ddp.buckets.iter().map(Bucket::bytes).sum::<usize>(),
            "gradient buckets ready"
        );
        Ok(ddp)
    }

    /// Makes every bucket sharded (see [`ShardMode`]): the parameters become views of flat per-bucket buffers.
    fn shard_buckets(&mut self) -> Result<()> {
        let mode = self.options.shard;
        let (rank, world) = (self.rank(), self.world_size());
        for (i, bucket) in self.buckets.iter_mut().enumerate() {
            bucket
                .shard(&self.params, rank, world, mode == ShardMode::Gradients)
                .map_err(|e| TrainError::torch(format!("sharding gradient bucket {i} (--shard {mode})"), e))?;
        }
        self.shard = mode;
        Ok(())
    }

    /// Gradient hooks on every parameter for overlapped allreduces (see [`crate::overlap`]).
    fn hooks(&self, side: Option<hytrain_cuda::SideStream>) -> Result<Overlap> {
        // ZeRO-2 keeps gradient memory to about one bucket: backward waits until the buckets it launched are
        // reduced and released (see `Overlap::new`). Otherwise backward runs ahead, as PyTorch DDP's does.
        let in_flight = (self.shard == ShardMode::Gradients).then_some(ZERO2_BUCKETS_IN_FLIGHT);
        Overlap::new(&self.params, &self.buckets, side, in_flight).map_err(|detail| TrainError::ModelConfig {
            model: self.model.name().to_string(),
            detail: format!("{detail}; run with --overlap false to average gradients after backward instead"),
        })
    }

    /// Averages gradients and broadcasts rank 0's buffers before training forwards with `device_comm` (NCCL) in
    /// GPU memory instead of through the host collective, which keeps the metrics, checks and the start-up and
    /// checkpoint broadcasts. The model must already be on the collective's GPU; the gradient buckets move there.
    /// With [`DdpOptions::overlap`], more than one rank and a `side` stream on that GPU, each bucket is packed,
    /// allreduced and unpacked on the side stream while backward still computes; without them, after backward.
    /// A job of one rank calls no collective in a step.
    pub fn with_device_collective(
        mut self,
        device_comm: Box<dyn hytrain_cuda::DeviceCollective>,
        side: Option<hytrain_cuda::SideStream>,
    ) -> Result<Self> {
        if device_comm.rank() != self.rank() || device_comm.world_size() != self.world_size() {
            return Err(TrainError::option(
                "device collective",
                format!(
                    "is rank {} of {} but the job is rank {} of {}",
                    device_comm.rank(),
                    device_comm.world_size(),
                    self.rank(),
                    self.world_size()
                ),
            ));
        }
        if self.shard == ShardMode::Gradients {
            return Err(TrainError::option(
                "--shard",
                "is gradients, which is not implemented with a device collective yet (the gradient buffers it \
                 frees are used on the overlap's side stream); use --shard optimizer on GPUs",
            ));
        }
        let device = crate::model::device_of(self.model.as_ref());
        if device == tch::Device::Cpu && !device_comm.host_memory() {
            return Err(TrainError::option(
                "device collective",
                format!("{} (NCCL) needs the model on a GPU, but it is on the CPU", device_comm.backend()),
            ));
        }
        for (i, bucket) in self.buckets.iter_mut().enumerate() {
            bucket
                .to_device(device)
                .map_err(|e| TrainError::torch(format!("moving gradient bucket {i} to {device:?}"), e))?;
        }
        if self.world_size() > 1 {
            self.view_gradients()?;
        }
        // The model is on a GPU, so `new` installed no hooks; these reduce through the device collective.
        self.overlap = match side {
            Some(side) if self.options.overlap && self.world_size() > 1 && self.model.compiled_step().is_none() => {
                Some(self.hooks(Some(side))?)
            }
            _ => None,
        };
        tracing::info!(
            rank = self.rank(),
            backend = device_comm.backend(),
            overlap = self.overlap.is_some(),
            "gradients are averaged in GPU memory"
        );
        self.device_comm = Some(device_comm);
        Ok(self)
    }

    /// Wraps `model` for training in this process alone (world size 1, no communication), with the same API.
    pub fn single(model: Box<dyn Model>, options: DdpOptions) -> Result<Self> {
        Ddp::new(model, Box::new(SingleProcess), options)
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// The wrapped model.
    pub fn model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    /// The collective, for reductions the training loop needs (metrics, evaluation counts).
    pub fn collective(&mut self) -> &mut dyn Collective {
        self.comm.as_mut()
    }

    /// The options in force.
    pub fn options(&self) -> &DdpOptions {
        &self.options
    }

    /// The model's trainable parameters, in definition order.
    pub fn parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Communication time and volume so far.
    pub fn stats(&self) -> &DdpStats {
        &self.stats
    }

    /// The gradient buckets in launch order.
    pub fn bucket_layout(&self) -> Vec<BucketLayout> {
        self.buckets
            .iter()
            .map(|b| BucketLayout {
                params: b.members().iter().map(|&m| self.params[m].0.clone()).collect(),
                bytes: b.bytes(),
            })
            .collect()
    }

    /// Gives back the model and the collective.
    pub fn into_parts(self) -> (Box<dyn Model>, Box<dyn Collective>) {
        (self.model, self.comm)
    }

    /// Rank 0's buffers before a training forward, as PyTorch DDP's `broadcast_buffers` does before every one.
    fn sync_buffers_before_training(&mut self) -> Result<()> {
        if self.options.broadcast_buffers {
            self.sync_buffers()?;
        }
        Ok(())
    }

    /// The model's forward pass; in training, rank 0's buffers are broadcast first (see [`DdpOptions`]).
    pub fn forward_t(&mut self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            self.sync_buffers_before_training()?;
        }
        let moved = self.on_model_device(xs)?;
        let xs = moved.as_ref().unwrap_or(xs);
        self.model.forward_t(xs, train).map_err(|e| {
            TrainError::torch(format!("{} forward on a batch of shape {:?}", self.model.name(), xs.size()), e)
        })
    }

    /// `t` moved to the model's device, or `None` when it is there already: batches arrive in host memory, and a
    /// model on a GPU takes them there through pinned memory without the host waiting (the training loop moves
    /// them one step ahead itself, see [`crate::batches::one_ahead`]).
    fn on_model_device(&self, t: &Tensor) -> Result<Option<Tensor>> {
        let device = self.params.first().map_or(tch::Device::Cpu, |(_, p)| p.device());
        if t.device() == device {
            return Ok(None);
        }
        crate::batches::host_to_device(t, device)
            .map(Some)
            .map_err(|e| TrainError::torch(format!("moving a batch to {device:?}"), e))
    }

    /// Backpropagates `loss` of one micro-batch, scaled by `1/grad_accum`. Gradients accumulate locally; after the
    /// `grad_accum`-th call they are averaged over ranks and `true` is returned: time for the optimizer step. With
    /// [`DdpOptions::overlap`] that last backward pass allreduces each bucket as soon as its gradients are ready.
    ///
    /// With fp16 the loss is also multiplied by the loss scale, and the averaged gradients are divided by it again
    /// before this returns `true`; then [`Ddp::overflowed`] tells whether they held an inf or NaN, in which case
    /// the optimizer step must be skipped ([`Ddp::train_step`] does so). The check runs on the averaged gradients,
    /// which are the same on every rank, so every rank decides alike.
    ///
    /// Sharded ([`ShardMode`]), only this rank's blocks are averaged afterwards, and the step that follows must
    /// allgather the parameters: drive a sharded engine with [`Ddp::train_step`].
    pub fn backward(&mut self, loss: &Tensor) -> Result<bool> {
        let k = self.options.grad_accum;
        let scaled = if k > 1 { loss.f_div_scalar(k as f64) } else { Ok(loss.shallow_clone()) };
        let mut scaled = scaled.map_err(|e| TrainError::torch("backward", e))?;
        if let Some(scaler) = &self.scaler {
            scaled = scaler.scale_loss(&scaled)?;
        }
        self.note_reached(&scaled)?;
        self.micro_step += 1;
        if self.micro_step < k || self.overlap.is_none() {
            scaled.f_backward().map_err(|e| TrainError::torch("backward", e))?;
            if self.micro_step < k {
                return Ok(false);
            }
            self.micro_step = 0;
            self.check_reached()?;
            self.sync_gradients()?;
        } else {
            self.micro_step = 0;
            self.backward_overlapped(&scaled)?;
            self.check_reached()?;
        }
        self.unscale_gradients()?;
        Ok(true)
    }

    /// fp16: divides the averaged gradients by the loss scale, notes whether they overflowed and updates the scale
    /// (updating before the optimizer step, not after as PyTorch's loop does, changes nothing: the step does not
    /// read the scale).
    fn unscale_gradients(&mut self) -> Result<()> {
        let Some(scaler) = &self.scaler else {
            return Ok(());
        };
        // Sharded, a rank holds (and its optimizer reads) only its blocks of the averaged gradients.
        let sharded = self.shard != ShardMode::None;
        let grads: Vec<Tensor> = match sharded {
            true => self.shard_gradients()?,
            false => self.params.iter().map(|(_, p)| p.grad()).collect(),
        };
        let mut overflowed = scaler.unscale(&grads)?;
        if sharded {
            overflowed = self.overflowed_on_any_rank(overflowed)?;
        }
        self.overflowed = overflowed;
        let scaler = self.scaler.as_mut().expect("checked above");
        scaler.update(overflowed);
        if overflowed {
            tracing::debug!(rank = self.comm.rank(), scale = scaler.scale(), "fp16 gradients overflowed: step skipped");
        }
        Ok(())
    }

    /// Whether the gradients of the last synchronising [`Ddp::backward`] held an inf or NaN under fp16 loss
    /// scaling, so that the optimizer step must be skipped. Always `false` for fp32 and bf16.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// The fp16 loss scaler (`None` for fp32 and bf16).
    pub fn grad_scaler(&self) -> Option<&GradScaler> {
        self.scaler.as_ref()
    }

    /// The fp16 loss scaler, to restore its state from a checkpoint (`None` for fp32 and bf16).
    pub fn grad_scaler_mut(&mut self) -> Option<&mut GradScaler> {
        self.scaler.as_mut()
    }

    /// Autocast for this engine's precision on the model's device until the guard drops (`None` for fp32); the
    /// forward pass and loss go inside it, backward outside.
    pub fn autocast(&self) -> Result<Option<Autocast>> {
        let device = self.params.first().map_or(Device::Cpu, |(_, p)| p.device());
        self.options.precision.autocast(device)
    }

    /// The last micro-batch's backward with each bucket allreduced as soon as its gradients are final; see
    /// [`crate::overlap`]. Same buckets in the same order as [`Ddp::sync_gradients`], so the same result.
    fn backward_overlapped(&mut self, loss: &Tensor) -> Result<()> {
        self.stats.syncs += 1;
        let overlap = self.overlap.as_ref().expect("called with overlap on");
        let mut backward_done = None;
        let reducer = match self.device_comm.as_mut() {
            Some(device_comm) => Reducer::Device(device_comm.as_mut()),
            None => Reducer::Host(self.comm.as_mut()),
        };
        let round = overlap.run(reducer, &mut self.buckets, &mut self.params, || {
            let result = loss.f_backward();
            backward_done = Some(Instant::now());
            result
        });
        let exposed = backward_done.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let reduced = round.map_err(|e| TrainError::torch("backward", e))?.map_err(|e| self.round_error(e))?;
        self.stats.allreduce_secs += exposed;
        self.stats.allreduce_busy_secs += reduced.busy_secs;
        self.stats.allreduce_bytes += reduced.bytes;
        self.stats.buckets_launched_in_backward += reduced.launched_in_backward;
        Ok(())
    }

    /// The engine's error for a failed overlapped round, naming the bucket or the stream ordering that failed.
    fn round_error(&self, e: RoundError) -> TrainError {
        match e {
            RoundError::MissingGradient(name) => TrainError::MissingGradient(name),
            RoundError::Torch(b, e) => TrainError::torch(format!("gradient bucket {b}"), e),
            RoundError::Comm(b, e) => comm_err(allreduce_of(b, self.buckets[b].bytes()))(e),
            RoundError::Device(b, source) => {
                TrainError::DeviceComm { during: allreduce_of(b, self.buckets[b].bytes()), source }
            }
            RoundError::Stream(what, source) => TrainError::DeviceComm {
                during: format!("overlapping gradient allreduces with backward: {what}"),
                source,
            },
        }
    }

    /// Averages every parameter's gradient over all ranks, one allreduce per bucket, in bucket order. Sharded, one
    /// reduce-scatter per bucket instead: this rank's block of each bucket is averaged (see [`ShardMode`]).
    pub fn sync_gradients(&mut self) -> Result<()> {
        self.stats.syncs += 1;
        if self.world_size() == 1 {
            return Ok(());
        }
        let started = Instant::now();
        for (i, bucket) in self.buckets.iter_mut().enumerate() {
            let torch = |e| TrainError::torch(format!("gradient bucket {i}"), e);
            if let Err(name) = bucket.pack(&self.params).map_err(torch)? {
                return Err(TrainError::MissingGradient(name));
            }
            let bytes = bucket.bytes();
            let during = || allreduce_of(i, bytes);
            match self.device_comm.as_mut() {
                Some(device_comm) => bucket
                    .reduce_on_device(device_comm.as_mut())
                    .map_err(|source| TrainError::DeviceComm { during: during(), source })?,
                None => bucket.reduce(self.comm.as_mut()).map_err(comm_err(during()))?,
            }
            bucket.finish(&self.params).map_err(torch)?;
            self.stats.allreduce_bytes += bucket.bytes() as u64;
        }
        let secs = started.elapsed().as_secs_f64();
        self.stats.allreduce_secs += secs;
        self.stats.allreduce_busy_secs += secs;
        Ok(())
    }

    /// Scales gradients so their global L2 norm is at most `max_norm`, as `torch.nn.utils.clip_grad_norm_` does
    /// with `foreach`: one `_foreach_norm` per dtype, the norm of their stack, and every gradient multiplied by
    /// `min(1, max_norm / (norm + 1e-6))` on the device, so nothing is read back. Returns the norm before clipping
    /// (0-dim, on the gradients' device). Call after [`Ddp::sync_gradients`], so every rank clips alike.
    ///
    /// Sharded, the norm is that of all ranks' averaged blocks (one allreduce) and only this rank's blocks are
    /// scaled: call it on every rank.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<Tensor> {
        if self.shard != ShardMode::None {
            return self.clip_shards(max_norm);
        }
        let grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).collect();
        crate::coalesced::clip_grad_norm(&grads, max_norm).map_err(|e| TrainError::torch("gradient clipping", e))
    }

    /// Makes every parameter's gradient a view of its place in its bucket (see [`crate::Bucket::view_gradients`]).
    fn view_gradients(&mut self) -> Result<()> {
        for (i, bucket) in self.buckets.iter().enumerate() {
            bucket
                .view_gradients(&self.params)
                .map_err(|e| TrainError::torch(format!("making gradients views of bucket {i}"), e))?;
        }
        self.grads_are_views = true;
        self.reached = vec![0; self.params.len()];
        Ok(())
    }

    /// Notes which parameters `loss`'s graph reaches, before its backward frees the graph. Gradients that are
    /// views are always defined, so this is how a parameter that never got a gradient is still found and named.
    fn note_reached(&mut self, loss: &Tensor) -> Result<()> {
        if !self.grads_are_views || !loss.requires_grad() || self.reached.iter().all(|&r| r != 0) {
            return Ok(());
        }
        let handles: Vec<*mut std::ffi::c_void> = self.params.iter().map(|(_, p)| crate::shim::handle(p)).collect();
        crate::shim::params_reached(loss, &handles, &mut self.reached)
            .map_err(|e| TrainError::torch("finding the parameters backward reaches", e))
    }

    /// At a synchronisation: an error naming the first parameter no backward has reached since the engine
    /// started (a later step may leave a parameter out: its gradient is then zero, as before gradients were views).
    fn check_reached(&self) -> Result<()> {
        match self.reached.iter().position(|&r| r == 0) {
            Some(i) if self.grads_are_views => Err(TrainError::MissingGradient(self.params[i].0.clone())),
            _ => Ok(()),
        }
    }

    /// Zeroes every parameter's gradient in place (the gradients are views of the buckets, which tch's
    /// `zero_grad`, detaching in place, refuses), as torch.optim's `zero_grad(set_to_none=False)` does.
    pub fn zero_grad(&mut self) {
        for (_, p) in &self.params {
            let grad = p.grad();
            if grad.defined() {
                let _ = tch::no_grad(|| grad.shallow_clone().f_zero_());
            }
        }
    }

    /// One optimizer step over `micro_batches` (`grad_accum` pairs of inputs and integer class targets) with
    /// cross-entropy loss: forward and backward each micro-batch, average gradients once after the last, clip if
    /// configured, update with learning rate `lr`, and clear the gradients.
    pub fn train_step(
        &mut self,
        micro_batches: &[(Tensor, Tensor)],
        optimizer: &mut dyn Optimizer,
        lr: f64,
    ) -> Result<StepOutput> {
        if micro_batches.len() != self.options.grad_accum {
            return Err(TrainError::option(
                "--grad-accum",
                format!("is {}, but the step got {} micro-batches", self.options.grad_accum, micro_batches.len()),
            ));
        }
        if self.micro_step != 0 {
            return Err(TrainError::option(
                "train_step",
                format!("called after {} unsynchronised backward() calls; finish that step first", self.micro_step),
            ));
        }
        self.check_optimizer(optimizer)?;
        if self.model.compiled_step().is_some() {
            return self.compiled_train_step(micro_batches, optimizer, lr);
        }
        self.zero_grad();
        let mut losses = Vec::with_capacity(micro_batches.len());
        let mut samples = 0;
        let mut synced = false;
        for (xs, ys) in micro_batches {
            let loss = {
                let _autocast = self.autocast()?;
                let logits = self.forward_t(xs, true)?;
                let moved = self.on_model_device(ys)?;
                cross_entropy(&logits, moved.as_ref().unwrap_or(ys))?
            };
            losses.push(loss.detach());
            samples += xs.size().first().copied().unwrap_or(0) as usize;
            synced = self.backward(&loss)?;
        }
        debug_assert!(synced, "the last micro-batch synchronises");
        let loss = mean_loss(&losses)?;
        if self.overflowed {
            self.zero_grad();
            return Ok(StepOutput { loss, grad_norm: None, samples, skipped: true });
        }
        self.finish_step(optimizer, lr, loss, samples)
    }

    /// Clips the averaged gradients if configured (after unscaling, so clipping sees the true gradients), steps the
    /// optimizer and clears the gradients.
    fn finish_step(
        &mut self,
        optimizer: &mut dyn Optimizer,
        lr: f64,
        loss: Tensor,
        samples: usize,
    ) -> Result<StepOutput> {
        let grad_norm = match self.options.max_grad_norm {
            Some(max) => Some(self.clip_grad_norm(max)?),
            None => None,
        };
        optimizer.step(lr)?;
        if self.shard != ShardMode::None {
            self.gather_parameters()?;
        }
        self.zero_grad();
        Ok(StepOutput { loss, grad_norm, samples, skipped: false })
    }

    /// [`Ddp::train_step`] for a model with a compiled step ([`crate::model::CompiledStep`]): each micro-batch's
    /// loss and gradients come from one call (rank 0's buffers broadcast before it, as before a forward pass), the
    /// gradients scaled by `1/grad_accum` become or add to the parameters' `.grad`, and after the last the buckets
    /// are averaged as for any model.
    fn compiled_train_step(
        &mut self,
        micro_batches: &[(Tensor, Tensor)],
        optimizer: &mut dyn Optimizer,
        lr: f64,
    ) -> Result<StepOutput> {
        let k = micro_batches.len();
        let (mut losses, mut samples) = (Vec::with_capacity(k), 0);
        for (i, (xs, ys)) in micro_batches.iter().enumerate() {
            self.sync_buffers_before_training()?;
            let (moved_xs, moved_ys) = (self.on_model_device(xs)?, self.on_model_device(ys)?);
            let (xs, ys) = (moved_xs.as_ref().unwrap_or(xs), moved_ys.as_ref().unwrap_or(ys));
            let step = self.model.compiled_step().expect("called for a compiled model");
            let (loss, grads) = step.loss_and_grads(xs, ys)?;
            losses.push(loss.detach());
            samples += xs.size().first().copied().unwrap_or(0) as usize;
            for ((name, p), mut g) in self.params.iter().zip(grads) {
                let torch = |e| TrainError::torch(format!("gradient of {name}"), e);
                if k > 1 {
                    let _ = g.f_mul_scalar_(1.0 / k as f64).map_err(torch)?;
                }
                let current = p.grad();
                if i == 0 && current.defined() {
                    // Into the gradient's own memory, a view of its bucket.
                    tch::no_grad(|| current.shallow_clone().f_copy_(&g)).map_err(torch)?;
                } else if i == 0 {
                    crate::shim::set_grad(p, &g).map_err(torch)?;
                } else {
                    let _ = p.grad().f_add_(&g).map_err(torch)?;
                }
            }
        }
        self.sync_gradients()?;
        let loss = mean_loss(&losses)?;
        self.finish_step(optimizer, lr, loss, samples)
    }

    /// Sums (or averages) `values` over all ranks in place, as f64; for metrics and evaluation counts.
    pub fn allreduce_f64(&mut self, values: &mut [f64], op: ReduceOp) -> Result<()> {
        if self.world_size() == 1 || values.is_empty() {
            return Ok(());
        }
        self.comm.allreduce(Buffer::F64(values), op).map_err(comm_err("metric allreduce"))
    }
}

/// The mean of the micro-batches' 0-dim losses, in float64 (as the loop summed them on the host before), computed
/// where they are.
fn mean_loss(losses: &[Tensor]) -> Result<Tensor> {
    let torch = |e| TrainError::torch("averaging the micro-batch losses", e);
    let sum = Tensor::f_stack(losses, 0).and_then(|l| l.f_sum(Kind::Double)).map_err(torch)?;
    sum.f_div_scalar(losses.len() as f64).map_err(torch)
}

/// Mean cross-entropy of `logits` `[N, classes]` against integer class `targets` `[N]`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let context = || format!("cross-entropy of logits {:?} against targets {:?}", logits.size(), targets.size());
    targets
        .f_to_kind(Kind::Int64)
        .and_then(|t| t.f_to_device(logits.device()))
        .and_then(|t| logits.f_cross_entropy_loss::<Tensor>(&t, None, Reduction::Mean, -100, 0.0))
        .map_err(|e| TrainError::torch(context(), e))
}

/// The group of one process: every collective is the identity.
struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn allreduce(&mut self, _buf: Buffer<'_>, _op: ReduceOp) -> Result<(), crate::CommError> {
        Ok(())
    }
    fn broadcast(&mut self, _bytes: &mut [u8], _root: usize) -> Result<(), crate::CommError> {
        Ok(())
    }
    fn allgather(&mut self, input: &[u8], output: &mut [u8]) -> Result<(), crate::CommError> {
        output.copy_from_slice(input);
        Ok(())
    }
    fn barrier(&mut self) -> Result<(), crate::CommError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hytrain_cuda::CudaError;

    use super::*;

    /// Rank 0 of two whose other rank is its mirror image: every collective leaves the data as it is.
    struct Mirror;

    impl Collective for Mirror {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn backend(&self) -> &'static str {
            "mirror"
        }
        fn allreduce(&mut self, _buf: Buffer<'_>, _op: ReduceOp) -> Result<(), crate::CommError> {
            Ok(())
        }
        fn broadcast(&mut self, _bytes: &mut [u8], _root: usize) -> Result<(), crate::CommError> {
            Ok(())
        }
        fn allgather(&mut self, input: &[u8], output: &mut [u8]) -> Result<(), crate::CommError> {
            output.chunks_mut(input.len()).for_each(|c| c.copy_from_slice(input));
            Ok(())
        }
        fn barrier(&mut self) -> Result<(), crate::CommError> {
            Ok(())
        }
    }

    #[test]
    fn gradients_stay_views_of_their_buckets_through_steps() {
        let model = crate::model::build("mlp:8", 3, &[4], Device::Cpu).unwrap();
        let options = DdpOptions { grad_accum: 2, max_grad_norm: Some(1.0), ..Default::default() };
        let mut ddp = Ddp::new(model, Box::new(Mirror), options).unwrap();
        let mut opt = crate::OptimizerConfig::Sgd(crate::SgdConfig { momentum: 0.9, ..Default::default() })
            .build(ddp.parameters())
            .unwrap();
        // No draw from libtorch's generator for the data: other tests on parallel threads rely on it.
        let batch = || {
            let xs = (Tensor::arange(20, (Kind::Float, Device::Cpu)) * 0.37).sin().reshape([5, 4]);
            (xs, Tensor::from_slice(&[0i64, 1, 2, 1, 0]))
        };
        for _ in 0..3 {
            ddp.train_step(&[batch(), batch()], opt.as_mut(), 0.1).unwrap();
            for (i, (name, p)) in ddp.params.iter().enumerate() {
                let grad = p.grad();
                assert!(ddp.buckets.iter().any(|b| b.holds_gradient(i, &grad)), "{name}'s gradient left its bucket");
            }
        }
        // Alone there is nothing to reduce, and gradients stay libtorch's own.
        let model = crate::model::build("mlp:8", 3, &[4], Device::Cpu).unwrap();
        let mut ddp = Ddp::single(model, DdpOptions::default()).unwrap();
        let mut opt = crate::OptimizerConfig::Sgd(crate::SgdConfig::default()).build(ddp.parameters()).unwrap();
        ddp.train_step(&[batch()], opt.as_mut(), 0.1).unwrap();
        let grad = ddp.params[0].1.grad();
        assert!(grad.defined() && !ddp.buckets.iter().any(|b| b.holds_gradient(0, &grad)));
    }

    /// The GPU overlap's failures cannot happen without a GPU; what they say can be checked.
    #[test]
    fn a_failed_gpu_round_names_the_bucket_or_the_stream_ordering() {
        let model = crate::model::build("mlp:8", 3, &[4], Device::Cpu).unwrap();
        let ddp = Ddp::single(model, DdpOptions::default()).unwrap();
        let launch_failed = CudaError::Driver {
            call: "cuEventRecord",
            code_name: "CUDA_ERROR_LAUNCH_FAILED".into(),
            message: "unspecified launch failure".into(),
        };
        let e = ddp.round_error(RoundError::Stream("waiting for the compute stream", launch_failed));
        assert_eq!(
            e.to_string(),
            "overlapping gradient allreduces with backward: waiting for the compute stream failed: cuEventRecord \
             failed: CUDA_ERROR_LAUNCH_FAILED (unspecified launch failure)"
        );
        let late =
            CudaError::CollectiveTimeout { rank: 0, op: "allreduce (avg)".into(), timeout: Duration::from_secs(5) };
        let e = ddp.round_error(RoundError::Device(0, late));
        let bytes = ddp.buckets[0].bytes();
        assert!(matches!(e, TrainError::DeviceComm { .. }), "{e}");
        assert!(e.to_string().starts_with(&format!("gradient allreduce of bucket 0 ({bytes} bytes) failed: ")), "{e}");
    }
}
