//! Parity with PyTorch itself: the reference LeNet from the same initial weights and batches, trained by
//! torch.optim.SGD in Python and by hytrain, ends with the same weights; and the optimizers' other options
//! (weight decay, dampening, Nesterov, AdamW) take the same steps as torch.optim's from the same gradients, the
//! single-tensor path as torch.optim's default and the fused one as its `fused=True`; and a
//! bf16 autocast step equals one under torch.autocast("cpu", dtype=torch.bfloat16).

use crate::common;

use common::{max_relative_difference, max_relative_l2_difference, run_python};
use hytrain_train::{model, AdamWConfig, Ddp, DdpOptions, Implementation, OptimizerConfig, Precision, SgdConfig};
use tch::{Device, Kind, Tensor};

fn strip(tensors: &[(String, Tensor)], prefix: &str) -> Vec<(String, Tensor)> {
    tensors.iter().filter_map(|(n, t)| n.strip_prefix(prefix).map(|n| (n.to_string(), t.shallow_clone()))).collect()
}

fn get<'a>(tensors: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &tensors.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("PyTorch wrote no {name}")).1
}

#[test]
fn lenet_after_10_sgd_steps_matches_pytorch() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("parity.safetensors");
    run_python("parity_lenet.py", &[file.as_os_str()]);
    let saved = Tensor::read_safetensors(&file).unwrap();

    let net = model::build("lenet", 10, &[3, 32, 32], Device::Cpu).unwrap();
    // Strict loading: names and shapes are PyTorch's own.
    model::load_state_tensors(net.as_ref(), &strip(&saved, "init.")).unwrap();
    let mut ddp = Ddp::single(net, DdpOptions::default()).unwrap();
    let mut sgd =
        OptimizerConfig::Sgd(SgdConfig { momentum: 0.5, ..Default::default() }).build(ddp.parameters()).unwrap();
    for i in 0..10 {
        let batch =
            (get(&saved, &format!("batch{i}.x")).shallow_clone(), get(&saved, &format!("batch{i}.y")).shallow_clone());
        let out = ddp.train_step(&[batch], sgd.as_mut(), 0.01).unwrap();
        let torch_loss = get(&saved, &format!("loss{i}")).double_value(&[0]);
        assert!(
            (out.loss_value().unwrap() - torch_loss).abs() <= 1e-5 * torch_loss.abs(),
            "step {i}: loss {} vs PyTorch {torch_loss}",
            out.loss_value().unwrap()
        );
    }
    let ours = model::state_tensors(ddp.model());
    let theirs = strip(&saved, "final.");
    let init = strip(&saved, "init.");
    assert!(max_relative_difference(&theirs, &init) > 1e-3, "PyTorch's training barely moved the weights");
    let diff = max_relative_difference(&ours, &theirs);
    let l2 = max_relative_l2_difference(&ours, &theirs);
    eprintln!("LeNet after 10 SGD steps vs PyTorch: element-wise {diff:e}, L2 {l2:e} (relative)");
    assert!(diff <= 1e-5 && l2 <= 1e-5, "weights differ from PyTorch's: element-wise {diff:e}, L2 {l2:e} (relative)");
}

