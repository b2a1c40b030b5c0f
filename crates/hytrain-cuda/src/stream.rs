//! libtorch's current CUDA stream, which tch has no API for, through a small C++ shim (`shim/stream.cpp`).
//!
//! The shim calls `c10::cuda::getCurrentCUDAStream` and `setCurrentCUDAStream`, which live in libtorch's
//! `libc10_cuda.so`. The binary links the CPU libtorch only, which has no such library, so the shim cannot be linked
//! into it: build.rs compiles it into a shared object of its own, embedded here, and [`TorchStreams::load`] writes
//! it to an anonymous in-memory file (`memfd_create`) and opens that through `/proc/self/fd/N`, after
//! [`crate::load_torch_cuda`] has loaded `libtorch_cuda.so` (and with it `libc10_cuda.so`) `RTLD_GLOBAL`, where the
//! shim's undefined c10 symbols resolve.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::library::one_line;
use crate::CudaError;

/// The shim, built by build.rs.
static SHIM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libhytrain_cuda_stream.so"));

/// `c10::cuda::getCurrentCUDAStream(signed char)`: in the process once `libc10_cuda.so` is loaded globally.
const C10_CURRENT_STREAM: &CStr = c"_ZN3c104cuda20getCurrentCUDAStreamEa";

type CurrentStream = unsafe extern "C" fn(c_int, *mut *mut c_void, *mut c_char, usize) -> c_int;
type SetCurrentStream = unsafe extern "C" fn(c_int, *mut c_void, *mut c_char, usize) -> c_int;

/// libtorch's current CUDA stream per GPU, read and set through the shim. The current stream is per thread, as
/// in libtorch: each call answers for the calling thread.
pub struct TorchStreams {
    current: CurrentStream,
    set_current: SetCurrentStream,
    // Last: the functions above point into it.
    _library: libloading::os::unix::Library,
}

impl fmt::Debug for TorchStreams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TorchStreams").finish_non_exhaustive()
    }
}

impl TorchStreams {
    /// Opens the shim. libtorch's CUDA backend must be loaded already ([`crate::load_torch_cuda`]); without it this
    /// is [`CudaError::StreamShim`] saying so. Needs no GPU.
    pub fn load() -> Result<TorchStreams, CudaError> {
        // SAFETY: looks a NUL-terminated name up in the global scope.
        if unsafe { libc::dlsym(libc::RTLD_DEFAULT, C10_CURRENT_STREAM.as_ptr()) }.is_null() {
            return Err(CudaError::StreamShim {
                reason: "libc10_cuda.so is not loaded (no c10::cuda::getCurrentCUDAStream in this process); load \
                         libtorch's CUDA backend first (load_torch_cuda, which --device cuda does)"
                    .into(),
            });
        }
        let file = in_memory_file(SHIM)?;
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        // SAFETY: the shim has no initialisers of its own; its c10 symbols resolve against the loaded libc10_cuda.
        let library = unsafe { libloading::os::unix::Library::open(Some(&path), libc::RTLD_NOW | libc::RTLD_LOCAL) }
            .map_err(|e| CudaError::StreamShim {
                reason: format!("the stream shim did not load: {}", one_line(&e.to_string())),
            })?;
        // The mapping keeps the shim alive; the descriptor is no longer needed.
        drop(file);
        // SAFETY: the signatures are those of shim/stream.cpp's extern "C" functions.
        let (current, set_current) = unsafe {
            let symbol = |name: &'static [u8]| {
                library.get::<*mut c_void>(name).map(|s| *s).map_err(|e| CudaError::StreamShim {
                    reason: format!("the stream shim lacks a function: {}", one_line(&e.to_string())),
                })
            };
            let current = symbol(b"hytrain_current_stream\0")?;
            let set_current = symbol(b"hytrain_set_current_stream\0")?;
            (
                std::mem::transmute::<*mut c_void, CurrentStream>(current),
                std::mem::transmute::<*mut c_void, SetCurrentStream>(set_current),
            )
        };
        Ok(TorchStreams { current, set_current, _library: library })
    }

    /// The `cudaStream_t` of GPU `device`'s current stream on this thread (null for the legacy default stream,
    /// what libtorch uses until something sets another).
    pub fn current(&self, device: usize) -> Result<*mut c_void, CudaError> {
        let index = device_index(device, "getCurrentCUDAStream")?;
        let mut stream = std::ptr::null_mut();
        let mut error = [0 as c_char; 512];
        // SAFETY: writes one pointer, and at most `error.len()` bytes of message.
        let code = unsafe { (self.current)(index, &mut stream, error.as_mut_ptr(), error.len()) };
        check(code, &error, "getCurrentCUDAStream", device).map(|()| stream)
    }

    /// Makes `stream` GPU `device`'s current stream on this thread, so libtorch queues this thread's work on it.
    ///
    /// # Safety
    /// `stream` must be null (the legacy default stream) or a live CUDA stream of GPU `device` for as long as it
    /// stays current.
    pub unsafe fn set_current(&self, device: usize, stream: *mut c_void) -> Result<(), CudaError> {
        let index = device_index(device, "setCurrentCUDAStream")?;
        let mut error = [0 as c_char; 512];
        // SAFETY: writes at most `error.len()` bytes of message; the stream is the caller's promise.
        let code = unsafe { (self.set_current)(index, stream, error.as_mut_ptr(), error.len()) };
        check(code, &error, "setCurrentCUDAStream", device)
    }
}

