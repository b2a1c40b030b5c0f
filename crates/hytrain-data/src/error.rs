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
    // --- sources (src/source) ---
    /// A local path (dataset folder, Pipe FIFO, spool folder) cannot be used.
    #[error("{}: {reason}", path.display())]
    Path {
        /// The file, folder or FIFO.
        path: std::path::PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A `--data` value that names no source this crate can open.
    #[error("--data {spec}: {reason}")]
    Spec {
        /// The value as given.
        spec: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The S3 bucket does not exist (or is not visible in this region).
    #[error(
        "s3://{bucket}: the bucket does not exist (NoSuchBucket, region {region}); check the bucket name in --data, \
         and --s3-region / AWS_REGION"
    )]
    NoSuchBucket {
        /// The bucket's name.
        bucket: String,
        /// The region the request went to.
        region: String,
    },
    /// S3 refused the credentials or the request.
    #[error(
        "{location}: access denied ({code}: {message}); check that the IAM role (the IRSA service account on EKS, \
         the execution role on SageMaker, or your AWS profile) allows s3:ListBucket and s3:GetObject on it and that \
         the credentials are valid"
    )]
    AccessDenied {
        /// `s3://bucket/prefix` or the object's URL.
        location: String,
        /// S3's error code (AccessDenied, SignatureDoesNotMatch, InvalidAccessKeyId, ExpiredToken, ...).
        code: String,
        /// S3's message.
        message: String,
    },
    /// An S3 request failed in a way retrying cannot fix.
    #[error("{location}: {op} failed: {detail}")]
    S3 {
        /// `s3://bucket/prefix` or the object's URL.
        location: String,
        /// The request (ListObjectsV2, GetObject, HeadObject).
        op: String,
        /// What S3 or the connection said, and what to do.
        detail: String,
    },
    /// An S3 request kept failing with errors worth retrying until the retry budget ran out.
    #[error(
        "{location}: {op} still failing after {attempts} attempts in {seconds:.1} s (last error: {last}); \
         check the network path to S3 / --s3-endpoint, or raise the retry budget"
    )]
    RetriesExhausted {
        /// `s3://bucket/prefix` or the object's URL.
        location: String,
        /// The request (ListObjectsV2, GetObject, HeadObject).
        op: String,
        /// How many attempts were made.
        attempts: u32,
        /// Seconds from the first attempt to giving up.
        seconds: f64,
        /// The last attempt's error.
        last: String,
    },
    /// An S3 object's size is not the size the listing gave: it was replaced after the listing, and reading it
    /// again cannot help.
    #[error(
        "{location}: the object is {} now but was {listed} bytes when the dataset was listed: it was replaced while \
         the job ran; keep a dataset unchanged while jobs read it (write a new version under a new prefix), or \
         restart the job so that it lists the dataset again",
        .now.map_or("shorter than that".to_owned(), |n| format!("{n} bytes"))
    )]
    ObjectChanged {
        /// The object's URL.
        location: String,
        /// Its size in the listing.
        listed: u64,
        /// Its size now, when S3 said it (`None`: S3 refused a range past its new end and a HEAD did not answer).
        now: Option<u64>,
    },
    // --- formats, sampler, pipeline, pack (src/format, sampler.rs, pipeline.rs, pack.rs) ---
    /// A whole shard (tar file, CIFAR batch, MNIST file) cannot be used.
    #[error("{source_desc}: shard {shard}: {reason}")]
    BadShard {
        /// The source, as [`crate::source::Source::describe`] gives it.
        source_desc: String,
        /// The shard's object name.
        shard: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// One member of a tar shard (or one sample of a batch file) cannot be used.
    #[error("{source_desc}: shard {shard}, member {member}: {reason}")]
    BadMember {
        /// The source, as [`crate::source::Source::describe`] gives it.
        source_desc: String,
        /// The shard's object name.
        shard: String,
        /// The member's path inside the shard (for CIFAR and MNIST the sample's key).
        member: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The source's objects match no format this crate reads.
    #[error(
        "{source_desc}: no dataset found ({found}); expected WebDataset *.tar shards, cifar-10-batches-py/, \
         cifar-10-batches-bin/ or MNIST train-images-idx3-ubyte[.gz] files"
    )]
    UnknownFormat {
        /// The source, as [`crate::source::Source::describe`] gives it.
        source_desc: String,
        /// A short list of what the source holds.
        found: String,
    },
    /// The requested split (train or test) has no shards.
    #[error("{source_desc}: no {split} split: {hint}")]
    NoSplit {
        /// The source, as [`crate::source::Source::describe`] gives it.
        source_desc: String,
        /// `train` or `test`.
        split: String,
        /// Where the split's files were looked for.
        hint: String,
    },
    /// Arguments that cannot work together (rank outside the world, zero batch size, ...).
    #[error("invalid data settings: {0}")]
    Config(String),
    /// Writing packed shards failed.
    #[error("cannot write {path}: {io}")]
    Write {
        /// The file or folder being written.
        path: std::path::PathBuf,
        /// The underlying error.
        io: std::io::Error,
    },
    /// A pipeline worker thread died; a bug, reported instead of hanging.
    #[error("data pipeline failed: {0}; this is a bug in hytrain-data, please report it")]
    Pipeline(String),
}
