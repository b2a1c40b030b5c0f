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
        return Err(CudaError::TorchCudaNotFound {
            dir: lib_dir.to_path_buf(),
        });
    }
    // NODELETE: libtorch keeps pointers into it (registered kernels, hooks) for the life of the process.
    let flags = libc::RTLD_NOW | libc::RTLD_GLOBAL | libc::RTLD_NODELETE;
    // SAFETY: loading libtorch_cuda runs its registration initialisers, which is the point; it needs the
    // libtorch_cpu this process already has.
    let handle = unsafe { libloading::os::unix::Library::open(Some(&path), flags) };
    let handle = handle.map_err(|e| CudaError::TorchCudaLoad {
        path: path.clone(),
        reason: one_line(&e.to_string()),
    })?;
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

/// The GPU a process with `local_rank` uses: `cuda:local_rank`, one process per GPU as torchrun lays them out.
/// `visible` is how many GPUs CUDA sees (after CUDA_VISIBLE_DEVICES, which renumbers them from 0), and
/// `cuda_visible_devices` its value, only for the message when there are too few.
pub fn device_for_local_rank(
    local_rank: usize,
    visible: usize,
    cuda_visible_devices: Option<&str>,
) -> Result<usize, CudaError> {
    if local_rank < visible {
        return Ok(local_rank);
    }
    Err(CudaError::NotEnoughGpus {
        local_rank,
        visible,
        shown: cuda_visible_devices
            .map(|v| format!(" (CUDA_VISIBLE_DEVICES={v})"))
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_local_rank_takes_the_gpu_of_its_index() {
        assert_eq!(device_for_local_rank(0, 1, None).unwrap(), 0);
        assert_eq!(
            device_for_local_rank(3, 8, Some("0,1,2,3,4,5,6,7")).unwrap(),
            3
        );
    }

    #[test]
    fn a_local_rank_beyond_the_visible_gpus_names_both_counts_and_cuda_visible_devices() {
        let error = device_for_local_rank(2, 2, Some("4,5"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "local rank 2 needs GPU cuda:2 but only 2 GPU(s) are visible (CUDA_VISIBLE_DEVICES=4,5); start at most \
             2 process(es) per node (--nproc-per-node / nprocPerNode) or make more GPUs visible"
        );
        let error = device_for_local_rank(1, 1, None).unwrap_err().to_string();
        assert!(error.contains("only 1 GPU(s) are visible; "), "{error}");
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
        assert!(
            error.starts_with(&format!(
                "{}/libtorch_cuda.so did not load: ",
                dir.path().display()
            )),
            "{error}"
        );
        assert!(error.ends_with("or use --device cpu"), "{error}");
    }
}
