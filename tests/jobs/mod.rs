//! Helpers for tests that run `hytrain train` jobs under `hytrain launch` as a user would, and read what they
//! print and write.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tch::Tensor;

pub use crate::common::digits;
use crate::common::{self, command, wait};

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "hytrain failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(out),
        stderr(out)
    );
    // A job whose ranks all finish lost none, whatever its size (a single rank once reported itself lost as its
    // store connection closed at exit).
    assert!(!stderr(out).contains("lost rank"), "a successful job reported a lost rank:\n{}", stderr(out));
}

/// `hytrain launch --nproc-per-node N -- hytrain train ARGS` in `dir`, with the environment of a laptop.
pub fn launch_train(dir: &Path, nproc: usize, args: &[&str]) -> Command {
    let mut all: Vec<String> = ["launch", "--nproc-per-node", &nproc.to_string(), "--", common::hytrain(), "train"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    all.extend(args.iter().map(|s| s.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    // One intra-op thread per worker: two workers on a 2-core machine, and identical arithmetic run to run.
    let mut c = command(&all, &[("OMP_NUM_THREADS", "1".into())]);
    c.current_dir(dir);
    c
}

pub fn summary_value(out: &str, key: &str) -> f64 {
    let line = out.lines().rev().find(|l| l.starts_with("steps=")).unwrap_or_else(|| panic!("no summary in:\n{out}"));
    let field = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {line}"));
    field.parse().unwrap_or_else(|_| panic!("{key}={field} is not a number"))
}

pub fn weights(model_dir: &Path) -> Vec<(String, Tensor)> {
    let mut w = Tensor::read_safetensors(model_dir.join("model.safetensors")).unwrap();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

/// Runs a job to its end (or fails the test after 300 s).
pub fn finish(mut job: Command, what: &str) -> Output {
    wait(job.spawn().unwrap(), Duration::from_secs(300), what)
}

/// The value of `key` in each metrics line of `out` that has it.
pub fn metric_values(out: &str, key: &str) -> Vec<f64> {
    out.lines()
        .filter(|l| l.starts_with("epoch="))
        .filter_map(|l| l.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{key}="))))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{key}={v} is not a number")))
        .collect()
}

/// The Python `cargo xtask test` sets up (torch, safetensors, the exporter's dependencies).
pub fn test_python() -> PathBuf {
    std::env::var_os("HYTRAIN_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/bench-venv/bin/python"))
}

/// An example of python/tests/cached_export.py exported with `python -m hytrain_export` (once per source change:
/// cached under .cache/exported).
pub fn cached_export(name: &str) -> PathBuf {
    let python = test_python();
    let out = Command::new(&python)
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/tests/cached_export.py"))
        .arg(name)
        .output()
        .unwrap_or_else(|e| {
            panic!("{} does not start ({e}): run the tests through `cargo xtask test`", python.display())
        });
    assert!(out.status.success(), "exporting {name} failed:\n{}{}", stdout(&out), stderr(&out));
    PathBuf::from(stdout(&out).trim())
}
