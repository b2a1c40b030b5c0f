// Mixed precision for hytrain: tch's `autocast` toggles only CUDA autocast, and tch has no binding of the
// GradScaler's unscale kernel. These functions do what torch.autocast's __enter__/__exit__ and
// torch.amp.GradScaler.unscale_ do, for the CPU or CUDA autocast state of the calling thread.

#include <cstddef>
#include <cstdint>
#include <exception>
#include <vector>

#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/_amp_foreach_non_finite_check_and_unscale.h>
#include <c10/util/Exception.h>

#include "shim_error.h"

namespace {

// 0 is the CPU, 1 CUDA; the Rust side never passes anything else.
at::DeviceType device_type(int device) { return device == 1 ? at::kCUDA : at::kCPU; }

}  // namespace

extern "C" {

// The autocast state of `device` before entering, for `hyt_autocast_exit` to restore.
struct hyt_autocast_state {
  int enabled;
  int dtype;
  int cache_enabled;
};

// As torch.autocast(device, dtype).__enter__: remembers the previous state in `prev`, enables autocast to `dtype`
// (a c10::ScalarType code) and counts one more nesting level. Returns 0, or 1 with a message in `err`.
int hyt_autocast_enter(int device, int dtype, hyt_autocast_state* prev, char* err, size_t err_len) {
  return hytrain::guarded(err, err_len, [&] {
    auto type = device_type(device);
    prev->enabled = at::autocast::is_autocast_enabled(type) ? 1 : 0;
    prev->dtype = static_cast<int>(at::autocast::get_autocast_dtype(type));
    prev->cache_enabled = at::autocast::is_autocast_cache_enabled() ? 1 : 0;
    at::autocast::set_autocast_enabled(type, true);
    at::autocast::set_autocast_dtype(type, static_cast<at::ScalarType>(dtype));
    at::autocast::increment_nesting();
    at::autocast::set_autocast_cache_enabled(true);
  });
}

// As torch.autocast.__exit__: the outermost exit frees the cached lower-precision copies of the weights, then
// `prev` is restored.
void hyt_autocast_exit(int device, const hyt_autocast_state* prev) {
  try {
    auto type = device_type(device);
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(type, prev->enabled != 0);
    at::autocast::set_autocast_dtype(type, static_cast<at::ScalarType>(prev->dtype));
    at::autocast::set_autocast_cache_enabled(prev->cache_enabled != 0);
  } catch (const std::exception&) {
    // Only setters of thread-local flags run here; none throws in practice, and a destructor cannot report it.
  }
}

// Whether autocast is on for `device` on this thread, and to which dtype (c10::ScalarType code).
int hyt_autocast_is_enabled(int device) { return at::autocast::is_autocast_enabled(device_type(device)) ? 1 : 0; }
int hyt_autocast_dtype(int device) { return static_cast<int>(at::autocast::get_autocast_dtype(device_type(device))); }

// As torch.amp.GradScaler.unscale_ for one device: multiplies each of the `n` gradients (at::Tensor*, all on one
// device, float32) by `inv_scale` (a one-element float32 tensor) and sets `found_inf` (same) to 1 if any of them
// held an inf or NaN. Returns 0, or 1 with a message in `err`.
int hyt_unscale_grads(void* const* grads, size_t n, void* found_inf, void* inv_scale, char* err, size_t err_len) {
  return hytrain::guarded(err, err_len, [&] {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> list;
    list.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      list.push_back(*static_cast<at::Tensor*>(grads[i]));
    }
    at::_amp_foreach_non_finite_check_and_unscale_(list, *static_cast<at::Tensor*>(found_inf),
                                                    *static_cast<at::Tensor*>(inv_scale));
  });
}

}  // extern "C"
