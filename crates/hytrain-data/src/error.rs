//! Errors of the data plane. Each says which source, shard and member it is about, and what to do.

/// Everything that can go wrong reading a dataset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a named object of a source.
    #[error("{source_desc}: cannot read {name}: {io}")]
    Read {
        /// The source, as [`crate::source::Source::describe`] gives it.
        source_desc: String,
        /// The object's name.
        name: String,
        /// The underlying error.
        io: std::io::Error,
    },
    /// The source holds no objects at all.
    #[error("{0}: the source is empty; point --data at a folder, S3 prefix or channel that holds the dataset")]
    Empty(String),
}
