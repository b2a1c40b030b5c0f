//! TorchScript models: a module scripted in Python trains in hytrain and is saved back as TorchScript that
//! PyTorch loads.

use crate::common;

use std::path::Path;

use common::{deep_copy, identical, on_ranks, run_python, seeded};
use hytrain_train::{export, model, AdamWConfig, Ddp, DdpOptions, Model, OptimizerConfig, ScriptModel, SgdConfig};
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
        losses.push(ddp.train_step(&[batch], opt.as_mut(), 1e-2).unwrap().loss_value().unwrap());
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

/// Scripts the Linear-BatchNorm-ReLU-Linear module of `torchscript_model.py` into `dir`.
fn scripted_small(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("small.pt");
    run_python("torchscript_model.py", &["make".as_ref(), path.as_os_str()]);
    path
}

/// Inputs of 8 features and labels of 3 classes (the largest of the first three features), drawn with `seed`.
fn labelled(seed: i64, n: i64) -> (Tensor, Tensor) {
    seeded(seed, || {
        let xs = Tensor::randn([n, 8], (Kind::Float, Device::Cpu));
        let ys = xs.narrow(1, 0, 3).argmax(1, false);
        (xs, ys)
    })
}

fn eval_output(net: &dyn Model, xs: &Tensor) -> Tensor {
    tch::no_grad(|| net.forward_t(xs, false)).unwrap()
}

#[test]
fn a_torchscript_models_buffers_are_its_batchnorm_statistics_under_pytorchs_names() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let net = ScriptModel::load(scripted_small(dir.path()), Device::Cpu).unwrap();
    let names: Vec<String> = net.named_buffers().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]);
    // The listed tensors are the module's own: a training forward updates them where the engine reads them.
    let before = deep_copy(&net.named_buffers());
    let (xs, _) = labelled(1, 16);
    let _ = tch::no_grad(|| net.forward_t(&xs, true)).unwrap();
    let after = net.named_buffers();
    assert!(!identical(&before, &after), "a training forward left the listed statistics as they were");
    assert_eq!(after[2].1.int64_value(&[]), 1, "num_batches_tracked");
}

#[test]
fn every_rank_trains_and_evaluates_with_rank_0s_torchscript_batchnorm_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let scripted = scripted_small(dir.path());
    let outputs = on_ranks(2, |rank, comm| {
        let net = model::build(scripted.to_str().unwrap(), 3, &[8], Device::Cpu).unwrap();
        let mut ddp = Ddp::new(net, comm, DdpOptions::default()).unwrap();
        if rank == 1 {
            // Rank 1 alone sees other data in training mode: its running statistics drift from rank 0's.
            let skewed = seeded(2, || Tensor::randn([32, 8], (Kind::Float, Device::Cpu)) * 3.0 + 2.0);
            let _ = tch::no_grad(|| ddp.model().forward_t(&skewed, true)).unwrap();
        }
        let mut opt = OptimizerConfig::Sgd(SgdConfig::default()).build(ddp.parameters()).unwrap();
        ddp.train_step(&[labelled(3, 32)], opt.as_mut(), 0.1).unwrap();
        let (probe, _) = labelled(4, 8);
        (eval_output(ddp.model(), &probe), deep_copy(&ddp.model().named_buffers()))
    });
    assert!(outputs[0].0.equal(&outputs[1].0), "rank 1 evaluates with its own running statistics, not rank 0's");
    assert!(identical(&outputs[0].1, &outputs[1].1));
}

#[test]
fn a_torchscript_model_restored_from_its_saved_tensors_evaluates_and_exports_as_trained() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let scripted = scripted_small(dir.path());
    let net = model::build(scripted.to_str().unwrap(), 3, &[8], Device::Cpu).unwrap();
    let mut ddp = Ddp::single(net, DdpOptions::default()).unwrap();
    let mut opt = OptimizerConfig::Sgd(SgdConfig::default()).build(ddp.parameters()).unwrap();
    for step in 0..5 {
        ddp.train_step(&[labelled(10 + step, 32)], opt.as_mut(), 0.1).unwrap();
    }
    let (probe, _) = labelled(20, 8);
    let trained = eval_output(ddp.model(), &probe);
    let first = dir.path().join("first");
    export(ddp.model(), &first, 3, &[8], serde_json::json!({})).unwrap();
    let saved = Tensor::read_safetensors(first.join("model.safetensors")).unwrap();
    let names: Vec<&str> = saved.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"bn.running_mean") && names.contains(&"bn.num_batches_tracked"),
        "model.safetensors lacks the running statistics: {names:?}"
    );

    // A resumed job loads the file it was given, then the saved tensors (a checkpoint holds the same list).
    let resumed = model::build(scripted.to_str().unwrap(), 3, &[8], Device::Cpu).unwrap();
    model::load_state_tensors(resumed.as_ref(), &saved).unwrap();
    assert!(
        eval_output(resumed.as_ref(), &probe).equal(&trained),
        "the restored model evaluates with the file's original running statistics"
    );
    // A job restarted at its last step exports the restored model: its model.pt holds the trained statistics.
    let second = dir.path().join("second");
    export(resumed.as_ref(), &second, 3, &[8], serde_json::json!({})).unwrap();
    let reloaded = ScriptModel::load(second.join("model.pt"), Device::Cpu).unwrap();
    assert!(eval_output(&reloaded, &probe).equal(&trained), "model.pt holds untrained running statistics");
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

#[test]
fn a_forward_that_returns_no_single_tensor_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let pair = dir.path().join("pair.pt");
    run_python("torchscript_model.py", &["make-pair".as_ref(), pair.as_os_str()]);
    let net = ScriptModel::load(&pair, Device::Cpu).unwrap();
    let (xs, _) = labelled(1, 4);
    let e = tch::no_grad(|| net.forward_t(&xs, false)).unwrap_err().to_string();
    assert!(e.contains("forward returned Tuple, not one tensor of logits"), "{e}");
}

#[test]
fn a_device_torchscript_cannot_use_is_refused_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let e = ScriptModel::load(scripted_small(dir.path()), Device::Mps).unwrap_err().to_string();
    assert!(e.contains("TorchScript models train on the CPU or a CUDA GPU, not Mps"), "{e}");
}
