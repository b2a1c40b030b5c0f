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

fn meta(step: u64) -> CheckpointMeta {
    CheckpointMeta {
        step,
        epoch: 0,
        data_position: serde_json::Value::Null,
        rng: RngState::default(),
        config: serde_json::Value::Null,
        schedule: Schedule::Constant,
        model: "zero-net".into(),
        optimizer: "adamw".into(),
        grad_scaler: None,
    }
}

/// Every rank saves a sharded checkpoint of `step` into `store` (rank 0 with the model).
fn save_sharded(
    store: &CheckpointStore,
    ddp: &mut Ddp,
    optimizer: &dyn Optimizer,
    step: u64,
) -> Result<(), TrainError> {
    let model = (ddp.rank() == 0).then(|| Checkpoint {
        model: model::state_tensors(ddp.model()),
        optimizer: Vec::new(),
        meta: meta(step),
    });
    store.save_sharded(ddp, optimizer, model.as_ref(), step).map(|_| ())
}

const ADAMW: Case = Case {
    opt: OptimizerConfig::AdamW(AdamWConfig { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.05 }),
    accum: 1,
    clip: None,
    overlap: true,
};

/// 10 steps on 4 ranks in `shard` mode from the initial weights, with a sharded checkpoint after each of `steps`
/// into `store(rank, step)`: every rank's results of its saves.
fn four_ranks_then_save(
    shard: ShardMode,
    steps: &[u64],
    store: &(dyn Fn(usize, u64) -> CheckpointStore + Sync),
) -> Vec<Vec<Result<(), TrainError>>> {
    let init = Mutex::new(initial());
    on_ranks(4, |rank, comm| {
        let data = data(4, 10);
        let init = deep_copy(&init.lock().unwrap());
        let mut ddp = Ddp::new(net(rank, &init), comm, options(ADAMW, shard)).unwrap();
        let mut optimizer = ddp.build_optimizer(&ADAMW.opt).unwrap();
        let mut results = Vec::new();
        for (i, micro) in share(&data, rank, 1).into_iter().enumerate() {
            ddp.train_step(&micro, optimizer.as_mut(), lr_of(&ADAMW.opt)).unwrap();
            let step = i as u64 + 1;
            if steps.contains(&step) {
                results.push(save_sharded(&store(rank, step), &mut ddp, optimizer.as_ref(), step));
            }
        }
        results
    })
}

/// A rank's weights after resuming and training, the checkpoint it resumed from and the shard files it read.
type Resumed = (Vec<(String, Tensor)>, std::path::PathBuf, Vec<String>);

/// Resumes `world` ranks in `shard` mode from the sharded checkpoints of `dir` (a sharded engine through
/// `resume_sharded`, an unsharded one through `latest_valid` as the training loop does) and trains 10 more steps:
/// every rank's weights, the checkpoint it resumed from and the shard files it read.
fn resume_and_train(dir: &std::path::Path, world: usize, shard: ShardMode) -> Vec<Resumed> {
    on_ranks(world, |rank, comm| {
        let data = data(world, 10);
        let mut ddp = Ddp::new(net(rank, &initial()), comm, options(ADAMW, shard)).unwrap();
        let mut optimizer = ddp.build_optimizer(&ADAMW.opt).unwrap();
        let store = CheckpointStore::new(dir, 3).unwrap();
        let (path, read) = if shard == ShardMode::None {
            let resume = store.latest_valid().unwrap().expect("a checkpoint");
            model::load_state_tensors(ddp.model(), &resume.checkpoint.model).unwrap();
            ddp.load_optimizer_state(optimizer.as_mut(), &resume.checkpoint.optimizer).unwrap();
            (resume.path, Vec::new())
        } else {
            let resume = store.resume_sharded(&mut ddp, optimizer.as_mut()).unwrap().expect("a checkpoint");
            (resume.path, resume.read)
        };
        for micro in share(&data, rank, 1) {
            ddp.train_step(&micro, optimizer.as_mut(), lr_of(&ADAMW.opt)).unwrap();
        }
        (deep_copy(&model::state_tensors(ddp.model())), path, read)
    })
}

