//! Shared helpers for the engine's integration tests: ranks as threads over a real collective, deterministic
//! data, tensor comparisons, the Python used for PyTorch parity.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};

use hytrain_train::{Buffer, Collective, CommError, ReduceOp};
use tch::{Kind, Tensor};

/// An in-process group whose ranks really exchange their data through shared memory: every operation is an
/// all-to-all exchange of byte vectors, and each rank reduces what it received in rank order.
pub struct LocalRank {
    rank: usize,
    world: usize,
    shared: Arc<(Mutex<Exchange>, Condvar)>,
}

#[derive(Default)]
struct Exchange {
    generation: u64,
    slots: Vec<Option<Vec<u8>>>,
    arrived: usize,
    result: Option<Arc<Vec<Vec<u8>>>>,
    readers_left: usize,
}

/// `world` connected ranks.
pub fn local_group(world: usize) -> Vec<Box<dyn Collective>> {
    let shared = Arc::new((Mutex::new(Exchange { slots: vec![None; world], ..Default::default() }), Condvar::new()));
    (0..world).map(|rank| Box::new(LocalRank { rank, world, shared: shared.clone() }) as Box<dyn Collective>).collect()
}

impl LocalRank {
    fn exchange(&self, data: Vec<u8>) -> Arc<Vec<Vec<u8>>> {
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().unwrap();
        while st.result.is_some() {
            st = cv.wait(st).unwrap();
        }
        let generation = st.generation;
        st.slots[self.rank] = Some(data);
        st.arrived += 1;
        if st.arrived == self.world {
            let all: Vec<Vec<u8>> = st.slots.iter_mut().map(|s| s.take().unwrap()).collect();
            st.result = Some(Arc::new(all));
            st.readers_left = self.world;
            st.arrived = 0;
            st.generation += 1;
            cv.notify_all();
        } else {
            while st.generation == generation {
                st = cv.wait(st).unwrap();
            }
        }
        let result = st.result.clone().unwrap();
        st.readers_left -= 1;
        if st.readers_left == 0 {
            st.result = None;
            cv.notify_all();
        }
        result
    }
}

fn to_bytes<T: Copy>(v: &[T]) -> Vec<u8> {
    // SAFETY: plain-old-data floats viewed as bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }.to_vec()
}

fn reduce<T: Copy + std::ops::Add<Output = T>>(buf: &mut [T], all: &[Vec<u8>], div: impl Fn(T) -> T) {
    for (i, x) in buf.iter_mut().enumerate() {
        let mut acc: Option<T> = None;
        for bytes in all {
            // SAFETY: every rank sent a buffer of the same type and length.
            let v = unsafe { *bytes.as_ptr().cast::<T>().add(i) };
            acc = Some(match acc {
                None => v,
                Some(a) => a + v,
            });
        }
        *x = div(acc.unwrap());
    }
}

impl Collective for LocalRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn backend(&self) -> &'static str {
        "local-test"
    }
    fn allreduce(&mut self, buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError> {
        let n = self.world as f64;
        let avg = op == ReduceOp::Avg;
        match buf {
            Buffer::F32(b) => {
                let all = self.exchange(to_bytes(b));
                reduce(b, &all, |v| if avg { (v as f64 / n) as f32 } else { v });
            }
            Buffer::F64(b) => {
                let all = self.exchange(to_bytes(b));
                reduce(b, &all, |v| if avg { v / n } else { v });
            }
            Buffer::Bf16(b) => {
                let all = self.exchange(to_bytes(b));
                let mut wide = vec![0f32; b.len()];
                for (i, w) in wide.iter_mut().enumerate() {
                    *w = all.iter().map(|bytes| unsafe { *bytes.as_ptr().cast::<half::bf16>().add(i) }.to_f32()).sum();
                }
                for (x, w) in b.iter_mut().zip(wide) {
                    *x = half::bf16::from_f32(if avg { w / n as f32 } else { w });
                }
            }
        }
        Ok(())
    }
    fn broadcast(&mut self, bytes: &mut [u8], root: usize) -> Result<(), CommError> {
        let all = self.exchange(bytes.to_vec());
        bytes.copy_from_slice(&all[root]);
        Ok(())
    }
    fn allgather(&mut self, input: &[u8], output: &mut [u8]) -> Result<(), CommError> {
        let all = self.exchange(input.to_vec());
        for (chunk, src) in output.chunks_mut(input.len().max(1)).zip(all.iter()) {
            chunk.copy_from_slice(src);
        }
        Ok(())
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        self.exchange(Vec::new());
        Ok(())
    }
}

/// Runs `f(rank, collective)` on one thread per rank of a connected group; results in rank order.
pub fn on_ranks<T: Send>(world: usize, f: impl Fn(usize, Box<dyn Collective>) -> T + Sync) -> Vec<T> {
    let group = local_group(world);
    std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let f = &f;
                s.spawn(move || {
                    tch::set_num_threads(1);
                    f(rank, comm)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
    })
}

static RNG: Mutex<()> = Mutex::new(());

/// Runs `f` right after seeding libtorch's global generator, with no other test of this binary drawing from it
/// meanwhile (tests run on parallel threads), so what `f` draws is the same in every run.
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
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/bench-venv/bin/python");
    assert!(
        venv.exists(),
        "PyTorch parity tests need a Python with torch 2.11: run `cargo xtask setup` (it creates {}) or set \
         HYTRAIN_TEST_PYTHON to one",
        venv.display()
    );
    venv
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
