//! The GPU check's binary and PyTorch peer, run here without a GPU: the CPU references' optimizer results go through
//! the same dump files and peer script a GPU run uses and must agree with torch.optim; without a driver the binary
//! fails with the reason, in its exit code and its JSON.

use std::path::{Path, PathBuf};
use std::process::Command;

fn check_binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hytrain-gpu-check"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The Python with torch the parity tests use: HYTRAIN_TEST_PYTHON, else the venv `cargo xtask setup` makes.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("HYTRAIN_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = repo().join(".cache/bench-venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run `cargo xtask setup`, or set HYTRAIN_TEST_PYTHON to a Python with torch",
        venv.display()
    );
    venv
}

#[test]
fn the_cpu_references_agree_with_torch_optim_through_the_peer_script() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    let status = check_binary().args(["--cpu-only", "--dump"]).arg(&dump).status().unwrap();
    assert!(status.success());
    let json = dir.path().join("peer.json");
    let output = Command::new(python())
        .arg(repo().join("crates/hytrain-cuda/gpu-check/torch_peer.py"))
        .arg("--dump")
        .arg(&dump)
        .arg("--json")
        .arg(&json)
        .args(["--device", "cpu", "--bench-elements", "0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}\n{}", String::from_utf8_lossy(&output.stderr));
    for name in ["sgd_nesterov", "sgd_dampened", "adamw"] {
        assert!(text.contains(&format!("parity: {name}: ")), "{name} was not replayed: {text}");
    }
    let report = std::fs::read_to_string(&json).unwrap();
    assert!(report.contains("\"passed\": true"), "{report}");
}

fn system_has_libcuda() -> bool {
    let cached = Command::new("ldconfig")
        .arg("-p")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("libcuda.so.1 "))
        .unwrap_or(false);
    cached
        || hytrain_cuda::Search::for_process(hytrain_cuda::NvidiaLibrary::Driver)
            .folders()
            .iter()
            .any(|(dir, _)| dir.join("libcuda.so.1").exists())
}

#[test]
fn without_a_driver_the_check_exits_2_with_the_reason_in_its_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("kernels.json");
    let output = check_binary().args(["--bench-elements", "0", "--json"]).arg(&json).output().unwrap();
    if system_has_libcuda() {
        // A machine with a driver runs the real check; whatever it finds, the reason is not a missing driver.
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("no NVIDIA driver"), "{stderr}");
        return;
    }
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("hytrain-gpu-check: CUDA was requested but no NVIDIA driver / libcuda.so.1 found"),
        "{stderr}"
    );
    let report = std::fs::read_to_string(&json).unwrap();
    assert!(report.contains("\"error\": \"CUDA was requested but no NVIDIA driver"), "{report}");
    assert!(report.contains("\"passed\": false"), "{report}");
}

#[test]
fn bad_arguments_exit_2_with_one_line_saying_what_is_wrong() {
    for (args, message) in [
        (&["--bogus"][..], "hytrain-gpu-check: unknown argument '--bogus'; see --help\n"),
        (&["--bench-elements", "many"][..], "hytrain-gpu-check: --bench-elements takes a whole number, got 'many'\n"),
        (&["--json"][..], "hytrain-gpu-check: --json needs a value\n"),
        (&["--cpu-only"][..], "hytrain-gpu-check: --cpu-only only writes the optimizer dumps; give --dump DIR\n"),
    ] {
        let output = check_binary().args(args).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&output.stderr), message);
    }
}

/// A safetensors file of f32 vectors, written by hand from the format (8-byte header length, JSON header, data).
fn write_safetensors(path: &Path, tensors: &[(&str, &[f32])]) {
    let (mut header, mut data) = (Vec::new(), Vec::new());
    for (name, values) in tensors {
        let begin = data.len();
        data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        header.push(format!(
            "\"{name}\":{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{begin},{}]}}",
            values.len(),
            data.len()
        ));
    }
    let header = format!("{{{}}}", header.join(","));
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header.as_bytes());
    file.extend(data);
    std::fs::write(path, file).unwrap();
}

/// The GPU check's overlap comparison: two runs' weights, bit-identical, within cuDNN's noise, or apart.
#[test]
fn the_peer_script_compares_two_runs_weights_and_fails_when_they_are_apart() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.safetensors");
    write_safetensors(&base, &[("fc.weight", &[1.0, -2.0, 4.0]), ("fc.bias", &[0.5])]);
    let compare = |other: &[(&str, &[f32])]| {
        let path = dir.path().join("other.safetensors");
        write_safetensors(&path, other);
        let output = Command::new(python())
            .arg(repo().join("crates/hytrain-cuda/gpu-check/torch_peer.py"))
            .arg("--compare-weights")
            .args([&base, &path])
            .arg("--json")
            .arg(dir.path().join("overlap.json"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        (output.status.code(), text)
    };
    let same = compare(&[("fc.bias", &[0.5]), ("fc.weight", &[1.0, -2.0, 4.0])]);
    assert_eq!(same, (Some(0), "overlap: 2 tensors bit-identical\n".into()));
    // About 4e-6 off (f32 rounding) in a weight whose largest magnitude is 4: 1e-6 relative, within tolerance.
    let close = compare(&[("fc.weight", &[1.0, -2.0, 4.000004]), ("fc.bias", &[0.5])]);
    assert_eq!(close.0, Some(0), "{}", close.1);
    assert!(
        close.1.starts_with("overlap: 2 tensors differ by at most 9.5")
            && close.1.ends_with("e-07 of the largest weight (fc.weight)\n"),
        "{}",
        close.1
    );
    let apart = compare(&[("fc.weight", &[1.0, -2.0, 4.0]), ("fc.bias", &[0.6])]);
    assert_eq!(apart.0, Some(1), "{}", apart.1);
    assert!(apart.1.contains("(fc.bias): FAILED"), "{}", apart.1);
    let renamed = compare(&[("fc.weight", &[1.0, -2.0, 4.0]), ("head.bias", &[0.5])]);
    assert_eq!(renamed.0, Some(1), "{}", renamed.1);
    assert!(renamed.1.contains("hold different tensors: ['fc.bias', 'head.bias']"), "{}", renamed.1);
}
