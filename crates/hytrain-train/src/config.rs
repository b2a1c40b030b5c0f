//! The training run's knobs ([`TrainConfig`]) and how they are layered from the places a job can set them.
//!
//! Precedence, highest first: command line > `HYTRAIN_*` environment > SageMaker hyperparameters
//! (`hyperparameters.json`, then `SM_HP_*`) > defaults. [`layer`] applies the sources from lowest to highest, so a
//! higher one overwrites, and records where each value came from. This crate reads neither the environment nor
//! SageMaker's files: the caller (the `hytrain` binary with hytrain-cluster) hands them in as maps.
//!
//! Keys are accepted in the reference script's spelling (`batch-size`) and in snake case (`batch_size`), with or
//! without leading `--`. Values may be JSON-encoded strings (`"\"64\""`), as SageMaker's SDK writes them.

use std::collections::BTreeMap;

use crate::optim::{AdamWConfig, OptimizerConfig, SgdConfig};
use crate::precision::Precision;
use crate::schedule::Schedule;
use crate::{DdpOptions, Result, ShardMode, TrainError};

/// Which optimizer a run uses (`--optimizer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD with `momentum`, `nesterov` and `weight_decay` (the reference script's optimizer).
    Sgd,
    /// AdamW with decoupled `weight_decay`.
    Adamw,
}

/// Every knob of a training run. Defaults are the reference script's (batch 64, test batch 1000, 10 epochs,
/// lr 0.01, momentum 0.5, seed 1, log interval 10).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the training data (ignored when `max_steps` is set).
    pub epochs: u64,
    /// Stop after this many optimizer steps instead of after `epochs`.
    pub max_steps: Option<u64>,
    /// Samples per micro-batch on each rank (`--batch-size`).
    pub batch_size: usize,
    /// Samples per evaluation batch on each rank (`--test-batch-size`).
    pub test_batch_size: usize,
    /// Base learning rate; the schedule multiplies it.
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Weight decay (L2 for SGD, decoupled for AdamW).
    pub weight_decay: f64,
    /// Nesterov momentum for SGD.
    pub nesterov: bool,
    /// `sgd` or `adamw`.
    pub optimizer: OptimizerKind,
    /// Learning-rate schedule: `constant`, `cosine` (over the whole run), `cosine:<total>[:<warmup>[:<min>]]`,
    /// `step:<every>:<gamma>[:<warmup>]` or `warmup:<steps>`; see [`TrainConfig::schedule_for`].
    pub schedule: String,
    /// Warmup steps added to a schedule that states none.
    pub warmup: u64,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Clip gradients to this global norm.
    pub max_grad_norm: Option<f64>,
    /// Gradient bucket cap in MiB.
    pub bucket_mb: f64,
    /// Overlap each bucket's allreduce with the rest of backward.
    pub overlap: bool,
    /// Arithmetic of the forward pass: `fp32`, `bf16` (autocast) or `fp16` (autocast and loss scaling).
    pub precision: Precision,
    /// The fp16 loss scale to start from.
    pub init_loss_scale: f64,
    /// What data parallelism shards across ranks: `none` (DDP), `optimizer` (ZeRO-1) or `gradients` (ZeRO-2).
    pub shard: ShardMode,
    /// Seed of weights and data order.
    pub seed: u64,
    /// Optimizer steps between metrics lines.
    pub log_interval: u64,
    /// Optimizer steps between checkpoints (besides the one at each epoch end).
    pub checkpoint_every: Option<u64>,
    /// Checkpoints kept.
    pub keep: usize,
    /// Start fresh even when the checkpoint directory holds a valid checkpoint.
    pub no_resume: bool,
    /// Resume a mid-epoch checkpoint of another job shape (world size, batch size, grad-accum, seed) whose sample
    /// position cannot be mapped onto this one by starting its epoch over; without it such a resume is refused.
    pub restart_epoch_on_change: bool,
    /// Evaluate on the validation data at the end of every epoch (else only at the end of the run).
    pub eval_every_epoch: bool,
    /// Collective backend named by the job, one of [`BACKENDS`] (`gloo` in the reference); the binary checks it
    /// against the job's device and build.
    pub backend: String,
}

