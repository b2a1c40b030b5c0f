//! hytrain's data plane: the same dataset read from a directory (EFS, FSx, a SageMaker File/FastFile channel), from
//! `s3://bucket/prefix` or from a SageMaker Pipe FIFO yields byte-identical batches on every rank.
//!
//! This is the only crate of hytrain that talks to S3.
//!
//! ```no_run
//! use hytrain_data::{source, DatasetOptions, Loader, LoaderConfig};
//!
//! let data = source::open("s3://my-bucket/cifar10/", &source::OpenOptions::default())?;
//! // Recognises the layout (tar shards, CIFAR-10 pickles or binary, MNIST) and indexes its shards.
//! let loader = Loader::open(data, &DatasetOptions::default(), LoaderConfig::default())?;
//! for batch in loader.epoch(0)? {
//!     let batch = batch?; // batch.inputs: NCHW f32 (or token ids), batch.targets: i64, batch.position: where to resume
//! }
//! # Ok::<(), hytrain_data::Error>(())
//! ```

pub mod augment;
pub mod digest;
mod error;
pub mod format;
#[doc(hidden)]
pub mod fuzzing;
pub mod memory;
pub mod pack;
pub mod pipeline;
pub mod sampler;
pub mod source;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use digest::{digest, DigestArgs};
pub use error::Error;
pub use format::{Dataset, Format, OpenOptions as DatasetOptions, Sample, Split, TokenDtype, TokenOptions};
pub use memory::MemorySource;
pub use pack::{inspect, pack, InspectReport, PackInput, PackOptions, PackReport};
pub use pipeline::{Batch, Epoch, Inputs, Loader, LoaderConfig};
pub use sampler::{Position, Readers, Regroup, Remainder, Sampler, SamplerConfig, DEFAULT_STREAM_WINDOW};
