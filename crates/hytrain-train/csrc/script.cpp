// TorchScript modules (`torch.jit.save` files) loaded and run through libtorch's own API: tch lists a module's
// parameters but not its buffers (BatchNorm running statistics), which ranks must share and checkpoints must hold.

#include <torch/script.h>

#include <stdexcept>
#include <string>

#include "shim_error.h"

using torch::jit::Module;

// Receives one named tensor; `tensor` is a new `torch::Tensor*` the callee owns (tch frees it).
typedef void (*hyt_named_tensor_fn)(void* ctx, const char* name, torch::Tensor* tensor);

extern "C" {

// Loads the TorchScript file at `path` onto the CPU (`device_index` -1) or a GPU; `*out` owns the module (free it
// with hyt_script_free).
int hyt_script_load(const char* path, int device_index, void** out, char* err, size_t err_len) {
  return hytrain::guarded(err, err_len, [&] {
    auto device = device_index < 0 ? c10::Device(c10::kCPU)
                                   : c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(device_index));
    *out = new Module(torch::jit::load(std::string(path), device));
  });
}

void hyt_script_free(void* module) { delete static_cast<Module*>(module); }

// Calls `f` for each parameter (`buffers` 0) or buffer (`buffers` 1) of the module and its submodules, under the
// names `state_dict` gives them, in `named_parameters()` / `named_buffers()` order. The tensors are the module's
// own: writing into them changes the module.
int hyt_script_named_tensors(void* module, int buffers, void* ctx, hyt_named_tensor_fn f, char* err,
                             size_t err_len) {
  return hytrain::guarded(err, err_len, [&] {
    auto m = static_cast<Module*>(module);
    if (buffers != 0) {
      for (const auto& b : m->named_buffers(/*recurse=*/true)) {
        f(ctx, b.name.c_str(), new torch::Tensor(b.value));
      }
    } else {
      for (const auto& p : m->named_parameters(/*recurse=*/true)) {
        f(ctx, p.name.c_str(), new torch::Tensor(p.value));
      }
    }
  });
}

// `module.train(on)`: training behaviour (batch statistics, dropout) or eval behaviour.
int hyt_script_set_training(void* module, int on, char* err, size_t err_len) {
  return hytrain::guarded(err, err_len, [&] { static_cast<Module*>(module)->train(on != 0); });
}

// `module(input)`, which must return one tensor; `*out` is a new `torch::Tensor*` the caller owns.
int hyt_script_forward(void* module, torch::Tensor* input, torch::Tensor** out, char* err, size_t err_len) {
  return hytrain::guarded(err, err_len, [&] {
    auto result = static_cast<Module*>(module)->forward({*input});
    if (!result.isTensor()) {
      throw std::runtime_error(std::string("the module's forward returned ") + result.tagKind() +
                               ", not one tensor of logits");
    }
    *out = new torch::Tensor(result.toTensor());
  });
}

// `torch.jit.save(module, path)`.
int hyt_script_save(void* module, const char* path, char* err, size_t err_len) {
  return hytrain::guarded(err, err_len, [&] { static_cast<Module*>(module)->save(std::string(path)); });
}

}  // extern "C"