/// The `--backend` values accepted: torch.distributed's names (`tcp` is hytrain's own for its ring).
pub const BACKENDS: [&str; 4] = ["gloo", "tcp", "nccl", "mpi"];

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            max_steps: None,
            batch_size: 64,
            test_batch_size: 1000,
            lr: 0.01,
            momentum: 0.5,
            weight_decay: 0.0,
            nesterov: false,
            optimizer: OptimizerKind::Sgd,
            schedule: "constant".into(),
            warmup: 0,
            grad_accum: 1,
            max_grad_norm: None,
            bucket_mb: 25.0,
            overlap: true,
            precision: Precision::Fp32,
            init_loss_scale: DdpOptions::default().init_loss_scale,
            shard: ShardMode::None,
            seed: 1,
            log_interval: 10,
            checkpoint_every: None,
            keep: 3,
            no_resume: false,
            restart_epoch_on_change: false,
            eval_every_epoch: true,
            backend: "gloo".into(),
        }
    }
}

/// The configuration keys, in snake case.
pub const KEYS: &[&str] = &[
    "epochs",
    "max_steps",
    "batch_size",
    "test_batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "nesterov",
    "optimizer",
    "schedule",
    "warmup",
    "grad_accum",
    "max_grad_norm",
    "bucket_mb",
    "overlap",
    "precision",
    "init_loss_scale",
    "shard",
    "seed",
    "log_interval",
    "checkpoint_every",
    "keep",
    "no_resume",
    "restart_epoch_on_change",
    "eval_every_epoch",
    "backend",
];

/// One line of help for a configuration key (for `--help`).
pub fn help(key: &str) -> &'static str {
    match canonical_key(key).as_str() {
        "epochs" => "Passes over the training data [default: 10]",
        "max_steps" => "Stop after this many optimizer steps instead of after --epochs",
        "batch_size" => "Samples per micro-batch on each rank [default: 64]",
        "test_batch_size" => "Samples per validation batch on each rank [default: 1000]",
        "lr" => "Base learning rate; the schedule scales it [default: 0.01]",
        "momentum" => "SGD momentum [default: 0.5]",
        "weight_decay" => "Weight decay: L2 for SGD, decoupled for AdamW [default: 0]",
        "nesterov" => "Nesterov momentum for SGD",
        "optimizer" => "sgd or adamw [default: sgd]",
        "schedule" => "constant, cosine, cosine:TOTAL[:WARMUP[:MIN]], step:EVERY:GAMMA[:WARMUP], warmup:STEPS",
        "warmup" => "Warmup steps added to a schedule that states none [default: 0]",
        "grad_accum" => "Micro-batches per optimizer step; gradients sync on the last only [default: 1]",
        "max_grad_norm" => "Clip gradients to this global norm",
        "bucket_mb" => "Gradient bucket size in MiB, one allreduce each [default: 25]",
        "overlap" => "Allreduce each bucket during backward as soon as its gradients are ready [default: true]",
        "precision" => {
            "fp32, bf16 (autocast, fp32 master weights) or fp16 (autocast and dynamic loss scaling) [default: fp32]"
        }
        "init_loss_scale" => "fp16 only: the loss scale to start from, as GradScaler's init_scale [default: 65536]",
        "shard" => {
            "none (DDP), optimizer (ZeRO-1: each rank keeps 1/N of the optimizer state) or gradients (ZeRO-2: and \
             frees each bucket's gradients once its slice is averaged) [default: none]"
        }
        "seed" => "Seed of the initial weights and of the data order [default: 1]",
        "log_interval" => "Optimizer steps between metrics lines [default: 10]",
        "checkpoint_every" => "Optimizer steps between checkpoints (one is also written at each epoch end)",
        "keep" => "Checkpoints kept [default: 3]",
        "no_resume" => "Start fresh even when the checkpoint folder holds a valid checkpoint",
        "restart_epoch_on_change" => {
            "Resume a mid-epoch checkpoint of another world size, global batch or seed by starting its epoch over \
             (else refused)"
        }
        "eval_every_epoch" => "Evaluate after every epoch, not only at the end [default: true]",
        "backend" => "Collective backend as torch.distributed names it: gloo or tcp (hytrain's ring and shared memory on the CPU, NCCL on GPUs), nccl (GPUs only), mpi (the MPI build under mpirun) [default: gloo]",
        _ => "",
    }
}

