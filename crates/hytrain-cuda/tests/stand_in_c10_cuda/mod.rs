//! A stand-in `libc10_cuda.so` for tests on machines without libtorch's CUDA half: compiled here from C++ against
//! the same c10/cuda and CUDA headers build.rs compiled the stream shim with, it defines the c10::cuda functions
//! the shim calls, so their signatures and ABI match the real library's by construction. Streams are the numbers a
//! test sets; the current stream is per thread and per GPU, as in libtorch; GPUs 0 to 7 exist, and asking for
//! another throws as c10 does (a multi-line message, like c10::Error's with its backtrace).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

const SOURCE: &str = r#"
#include <c10/cuda/CUDAStream.h>
#include <stdexcept>
#include <string>

namespace c10::cuda {
namespace {
thread_local cudaStream_t current[8] = {};
void check(DeviceIndex device) {
  if (device < 0 || device >= 8) {
    throw std::runtime_error("stand-in: no GPU " + std::to_string(device) + "\nException raised from check");
  }
}
}  // namespace

CUDAStream getStreamFromExternal(cudaStream_t stream, DeviceIndex device) {
  check(device);
  return CUDAStream(CUDAStream::UNCHECKED,
                    Stream(Stream::UNSAFE, Device(DeviceType::CUDA, device), reinterpret_cast<StreamId>(stream)));
}

CUDAStream getCurrentCUDAStream(DeviceIndex device) {
  check(device);
  return getStreamFromExternal(current[device], device);
}

void setCurrentCUDAStream(CUDAStream stream) {
  check(stream.device_index());
  current[stream.device_index()] = stream.stream();
}

cudaStream_t CUDAStream::stream() const { return reinterpret_cast<cudaStream_t>(id()); }
}  // namespace c10::cuda
"#;

/// Builds the stand-in once per test process and loads it `RTLD_GLOBAL`, as libtorch_cuda.so's load brings in the
/// real one; returns its path.
pub fn load() -> &'static PathBuf {
    static LOADED: OnceLock<PathBuf> = OnceLock::new();
    LOADED.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let source = dir.join("c10_cuda.cpp");
        std::fs::write(&source, SOURCE).unwrap();
        let out = dir.join("libc10_cuda.so");
        let torch = PathBuf::from(env!("HYTRAIN_SHIM_TORCH_INCLUDE"));
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let status = Command::new(&cxx)
            .args(["-std=c++17", "-O1", "-DNDEBUG", "-fPIC", "-shared", "-o"])
            .arg(&out)
            .arg(&source)
            .arg("-isystem")
            .arg(&torch)
            .arg("-isystem")
            .arg(env!("HYTRAIN_SHIM_CUDA_INCLUDE"))
            .arg("-Wl,-soname,libc10_cuda.so")
            .status()
            .unwrap_or_else(|e| panic!("these tests build a stand-in libc10_cuda.so with a C++ compiler ({cxx}): {e}"));
        assert!(status.success(), "{cxx} failed on {}", source.display());
        // SAFETY: the stand-in has no initialisers beyond its thread-local table; it stays loaded for the process.
        let library = unsafe {
            libloading::os::unix::Library::open(Some(&out), libc::RTLD_NOW | libc::RTLD_GLOBAL | libc::RTLD_NODELETE)
        }
        .unwrap();
        std::mem::forget(library);
        out
    })
}
