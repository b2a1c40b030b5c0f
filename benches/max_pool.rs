//! LeNet's 2x2 max-pool, forward and backward at batch 64 on one thread: hytrain's kernel
//! (`hytrain::train::model::max_pool_2x2`) beside libtorch's generic `max_pool2d`, which PyTorch runs, in the same
//! run. Run with `cargo bench --bench max_pool`.

use criterion::{BenchmarkId, Criterion};
use hytrain::train::model::max_pool_2x2;
use tch::{Device, Kind, Tensor};

/// The inputs of LeNet's two pools at batch 64 on 3x32x32 images (after conv1 + ReLU, after conv2 + ReLU).
const SHAPES: [[i64; 4]; 2] = [[64, 6, 28, 28], [64, 16, 10, 10]];

/// Forward, then backward with `upstream` as the output's gradient (the product and sum cost both sides alike).
fn pool_step(pool: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, upstream: &Tensor) {
    (pool(x) * upstream).sum(Kind::Float).backward();
}

fn bench(c: &mut Criterion) {
    tch::set_num_threads(1);
    tch::manual_seed(0);
    let mut group = c.benchmark_group("max_pool_2x2_fwd_bwd");
    for shape in SHAPES {
        let x = Tensor::randn(shape, (Kind::Float, Device::Cpu)).relu().set_requires_grad(true);
        let upstream = Tensor::randn([shape[0], shape[1], shape[2] / 2, shape[3] / 2], (Kind::Float, Device::Cpu));
        let label = format!("{}x{}x{}x{}", shape[0], shape[1], shape[2], shape[3]);
        let ours = |x: &Tensor| max_pool_2x2(x).expect("pool");
        let libtorch = |x: &Tensor| x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
        group.bench_with_input(BenchmarkId::new("hytrain", &label), &x, |b, x| {
            b.iter(|| pool_step(&ours, x, &upstream))
        });
        group.bench_with_input(BenchmarkId::new("libtorch_max_pool2d", &label), &x, |b, x| {
            b.iter(|| pool_step(&libtorch, x, &upstream))
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}
