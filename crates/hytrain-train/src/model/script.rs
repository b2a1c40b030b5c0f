//! TorchScript modules (`torch.jit.script` in Python, saved with `torch.jit.save`) trained like built-in models.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tch::{CModule, Device, TchError, Tensor};

use super::{Model, TorchScriptSource};
use crate::{Result, TrainError};

/// A TorchScript module whose parameters hytrain trains in place and saves back as TorchScript.
///
/// Buffers (BatchNorm running statistics) stay inside the module: tch exposes no buffer list for TorchScript
/// modules, so they are neither broadcast between ranks nor written to `model.safetensors`; `model.pt` keeps them.
#[derive(Debug)]
pub struct ScriptModel {
    // forward_t takes &self but switching train/eval mode needs &mut CModule; the mode is cached beside it.
    module: Mutex<(CModule, Option<bool>)>,
    params: Vec<(String, Tensor)>,
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
        let module = CModule::load_on_device(&path, device).map_err(|e| TrainError::torch(context(), e))?;
        let params = module
            .named_parameters()
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
        Ok(ScriptModel { module: Mutex::new((module, None)), params, path })
    }

    /// The file the module was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Saves the module (in eval mode, with its current weights) as TorchScript.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut guard = self.module.lock().unwrap_or_else(|p| p.into_inner());
        let (module, mode) = &mut *guard;
        let context = || format!("saving TorchScript model to {}", path.as_ref().display());
        module.f_set_eval().map_err(|e| TrainError::torch(context(), e))?;
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
            if train {
                module.f_set_train()?;
            } else {
                module.f_set_eval()?;
            }
            *mode = Some(train);
        }
        module.forward_ts(&[xs])
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }

    fn save_torchscript(&self, path: &Path, _example: &Tensor) -> Result<TorchScriptSource> {
        self.save(path)?;
        Ok(TorchScriptSource::Scripted)
    }
}