/// DDP's weights (every rank's: the BatchNorm statistics are each rank's own) after 10 steps on 4 ranks, a
/// per-parameter checkpoint, and 10 steps on `world` ranks.
fn ddp_four_then(world: usize) -> Vec<Vec<(String, Tensor)>> {
    let dir = tempfile::tempdir().unwrap();
    let init = Mutex::new(initial());
    on_ranks(4, |rank, comm| {
        let data = data(4, 10);
        let init = deep_copy(&init.lock().unwrap());
        let mut ddp = Ddp::new(net(rank, &init), comm, options(ADAMW, ShardMode::None)).unwrap();
        let mut optimizer = ddp.build_optimizer(&ADAMW.opt).unwrap();
        for micro in share(&data, rank, 1) {
            ddp.train_step(&micro, optimizer.as_mut(), lr_of(&ADAMW.opt)).unwrap();
        }
        if rank == 0 {
            let ckpt =
                Checkpoint { model: model::state_tensors(ddp.model()), optimizer: optimizer.state(), meta: meta(10) };
            CheckpointStore::new(dir.path(), 1).unwrap().save(&ckpt).unwrap();
        }
    });
    resume_and_train(dir.path(), world, ShardMode::None).into_iter().map(|r| r.0).collect()
}

fn shard_names(world: usize) -> Vec<String> {
    (0..world).map(|r| shard_file(r, world)).collect()
}

/// Issue 17's resharding test: a ZeRO-2 run on 4 ranks writes one optimizer shard per rank (no rank holds the
/// whole state); resumed on 4, 2 and 3 ranks (ZeRO-1 and ZeRO-2) and by an unsharded run, the weights after 10
/// more steps equal those of a DDP run checkpointed and resumed alike within 1e-6. On 4 ranks each rank reads only
/// its own shard; on fewer, only the shards its blocks overlap.
#[test]
fn a_sharded_checkpoint_of_four_ranks_resumes_on_four_two_and_three_as_ddp_does() {
    let dir = tempfile::tempdir().unwrap();
    for r in four_ranks_then_save(ShardMode::Gradients, &[10], &|_, _| CheckpointStore::new(dir.path(), 3).unwrap()) {
        r.into_iter().for_each(Result::unwrap);
    }
    let ckpt = dir.path().join("ckpt-10");
    let mut files: Vec<String> =
        std::fs::read_dir(&ckpt).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    let mut want = shard_names(4);
    want.extend(["meta.json".to_string(), "model.safetensors".to_string()]);
    want.sort();
    assert_eq!(files, want, "a sharded checkpoint holds the model, the manifest and one shard per rank");
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(ckpt.join("meta.json")).unwrap()).unwrap();
    assert_eq!(manifest["sharded"]["world_size"], 4);
    assert_eq!(manifest["sharded"]["mode"], "gradients");
    // ZeRO-2's buckets: every parameter over the 64-byte cap alone; fc2.weight's 21 elements padded to 24.
    assert_eq!(manifest["sharded"]["buckets"][1]["numel"], 21);
    assert_eq!(manifest["sharded"]["buckets"][1]["padded"], 24);
    for f in shard_names(4) {
        assert_eq!(manifest["sizes"][&f].as_u64(), Some(std::fs::metadata(ckpt.join(&f)).unwrap().len()));
        assert_eq!(manifest["files"][&f].as_str().map(str::len), Some(64), "{f} has a SHA-256 in the manifest");
    }
    for (world, shard) in [
        (4, ShardMode::Gradients),
        (2, ShardMode::Gradients),
        (2, ShardMode::Optimizer),
        (3, ShardMode::Gradients),
        (3, ShardMode::None),
    ] {
        let ddp = ddp_four_then(world);
        let ranks = resume_and_train(dir.path(), world, shard);
        for (rank, (weights, path, read)) in ranks.iter().enumerate() {
            assert_eq!(path, &ckpt);
            let d = difference(weights, &ddp[rank]);
            println!("zero resharding: 4 ranks to {world} ({shard}): rank {rank} read {read:?}, max |w - w_ddp| / max |w_ddp| = {d:.3e}");
            assert!(d <= 1e-6, "4 to {world} ranks ({shard}): rank {rank} differs from DDP by {d:e}");
            if shard == ShardMode::None {
                continue;
            }
            if shard == ShardMode::Optimizer {
                // ZeRO-1 keeps DDP's bucket layout, not ZeRO-2's: the blocks come from the per-parameter state.
                assert_eq!(read.len(), 4, "rank {rank} of {world} ({shard}) read {read:?}");
            } else if world == 4 {
                assert_eq!(read, &[shard_file(rank, 4)], "at the same world size a rank reads only its own shard");
            } else {
                assert!(!read.is_empty() && read.len() < 4, "rank {rank} of {world} read {read:?}");
            }
        }
        assert!(difference(&ranks[0].0, &initial()) > 1e-3, "the resumed run trained");
    }
}

