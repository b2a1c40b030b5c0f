//! hytrain's data plane: the same dataset read from a directory (EFS, FSx, a SageMaker File/FastFile channel), from
//! `s3://bucket/prefix` or from a SageMaker Pipe FIFO yields byte-identical batches on every rank.
//!
//! This is the only crate of hytrain that talks to S3.

mod error;
pub mod source;

pub use error::Error;
