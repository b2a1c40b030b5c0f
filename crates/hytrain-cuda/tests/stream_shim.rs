//! The CUDA stream shim, loaded from memory the way a GPU job loads it, against a stand-in libc10_cuda.so built
//! from the same headers (see stand_in_c10_cuda): libtorch's current stream is read and set through it, per
//! thread and per GPU, and libtorch's refusals come back as one-line errors. Whether the shim loads without
//! libc10_cuda is the unit test in src/stream.rs (this process has the stand-in loaded).

mod stand_in_c10_cuda;

use std::ffi::c_void;

use hytrain_cuda::{CudaError, TorchStreams};

fn stream(n: usize) -> *mut c_void {
    n as *mut c_void
}

#[test]
fn the_current_stream_starts_as_the_default_and_follows_what_is_set() {
    stand_in_c10_cuda::load();
    let streams = TorchStreams::load().unwrap();
    assert_eq!(streams.current(1).unwrap(), std::ptr::null_mut(), "the legacy default stream");
    // SAFETY: the stand-in takes any number as a stream.
    unsafe { streams.set_current(1, stream(0x2000)).unwrap() };
    assert_eq!(streams.current(1).unwrap(), stream(0x2000));
    assert_eq!(streams.current(0).unwrap(), std::ptr::null_mut(), "other GPUs keep theirs");
    // SAFETY: as above.
    unsafe { streams.set_current(1, std::ptr::null_mut()).unwrap() };
    assert_eq!(streams.current(1).unwrap(), std::ptr::null_mut());
}

#[test]
fn the_current_stream_is_per_thread_as_in_libtorch() {
    stand_in_c10_cuda::load();
    let streams = TorchStreams::load().unwrap();
    // SAFETY: the stand-in takes any number as a stream.
    unsafe { streams.set_current(2, stream(0x3000)).unwrap() };
    let other = std::thread::spawn(|| {
        let streams = TorchStreams::load().unwrap();
        streams.current(2).unwrap() as usize
    })
    .join()
    .unwrap();
    assert_eq!(other, 0);
    assert_eq!(streams.current(2).unwrap(), stream(0x3000));
}

#[test]
fn libtorchs_refusal_comes_back_as_its_first_line_naming_the_call_and_gpu() {
    stand_in_c10_cuda::load();
    let streams = TorchStreams::load().unwrap();
    let error = streams.current(9).unwrap_err();
    assert!(matches!(error, CudaError::Stream { .. }));
    assert_eq!(error.to_string(), "getCurrentCUDAStream for cuda:9 failed: stand-in: no GPU 9");
    // SAFETY: refused before any stream is used.
    let error = unsafe { streams.set_current(12, stream(0x1)) }.unwrap_err();
    assert_eq!(error.to_string(), "setCurrentCUDAStream for cuda:12 failed: stand-in: no GPU 12");
}
