//! TorchScript models: a module scripted in Python trains in hytrain and is saved back as TorchScript that
//! PyTorch loads.

mod common;

use common::{run_python, seeded};
use hytrain_train::{export, model, AdamWConfig, Ddp, DdpOptions, OptimizerConfig, ScriptModel};
use tch::{Device, Kind, Tensor};

#[test]
fn a_torchscript_model_trains_and_loss_falls() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let scripted = dir.path().join("small.pt");
    run_python("torchscript_model.py", &["make".as_ref(), scripted.as_os_str()]);

    let net = model::build(scripted.to_str().unwrap(), 3, &[8], Device::Cpu).unwrap();
    assert_eq!(net.name(), "torchscript");
    let names: Vec<String> = net.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "fc2.weight", "fc2.bias"]);
    let mut ddp = Ddp::single(net, DdpOptions::default()).unwrap();
    let mut opt = OptimizerConfig::AdamW(AdamWConfig { weight_decay: 0.0, ..Default::default() })
        .build(ddp.parameters())
        .unwrap();
    // A learnable rule: the class is the largest of the first three features.
    let (xs, ys) = seeded(5, || {
        let xs = Tensor::randn([256, 8], (Kind::Float, Device::Cpu));
        let ys = xs.narrow(1, 0, 3).argmax(1, false);
        (xs, ys)
    });
    let mut losses = Vec::new();
    for step in 0..60 {
        let i = (step % 4) * 64;
        let batch = (xs.narrow(0, i, 64), ys.narrow(0, i, 64));
        losses.push(ddp.train_step(&[batch], opt.as_mut(), 1e-2).unwrap().loss);
    }
    let first = losses[..4].iter().sum::<f64>() / 4.0;
    let last = losses[losses.len() - 4..].iter().sum::<f64>() / 4.0;
    assert!(last < 0.5 * first, "loss did not fall: {first:.4} -> {last:.4}");

    // Saved back as TorchScript: PyTorch loads it and computes what hytrain computes in eval mode.
    let out_dir = dir.path().join("model");
    let meta = export(ddp.model(), &out_dir, 3, &[8], serde_json::json!({})).unwrap();
    assert_eq!(meta.torchscript, Some(model::TorchScriptSource::Scripted));
    let probe = xs.narrow(0, 0, 16);
    let output = tch::no_grad(|| ddp.model().forward_t(&probe, false)).unwrap();
    let io = dir.path().join("io.safetensors");
    Tensor::write_safetensors(&[("input", &probe.contiguous()), ("output", &output)], &io).unwrap();
    run_python("torchscript_model.py", &["check".as_ref(), out_dir.join("model.pt").as_os_str(), io.as_os_str()]);
}

#[test]
fn a_missing_torchscript_file_is_a_clear_error() {
    let e = ScriptModel::load("/nonexistent/model.pt", Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/model.pt") && e.contains("torch.jit.save"), "{e}");
    let Err(e) = model::build("/nonexistent/model.pt", 10, &[8], Device::Cpu) else { panic!("loaded a missing file") };
    let e = e.to_string();
    assert!(e.contains("no such TorchScript file"), "{e}");
}

#[test]
fn a_file_that_is_not_torchscript_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("bogus.pt");
    std::fs::write(&bogus, b"not a zip archive").unwrap();
    let e = ScriptModel::load(&bogus, Device::Cpu).unwrap_err().to_string();
    assert!(e.starts_with(&format!("loading TorchScript model {}", bogus.display())), "{e}");
}
