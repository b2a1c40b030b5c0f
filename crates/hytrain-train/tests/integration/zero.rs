//! Sharded data parallelism (`--shard optimizer|gradients`, ZeRO-1 and ZeRO-2): the weights after 20 steps equal
//! DDP's on 2, 3 and 4 ranks over the real TCP ring, with gradient accumulation, clipping and buckets whose sizes
//! the world size does not divide; ZeRO-2 holds no full gradients between steps; the optimizer state is 1/N per
//! rank and converts to and from DDP's checkpoint format at any world size; what is not supported is refused.

use std::sync::Mutex;
use std::time::Duration;

use crate::common::{deep_copy, on_ranks, seeded};
use hytrain_comm::testing::InProcess;
use hytrain_cuda::HostCollective;
use hytrain_train::model::{self, BatchNorm2d, Conv2d, ConvConfig, LayerBuilder, Linear, Model};
use hytrain_train::{
    AdamWConfig, Ddp, DdpOptions, Optimizer, OptimizerConfig, Precision, SgdConfig, ShardMode, TrainError,
};
use tch::{Device, Kind, TchError, Tensor};

const STEPS: usize = 20;
/// Samples per rank and step.
const B: i64 = 6;

/// A conv, a BatchNorm and two linear layers: with [`options`]' 64-byte cap, buckets of 24, 1267 and 145
/// elements (1267 and 145 divide by none of 2, 3, 4), so every world size pads.
struct Net {
    conv: Conv2d,
    bn: BatchNorm2d,
    fc1: Linear,
    fc2: Linear,
    params: Vec<(String, Tensor)>,
    buffers: Vec<(String, Tensor)>,
}

impl Net {
    fn new() -> Self {
        let mut b = LayerBuilder::new(Device::Cpu);
        // No bias ahead of BatchNorm, as real networks do: its gradient is zero but for rounding noise, which
        // AdamW (eps 1e-8) turns into updates of ~lr * noise / eps, so a last-bit change in the clipping factor
        // (DDP's float32 per-tensor norms against the sharded sum of squares) moved it by 5e-4 in 20 steps, DDP
        // against DDP with max-norm changed by 1e-7 as much.
        let conv = b.conv2d("conv", 3, 5, ConvConfig { bias: false, ..ConvConfig::new(3) }).unwrap();
        let bn = b.batch_norm2d("bn", 5).unwrap();
        let fc1 = b.linear("fc1", 5 * 6 * 6, 7).unwrap();
        let fc2 = b.linear("fc2", 7, 3).unwrap();
        let (params, buffers) = b.finish();
        Net { conv, bn, fc1, fc2, params, buffers }
    }
}

impl Model for Net {
    fn name(&self) -> &str {
        "zero-net"
    }
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let xs = self.bn.forward_t(&self.conv.forward(xs)?, train)?.f_relu()?;
        self.fc2.forward(&self.fc1.forward(&xs.f_flatten(1, -1)?)?.f_tanh()?)
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }
    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        self.buffers.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }
}

/// Rank 0's model starts from these weights; the others build their own, which the start-up broadcast replaces.
fn initial() -> Vec<(String, Tensor)> {
    seeded(17, || deep_copy(&model::state_tensors(&Net::new())))
}

fn net(rank: usize, init: &[(String, Tensor)]) -> Box<dyn Model> {
    let m = seeded(100 + rank as i64, Net::new);
    if rank == 0 {
        model::load_state_tensors(&m, init).unwrap();
    }
    Box::new(m)
}

/// `STEPS` global batches of `world * B` samples (the same for every mode at one world size).
fn data(world: usize, steps: usize) -> Vec<(Tensor, Tensor)> {
    seeded(1234 + world as i64, || {
        (0..steps)
            .map(|_| {
                let n = world as i64 * B;
                (
                    Tensor::randn([n, 3, 8, 8], (Kind::Float, Device::Cpu)),
                    Tensor::randint(3, [n], (Kind::Int64, Device::Cpu)),
                )
            })
            .collect()
    })
}