/// A checkpoint with a shard missing, corrupt, or without its manifest does not count: every rank passes over it
/// to the previous complete one, which a failed save never touches.
#[test]
fn a_sharded_checkpoint_with_a_shard_missing_or_corrupt_is_passed_over_for_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    for r in four_ranks_then_save(ShardMode::Optimizer, &[5, 10], &|_, _| CheckpointStore::new(dir.path(), 3).unwrap())
    {
        r.into_iter().for_each(Result::unwrap);
    }
    let (c5, c10) = (dir.path().join("ckpt-5"), dir.path().join("ckpt-10"));
    let shard = c10.join(shard_file(2, 4));
    let good = std::fs::read(&shard).unwrap();
    let mut corrupt = good.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x40;
    type Damage<'a> = Box<dyn Fn() + 'a>;
    let cases: Vec<(&str, Damage<'_>, Damage<'_>)> = vec![
        (
            "corrupt or torn",
            Box::new(|| std::fs::write(&shard, &corrupt).unwrap()),
            Box::new(|| std::fs::write(&shard, &good).unwrap()),
        ),
        (
            "is missing",
            Box::new(|| std::fs::remove_file(&shard).unwrap()),
            Box::new(|| std::fs::write(&shard, &good).unwrap()),
        ),
    ];
    for (reason, damage, repair) in cases {
        damage();
        let ranks = on_ranks(4, |rank, comm| {
            let mut ddp = Ddp::new(net(rank, &initial()), comm, options(ADAMW, ShardMode::Optimizer)).unwrap();
            let mut optimizer = ddp.build_optimizer(&ADAMW.opt).unwrap();
            let store = CheckpointStore::new(dir.path(), 3).unwrap();
            let resume = store.resume_sharded(&mut ddp, optimizer.as_mut()).unwrap().expect("a checkpoint");
            (resume.path, resume.skipped)
        });
        for (rank, (path, skipped)) in ranks.iter().enumerate() {
            assert_eq!(path, &c5, "rank {rank} resumed from the previous complete checkpoint ({reason})");
            if rank == 0 {
                assert_eq!(skipped.len(), 1);
                assert_eq!(skipped[0].path, c10);
            }
        }
        // An unsharded run, reading every shard, passes over it too, naming the shard.
        let resume = CheckpointStore::new(dir.path(), 3).unwrap().latest_valid().unwrap().unwrap();
        assert_eq!(resume.path, c5);
        assert!(
            resume.skipped[0].reason.contains(&shard_file(2, 4)) && resume.skipped[0].reason.contains(reason),
            "{:?}",
            resume.skipped
        );
        repair();
    }
    std::fs::remove_file(c10.join("meta.json")).unwrap();
    assert_eq!(CheckpointStore::new(dir.path(), 3).unwrap().latest_valid().unwrap().unwrap().path, c5);
}

