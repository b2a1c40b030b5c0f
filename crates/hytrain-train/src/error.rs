//! The one error type of this crate.

use std::path::PathBuf;

use crate::CommError;

/// Everything the training engine can fail with; each message says what was wrong and, where it can, what to do.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// `--model` named nothing the registry knows and is not a TorchScript file.
    #[error(
        "unknown model '{0}': choose lenet, resnet18, mlp, mlp:<hidden,sizes> or a TorchScript file ending in .pt"
    )]
    UnknownModel(String),

    /// A model cannot be built for the requested classes or input shape.
    #[error("model {model}: {detail}")]
    ModelConfig {
        /// The model asked for.
        model: String,
        /// What does not fit.
        detail: String,
    },

    /// A libtorch call failed (a shape that does not fit the model, a TorchScript file that does not load...).
    #[error("{context}: {source}")]
    Torch {
        /// What hytrain was doing.
        context: String,
        /// libtorch's own message.
        #[source]
        source: tch::TchError,
    },

    /// Ranks built different models; the message names the first rank and tensor that differ.
    #[error("{0}")]
    ModelMismatch(String),

    /// A collective failed during the named phase.
    #[error("{during} failed: {source}")]
    Comm {
        /// The engine phase ("gradient allreduce of bucket 3", "parameter broadcast").
        during: String,
        /// The collective's error.
        #[source]
        source: CommError,
    },

    /// A collective on GPU memory (NCCL) failed, timed out or was refused.
    #[error("{during} failed: {source}")]
    DeviceComm {
        /// What the engine was doing.
        during: String,
        /// The GPU backend's error.
        #[source]
        source: hytrain_cuda::CudaError,
    },

    /// A parameter received no gradient, so ranks would disagree on what to average.
    #[error(
        "parameter {0} received no gradient in backward; every trainable parameter must take part in forward \
         (freeze it with requires_grad(false) or remove it)"
    )]
    MissingGradient(String),

    /// Nodes wait at the store to join the job (a job of a range of nodes): every rank stopped at the same step
    /// boundary to make room for them, with no step in flight.
    #[error("nodes wait to join the job: every rank stopped after step {step} to make room for them")]
    NodesWaiting {
        /// Steps completed.
        step: u64,
    },

    /// An option has a value the engine cannot use.
    #[error("invalid {option}: {detail}")]
    InvalidOption {
        /// The option's name as a user writes it (`--bucket-mb`, `schedule`...).
        option: String,
        /// What was wrong and what is accepted.
        detail: String,
    },

    /// A configuration key no knob has.
    #[error("unknown option '{key}': known options are {known}")]
    UnknownOption {
        /// The key as given.
        key: String,
        /// The known keys, comma-separated.
        known: String,
    },

    /// The training or validation data failed, or ran out before the epoch's announced batch count.
    #[error("{during}: {source}")]
    Data {
        /// What the loop was doing ("training batch 12 of epoch 1", "another rank's data").
        during: String,
        /// The data source's error.
        #[source]
        source: crate::batches::BatchError,
    },

    /// Optimizer state does not fit the model's parameters.
    #[error("optimizer state: {0}")]
    OptimizerState(String),

    /// A checkpoint could not be written or read.
    #[error("checkpoint {path}: {detail}")]
    Checkpoint {
        /// The checkpoint directory.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },

    /// The checkpoint directory ran out of room (or hit a file-size or quota limit) while a checkpoint was written;
    /// the partial write was removed and earlier checkpoints are untouched.
    #[error(
        "no room for the checkpoint of step {step} in {dir}: {reason} (it needs {room}); {previous}; \
         free space there, lower --keep, or give --checkpoint-dir on a larger volume"
    )]
    DiskFull {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The step being saved.
        step: u64,
        /// What the operating system said ("No space left on device", "File too large", "Disk quota exceeded").
        reason: String,
        /// The checkpoint's approximate size and, when known, the room left: "about 137 KiB, 61 KiB are free".
        room: String,
        /// Which earlier checkpoint a restart resumes from, or that there is none.
        previous: String,
    },
    /// Checkpoints or the model could not be written to or read from S3 (after the client's retries).
    #[error("{during}: {source}")]
    Storage {
        /// What hytrain was doing ("uploading checkpoint step 200").
        during: String,
        /// The S3 client's error, saying what S3 or the connection answered and what to check.
        #[source]
        source: hytrain_data::Error,
    },

    /// A file system operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What hytrain tried ("create", "write", "fsync", "rename"...).
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

impl TrainError {
    pub(crate) fn torch(context: impl Into<String>, source: tch::TchError) -> Self {
        TrainError::Torch { context: context.into(), source }
    }

    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io { action, path: path.into(), source }
    }

    pub(crate) fn option(option: impl Into<String>, detail: impl Into<String>) -> Self {
        TrainError::InvalidOption { option: option.into(), detail: detail.into() }
    }
}

/// Shorthand for this crate's results.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;
