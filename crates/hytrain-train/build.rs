//! torch-sys puts no rpath into what links it; add the libtorch lib folder so this crate's tests and examples run
//! without LD_LIBRARY_PATH. Also record the libtorch version (from its `build-version` file) for export metadata.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        let version_file = std::path::Path::new(&lib).join("..").join("build-version");
        println!("cargo:rerun-if-changed={}", version_file.display());
        if let Ok(v) = std::fs::read_to_string(&version_file) {
            println!("cargo:rustc-env=HYTRAIN_LIBTORCH_VERSION={}", v.trim());
        }
    }
}
