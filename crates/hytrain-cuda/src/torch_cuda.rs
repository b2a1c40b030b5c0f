//! libtorch's CUDA half, loaded at run time.
//!
//! tch links `libtorch_cpu.so` only (the CPU libtorch `cargo xtask setup` builds has nothing else). A GPU image
//! (a Deep Learning Container, PyTorch's pip wheel) puts `libtorch_cuda.so` beside it; opening that file with
//! `RTLD_GLOBAL` runs its static initialisers, which register libtorch's CUDA backend and hooks, so CUDA tensors
//! work afterwards in a binary that never linked CUDA. It must happen before the first question to libtorch about
//! CUDA: the CPU-only answer is cached.

use std::path::{Path, PathBuf};

use crate::library::one_line;
use crate::CudaError;

/// The file libtorch's CUDA backend lives in.
pub const TORCH_CUDA_LIBRARY: &str = "libtorch_cuda.so";

/// A loaded `libtorch_cuda.so`: it stays loaded for the life of the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorchCuda {
    /// The file opened.
    pub path: PathBuf,
    /// The libtorch version beside it (`2.11.0+cu130`), when a `build-version` (libtorch archives) or
    /// `version.py` (pip's torch package) says.
    pub version: Option<String>,
}

/// Opens `lib_dir/libtorch_cuda.so` (`lib_dir` being the folder of the loaded `libtorch_cpu.so`, see
/// [`crate::library::loaded_libtorch`]) with `RTLD_GLOBAL`, so libtorch's CUDA backend registers, and logs the
/// file and version. Needs no GPU: whether one is usable is libtorch's question after this.
pub fn load_torch_cuda(lib_dir: &Path) -> Result<TorchCuda, CudaError> {
    let path = lib_dir.join(TORCH_CUDA_LIBRARY);
    if !path.is_file() {
        return Err(CudaError::TorchCudaNotFound { dir: lib_dir.to_path_buf() });
    }
    // NODELETE: libtorch keeps pointers into it (registered kernels, hooks) for the life of the process.
    let flags = libc::RTLD_NOW | libc::RTLD_GLOBAL | libc::RTLD_NODELETE;
    // SAFETY: loading libtorch_cuda runs its registration initialisers, which is the point; it needs the
    // libtorch_cpu this process already has.
    let handle = unsafe { libloading::os::unix::Library::open(Some(&path), flags) };
    let handle =
        handle.map_err(|e| CudaError::TorchCudaLoad { path: path.clone(), reason: one_line(&e.to_string()) })?;
    // The handle may close: NODELETE keeps the library mapped.
    drop(handle);
    let version = torch_version(lib_dir);
    tracing::info!(
        "libtorch CUDA backend loaded from {} ({})",
        path.display(),
        version.as_deref().unwrap_or("version unknown")
    );
    Ok(TorchCuda { path, version })
}

/// The libtorch version beside `lib_dir`: `../build-version` of a libtorch archive, or `__version__` in
/// `../version.py` of pip's torch package.
fn torch_version(lib_dir: &Path) -> Option<String> {
    let root = lib_dir.parent()?;
    if let Ok(text) = std::fs::read_to_string(root.join("build-version")) {
        let text = text.trim();
        if !text.is_empty() {
            return Some(text.to_string());
        }
    }
    let text = std::fs::read_to_string(root.join("version.py")).ok()?;
    text.lines().find_map(|line| {
        // `__version__ = '2.11.0+cu130'`, or with a type annotation before the `=`.
        let rest = line.trim().strip_prefix("__version__")?;
        let value = rest.split_once('=')?.1.trim();
        let value = value.trim_matches(|c| c == '\'' || c == '"');
        (!value.is_empty()).then(|| value.to_string())
    })
}

/// The GPU a process with `local_rank` uses. `visible` is how many GPUs CUDA sees (after CUDA_VISIBLE_DEVICES,
/// which renumbers them from 0) and `cuda_visible_devices` its value.
///
/// - `cuda:local_rank` when the process sees that many GPUs: one process per GPU, as torchrun lays them out.
/// - `cuda:0` when CUDA_VISIBLE_DEVICES leaves exactly one GPU visible: a scheduler (Slurm's `--gpus-per-task`,
///   a per-process device plugin) gave each process its own (`CUDA_VISIBLE_DEVICES=3` for local rank 3).
/// - Otherwise an error naming the local rank, the visible count and CUDA_VISIBLE_DEVICES, and what to set. One
///   GPU visible without CUDA_VISIBLE_DEVICES is such a case for local ranks above 0: they would all share it.
pub fn device_for_local_rank(
    local_rank: usize,
    visible: usize,
    cuda_visible_devices: Option<&str>,
) -> Result<usize, CudaError> {
    if local_rank < visible {
        return Ok(local_rank);
    }
    if visible == 1 && cuda_visible_devices.is_some_and(|v| !v.trim().is_empty()) {
        return Ok(0);
    }
    Err(CudaError::NotEnoughGpus { local_rank, visible, shown: shown(cuda_visible_devices) })
}

fn shown(cuda_visible_devices: Option<&str>) -> String {
    cuda_visible_devices.map(|v| format!(" (CUDA_VISIBLE_DEVICES={v})")).unwrap_or_default()
}

