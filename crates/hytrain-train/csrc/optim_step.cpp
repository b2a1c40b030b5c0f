// In-place optimizer updates for hytrain's SGD and AdamW: tch 0.24 exposes neither `add_` with an alpha nor the
// `value` of `addcmul_`/`addcdiv_`, nor `out=` variants, so through tch alone every scaled term became a temporary
// tensor. These functions issue the same ATen calls, in the same order, as torch.optim's single-tensor (CPU) paths,
// writing the one result torch.optim allocates (`grad.add(...)`, `exp_avg_sq.sqrt() / ...`) into a reused scratch
// tensor instead, so a step allocates no tensor memory once the state exists.

#include <cstddef>
#include <cstdint>
#include <exception>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/_fused_sgd.h>
#include <ATen/ops/add.h>
#include <ATen/ops/sqrt.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include "shim_error.h"

namespace {

at::Tensor& as_tensor(void* t) { return *static_cast<at::Tensor*>(t); }

std::vector<at::Tensor> as_tensors(void** ts, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(as_tensor(ts[i]));
  }
  return out;
}

// Shapes `scratch` like `like`; resize_ keeps the storage when it is already large enough, so after the largest
// parameter has been seen once this allocates nothing.
at::Tensor& scratch_like(void* scratch, const at::Tensor& like) {
  auto& s = as_tensor(scratch);
  s.resize_(like.sizes());
  return s;
}

thread_local std::uint64_t cpu_allocations = 0;

// Counts, per calling thread, CPU allocations larger than a scalar (ATen wraps Scalar arguments of `mul_`, `div_`
// and `add_` into 0-dim tensors of at most 16 bytes; those are torch.optim's too, and not per-element memory).
struct CountingAllocator final : c10::Allocator {
  explicit CountingAllocator(c10::Allocator* inner) : inner_(inner) {}
  c10::DataPtr allocate(size_t n) override {
    if (n > 16) {
      ++cpu_allocations;
    }
    return inner_->allocate(n);
  }
  c10::DeleterFnPtr raw_deleter() const override { return inner_->raw_deleter(); }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    inner_->copy_data(dest, src, count);
  }
  c10::Allocator* inner_;
};

}  // namespace