/// One rank that cannot write its shard fails every rank's save; so does a folder the ranks do not share (rank 0
/// finds another rank's shard missing before it writes the manifest). Either way the earlier checkpoint stays
/// the newest, untouched, and nothing of the failed write is left.
#[test]
fn a_rank_failing_to_write_its_shard_fails_every_rank_and_keeps_the_previous_checkpoint() {
    let elsewhere = tempfile::tempdir().unwrap();
    for (unshared, rank0_says, others_say) in [
        (
            false,
            "rank(s) [2] could not write their optimizer shard of step 10",
            "could not write their optimizer shard",
        ),
        (true, "is not in rank 0's view", "rank 0 could not write the model and manifest of step 10"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let blocked = dir.path().join("blocked");
        std::fs::write(&blocked, b"a file where a folder should be").unwrap();
        let results = four_ranks_then_save(ShardMode::Gradients, &[5, 10], &|rank, step| {
            let at = match (rank, step) {
                (2, 10) if unshared => elsewhere.path().to_path_buf(),
                (2, 10) => blocked.clone(),
                _ => dir.path().to_path_buf(),
            };
            CheckpointStore::new(at, 3).unwrap()
        });
        for (rank, saves) in results.into_iter().enumerate() {
            assert!(saves[0].is_ok(), "step 5 saved");
            let e = saves[1].as_ref().expect_err("step 10 fails on every rank").to_string();
            match (rank, unshared) {
                (2, false) => assert!(e.contains("blocked"), "rank 2 reports its own error: {e}"),
                (0, _) => assert!(e.contains(rank0_says), "{e}"),
                (2, true) => {}
                _ => assert!(e.contains(others_say), "rank {rank}: {e}"),
            }
        }
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.contains("-10")), "nothing of the failed write is left: {names:?}");
        let resume = CheckpointStore::new(dir.path(), 3).unwrap().latest_valid().unwrap().unwrap();
        assert_eq!(resume.path, dir.path().join("ckpt-5"));
        assert!(resume.skipped.is_empty());
    }
}

/// `hytrain checkpoint consolidate`'s library half: a ZeRO-2 checkpoint of 4 ranks becomes one safetensors file
/// holding the model and DDP's per-parameter optimizer state (names, shapes, values of a DDP run's state).
#[test]
fn a_consolidated_sharded_checkpoint_holds_the_model_and_ddps_per_parameter_state() {
    let dir = tempfile::tempdir().unwrap();
    for r in four_ranks_then_save(ShardMode::Gradients, &[10], &|_, _| CheckpointStore::new(dir.path(), 3).unwrap()) {
        r.into_iter().for_each(Result::unwrap);
    }
    let init = Mutex::new(initial());
    let ddp_state = on_ranks(4, |rank, comm| {
        let data = data(4, 10);
        let init = deep_copy(&init.lock().unwrap());
        let mut ddp = Ddp::new(net(rank, &init), comm, options(ADAMW, ShardMode::None)).unwrap();
        let mut optimizer = ddp.build_optimizer(&ADAMW.opt).unwrap();
        for micro in share(&data, rank, 1) {
            ddp.train_step(&micro, optimizer.as_mut(), lr_of(&ADAMW.opt)).unwrap();
        }
        (deep_copy(&model::state_tensors(ddp.model())), deep_copy(&optimizer.state()))
    })
    .swap_remove(0);
    let out = dir.path().join("consolidated.safetensors");
    let store = CheckpointStore::new(dir.path(), 3).unwrap();
    let done = hytrain_train::consolidate(&store, None, &out).unwrap();
    assert_eq!((done.step, done.from.clone()), (10, dir.path().join("ckpt-10")));
    assert_eq!(done.optimizer, ddp_state.1.len());
    let file = Tensor::read_safetensors(&out).unwrap();
    assert_eq!(file.len(), done.model + done.optimizer);
    let get = |name: &str| file.iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone());
    for (name, want) in &ddp_state.1 {
        let got = get(&format!("optimizer.{name}")).unwrap_or_else(|| panic!("optimizer.{name} is in the file"));
        assert_eq!(got.size(), want.size(), "{name}");
        let scale = want.abs().max().double_value(&[]).max(1e-12);
        let d = (&got - want).abs().max().double_value(&[]) / scale;
        assert!(d <= 1e-5, "{name} differs from DDP's by {d:e}");
    }
    let model = hytrain_train::checkpoint::read_checkpoint(&dir.path().join("ckpt-10")).unwrap().model;
    for (name, want) in &model {
        assert!(get(name).unwrap().equal(want), "{name} is the checkpoint's");
    }
    // A named step that is not there says so.
    let e = hytrain_train::consolidate(&store, Some(7), &out).unwrap_err().to_string();
    assert!(e.contains("ckpt-7") && e.contains("meta.json"), "{e}");
}

