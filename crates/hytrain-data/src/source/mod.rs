//! Where the bytes of a dataset come from. Every source lists named objects and reads them whole; formats and the
//! sampler above never know which source they read.

use std::sync::Arc;

/// One object (file, S3 key) of a source, named relative to the source's root with `/` separators.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Object {
    /// Path relative to the source root, `/`-separated (for S3 the key with the prefix removed).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

/// A dataset's storage: a directory, an S3 prefix, or a SageMaker Pipe channel.
///
/// `list` returns objects sorted by name, so every source gives every rank the same order.
pub trait Source: Send + Sync + std::fmt::Debug {
    /// A short human description for logs and errors, e.g. `s3://bucket/prefix` or `/opt/ml/input/data/training`.
    /// Never contains credentials.
    fn describe(&self) -> String;
    /// All objects under the root, sorted by name.
    fn list(&self) -> Result<Vec<Object>, crate::Error>;
    /// The whole content of one object.
    fn read(&self, name: &str) -> Result<Vec<u8>, crate::Error>;
}

/// A shared handle to any source.
pub type SharedSource = Arc<dyn Source>;
