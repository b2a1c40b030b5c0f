//! Error paths that the real libraries cannot show on demand on this machine: a driver that loads but sees no GPU,
//! an NCCL too old or missing a function. Each stand-in is a tiny C library built here with `cc`, exporting the
//! functions under the real names and signatures, loaded by full path from a folder of its own. This is its own
//! test binary, so no real NVIDIA library shares the process with the stand-ins.

use std::path::{Path, PathBuf};
use std::process::Command;

use hytrain_cuda::{CudaDriver, CudaError, Nccl, Origin, Search};

/// Builds `source` into `dir/name` as a shared library (without a soname, so it can only be found by its path).
fn stand_in(dir: &Path, name: &str, source: &str) -> PathBuf {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, source).unwrap();
    let out = dir.join(name);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-shared", "-fPIC", "-o"])
        .arg(&out)
        .arg(&c)
        .status()
        .unwrap_or_else(|e| panic!("these tests build stand-in libraries with a C compiler ({cc}): {e}"));
    assert!(status.success(), "{cc} failed on {}", c.display());
    out
}

const DRIVER_WITHOUT_GPU: &str = r#"
static const char *name = "CUDA_ERROR_NO_DEVICE";
static const char *text = "no CUDA-capable device is detected";
int cuInit(unsigned flags) { (void)flags; return 100; }
int cuDriverGetVersion(int *v) { *v = 13000; return 0; }
int cuDeviceGetCount(int *n) { *n = 0; return 0; }
int cuGetErrorName(int code, const char **s) { (void)code; *s = name; return 0; }
int cuGetErrorString(int code, const char **s) { (void)code; *s = text; return 0; }
int cuDeviceGet(int *d, int o) { *d = o; return 0; }
int cuDeviceGetAttribute(int *v, int a, int d) { (void)a; (void)d; *v = 0; return 0; }
int cuDeviceGetName(char *s, int n, int d) { (void)n; (void)d; s[0] = 0; return 0; }
"#;

#[test]
fn a_driver_that_sees_no_gpu_reports_cuinit_and_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = stand_in(dir.path(), "libcuda.so.1", DRIVER_WITHOUT_GPU);
    let error = CudaDriver::load_from(&Search::new().folder(dir.path(), Origin::Explicit)).unwrap_err().to_string();
    assert_eq!(
        error,
        format!(
            "NVIDIA driver {} loaded but cuInit failed: CUDA_ERROR_NO_DEVICE (no CUDA-capable device is detected); \
             check that a GPU is visible (nvidia-smi, CUDA_VISIBLE_DEVICES) or use --device cpu",
            path.display()
        )
    );
}

#[test]
fn a_driver_missing_a_function_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = stand_in(dir.path(), "libcuda.so.1", "int cuInit(unsigned f) { (void)f; return 0; }\n");
    let error = CudaDriver::load_from(&Search::new().folder(dir.path(), Origin::Explicit)).unwrap_err();
    assert!(
        matches!(&error, CudaError::MissingSymbol { symbol: "cuGetErrorName", path: p, .. } if *p == path),
        "{error}"
    );
}

fn nccl_reporting(code: u32, extra: &str) -> String {
    format!(
        "int ncclGetVersion(int *v) {{ *v = {code}; return 0; }}\n\
         int ncclGetUniqueId(void *id) {{ (void)id; return 0; }}\n\
         const char *ncclGetErrorString(int r) {{ (void)r; return \"stand-in\"; }}\n{extra}"
    )
}

#[test]
fn an_nccl_older_than_supported_is_refused_with_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = stand_in(dir.path(), "libnccl.so.2", &nccl_reporting(21505, ""));
    let error = Nccl::load_from(&Search::new().folder(dir.path(), Origin::Explicit)).unwrap_err().to_string();
    assert_eq!(
        error,
        format!(
            "NCCL 2.15.5 at {} is older than 2.18.0, the oldest hytrain supports; install nvidia-nccl-cu13 (pip) or \
             a newer NCCL",
            path.display()
        )
    );
}

#[test]
fn an_nccl_lacking_a_collective_is_refused_when_it_loads() {
    let dir = tempfile::tempdir().unwrap();
    // New enough by its version, but without the communicator functions the backend calls.
    let path = stand_in(dir.path(), "libnccl.so.2", &nccl_reporting(22809, ""));
    let error = Nccl::load_from(&Search::new().folder(dir.path(), Origin::Explicit)).unwrap_err().to_string();
    assert_eq!(
        error,
        format!(
            "{} has no symbol ncclCommInitRank; hytrain needs NCCL 2.18 or newer (pip install nvidia-nccl-cu13)",
            path.display()
        )
    );
}

#[test]
fn a_failing_nccl_call_reports_nccls_own_text() {
    let dir = tempfile::tempdir().unwrap();
    let mut functions = String::new();
    for f in hytrain_cuda::NCCL_FUNCTIONS.iter().skip(3) {
        functions.push_str(&format!("int {f}(void) {{ return 0; }}\n"));
    }
    let source = format!(
        "int ncclGetVersion(int *v) {{ *v = 22809; return 0; }}\n\
         int ncclGetUniqueId(void *id) {{ (void)id; return 2; }}\n\
         const char *ncclGetErrorString(int r) {{ return r == 2 ? \"unhandled system error (run with \
         NCCL_DEBUG=INFO for details)\" : \"?\"; }}\n{functions}"
    );
    stand_in(dir.path(), "libnccl.so.2", &source);
    let nccl = Nccl::load_from(&Search::new().folder(dir.path(), Origin::Explicit)).unwrap();
    assert_eq!(nccl.version().to_string(), "2.28.9");
    assert_eq!(
        nccl.unique_id().unwrap_err().to_string(),
        "ncclGetUniqueId failed: unhandled system error (run with NCCL_DEBUG=INFO for details) (ncclResult 2)"
    );
}

#[test]
fn libtorch_cuda_beside_libtorch_cpu_loads_and_reports_its_file_and_version() {
    let root = tempfile::tempdir().unwrap();
    let lib = root.path().join("lib");
    std::fs::create_dir(&lib).unwrap();
    std::fs::write(root.path().join("build-version"), "2.11.0+cu130\n").unwrap();
    // A stand-in: what matters here is that the file is found beside libtorch_cpu and loads.
    let path =
        stand_in(&lib, hytrain_cuda::TORCH_CUDA_LIBRARY, "int hytrain_stand_in_torch_cuda(void) { return 1; }\n");
    let loaded = hytrain_cuda::load_torch_cuda(&lib).unwrap();
    assert_eq!(loaded.path, path);
    assert_eq!(loaded.version.as_deref(), Some("2.11.0+cu130"));
}