/// Rank `rank`'s micro-batches of each step.
fn share(data: &[(Tensor, Tensor)], rank: usize, accum: usize) -> Vec<Vec<(Tensor, Tensor)>> {
    let micro = B / accum as i64;
    data.iter()
        .map(|(xs, ys)| {
            (0..accum as i64)
                .map(|i| {
                    let at = rank as i64 * B + i * micro;
                    (xs.narrow(0, at, micro).copy(), ys.narrow(0, at, micro).copy())
                })
                .collect()
        })
        .collect()
}

#[derive(Clone, Copy, Debug)]
struct Case {
    opt: OptimizerConfig,
    accum: usize,
    clip: Option<f64>,
    overlap: bool,
}

fn options(case: Case, shard: ShardMode) -> DdpOptions {
    DdpOptions {
        bucket_mb: 64.0 / (1 << 20) as f64,
        first_bucket_mb: 64.0 / (1 << 20) as f64,
        grad_accum: case.accum,
        max_grad_norm: case.clip,
        overlap: case.overlap,
        shard,
        ..Default::default()
    }
}

fn lr_of(opt: &OptimizerConfig) -> f64 {
    match opt {
        OptimizerConfig::Sgd(_) => 0.05,
        OptimizerConfig::AdamW(_) => 3e-3,
    }
}

/// Every rank's weights (parameters and buffers) after training `case` in `shard` mode on `world` ranks.
fn train(world: usize, case: Case, shard: ShardMode, init: &[(String, Tensor)]) -> Vec<Vec<(String, Tensor)>> {
    let init = Mutex::new(deep_copy(init));
    on_ranks(world, |rank, comm| {
        let data = data(world, STEPS);
        let init = deep_copy(&init.lock().unwrap());
        let mut ddp = Ddp::new(net(rank, &init), comm, options(case, shard)).unwrap();
        assert!(ddp.bucket_layout().len() >= 3, "the model must span several buckets");
        let mut optimizer = ddp.build_optimizer(&case.opt).unwrap();
        for micro in share(&data, rank, case.accum) {
            ddp.train_step(&micro, optimizer.as_mut(), lr_of(&case.opt)).unwrap();
        }
        deep_copy(&model::state_tensors(ddp.model()))
    })
}

/// Largest |a - b| over all tensors, over the largest |b| (the largest weight).
fn difference(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    let (mut diff, mut scale) = (0.0f64, 0.0f64);
    for ((n, x), (m, y)) in a.iter().zip(b) {
        assert_eq!(n, m);
        let (x, y) = (x.to_kind(Kind::Double), y.to_kind(Kind::Double));
        diff = diff.max((&x - &y).abs().max().double_value(&[]));
        scale = scale.max(y.abs().max().double_value(&[]));
    }
    diff / scale
}

fn bitwise(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> bool {
    a.iter().zip(b).all(|((_, x), (_, y))| x.equal(y))
}

fn optimizers() -> [OptimizerConfig; 4] {
    [
        OptimizerConfig::Sgd(SgdConfig::default()),
        OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, ..Default::default() }),
        OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, nesterov: true, weight_decay: 1e-2, ..Default::default() }),
        OptimizerConfig::AdamW(AdamWConfig { weight_decay: 0.05, ..Default::default() }),
    ]
}

