//! Models exported with `python -m hytrain_export` (torch.export + AOTInductor): the user's own `nn.Module`, trained
//! with no Python. The model folder holds a compiled training step
//! `(input, target, *parameters, *buffers) -> (loss, *gradients, *new_buffers)`, a compiled eval-mode forward pass
//! `(input, *parameters, *buffers) -> output`, the initial weights under the module's `state_dict` names and
//! `hytrain-model.json`. The engine owns the parameters and passes them in, so its buckets, collectives, optimizers,
//! checkpoints and export serve these models as they serve built-in ones.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void, CString};
use std::path::{Path, PathBuf};

use tch::{Device, Kind, TchError, Tensor};

use super::{DataSpec, Model, TorchScriptSource};
use crate::export::TORCH_VERSION;
use crate::shim::{handle, shim_message};
use crate::{Result, TrainError};

extern "C" {
    fn hyt_aoti_load(
        path: *const c_char,
        device_index: c_int,
        out: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn hyt_aoti_free(loader: *mut c_void);
    fn hyt_aoti_run(
        loader: *mut c_void,
        inputs: *const *mut c_void,
        n_inputs: usize,
        outputs: *mut *mut c_void,
        n_outputs: usize,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
}

/// The metadata file of an exported model folder.
const METADATA: &str = "hytrain-model.json";
const FORMAT: &str = "hytrain-exported-model";
const FORMAT_VERSION: u32 = 1;
const EXPORT_HINT: &str = "export the model with `python -m hytrain_export` (README: Train your own model)";

/// One tensor's name, shape and dtype as the metadata lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TensorSpec {
    /// The module's `state_dict` name.
    pub name: String,
    /// Shape.
    pub shape: Vec<i64>,
    /// PyTorch's dtype name (`float32`, `int64`).
    pub dtype: String,
}

/// One sample's shape and dtype (without the batch dimension).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SampleSpec {
    /// Shape without the batch dimension.
    pub shape: Vec<i64>,
    /// PyTorch's dtype name.
    pub dtype: String,
}

/// The batch sizes the packages accept.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatchRange {
    /// Smallest batch.
    pub min: i64,
    /// Largest batch.
    pub max: i64,
}

/// The package files of the folder.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Packages {
    /// The compiled training step.
    pub train_step: String,
    /// The compiled forward pass.
    pub forward: String,
}

/// `hytrain-model.json`: what `python -m hytrain_export` wrote about the model. Fields hytrain does not read are
/// kept as they are when it writes the file again.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExportedMetadata {
    /// Always `hytrain-exported-model`.
    pub format: String,
    /// Version of the folder layout.
    pub format_version: u32,
    /// The module's class name.
    pub name: String,
    /// The torch version the packages were compiled with.
    pub torch_version: String,
    /// `cpu` or `cuda`.
    pub device: String,
    /// One input sample.
    pub input: SampleSpec,
    /// One output sample.
    pub output: SampleSpec,
    /// One target sample.
    pub target: SampleSpec,
    /// The loss compiled into the step (`cross_entropy`, `mse` or the user's function).
    pub loss: String,
    /// Batch sizes the packages take.
    pub batch: BatchRange,
    /// Trained parameters, in the order the step takes them and returns their gradients.
    pub parameters: Vec<TensorSpec>,
    /// Buffers (BatchNorm running statistics), in the order the step takes and returns them.
    pub buffers: Vec<TensorSpec>,
    /// `state_dict` names that share another name's tensor (tied weights): alias -> name.
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
    /// Package files.
    pub packages: Packages,
    /// The weights file (initial, or trained when hytrain exported the folder).
    pub weights: String,
    /// Everything else the export recorded (its options, the float64 check).
    #[serde(flatten)]
    pub rest: BTreeMap<String, serde_json::Value>,
}

