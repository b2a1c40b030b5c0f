// 2x2 max pooling with stride 2 (LeNet's and most CNNs' pooling) for contiguous float32 CPU tensors in training.
// libtorch's CPU max_pool2d runs a generic kernel (any window, stride, padding, dilation) that computes a 64-bit
// index per element; on LeNet it was about a quarter of a training step's CPU time. This kernel does the one fixed
// window with a branch-free loop and keeps the winner of each window as a 2-bit code (a byte) for backward.
//
// Results equal at::max_pool2d's bit for bit, gradients included: the window is scanned in the same order with the
// same rule (a value wins if it is greater than the running maximum or is NaN, starting from -inf and the window's
// first element), so ties and NaNs pick the same element. Anything else (other dtypes, devices or layouts, no grad
// needed, which includes validation and TorchScript tracing) goes to at::max_pool2d.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/max_pool2d.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>

#include "shim_error.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Output planes per parallel task: each plane is small (LeNet's largest is 14x14).
constexpr int64_t kGrain = 16;

// Pools `planes` planes of `h` x `w` floats into `oh` x `ow` (floor of half), writing each window's winner code:
// 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right.
void pool_forward(const float* in, float* out, std::uint8_t* codes, int64_t planes, int64_t h, int64_t w,
                  int64_t oh, int64_t ow) {
  at::parallel_for(0, planes, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* plane = in + p * h * w;
      float* o = out + p * oh * ow;
      std::uint8_t* c = codes + p * oh * ow;
      for (int64_t y = 0; y < oh; ++y) {
        const float* r0 = plane + 2 * y * w;
        const float* r1 = r0 + w;
        float* orow = o + y * ow;
        std::uint8_t* crow = c + y * ow;
        for (int64_t x = 0; x < ow; ++x) {
          const float v[4] = {r0[2 * x], r0[2 * x + 1], r1[2 * x], r1[2 * x + 1]};
          float best = -std::numeric_limits<float>::infinity();
          std::uint8_t code = 0;
          for (std::uint8_t k = 0; k < 4; ++k) {
            const bool wins = (v[k] > best) || std::isnan(v[k]);
            best = wins ? v[k] : best;
            code = wins ? k : code;
          }
          orow[x] = best;
          crow[x] = code;
        }
      }
    }
  });
}

// Routes each output gradient to its window's winner; every other input element's gradient is zero.
void pool_backward(const float* grad_out, const std::uint8_t* codes, float* grad_in, int64_t planes, int64_t h,
                   int64_t w, int64_t oh, int64_t ow) {
  at::parallel_for(0, planes, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* g = grad_out + p * oh * ow;
      const std::uint8_t* c = codes + p * oh * ow;
      float* plane = grad_in + p * h * w;
      for (int64_t y = 0; y < oh; ++y) {
        for (int64_t x = 0; x < ow; ++x) {
          const std::uint8_t code = c[y * ow + x];
          const int64_t at = (2 * y + (code >> 1)) * w + 2 * x + (code & 1);
          plane[at] = g[y * ow + x];
        }
      }
    }
  });
}

struct MaxPool2x2 : public torch::autograd::Function<MaxPool2x2> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input) {
    const int64_t n = input.size(0), c = input.size(1), h = input.size(2), w = input.size(3);
    const int64_t oh = h / 2, ow = w / 2;
    auto out = at::empty({n, c, oh, ow}, input.options());
    auto codes = at::empty({n, c, oh, ow}, input.options().dtype(at::kByte));
    pool_forward(input.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                 codes.mutable_data_ptr<std::uint8_t>(), n * c, h, w, oh, ow);
    ctx->save_for_backward({codes});
    ctx->saved_data["h"] = h;
    ctx->saved_data["w"] = w;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto codes = ctx->get_saved_variables()[0];
    const int64_t h = ctx->saved_data["h"].toInt(), w = ctx->saved_data["w"].toInt();
    const int64_t n = codes.size(0), c = codes.size(1), oh = codes.size(2), ow = codes.size(3);
    const auto grad_out = grads[0].contiguous();
    auto grad_in = at::zeros({n, c, h, w}, grad_out.options());
    pool_backward(grad_out.const_data_ptr<float>(), codes.const_data_ptr<std::uint8_t>(),
                  grad_in.mutable_data_ptr<float>(), n * c, h, w, oh, ow);
    return {grad_in};
  }
};

bool fast_path(const at::Tensor& x) {
  return at::GradMode::is_enabled() && x.requires_grad() && x.device().is_cpu() &&
         x.scalar_type() == at::kFloat && x.dim() == 4 && x.is_contiguous() && x.size(2) >= 2 && x.size(3) >= 2;
}

}  // namespace

extern "C" {

// max_pool2d(input, kernel 2, stride 2, no padding, dilation 1, floor mode) into `*out` (a new at::Tensor*, what
// tch's C_tensor is; the caller owns it). Returns 0, or 1 with a message in `err`.
int hyt_max_pool_2x2(void* input, void** out, char* err, size_t err_len) {
  return hytrain::guarded(err, err_len, [&] {
    const auto& x = *static_cast<at::Tensor*>(input);
    at::Tensor y = fast_path(x) ? MaxPool2x2::apply(x) : at::max_pool2d(x, {2, 2}, {2, 2}, {0, 0}, {1, 1}, false);
    *out = new at::Tensor(std::move(y));
  });
}

}  // extern "C"
