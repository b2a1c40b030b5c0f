//! Layers that register their tensors under PyTorch's names (`conv1.weight`, `bn1.running_mean`, ...) in definition
//! order, so a model built here lists its parameters like `nn.Module.named_parameters()` and loads a PyTorch
//! state_dict saved as safetensors.

use tch::nn::init::{f_init, FanInOut, Init, NonLinearity, NormalOrUniform};
use tch::{Device, Kind, TchError, Tensor};

/// Tensors under their names, in a stable order.
pub type NamedTensors = Vec<(String, Tensor)>;

/// Creates named parameters and buffers in definition order; models keep the lists it returns.
///
/// ```no_run
/// use hytrain_train::model::LayerBuilder;
/// let mut b = LayerBuilder::new(tch::Device::Cpu);
/// let fc = b.linear("fc", 4, 2).unwrap();
/// let (params, buffers) = b.finish();
/// assert_eq!(params[0].0, "fc.weight");
/// ```
#[derive(Debug)]
pub struct LayerBuilder {
    device: Device,
    prefix: Vec<String>,
    params: Vec<(String, Tensor)>,
    buffers: Vec<(String, Tensor)>,
}

impl LayerBuilder {
    /// A builder that creates float32 tensors on `device`.
    pub fn new(device: Device) -> Self {
        LayerBuilder { device, prefix: Vec::new(), params: Vec::new(), buffers: Vec::new() }
    }

    /// The device tensors are created on.
    pub fn device(&self) -> Device {
        self.device
    }

    fn full_name(&self, name: &str) -> String {
        let mut parts = self.prefix.clone();
        parts.push(name.to_string());
        parts.join(".")
    }

    /// Runs `f` with `name` appended to the name prefix (`layer1`, then `0`, gives `layer1.0.conv1.weight`).
    pub fn scoped<R>(&mut self, name: &str, f: impl FnOnce(&mut Self) -> R) -> R {
        self.prefix.push(name.to_string());
        let r = f(self);
        self.prefix.pop();
        r
    }

    /// A trainable float32 parameter initialised by `init`.
    pub fn param(&mut self, name: &str, dims: &[i64], init: Init) -> Result<Tensor, TchError> {
        let t = f_init(init, dims, self.device, Kind::Float)?.f_set_requires_grad(true)?;
        self.params.push((self.full_name(name), t.shallow_clone()));
        Ok(t)
    }

    /// A buffer: saved and broadcast with the model but not trained.
    pub fn buffer(&mut self, name: &str, t: Tensor) -> Tensor {
        let t = t.to_device(self.device);
        self.buffers.push((self.full_name(name), t.shallow_clone()));
        t
    }

    /// `nn.Linear(inputs, outputs)` with PyTorch's default initialisation.
    pub fn linear(&mut self, name: &str, inputs: i64, outputs: i64) -> Result<Linear, TchError> {
        let bound = 1.0 / (inputs as f64).sqrt();
        let uniform = Init::Uniform { lo: -bound, up: bound };
        self.scoped(name, |b| {
            let weight = b.param("weight", &[outputs, inputs], uniform)?;
            let bias = b.param("bias", &[outputs], uniform)?;
            Ok(Linear { weight, bias: Some(bias) })
        })
    }

    /// `nn.Conv2d` with PyTorch's default initialisation (uniform in ±1/sqrt(fan_in), for weight and bias).
    pub fn conv2d(&mut self, name: &str, inputs: i64, outputs: i64, cfg: ConvConfig) -> Result<Conv2d, TchError> {
        let fan_in = inputs * cfg.kernel * cfg.kernel;
        let bound = 1.0 / (fan_in as f64).sqrt();
        self.conv2d_init(name, inputs, outputs, cfg, Init::Uniform { lo: -bound, up: bound })
    }

    /// `nn.Conv2d` initialised as torchvision's ResNet does (Kaiming normal, fan_out, ReLU).
    pub fn conv2d_kaiming_fan_out(
        &mut self,
        name: &str,
        inputs: i64,
        outputs: i64,
        cfg: ConvConfig,
    ) -> Result<Conv2d, TchError> {
        let init =
            Init::Kaiming { dist: NormalOrUniform::Normal, fan: FanInOut::FanOut, non_linearity: NonLinearity::ReLU };
        self.conv2d_init(name, inputs, outputs, cfg, init)
    }