impl ExportedMetadata {
    /// Reads `hytrain-model.json` of the folder `dir`, refusing a folder that is not an exported model or was
    /// written in another layout version. Nothing else is loaded.
    pub fn read(dir: &Path) -> Result<Self> {
        let refuse = |detail: String| TrainError::ModelConfig { model: dir.display().to_string(), detail };
        let path = dir.join(METADATA);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(refuse(format!(
                    "the folder has no {METADATA}, so it is not an exported model; {EXPORT_HINT}"
                )))
            }
            Err(e) => return Err(TrainError::io("read", &path, e)),
        };
        let meta: ExportedMetadata = serde_json::from_str(&text)
            .map_err(|e| refuse(format!("{METADATA} is not the metadata of an exported model ({e}); {EXPORT_HINT}")))?;
        if meta.format != FORMAT || meta.format_version != FORMAT_VERSION {
            return Err(refuse(format!(
                "{METADATA} is format '{}' version {}, but this hytrain reads '{FORMAT}' version {FORMAT_VERSION}; \
                 export the model again with this hytrain's python/ package",
                meta.format, meta.format_version
            )));
        }
        Ok(meta)
    }

    /// The sequence length of a model that takes token ids (`int64` inputs of one dimension).
    pub fn context_length(&self) -> Option<usize> {
        match self.input.shape[..] {
            [t] if self.input.dtype == "int64" => usize::try_from(t).ok(),
            _ => None,
        }
    }

    /// The number of classes (or vocabulary ids) a cross-entropy model scores: its output's last dimension.
    pub fn classes(&self) -> Option<i64> {
        (self.loss == "cross_entropy").then(|| self.output.shape.last().copied()).flatten()
    }
}

fn kind_of(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "float32" => Kind::Float,
        "float64" => Kind::Double,
        "float16" => Kind::Half,
        "bfloat16" => Kind::BFloat16,
        "int64" => Kind::Int64,
        "int32" => Kind::Int,
        "uint8" => Kind::Uint8,
        "bool" => Kind::Bool,
        _ => return None,
    })
}

/// The public release of a torch version (`2.11.0+cu130` -> `2.11.0`).
fn release(version: &str) -> &str {
    version.split('+').next().unwrap_or(version).trim()
}

/// One AOTInductor package, loaded by libtorch's `AOTIModelPackageLoader`.
struct Package {
    loader: *mut c_void,
    path: PathBuf,
}

// SAFETY: the loader has no thread affinity; the model that owns it is used by one thread at a time (`&self` calls
// come from the training thread; `Model` is `Send`, not `Sync`).
unsafe impl Send for Package {}

/// Held while a package is loaded or freed. libtorch's `AOTIModelPackageLoader` is not safe to construct or destroy
/// from two threads at once (it extracts the package and dlopens its library; two ranks of one process loading
/// together corrupted the heap, in `load_json_file`, in about half of the test runs). A process loads its model
/// once, so the wait costs nothing outside tests, where several ranks share a process.
static LOADER: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn loader_lock() -> std::sync::MutexGuard<'static, ()> {
    // The lock guards no data: a panic while it was held leaves nothing inconsistent.
    LOADER.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Package {
    fn load(path: &Path, device: Device) -> Result<Package, String> {
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| "path holds a NUL byte")?;
        let index = match device {
            Device::Cuda(i) => i as c_int,
            _ => -1,
        };
        let mut loader = std::ptr::null_mut();
        let _one_at_a_time = loader_lock();
        // SAFETY: the path is NUL-terminated, `loader` is written only on success, the error buffer is the shim's.
        shim_message(|err, len| unsafe { hyt_aoti_load(c_path.as_ptr(), index, &mut loader, err, len) })?;
        Ok(Package { loader, path: path.to_path_buf() })
    }

    /// Runs the package; `outputs` is how many tensors it must return.
    fn run(&self, inputs: &[&Tensor], outputs: usize) -> Result<Vec<Tensor>, TchError> {
        let handles: Vec<*mut c_void> = inputs.iter().map(|t| handle(t)).collect();
        let mut out = vec![std::ptr::null_mut(); outputs];
        // SAFETY: the handles are live tch tensors (`torch::Tensor*`) for the call's duration; on success the shim
        // wrote `outputs` new `torch::Tensor*` that we own from here on.
        shim_message(|err, len| unsafe {
            hyt_aoti_run(self.loader, handles.as_ptr(), handles.len(), out.as_mut_ptr(), outputs, err, len)
        })
        .map_err(|e| TchError::Torch(format!("running {}: {e}", self.path.display())))?;
        // SAFETY: each pointer is a heap `torch::Tensor` the shim gave up; tch frees it on drop.
        Ok(out.into_iter().map(|p| unsafe { Tensor::from_ptr(p.cast()) }).collect())
    }
}

