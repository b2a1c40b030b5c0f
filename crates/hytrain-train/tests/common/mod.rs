//! Shared helpers for the engine's integration tests: ranks as threads over hytrain-comm's TCP ring, deterministic
//! data, tensor comparisons, the Python used for PyTorch parity.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use hytrain_comm::{CommOptions, Membership};
use hytrain_train::model::{self, ConvConfig, LayerBuilder, Model};
use hytrain_train::Collective;
use tch::{Device, Kind, TchError, Tensor};

/// Runs `f(rank, collective)` on one thread per rank, each rank joined to the others through hytrain-comm's real
/// rendezvous store and TCP ring on loopback; results in rank order.
pub fn on_ranks<T: Send>(world: usize, f: impl Fn(usize, Box<dyn Collective>) -> T + Sync) -> Vec<T> {
    let port = hytrain_comm::testing::free_port();
    let opts = CommOptions {
        rendezvous_timeout: Duration::from_secs(60),
        collective_timeout: Duration::from_secs(60),
        job_id: format!("hytrain-train-test-{port}"),
        ..CommOptions::default()
    };
    hytrain_comm::testing::on_ranks(world, |rank| {
        tch::set_num_threads(1);
        let me = Membership {
            rank,
            world_size: world,
            local_rank: rank,
            local_world_size: world,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        };
        let comm = hytrain_comm::init(&me, false, &opts).expect("ranks connect over loopback");
        f(rank, comm)
    })
}

static RNG: Mutex<()> = Mutex::new(());

/// Runs `f` right after seeding libtorch's global generator, with no other test of this binary drawing from it
/// meanwhile (tests run on parallel threads), so what `f` draws is the same in every run. That holds only if every
/// draw in the binary goes through here, even one whose values do not matter (a model built only for its shape): a
/// draw on another thread between the seed and `f` shifts what `f` gets.
pub fn seeded<T>(seed: i64, f: impl FnOnce() -> T) -> T {
    let _guard = RNG.lock().unwrap_or_else(|p| p.into_inner());
    tch::manual_seed(seed);
    f()
}

/// Deep copies of named tensors (for handing the same values to several threads).
pub fn deep_copy(tensors: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    tensors.iter().map(|(n, t)| (n.clone(), t.detach().copy())).collect()
}

/// Largest |a - b| over the largest |b|, across all tensors, matched by name.
pub fn max_relative_difference(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    assert_eq!(a.len(), b.len(), "different tensor counts");
    let mut worst = 0.0f64;
    for (name, x) in a {
        let y = &b.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no tensor {name}")).1;
        let diff = (x.to_kind(Kind::Double) - y.to_kind(Kind::Double)).abs().max().double_value(&[]);
        let scale = y.to_kind(Kind::Double).abs().max().double_value(&[]).max(1e-12);
        worst = worst.max(diff / scale);
    }
    worst
}

/// Largest ||a - b||₂ / ||b||₂ over all tensors, matched by name.
pub fn max_relative_l2_difference(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    assert_eq!(a.len(), b.len(), "different tensor counts");
    let mut worst = 0.0f64;
    for (name, x) in a {
        let y = &b.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no tensor {name}")).1;
        let (x, y) = (x.to_kind(Kind::Double), y.to_kind(Kind::Double));
        let diff = (&x - &y).norm().double_value(&[]);
        let scale = y.norm().double_value(&[]).max(1e-12);
        worst = worst.max(diff / scale);
    }
    worst
}

/// Whether every tensor is bit-for-bit equal.
pub fn identical(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|((n1, x), (n2, y))| n1 == n2 && x.equal(y))
}

/// The Python with torch used for parity checks: HYTRAIN_TEST_PYTHON, else the venv `cargo xtask setup` makes.
/// Panics (failing the test) with what to do when neither exists.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("HYTRAIN_TEST_PYTHON") {
        let p = PathBuf::from(p);
        assert!(p.exists(), "HYTRAIN_TEST_PYTHON={} does not exist; run `cargo xtask setup`", p.display());
        return p;
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/bench-venv");
    // xtask writes the stamp last, so a venv without it is half-built.
    assert!(
        venv.join(".hytrain-venv.json").exists(),
        "PyTorch parity tests need a Python with torch 2.11 and numpy: run `cargo xtask setup` (it creates {}) or \
         set HYTRAIN_TEST_PYTHON to one",
        venv.display()
    );
    venv.join("bin/python")
}

/// Runs a Python script from this crate's tests/ with arguments; panics with its output when it fails.
pub fn run_python(script: &str, args: &[&std::ffi::OsStr]) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join(script);
    let out = std::process::Command::new(python())
        .arg(&path)
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("python starts");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{script} failed:\n{text}");
    text
}

/// conv → BatchNorm → linear: small enough to train in a test; BatchNorm's running statistics (float32) and batch
/// count (int64) are buffers that every training forward changes.
pub struct TinyBn {
    conv: model::Conv2d,
    bn: model::BatchNorm2d,
    fc: model::Linear,
    params: Vec<(String, Tensor)>,
    buffers: Vec<(String, Tensor)>,
}

impl TinyBn {
    pub fn new() -> Self {
        let mut b = LayerBuilder::new(Device::Cpu);
        let conv = b.conv2d("conv", 3, 4, ConvConfig::new(3)).unwrap();
        let bn = b.batch_norm2d("bn", 4).unwrap();
        let fc = b.linear("fc", 4 * 6 * 6, 3).unwrap();
        let (params, buffers) = b.finish();
        TinyBn { conv, bn, fc, params, buffers }
    }
}

impl Model for TinyBn {
    fn name(&self) -> &str {
        "tiny-bn"
    }
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let xs = self.bn.forward_t(&self.conv.forward(xs)?, train)?.f_relu()?;
        self.fc.forward(&xs.f_flatten(1, -1)?)
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }
    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        self.buffers.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }
}

/// The handwritten digits `cargo xtask test` packs into shards (and names in HYTRAIN_DEMO_DATA): `train/` and
/// `test/`, 8x8 grey images of 10 classes.
pub fn digits() -> PathBuf {
    let path = std::env::var_os("HYTRAIN_DEMO_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/demo/digits"));
    assert!(
        path.join("train").is_dir() && path.join("test").is_dir(),
        "{} holds no digits shards: run the tests through `cargo xtask test`, which packs them",
        path.display()
    );
    path
}