    fn conv2d_init(
        &mut self,
        name: &str,
        inputs: i64,
        outputs: i64,
        cfg: ConvConfig,
        init: Init,
    ) -> Result<Conv2d, TchError> {
        let fan_in = inputs * cfg.kernel * cfg.kernel;
        let bound = 1.0 / (fan_in as f64).sqrt();
        self.scoped(name, |b| {
            let weight = b.param("weight", &[outputs, inputs, cfg.kernel, cfg.kernel], init)?;
            let bias = if cfg.bias {
                Some(b.param("bias", &[outputs], Init::Uniform { lo: -bound, up: bound })?)
            } else {
                None
            };
            Ok(Conv2d { weight, bias, stride: cfg.stride, padding: cfg.padding })
        })
    }

    /// `nn.BatchNorm2d(channels)`: weight 1, bias 0, running_mean 0, running_var 1, num_batches_tracked 0.
    pub fn batch_norm2d(&mut self, name: &str, channels: i64) -> Result<BatchNorm2d, TchError> {
        let device = self.device;
        self.scoped(name, |b| {
            let weight = b.param("weight", &[channels], Init::Const(1.0))?;
            let bias = b.param("bias", &[channels], Init::Const(0.0))?;
            let running_mean = b.buffer("running_mean", Tensor::f_zeros([channels], (Kind::Float, device))?);
            let running_var = b.buffer("running_var", Tensor::f_ones([channels], (Kind::Float, device))?);
            let num_batches_tracked = b.buffer("num_batches_tracked", Tensor::f_zeros([], (Kind::Int64, device))?);
            Ok(BatchNorm2d { weight, bias, running_mean, running_var, num_batches_tracked })
        })
    }

    /// The parameters and buffers created so far, each in definition order.
    pub fn finish(self) -> (NamedTensors, NamedTensors) {
        (self.params, self.buffers)
    }
}

/// Shape options of a 2-D convolution.
#[derive(Debug, Clone, Copy)]
pub struct ConvConfig {
    /// Square kernel size.
    pub kernel: i64,
    /// Stride in both directions.
    pub stride: i64,
    /// Zero padding on every side.
    pub padding: i64,
    /// Whether the layer has a bias.
    pub bias: bool,
}

impl ConvConfig {
    /// A `kernel`×`kernel` convolution with stride 1, no padding and a bias, like `nn.Conv2d(i, o, kernel)`.
    pub fn new(kernel: i64) -> Self {
        ConvConfig { kernel, stride: 1, padding: 0, bias: true }
    }
}

/// A fully connected layer.
#[derive(Debug)]
pub struct Linear {
    /// `[outputs, inputs]`.
    pub weight: Tensor,
    /// `[outputs]`.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// `xs @ weight.T + bias`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        xs.f_linear(&self.weight, self.bias.as_ref())
    }
}

/// A 2-D convolution.
#[derive(Debug)]
pub struct Conv2d {
    /// `[outputs, inputs, k, k]`.
    pub weight: Tensor,
    /// `[outputs]`, if the layer has one.
    pub bias: Option<Tensor>,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    /// Applies the convolution to an `[N, C, H, W]` batch.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        xs.f_conv2d(&self.weight, self.bias.as_ref(), [self.stride; 2], [self.padding; 2], [1, 1], 1)
    }
}

/// Batch normalisation over `[N, C, H, W]` with PyTorch's defaults (momentum 0.1, eps 1e-5).
#[derive(Debug)]
pub struct BatchNorm2d {
    /// Scale.
    pub weight: Tensor,
    /// Shift.
    pub bias: Tensor,
    /// Running mean buffer.
    pub running_mean: Tensor,
    /// Running variance buffer.
    pub running_var: Tensor,
    /// Counts training forwards, as PyTorch's buffer of the same name does.
    pub num_batches_tracked: Tensor,
}

impl BatchNorm2d {
    /// Normalises with batch statistics (and updates the running ones) when `train`, else with the running ones.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor, TchError> {
        if train {
            let mut n = self.num_batches_tracked.shallow_clone();
            let _ = tch::no_grad(|| n.f_add_scalar_(1))?;
        }
        Tensor::f_batch_norm(
            xs,
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            0.1,
            1e-5,
            true,
        )
    }
}