/// Trains every optimizer in every mode on `world` ranks and compares the sharded weights with DDP's.
fn sharded_equals_ddp(world: usize, accum: usize, clip: Option<f64>) {
    let init = initial();
    let mut worst = 0.0f64;
    for opt in optimizers() {
        let case = Case { opt, accum, clip, overlap: true };
        let ddp = train(world, case, ShardMode::None, &init);
        let moved = difference(&ddp[0], &init);
        assert!(moved > 1e-3, "{case:?}: training barely moved the weights ({moved:e})");
        for shard in [ShardMode::Optimizer, ShardMode::Gradients] {
            let ranks = train(world, case, shard, &init);
            for (r, weights) in ranks.iter().enumerate().skip(1) {
                // BatchNorm's running statistics are each rank's own after the last forward, as in DDP.
                let params = |w: &[(String, Tensor)]| -> Vec<(String, Tensor)> {
                    w.iter()
                        .filter(|(n, _)| !n.contains("running") && !n.contains("num_batches"))
                        .map(|(n, t)| (n.clone(), t.shallow_clone()))
                        .collect()
                };
                assert!(
                    bitwise(&params(weights), &params(&ranks[0])),
                    "{shard} {case:?}: rank {r}'s parameters differ from rank 0's"
                );
            }
            let d = difference(&ranks[0], &ddp[0]);
            println!(
                "zero exactness: world {world} {shard:<9} accum {accum} clip {clip:?} {opt:?}: max |w - w_ddp| / \
                 max |w_ddp| = {d:.3e}{}",
                if bitwise(&ranks[0], &ddp[0]) { " (bit-identical)" } else { "" }
            );
            worst = worst.max(d);
        }
    }
    assert!(worst <= 1e-6, "on {world} ranks: weights differ from DDP's by up to {worst:e} (relative)");
}

#[test]
fn sharded_weights_equal_ddp_on_two_ranks_with_accumulation_and_clipping() {
    sharded_equals_ddp(2, 2, Some(0.05));
}

#[test]
fn sharded_weights_equal_ddp_on_three_ranks_with_accumulation_and_clipping() {
    sharded_equals_ddp(3, 2, Some(0.05));
}

#[test]
fn sharded_weights_equal_ddp_on_four_ranks_with_accumulation_and_clipping() {
    sharded_equals_ddp(4, 2, Some(0.05));
}

#[test]
fn sharded_weights_equal_ddp_without_accumulation_clipping_or_overlap() {
    let init = initial();
    for world in [2, 3] {
        for opt in [optimizers()[1], optimizers()[3]] {
            for overlap in [true, false] {
                let case = Case { opt, accum: 1, clip: None, overlap };
                let ddp = train(world, case, ShardMode::None, &init);
                for shard in [ShardMode::Optimizer, ShardMode::Gradients] {
                    let ranks = train(world, case, shard, &init);
                    let d = difference(&ranks[0], &ddp[0]);
                    println!(
                        "zero exactness: world {world} {shard:<9} accum 1 no clip overlap {overlap} {opt:?}: {d:.3e}{}",
                        if bitwise(&ranks[0], &ddp[0]) { " (bit-identical)" } else { "" }
                    );
                    assert!(d <= 1e-6, "{shard} {case:?} on {world} ranks: {d:e}");
                }
            }
        }
    }
}

/// The clipping norm is the global one: what each run reports equals DDP's.
#[test]
fn sharded_clipping_reports_the_global_norm() {
    let init = initial();
    let norms = |shard: ShardMode| -> Vec<f64> {
        let init = Mutex::new(deep_copy(&init));
        let case = Case { opt: optimizers()[0], accum: 1, clip: Some(1e-3), overlap: true };
        on_ranks(3, |rank, comm| {
            let init = deep_copy(&init.lock().unwrap());
            let mut ddp = Ddp::new(net(rank, &init), comm, options(case, shard)).unwrap();
            let mut optimizer = ddp.build_optimizer(&case.opt).unwrap();
            let out = ddp.train_step(&share(&data(3, 1), rank, 1)[0], optimizer.as_mut(), 0.1).unwrap();
            out.grad_norm_value().unwrap().unwrap()
        })
    };
    let ddp = norms(ShardMode::None);
    for shard in [ShardMode::Optimizer, ShardMode::Gradients] {
        for n in norms(shard) {
            assert!((n - ddp[0]).abs() <= 1e-5 * ddp[0], "{shard}: norm {n} against DDP's {}", ddp[0]);
        }
    }
}

/// Elements of optimizer state (step counts aside).
fn state_elements(optimizer: &dyn Optimizer) -> i64 {
    optimizer.state().iter().filter(|(n, _)| !n.ends_with(".step")).map(|(_, t)| t.numel() as i64).sum()
}

