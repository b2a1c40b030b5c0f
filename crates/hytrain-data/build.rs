//! With the `tch` feature, torch-sys puts no rpath into what links it; add the libtorch lib folder so this crate's
//! tests and benches run without LD_LIBRARY_PATH. Without the feature there is nothing to do.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
