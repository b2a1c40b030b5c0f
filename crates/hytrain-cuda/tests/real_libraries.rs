//! The real NVIDIA libraries of the pinned wheels (`cargo xtask setup` unpacks them under `.libtorch/nvidia/`),
//! used on a machine without a GPU: NCCL's discovery, version and unique-id exchange, NVRTC compiling every kernel,
//! and the error a request for CUDA gets here.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hytrain_cuda::{
    exchange_unique_id, kernels, ComputeCapability, CudaDriver, CudaError, IdStore, Nccl, Nvrtc, Origin, Search,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The libtorch folder the build uses (`.cargo/config.toml` sets LIBTORCH for cargo's test runs).
fn libtorch() -> PathBuf {
    std::env::var_os("LIBTORCH")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".libtorch"))
}

fn wheel_library(relative: &str) -> PathBuf {
    let path = libtorch().join(relative);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask setup`, which unpacks the pinned NVIDIA wheels there",
        path.display()
    );
    path
}

/// The version pinned for `name` in the requirements file setup downloads from.
fn pinned_version(name: &str) -> String {
    let text = std::fs::read_to_string(repo().join("crates/xtask/libtorch-requirements.txt")).unwrap();
    text.lines()
        .find_map(|line| line.trim().strip_prefix(&format!("{name}==")))
        .map(|rest| rest.trim_end_matches(['\\', ' ']).to_string())
        .unwrap_or_else(|| panic!("{name} is not pinned"))
}

fn same_file(a: &Path, b: &Path) -> bool {
    a.canonicalize().unwrap() == b.canonicalize().unwrap()
}

/// Only the pip folders beside the build's libtorch: not the process's loaded libraries, not the system.
fn beside_libtorch() -> Search {
    Search::new().beside_libtorch(&libtorch())
}

#[test]
fn nccl_from_the_pinned_wheel_loads_beside_libtorch_and_reports_the_pinned_version() {
    let expected = wheel_library("nvidia/nccl/lib/libnccl.so.2");
    let nccl = Nccl::load_from(&beside_libtorch()).unwrap();
    assert!(same_file(nccl.path(), &expected), "{nccl:?}");
    assert_eq!(nccl.origin(), Origin::BesideLibtorch);
    assert_eq!(nccl.version().to_string(), pinned_version("nvidia-nccl-cu13"));
}

#[test]
fn nccl_is_found_in_pip_layout_beside_site_packages_torch() {
    let real = wheel_library("nvidia/nccl/lib/libnccl.so.2");
    let site = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(site.path().join("torch/lib")).unwrap();
    std::fs::create_dir_all(site.path().join("nvidia/nccl/lib")).unwrap();
    let pip_copy = site.path().join("nvidia/nccl/lib/libnccl.so.2");
    std::os::unix::fs::symlink(&real, &pip_copy).unwrap();
    let nccl = Nccl::load_from(&Search::new().beside_libtorch(&site.path().join("torch"))).unwrap();
    assert!(same_file(nccl.path(), &pip_copy), "{nccl:?}");
    assert_eq!(nccl.origin(), Origin::BesideLibtorch);
}

#[test]
fn ld_library_path_is_searched_when_nothing_is_beside_libtorch() {
    let real = wheel_library("nvidia/nccl/lib/libnccl.so.2");
    let empty = tempfile::tempdir().unwrap();
    let path = std::env::join_paths(["/nonexistent/nccl", real.parent().unwrap().to_str().unwrap()]).unwrap();
    let search = Search::new().beside_libtorch(empty.path()).ld_library_path(&path);
    let nccl = Nccl::load_from(&search).unwrap();
    assert_eq!(nccl.origin(), Origin::LdLibraryPath);
    assert!(same_file(nccl.path(), &real));
}

#[test]
fn an_nccl_the_process_already_loaded_is_taken_before_any_folder() {
    let first = Nccl::load_from(&beside_libtorch()).unwrap();
    let again = Nccl::load_from(&Search::new().already_loaded(true)).unwrap();
    assert_eq!(again.origin(), Origin::AlreadyLoaded);
    assert!(same_file(again.path(), first.path()));
    assert_eq!(again.version(), first.version());
}

/// A rendezvous store in memory with the semantics of hytrain-comm's: `get` waits for the key until a timeout.
#[derive(Default)]
struct MemoryStore {
    values: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
    timeout: Duration,
    refuse_writes: bool,
}

#[derive(Debug)]
struct StoreError(String);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

impl MemoryStore {
    fn with_timeout(timeout: Duration) -> MemoryStore {
        MemoryStore { timeout, ..MemoryStore::default() }
    }
}

impl IdStore for MemoryStore {
    type Error = StoreError;

    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        if self.refuse_writes {
            return Err(StoreError("connection to the store was closed".into()));
        }
        self.values.lock().unwrap().insert(key.into(), value.to_vec());
        self.changed.notify_all();
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let deadline = Instant::now() + self.timeout;
        let mut values = self.values.lock().unwrap();
        loop {
            if let Some(value) = values.get(key) {
                return Ok(value.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StoreError(format!("key '{key}' was not set within {} ms", self.timeout.as_millis())));
            }
            values = self.changed.wait_timeout(values, left).unwrap().0;
        }
    }
}

#[test]
fn every_rank_gets_rank_zeros_unique_id_through_the_store() {
    let nccl = Arc::new(Nccl::load_from(&beside_libtorch()).unwrap());
    let store = Arc::new(MemoryStore::with_timeout(Duration::from_secs(30)));
    let world_size = 4;
    // Rank 0 starts last, so the other ranks really wait for it.
    let ids: Vec<_> = (0..world_size)
        .rev()
        .map(|rank| {
            let (nccl, store) = (nccl.clone(), store.clone());
            std::thread::spawn(move || exchange_unique_id(&nccl, &*store, rank, 0, "nccl/world/id").unwrap())
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert!(ids[0].as_bytes().iter().any(|&b| b != 0));
    let second = exchange_unique_id(&nccl, &*store, 0, 0, "nccl/second/id").unwrap();
    assert_ne!(second, ids[0], "each communicator gets a fresh id");
}

#[test]
fn a_rank_whose_store_times_out_names_itself_the_key_and_the_store_error() {
    let nccl = Nccl::load_from(&beside_libtorch()).unwrap();
    let store = MemoryStore::with_timeout(Duration::from_millis(100));
    let error = exchange_unique_id(&nccl, &store, 3, 0, "nccl/job/id").unwrap_err().to_string();
    assert_eq!(
        error,
        "rank 3 could not fetch the NCCL unique id under key 'nccl/job/id' in the rendezvous store: key \
         'nccl/job/id' was not set within 100 ms"
    );
}

#[test]
fn a_store_refusing_the_id_fails_the_root_rank_with_the_reason() {
    let nccl = Nccl::load_from(&beside_libtorch()).unwrap();
    let store = MemoryStore { refuse_writes: true, ..MemoryStore::default() };
    let error = exchange_unique_id(&nccl, &store, 0, 0, "nccl/id").unwrap_err().to_string();
    assert_eq!(
        error,
        "rank 0 could not publish the NCCL unique id under key 'nccl/id' in the rendezvous store: connection to \
         the store was closed"
    );
}

#[test]
fn a_truncated_id_in_the_store_is_refused_not_passed_to_nccl() {
    let nccl = Nccl::load_from(&beside_libtorch()).unwrap();
    let store = MemoryStore::with_timeout(Duration::from_secs(5));
    store.set("nccl/id", &[1; 100]).unwrap();
    let error = exchange_unique_id(&nccl, &store, 1, 0, "nccl/id").unwrap_err();
    assert!(matches!(error, CudaError::BadUniqueId { len: 100, .. }), "{error}");
}

fn nvrtc() -> Nvrtc {
    let expected = wheel_library("nvidia/cu13/lib/libnvrtc.so.13");
    let nvrtc = Nvrtc::load_from(&beside_libtorch()).unwrap();
    assert!(same_file(nvrtc.path(), &expected), "{nvrtc:?}");
    nvrtc
}

#[test]
fn nvrtc_from_the_pinned_wheel_reports_the_pinned_cuda_release() {
    let nvrtc = nvrtc();
    let (major, minor) = nvrtc.version();
    let pinned = pinned_version("nvidia-cuda-nvrtc");
    assert!(pinned.starts_with(&format!("{major}.{minor}.")), "NVRTC {major}.{minor}, pinned {pinned}");
}

#[test]
fn every_kernel_compiles_to_ptx_that_names_each_entry_point() {
    let nvrtc = nvrtc();
    let supported = nvrtc.supported_archs().unwrap();
    let oldest = *supported.first().expect("NVRTC lists its architectures");
    let hopper = ComputeCapability { major: 9, minor: 0 };
    assert!(supported.contains(&hopper), "{supported:?}");
    for arch in [oldest, hopper] {
        let compiled = kernels::compile_all(&nvrtc, arch).unwrap();
        assert_eq!(compiled.len(), kernels::KERNEL_FILES.len());
        for (ptx, file) in compiled.iter().zip(kernels::KERNEL_FILES) {
            let mut found = ptx.entry_points();
            let mut expected = file.entry_points.to_vec();
            found.sort_unstable();
            expected.sort_unstable();
            assert_eq!(found, expected, "{} for {arch}", file.name);
            let target = format!(".target sm_{}{}", arch.major, arch.minor);
            assert!(ptx.text.contains(&target), "{} lacks {target}", file.name);
        }
    }
}

#[test]
fn a_kernel_that_does_not_compile_returns_nvrtcs_log() {
    let nvrtc = nvrtc();
    let error = nvrtc
        .compile(
            "broken.cu",
            "extern \"C\" __global__ void k(float* x) { x[0] = no_such_name; }",
            ComputeCapability { major: 9, minor: 0 },
            &[],
        )
        .unwrap_err()
        .to_string();
    assert!(error.starts_with("NVRTC could not compile broken.cu for compute_90: "), "{error}");
    assert!(error.contains("no_such_name"), "{error}");
    assert!(!error.contains('\n'), "{error}");
}

/// Whether the system has a libcuda.so.1 by the dynamic loader's own account (`ldconfig -p`) or in the folders a
/// hytrain process searches: the oracle for what asking for CUDA must do here.
fn system_has_libcuda() -> bool {
    let cached = std::process::Command::new("ldconfig")
        .arg("-p")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("libcuda.so.1 "))
        .unwrap_or(false);
    cached
        || Search::for_process(hytrain_cuda::NvidiaLibrary::Driver)
            .folders()
            .iter()
            .any(|(dir, _)| dir.join("libcuda.so.1").exists())
}

#[test]
fn asking_for_cuda_without_a_driver_says_no_nvidia_driver_was_found() {
    match CudaDriver::load() {
        Err(CudaError::NoDriver { .. }) if !system_has_libcuda() => {}
        Err(error @ CudaError::NoDevice { .. }) if system_has_libcuda() => {
            eprintln!("this machine has a driver but no GPU: {error}")
        }
        Ok(driver) if system_has_libcuda() => eprintln!("this machine has a GPU: {driver:?}"),
        other => panic!(
            "CudaDriver::load() gave {other:?} although the system {} libcuda.so.1",
            if system_has_libcuda() { "has" } else { "has no" }
        ),
    }
    if !system_has_libcuda() {
        let error = CudaDriver::load().unwrap_err().to_string();
        assert!(
            error.starts_with("CUDA was requested but no NVIDIA driver / libcuda.so.1 found (searched "),
            "{error}"
        );
        assert!(error.contains("/usr/lib/x86_64-linux-gnu"), "{error}");
        assert!(error.ends_with("or use --device cpu"), "{error}");
    }
}
