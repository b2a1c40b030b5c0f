//! The one error type of this crate. Every message is one line that says what was looked for or what failed and
//! what to do, since the binary prints it as the reason a job stopped.

use std::path::PathBuf;

/// What went wrong loading or using an NVIDIA library, or checking the inputs of a CPU reference.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// No file of the library was found (or none that loads) in any place searched.
    #[error("{library} not found; searched {searched}{failures}; {hint}")]
    LibraryNotFound {
        /// The file name looked for (`libnccl.so.2`).
        library: &'static str,
        /// The places searched, in order, joined for the message.
        searched: String,
        /// `"; found X but it did not load: why"` for candidates that exist but failed, or empty.
        failures: String,
        /// What to install or set.
        hint: &'static str,
    },

    /// CUDA was asked for, but the driver library is not on this machine.
    #[error(
        "CUDA was requested but no NVIDIA driver / libcuda.so.1 found (searched {searched}); run on a machine with \
         an NVIDIA GPU and its driver (in a container the NVIDIA container toolkit mounts libcuda.so.1), or use \
         --device cpu"
    )]
    NoDriver {
        /// The places searched, joined for the message.
        searched: String,
    },

    /// The driver loaded but reports no usable GPU.
    #[error(
        "NVIDIA driver {path} loaded but {call} failed: {code_name} ({message}); check that a GPU is visible \
         (nvidia-smi, CUDA_VISIBLE_DEVICES) or use --device cpu"
    )]
    NoDevice {
        /// The libcuda file that loaded.
        path: PathBuf,
        /// The driver call that failed.
        call: &'static str,
        /// The CUresult's name (`CUDA_ERROR_NO_DEVICE`).
        code_name: String,
        /// The driver's own description.
        message: String,
    },

    /// A library loaded but lacks a function hytrain calls: too old, or not the library its name claims.
    #[error("{path} has no symbol {symbol}; {hint}")]
    MissingSymbol {
        /// The file that loaded.
        path: PathBuf,
        /// The function not found.
        symbol: &'static str,
        /// Which version is needed.
        hint: &'static str,
    },

    /// The NCCL found is older than hytrain supports.
    #[error("NCCL {found} at {path} is older than {needed}, the oldest hytrain supports; install nvidia-nccl-cu13 (pip) or a newer NCCL")]
    NcclTooOld {
        /// The version the library reports.
        found: String,
        /// The file that loaded.
        path: PathBuf,
        /// The minimum.
        needed: String,
    },

    /// An NCCL call returned an error.
    #[error("{call} failed: {message} (ncclResult {code})")]
    Nccl {
        /// The NCCL function.
        call: &'static str,
        /// The ncclResult_t value.
        code: i32,
        /// NCCL's own text for it.
        message: String,
    },

    /// An NVRTC call other than compilation returned an error.
    #[error("{call} failed: {message} (nvrtcResult {code})")]
    Nvrtc {
        /// The NVRTC function.
        call: &'static str,
        /// The nvrtcResult value.
        code: i32,
        /// NVRTC's own text for it.
        message: String,
    },

    /// NVRTC ships its built-in headers in a second library that it opens by name; it is not beside libnvrtc.
    #[error(
        "NVRTC {version} at {nvrtc} needs {builtins} in the same folder, and it is not there; install the whole \
         nvidia-cuda-nvrtc wheel (cargo xtask setup unpacks both files)"
    )]
    NvrtcBuiltinsMissing {
        /// The libnvrtc file that loaded.
        nvrtc: PathBuf,
        /// Its version, `major.minor`.
        version: String,
        /// The builtins file expected beside it (`libnvrtc-builtins.so.13.0`).
        builtins: String,
    },

    /// A kernel source did not compile; the message carries NVRTC's log.
    #[error("NVRTC could not compile {program} for {arch}: {log}")]
    Compile {
        /// The source file's name (`bucket.cu`).
        program: String,
        /// The target (`compute_90`).
        arch: String,
        /// NVRTC's log, on one line.
        log: String,
    },

    /// A CUDA driver call failed.
    #[error("{call} failed: {code_name} ({message})")]
    Driver {
        /// The driver function.
        call: &'static str,
        /// The CUresult's name.
        code_name: String,
        /// The driver's own description.
        message: String,
    },

    /// The rendezvous store could not hand over the NCCL unique id.
    #[error("rank {rank} could not {action} the NCCL unique id under key '{key}' in the rendezvous store: {source}")]
    IdExchange {
        /// This process's rank.
        rank: usize,
        /// `publish` or `fetch`.
        action: &'static str,
        /// The store key.
        key: String,
        /// The store's own error.
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },

    /// Bytes offered as an NCCL unique id are not one.
    #[error("the NCCL unique id under key '{key}' is {len} bytes, not 128; every rank must run the same hytrain and use its own job's store")]
    BadUniqueId {
        /// The store key it came from.
        key: String,
        /// The length found.
        len: usize,
    },

    /// A collective did not complete within the collective timeout; the communicator was aborted.
    #[error(
        "NCCL {op} on rank {rank} did not finish within {} s (--collective-timeout); the communicator was aborted. \
         A rank may have died, hung or called a different collective: check the other ranks' logs (NCCL_DEBUG=INFO \
         shows NCCL's view)",
        timeout.as_secs_f64()
    )]
    CollectiveTimeout {
        /// This process's rank.
        rank: usize,
        /// The operation, with its size and dtype.
        op: String,
        /// The timeout that passed.
        timeout: std::time::Duration,
    },

    /// NCCL reported an error for a collective (on the call, or later through `ncclCommGetAsyncError`); the
    /// communicator was aborted.
    #[error(
        "NCCL {op} on rank {rank} failed: {message} (ncclResult {code}, from {call}); the communicator was aborted \
         (NCCL_DEBUG=INFO shows why)"
    )]
    CollectiveFailed {
        /// This process's rank.
        rank: usize,
        /// The operation, with its size and dtype.
        op: String,
        /// The NCCL function that reported it.
        call: &'static str,
        /// The ncclResult_t value.
        code: i32,
        /// NCCL's own text for it.
        message: String,
    },

    /// A collective was called after an earlier one aborted the communicator.
    #[error("NCCL {op} on rank {rank} refused: the communicator was aborted earlier ({reason})")]
    CommunicatorAborted {
        /// This process's rank.
        rank: usize,
        /// The operation refused.
        op: String,
        /// Why it was aborted.
        reason: String,
    },

    /// `libtorch_cuda.so` is not beside `libtorch_cpu.so`: this libtorch is a CPU-only build.
    #[error(
        "CUDA was requested but this libtorch has no CUDA support: no libtorch_cuda.so in {dir}; run in a GPU \
         image (a Deep Learning Container, or build against a CUDA PyTorch with LIBTORCH_USE_PYTORCH=1) or use \
         --device cpu"
    )]
    TorchCudaNotFound {
        /// The folder of libtorch_cpu.so that was searched.
        dir: PathBuf,
    },

    /// `libtorch_cuda.so` exists but did not load (usually a CUDA runtime library it needs is missing).
    #[error("{path} did not load: {reason}; install the CUDA libraries this PyTorch was built with (pip's nvidia-* wheels of the same torch) or use --device cpu")]
    TorchCudaLoad {
        /// The file.
        path: PathBuf,
        /// The dynamic loader's message.
        reason: String,
    },

    /// The process's local rank has no GPU of its own.
    #[error(
        "local rank {local_rank} needs GPU cuda:{local_rank} but only {visible} GPU(s) are visible{shown}; start at \
         most {visible} process(es) per node (--nproc-per-node / nprocPerNode), make more GPUs visible, or give \
         each process one GPU of its own with CUDA_VISIBLE_DEVICES (it then uses cuda:0)"
    )]
    NotEnoughGpus {
        /// This process's rank on its node.
        local_rank: usize,
        /// GPUs CUDA sees.
        visible: usize,
        /// `" (CUDA_VISIBLE_DEVICES=...)"` when set, else empty.
        shown: String,
    },

    /// libtorch's current CUDA device could not be set.
    #[error(
        "local rank {local_rank} could not make cuda:{index} its current device{shown}: {reason}; check \
         nvidia-smi, CUDA_VISIBLE_DEVICES and the number of processes per node"
    )]
    SetDevice {
        /// This process's rank on its node.
        local_rank: usize,
        /// The GPU index it chose.
        index: usize,
        /// `" (CUDA_VISIBLE_DEVICES=...)"` when set, else empty.
        shown: String,
        /// What the CUDA runtime said, or why it could not be asked.
        reason: String,
    },

    /// The CUDA stream shim cannot be used: libtorch's CUDA backend is not loaded, or the shim did not load.
    #[error("libtorch's CUDA streams are out of reach: {reason}")]
    StreamShim {
        /// What failed, and what to do.
        reason: String,
    },

    /// libtorch refused a stream query or change (c10's message, first line).
    #[error("{call} for cuda:{device} failed: {message}")]
    Stream {
        /// The shim function (`getCurrentCUDAStream`, `setCurrentCUDAStream`).
        call: &'static str,
        /// The GPU index.
        device: usize,
        /// libtorch's reason.
        message: String,
    },

    /// Buffers handed to a bucket or optimizer routine do not fit together.
    #[error("{0}")]
    Shape(String),

    /// A host collective under [`crate::HostCollective`] failed (its own message: the rank lost, the timeout).
    /// Boxed so this error, and the errors that carry it, stay small on the success path.
    #[error(transparent)]
    Host(Box<hytrain_comm::CommError>),
}

impl From<hytrain_comm::CommError> for CudaError {
    fn from(e: hytrain_comm::CommError) -> Self {
        CudaError::Host(Box::new(e))
    }
}
