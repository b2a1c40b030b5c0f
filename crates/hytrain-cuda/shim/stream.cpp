// hytrain's CUDA stream shim: libtorch's current CUDA stream, which tch has no API for.
//
// build.rs compiles this into its own shared object, against libtorch's c10/cuda headers and the CUDA runtime
// headers; it links nothing of libtorch's. hytrain-cuda (src/stream.rs) opens it at run time only after
// libtorch_cuda.so is loaded RTLD_GLOBAL, whose libc10_cuda.so defines the c10::cuda functions called here. The
// binary itself links the CPU libtorch only, so this cannot be linked into it.
#include <c10/cuda/CUDAStream.h>

#include <cstddef>
#include <cstdio>
#include <exception>

namespace {

// c10::Error's what() carries a backtrace after the first line; hytrain keeps the first line.
int fail(const char* what, char* error, std::size_t length) {
  if (error != nullptr && length > 0) {
    std::snprintf(error, length, "%s", what);
  }
  return 1;
}

}  // namespace

extern "C" {

// Writes the cudaStream_t of the current stream of GPU `device` on the calling thread (nullptr for the legacy
// default stream) to `stream`; 0 on success, else 1 with the reason in `error`.
__attribute__((visibility("default"))) int hytrain_current_stream(int device, void** stream, char* error,
                                                                   std::size_t length) {
  try {
    *stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what(), error, length);
  } catch (...) {
    return fail("unknown C++ exception", error, length);
  }
}

// Makes `stream` (a cudaStream_t of GPU `device`, nullptr for the legacy default stream) the current stream of
// `device` on the calling thread, so libtorch queues that thread's work there; 0 on success, else 1 with the
// reason in `error`.
__attribute__((visibility("default"))) int hytrain_set_current_stream(int device, void* stream, char* error,
                                                                       std::size_t length) {
  try {
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromExternal(static_cast<cudaStream_t>(stream),
                                                                     static_cast<c10::DeviceIndex>(device)));
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what(), error, length);
  } catch (...) {
    return fail("unknown C++ exception", error, length);
  }
}

}  // extern "C"