/// Sharded checkpoints go to S3 (the local S3 server) as to a folder: every rank uploads its shard, rank 0 the
/// model and the manifest last; pruning to the newest one keeps its shards; 2 ranks resume from it as DDP does.
#[test]
fn a_sharded_checkpoint_on_s3_is_written_by_every_rank_and_resumes_on_two_ranks() {
    let root = tempfile::tempdir().unwrap();
    let server = crate::support::LocalS3::start(root.path());
    std::fs::create_dir_all(root.path().join("bkt")).unwrap();
    let url = "s3://bkt/run/ckpt";
    let store = || CheckpointStore::s3(url, &server.options(), 1).unwrap();
    for r in four_ranks_then_save(ShardMode::Optimizer, &[5, 10], &|_, _| store()) {
        r.into_iter().for_each(Result::unwrap);
    }
    // The server keeps objects as files (and may leave emptied folders behind).
    fn files(dir: &std::path::Path) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        let mut out = Vec::new();
        for e in entries.map(Result::unwrap) {
            match e.file_type().unwrap().is_dir() {
                true => out.extend(files(&e.path())),
                false => out.push(e.file_name().to_string_lossy().into_owned()),
            }
        }
        out.sort();
        out
    }
    let prefix = root.path().join("bkt/run/ckpt");
    assert!(
        files(&prefix.join("ckpt-5")).is_empty(),
        "keep 1 pruned step 5 whole: {:?}",
        files(&prefix.join("ckpt-5"))
    );
    let mut want = shard_names(4);
    want.extend(["meta.json".to_string(), "model.safetensors".to_string()]);
    want.sort();
    assert_eq!(files(&prefix.join("ckpt-10")), want);
    let ddp = ddp_four_then(2);
    let ranks = on_ranks(2, |rank, comm| {
        let data = data(2, 10);
        // ZeRO-1 as written, so the bucket layout matches and each rank reads only the shards its blocks overlap.
        let mut ddp = Ddp::new(net(rank, &initial()), comm, options(ADAMW, ShardMode::Optimizer)).unwrap();
        let mut optimizer = ddp.build_optimizer(&ADAMW.opt).unwrap();
        let resume = store().resume_sharded(&mut ddp, optimizer.as_mut()).unwrap().expect("a checkpoint on S3");
        for micro in share(&data, rank, 1) {
            ddp.train_step(&micro, optimizer.as_mut(), lr_of(&ADAMW.opt)).unwrap();
        }
        (deep_copy(&model::state_tensors(ddp.model())), resume.path, resume.read)
    });
    for (rank, (weights, path, read)) in ranks.iter().enumerate() {
        assert_eq!(path, std::path::Path::new("s3://bkt/run/ckpt/ckpt-10"));
        assert!(!read.is_empty() && read.len() < 4, "rank {rank} read {read:?}");
        let d = difference(weights, &ddp[rank]);
        assert!(d <= 1e-6, "resumed from S3 on 2 ranks: rank {rank} differs from DDP by {d:e}");
    }
    // An unsharded reader assembles it from S3 too.
    let resume = store().latest_valid().unwrap().unwrap();
    assert!(resume.checkpoint.optimizer.iter().any(|(n, _)| n == "fc1.weight.exp_avg_sq"));
}

