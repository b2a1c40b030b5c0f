//! Export to the model directory: weights, TorchScript that reproduces the model, metadata.

use crate::common;

use common::seeded;
use hytrain_train::model::{self, Model, TorchScriptSource};
use hytrain_train::{export, ExportMetadata};
use tch::{CModule, Device, Kind, Tensor};

fn exported(name: &str, input: &[i64]) -> (Box<dyn Model>, tempfile::TempDir, ExportMetadata) {
    tch::set_num_threads(1);
    let net = seeded(21, || model::build(name, 10, input, Device::Cpu).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let meta = export(net.as_ref(), dir.path(), 10, input, serde_json::json!({ "accuracy": 0.5 })).unwrap();
    (net, dir, meta)
}

fn check_traced_model(name: &str, input: &[i64]) {
    let (net, dir, meta) = exported(name, input);
    assert_eq!(meta.torchscript, Some(TorchScriptSource::Traced), "{:?}", meta.torchscript_error);
    // Tracing froze the parameters for a moment; training must be able to go on.
    assert!(net.named_parameters().iter().all(|(_, p)| p.requires_grad()));
    let mut shape = vec![5];
    shape.extend_from_slice(input);
    let xs = seeded(22, || Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)));
    let want = tch::no_grad(|| net.forward_t(&xs, false)).unwrap();
    let module = CModule::load(dir.path().join("model.pt")).unwrap();
    let got = tch::no_grad(|| module.forward_ts(&[&xs])).unwrap();
    assert!(got.allclose(&want, 1e-5, 1e-6, false), "{name}: the TorchScript export computes something else");

    let weights = Tensor::read_safetensors(dir.path().join("model.safetensors")).unwrap();
    assert_eq!(weights.len(), model::state_tensors(net.as_ref()).len());
    // The exported weights load back into a fresh model.
    let fresh = seeded(1, || model::build(name, 10, input, Device::Cpu).unwrap());
    model::load_state_tensors(fresh.as_ref(), &weights).unwrap();
    assert!(tch::no_grad(|| fresh.forward_t(&xs, false)).unwrap().allclose(&want, 1e-6, 1e-7, false));

    let on_disk: ExportMetadata =
        serde_json::from_slice(&std::fs::read(dir.path().join("metadata.json")).unwrap()).unwrap();
    assert_eq!(on_disk, meta);
    assert_eq!(meta.model, name);
    assert_eq!(meta.input_shape, input);
    assert_eq!(meta.torch_version, "2.11.0");
    assert_eq!(meta.extra["accuracy"], 0.5);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn lenet_exports_weights_traced_torchscript_and_metadata() {
    check_traced_model("lenet", &[3, 32, 32]);
}

#[test]
fn mlp_exports_traced_torchscript() {
    check_traced_model("mlp", &[1, 8, 8]);
}

#[test]
fn resnet18_export_keeps_batchnorm_statistics_in_eval_mode() {
    tch::set_num_threads(1);
    let net = seeded(23, || model::build("resnet18", 10, &[3, 32, 32], Device::Cpu).unwrap());
    // Give BatchNorm non-trivial running statistics, so eval differs from a fresh model.
    let xs = seeded(24, || Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu)));
    let _ = tch::no_grad(|| net.forward_t(&(&xs * 3.0 + 1.0), true)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let meta = export(net.as_ref(), dir.path(), 10, &[3, 32, 32], serde_json::Value::Null).unwrap();
    assert_eq!(meta.torchscript, Some(TorchScriptSource::Traced));
    let names: Vec<&str> = meta.tensors.iter().map(|t| t.name.as_str()).collect();
    assert!(names.contains(&"layer2.0.downsample.1.running_var") && names.contains(&"bn1.num_batches_tracked"));
    let want = tch::no_grad(|| net.forward_t(&xs, false)).unwrap();
    let got = tch::no_grad(|| CModule::load(dir.path().join("model.pt")).unwrap().forward_ts(&[&xs])).unwrap();
    assert!(got.allclose(&want, 1e-4, 1e-5, false));
}

#[test]
fn export_into_an_unwritable_place_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let net = seeded(1, || model::build("mlp", 10, &[4], Device::Cpu).unwrap());
    let e = export(net.as_ref(), &file.join("model"), 10, &[4], serde_json::Value::Null).unwrap_err().to_string();
    assert!(e.starts_with("cannot create"), "{e}");
}