/// Whether a key is a switch that a bare flag turns on (`--no-resume`).
pub fn is_switch(key: &str) -> bool {
    matches!(canonical_key(key).as_str(), "nesterov" | "no_resume" | "restart_epoch_on_change" | "eval_every_epoch")
}

/// A key in snake case without leading dashes (`--batch-size` → `batch_size`), aliases resolved
/// (`clip_grad_norm` → `max_grad_norm`).
pub fn canonical_key(key: &str) -> String {
    let k = key.trim().trim_start_matches('-').to_ascii_lowercase().replace('-', "_");
    match k.as_str() {
        "clip_grad_norm" => "max_grad_norm".into(),
        _ => k,
    }
}

/// Whether `key` (any accepted spelling) names a [`TrainConfig`] field.
pub fn is_known_key(key: &str) -> bool {
    KEYS.contains(&canonical_key(key).as_str())
}

/// The value itself when `value` is a JSON string literal (SageMaker's SDK encodes hyperparameters so).
pub fn unquote(value: &str) -> String {
    let v = value.trim();
    if v.starts_with('"') {
        if let Ok(s) = serde_json::from_str::<String>(v) {
            return s.trim().to_string();
        }
    }
    v.to_string()
}

fn bad(key: &str, detail: String) -> TrainError {
    TrainError::option(key, detail)
}

fn parse_u64(key: &str, v: &str) -> Result<u64> {
    v.parse::<u64>().map_err(|_| bad(key, format!("must be a whole number >= 0, got '{v}'")))
}

fn parse_positive(key: &str, v: &str) -> Result<u64> {
    match parse_u64(key, v)? {
        0 => Err(bad(key, format!("must be at least 1, got '{v}'"))),
        n => Ok(n),
    }
}

fn parse_f64(key: &str, v: &str) -> Result<f64> {
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(bad(key, format!("must be a finite number >= 0, got '{v}'"))),
    }
}

/// `true`/`false` (also 1/0, yes/no, on/off) as a hyperparameter gives it; anything else is refused naming `key`.
pub fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(bad(key, format!("must be true or false, got '{v}'"))),
    }
}

/// `None` for `none`, `null` or an empty value.
fn optional<T>(v: &str, parse: impl FnOnce(&str) -> Result<T>) -> Result<Option<T>> {
    match v.to_ascii_lowercase().as_str() {
        "" | "none" | "null" => Ok(None),
        _ => parse(v).map(Some),
    }
}