#[test]
fn zero2_holds_no_full_gradients_after_a_step_and_state_is_one_nth() {
    let init = initial();
    let world = 4;
    let init = Mutex::new(init);
    let case = Case { opt: optimizers()[3], accum: 1, clip: None, overlap: true };
    let results = on_ranks(world, |rank, comm| {
        let init = deep_copy(&init.lock().unwrap());
        let data = data(world, 2);
        let mut out = Vec::new();
        let mut comm = Some(comm);
        for shard in [ShardMode::None, ShardMode::Optimizer, ShardMode::Gradients] {
            let mut ddp = Ddp::new(net(rank, &init), comm.take().unwrap(), options(case, shard)).unwrap();
            let mut optimizer = ddp.build_optimizer(&case.opt).unwrap();
            for micro in share(&data, rank, 1) {
                ddp.train_step(&micro, optimizer.as_mut(), 1e-3).unwrap();
            }
            let defined = ddp.parameters().iter().filter(|(_, p)| p.grad().defined()).count();
            out.push((defined, ddp.parameters().len(), state_elements(optimizer.as_ref())));
            comm = Some(ddp.into_parts().1);
        }
        out
    });
    let params: i64 = initial().iter().take(7).map(|(_, t)| t.numel() as i64).sum();
    for (rank, modes) in results.iter().enumerate() {
        let [(ddp_grads, n, ddp_state), (zero1_grads, _, zero1_state), (zero2_grads, _, zero2_state)] = modes[..]
        else {
            unreachable!()
        };
        assert_eq!(ddp_grads, n, "DDP keeps every gradient");
        assert_eq!(zero1_grads, n, "ZeRO-1 keeps the full gradients (views of its buckets)");
        assert_eq!(zero2_grads, 0, "rank {rank}: ZeRO-2 left {zero2_grads} full gradients defined after the step");
        // AdamW: two moments per element. Sharded: per bucket, ceil(numel / world) elements.
        assert_eq!(ddp_state, 2 * params);
        let padded: i64 = [24i64, 1267, 145].iter().map(|n| (n + world as i64 - 1) / world as i64).sum();
        assert_eq!(zero1_state, 2 * padded, "rank {rank}: ZeRO-1 state");
        assert_eq!(zero2_state, 2 * padded, "rank {rank}: ZeRO-2 state");
        assert!((zero2_state as f64) < ddp_state as f64 / world as f64 + 8.0);
    }
}

