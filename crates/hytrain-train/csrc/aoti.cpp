// AOTInductor packages (`.pt2`, written by `python -m hytrain_export`) run through libtorch's own loader, and a
// gradient a compiled step returned becomes a parameter's `.grad` without a copy. tch binds neither.

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <dlfcn.h>

#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "shim_error.h"

using torch::inductor::AOTIModelPackageLoader;

extern "C" {

// Loads the package at `path` for the CPU (`device_index` -1) or a GPU; `*out` owns the loader (free it with
// hyt_aoti_free).
int hyt_aoti_load(const char* path, int device_index, void** out, char* err, size_t err_len) {
  // A compiled package links libtorch.so, which a binary that uses only libtorch_cpu.so's symbols has not loaded:
  // load it the way this binary found libtorch_cpu.so (its rpath), so the package's dependency resolves to it.
  static const bool libtorch_loaded = dlopen("libtorch.so", RTLD_NOW | RTLD_GLOBAL) != nullptr;
  (void)libtorch_loaded;
  return hytrain::guarded(err, err_len, [&] {
    auto loader = std::make_unique<AOTIModelPackageLoader>(std::string(path), "model", false, 1,
                                                           static_cast<c10::DeviceIndex>(device_index));
    *out = loader.release();
  });
}

void hyt_aoti_free(void* loader) { delete static_cast<AOTIModelPackageLoader*>(loader); }

// Runs the package on `inputs`; exactly `n_outputs` tensors must come back, each written to `outputs[i]` as a new
// `torch::Tensor*` the caller owns (tch frees it).
int hyt_aoti_run(void* loader, torch::Tensor** inputs, size_t n_inputs, torch::Tensor** outputs, size_t n_outputs,
                 char* err, size_t err_len) {
  return hytrain::guarded(err, err_len, [&] {
    std::vector<at::Tensor> in;
    in.reserve(n_inputs);
    for (size_t i = 0; i < n_inputs; ++i) {
      in.push_back(*inputs[i]);
    }
    auto out = static_cast<AOTIModelPackageLoader*>(loader)->run(in);
    if (out.size() != n_outputs) {
      std::ostringstream msg;
      msg << "the package returned " << out.size() << " tensors, but its metadata promises " << n_outputs;
      throw std::runtime_error(msg.str());
    }
    for (size_t i = 0; i < n_outputs; ++i) {
      outputs[i] = new torch::Tensor(std::move(out[i]));
    }
  });
}

// `param.grad = grad` (the same storage, as autograd's first accumulation does).
int hyt_set_grad(torch::Tensor* param, torch::Tensor* grad, char* err, size_t err_len) {
  return hytrain::guarded(err, err_len, [&] { param->mutable_grad() = *grad; });
}

}  // extern "C"
