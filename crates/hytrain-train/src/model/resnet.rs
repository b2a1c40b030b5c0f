//! ResNet-18 for 32×32 inputs: torchvision's layout and names with a 3×3 stem and no max-pool.

use tch::{Device, TchError, Tensor};

use super::layers::{BatchNorm2d, Conv2d, ConvConfig, LayerBuilder, Linear};
use super::Model;
use crate::{Result, TrainError};

#[derive(Debug)]
struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    downsample: Option<(Conv2d, BatchNorm2d)>,
}

impl BasicBlock {
    fn new(b: &mut LayerBuilder, inputs: i64, outputs: i64, stride: i64) -> Result<Self, TchError> {
        let conv3 = |stride| ConvConfig { kernel: 3, stride, padding: 1, bias: false };
        let conv1 = b.conv2d_kaiming_fan_out("conv1", inputs, outputs, conv3(stride))?;
        let bn1 = b.batch_norm2d("bn1", outputs)?;
        let conv2 = b.conv2d_kaiming_fan_out("conv2", outputs, outputs, conv3(1))?;
        let bn2 = b.batch_norm2d("bn2", outputs)?;
        let downsample = if stride != 1 || inputs != outputs {
            Some(b.scoped("downsample", |b| -> Result<_, TchError> {
                let cfg = ConvConfig { kernel: 1, stride, padding: 0, bias: false };
                Ok((b.conv2d_kaiming_fan_out("0", inputs, outputs, cfg)?, b.batch_norm2d("1", outputs)?))
            })?)
        } else {
            None
        };
        Ok(BasicBlock { conv1, bn1, conv2, bn2, downsample })
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let out = self.bn1.forward_t(&self.conv1.forward(xs)?, train)?.f_relu()?;
        let out = self.bn2.forward_t(&self.conv2.forward(&out)?, train)?;
        let identity = match &self.downsample {
            Some((conv, bn)) => bn.forward_t(&conv.forward(xs)?, train)?,
            None => xs.shallow_clone(),
        };
        (out + identity).f_relu()
    }
}

/// ResNet-18 (BasicBlock ×[2, 2, 2, 2], 64-128-256-512 channels) with the CIFAR stem: conv 3×3 stride 1, no
/// max-pool. Parameter and buffer names follow torchvision (`layer2.0.downsample.1.running_var`).
#[derive(Debug)]
pub struct ResNet18 {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    layers: Vec<Vec<BasicBlock>>,
    fc: Linear,
    params: Vec<(String, Tensor)>,
    buffers: Vec<(String, Tensor)>,
}

impl ResNet18 {
    /// A ResNet-18 for `[channels, height, width]` inputs.
    pub fn new(input_shape: &[i64], num_classes: i64, device: Device) -> Result<Self> {
        let [c, h, w] = input_shape else {
            return Err(TrainError::ModelConfig {
                model: "resnet18".into(),
                detail: format!("needs a [channels, height, width] input shape, got {input_shape:?}"),
            });
        };
        if *c < 1 || *h < 1 || *w < 1 {
            return Err(TrainError::ModelConfig {
                model: "resnet18".into(),
                detail: format!("input sizes must be positive, got {input_shape:?}"),
            });
        }
        let torch = |e| TrainError::torch("building resnet18", e);
        let mut b = LayerBuilder::new(device);
        let stem = ConvConfig { kernel: 3, stride: 1, padding: 1, bias: false };
        let conv1 = b.conv2d_kaiming_fan_out("conv1", *c, 64, stem).map_err(torch)?;
        let bn1 = b.batch_norm2d("bn1", 64).map_err(torch)?;
        let mut layers = Vec::new();
        let mut inputs = 64;
        for (i, (outputs, stride)) in [(64, 1), (128, 2), (256, 2), (512, 2)].into_iter().enumerate() {
            let layer = b
                .scoped(&format!("layer{}", i + 1), |b| -> Result<Vec<BasicBlock>, TchError> {
                    let first = b.scoped("0", |b| BasicBlock::new(b, inputs, outputs, stride))?;
                    let second = b.scoped("1", |b| BasicBlock::new(b, outputs, outputs, 1))?;
                    Ok(vec![first, second])
                })
                .map_err(torch)?;
            layers.push(layer);
            inputs = outputs;
        }
        let fc = b.linear("fc", 512, num_classes).map_err(torch)?;
        let (params, buffers) = b.finish();
        Ok(ResNet18 { conv1, bn1, layers, fc, params, buffers })
    }
}

impl Model for ResNet18 {
    fn name(&self) -> &str {
        "resnet18"
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let mut xs = self.bn1.forward_t(&self.conv1.forward(xs)?, train)?.f_relu()?;
        for block in self.layers.iter().flatten() {
            xs = block.forward_t(&xs, train)?;
        }
        let xs = xs.f_adaptive_avg_pool2d([1, 1])?.f_flatten(1, -1)?;
        self.fc.forward(&xs)
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }

    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        self.buffers.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }
}
