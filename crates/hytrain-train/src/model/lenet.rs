//! The reference sample's LeNet (aws-do-kubeflow's `Net`), parameter for parameter.

use tch::{Device, TchError, Tensor};

use super::layers::{Conv2d, ConvConfig, LayerBuilder, Linear};
use super::pool::max_pool_2x2;
use super::Model;
use crate::{Result, TrainError};

/// conv 3→6 5×5, maxpool 2, conv 6→16 5×5, maxpool 2, FC 400→120→84→classes, ReLU; the same names and
/// initialisation as the PyTorch `Net` of the reference sample, so state_dicts interchange.
#[derive(Debug)]
pub struct LeNet {
    conv1: Conv2d,
    conv2: Conv2d,
    fc1: Linear,
    fc2: Linear,
    fc3: Linear,
    params: Vec<(String, Tensor)>,
}

impl LeNet {
    /// A LeNet for `[channels, height, width]` inputs (3×32×32 gives the reference's 400 features after conv2).
    pub fn new(input_shape: &[i64], num_classes: i64, device: Device) -> Result<Self> {
        let bad = |detail: String| TrainError::ModelConfig { model: "lenet".into(), detail };
        let [c, h, w] = input_shape else {
            return Err(bad(format!("needs a [channels, height, width] input shape, got {input_shape:?}")));
        };
        // Two rounds of (5x5 valid conv, 2x2 pool).
        let side = |s: i64| ((s - 4) / 2 - 4) / 2;
        if *h < 16 || *w < 16 || *c < 1 {
            return Err(bad(format!("needs inputs of at least 1x16x16, got {input_shape:?}")));
        }
        let features = 16 * side(*h) * side(*w);
        let torch = |e| TrainError::torch("building lenet", e);
        let mut b = LayerBuilder::new(device);
        let conv1 = b.conv2d("conv1", *c, 6, ConvConfig::new(5)).map_err(torch)?;
        let conv2 = b.conv2d("conv2", 6, 16, ConvConfig::new(5)).map_err(torch)?;
        let fc1 = b.linear("fc1", features, 120).map_err(torch)?;
        let fc2 = b.linear("fc2", 120, 84).map_err(torch)?;
        let fc3 = b.linear("fc3", 84, num_classes).map_err(torch)?;
        let (params, _) = b.finish();
        Ok(LeNet { conv1, conv2, fc1, fc2, fc3, params })
    }
}

fn pool(xs: Tensor) -> Result<Tensor, TchError> {
    max_pool_2x2(&xs)
}

impl Model for LeNet {
    fn name(&self) -> &str {
        "lenet"
    }

    fn forward_t(&self, xs: &Tensor, _train: bool) -> Result<Tensor, TchError> {
        let xs = pool(self.conv1.forward(xs)?.f_relu()?)?;
        let xs = pool(self.conv2.forward(&xs)?.f_relu()?)?;
        let xs = xs.f_flatten(1, -1)?;
        let xs = self.fc1.forward(&xs)?.f_relu()?;
        let xs = self.fc2.forward(&xs)?.f_relu()?;
        self.fc3.forward(&xs)
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }
}
