//! Models: the [`Model`] trait the engine trains, the built-in zoo ([`build`]), models exported with
//! `python -m hytrain_export` ([`ExportedModel`]) and TorchScript modules.

mod exported;
mod layers;
mod lenet;
mod mlp;
mod pool;
mod resnet;
mod script;

use std::path::Path;

use tch::{CModule, Device, Kind, TchError, Tensor};

pub use exported::{CompiledStep, ExportedMetadata, ExportedModel};
pub use layers::{BatchNorm2d, Conv2d, ConvConfig, LayerBuilder, Linear, NamedTensors};
pub use lenet::LeNet;
pub use mlp::{Mlp, DEFAULT_HIDDEN};
pub use pool::max_pool_2x2;
pub use resnet::ResNet18;
pub use script::ScriptModel;

use crate::{Result, TrainError};

/// A network the engine can train: a forward pass and its tensors listed under stable names.
///
/// Implement it for a custom network (see `examples/custom_model.rs`); [`LayerBuilder`] creates layers whose
/// tensors carry PyTorch's names.
pub trait Model: Send {
    /// A short name for logs and export metadata ("lenet", "resnet18", or the custom model's own).
    fn name(&self) -> &str;

    /// Logits for a batch; `train` selects training behaviour (batch statistics in BatchNorm, dropout).
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor, TchError>;

    /// Trainable parameters in definition order, as `nn.Module.named_parameters()` lists them. The order must be
    /// the same in every process that builds the model: gradient buckets follow it.
    fn named_parameters(&self) -> Vec<(String, Tensor)>;

    /// State that is saved and kept identical across ranks but not trained (BatchNorm running statistics).
    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    /// `state_dict` names that share another name's tensor (tied weights), as `(alias, name)`: `model.safetensors`
    /// holds them too, so PyTorch's strict `load_state_dict` takes the file.
    fn tied_names(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// The compiled training step of a model whose loss and gradients come from one call rather than libtorch's
    /// autograd (an [`ExportedModel`]); `None` for models trained through [`Model::forward_t`] and backward.
    fn compiled_step(&self) -> Option<&dyn CompiledStep> {
        None
    }

    /// Writes the model's compiled packages into the export folder `dir`, beside the weights file `weights`;
    /// returns the files written. Models without packages write nothing.
    fn write_packages(&self, _dir: &Path, _weights: &str) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// Writes the model as TorchScript to `path`. The default traces `forward_t(example, false)`, which fixes
    /// eval-mode behaviour and the control flow taken for `example`.
    fn save_torchscript(&self, path: &Path, example: &Tensor) -> Result<TorchScriptSource> {
        let context = || format!("tracing {} to TorchScript", self.name());
        // Fail with the model's own error rather than inside the tracer.
        let _ = tch::no_grad(|| self.forward_t(example, false)).map_err(|e| TrainError::torch(context(), e))?;
        // The tracer records tensors that are not inputs as constants, and neither it nor the loader accepts
        // constants that require grad: parameters are frozen while the module is traced and saved.
        let params = self.named_parameters();
        let frozen: Vec<bool> = params.iter().map(|(_, p)| p.requires_grad()).collect();
        for (_, p) in &params {
            let _ = p.set_requires_grad(false);
        }
        // The module name becomes a TorchScript class name: an identifier.
        let class: String = self.name().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        let class = format!("hytrain_{class}");
        let mut failure = None;
        let saved = tch::no_grad(|| {
            let module =
                CModule::create_by_tracing(&class, "forward", &[example.shallow_clone()], &mut |xs| match self
                    .forward_t(&xs[0], false)
                {
                    Ok(t) => vec![t],
                    Err(e) => {
                        failure = Some(e);
                        vec![xs[0].shallow_clone()]
                    }
                })
                .map_err(|e| TrainError::torch(context(), e))?;
            if let Some(e) = failure.take() {
                return Err(TrainError::torch(context(), e));
            }
            module.save(path).map_err(|e| TrainError::torch(format!("saving {}", path.display()), e))
        });
        for ((_, p), was) in params.iter().zip(frozen) {
            let _ = p.set_requires_grad(was);
        }
        saved?;
        Ok(TorchScriptSource::Traced)
    }
}

/// How a `model.pt` was produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TorchScriptSource {
    /// The TorchScript module the job was given, with trained weights.
    Scripted,
    /// A trace of the built-in model's eval-mode forward pass.
    Traced,
}

/// What one sample of the data is, for checking a model against it before step 1.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSpec {
    /// One input's shape (`[3, 32, 32]` for CIFAR-10, `[T]` for token windows).
    pub input_shape: Vec<i64>,
    /// `Float` for images and tensors, `Int64` for token ids.
    pub input_kind: Kind,
    /// One sample's targets: `[]` for a class label, `[T]` for the next token of each position.
    pub target_shape: Vec<i64>,
    /// Classes of a labelled dataset, when known (token data leaves it to the model).
    pub num_classes: Option<i64>,
}

impl DataSpec {
    /// Float inputs of `input_shape`, one class label out of `num_classes` per sample.
    pub fn classes(input_shape: &[i64], num_classes: i64) -> DataSpec {
        DataSpec {
            input_shape: input_shape.to_vec(),
            input_kind: Kind::Float,
            target_shape: Vec::new(),
            num_classes: Some(num_classes),
        }
    }