/// c10 numbers GPUs with an `int8_t`.
fn device_index(device: usize, call: &'static str) -> Result<c_int, CudaError> {
    match i8::try_from(device) {
        Ok(index) => Ok(c_int::from(index)),
        Err(_) => Err(CudaError::Stream { call, device, message: "libtorch numbers GPUs up to 127".into() }),
    }
}

fn check(code: c_int, error: &[c_char], call: &'static str, device: usize) -> Result<(), CudaError> {
    if code == 0 {
        return Ok(());
    }
    let bytes: Vec<u8> = error.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    let text = String::from_utf8_lossy(&bytes);
    // c10's messages carry a backtrace after the first line.
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("no reason given");
    Err(CudaError::Stream { call, device, message: first.trim().to_string() })
}

/// An anonymous in-memory file holding `bytes`.
fn in_memory_file(bytes: &[u8]) -> Result<OwnedFd, CudaError> {
    let failed = |what: &str, e: std::io::Error| CudaError::StreamShim {
        reason: format!("cannot {what} the stream shim's in-memory file: {e}"),
    };
    // SAFETY: a NUL-terminated name; the returned descriptor is owned below.
    let fd = unsafe { libc::memfd_create(c"hytrain-cuda-stream".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(failed("create", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = File::from(fd);
    file.write_all(bytes).map_err(|e| failed("write", e))?;
    Ok(file.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This unit-test process never loads libtorch's CUDA backend (the integration test tests/stream_shim.rs loads
    /// a stand-in in a process of its own).
    #[test]
    fn without_libc10_cuda_loading_the_shim_says_to_load_libtorch_cuda_first() {
        let error = TorchStreams::load().unwrap_err().to_string();
        assert_eq!(
            error,
            "libtorch's CUDA streams are out of reach: libc10_cuda.so is not loaded (no \
             c10::cuda::getCurrentCUDAStream in this process); load libtorch's CUDA backend first \
             (load_torch_cuda, which --device cuda does)"
        );
    }

    #[test]
    fn the_embedded_shim_is_a_shared_object_exporting_both_functions() {
        assert_eq!(&SHIM[..4], b"\x7fELF");
        let text = String::from_utf8_lossy(SHIM);
        assert!(text.contains("hytrain_current_stream"));
        assert!(text.contains("hytrain_set_current_stream"));
        // It calls into libc10_cuda rather than carrying a copy of it.
        assert!(text.contains("_ZN3c104cuda20getCurrentCUDAStreamEa"));
    }

    #[test]
    fn a_gpu_index_beyond_what_c10_numbers_is_refused() {
        let error = device_index(128, "getCurrentCUDAStream").unwrap_err().to_string();
        assert_eq!(error, "getCurrentCUDAStream for cuda:128 failed: libtorch numbers GPUs up to 127");
        assert_eq!(device_index(127, "x").unwrap(), 127);
    }

    #[test]
    fn the_in_memory_file_holds_the_bytes_and_opens_through_proc() {
        let fd = in_memory_file(b"shim bytes").unwrap();
        let read = std::fs::read(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        assert_eq!(read, b"shim bytes");
    }
}
