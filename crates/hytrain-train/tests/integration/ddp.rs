//! The engine's main correctness property: N ranks × batch B equal one rank × batch N·B; plus the start-up checks,
//! buckets and BatchNorm buffers.

use crate::common;

use common::{deep_copy, identical, max_relative_difference, max_relative_l2_difference, on_ranks, seeded, TinyBn};
use hytrain_train::model::{self, LayerBuilder, Model};
use hytrain_train::{AdamWConfig, Ddp, DdpOptions, OptimizerConfig, SgdConfig, TrainError};
use tch::{Device, Kind, TchError, Tensor};

const STEPS: usize = 20;
/// Per-rank batch; the single-rank reference takes 2 × this.
const B: i64 = 8;

struct Setup {
    model: &'static str,
    input: Vec<i64>,
    classes: i64,
}

fn lenet() -> Setup {
    Setup { model: "lenet", input: vec![3, 32, 32], classes: 10 }
}

fn mlp() -> Setup {
    Setup { model: "mlp", input: vec![1, 8, 8], classes: 10 }
}

/// Fixed batches of 2B samples per step, the same for every run.
fn batches(s: &Setup) -> Vec<(Tensor, Tensor)> {
    seeded(1234, || {
        (0..STEPS)
            .map(|_| {
                let mut shape = vec![2 * B];
                shape.extend_from_slice(&s.input);
                (
                    Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)),
                    Tensor::randint(s.classes, [2 * B], (Kind::Int64, Device::Cpu)),
                )
            })
            .collect()
    })
}

fn initial_weights(s: &Setup) -> Vec<(String, Tensor)> {
    let m = seeded(7, || model::build(s.model, s.classes, &s.input, Device::Cpu).unwrap());
    deep_copy(&model::state_tensors(m.as_ref()))
}

fn lr_of(opt: &OptimizerConfig) -> f64 {
    match opt {
        OptimizerConfig::Sgd(_) => 0.05,
        OptimizerConfig::AdamW(_) => 1e-3,
    }
}

/// One rank, full batches of 2B.
fn train_single(
    s: &Setup,
    init: Vec<(String, Tensor)>,
    data: &[(Tensor, Tensor)],
    opt: OptimizerConfig,
) -> Vec<(String, Tensor)> {
    tch::set_num_threads(1);
    let m = seeded(8, || model::build(s.model, s.classes, &s.input, Device::Cpu).unwrap());
    model::load_state_tensors(m.as_ref(), &init).unwrap();
    let mut ddp = Ddp::single(m, DdpOptions::default()).unwrap();
    let mut optimizer = opt.build(ddp.parameters()).unwrap();
    for (xs, ys) in data {
        ddp.train_step(&[(xs.shallow_clone(), ys.shallow_clone())], optimizer.as_mut(), lr_of(&opt)).unwrap();
    }
    deep_copy(&model::state_tensors(ddp.model()))
}

/// Two ranks; rank r takes half r of each batch, split into `accum` micro-batches. Only rank 0 starts from `init`:
/// rank 1 builds its own random weights, which the start-up broadcast must replace.
fn train_two_ranks(
    s: &Setup,
    init: &[(String, Tensor)],
    data: &[(Tensor, Tensor)],
    opt: OptimizerConfig,
    accum: usize,
) -> Vec<Vec<(String, Tensor)>> {
    let inits = [deep_copy(init), deep_copy(init)];
    let halves: Vec<Vec<Vec<(Tensor, Tensor)>>> = (0..2)
        .map(|r| {
            data.iter()
                .map(|(xs, ys)| {
                    let (x, y) = (xs.narrow(0, r * B, B), ys.narrow(0, r * B, B));
                    let micro = B / accum as i64;
                    (0..accum as i64)
                        .map(|i| (x.narrow(0, i * micro, micro).copy(), y.narrow(0, i * micro, micro).copy()))
                        .collect()
                })
                .collect()
        })
        .collect();
    let inits = std::sync::Mutex::new(inits.map(Some));
    let halves = std::sync::Mutex::new(halves.into_iter().map(Some).collect::<Vec<_>>());
    on_ranks(2, |rank, comm| {
        let init = inits.lock().unwrap()[rank].take().unwrap();
        let steps = halves.lock().unwrap()[rank].take().unwrap();
        let m = seeded(8 + rank as i64, || model::build(s.model, s.classes, &s.input, Device::Cpu).unwrap());
        if rank == 0 {
            model::load_state_tensors(m.as_ref(), &init).unwrap();
        }
        let options = DdpOptions { grad_accum: accum, ..Default::default() };
        let mut ddp = Ddp::new(m, comm, options).unwrap();
        let mut optimizer = opt.build(ddp.parameters()).unwrap();
        for micro in &steps {
            ddp.train_step(micro, optimizer.as_mut(), lr_of(&opt)).unwrap();
        }
        deep_copy(&model::state_tensors(ddp.model()))
    })
}

