//! `hytrain train --device` on a machine without CUDA (this libtorch is the CPU build, with no
//! `libtorch_cuda.so` beside `libtorch_cpu.so`): `auto` trains on the CPU and says why, `cuda` is a clear error,
//! and a wrong device name is refused.

use crate::common;

use std::process::{Output, Stdio};
use std::time::Duration;

use common::{command, digits, wait};

fn train(args: &[&str], env: &[(&str, String)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let mut all = vec!["train", "--model", "mlp", "--epochs", "1", "--max-samples", "64", "--checkpoint-dir", "none"];
    all.extend(args);
    let mut c = command(&all, env);
    c.current_dir(dir.path()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    wait(c.spawn().unwrap(), Duration::from_secs(120), "hytrain train")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn device_cuda_without_libtorch_cuda_fails_naming_the_folder_searched_and_the_way_out() {
    let data = digits();
    let out = train(&["--device", "cuda", "--data", data.to_str().unwrap()], &[]);
    let e = stderr(&out);
    assert!(!out.status.success(), "{e}");
    assert!(
        e.contains(
            "hytrain: error: --device cuda: CUDA was requested but this libtorch has no CUDA support: no \
                    libtorch_cuda.so in "
        ),
        "{e}"
    );
    assert!(e.contains("/lib; run in a GPU image") && e.contains("or use --device cpu"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn device_auto_without_cuda_trains_on_the_cpu_and_logs_why() {
    let data = digits();
    let out = train(&["--data", data.to_str().unwrap()], &[("HYTRAIN_DEVICE", "auto".into())]);
    let e = stderr(&out);
    assert!(out.status.success(), "{e}");
    assert!(
        e.contains("--device auto: using the CPU (CUDA was requested but this libtorch has no CUDA support"),
        "{e}"
    );
}

#[test]
fn a_device_that_is_not_auto_cpu_or_cuda_is_refused_by_name() {
    let data = digits();
    let out = train(&["--data", data.to_str().unwrap()], &[("SM_HP_DEVICE", "\"tpu\"".into())]);
    let e = stderr(&out);
    assert!(!out.status.success(), "{e}");
    assert!(e.contains("device (from "), "{e}");
    assert!(e.contains("'tpu' is not a device; use auto, cpu or cuda"), "{e}");
}