impl Drop for Package {
    fn drop(&mut self) {
        let _one_at_a_time = loader_lock();
        // SAFETY: the loader came from hyt_aoti_load and is freed once.
        unsafe { hyt_aoti_free(self.loader) }
    }
}

impl std::fmt::Debug for Package {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Package").field("path", &self.path).finish()
    }
}

/// A model exported with `python -m hytrain_export`: trained through its compiled step, evaluated through its
/// compiled forward pass.
#[derive(Debug)]
pub struct ExportedModel {
    dir: PathBuf,
    meta: ExportedMetadata,
    step: Package,
    forward: Package,
    params: Vec<(String, Tensor)>,
    buffers: Vec<(String, Tensor)>,
}

/// A training step compiled ahead of time: loss and gradients of a batch in one call, without libtorch's autograd.
pub trait CompiledStep {
    /// The loss (a scalar tensor) and one gradient per parameter, in [`Model::named_parameters`]' order, of inputs
    /// `xs` and targets `ys`; the model's buffers (BatchNorm running statistics) are updated as the forward pass
    /// of a training step updates them.
    fn loss_and_grads(&self, xs: &Tensor, ys: &Tensor) -> Result<(Tensor, Vec<Tensor>)>;
}

impl ExportedModel {
    /// Loads the exported model folder `dir` onto `device`, refusing a folder that is not one, packages built by
    /// another torch release or for another device, and weights that do not match the metadata.
    pub fn load(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let model = dir.display().to_string();
        let refuse = |detail: String| TrainError::ModelConfig { model: model.clone(), detail };
        let meta = ExportedMetadata::read(&dir)?;
        if release(&meta.torch_version) != release(TORCH_VERSION) {
            return Err(refuse(format!(
                "its packages were compiled by torch {}, but hytrain runs libtorch {}; AOTInductor packages only \
                 run on the release that built them: export again with torch=={}",
                meta.torch_version,
                TORCH_VERSION,
                release(TORCH_VERSION)
            )));
        }
        let wanted = if device.is_cuda() { "cuda" } else { "cpu" };
        if meta.device != wanted {
            return Err(refuse(format!(
                "its packages were compiled for {}, but this run uses {wanted} (--device); export again with \
                 --device {wanted}{}",
                meta.device,
                if wanted == "cuda" { " on a GPU machine" } else { "" }
            )));
        }
        for (what, name) in [
            ("training step package", &meta.packages.train_step),
            ("forward package", &meta.packages.forward),
            ("weights", &meta.weights),
        ] {
            if !dir.join(name).is_file() {
                return Err(refuse(format!("its {what} {name} is missing; export the folder again")));
            }
        }
        let weights_path = dir.join(&meta.weights);
        let weights: BTreeMap<String, Tensor> = Tensor::read_safetensors(&weights_path)
            .map_err(|e| refuse(format!("cannot read its weights {}: {e}", meta.weights)))?
            .into_iter()
            .collect();
        let take = |spec: &TensorSpec, role: &str| -> Result<(String, Tensor)> {
            let t = weights
                .get(&spec.name)
                .ok_or_else(|| refuse(format!("{} has no tensor {} ({role})", meta.weights, spec.name)))?;
            let kind = kind_of(&spec.dtype).ok_or_else(|| {
                refuse(format!("{role} {} has dtype {}, which hytrain cannot hold", spec.name, spec.dtype))
            })?;
            if t.size() != spec.shape || t.kind() != kind {
                return Err(refuse(format!(
                    "{role} {} is {:?} {:?} in {} but {:?} {} in {METADATA}",
                    spec.name,
                    t.size(),
                    t.kind(),
                    meta.weights,
                    spec.shape,
                    spec.dtype
                )));
            }
            let t = t
                .f_to_device(device)
                .and_then(|t| t.f_contiguous())
                .map_err(|e| TrainError::torch(format!("moving {} to {device:?}", spec.name), e))?;
            Ok((spec.name.clone(), t))
        };
        let params = meta
            .parameters
            .iter()
            .map(|s| take(s, "parameter").and_then(|(n, t)| Ok((n, trainable(t)?))))
            .collect::<Result<Vec<_>>>()?;
        let buffers = meta.buffers.iter().map(|s| take(s, "buffer")).collect::<Result<Vec<_>>>()?;
        let package = |name: &str| {
            Package::load(&dir.join(name), device)
                .map_err(|e| refuse(format!("libtorch cannot load {name} as an AOTInductor package: {e}")))
        };
        let step = package(&meta.packages.train_step)?;
        let forward = package(&meta.packages.forward)?;
        Ok(ExportedModel { dir, meta, step, forward, params, buffers })
    }