#[test]
fn lenet_after_3_bf16_autocast_steps_matches_torch_autocast() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("parity-bf16.safetensors");
    run_python("parity_lenet.py", &[file.as_os_str(), "bf16".as_ref()]);
    let saved = Tensor::read_safetensors(&file).unwrap();
    let train = |precision: Precision| {
        let net = model::build("lenet", 10, &[3, 32, 32], Device::Cpu).unwrap();
        model::load_state_tensors(net.as_ref(), &strip(&saved, "init.")).unwrap();
        let mut ddp = Ddp::single(net, DdpOptions { precision, ..Default::default() }).unwrap();
        let mut sgd =
            OptimizerConfig::Sgd(SgdConfig { momentum: 0.5, ..Default::default() }).build(ddp.parameters()).unwrap();
        let mut worst_loss = 0.0f64;
        for i in 0..3 {
            let x = get(&saved, &format!("batch{i}.x")).shallow_clone();
            let y = get(&saved, &format!("batch{i}.y")).shallow_clone();
            let out = ddp.train_step(&[(x, y)], sgd.as_mut(), 0.01).unwrap();
            let torch_loss = get(&saved, &format!("loss{i}")).double_value(&[0]);
            worst_loss = worst_loss.max((out.loss_value().unwrap() - torch_loss).abs() / torch_loss.abs());
        }
        (model::state_tensors(ddp.model()), worst_loss)
    };
    let theirs = strip(&saved, "final.");
    let (ours, worst_loss) = train(Precision::Bf16);
    assert!(ours.iter().all(|(_, t)| t.kind() == Kind::Float), "master weights left float32");
    let diff = max_relative_difference(&ours, &theirs);
    let l2 = max_relative_l2_difference(&ours, &theirs);
    let (fp32, _) = train(Precision::Fp32);
    let fp32_diff = max_relative_difference(&fp32, &theirs);
    eprintln!(
        "LeNet after 3 bf16 autocast steps vs PyTorch: loss {worst_loss:e}, element-wise {diff:e}, L2 {l2:e} \
         (relative); the same steps in fp32: element-wise {fp32_diff:e}"
    );
    // Same libtorch version on both sides (measured: bit-identical); the bound allows for a CPU whose bf16 kernels
    // round differently.
    assert!(worst_loss <= 1e-4, "losses differ from PyTorch's by {worst_loss:e} (relative)");
    assert!(diff <= 1e-4 && l2 <= 1e-4, "weights differ from PyTorch's: element-wise {diff:e}, L2 {l2:e} (relative)");
    // Without autocast the weights land measurably elsewhere, so the bound above does tell bf16 from fp32.
    assert!(fp32_diff > 10.0 * diff, "fp32 steps ({fp32_diff:e}) are as close to PyTorch's bf16 ones as ours");
}

#[test]
fn sgd_and_adamw_options_take_the_same_steps_as_torch_optim() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("optim.safetensors");
    run_python("parity_optim.py", &[file.as_os_str()]);
    let saved = Tensor::read_safetensors(&file).unwrap();
    let init = strip(&saved, "init.");
    let configs = [
        (
            "sgd_dampening",
            OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, dampening: 0.3, weight_decay: 1e-2, ..Default::default() }),
        ),
        (
            "sgd_nesterov",
            OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, nesterov: true, weight_decay: 1e-2, ..Default::default() }),
        ),
        ("adamw", OptimizerConfig::AdamW(AdamWConfig { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.01 })),
    ];
    for (name, cfg) in configs {
        // The single-tensor path against torch.optim's default, the fused one against its fused=True.
        for (implementation, theirs) in
            [(Implementation::SingleTensor, name.to_string()), (Implementation::Fused, format!("{name}_fused"))]
        {
            let params: Vec<(String, Tensor)> =
                init.iter().map(|(n, t)| (n.clone(), t.detach().copy().set_requires_grad(true))).collect();
            let mut opt = cfg.build_with(&params, implementation).unwrap();
            for step in 0.. {
                let grads = strip(&saved, &format!("grad{step}."));
                if grads.is_empty() {
                    break;
                }
                for (n, p) in &params {
                    // d/dp sum(p * g) is exactly g, accumulated into a zeroed gradient.
                    let mut p = p.shallow_clone();
                    p.zero_grad();
                    (&p * get(&grads, n)).sum(Kind::Float).backward();
                }
                opt.step(0.05).unwrap();
            }
            let theirs = strip(&saved, &format!("{theirs}."));
            assert!(max_relative_difference(&theirs, &init) > 1e-3, "{name}: torch.optim barely moved the parameters");
            let diff = max_relative_difference(&params, &theirs);
            eprintln!("{name} {implementation:?} after 6 steps vs torch.optim: element-wise {diff:e} (relative)");
            assert!(
                diff <= 1e-6,
                "{name} {implementation:?}: parameters differ from torch.optim's by {diff:e} (relative)"
            );
        }
    }
}