/// Another `--bucket-mb` lays the buckets out otherwise than the checkpoint's: every rank then reads all shards
/// and cuts its blocks from the per-parameter state, and continues as DDP does.
#[test]
fn a_sharded_checkpoint_resumes_with_another_bucket_layout_through_the_per_parameter_state() {
    let dir = tempfile::tempdir().unwrap();
    for r in four_ranks_then_save(ShardMode::Gradients, &[10], &|_, _| CheckpointStore::new(dir.path(), 3).unwrap()) {
        r.into_iter().for_each(Result::unwrap);
    }
    let ddp = ddp_four_then(2);
    let ranks = on_ranks(2, |rank, comm| {
        let data = data(2, 10);
        // One bucket for the whole model instead of three.
        let options = DdpOptions { bucket_mb: 25.0, first_bucket_mb: 25.0, ..options(ADAMW, ShardMode::Optimizer) };
        let mut ddp = Ddp::new(net(rank, &initial()), comm, options).unwrap();
        assert_eq!(ddp.bucket_layout().len(), 1);
        let mut optimizer = ddp.build_optimizer(&ADAMW.opt).unwrap();
        let resume = CheckpointStore::new(dir.path(), 3)
            .unwrap()
            .resume_sharded(&mut ddp, optimizer.as_mut())
            .unwrap()
            .expect("a checkpoint");
        for micro in share(&data, rank, 1) {
            ddp.train_step(&micro, optimizer.as_mut(), lr_of(&ADAMW.opt)).unwrap();
        }
        (deep_copy(&model::state_tensors(ddp.model())), resume.read)
    });
    for (rank, (weights, read)) in ranks.iter().enumerate() {
        assert_eq!(read, &shard_names(4), "rank {rank} needs every shard");
        let d = difference(weights, &ddp[rank]);
        assert!(d <= 1e-6, "another bucket layout: rank {rank} differs from DDP by {d:e}");
    }
}

/// A sharded checkpoint of another model fails every rank with rank 0's reason (not passed over, not half
/// loaded), naming the tensor that differs.
#[test]
fn a_sharded_checkpoint_of_another_model_fails_every_rank_with_rank_0s_reason() {
    let dir = tempfile::tempdir().unwrap();
    for r in four_ranks_then_save(ShardMode::Gradients, &[10], &|_, _| CheckpointStore::new(dir.path(), 3).unwrap()) {
        r.into_iter().for_each(Result::unwrap);
    }
    let errors = on_ranks(2, |_, comm| {
        let other = seeded(5, || model::build("mlp:16", 3, &[3, 8, 8], Device::Cpu).unwrap());
        let mut ddp = Ddp::new(other, comm, options(ADAMW, ShardMode::Optimizer)).unwrap();
        let mut optimizer = ddp.build_optimizer(&ADAMW.opt).unwrap();
        let store = CheckpointStore::new(dir.path(), 3).unwrap();
        store.resume_sharded(&mut ddp, optimizer.as_mut()).unwrap_err().to_string()
    });
    assert_eq!(errors[0], errors[1], "every rank reports rank 0's reason");
    let e = &errors[0];
    assert!(e.contains("ckpt-10 holds another model's weights") && e.contains("--no-resume"), "{e}");
}

/// Every rank resumes from `dir` (ZeRO-1 on 4 ranks): each rank's result, as the checkpoint it resumed from and
/// rank 0's skipped reasons, or its error.
fn resume_four(dir: &std::path::Path) -> Vec<Result<(std::path::PathBuf, Vec<String>), String>> {
    on_ranks(4, |rank, comm| {
        let mut ddp = Ddp::new(net(rank, &initial()), comm, options(ADAMW, ShardMode::Optimizer)).unwrap();
        let mut optimizer = ddp.build_optimizer(&ADAMW.opt).unwrap();
        let store = CheckpointStore::new(dir, 3).unwrap();
        match store.resume_sharded(&mut ddp, optimizer.as_mut()) {
            Ok(found) => {
                let found = found.expect("a checkpoint");
                Ok((found.path, found.skipped.into_iter().map(|s| s.reason).collect()))
            }
            Err(e) => Err(e.to_string()),
        }
    })
}

