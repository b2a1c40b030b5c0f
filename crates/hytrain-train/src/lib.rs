//! hytrain's training engine on libtorch: models, data-parallel gradient averaging, optimizers, learning-rate
//! schedules, checkpoints and model export. The `hytrain train` command drives it; programs can too.
//!
//! The whole loop (resume, epochs, evaluation, metrics lines, checkpoints, graceful stop, export) is
//! [`Trainer::run`], configured by [`TrainConfig`] and fed by any [`BatchSource`]; the example below drives
//! [`Ddp`] by hand instead.
//!
//! ```no_run
//! use hytrain_train::{model, Ddp, DdpOptions, OptimizerConfig, SgdConfig, Schedule};
//! # fn run(comm: Box<dyn hytrain_train::Collective>) -> hytrain_train::Result<()> {
// `comm` comes from hytrain_comm::init(&membership, false, &CommOptions::default()).
//! tch::manual_seed(1);
//! let net = model::build("lenet", 10, &[3, 32, 32], tch::Device::Cpu)?;
//! let mut ddp = Ddp::new(net, comm, DdpOptions::default())?; // same model checked, rank 0's weights broadcast
//! let sgd = OptimizerConfig::Sgd(SgdConfig { momentum: 0.5, ..Default::default() });
//! let mut optimizer = sgd.build(ddp.parameters())?;
//! let schedule = Schedule::parse("cosine:1000:50")?;
//! for step in 0..1000u64 {
//!     let xs = tch::Tensor::randn([64, 3, 32, 32], tch::kind::FLOAT_CPU);
//!     let ys = tch::Tensor::randint(10, [64], tch::kind::INT64_CPU);
//!     let out = ddp.train_step(&[(xs, ys)], optimizer.as_mut(), 0.01 * schedule.factor(step))?;
//!     println!("step={step} train_loss={:.4}", out.loss_value()?);
//! }
//! # Ok(()) }
//! ```

pub mod batches;
mod bucket;
pub mod checkpoint;
mod coalesced;
pub mod config;
mod ddp;
pub mod elastic;
mod error;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod host_sync;
pub mod loader;
pub mod model;
pub mod optim;
mod overlap;
mod position;
pub mod precision;
mod rng;
pub mod schedule;
mod shim;
pub mod trainer;

pub use batches::{Batch, BatchError, BatchSource, Batches, TensorBatches};
pub use bucket::{assign_buckets, Bucket, MB};
pub use checkpoint::{
    consolidate, latest_valid, AsyncCheckpointer, Checkpoint, CheckpointMeta, CheckpointStore, Consolidated, Resume,
    RngState, ShardedWriter, Skipped,
};
pub use config::{layer, ConfigSources, Layered, OptimizerKind, Origin, TrainConfig};
pub use ddp::{cross_entropy, BucketLayout, Ddp, DdpOptions, DdpStats, ShardMode, StepOutput};
pub use error::{Result, TrainError};
pub use export::{export, ExportMetadata};
/// The collective operations the engine averages gradients and broadcasts weights with.
pub use hytrain_comm::{Buffer, Collective, CommError, ReduceOp};
pub use loader::LoaderBatches;
pub use model::{Model, ScriptModel};
pub use optim::{AdamW, AdamWConfig, Implementation, Optimizer, OptimizerConfig, Sgd, SgdConfig};
pub use precision::{Autocast, GradScaler, GradScalerState, Precision};
pub use schedule::{LrPlan, Schedule};
pub use trainer::{JoinWatch, Progress, RunPaths, Start, Summary, Trainer};
