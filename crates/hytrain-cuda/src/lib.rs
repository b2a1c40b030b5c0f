//! The GPU side of hytrain, loaded at run time: NCCL, NVRTC and the CUDA driver are opened with dlopen, so this
//! crate (and everything that depends on it) builds and runs on machines without a GPU or a CUDA toolkit; only
//! using a GPU needs one. Building it needs the CUDA runtime headers (not libraries) for the stream shim, which
//! `cargo xtask setup` unpacks from pip's wheels.
//!
//! - [`Nccl`]: finds `libnccl.so.2` (pip's `nvidia/nccl/lib` or `nvidia/cu13/lib` beside libtorch,
//!   `LD_LIBRARY_PATH`, system folders), reports the file and its version, and creates the [`UniqueId`] that
//!   [`exchange_unique_id`] hands to every rank through the rendezvous store ([`IdStore`]).
//! - [`Nvrtc`] and [`kernels`]: the CUDA C sources of `kernels/` (bucket pack/unpack with scaling, fused SGD with
//!   momentum and AdamW) compiled to PTX at run time.
//! - [`reference`]: the same kernels on the CPU, operation for operation.
//! - [`load_torch_cuda`]: libtorch's CUDA backend (`libtorch_cuda.so` beside `libtorch_cpu.so`) opened at run time,
//!   so a binary linked against the CPU libtorch trains on `cuda:LOCAL_RANK` ([`device_for_local_rank`]).
//! - [`NcclCollective`], a [`DeviceCollective`]: allreduce, broadcast, allgather, and the sharded optimizer's
//!   in-place reduce_scatter and allgather_blocks, of GPU memory in f32, f16, bf16 and f64 on a communication
//!   stream ordered by events with the compute stream, watched by a timeout that aborts the communicator. The
//!   unique id comes from rank 0 through hytrain-comm's rendezvous `Store`. [`HostCollective`] is the same trait
//!   on host memory through a hytrain-comm `Collective`.
//! - [`TorchStreams`]: libtorch's current CUDA stream, read and set through a C++ shim built against libtorch's
//!   c10/cuda headers and opened at run time after libtorch_cuda.so, so the NCCL backend orders its work against
//!   the stream libtorch really computes on.
//! - [`SideStream`]: a non-blocking stream beside libtorch's compute stream, ordered against it with events, on
//!   which a communication thread packs, allreduces and unpacks gradient buckets while backward still computes.
//! - [`CudaDriver`]: whether CUDA is usable at all, with a clear error when there is no driver; [`device`]: GPU
//!   memory, PTX modules and kernel launches through the driver API, and [`Communicator`], a bare NCCL
//!   communicator. These need a GPU and have not yet run on one; the `hytrain-gpu-check` binary (packed by
//!   `cargo xtask gpu-check`) is their test and their only user: no training step launches the kernels of
//!   `kernels/` (optimizers use libtorch's fused kernels, buckets libtorch's copies) or uses [`Communicator`].
//!
//! Only this crate knows CUDA; hytrain-train and the binary depend on it, and it depends on hytrain-comm for the
//! rendezvous store.
//!
//! ```no_run
//! use hytrain_cuda::{kernels, ComputeCapability, Nccl, Nvrtc};
//!
//! # fn main() -> Result<(), hytrain_cuda::CudaError> {
//! let nccl = Nccl::load()?;
//! println!("NCCL {} from {}", nccl.version(), nccl.path().display());
//! let nvrtc = Nvrtc::load()?;
//! for ptx in kernels::compile_all(&nvrtc, ComputeCapability { major: 9, minor: 0 })? {
//!     println!("{}: {:?}", ptx.program, ptx.entry_points());
//! }
//! # Ok(()) }
//! ```

mod collective;
pub mod device;
mod driver;
mod error;
mod exchange;
mod host_collective;
pub mod kernels;
pub mod library;
mod nccl;
mod nvrtc;
pub mod reference;
mod side_stream;
mod stream;
mod torch_cuda;

pub use collective::{DType, DeviceCollective, DeviceReduceOp, DeviceSlice, NcclCollective};
pub use driver::{CudaDriver, Device};
pub use error::CudaError;
pub use exchange::{exchange_unique_id, IdStore};
pub use host_collective::HostCollective;
pub use library::{NvidiaLibrary, Origin, Search};
pub use nccl::{Communicator, Nccl, NcclVersion, UniqueId, MIN_NCCL, NCCL_FUNCTIONS, UNIQUE_ID_BYTES};
pub use nvrtc::{ComputeCapability, Nvrtc, Ptx};
pub use side_stream::{Entered, SideStream, StreamHandle};
pub use stream::TorchStreams;
pub use torch_cuda::{device_for_local_rank, load_torch_cuda, set_current_device, TorchCuda, TORCH_CUDA_LIBRARY};
