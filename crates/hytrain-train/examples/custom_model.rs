//! A custom network trained by hytrain's engine through the library API: implement [`Model`], build layers with
//! [`LayerBuilder`] (tensors get PyTorch names), then train with [`Ddp`], checkpoint and export.
//!
//! Run: `cargo run -p hytrain-train --example custom_model -- /tmp/custom-out`

use std::path::PathBuf;

use hytrain_train::model::{Conv2d, ConvConfig, LayerBuilder, Linear};
use hytrain_train::{
    export, Checkpoint, CheckpointMeta, CheckpointStore, Ddp, DdpOptions, Model, OptimizerConfig, RngState, Schedule,
    SgdConfig,
};
use tch::{Device, Kind, TchError, Tensor};

/// Two convolutions with a residual connection, then a classifier.
struct TwoConv {
    stem: Conv2d,
    body: Conv2d,
    head: Linear,
    params: Vec<(String, Tensor)>,
}

impl TwoConv {
    fn new(device: Device) -> Result<Self, TchError> {
        let mut b = LayerBuilder::new(device);
        let same = ConvConfig { kernel: 3, stride: 1, padding: 1, bias: true };
        let stem = b.conv2d("stem", 1, 8, same)?;
        let body = b.conv2d("body", 8, 8, same)?;
        let head = b.linear("head", 8 * 8 * 8, 2)?;
        let (params, _buffers) = b.finish();
        Ok(TwoConv { stem, body, head, params })
    }
}

impl Model for TwoConv {
    fn name(&self) -> &str {
        "two-conv"
    }

    fn forward_t(&self, xs: &Tensor, _train: bool) -> Result<Tensor, TchError> {
        let h = self.stem.forward(xs)?.f_relu()?;
        let h = (self.body.forward(&h)?.f_relu()? + h).f_flatten(1, -1)?;
        self.head.forward(&h)
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }
}

/// Images whose class is whether the left half is brighter than the right.
fn batch(n: i64) -> (Tensor, Tensor) {
    let xs = Tensor::rand([n, 1, 8, 8], (Kind::Float, Device::Cpu));
    let left = xs.narrow(3, 0, 4).sum_dim_intlist(&[1i64, 2, 3][..], false, Kind::Float);
    let right = xs.narrow(3, 4, 4).sum_dim_intlist(&[1i64, 2, 3][..], false, Kind::Float);
    (xs, left.gt_tensor(&right).to_kind(Kind::Int64))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "custom-model-out".into()));
    tch::manual_seed(0);
    // One process here; with a collective from hytrain-comm, `Ddp::new(model, comm, options)` trains on many.
    let mut ddp = Ddp::single(Box::new(TwoConv::new(Device::Cpu)?), DdpOptions::default())?;
    let mut optimizer =
        OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, ..Default::default() }).build(ddp.parameters())?;
    let schedule = Schedule::parse("cosine:300:20")?;
    let store = CheckpointStore::new(out.join("checkpoints"), 2)?;
    for step in 0..300u64 {
        let (xs, ys) = batch(32);
        let lr = 0.05 * schedule.factor(step);
        let result = ddp.train_step(&[(xs, ys)], optimizer.as_mut(), lr)?;
        if step % 50 == 0 {
            println!("step={step} train_loss={:.4} lr={lr:.4}", result.loss_value()?);
        }
        if (step + 1) % 100 == 0 {
            store.save(&Checkpoint {
                model: hytrain_train::model::state_tensors(ddp.model()),
                optimizer: optimizer.state(),
                meta: CheckpointMeta {
                    step: step + 1,
                    epoch: 0,
                    data_position: serde_json::json!(null),
                    rng: RngState { seed: 0, state: serde_json::Value::Null },
                    config: serde_json::json!({ "model": "two-conv" }),
                    schedule: schedule.clone(),
                    model: "two-conv".into(),
                    optimizer: optimizer.name().into(),
                    grad_scaler: None,
                },
            })?;
        }
    }
    let (xs, ys) = batch(1000);
    let logits = tch::no_grad(|| ddp.forward_t(&xs, false))?;
    let accuracy = logits.argmax(1, false).eq_tensor(&ys).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    println!("accuracy={accuracy:.3}");
    let meta = export(ddp.model(), &out.join("model"), 2, &[1, 8, 8], serde_json::json!({ "accuracy": accuracy }))?;
    println!("model written to {} (TorchScript: {:?})", out.join("model").display(), meta.torchscript);
    Ok(())
}