fn optimizers() -> [OptimizerConfig; 2] {
    [
        OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, ..Default::default() }),
        OptimizerConfig::AdamW(AdamWConfig::default()),
    ]
}

fn check_equivalence(accum: usize) {
    tch::set_num_threads(1);
    for setup in [lenet(), mlp()] {
        let data = batches(&setup);
        let init = initial_weights(&setup);
        for opt in optimizers() {
            let reference = train_single(&setup, deep_copy(&init), &data, opt);
            let ranks = train_two_ranks(&setup, &init, &data, opt, accum);
            let what = format!("{} with {opt:?}, grad_accum {accum}", setup.model);
            assert!(identical(&ranks[0], &ranks[1]), "{what}: the two ranks' weights differ");
            let moved = max_relative_difference(&reference, &init);
            assert!(
                moved > 1e-3,
                "{what}: training barely moved the weights ({moved:e}), the comparison proves nothing"
            );
            // Per tensor, ||a - b|| / ||b||: the criterion for both optimizers.
            let l2 = max_relative_l2_difference(&ranks[0], &reference);
            eprintln!("{what}: relative L2 {l2:e}, element-wise {:e}", max_relative_difference(&ranks[0], &reference));
            assert!(l2 <= 1e-5, "{what}: 2 ranks differ from 1 rank with the double batch by {l2:e} (relative L2)");
            // Element-wise against each tensor's largest value too, for SGD. Not for Adam: it divides by sqrt(v),
            // so where a gradient is near zero (units behind a mostly inactive ReLU) rounding differences of the
            // 1e-7 kind between (g0 + g1) / 2 and the mean over 2B are amplified without bound for single elements.
            if matches!(opt, OptimizerConfig::Sgd(_)) {
                let diff = max_relative_difference(&ranks[0], &reference);
                assert!(
                    diff <= 1e-5,
                    "{what}: 2 ranks differ from 1 rank with the double batch by {diff:e} (element-wise)"
                );
            }
        }
    }
}

#[test]
fn two_ranks_match_one_rank_with_double_batch() {
    check_equivalence(1);
}

#[test]
fn two_ranks_with_grad_accum_match_one_rank_with_double_batch() {
    check_equivalence(2);
}

#[test]
fn ranks_with_different_models_fail_naming_the_rank_and_tensor() {
    let errors = on_ranks(2, |rank, comm| {
        let classes = if rank == 0 { 10 } else { 5 };
        let m = seeded(1, || model::build("lenet", classes, &[3, 32, 32], Device::Cpu).unwrap());
        Ddp::new(m, comm, DdpOptions::default()).unwrap_err().to_string()
    });
    for e in &errors {
        assert!(e.starts_with("rank 1 built a different model than rank 0"), "{e}");
        assert!(
            e.contains("parameter fc3.weight [10, 84] Float") && e.contains("parameter fc3.weight [5, 84] Float"),
            "{e}"
        );
    }
    assert_eq!(errors[0], errors[1], "every rank reports the same difference");
}

#[test]
fn ranks_with_different_tensor_counts_fail_naming_the_missing_tensor() {
    let errors = on_ranks(3, |rank, comm| {
        let name = if rank == 2 { "mlp:32" } else { "mlp:32,16" };
        let m = seeded(1, || model::build(name, 10, &[1, 8, 8], Device::Cpu).unwrap());
        Ddp::new(m, comm, DdpOptions::default()).unwrap_err().to_string()
    });
    for e in &errors {
        assert!(e.starts_with("rank 2 built a different model than rank 0"), "{e}");
        assert!(e.contains("tensor #2"), "{e}");
    }
}