/// A manifest that lists no checksum for a shard, and a shard that matches its checksum but lacks a tensor the
/// layout names, make the checkpoint invalid: every rank passes over it to the previous one, saying why.
#[test]
fn a_manifest_or_shard_that_disagrees_with_the_layout_is_passed_over_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    for r in four_ranks_then_save(ShardMode::Optimizer, &[5, 10], &|_, _| CheckpointStore::new(dir.path(), 3).unwrap())
    {
        r.into_iter().for_each(Result::unwrap);
    }
    let c10 = dir.path().join("ckpt-10");
    let manifest_path = c10.join("meta.json");
    let manifest = std::fs::read(&manifest_path).unwrap();
    let shard = c10.join(shard_file(1, 4));
    let good = std::fs::read(&shard).unwrap();

    let mut meta: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    meta["files"].as_object_mut().unwrap().remove(&shard_file(3, 4));
    std::fs::write(&manifest_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    // Rank 0 reads the manifest itself: it passes over the checkpoint before offering it.
    let resumed = resume_four(dir.path());
    let (path, skipped) = resumed[0].clone().unwrap();
    assert_eq!(path, dir.path().join("ckpt-5"));
    assert!(skipped[0].contains("meta.json lists no checksum for optimizer-shard-3-of-4"), "{skipped:?}");

    // Shard 1 without its exp_avg of bucket 0, its checksum and size recorded as they are.
    let tensors: Vec<(String, Tensor)> =
        Tensor::read_safetensors(&shard).unwrap().into_iter().filter(|(n, _)| n != "zero.bucket0.exp_avg").collect();
    Tensor::write_safetensors(&tensors, &shard).unwrap();
    let bytes = std::fs::read(&shard).unwrap();
    let mut meta: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    meta["files"][shard_file(1, 4)] = sha256(&bytes).into();
    meta["sizes"][shard_file(1, 4)] = bytes.len().into();
    std::fs::write(&manifest_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    for (rank, r) in resume_four(dir.path()).into_iter().enumerate() {
        assert_eq!(r.unwrap().0, dir.path().join("ckpt-5"), "rank {rank}");
    }
    let resume = CheckpointStore::new(dir.path(), 3).unwrap().latest_valid().unwrap().unwrap();
    assert!(resume.skipped[0].reason.contains("has no tensor zero.bucket0.exp_avg"), "{:?}", resume.skipped);
    std::fs::write(&shard, good).unwrap();
    std::fs::write(&manifest_path, manifest).unwrap();
    assert_eq!(resume_four(dir.path())[0].clone().unwrap().0, c10, "repaired, it counts again");
}

/// A shard that is there but cannot be read (here a folder in its place; an unreachable S3 alike) is not a torn
/// checkpoint: every rank fails, the rank that could not read saying why, instead of silently taking an older one.
#[test]
fn a_shard_that_cannot_be_read_fails_every_rank_instead_of_passing_over() {
    let dir = tempfile::tempdir().unwrap();
    for r in four_ranks_then_save(ShardMode::Optimizer, &[5, 10], &|_, _| CheckpointStore::new(dir.path(), 3).unwrap())
    {
        r.into_iter().for_each(Result::unwrap);
    }
    let shard = dir.path().join("ckpt-10").join(shard_file(2, 4));
    std::fs::remove_file(&shard).unwrap();
    std::fs::create_dir(&shard).unwrap();
    for (rank, r) in resume_four(dir.path()).into_iter().enumerate() {
        let e = r.unwrap_err();
        match rank {
            2 => assert!(e.contains(&shard_file(2, 4)), "rank 2 says what it could not read: {e}"),
            _ => assert!(e.contains("another rank could not read its optimizer shard"), "rank {rank}: {e}"),
        }
    }
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}
