// hytrain's C++ shim over libtorch's autograd: tch 0.24 has no API for autograd hooks, and overlapping gradient
// allreduces with backward needs to know when each parameter's gradient is final. libtorch calls a tensor's
// post-accumulate-grad hook right after backward has accumulated into its .grad; this file installs one that calls
// back into Rust with the parameter's index.

#include <cstddef>
#include <exception>
#include <memory>

#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/variable.h>

#include "shim_error.h"

extern "C" {
typedef void (*hyt_grad_ready_fn)(const void* ctx, size_t index);
typedef void (*hyt_release_fn)(const void* ctx);
}

namespace {

// Holds one reference to `ctx`, given back through `release` when libtorch drops the hook (replaced, cleared, or
// the tensor freed), so the callback never sees a freed context.
struct GradReadyHook final : torch::autograd::PostAccumulateGradHook {
  GradReadyHook(hyt_grad_ready_fn fn, const void* ctx, size_t index, hyt_release_fn release)
      : fn_(fn), ctx_(ctx), index_(index), release_(release) {}
  ~GradReadyHook() override { release_(ctx_); }
  void operator()(const torch::autograd::Variable& /*tensor*/) override { fn_(ctx_, index_); }

  hyt_grad_ready_fn fn_;
  const void* ctx_;
  size_t index_;
  hyt_release_fn release_;
};

using hytrain::write_error;

}  // namespace

extern "C" {

// Installs the hook on `tensor` (an at::Tensor* (torch::Tensor), as tch's C_tensor is), replacing any post-accumulate-grad hook
// it had. The hook owns one reference to `ctx` from now on, even when this fails (then it is released at once).
// Returns 0, or 1 with a message in `err`.
int hyt_set_grad_ready_hook(void* tensor, hyt_grad_ready_fn fn, const void* ctx, size_t index,
                            hyt_release_fn release, char* err, size_t err_len) {
  std::unique_ptr<GradReadyHook> hook;
  try {
    hook = std::make_unique<GradReadyHook>(fn, ctx, index, release);
  } catch (const std::exception& e) {
    release(ctx);
    write_error(err, err_len, e.what());
    return 1;
  }
  try {
    const auto& t = *static_cast<at::Tensor*>(tensor);
    if (!t.defined()) {
      write_error(err, err_len, "undefined tensor");
      return 1;
    }
    if (!t.is_leaf() || !t.requires_grad()) {
      write_error(err, err_len, "not a leaf tensor that requires grad");
      return 1;
    }
    torch::autograd::impl::set_post_acc_grad_hooks(t, std::move(hook));
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return 1;
  }
}

// Removes the hook from `tensor` if it is one of ours; returns 1 if one was removed, 0 otherwise.
int hyt_clear_grad_ready_hook(void* tensor) {
  try {
    const auto& t = *static_cast<at::Tensor*>(tensor);
    if (!t.defined()) {
      return 0;
    }
    auto& current = torch::autograd::impl::post_acc_grad_hooks(t);
    if (current == nullptr || dynamic_cast<GradReadyHook*>(current.get()) == nullptr) {
      return 0;
    }
    torch::autograd::impl::set_post_acc_grad_hooks(t, nullptr);
    return 1;
  } catch (const std::exception&) {
    return 0;
  }
}

// Sets `reached[i]` to 1 for each of the `n` parameters whose gradient accumulator the autograd graph of `loss`
// reaches, that is those a backward of `loss` gives a gradient (the others are left as they were); what PyTorch
// DDP's find_unused_parameters walks. Returns 0, or 1 with a message in `err`.
int hyt_params_reached(void* loss, void** params, size_t n, unsigned char* reached, char* err, size_t err_len) {
  return hytrain::guarded(err, err_len, [&] {
    const auto& l = *static_cast<at::Tensor*>(loss);
    std::unordered_map<const c10::TensorImpl*, size_t> index;
    for (size_t i = 0; i < n; ++i) {
      index.emplace(static_cast<at::Tensor*>(params[i])->unsafeGetTensorImpl(), i);
    }
    const auto& root = l.grad_fn();
    if (root == nullptr) {
      auto it = index.find(l.unsafeGetTensorImpl());
      if (it != index.end() && l.requires_grad()) {
        reached[it->second] = 1;
      }
      return;
    }
    std::vector<torch::autograd::Node*> stack{root.get()};
    std::unordered_set<torch::autograd::Node*> seen{root.get()};
    while (!stack.empty()) {
      auto* node = stack.back();
      stack.pop_back();
      if (auto* acc = dynamic_cast<torch::autograd::AccumulateGrad*>(node)) {
        auto it = index.find(acc->variable.unsafeGetTensorImpl());
        if (it != index.end()) {
          reached[it->second] = 1;
        }
      }
      for (const auto& edge : node->next_edges()) {
        auto* next = edge.function.get();
        if (next != nullptr && seen.insert(next).second) {
          stack.push_back(next);
        }
      }
    }
  });
}

}  // extern "C"