impl TrainConfig {
    /// Sets one knob from text, as a flag, environment variable or hyperparameter gives it. `key` may be
    /// `batch-size`, `batch_size` or `--batch-size`; `value` may be JSON-encoded (`"\"64\""`). An unknown key or a
    /// value that does not parse is refused with a one-line error naming the key and what is accepted.
    pub fn apply_hyperparameter(&mut self, key: &str, value: &str) -> Result<()> {
        let k = canonical_key(key);
        let v = unquote(value);
        let key = key.trim().trim_start_matches('-');
        match k.as_str() {
            "epochs" => self.epochs = parse_u64(key, &v)?,
            "max_steps" => self.max_steps = optional(&v, |v| parse_positive(key, v))?,
            "batch_size" => self.batch_size = parse_positive(key, &v)? as usize,
            "test_batch_size" => self.test_batch_size = parse_positive(key, &v)? as usize,
            "lr" => self.lr = parse_f64(key, &v)?,
            "momentum" => self.momentum = parse_f64(key, &v)?,
            "weight_decay" => self.weight_decay = parse_f64(key, &v)?,
            "nesterov" => self.nesterov = parse_bool(key, &v)?,
            "optimizer" => {
                self.optimizer = match v.to_ascii_lowercase().as_str() {
                    "sgd" => OptimizerKind::Sgd,
                    "adamw" => OptimizerKind::Adamw,
                    _ => return Err(bad(key, format!("must be sgd or adamw, got '{v}'"))),
                }
            }
            "schedule" => {
                // Checked now so a typo fails at start-up, not after the first epoch.
                let probe = if v == "cosine" { "cosine:2".to_string() } else { v.clone() };
                Schedule::parse(&probe).map_err(|e| bad(key, e.to_string()))?;
                self.schedule = v;
            }
            "warmup" => self.warmup = parse_u64(key, &v)?,
            "grad_accum" => self.grad_accum = parse_positive(key, &v)? as usize,
            "max_grad_norm" => {
                self.max_grad_norm = optional(&v, |v| match parse_f64(key, v)? {
                    x if x > 0.0 => Ok(x),
                    _ => Err(bad(key, format!("must be a positive number, got '{v}'"))),
                })?
            }
            "bucket_mb" => match parse_f64(key, &v)? {
                x if x > 0.0 => self.bucket_mb = x,
                _ => return Err(bad(key, format!("must be a positive number of MiB, got '{v}'"))),
            },
            "overlap" => self.overlap = parse_bool(key, &v)?,
            "precision" => self.precision = v.parse().map_err(|detail: String| bad(key, detail))?,
            "init_loss_scale" => self.init_loss_scale = parse_f64(key, &v)?,
            "shard" => self.shard = v.parse().map_err(|detail: String| bad(key, detail))?,
            "seed" => self.seed = parse_u64(key, &v)?,
            "log_interval" => self.log_interval = parse_positive(key, &v)?,
            "checkpoint_every" => self.checkpoint_every = optional(&v, |v| parse_positive(key, v))?,
            "keep" => self.keep = parse_positive(key, &v)? as usize,
            "no_resume" => self.no_resume = parse_bool(key, &v)?,
            "restart_epoch_on_change" => self.restart_epoch_on_change = parse_bool(key, &v)?,
            "eval_every_epoch" => self.eval_every_epoch = parse_bool(key, &v)?,
            "backend" => {
                let backend = v.to_ascii_lowercase();
                if !BACKENDS.contains(&backend.as_str()) {
                    return Err(bad(key, format!("must be one of {}, got '{v}'", BACKENDS.join(", "))));
                }
                self.backend = backend;
            }
            _ => return Err(TrainError::UnknownOption { key: key.to_string(), known: KEYS.join(", ") }),
        }
        Ok(())
    }

    /// Refuses combinations no single value shows: nothing to train, or a zero-sized batch.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 && self.max_steps.is_none() {
            return Err(TrainError::option("epochs", "is 0 and max-steps is not set: nothing to train"));
        }
        if self.batch_size == 0 || self.test_batch_size == 0 || self.grad_accum == 0 || self.log_interval == 0 {
            return Err(TrainError::option("batch-size", "batch sizes, grad-accum and log-interval must be >= 1"));
        }
        if self.keep == 0 {
            return Err(TrainError::option("keep", "must keep at least 1 checkpoint"));
        }
        self.ddp_options().validate()
    }

    /// The optimizer these knobs describe.
    pub fn optimizer_config(&self) -> OptimizerConfig {
        match self.optimizer {
            OptimizerKind::Sgd => OptimizerConfig::Sgd(SgdConfig {
                momentum: self.momentum,
                nesterov: self.nesterov,
                weight_decay: self.weight_decay,
                ..Default::default()
            }),
            OptimizerKind::Adamw => {
                OptimizerConfig::AdamW(AdamWConfig { weight_decay: self.weight_decay, ..Default::default() })
            }
        }
    }

    /// The data-parallel options these knobs describe.
    pub fn ddp_options(&self) -> DdpOptions {
        DdpOptions {
            bucket_mb: self.bucket_mb,
            grad_accum: self.grad_accum,
            max_grad_norm: self.max_grad_norm,
            overlap: self.overlap,
            precision: self.precision,
            init_loss_scale: self.init_loss_scale,
            shard: self.shard,
            ..Default::default()
        }
    }

    /// Optimizer steps the run takes when each epoch has `steps_per_epoch`.
    pub fn total_steps(&self, steps_per_epoch: u64) -> u64 {
        self.max_steps.unwrap_or(self.epochs.saturating_mul(steps_per_epoch))
    }

    /// The schedule for a run of `total_steps`: a bare `cosine` spans the whole run; `warmup` is added to a
    /// schedule that states no warmup of its own (`constant` becomes a linear warmup).
    pub fn schedule_for(&self, total_steps: u64) -> Result<Schedule> {
        let spec = if self.schedule.trim() == "cosine" {
            // saturating: `warmup` comes from the job (a hyperparameter of u64::MAX must fail validation, not panic)
            format!("cosine:{}", total_steps.max(self.warmup.saturating_add(1)))
        } else {
            self.schedule.clone()
        };
        let mut s = Schedule::parse(&spec)?;
        if self.warmup > 0 {
            match &mut s {
                Schedule::Constant => s = Schedule::LinearWarmup { warmup_steps: self.warmup },
                Schedule::Cosine { warmup_steps, .. } | Schedule::Step { warmup_steps, .. } if *warmup_steps == 0 => {
                    *warmup_steps = self.warmup
                }
                _ => {}
            }
        }
        s.validate()?;
        Ok(s)
    }
}

