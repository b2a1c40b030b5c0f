//! Sharded data parallelism (`--shard optimizer|gradients`, ZeRO-1 and ZeRO-2): the weights after 20 steps equal
//! DDP's on 2, 3 and 4 ranks over the real TCP ring, with gradient accumulation, clipping and buckets whose sizes
//! the world size does not divide; ZeRO-2 holds no full gradients between steps; the optimizer state is 1/N per
//! rank and converts to and from DDP's checkpoint format at any world size; what is not supported is refused.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{deep_copy, on_ranks, seeded};
use hytrain_comm::testing::InProcess;
use hytrain_cuda::HostCollective;
use hytrain_train::checkpoint::shard_file;
use hytrain_train::model::{self, BatchNorm2d, Conv2d, ConvConfig, LayerBuilder, Linear, Model};
use hytrain_train::{
    AdamWConfig, Buffer, Checkpoint, CheckpointMeta, CheckpointStore, Collective, CommError, Ddp, DdpOptions,
    Optimizer, OptimizerConfig, Precision, ReduceOp, RngState, Schedule, SgdConfig, ShardMode, TrainError,
};
use tch::{Device, Kind, TchError, Tensor};

mod checkpoints;

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
            // Sharded, each bucket's padded buffer (a multiple of the world size) splits into equal blocks.
            let block: usize = ddp.bucket_layout().iter().map(|b| b.bytes / 4 / world).sum();
            out.push((defined, ddp.parameters().len(), state_elements(optimizer.as_ref()), block as i64));
            comm = Some(ddp.into_parts().1);
        }
        out
    });
    let params: i64 = initial().iter().take(7).map(|(_, t)| t.numel() as i64).sum();
    for (rank, modes) in results.iter().enumerate() {
        let [(ddp_grads, n, ddp_state, _), (zero1_grads, _, zero1_state, zero1_block), (zero2_grads, _, zero2_state, zero2_block)] =
            modes[..]
        else {
            unreachable!()
        };
        assert_eq!(ddp_grads, n, "DDP keeps every gradient");
        assert_eq!(zero1_grads, n, "ZeRO-1 keeps the full gradients (views of its buckets)");
        assert_eq!(zero2_grads, 0, "rank {rank}: ZeRO-2 left {zero2_grads} full gradients defined after the step");
        // AdamW: two moments per element. Sharded: per bucket, ceil(numel / world) elements.
        assert_eq!(ddp_state, 2 * params);
        let padded: i64 = [24i64, 1267, 145].iter().map(|n| (n + world as i64 - 1) / world as i64).sum();
        assert_eq!(zero1_block, padded, "rank {rank}: ZeRO-1 keeps DDP's buckets (of 24, 1267, 145 elements)");
        assert_eq!(zero1_state, 2 * padded, "rank {rank}: ZeRO-1 state");
        // ZeRO-2 gives every parameter over the 64-byte cap a bucket of its own: 6 buckets, as many blocks.
        let alone: i64 = [3i64, 21, 7, 1260, 10, 135].iter().map(|n| (n + world as i64 - 1) / world as i64).sum();
        assert_eq!(zero2_block, alone, "rank {rank}: ZeRO-2 buckets");
        assert_eq!(zero2_state, 2 * alone, "rank {rank}: ZeRO-2 state");
        assert!((zero2_state as f64) < ddp_state as f64 / world as f64 + 8.0);
    }
}

/// A rank's collective that, at each reduce-scatter (ZeRO's reduction of one bucket), counts the model's parameters
/// whose full gradient exists then, and lingers so that a backward free to run ahead would.
struct GradientCensus {
    inner: Box<dyn Collective>,
    params: Vec<Tensor>,
    /// Most parameters with a gradient seen at one reduce-scatter, and how many reduce-scatters there were.
    seen: Arc<Mutex<(usize, usize)>>,
}

