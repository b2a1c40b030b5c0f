//! torch-sys puts no rpath into what links it; add the libtorch lib folder so this crate's tests and examples run
//! without LD_LIBRARY_PATH. Also record the libtorch version (from its `build-version` file) for export metadata,
//! and compile the C++ shim (`csrc/*.cpp`) against the same libtorch's headers: tch has no API for autograd hooks,
//! which overlapping gradient allreduces with backward needs, nor the scaled in-place ops (`add_` with alpha,
//! `addcmul_`/`addcdiv_` with value, `out=`) that optimizer steps without temporaries need, nor CPU autocast and
//! the GradScaler's unscale kernel that mixed precision needs, nor a custom autograd function (the 2x2 max-pool
//! kernel, `csrc/max_pool.cpp`), nor AOTInductor's package loader (exported models, `csrc/aoti.cpp`), nor a
//! TorchScript module's buffers (`csrc/script.cpp`), nor the multi-tensor ops (`_foreach_*`, `_fused_*`) and
//! profiler callbacks that steps without host synchronisation need (`csrc/step_sync.cpp`).
use std::path::Path;

fn main() {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys (a direct dependency) sets DEP_TCH_LIBTORCH_LIB to libtorch's lib folder");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    let root = Path::new(&lib).join("..");
    let version_file = root.join("build-version");
    println!("cargo:rerun-if-changed={}", version_file.display());
    if let Ok(v) = std::fs::read_to_string(&version_file) {
        println!("cargo:rustc-env=HYTRAIN_LIBTORCH_VERSION={}", v.trim());
    }
    // Both a libtorch archive and a PyTorch wheel (LIBTORCH_USE_PYTORCH=1) keep headers in include/ beside lib/.
    let include = root.join("include");
    // Same ABI switch as torch-sys for a plain libtorch; PyTorch wheels of 2.x are all built with the CXX11 ABI.
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    println!("cargo:rerun-if-changed=csrc/grad_hook.cpp");
    println!("cargo:rerun-if-changed=csrc/optim_step.cpp");
    println!("cargo:rerun-if-changed=csrc/autocast.cpp");
    println!("cargo:rerun-if-changed=csrc/max_pool.cpp");
    println!("cargo:rerun-if-changed=csrc/aoti.cpp");
    println!("cargo:rerun-if-changed=csrc/rng.cpp");
    println!("cargo:rerun-if-changed=csrc/script.cpp");
    println!("cargo:rerun-if-changed=csrc/step_sync.cpp");
    println!("cargo:rerun-if-changed=csrc/shim_error.h");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/grad_hook.cpp")
        .file("csrc/optim_step.cpp")
        .file("csrc/autocast.cpp")
        .file("csrc/max_pool.cpp")
        .file("csrc/aoti.cpp")
        .file("csrc/rng.cpp")
        .file("csrc/script.cpp")
        .file("csrc/step_sync.cpp")
        .compile("hytrain_grad_hook");
}