extern "C" {

// One parameter's update of torch.optim.SGD (`_single_tensor_sgd`). `momentum_buffer` is ignored when `momentum`
// is 0; when `buffer_is_new` it is filled with this step's (decayed) gradient, as torch.optim's first step clones
// it. `scratch` (same dtype and device as the parameter) holds the decayed or Nesterov gradient. Returns 0, or 1
// with a message in `err`.
int hyt_sgd_step(void* param, void* grad, void* momentum_buffer, int buffer_is_new, void* scratch, double lr,
                 double weight_decay, double momentum, double dampening, int nesterov, char* err, size_t err_len) {
  return hytrain::guarded(err, err_len, [&] {
    at::NoGradGuard no_grad;
    auto& p = as_tensor(param);
    at::Tensor d_p = as_tensor(grad);
    if (weight_decay != 0) {
      // grad = grad.add(param, alpha=weight_decay)
      auto& s = scratch_like(scratch, p);
      at::add_out(s, d_p, p, weight_decay);
      d_p = s;
    }
    if (momentum != 0) {
      auto& buf = as_tensor(momentum_buffer);
      if (buffer_is_new) {
        buf.copy_(d_p);
      } else {
        buf.mul_(momentum).add_(d_p, 1 - dampening);
      }
      if (nesterov) {
        // grad = grad.add(buf, alpha=momentum); d_p may already be the scratch, which add_out allows as input.
        auto& s = scratch_like(scratch, p);
        at::add_out(s, d_p, buf, momentum);
        d_p = s;
      } else {
        d_p = buf;
      }
    }
    p.add_(d_p, -lr);
  });
}

// One parameter's update of torch.optim.AdamW (`_single_tensor_adam` with decoupled weight decay, no amsgrad).
// `step_size` is lr / bias_correction1 and `bias_correction2_sqrt` is bias_correction2 ** 0.5, computed by the
// caller in double as torch.optim does in Python. `scratch` holds the denominator. Returns 0, or 1 with a message
// in `err`.
int hyt_adamw_step(void* param, void* grad, void* exp_avg, void* exp_avg_sq, void* scratch, double lr,
                   double weight_decay, double beta1, double beta2, double eps, double step_size,
                   double bias_correction2_sqrt, char* err, size_t err_len) {
  return hytrain::guarded(err, err_len, [&] {
    at::NoGradGuard no_grad;
    auto& p = as_tensor(param);
    const auto& g = as_tensor(grad);
    auto& m = as_tensor(exp_avg);
    auto& v = as_tensor(exp_avg_sq);
    if (weight_decay != 0) {
      p.mul_(1 - lr * weight_decay);
    }
    m.lerp_(g, 1 - beta1);
    v.mul_(beta2).addcmul_(g, g, 1 - beta2);
    // denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    auto& denom = scratch_like(scratch, p);
    at::sqrt_out(denom, v);
    denom.div_(bias_correction2_sqrt).add_(eps);
    p.addcdiv_(m, denom, -step_size);
  });
}

// torch.optim.SGD(fused=True) over `n` parameters of one device and dtype: libtorch's `_fused_sgd_`, one
// multi-tensor kernel (on CUDA one launch per chunk of tensors) instead of a few kernels per parameter.
// `momentum_buffers` is ignored when `momentum` is 0; with `is_first_step` they are filled with this step's
// (decayed) gradients, as torch.optim's first step does. Returns 0, or 1 with a message in `err`.
int hyt_fused_sgd(void** params, void** grads, void** momentum_buffers, size_t n, double lr, double weight_decay,
                  double momentum, double dampening, int nesterov, int is_first_step, char* err, size_t err_len) {
  return hytrain::guarded(err, err_len, [&] {
    at::NoGradGuard no_grad;
    auto ps = as_tensors(params, n);
    auto gs = as_tensors(grads, n);
    std::vector<at::Tensor> bufs;
    if (momentum != 0) {
      bufs = as_tensors(momentum_buffers, n);
    }
    at::_fused_sgd_(ps, gs, bufs, weight_decay, momentum, lr, dampening, nesterov != 0, /*maximize=*/false,
                    is_first_step != 0);
  });
}

// torch.optim.AdamW(fused=True) over `n` parameters of one device and dtype: the step counts (float32 tensors on
// the parameters' device) are incremented with one `_foreach_add_`, then libtorch's `_fused_adamw_` updates
// parameters and moments in one multi-tensor kernel, reading the steps where they are. Returns 0, or 1 with a
// message in `err`.
int hyt_fused_adamw(void** params, void** grads, void** exp_avgs, void** exp_avg_sqs, void** steps, size_t n,
                    double lr, double weight_decay, double beta1, double beta2, double eps, char* err,
                    size_t err_len) {
  return hytrain::guarded(err, err_len, [&] {
    at::NoGradGuard no_grad;
    auto ps = as_tensors(params, n);
    auto gs = as_tensors(grads, n);
    auto ms = as_tensors(exp_avgs, n);
    auto vs = as_tensors(exp_avg_sqs, n);
    auto ss = as_tensors(steps, n);
    at::_foreach_add_(ss, 1);
    at::_fused_adamw_(ps, gs, ms, vs, /*max_exp_avg_sqs=*/{}, ss, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
  });
}

// For tests: the number of CPU tensor allocations larger than a scalar made so far on the calling thread. The
// first call wraps libtorch's CPU allocator in a counting one (for the whole process, delegating everything);
// allocations before it are not counted.
std::uint64_t hyt_cpu_allocations_on_this_thread() {
  static CountingAllocator* counting = [] {
    auto* a = new CountingAllocator(c10::GetCPUAllocator());
    c10::SetCPUAllocator(a, /*priority=*/UINT8_MAX);
    return a;
  }();
  (void)counting;
  return cpu_allocations;
}

}  // extern "C"