#[test]
fn startup_broadcast_gives_every_rank_rank_0_weights() {
    let weights = on_ranks(3, |rank, comm| {
        // Each rank draws its own weights; which ones does not matter, only that rank 0's win.
        let m = seeded(100 + rank as i64, || model::build("resnet18", 10, &[3, 32, 32], Device::Cpu).unwrap());
        let ddp = Ddp::new(m, comm, DdpOptions::default()).unwrap();
        deep_copy(&model::state_tensors(ddp.model()))
    });
    assert!(identical(&weights[0], &weights[1]) && identical(&weights[0], &weights[2]));
}

#[test]
fn buckets_are_identical_on_every_rank_reverse_ordered_with_a_small_first_one() {
    let layouts = on_ranks(2, |_, comm| {
        let m = seeded(1, || model::build("resnet18", 10, &[3, 32, 32], Device::Cpu).unwrap());
        let names: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
        let ddp = Ddp::new(m, comm, DdpOptions { bucket_mb: 5.0, ..Default::default() }).unwrap();
        (ddp.bucket_layout(), names)
    });
    let (layout, names) = &layouts[0];
    assert_eq!(layout, &layouts[1].0, "bucket layouts differ between ranks");
    // All parameters, each once, in exactly reverse definition order across buckets.
    let flat: Vec<&String> = layout.iter().flat_map(|b| &b.params).collect();
    let reversed: Vec<&String> = names.iter().rev().collect();
    assert_eq!(flat, reversed);
    assert_eq!(layout[0].params[0], "fc.bias");
    // A bucket closes once it reaches its cap (1 MiB for the first, 5 MiB after), so without its last member
    // each is under its cap, and each but the last is at least its cap.
    let mib = 1 << 20;
    let by_name: std::collections::HashMap<&String, usize> = {
        let m = seeded(1, || model::build("resnet18", 10, &[3, 32, 32], Device::Cpu).unwrap());
        let sizes: Vec<usize> = m.named_parameters().iter().map(|(_, t)| t.numel() * 4).collect();
        names.iter().zip(sizes).collect()
    };
    for (i, b) in layout.iter().enumerate() {
        let cap = if i == 0 { mib } else { 5 * mib };
        let last = by_name[b.params.last().unwrap()];
        assert!(b.bytes - last < cap, "bucket {i} overfilled: {} bytes", b.bytes);
        if i + 1 < layout.len() {
            assert!(b.bytes >= cap, "bucket {i} closed early: {} bytes", b.bytes);
        }
    }
    assert!(layout.len() >= 4, "{} buckets for 44 MB at 5 MiB", layout.len());
}

/// Rank 1's buffers are spoiled after start-up; a training step then runs on the same batch on both ranks.
fn buffers_after_spoiled_step(broadcast_buffers: bool) -> Vec<Vec<(String, Tensor)>> {
    let (xs, ys) = seeded(3, || {
        (Tensor::randn([4, 3, 8, 8], (Kind::Float, Device::Cpu)), Tensor::randint(3, [4], (Kind::Int64, Device::Cpu)))
    });
    let batch = std::sync::Mutex::new(vec![Some((xs.copy(), ys.copy())), Some((xs, ys))]);
    on_ranks(2, |rank, comm| {
        let (xs, ys) = batch.lock().unwrap()[rank].take().unwrap();
        let options = DdpOptions { broadcast_buffers, ..Default::default() };
        let mut ddp = Ddp::new(Box::new(TinyBn::new()), comm, options).unwrap();
        if rank == 1 {
            for (_, mut b) in ddp.model().named_buffers() {
                let _ = tch::no_grad(|| b.fill_(7));
            }
        }
        let mut opt = OptimizerConfig::Sgd(SgdConfig::default()).build(ddp.parameters()).unwrap();
        ddp.train_step(&[(xs, ys)], opt.as_mut(), 0.1).unwrap();
        deep_copy(&ddp.model().named_buffers())
    })
}

#[test]
fn batchnorm_buffers_come_from_rank_0_before_each_training_forward() {
    let synced = buffers_after_spoiled_step(true);
    assert!(identical(&synced[0], &synced[1]), "rank 1 kept its own running statistics");
    // The control: without the broadcast the spoiled values survive, so the check above can fail.
    let unsynced = buffers_after_spoiled_step(false);
    assert!(!identical(&unsynced[0], &unsynced[1]));
}

/// A model with a parameter forward never uses.
struct Unused {
    fc: model::Linear,
    params: Vec<(String, Tensor)>,
}

impl Model for Unused {
    fn name(&self) -> &str {
        "unused"
    }
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Result<Tensor, TchError> {
        self.fc.forward(xs)
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }
}