    /// Refuses data whose samples the model was not exported for, before step 1.
    pub fn check_data(&self, data: &DataSpec) -> Result<()> {
        let m = &self.meta;
        let refuse = |detail: String| TrainError::ModelConfig { model: self.dir.display().to_string(), detail };
        let data_kind = if data.input_kind == Kind::Int64 { "int64" } else { "float32" };
        if m.input.shape != data.input_shape || m.input.dtype != data_kind {
            return Err(refuse(format!(
                "it was exported for inputs of shape {:?} {}, but the data's samples are {:?} {data_kind}; export \
                 it again with --input-shape {}{}",
                m.input.shape,
                m.input.dtype,
                data.input_shape,
                dims(&data.input_shape, ","),
                if data_kind == "int64" { " --input-dtype int64" } else { "" }
            )));
        }
        if m.target.shape != data.target_shape || m.target.dtype != "int64" {
            let given = if data.target_shape.is_empty() {
                "one integer class label per sample".to_string()
            } else {
                format!("integer targets of shape {:?} per sample (the next token of each position)", data.target_shape)
            };
            return Err(refuse(format!(
                "its loss ({}) takes targets of shape {:?} {}, but the data gives {given}",
                m.loss, m.target.shape, m.target.dtype
            )));
        }
        if let (Some(classes), Some(outputs)) = (data.num_classes, m.classes()) {
            if classes != outputs {
                return Err(refuse(format!(
                    "it outputs {:?} per sample, but the data has {classes} classes; export a model with \
                     {classes} outputs (or give --num-classes)",
                    m.output.shape
                )));
            }
        }
        Ok(())
    }

    /// What `hytrain-model.json` says.
    pub fn metadata(&self) -> &ExportedMetadata {
        &self.meta
    }

    /// Refuses a batch the packages were not compiled for: running one anyway would read out of bounds.
    fn check_batch(&self, xs: &Tensor, ys: Option<&Tensor>) -> Result<(), TchError> {
        let size = xs.size();
        let m = &self.meta;
        let n = size.first().copied().unwrap_or(0);
        let input_kind = kind_of(&m.input.dtype);
        if size.len() != m.input.shape.len() + 1 || size[1..] != m.input.shape[..] || Some(xs.kind()) != input_kind {
            return Err(TchError::Torch(format!(
                "the batch is {size:?} {:?}, but the model was exported for [batch, {}] {}",
                xs.kind(),
                dims(&m.input.shape, ", "),
                m.input.dtype
            )));
        }
        if n < m.batch.min || n > m.batch.max {
            return Err(TchError::Torch(format!(
                "a batch of {n} is outside the {}..={} the model was exported for (--max-batch)",
                m.batch.min, m.batch.max
            )));
        }
        if let Some(ys) = ys {
            let mut want = vec![n];
            want.extend_from_slice(&m.target.shape);
            if ys.size() != want || Some(ys.kind()) != kind_of(&m.target.dtype) {
                return Err(TchError::Torch(format!(
                    "the targets are {:?} {:?}, but the model's loss takes {want:?} {}",
                    ys.size(),
                    ys.kind(),
                    m.target.dtype
                )));
            }
        }
        let device = self.params.first().map_or(Device::Cpu, |(_, p)| p.device());
        if xs.device() != device || ys.is_some_and(|y| y.device() != device) {
            return Err(TchError::Torch(format!("the batch is on {:?}, the model on {device:?}", xs.device())));
        }
        Ok(())
    }

