//! Builds the CUDA stream shim (shim/stream.cpp) into `$OUT_DIR/libhytrain_cuda_stream.so`, which src/stream.rs
//! embeds and opens at run time. It compiles against libtorch's c10/cuda headers and the CUDA runtime headers
//! (headers only: nothing CUDA is linked, and no GPU or CUDA toolkit is needed); the folders found are passed on
//! to the tests, which build a stand-in libc10_cuda.so against the same headers.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SHIM: &str = "shim/stream.cpp";
const OUTPUT: &str = "libhytrain_cuda_stream.so";

fn main() {
    println!("cargo:rerun-if-changed={SHIM}");
    for var in [
        "HYTRAIN_CUDA_INCLUDE",
        "CUDA_HOME",
        "CUDA_PATH",
        "LIBTORCH",
        "LIBTORCH_INCLUDE",
        "LIBTORCH_USE_PYTORCH",
        "PYTHON_SYS_EXECUTABLE",
        "CXX",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if let Err(message) = build() {
        eprintln!("error: hytrain-cuda: {message}");
        std::process::exit(1);
    }
}

fn build() -> Result<(), String> {
    let python_torch = python_torch();
    let torch = torch_include(python_torch.as_deref())?;
    let cuda = cuda_include(python_torch.as_deref())?;
    let out = PathBuf::from(env::var_os("OUT_DIR").ok_or("cargo set no OUT_DIR")?).join(OUTPUT);
    let compiler = env::var_os("CXX").unwrap_or_else(|| "c++".into());
    let output = Command::new(&compiler)
        .args(["-std=c++17", "-O2", "-fPIC", "-shared", "-fvisibility=hidden"])
        // The headers' own warnings are not this crate's to fix.
        .arg("-isystem")
        .arg(&torch)
        .arg("-isystem")
        .arg(&cuda)
        .arg(SHIM)
        .arg("-o")
        .arg(&out)
        .output()
        .map_err(|e| {
            format!(
                "cannot run the C++ compiler {} for the CUDA stream shim ({e}); install g++ (apt-get install g++) \
                 or set CXX",
                compiler.to_string_lossy()
            )
        })?;
    if !output.status.success() {
        return Err(format!(
            "compiling {SHIM} against {} and {} failed:\n{}",
            torch.display(),
            cuda.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    println!("cargo:rustc-env=HYTRAIN_SHIM_TORCH_INCLUDE={}", torch.display());
    println!("cargo:rustc-env=HYTRAIN_SHIM_CUDA_INCLUDE={}", cuda.display());
    Ok(())
}

/// The `torch` package folder of the Python environment when `LIBTORCH_USE_PYTORCH` is set, as torch-sys asks it.
fn python_torch() -> Option<PathBuf> {
    env::var_os("LIBTORCH_USE_PYTORCH")?;
    let python = env::var_os("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|| "python3".into());
    let output =
        Command::new(python).args(["-c", "import os, torch; print(os.path.dirname(torch.__file__))"]).output().ok()?;
    output.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
}

/// The folder holding `c10/cuda/CUDAStream.h`: `LIBTORCH_INCLUDE`, `$LIBTORCH/include` or the Python torch's.
fn torch_include(python_torch: Option<&Path>) -> Result<PathBuf, String> {
    let mut candidates = Vec::new();
    if let Some(dir) = env::var_os("LIBTORCH_INCLUDE") {
        candidates.push(PathBuf::from(dir));
    }
    if let Some(dir) = python_torch {
        candidates.push(dir.join("include"));
    }
    if let Some(dir) = env::var_os("LIBTORCH") {
        candidates.push(PathBuf::from(dir).join("include"));
    }
    candidates.iter().find(|dir| dir.join("c10/cuda/CUDAStream.h").is_file()).cloned().ok_or_else(|| {
        format!(
            "the CUDA stream shim needs libtorch's c10/cuda/CUDAStream.h and found it in none of: {}; run \
                 `cargo xtask setup`, or set LIBTORCH (or LIBTORCH_USE_PYTORCH=1) to a libtorch 2.11.0 with its \
                 include folder",
            shown(&candidates)
        )
    })
}

/// The folder holding the CUDA runtime headers: `cuda_runtime_api.h` and the `crt/host_defines.h` it includes
/// (pip's nvidia-cuda-runtime wheel has the first, nvidia-cuda-crt the second).
fn cuda_include(python_torch: Option<&Path>) -> Result<PathBuf, String> {
    let mut candidates = Vec::new();
    if let Some(dir) = env::var_os("HYTRAIN_CUDA_INCLUDE") {
        candidates.push(PathBuf::from(dir));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(dir) = env::var_os(var) {
            candidates.push(PathBuf::from(dir).join("include"));
        }
    }
    if let Some(dir) = env::var_os("LIBTORCH") {
        let libtorch = PathBuf::from(dir);
        // `cargo xtask setup` unpacks them here; a LIBTORCH that is pip's site-packages/torch has them beside it.
        candidates.push(libtorch.join("nvidia/cu13/include"));
        candidates.push(libtorch.join("../nvidia/cu13/include"));
    }
    if let Some(dir) = python_torch {
        candidates.push(dir.join("../nvidia/cu13/include"));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    if let Some(found) = candidates
        .iter()
        .find(|dir| dir.join("cuda_runtime_api.h").is_file() && dir.join("crt/host_defines.h").is_file())
    {
        return Ok(found.clone());
    }
    let half = candidates
        .iter()
        .find(|dir| dir.join("cuda_runtime_api.h").is_file())
        .map(|dir| {
            format!(
                " ({} has cuda_runtime_api.h but not crt/host_defines.h: pip install nvidia-cuda-crt==13.0.88 \
                 beside it)",
                dir.display()
            )
        })
        .unwrap_or_default();
    Err(format!(
        "the CUDA stream shim needs the CUDA runtime headers (cuda_runtime_api.h with crt/host_defines.h) and found \
         them in none of: {}{half}; run `cargo xtask setup` (it unpacks them from the pinned nvidia-cuda-runtime and \
         nvidia-cuda-crt wheels into .libtorch/nvidia/cu13/include), or set HYTRAIN_CUDA_INCLUDE to a folder \
         holding them (a CUDA 13 toolkit's include)",
        shown(&candidates)
    ))
}

fn shown(candidates: &[PathBuf]) -> String {
    if candidates.is_empty() {
        return "(no LIBTORCH, LIBTORCH_INCLUDE or LIBTORCH_USE_PYTORCH set)".into();
    }
    candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}