#[test]
fn a_parameter_without_gradient_is_named_in_the_error() {
    let errors = on_ranks(2, |_, comm| {
        let mut b = LayerBuilder::new(Device::Cpu);
        let fc = b.linear("fc", 4, 2).unwrap();
        b.linear("head", 4, 2).unwrap();
        let (params, _) = b.finish();
        let mut ddp = Ddp::new(Box::new(Unused { fc, params }), comm, DdpOptions::default()).unwrap();
        let mut opt = OptimizerConfig::Sgd(SgdConfig::default()).build(ddp.parameters()).unwrap();
        let batch = (Tensor::ones([2, 4], (Kind::Float, Device::Cpu)), Tensor::zeros([2], (Kind::Int64, Device::Cpu)));
        ddp.train_step(&[batch], opt.as_mut(), 0.1).unwrap_err()
    });
    for e in errors {
        assert!(matches!(&e, TrainError::MissingGradient(n) if n == "head.weight" || n == "head.bias"), "{e}");
        assert!(e.to_string().contains("received no gradient"), "{e}");
    }
}

#[test]
fn clipping_bounds_the_global_gradient_norm() {
    tch::set_num_threads(1);
    let (m, xs, ys) = seeded(1, || {
        let m = model::build("mlp:16", 3, &[4], Device::Cpu).unwrap();
        (
            m,
            Tensor::randn([8, 4], (Kind::Float, Device::Cpu)) * 100.0,
            Tensor::randint(3, [8], (Kind::Int64, Device::Cpu)),
        )
    });
    let options = DdpOptions { max_grad_norm: Some(0.01), ..Default::default() };
    let mut ddp = Ddp::single(m, options).unwrap();
    let logits = ddp.forward_t(&xs, true).unwrap();
    ddp.backward(&hytrain_train::cross_entropy(&logits, &ys).unwrap()).unwrap();
    let before = ddp.clip_grad_norm(0.01).unwrap().double_value(&[]);
    assert!(before > 0.01, "test needs a large gradient, got norm {before}");
    let after: f64 =
        ddp.parameters().iter().map(|(_, p)| p.grad().norm().double_value(&[]).powi(2)).sum::<f64>().sqrt();
    assert!((after - 0.01).abs() < 1e-4, "norm after clipping {after}");
    // A norm already below the bound is left alone.
    let again = ddp.clip_grad_norm(1.0).unwrap().double_value(&[]);
    assert!((again - after).abs() < 1e-6);
}

#[test]
fn bad_options_are_refused_with_the_flag_named() {
    let m = || seeded(1, || model::build("mlp", 10, &[64], Device::Cpu).unwrap());
    for (options, flag) in [
        (DdpOptions { bucket_mb: 0.0, ..Default::default() }, "--bucket-mb"),
        (DdpOptions { grad_accum: 0, ..Default::default() }, "--grad-accum"),
        (DdpOptions { max_grad_norm: Some(-1.0), ..Default::default() }, "--clip-grad-norm"),
    ] {
        let e = Ddp::single(m(), options).unwrap_err().to_string();
        assert!(e.starts_with(&format!("invalid {flag}")), "{e}");
    }
    let mut ddp = Ddp::single(m(), DdpOptions { grad_accum: 2, ..Default::default() }).unwrap();
    let mut opt = OptimizerConfig::Sgd(SgdConfig::default()).build(ddp.parameters()).unwrap();
    let batch = (Tensor::ones([2, 64], (Kind::Float, Device::Cpu)), Tensor::zeros([2], (Kind::Int64, Device::Cpu)));
    let e = ddp.train_step(&[batch], opt.as_mut(), 0.1).unwrap_err().to_string();
    assert!(e.contains("--grad-accum") && e.contains("got 1 micro-batches"), "{e}");
}

#[test]
fn a_batch_of_the_wrong_shape_is_an_error_not_a_panic() {
    let m = seeded(1, || model::build("lenet", 10, &[3, 32, 32], Device::Cpu).unwrap());
    let mut ddp = Ddp::single(m, DdpOptions::default()).unwrap();
    let e = ddp.forward_t(&Tensor::zeros([2, 1, 32, 32], (Kind::Float, Device::Cpu)), true).unwrap_err().to_string();
    assert!(e.starts_with("lenet forward on a batch of shape [2, 1, 32, 32]"), "{e}");
}