    fn state_inputs<'a>(&'a self, first: &[&'a Tensor]) -> Vec<&'a Tensor> {
        let mut inputs: Vec<&Tensor> = first.to_vec();
        inputs.extend(self.params.iter().map(|(_, t)| t));
        inputs.extend(self.buffers.iter().map(|(_, t)| t));
        inputs
    }

    /// Copies the model folder's packages and metadata into `dir` with `weights` as its weights file, so that the
    /// exported model in `dir` runs for inference (`forward.pt2`) and trains on (`hytrain train --model dir`).
    pub fn write_folder(&self, dir: &Path, weights: &str) -> Result<Vec<String>> {
        let mut written = Vec::new();
        for name in [&self.meta.packages.train_step, &self.meta.packages.forward] {
            let (src, dest) = (self.dir.join(name), dir.join(name));
            if src != dest {
                let tmp = dir.join(format!(".{name}.tmp"));
                std::fs::copy(&src, &tmp).map_err(|e| TrainError::io("copy", &src, e))?;
                crate::export::commit(&tmp, &dest)?;
            }
            written.push(name.clone());
        }
        let meta = ExportedMetadata { weights: weights.to_string(), ..self.meta.clone() };
        let tmp = dir.join(format!(".{METADATA}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&meta).expect("metadata serialises"))
            .map_err(|e| TrainError::io("write", &tmp, e))?;
        crate::export::commit(&tmp, &dir.join(METADATA))?;
        written.push(METADATA.to_string());
        Ok(written)
    }
}

/// A shape as its dimensions joined by `sep` (`3,32,32` for a flag, `3, 32, 32` inside brackets).
fn dims(shape: &[i64], sep: &str) -> String {
    shape.iter().map(i64::to_string).collect::<Vec<_>>().join(sep)
}

fn trainable(t: Tensor) -> Result<Tensor> {
    t.f_set_requires_grad(true).map_err(|e| TrainError::torch("marking a parameter trainable", e))
}

impl CompiledStep for ExportedModel {
    fn loss_and_grads(&self, xs: &Tensor, ys: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let context = || format!("compiled training step of {} on a batch of shape {:?}", self.meta.name, xs.size());
        self.check_batch(xs, Some(ys)).map_err(|e| TrainError::torch(context(), e))?;
        let (p, b) = (self.params.len(), self.buffers.len());
        let mut out = tch::no_grad(|| self.step.run(&self.state_inputs(&[xs, ys]), 1 + p + b))
            .map_err(|e| TrainError::torch(context(), e))?;
        let new_buffers = out.split_off(1 + p);
        let grads = out.split_off(1);
        let loss = out.pop().expect("one loss");
        for ((name, buffer), new) in self.buffers.iter().zip(&new_buffers) {
            let mut buffer = buffer.shallow_clone();
            tch::no_grad(|| buffer.f_copy_(new))
                .map_err(|e| TrainError::torch(format!("updating buffer {name}"), e))?;
        }
        Ok((loss, grads))
    }
}

impl Model for ExportedModel {
    fn name(&self) -> &str {
        &self.meta.name
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor, TchError> {
        if train {
            return Err(TchError::Torch(
                "an exported model trains through its compiled step (Ddp::train_step), not a forward pass with \
                 autograd"
                    .into(),
            ));
        }
        self.check_batch(xs, None)?;
        let mut out = tch::no_grad(|| self.forward.run(&self.state_inputs(&[xs]), 1))?;
        Ok(out.pop().expect("one output"))
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }

    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        self.buffers.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }

    fn tied_names(&self) -> Vec<(String, String)> {
        self.meta.aliases.iter().map(|(a, n)| (a.clone(), n.clone())).collect()
    }

    fn save_torchscript(&self, _path: &Path, _example: &Tensor) -> Result<TorchScriptSource> {
        Err(TrainError::ModelConfig {
            model: self.meta.name.clone(),
            detail: "an exported model has no TorchScript; its inference package is forward.pt2".into(),
        })
    }

    fn compiled_step(&self) -> Option<&dyn CompiledStep> {
        Some(self)
    }

    fn write_packages(&self, dir: &Path, weights: &str) -> Result<Vec<String>> {
        self.write_folder(dir, weights)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torch_release_ignores_the_build_tag() {
        assert_eq!(release("2.11.0+cu130"), "2.11.0");
        assert_eq!(release("2.11.0"), "2.11.0");
        assert_ne!(release("2.10.1+cpu"), release("2.11.0+cu130"));
    }

    #[test]
    fn a_folder_without_metadata_is_refused_with_how_to_export() {
        let dir = tempfile::tempdir().unwrap();
        let e = ExportedModel::load(dir.path(), Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("has no hytrain-model.json") && e.contains("python -m hytrain_export"), "{e}");
    }

    #[test]
    fn metadata_that_is_not_an_exported_models_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(METADATA), "{\"format\": \"something else\"}").unwrap();
        let e = ExportedModel::load(dir.path(), Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("is not the metadata of an exported model"), "{e}");
    }
}
