//! torch-sys puts no rpath into what links it (hytrain-train does, for the `train_config` target); add the libtorch
//! lib folder so the fuzz binaries run without LD_LIBRARY_PATH.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
