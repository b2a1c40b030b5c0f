// What a training step must do without making the host wait for the GPU: clip gradients by their global norm with
// multi-tensor ops (`_foreach_norm`, one stacked norm, `_foreach_mul_` by the clamped coefficient, as
// torch.nn.utils.clip_grad_norm_ does, no value read back), and, for tests, count the libtorch operations that
// would make the host wait for a CUDA device on the calling thread.

#include <cstddef>
#include <cstdint>
// libtorch's release builds define NDEBUG, and RecordFunction has a member only without it: this file must see
// the class as libtorch was built, or reading its inputs reads past the object.
#ifndef NDEBUG
#define NDEBUG
#endif

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/record_function.h>

#include "shim_error.h"

namespace {

at::Tensor& as_tensor(void* t) { return *static_cast<at::Tensor*>(t); }

thread_local std::uint64_t host_syncs = 0;
thread_local bool watching = false;

bool on_host(const c10::IValue& v) { return v.isTensor() && v.toTensor().device().is_cpu(); }
bool on_device(const c10::IValue& v) { return v.isTensor() && !v.toTensor().device().is_cpu(); }

// Operations that block the host until the device has computed their input, on CUDA: reading a value
// (`item()`, `double_value` go through `_local_scalar_dense`), ops whose output size depends on the data, and
// copies device to host, or host to device from pageable memory or without non_blocking.
std::unique_ptr<at::ObserverContext> observe(const at::RecordFunction& fn) {
  const char* name = fn.name();
  if (std::strcmp(name, "aten::_local_scalar_dense") == 0 || std::strcmp(name, "aten::nonzero") == 0 ||
      std::strcmp(name, "aten::masked_select") == 0 || std::strcmp(name, "aten::equal") == 0) {
    ++host_syncs;
  } else if (std::strcmp(name, "aten::copy_") == 0) {
    auto inputs = fn.inputs();
    if (inputs.size() >= 3) {
      const auto& dst = inputs[0];
      const auto& src = inputs[1];
      bool non_blocking = inputs[2].isBool() && inputs[2].toBool();
      if (on_host(dst) && on_device(src)) {
        ++host_syncs;
      } else if (on_device(dst) && on_host(src) && !(non_blocking && src.toTensor().is_pinned())) {
        ++host_syncs;
      }
    }
  }
  return nullptr;
}

}  // namespace

extern "C" {

// Starts counting, on the calling thread only, the operations `observe` names; later calls do nothing.
void hyt_watch_host_syncs() {
  if (!watching) {
    at::addThreadLocalCallback(
        at::RecordFunctionCallback(observe).needsInputs(true).scopes({at::RecordScope::FUNCTION}));
    watching = true;
  }
}

// How many such operations the calling thread ran since it called hyt_watch_host_syncs.
std::uint64_t hyt_host_syncs_on_this_thread() { return host_syncs; }

// torch.nn.utils.clip_grad_norm_(grads, max_norm) with foreach=True: `n` gradient handles (undefined ones
// skipped), grouped by device and dtype; the total L2 norm (a 0-dim tensor on the first gradient's device, zero
// when there is none) replaces `*total_out`. The gradients are always multiplied by the coefficient clamped to 1,
// so nothing depends on a value the host would have to read.
int hyt_clip_grad_norm(void** grads, size_t n, double max_norm, void* total_out, char* err, size_t err_len) {
  return hytrain::guarded(err, err_len, [&] {
    at::NoGradGuard no_grad;
    std::vector<std::vector<at::Tensor>> groups;
    for (size_t i = 0; i < n; ++i) {
      const auto& g = as_tensor(grads[i]);
      if (!g.defined()) {
        continue;
      }
      auto same = [&](const std::vector<at::Tensor>& group) {
        return group[0].device() == g.device() && group[0].scalar_type() == g.scalar_type();
      };
      auto it = std::find_if(groups.begin(), groups.end(), same);
      if (it == groups.end()) {
        groups.push_back({g});
      } else {
        it->push_back(g);
      }
    }
    if (groups.empty()) {
      as_tensor(total_out) = at::zeros({}, at::kFloat);
      return;
    }
    auto first_device = groups[0][0].device();
    std::vector<at::Tensor> norms;
    for (const auto& group : groups) {
      for (auto& norm : at::_foreach_norm(group, 2)) {
        norms.push_back(norm.to(first_device));
      }
    }
    auto total = at::linalg_vector_norm(at::stack(norms), 2);
    auto coef = at::clamp(max_norm / (total + 1e-6), c10::nullopt, 1.0);
    for (auto& group : groups) {
      at::_foreach_mul_(group, coef.to(group[0].device()));
    }
    as_tensor(total_out) = total;
  });
}

}  // extern "C"
