//! Mixed precision in the engine: bf16 autocast really computes in bf16 while weights and gradients stay fp32, and
//! fp16 loss scaling skips overflowing steps on every rank alike (ranks as threads over the real TCP ring).

use crate::common;

use common::{identical, on_ranks, seeded};
use hytrain_train::{model, Autocast, Ddp, DdpOptions, OptimizerConfig, Precision, SgdConfig};
use tch::{Device, Kind, Tensor};

fn lenet_ddp(options: DdpOptions) -> Ddp {
    let net = seeded(5, || model::build("lenet", 10, &[3, 32, 32], Device::Cpu).unwrap());
    Ddp::single(net, options).unwrap()
}

fn batch(seed: i64, n: i64) -> (Tensor, Tensor) {
    seeded(seed, || {
        (
            Tensor::randn([n, 3, 32, 32], (Kind::Float, Device::Cpu)),
            Tensor::randint(10, [n], (Kind::Int64, Device::Cpu)),
        )
    })
}

#[test]
fn bf16_autocast_runs_convs_and_matmuls_in_bf16_while_weights_and_grads_stay_fp32() {
    tch::set_num_threads(1);
    let mut ddp = lenet_ddp(DdpOptions { precision: Precision::Bf16, ..Default::default() });
    let (xs, ys) = batch(1, 8);
    let (w, conv_w) = seeded(2, || {
        (
            Tensor::randn([3 * 32 * 32, 4], (Kind::Float, Device::Cpu)),
            Tensor::randn([6, 3, 5, 5], (Kind::Float, Device::Cpu)),
        )
    });
    assert_eq!(xs.view([8, -1]).matmul(&w).kind(), Kind::Float);
    let loss = {
        let _guard = ddp.autocast().unwrap().expect("bf16 autocasts");
        assert_eq!(Autocast::current(Device::Cpu), Some(Kind::BFloat16));
        assert_eq!(xs.view([8, -1]).matmul(&w).kind(), Kind::BFloat16);
        assert_eq!(xs.conv2d(&conv_w, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1).kind(), Kind::BFloat16);
        let logits = ddp.forward_t(&xs, true).unwrap();
        assert_eq!(logits.kind(), Kind::BFloat16, "the model's last linear layer ran in bf16");
        hytrain_train::cross_entropy(&logits, &ys).unwrap()
    };
    assert_eq!(Autocast::current(Device::Cpu), None, "the guard restored autocast off");
    assert_eq!(xs.view([8, -1]).matmul(&w).kind(), Kind::Float);
    assert!(ddp.backward(&loss).unwrap());
    for (name, p) in ddp.parameters() {
        assert_eq!(p.kind(), Kind::Float, "{name}");
        assert_eq!(p.grad().kind(), Kind::Float, "{name}'s gradient");
    }
    assert!(!ddp.overflowed() && ddp.grad_scaler().is_none(), "bf16 needs no loss scaling");
    let mut sgd = OptimizerConfig::Sgd(SgdConfig::default()).build(ddp.parameters()).unwrap();
    let out = ddp.train_step(&[batch(2, 8)], sgd.as_mut(), 0.01).unwrap();
    assert!(out.loss_value().unwrap().is_finite() && !out.skipped);
    assert_eq!(Autocast::current(Device::Cpu), None, "train_step left autocast on");
}