    /// Windows of `context_length` token ids, each position's target the next id.
    pub fn tokens(context_length: i64) -> DataSpec {
        DataSpec {
            input_shape: vec![context_length],
            input_kind: Kind::Int64,
            target_shape: vec![context_length],
            num_classes: None,
        }
    }
}

/// Builds a model by name: `lenet`, `resnet18`, `mlp` (hidden 128, 64), `mlp:<h1,h2,...>`, a folder written by
/// `python -m hytrain_export` (checked against `input_shape` and `num_classes`), or a path to a TorchScript file
/// (`*.pt`, `*.pth`, or any existing file).
///
/// `input_shape` is one sample's shape (`[3, 32, 32]` for CIFAR-10, `[1, 8, 8]` for the digits). Weights are drawn
/// from libtorch's generator; seed it with `tch::manual_seed` for reproducible ones (ranks get rank 0's anyway).
pub fn build(name: &str, num_classes: i64, input_shape: &[i64], device: Device) -> Result<Box<dyn Model>> {
    build_for(name, &DataSpec::classes(input_shape, num_classes), device)
}

/// [`build`] for data described by `data`: token data can only be trained by an exported model.
pub fn build_for(name: &str, data: &DataSpec, device: Device) -> Result<Box<dyn Model>> {
    if Path::new(name).is_dir() {
        let model = ExportedModel::load(name, device)?;
        model.check_data(data)?;
        return Ok(Box::new(model));
    }
    let num_classes = match data {
        DataSpec { input_kind: Kind::Float, target_shape, num_classes: Some(n), .. } if target_shape.is_empty() => *n,
        _ => {
            return Err(TrainError::ModelConfig {
                model: name.into(),
                detail: format!(
                    "takes float inputs with one class label per sample, but the data gives {:?} {:?} inputs with \
                     targets of shape {:?}; train a model exported with `python -m hytrain_export` instead \
                     (README: Train your own model)",
                    data.input_shape, data.input_kind, data.target_shape
                ),
            })
        }
    };
    if num_classes < 1 {
        return Err(TrainError::ModelConfig {
            model: name.into(),
            detail: format!("needs at least one class, got {num_classes}"),
        });
    }
    let input_shape = &data.input_shape[..];
    match name {
        "lenet" => Ok(Box::new(LeNet::new(input_shape, num_classes, device)?)),
        "resnet18" => Ok(Box::new(ResNet18::new(input_shape, num_classes, device)?)),
        "mlp" => Ok(Box::new(Mlp::new(input_shape, DEFAULT_HIDDEN, num_classes, device)?)),
        _ if name.starts_with("mlp:") => {
            let hidden = name["mlp:".len()..]
                .split(',')
                .map(|s| s.trim().parse::<i64>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| TrainError::ModelConfig {
                    model: name.into(),
                    detail: "hidden sizes must be comma-separated positive integers, like mlp:256,128".into(),
                })?;
            Ok(Box::new(Mlp::new(input_shape, &hidden, num_classes, device)?))
        }
        _ if name.ends_with(".pt") || name.ends_with(".pth") || Path::new(name).is_file() => {
            Ok(Box::new(ScriptModel::load(name, device)?))
        }
        _ => Err(TrainError::UnknownModel(name.into())),
    }
}

/// Parameters then buffers: everything a checkpoint or `model.safetensors` holds.
pub fn state_tensors(model: &dyn Model) -> Vec<(String, Tensor)> {
    let mut all = model.named_parameters();
    all.extend(model.named_buffers());
    all
}

/// Copies `tensors` into the model's parameters and buffers by name. Strict like `load_state_dict`: every model
/// tensor must be present with the same shape, and no name may be left over (a leading `module.`, as PyTorch DDP
/// saves, is accepted).
pub fn load_state_tensors(model: &dyn Model, tensors: &[(String, Tensor)]) -> Result<()> {
    let mismatch = |detail: String| TrainError::ModelConfig { model: model.name().to_string(), detail };
    let strip = |n: &str| n.strip_prefix("module.").unwrap_or(n).to_string();
    let given: std::collections::HashMap<String, &Tensor> = tensors.iter().map(|(n, t)| (strip(n), t)).collect();
    let targets = state_tensors(model);
    let mut used = std::collections::HashSet::new();
    for (name, target) in &targets {
        let Some(src) = given.get(name) else {
            return Err(mismatch(format!("the weights have no tensor {name}")));
        };
        if src.size() != target.size() {
            return Err(mismatch(format!(
                "tensor {name} has shape {:?} in the weights but {:?} in the model",
                src.size(),
                target.size()
            )));
        }
        let mut dst = target.shallow_clone();
        tch::no_grad(|| dst.f_copy_(src)).map_err(|e| TrainError::torch(format!("loading tensor {name}"), e))?;
        used.insert(name.clone());
    }
    if let Some(extra) = given.keys().filter(|n| !used.contains(*n)).min() {
        return Err(mismatch(format!("the weights hold tensor {extra}, which the model does not have")));
    }
    Ok(())
}

/// The device of the model's first parameter (CPU for a model without parameters).
pub fn device_of(model: &dyn Model) -> Device {
    model.named_parameters().first().map(|(_, t)| t.device()).unwrap_or(Device::Cpu)
}

/// A zero example input, a batch of one `input_shape` of `kind` (float data, or token ids), for tracing.
pub(crate) fn example_input(input_shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
    let mut shape = vec![1];
    shape.extend_from_slice(input_shape);
    Tensor::f_zeros(shape.as_slice(), (kind, device)).map_err(|e| TrainError::torch("making an example input", e))
}
