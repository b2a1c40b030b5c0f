//! Launcher environment and SageMaker /opt/ml config files together (hytrain_cluster::fuzzing::detect_sectioned).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

/// One scratch SageMaker root per fuzzing process; its files are rewritten for every input.
fn root() -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("hytrain-fuzz-launcher-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch folder");
        dir
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hytrain_cluster::fuzzing::detect_sectioned(data, root());
});
