//! A multi-layer perceptron for small inputs (MNIST, the 8×8 digits).

use tch::{Device, TchError, Tensor};

use super::layers::{LayerBuilder, Linear};
use super::Model;
use crate::{Result, TrainError};

/// Hidden sizes of `mlp` when none are given.
pub const DEFAULT_HIDDEN: &[i64] = &[128, 64];

/// Flatten, then `fc1 … fcN` with ReLU between them; the last layer gives the logits.
#[derive(Debug)]
pub struct Mlp {
    layers: Vec<Linear>,
    params: Vec<(String, Tensor)>,
}

impl Mlp {
    /// An MLP from the flattened `input_shape` through `hidden` sizes to `num_classes` logits.
    pub fn new(input_shape: &[i64], hidden: &[i64], num_classes: i64, device: Device) -> Result<Self> {
        let bad = |detail: String| TrainError::ModelConfig { model: "mlp".into(), detail };
        if input_shape.is_empty() || input_shape.iter().any(|d| *d < 1) {
            return Err(bad(format!("needs a non-empty input shape of positive sizes, got {input_shape:?}")));
        }
        if hidden.iter().any(|h| *h < 1) {
            return Err(bad(format!("hidden sizes must be positive, got {hidden:?}")));
        }
        let mut sizes = vec![input_shape.iter().product::<i64>()];
        sizes.extend_from_slice(hidden);
        sizes.push(num_classes);
        let mut b = LayerBuilder::new(device);
        let layers = sizes
            .windows(2)
            .enumerate()
            .map(|(i, io)| b.linear(&format!("fc{}", i + 1), io[0], io[1]))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TrainError::torch("building mlp", e))?;
        let (params, _) = b.finish();
        Ok(Mlp { layers, params })
    }
}

impl Model for Mlp {
    fn name(&self) -> &str {
        "mlp"
    }

    fn forward_t(&self, xs: &Tensor, _train: bool) -> Result<Tensor, TchError> {
        let mut xs = xs.f_flatten(1, -1)?;
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs)?;
            if i < last {
                xs = xs.f_relu()?;
            }
        }
        Ok(xs)
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }
}