/// `cudaSetDevice(index)` on the calling thread, through the CUDA runtime libtorch_cuda.so brought into the
/// process: libtorch (cuBLAS handles, the caching allocator's first context, anything asking for "the current
/// device") then works on this process's GPU instead of creating a context on GPU 0 in every process. Call it
/// right after [`device_for_local_rank`], before anything else touches CUDA. The error names the local rank, the
/// GPU and CUDA_VISIBLE_DEVICES.
pub fn set_current_device(
    local_rank: usize,
    index: usize,
    cuda_visible_devices: Option<&str>,
) -> Result<(), CudaError> {
    let error = |reason: String| CudaError::SetDevice { local_rank, index, shown: shown(cuda_visible_devices), reason };
    type SetDevice = unsafe extern "C" fn(std::ffi::c_int) -> std::ffi::c_int;
    type ErrorName = unsafe extern "C" fn(std::ffi::c_int) -> *const std::ffi::c_char;
    let this = libloading::os::unix::Library::this();
    // SAFETY: cudaSetDevice and cudaGetErrorName have these signatures in every CUDA runtime (cuda_runtime_api.h).
    let set = unsafe { this.get::<SetDevice>(b"cudaSetDevice\0") }
        .map_err(|_| error("no CUDA runtime (cudaSetDevice) is loaded; load libtorch's CUDA backend first".into()))?;
    let index_c = std::ffi::c_int::try_from(index).map_err(|_| error("GPU index out of range".into()))?;
    // SAFETY: a plain call with an int argument.
    let code = unsafe { set(index_c) };
    if code == 0 {
        return Ok(());
    }
    // SAFETY: as above; the name is a static NUL-terminated string of the runtime.
    let name = unsafe { this.get::<ErrorName>(b"cudaGetErrorName\0") }
        .ok()
        .map(|f| unsafe { f(code) })
        .filter(|p| !p.is_null())
        .map(|p| unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned())
        .unwrap_or_else(|| "unknown error".into());
    Err(error(format!("cudaSetDevice({index}) failed: {name} ({code})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_local_rank_takes_the_gpu_of_its_index() {
        assert_eq!(device_for_local_rank(0, 1, None).unwrap(), 0);
        assert_eq!(device_for_local_rank(3, 8, Some("0,1,2,3,4,5,6,7")).unwrap(), 3);
    }

    #[test]
    fn a_local_rank_beyond_the_visible_gpus_names_both_counts_and_cuda_visible_devices() {
        let error = device_for_local_rank(2, 2, Some("4,5")).unwrap_err().to_string();
        assert_eq!(
            error,
            "local rank 2 needs GPU cuda:2 but only 2 GPU(s) are visible (CUDA_VISIBLE_DEVICES=4,5); start at most \
             2 process(es) per node (--nproc-per-node / nprocPerNode), make more GPUs visible, or give each \
             process one GPU of its own with CUDA_VISIBLE_DEVICES (it then uses cuda:0)"
        );
        let error = device_for_local_rank(1, 1, None).unwrap_err().to_string();
        assert!(error.contains("only 1 GPU(s) are visible; "), "{error}");
        assert!(error.contains("CUDA_VISIBLE_DEVICES (it then uses cuda:0)"), "{error}");
    }

    #[test]
    fn a_process_given_one_gpu_of_its_own_uses_cuda_0_whatever_its_local_rank() {
        for local_rank in [0, 1, 3, 7] {
            assert_eq!(device_for_local_rank(local_rank, 1, Some("3")).unwrap(), 0);
        }
        // Two visible for local rank 3 is neither layout.
        let error = device_for_local_rank(3, 2, Some("3,7")).unwrap_err().to_string();
        assert!(
            error.starts_with("local rank 3 needs GPU cuda:3 but only 2 GPU(s) are visible (CUDA_VISIBLE_DEVICES=3,7)"),
            "{error}"
        );
        // An empty CUDA_VISIBLE_DEVICES hides every GPU; one visible anyway is not a per-process GPU.
        assert!(device_for_local_rank(1, 1, Some("")).is_err());
    }

    #[test]
    fn setting_the_device_without_a_usable_cuda_runtime_names_rank_gpu_and_visible_devices() {
        // This machine has no GPU: either no CUDA runtime is loaded, or the one libtorch_cpu brings fails.
        let error = set_current_device(2, 0, Some("5")).unwrap_err().to_string();
        assert!(
            error.starts_with("local rank 2 could not make cuda:0 its current device (CUDA_VISIBLE_DEVICES=5): "),
            "{error}"
        );
    }

    #[test]
    fn the_version_comes_from_build_version_or_pips_version_py() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("lib");
        std::fs::create_dir(&lib).unwrap();
        assert_eq!(torch_version(&lib), None);
        std::fs::write(
            dir.path().join("version.py"),
            "from typing import Optional\n__version__: str = '2.11.0+cu130'\ngit_version = 'abc'\n",
        )
        .unwrap();
        assert_eq!(torch_version(&lib).as_deref(), Some("2.11.0+cu130"));
        std::fs::write(dir.path().join("build-version"), "2.11.0+cpu\n").unwrap();
        assert_eq!(torch_version(&lib).as_deref(), Some("2.11.0+cpu"));
    }

    #[test]
    fn a_cpu_libtorch_without_libtorch_cuda_says_where_it_looked_and_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let error = load_torch_cuda(dir.path()).unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "CUDA was requested but this libtorch has no CUDA support: no libtorch_cuda.so in {}; run in a GPU \
                 image (a Deep Learning Container, or build against a CUDA PyTorch with LIBTORCH_USE_PYTORCH=1) or \
                 use --device cpu",
                dir.path().display()
            )
        );
    }

    #[test]
    fn a_libtorch_cuda_that_is_not_a_library_reports_the_loader_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(TORCH_CUDA_LIBRARY), b"not an ELF file").unwrap();
        let error = load_torch_cuda(dir.path()).unwrap_err().to_string();
        assert!(error.starts_with(&format!("{}/libtorch_cuda.so did not load: ", dir.path().display())), "{error}");
        assert!(error.ends_with("or use --device cpu"), "{error}");
    }
}
