//! TorchScript modules (`torch.jit.script` in Python, saved with `torch.jit.save`) trained like built-in models.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tch::{Device, TchError, Tensor};

use super::{Model, TorchScriptSource};
use crate::shim::{handle, shim};
use crate::{Result, TrainError};

/// Receives one named tensor from the shim: `tensor` is a new `torch::Tensor*` whose ownership passes over.
type NamedTensorFn = extern "C" fn(ctx: *mut c_void, name: *const c_char, tensor: *mut c_void);

extern "C" {
    fn hyt_script_load(
        path: *const c_char,
        device_index: c_int,
        out: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn hyt_script_free(module: *mut c_void);
    fn hyt_script_named_tensors(
        module: *mut c_void,
        buffers: c_int,
        ctx: *mut c_void,
        f: NamedTensorFn,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn hyt_script_set_training(module: *mut c_void, on: c_int, err: *mut c_char, len: usize) -> c_int;
    fn hyt_script_forward(
        module: *mut c_void,
        input: *mut c_void,
        out: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn hyt_script_save(module: *mut c_void, path: *const c_char, err: *mut c_char, len: usize) -> c_int;
}

/// A `torch::jit::Module` loaded by the shim (`csrc/script.cpp`), freed on drop. tch's `CModule` lists parameters
/// only; the shim lists buffers too.
#[derive(Debug)]
struct Module(*mut c_void);

// SAFETY: libtorch modules may move between threads; ScriptModel uses this one from one thread at a time (behind
// its mutex, or through `&mut`).
unsafe impl Send for Module {}

impl Drop for Module {
    fn drop(&mut self) {
        // SAFETY: the pointer came from hyt_script_load and is freed once.
        unsafe { hyt_script_free(self.0) }
    }
}

extern "C" fn push_named(ctx: *mut c_void, name: *const c_char, tensor: *mut c_void) {
    // SAFETY: `ctx` is the Vec that `Module::named` passed for this call; `name` is NUL-terminated for the call's
    // duration; `tensor` is a new `torch::Tensor*` whose ownership `from_ptr` takes.
    let out = unsafe { &mut *(ctx as *mut Vec<(String, Tensor)>) };
    // SAFETY: as above, `name` is a NUL-terminated string live for the call.
    let name = unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned();
    // SAFETY: as above, `tensor` is a new `torch::Tensor*` handed to us to own.
    out.push((name, unsafe { Tensor::from_ptr(tensor.cast()) }));
}

fn c_path(path: &Path) -> Result<CString, TchError> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| TchError::Torch(format!("the path {} holds a NUL byte", path.display())))
}

impl Module {
    fn load(path: &Path, device: Device) -> Result<Module, TchError> {
        let index = match device {
            Device::Cpu => -1,
            Device::Cuda(i) => i as c_int,
            other => {
                return Err(TchError::Torch(format!(
                    "TorchScript models train on the CPU or a CUDA GPU, not {other:?}"
                )))
            }
        };
        let path = c_path(path)?;
        let mut module = std::ptr::null_mut();
        // SAFETY: the path is NUL-terminated, `module` is written only on success, the error buffer is the shim's.
        shim(|err, len| unsafe { hyt_script_load(path.as_ptr(), index, &mut module, err, len) })?;
        Ok(Module(module))
    }

    /// Parameters or buffers, each sharing the module's tensor.
    fn named(&self, buffers: bool) -> Result<Vec<(String, Tensor)>, TchError> {
        let mut out: Vec<(String, Tensor)> = Vec::new();
        let ctx = &mut out as *mut Vec<(String, Tensor)> as *mut c_void;
        // SAFETY: the module is live; `push_named` gets `ctx`, our Vec, only during the call.
        shim(|err, len| unsafe { hyt_script_named_tensors(self.0, c_int::from(buffers), ctx, push_named, err, len) })?;
        Ok(out)
    }

    fn set_training(&mut self, on: bool) -> Result<(), TchError> {
        // SAFETY: the module is live.
        shim(|err, len| unsafe { hyt_script_set_training(self.0, c_int::from(on), err, len) })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        let mut out = std::ptr::null_mut();
        // SAFETY: the module and the input tensor are live for the call; on success `out` is a new `torch::Tensor*`
        // whose ownership `from_ptr` takes.
        shim(|err, len| unsafe { hyt_script_forward(self.0, handle(xs), &mut out, err, len) })?;
        // SAFETY: the call succeeded, so `out` is the new tensor described above.
        Ok(unsafe { Tensor::from_ptr(out.cast()) })
    }

    fn save(&self, path: &Path) -> Result<(), TchError> {
        let path = c_path(path)?;
        // SAFETY: the module is live and the path NUL-terminated.
        shim(|err, len| unsafe { hyt_script_save(self.0, path.as_ptr(), err, len) })
    }
}

/// A TorchScript module whose parameters hytrain trains in place and saves back as TorchScript.
///
/// Its buffers (BatchNorm running statistics) are listed like a built-in model's: rank 0's are broadcast, and
/// checkpoints and `model.safetensors` hold them beside the parameters, as does the saved `model.pt`.
#[derive(Debug)]
pub struct ScriptModel {
    // forward_t takes &self but switching train/eval mode changes the module; the mode is cached beside it.
    module: Mutex<(Module, Option<bool>)>,
    params: Vec<(String, Tensor)>,
    buffers: Vec<(String, Tensor)>,
    path: PathBuf,
}

impl ScriptModel {
    /// Loads a TorchScript file onto `device` and marks every parameter trainable.
    pub fn load(path: impl AsRef<Path>, device: Device) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if !path.is_file() {
            return Err(TrainError::ModelConfig {
                model: path.display().to_string(),
                detail: "no such TorchScript file; save one with torch.jit.save(torch.jit.script(model), path)".into(),
            });
        }
        tracing::warn!(
            path = %path.display(),
            "TorchScript is deprecated upstream as of PyTorch 2.11 and hytrain keeps it only for existing models; \
             export new ones with `python -m hytrain_export` and train the folder (README: Train your own model)"
        );
        let context = || format!("loading TorchScript model {}", path.display());
        let module = Module::load(&path, device).map_err(|e| TrainError::torch(context(), e))?;
        let params = module
            .named(false)
            .map_err(|e| TrainError::torch(context(), e))?
            .into_iter()
            .map(|(name, t)| Ok((name, t.f_set_requires_grad(true)?)))
            .collect::<Result<Vec<_>, TchError>>()
            .map_err(|e| TrainError::torch(context(), e))?;
        if params.is_empty() {
            return Err(TrainError::ModelConfig {
                model: path.display().to_string(),
                detail: "the TorchScript module has no parameters to train".into(),
            });
        }
        let buffers = module.named(true).map_err(|e| TrainError::torch(context(), e))?;
        Ok(ScriptModel { module: Mutex::new((module, None)), params, buffers, path })
    }

    /// The file the module was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Saves the module (in eval mode, with its current weights and buffers) as TorchScript.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut guard = self.module.lock().unwrap_or_else(|p| p.into_inner());
        let (module, mode) = &mut *guard;
        let context = || format!("saving TorchScript model to {}", path.as_ref().display());
        module.set_training(false).map_err(|e| TrainError::torch(context(), e))?;
        *mode = Some(false);
        module.save(path.as_ref()).map_err(|e| TrainError::torch(context(), e))
    }
}

impl Model for ScriptModel {
    fn name(&self) -> &str {
        "torchscript"
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let mut guard = self.module.lock().unwrap_or_else(|p| p.into_inner());
        let (module, mode) = &mut *guard;
        if *mode != Some(train) {
            module.set_training(train)?;
            *mode = Some(train);
        }
        module.forward(xs)
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }

    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        self.buffers.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }

    fn save_torchscript(&self, path: &Path, _example: &Tensor) -> Result<TorchScriptSource> {
        self.save(path)?;
        Ok(TorchScriptSource::Scripted)
    }
}
