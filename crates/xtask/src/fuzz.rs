//! `cargo xtask fuzz [--seconds N] [TARGET...]`: coverage-guided runs of the fuzz targets in `fuzz/` with
//! cargo-fuzz (libFuzzer), each for a bounded time, on the machine's stable toolchain.
//!
//! cargo-fuzz passes nightly-only flags (`-Zsanitizer=address`, `-Cpasses=sancov-module`); the stable toolchain
//! accepts them with `RUSTC_BOOTSTRAP=1` and ships the AddressSanitizer runtime (`librustc-stable_rt.asan.a`), so no
//! second toolchain is needed: a fresh machine has only one and cannot fetch another. AddressSanitizer stays on
//! because libFuzzer's `-malloc_limit_mb` (the "no unbounded allocation" check) works through its allocator hooks.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The cargo-fuzz release installed when none (or another) is found; `--locked` pins its dependencies too.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Each target's run time unless `--seconds` says otherwise.
const DEFAULT_SECONDS: u64 = 60;
/// The fuzz targets, in the order they run (the names of `fuzz/fuzz_targets/*.rs`).
pub const TARGETS: [&str; 6] = ["launcher_env", "train_config", "store_wire", "webdataset_shard", "npy", "cifar"];
/// libFuzzer's limits: a single allocation above `MALLOC_LIMIT_MB` or a process above `RSS_LIMIT_MB` is a
/// finding (inputs are a few KiB; the largest allocation the readers allow is an image decode of 256 MiB), and so
/// is an input that takes over `TIMEOUT_S` seconds (a hang).
const MALLOC_LIMIT_MB: u32 = 512;
const RSS_LIMIT_MB: u32 = 2048;
const TIMEOUT_S: u32 = 10;

/// What one target's run found.
struct Outcome {
    target: &'static str,
    runs: u64,
    execs_per_s: u64,
    corpus: usize,
    findings: Vec<PathBuf>,
    exit_ok: bool,
    log: PathBuf,
}

/// Parses the arguments, makes sure cargo-fuzz is there, builds every target once and runs the chosen ones.
/// Returns 1 when any target crashed, ran out of memory or time, or did not run.
pub fn fuzz(root: &Path, args: &[OsString]) -> Result<u8> {
    let (seconds, targets) = parse_args(args)?;
    ensure_cargo_fuzz()?;
    let target_dir = env_target_dir(root).join("fuzz");
    let work = target_dir.join("work");
    let mut build = cargo_fuzz(root, &target_dir);
    build.args(["build", "--release", "--debug-assertions"]);
    let status = build.status().context("running cargo fuzz build")?;
    if !status.success() {
        bail!("cargo fuzz build failed ({status})");
    }
    let mut outcomes = Vec::new();
    for target in targets {
        outcomes.push(run_target(root, &target_dir, &work, target, seconds)?);
    }
    println!("\nfuzz summary ({seconds} s per target; corpus and findings under {}):", work.display());
    println!("{:<18} {:>12} {:>10} {:>8} {:>8}", "target", "runs", "execs/s", "corpus", "crashes");
    let mut failed = false;
    for o in &outcomes {
        println!("{:<18} {:>12} {:>10} {:>8} {:>8}", o.target, o.runs, o.execs_per_s, o.corpus, o.findings.len());
        for f in &o.findings {
            println!(
                "    finding: {} (replay: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run {} {})",
                f.display(),
                o.target,
                f.display()
            );
        }
        if !o.exit_ok || !o.findings.is_empty() {
            failed = true;
            println!("    libFuzzer log: {}", o.log.display());
        }
    }
    Ok(u8::from(failed))
}

fn parse_args(args: &[OsString]) -> Result<(u64, Vec<&'static str>)> {
    let mut seconds = DEFAULT_SECONDS;
    let mut chosen = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let arg = arg.to_str().context("arguments must be UTF-8")?;
        if arg == "--seconds" {
            let n = it.next().and_then(|s| s.to_str()).context("--seconds needs a number")?;
            seconds = n
                .parse()
                .ok()
                .filter(|&s| s > 0)
                .with_context(|| format!("--seconds {n}: expected a whole number of seconds >= 1"))?;
        } else if let Some(t) = TARGETS.iter().find(|t| **t == arg) {
            chosen.push(*t);
        } else {
            bail!("unknown fuzz target or option `{arg}`; targets: {}", TARGETS.join(", "));
        }
    }
    if chosen.is_empty() {
        chosen = TARGETS.to_vec();
    }
    Ok((seconds, chosen))
}