#[test]
fn fp16_step_and_clipping_norm_equal_fp32_ones_up_to_half_precision_rounding() {
    tch::set_num_threads(1);
    let (mut weights, mut norms) = (Vec::new(), Vec::new());
    for precision in [Precision::Fp32, Precision::Fp16] {
        // A clipping bound no gradient reaches: the norm is reported, the gradients left as they are.
        let mut ddp = lenet_ddp(DdpOptions { precision, max_grad_norm: Some(1e6), ..Default::default() });
        let mut sgd = OptimizerConfig::Sgd(SgdConfig::default()).build(ddp.parameters()).unwrap();
        let before = model::state_tensors(ddp.model()).into_iter().map(|(n, t)| (n, t.copy())).collect::<Vec<_>>();
        let out = ddp.train_step(&[batch(3, 16)], sgd.as_mut(), 0.1).unwrap();
        assert!(!out.skipped, "{precision}: LeNet on unit-normal inputs does not overflow at scale 2^16");
        let after = model::state_tensors(ddp.model());
        let moved: Vec<(String, Tensor)> =
            after.iter().zip(&before).map(|((n, a), (_, b))| (n.clone(), a - b)).collect();
        weights.push(moved);
        norms.push(out.grad_norm_value().unwrap().expect("clipping on"));
    }
    // Clipping runs after unscaling: it sees the true norm, not 2^16 times it.
    let norm_diff = (norms[1] - norms[0]).abs() / norms[0];
    assert!(norm_diff < 0.1, "gradient norm {} under fp16, {} under fp32", norms[1], norms[0]);
    // The update is lr times the gradient: unscaled it would be 2^16 times larger, unscaled twice or by half the
    // scale off by a factor of 2. fp16 rounding in backward moves it by about 1e-2 (measured 1.3e-2).
    let diff = common::max_relative_l2_difference(&weights[1], &weights[0]);
    eprintln!("fp16 step vs fp32 step: L2 {diff:e} (relative)");
    assert!(diff < 0.1, "the fp16 update differs from the fp32 one by {diff:e} (relative L2)");
}

/// One rank's skipped flag and loss scale after each step, and its weights before the first and after each step.
type RankRecord = (Vec<bool>, Vec<f64>, Vec<Vec<(String, Tensor)>>);

/// Two ranks with fp16: rank 0's first batch overflows float16 (inputs beyond its range), rank 1's does not.
fn two_ranks_with_one_overflow(options: DdpOptions) -> Vec<RankRecord> {
    on_ranks(2, |rank, comm| {
        let net = seeded(7, || model::build("lenet", 10, &[3, 32, 32], Device::Cpu).unwrap());
        let mut ddp = Ddp::new(net, comm, options.clone()).unwrap();
        let mut sgd =
            OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, ..Default::default() }).build(ddp.parameters()).unwrap();
        let mut record = (
            Vec::new(),
            Vec::new(),
            vec![model::state_tensors(ddp.model()).into_iter().map(|(n, t)| (n, t.copy())).collect::<Vec<_>>()],
        );
        for step in 0..3i64 {
            let micro: Vec<(Tensor, Tensor)> = (0..options.grad_accum as i64)
                .map(|m| {
                    let (xs, ys) = batch(100 * step + 10 * rank as i64 + m, 8);
                    if step == 0 && rank == 0 && m == 0 {
                        (xs * 1e6, ys)
                    } else {
                        (xs, ys)
                    }
                })
                .collect();
            let out = ddp.train_step(&micro, sgd.as_mut(), 0.05).unwrap();
            record.0.push(out.skipped);
            record.1.push(ddp.grad_scaler().expect("fp16 scales the loss").scale());
            record.2.push(model::state_tensors(ddp.model()).into_iter().map(|(n, t)| (n, t.copy())).collect());
        }
        record
    })
}

fn assert_overflow_skipped_alike(options: DdpOptions) {
    let ranks = two_ranks_with_one_overflow(DdpOptions { precision: Precision::Fp16, ..options.clone() });
    for (rank, (skipped, scales, weights)) in ranks.iter().enumerate() {
        assert_eq!(skipped, &[true, false, false], "rank {rank} ({options:?})");
        assert_eq!(scales, &[32768.0, 32768.0, 32768.0], "rank {rank}: the overflow halves the scale once");
        assert!(identical(&weights[0], &weights[1]), "rank {rank}: the skipped step changed the weights");
        assert!(!identical(&weights[1], &weights[2]), "rank {rank}: the step after did not train");
        assert!(weights[3].iter().all(|(_, t)| t.isfinite().all().int64_value(&[]) == 1), "rank {rank}: inf weights");
    }
    for step in 0..4 {
        assert!(identical(&ranks[0].2[step], &ranks[1].2[step]), "ranks' weights differ after step {step}");
    }
}

#[test]
fn an_fp16_overflow_on_one_rank_skips_the_step_on_both_with_overlapped_allreduce() {
    assert_overflow_skipped_alike(DdpOptions { overlap: true, ..Default::default() });
}

#[test]
fn an_fp16_overflow_skips_the_step_alike_with_grad_accum_and_clipping_after_backward() {
    assert_overflow_skipped_alike(DdpOptions {
        overlap: false,
        grad_accum: 2,
        max_grad_norm: Some(1.0),
        ..Default::default()
    });
}