impl Collective for GradientCensus {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn allreduce(&mut self, buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError> {
        self.inner.allreduce(buf, op)
    }
    fn broadcast(&mut self, bytes: &mut [u8], root: usize) -> Result<(), CommError> {
        self.inner.broadcast(bytes, root)
    }
    fn allgather(&mut self, input: &[u8], output: &mut [u8]) -> Result<(), CommError> {
        self.inner.allgather(input, output)
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        self.inner.barrier()
    }
    fn reduce_scatter(&mut self, buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError> {
        let alive = self.params.iter().filter(|p| p.grad().defined()).count();
        {
            let mut seen = self.seen.lock().unwrap();
            *seen = (seen.0.max(alive), seen.1 + 1);
        }
        std::thread::sleep(Duration::from_millis(20));
        self.inner.reduce_scatter(buf, op)
    }
    fn allgather_blocks(&mut self, buf: Buffer<'_>) -> Result<(), CommError> {
        self.inner.allgather_blocks(buf)
    }
}

#[test]
fn zero2_backward_waits_for_each_bucket_so_one_buckets_gradients_exist_at_a_time() {
    let world = 2;
    let init = Mutex::new(initial());
    let case = Case { opt: optimizers()[3], accum: 1, clip: None, overlap: true };
    let results = on_ranks(world, |rank, comm| {
        let init = deep_copy(&init.lock().unwrap());
        let model = net(rank, &init);
        let params = model.named_parameters().into_iter().map(|(_, p)| p).collect();
        let seen = Arc::new(Mutex::new((0, 0)));
        let census = GradientCensus { inner: comm, params, seen: Arc::clone(&seen) };
        let mut ddp = Ddp::new(model, Box::new(census), options(case, ShardMode::Gradients)).unwrap();
        let buckets = ddp.bucket_layout().len();
        let mut optimizer = ddp.build_optimizer(&case.opt).unwrap();
        for micro in share(&data(world, 3), rank, 1) {
            ddp.train_step(&micro, optimizer.as_mut(), 1e-3).unwrap();
        }
        let seen = *seen.lock().unwrap();
        (seen, buckets)
    });
    for (rank, ((most, reductions), buckets)) in results.into_iter().enumerate() {
        assert_eq!(reductions, 3 * buckets, "rank {rank}: one reduce-scatter per bucket and step");
        // While a bucket is reduced its members' gradients are already in its buffer (released), earlier buckets'
        // are released, and backward has not computed later ones: no parameter holds a full gradient. A backward
        // running ahead during the 20 ms of each reduction would have computed the next buckets' meanwhile.
        assert_eq!(most, 0, "rank {rank}: {most} parameters held full gradients during a reduce-scatter");
    }
}

fn refused(e: TrainError, needle: &str) {
    let text = e.to_string();
    assert!(matches!(e, TrainError::InvalidOption { ref option, .. } if option == "--shard"), "{text}");
    assert!(text.contains(needle), "{text}");
}

/// [`Net`] plus a one-element parameter added, times `spike`, to the first class's logit: with `spike` at 1e36 its
/// gradient, and only its gradient, is inf, so under sharding only the rank owning that element sees the overflow.
struct SpikeNet {
    net: Net,
    bump: Tensor,
    spike: Arc<Mutex<f64>>,
}

impl Model for SpikeNet {
    fn name(&self) -> &str {
        "zero-spike-net"
    }
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let logits = self.net.forward_t(xs, train)?;
        let first = Tensor::f_from_slice(&[1.0f32, 0.0, 0.0])?;
        logits.f_add(&first.f_mul(&self.bump)?.f_mul_scalar(*self.spike.lock().unwrap())?)
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut params = self.net.named_parameters();
        params.push(("bump".into(), self.bump.shallow_clone()));
        params
    }
    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        self.net.named_buffers()
    }
}

/// fp16 loss scaling with sharding: each rank unscales only its blocks, yet an overflow in one parameter's gradient
/// (so in one rank's block) skips the step on every rank, as under DDP, and the loss scale and the weights after
/// the steps are DDP's.
#[test]
fn fp16_with_sharding_skips_an_overflow_in_one_ranks_block_everywhere_and_equals_ddp() {
    let init = initial();
    let case = Case { opt: optimizers()[3], accum: 1, clip: Some(0.05), overlap: true };
    for world in [2, 3] {
        let run = |shard: ShardMode| {
            let init = Mutex::new(deep_copy(&init));
            on_ranks(world, |rank, comm| {
                let data = data(world, 8);
                let init = deep_copy(&init.lock().unwrap());
                let spike = Arc::new(Mutex::new(0.0));
                let bump = Tensor::zeros([1], (Kind::Float, Device::Cpu)).set_requires_grad(true);
                let net = seeded(100 + rank as i64, Net::new);
                if rank == 0 {
                    model::load_state_tensors(&net, &init).unwrap();
                }
                let model = SpikeNet { net, bump, spike: spike.clone() };
                let fp16 = DdpOptions { precision: Precision::Fp16, ..options(case, shard) };
                let mut ddp = Ddp::new(Box::new(model), comm, fp16).unwrap();
                let mut optimizer = ddp.build_optimizer(&case.opt).unwrap();
                let mut skipped = Vec::new();
                for (step, micro) in share(&data, rank, 1).into_iter().enumerate() {
                    *spike.lock().unwrap() = if step == 3 && rank == world - 1 { 1e36 } else { 0.0 };
                    skipped.push(ddp.train_step(&micro, optimizer.as_mut(), lr_of(&case.opt)).unwrap().skipped);
                }
                let scale = ddp.grad_scaler().expect("fp16 scales the loss").scale();
                (skipped, scale, deep_copy(&model::state_tensors(ddp.model())))
            })
        };
        let ddp = run(ShardMode::None);
        assert!(ddp[0].0[3], "the injected overflow did not skip DDP's step: {:?}", ddp[0].0);
        assert!(ddp[0].0.iter().filter(|s| !**s).count() >= 4, "too few steps trained: {:?}", ddp[0].0);
        for shard in [ShardMode::Optimizer, ShardMode::Gradients] {
            let ranks = run(shard);
            for (rank, (skipped, scale, _)) in ranks.iter().enumerate() {
                assert_eq!(skipped, &ddp[0].0, "{shard} on {world} ranks: rank {rank} skipped other steps than DDP");
                assert_eq!(*scale, ddp[0].1, "{shard} on {world} ranks: rank {rank}'s loss scale");
            }
            let d = difference(&ranks[0].2, &ddp[0].2);
            println!("zero exactness: fp16, world {world} {shard:<9}: {d:.3e}");
            assert!(d <= 1e-6, "{shard} fp16 on {world} ranks: weights differ from DDP's by {d:e}");
        }
    }
}

#[test]
fn an_optimizer_over_the_parameters_is_refused_naming_the_flag() {
    let init = Mutex::new(initial());
    let case = Case { opt: optimizers()[1], accum: 1, clip: None, overlap: true };
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