/// The gathered state of a sharded run is DDP's checkpoint state (names, shapes, values), and loaded at another
/// world size it continues as DDP does from the same state.
#[test]
fn sharded_state_gathers_to_ddp_format_and_loads_at_another_world_size() {
    let init = initial();
    let opt = optimizers()[3];
    let case = Case { opt, accum: 1, clip: None, overlap: true };
    // 10 steps on 4 ranks, sharded (ZeRO-2) and not: weights and the per-parameter state.
    let run4 = |shard: ShardMode| {
        let init = Mutex::new(deep_copy(&init));
        on_ranks(4, |rank, comm| {
            let data = data(4, 10);
            let init = deep_copy(&init.lock().unwrap());
            let mut ddp = Ddp::new(net(rank, &init), comm, options(case, shard)).unwrap();
            let mut optimizer = ddp.build_optimizer(&opt).unwrap();
            for micro in share(&data, rank, 1) {
                ddp.train_step(&micro, optimizer.as_mut(), lr_of(&opt)).unwrap();
            }
            let state = deep_copy(&ddp.optimizer_state(optimizer.as_ref()).unwrap());
            (deep_copy(&model::state_tensors(ddp.model())), state)
        })
    };
    let plain = run4(ShardMode::None);
    let sharded = run4(ShardMode::Gradients);
    let sorted = |mut v: Vec<(String, Tensor)>| {
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let want = sorted(deep_copy(&plain[0].1));
    for (rank, (_, state)) in sharded.iter().enumerate() {
        let got = sorted(deep_copy(state));
        let names = |v: &[(String, Tensor)]| v.iter().map(|(n, t)| (n.clone(), t.size())).collect::<Vec<_>>();
        assert_eq!(names(&got), names(&want), "rank {rank}: gathered state names and shapes");
        for ((n, x), (_, y)) in got.iter().zip(&want) {
            let scale = y.abs().max().double_value(&[]).max(1e-12);
            let d = (x - y).abs().max().double_value(&[]) / scale;
            assert!(d <= 1e-5, "rank {rank}: {n} differs from DDP's by {d:e}");
        }
    }
    // Resume both at 3 ranks from the sharded run's weights and state: ZeRO-1 and DDP continue alike.
    let (weights, state) = (deep_copy(&sharded[0].0), deep_copy(&sharded[0].1));
    let run3 = |shard: ShardMode| {
        let shared = Mutex::new((deep_copy(&weights), deep_copy(&state)));
        on_ranks(3, |rank, comm| {
            let data = data(3, 10);
            let (weights, state) = {
                let s = shared.lock().unwrap();
                (deep_copy(&s.0), deep_copy(&s.1))
            };
            let mut ddp = Ddp::new(net(0, &weights), comm, options(case, shard)).unwrap();
            let mut optimizer = ddp.build_optimizer(&opt).unwrap();
            ddp.load_optimizer_state(optimizer.as_mut(), &state).unwrap();
            for micro in share(&data, rank, 1) {
                ddp.train_step(&micro, optimizer.as_mut(), lr_of(&opt)).unwrap();
            }
            deep_copy(&model::state_tensors(ddp.model()))
        })
    };
    let ddp = run3(ShardMode::None);
    let zero1 = run3(ShardMode::Optimizer);
    let d = difference(&zero1[0], &ddp[0]);
    assert!(d <= 1e-6, "resumed at 3 ranks: ZeRO-1 differs from DDP by {d:e}");
    assert!(difference(&ddp[0], &weights) > 1e-4, "the resumed runs trained");
}

fn refused(e: TrainError, needle: &str) {
    let text = e.to_string();
    assert!(matches!(e, TrainError::InvalidOption { ref option, .. } if option == "--shard"), "{text}");
    assert!(text.contains(needle), "{text}");
}

#[test]
fn fp16_and_an_optimizer_over_the_parameters_are_refused_naming_the_flag() {
    let init = Mutex::new(initial());
    let case = Case { opt: optimizers()[1], accum: 1, clip: None, overlap: true };
    let errors = on_ranks(2, |rank, comm| {
        let init = deep_copy(&init.lock().unwrap());
        // fp16's overflow check would see only this rank's blocks.
        let fp16 = DdpOptions { precision: Precision::Fp16, ..options(case, ShardMode::Optimizer) };
        let Err(fp16) = Ddp::new(net(rank, &init), comm, fp16) else { panic!("fp16 with --shard was accepted") };
        (rank, fp16)
    });
    for (_, e) in errors {
        refused(e, "--precision fp16");
    }
    let errors = on_ranks(2, |rank, comm| {
        let init = deep_copy(&init.lock().unwrap());
        let mut ddp = Ddp::new(net(rank, &init), comm, options(case, ShardMode::Optimizer)).unwrap();
        let mut wrong = case.opt.build(ddp.parameters()).unwrap();
        let micro = share(&data(2, 1), rank, 1).remove(0);
        ddp.train_step(&micro, wrong.as_mut(), 0.1).unwrap_err()
    });
    for e in errors {
        refused(e, "Ddp::build_optimizer");
    }
}

/// A device collective in host memory (hytrain-cuda's HostCollective) runs the GPU code path on the CPU: ZeRO-1
/// through it equals DDP; ZeRO-2 through it is refused (not implemented on the device side yet).
#[test]
fn zero1_through_a_device_collective_equals_ddp_and_zero2_is_refused() {
    let init = initial();
    let world = 3;
    let case = Case { opt: optimizers()[3], accum: 2, clip: Some(0.05), overlap: true };
    let ddp = train(world, case, ShardMode::None, &init);
    let run = |shard: ShardMode| {
        let init = Mutex::new(deep_copy(&init));
        let group =
            Mutex::new(InProcess::group(world, Duration::from_secs(60)).into_iter().map(Some).collect::<Vec<_>>());
        on_ranks(world, |rank, comm| {
            let init = deep_copy(&init.lock().unwrap());
            let data = data(world, STEPS);
            let device = HostCollective::new(Box::new(group.lock().unwrap()[rank].take().unwrap()));
            let ddp = Ddp::new(net(rank, &init), comm, options(case, shard)).unwrap();
            let mut ddp = ddp.with_device_collective(Box::new(device), None)?;
            let mut optimizer = ddp.build_optimizer(&case.opt).unwrap();
            for micro in share(&data, rank, case.accum) {
                ddp.train_step(&micro, optimizer.as_mut(), lr_of(&case.opt)).unwrap();
            }
            // The checkpoint state goes through the device collective too.
            let state = ddp.optimizer_state(optimizer.as_ref()).unwrap();
            assert!(state.iter().any(|(n, _)| n == "fc1.weight.exp_avg"));
            Ok::<_, TrainError>(deep_copy(&model::state_tensors(ddp.model())))
        })
    };
    let zero1: Vec<_> = run(ShardMode::Optimizer).into_iter().map(Result::unwrap).collect();
    let d = difference(&zero1[0], &ddp[0]);
    println!("zero exactness: world {world} optimizer through HostCollective: {d:.3e}");
    assert!(d <= 1e-6, "ZeRO-1 through the device collective differs from DDP by {d:e}");
    for e in run(ShardMode::Gradients) {
        refused(e.unwrap_err(), "not implemented with a device collective");
    }
}

#[test]
fn partial_optimizer_state_is_refused_for_a_sharded_optimizer() {
    let init = Mutex::new(initial());
    let errors = on_ranks(2, |rank, comm| {
        let init = deep_copy(&init.lock().unwrap());
        let case = Case { opt: optimizers()[1], accum: 1, clip: None, overlap: true };
        let ddp = Ddp::new(net(rank, &init), comm, options(case, ShardMode::Optimizer)).unwrap();
        let mut optimizer = ddp.build_optimizer(&case.opt).unwrap();
        // fc2.weight and fc2.bias share a bucket; only one of them has a momentum buffer.
        let partial =
            vec![("fc2.weight.momentum_buffer".to_string(), Tensor::zeros([3, 7], (Kind::Float, Device::Cpu)))];
        let partial = ddp.load_optimizer_state(optimizer.as_mut(), &partial).unwrap_err().to_string();
        let foreign = vec![("fc9.weight.momentum_buffer".to_string(), Tensor::zeros([3], (Kind::Float, Device::Cpu)))];
        let foreign = ddp.load_optimizer_state(optimizer.as_mut(), &foreign).unwrap_err().to_string();
        (partial, foreign)
    });
    for (partial, foreign) in errors {
        assert!(
            partial.contains("fc2.bias has no momentum_buffer state") && partial.contains("--shard none"),
            "{partial}"
        );
        assert!(foreign.contains("fc9.weight.momentum_buffer belongs to no parameter"), "{foreign}");
    }
}

#[test]
fn shard_flag_parses_and_refuses_other_values() {
    let mut config = hytrain_train::TrainConfig::default();
    assert_eq!(config.shard, ShardMode::None);
    config.apply_hyperparameter("--shard", "gradients").unwrap();
    assert_eq!(config.ddp_options().shard, ShardMode::Gradients);
    config.apply_hyperparameter("shard", "\"optimizer\"").unwrap();
    assert_eq!(config.shard, ShardMode::Optimizer);
    let e = config.apply_hyperparameter("--shard", "everything").unwrap_err().to_string();
    assert!(e.contains("shard") && e.contains("must be none, optimizer or gradients, got 'everything'"), "{e}");
}