/// Installs the pinned cargo-fuzz unless `cargo fuzz --version` already reports it.
fn ensure_cargo_fuzz() -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let installed = Command::new(&cargo)
        .args(["fuzz", "--version"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if installed.as_deref().is_some_and(|v| v.split_whitespace().any(|w| w == CARGO_FUZZ_VERSION)) {
        return Ok(());
    }
    eprintln!(
        "xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (found: {})",
        installed.as_deref().unwrap_or("none").trim()
    );
    let status = Command::new(&cargo)
        .args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ_VERSION])
        .status()
        .context("running cargo install cargo-fuzz")?;
    if !status.success() {
        bail!("cargo install cargo-fuzz --locked --version {CARGO_FUZZ_VERSION} failed ({status})");
    }
    Ok(())
}

/// The project's target folder: `CARGO_TARGET_DIR` when set, else `<root>/target`.
fn env_target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

/// `cargo fuzz` in `fuzz/`, on the toolchain that runs xtask, allowed its nightly flags.
fn cargo_fuzz(root: &Path, target_dir: &Path) -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.arg("fuzz")
        .current_dir(root.join("fuzz"))
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_DIR", target_dir)
        // The workspace's build-dir setting would put the sanitized dependencies beside the normal ones.
        .env_remove("CARGO_BUILD_BUILD_DIR");
    c
}

fn run_target(root: &Path, target_dir: &Path, work: &Path, target: &'static str, seconds: u64) -> Result<Outcome> {
    let corpus = work.join("corpus").join(target);
    let artifacts = work.join("artifacts").join(target);
    fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    // Findings of earlier runs are theirs: a run reports what it found itself.
    let _ = fs::remove_dir_all(&artifacts);
    fs::create_dir_all(&artifacts).with_context(|| format!("creating {}", artifacts.display()))?;
    let log = work.join(format!("{target}.log"));
    let log_file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    println!("xtask: fuzzing {target} for {seconds} s");
    let mut c = cargo_fuzz(root, target_dir);
    c.args(["run", "--release", "--debug-assertions", target])
        .arg(&corpus)
        .arg(root.join("fuzz/corpus").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-malloc_limit_mb={MALLOC_LIMIT_MB}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-timeout={TIMEOUT_S}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        // libtorch (linked by train_config) keeps allocations for the life of the process; those are not leaks
        // of the code under test, and per-input growth is caught by the RSS limit.
        .arg("-detect_leaks=0")
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    let status = c.status().with_context(|| format!("running cargo fuzz run {target}"))?;
    let text = fs::read_to_string(&log).unwrap_or_default();
    let stat = |name: &str| {
        text.lines()
            .rev()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut findings: Vec<PathBuf> = fs::read_dir(&artifacts)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    findings.sort();
    let corpus_size = fs::read_dir(&corpus)?.count();
    if !status.success() {
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        eprintln!("xtask: {target} failed ({status}); last lines of {}:", log.display());
        for l in tail.iter().rev() {
            eprintln!("    {l}");
        }
    }
    Ok(Outcome {
        target,
        runs: stat("number_of_executed_units"),
        execs_per_s: stat("average_exec_per_sec"),
        corpus: corpus_size,
        findings,
        exit_ok: status.success(),
        log,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_listed_has_a_source_file_and_a_seed_corpus() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        for t in TARGETS {
            assert!(root.join(format!("fuzz/fuzz_targets/{t}.rs")).is_file(), "{t}");
            let seeds = fs::read_dir(root.join("fuzz/corpus").join(t)).map(|d| d.count()).unwrap_or(0);
            assert!(seeds >= 5, "{t} has {seeds} seeds");
        }
    }

    #[test]
    fn arguments_choose_targets_and_seconds_and_bad_ones_are_refused() {
        let a = |v: &[&str]| parse_args(&v.iter().map(OsString::from).collect::<Vec<_>>());
        assert_eq!(a(&[]).unwrap(), (DEFAULT_SECONDS, TARGETS.to_vec()));
        assert_eq!(a(&["--seconds", "5", "npy"]).unwrap(), (5, vec!["npy"]));
        assert!(a(&["--seconds", "0"]).unwrap_err().to_string().contains(">= 1"));
        assert!(a(&["--seconds"]).is_err());
        let e = a(&["tar"]).unwrap_err().to_string();
        assert!(e.contains("unknown fuzz target or option `tar`") && e.contains("webdataset_shard"), "{e}");
    }
}