/// Where a configuration value came from, lowest precedence first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// A `SM_HP_<NAME>` environment variable.
    SageMakerEnv(String),
    /// SageMaker's `hyperparameters.json`.
    SageMakerHyperparameters,
    /// A `HYTRAIN_<NAME>` environment variable.
    Env(String),
    /// A command-line flag.
    Cli,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::SageMakerEnv(var) | Origin::Env(var) => f.write_str(var),
            Origin::SageMakerHyperparameters => f.write_str("SageMaker hyperparameters"),
            Origin::Cli => f.write_str("command line"),
        }
    }
}

/// The places a run's knobs can come from, as maps of text. None of them is read by this crate.
#[derive(Debug, Clone, Default)]
pub struct ConfigSources {
    /// Flags given on the command line, by flag name (`batch-size` → `128`); only those the user gave.
    pub cli: BTreeMap<String, String>,
    /// The process environment: `HYTRAIN_<KEY>` variables of known keys and all `SM_HP_<KEY>` variables are
    /// taken; other `HYTRAIN_*` variables belong to other parts of hytrain and are left alone.
    pub env: BTreeMap<String, String>,
    /// SageMaker's `hyperparameters.json` (values as stored, JSON-encoded or not). `sagemaker_*` keys are the
    /// toolkit's own and are skipped.
    pub hyperparameters: BTreeMap<String, String>,
}

/// A layered configuration.
#[derive(Debug, Clone)]
pub struct Layered {
    /// The result.
    pub config: TrainConfig,
    /// Where each key's value came from (every key of [`KEYS`]).
    pub origins: BTreeMap<String, Origin>,
    /// Keys no [`TrainConfig`] field has, with their origin and value, for the caller to handle (its own keys
    /// such as `model` or `data-dir`) or refuse.
    pub unknown: Vec<(Origin, String, String)>,
}

/// Builds the configuration from `sources` over the defaults; see the module documentation for the precedence.
/// A value that does not parse fails with an error naming its origin (`HYTRAIN_LR: lr must be ...`).
pub fn layer(sources: &ConfigSources) -> Result<Layered> {
    let mut out = Layered {
        config: TrainConfig::default(),
        origins: KEYS.iter().map(|k| (k.to_string(), Origin::Default)).collect(),
        unknown: Vec::new(),
    };
    let mut apply = |origin: Origin, key: &str, value: &str, ignore_unknown: bool| -> Result<()> {
        if !is_known_key(key) {
            if !ignore_unknown {
                out.unknown.push((origin, key.to_string(), value.to_string()));
            }
            return Ok(());
        }
        out.config.apply_hyperparameter(key, value).map_err(|e| match e {
            TrainError::InvalidOption { option, detail } => {
                TrainError::InvalidOption { option: format!("{option} (from {origin})"), detail }
            }
            other => other,
        })?;
        out.origins.insert(canonical_key(key), origin);
        Ok(())
    };
    for (var, value) in &sources.env {
        if let Some(key) = var.strip_prefix("SM_HP_") {
            if !key.to_ascii_lowercase().starts_with("sagemaker_") {
                apply(Origin::SageMakerEnv(var.clone()), key, value, false)?;
            }
        }
    }
    for (key, value) in &sources.hyperparameters {
        if !key.starts_with("sagemaker_") {
            apply(Origin::SageMakerHyperparameters, key, value, false)?;
        }
    }
    for (var, value) in &sources.env {
        if let Some(key) = var.strip_prefix("HYTRAIN_") {
            apply(Origin::Env(var.clone()), key, value, true)?;
        }
    }
    for (key, value) in &sources.cli {
        apply(Origin::Cli, key, value, false)?;
    }
    out.config.validate()?;
    Ok(out)
}
