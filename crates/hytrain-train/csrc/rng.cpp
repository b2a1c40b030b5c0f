// libtorch's default random generators (what dropout and other random ops draw from) as a checkpoint keeps them:
// tch can seed them but not read or restore their state, which torch.get_rng_state/set_rng_state do in Python.

#include <cstddef>
#include <mutex>

#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include "shim_error.h"

namespace {

// 0 is the CPU generator, 1 that of CUDA device `index`; the Rust side never passes anything else.
at::Generator generator(int device, int index) {
  if (device == 1) {
    return at::globalContext().defaultGenerator(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index)));
  }
  return at::globalContext().defaultGenerator(at::kCPU);
}

}  // namespace

extern "C" {

// Writes the generator's state (a CPU uint8 tensor, as torch.get_rng_state returns) into the tensor `out` points
// to. Returns 0, or 1 with a message in `err`.
int hyt_rng_get_state(int device, int index, void* out, char* err, size_t err_len) {
  return hytrain::guarded(err, err_len, [&] {
    auto gen = generator(device, index);
    std::lock_guard<std::mutex> lock(gen.mutex());
    *static_cast<at::Tensor*>(out) = gen.get_state();
  });
}

// Restores a state `hyt_rng_get_state` returned; libtorch refuses one of the wrong size or kind.
int hyt_rng_set_state(int device, int index, void* state, char* err, size_t err_len) {
  return hytrain::guarded(err, err_len, [&] {
    auto gen = generator(device, index);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(*static_cast<at::Tensor*>(state));
  });
}

}  // extern "C"
