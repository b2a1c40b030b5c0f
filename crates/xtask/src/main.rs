//! Project tasks, run as `cargo xtask <task>` (an alias in `.cargo/config.toml`). Plain Rust without libtorch, so it
//! builds on a bare machine and can then fetch libtorch for everything else.
//!
//! ```text
//! cargo xtask setup     # CPU libtorch in .libtorch (from PyPI's torch wheel), Open MPI + libclang for the tests
//! cargo xtask demo      # setup, build hytrain, run the demo job with 2 local workers
//! cargo xtask test      # setup, then the whole test suite (extra arguments go to `cargo test`)
//! cargo xtask bench     # setup, every comparison with a peer (allreduce, step time, S3 read, launch to first
//!                       # step, checkpoints to S3), each beside the peer on the same machine, ending in one
//!                       # table of ratios
//! cargo xtask gpu-check # pack the GPU check (kernels, NCCL, training beside PyTorch) for a machine with a GPU
//! cargo xtask fuzz      # each fuzz target in fuzz/ for 60 s under cargo-fuzz (installed if missing)
//! ```

mod demo_data;
mod disk;
mod first_step;
mod fuzz;
mod gpu_check;
mod recovery;
mod requirements;
mod scale_sim;
mod setup;
mod summary;
mod venv;
mod wheel;
mod zero_bench;

use std::env;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: cargo xtask <task> [args]

tasks:
  setup           build the CPU libtorch in .libtorch (torch 2.11.0 wheel from PyPI) and install Open MPI and
                  libclang for the tests if missing; a second run does nothing
  demo            setup, build hytrain, run the demo job with 2 local workers
  test [ARGS]     setup, `cargo fmt --all --check`, then one build of every target that is also the clippy gate
                  (`cargo test --workspace --all-targets --features mpi --no-run` compiled by clippy-driver with
                  warnings denied), then `cargo test --workspace --features mpi [ARGS]` on that build; a lint
                  stops the run before the tests (`cargo xtask lint` shows the lints alone)
  lint            setup, then the lint gate alone (`cargo fmt --all --check`, `cargo clippy --workspace
                  --all-targets --features mpi -- -D warnings`)
  bench [--only PARTS] [ARGS]
                  setup, then every comparison with a peer, in one run, ending in one table of ratios:
                  allreduce  `cargo bench --bench allreduce [ARGS]`: ring and shm beside PyTorch's gloo
                  step       `cargo bench --bench step_time`: LeNet and ResNet-18 beside PyTorch DDP, an exported
                             torchvision ResNet-18 beside PyTorch DDP eager and under torch.compile
                  s3         crates/hytrain-data/benches/s3_read.py: beside s3torchconnector and boto3
                  launch     `hytrain launch` to the first step beside torchrun (benches/first_step.py)
                  checkpoint crates/hytrain-train/benches/checkpoint.py: saving and loading a 512 MiB state
                             dict on S3 beside s3torchconnector's S3Checkpoint and DCP's S3StorageWriter/Reader,
                             and the stall of a background save against a synchronous one
                  zero       `hytrain train --shard none|optimizer|gradients` (AdamW, 50.7M-parameter MLP) at 2
                             and 4 ranks: peak host memory per rank and step time, beside PyTorch DDP and
                             ZeroRedundancyOptimizer (benches/zero_memory.py)
                  recovery   a worker of 3 single-process nodes SIGKILLed at step 35: time to the job's next step,
                             hytrain's nodes carrying on (--nnodes 2:3, standalone store) beside torchrun's elastic
                             restart (--max-restarts 3) from a checkpoint (benches/recovery.py)
                  --only allreduce,launch runs some of them
  fuzz [--seconds N] [TARGET...]
                  run each fuzz target (fuzz/fuzz_targets: launcher_env, train_config, store_wire,
                  webdataset_shard, npy, cifar) under cargo-fuzz for N s (default 60), installing cargo-fuzz
                  0.13.2 if missing; prints runs, execs/s, corpus size and crashes; exits 1 on a crash
  scale-sim [--hytrain PATH] [-- TRAIN ARGS]
                  as root: 4 network namespaces on a bridge as nodes, ResNet-18 with 1, 2 and 4 nodes (one
                  process each) with and without a 1 Gbit/s limit per link, each with overlap on and off;
                  step time and scaling efficiency. TRAIN ARGS go to every `hytrain train`; --hytrain skips the
                  release build. Not part of `test`
  gpu-check       build hytrain-gpu-check and hytrain (release) and pack them with their scripts in
                  target/gpu-check, to run on a GPU machine with PyTorch (kernels against their CPU references,
                  NCCL, kernel timings and LeNet/ResNet-18 training samples/s beside PyTorch eager); first
                  rehearses the training half here on the CPU with the bench venv's torch libraries

LIBTORCH=/path (another libtorch 2.11.0) or LIBTORCH_USE_PYTORCH=1 (the Python environment's torch) skip the
libtorch build.";

fn main() -> ExitCode {
    let mut args = env::args_os().skip(1);
    let task = args.next();
    let rest: Vec<OsString> = args.collect();
    let result = match task.as_ref().and_then(|t| t.to_str()) {
        Some("setup") if rest.is_empty() => setup_all().map(|()| 0),
        Some("demo") if rest.is_empty() => demo(),
        Some("test") => test(&rest),
        Some("lint") if rest.is_empty() => lint_alone(),
        Some("bench") => bench(&rest),
        Some("gpu-check") if rest.is_empty() => gpu_check::gpu_check(&root()),
        Some("fuzz") => fuzz::fuzz(&root(), &rest),
        Some("scale-sim") => scale_sim(&rest),
        // Not in USAGE: for whoever wants the path of the demo's dataset (the last line printed).
        Some("demo-data") if rest.is_empty() => demo_data::digits(&root()).map(|path| {
            println!("{}", path.display());
            0
        }),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(0)
        }
        Some("setup" | "demo" | "demo-data" | "gpu-check") => {
            eprintln!("xtask: {} takes no arguments\n\n{USAGE}", task.unwrap().to_string_lossy());
            Ok(2)
        }
        Some(other) => {
            eprintln!("xtask: unknown task `{other}`\n\n{USAGE}");
            Ok(2)
        }
        None => {
            eprintln!("{USAGE}");
            Ok(2)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The repository root: this crate lives in `<root>/crates/xtask`.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the xtask crate is inside the repository")
}

fn setup_all() -> Result<()> {
    let root = root();
    disk::check(&root);
    setup::libtorch(&root)?;
    setup::test_tools()?;
    venv::bench_venv(&root)?;
    demo_data::digits(&root).map(|_| ())
}

/// `cargo` as it ran us (so a toolchain chosen by rustup stays chosen), run in the repository root.
fn cargo(root: &Path) -> Command {
    let mut command = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root);
    command
}

fn test(args: &[OsString]) -> Result<u8> {
    let started = Instant::now();
    let root = root();
    disk::check(&root);
    setup::libtorch(&root)?;
    setup::test_tools()?;
    // Parity tests compare hytrain with PyTorch itself, run from this environment.
    let python = venv::bench_venv(&root)?;
    // Tests that train on real data read the demo's digits from here.
    let digits = demo_data::digits(&root)?;
    let formatted = status_code(&mut fmt_check(&root))?;
    if formatted != 0 {
        println!("test: `cargo fmt --all --check` failed: `cargo fmt --all` formats the workspace");
        return Ok(formatted);
    }
    // The lint gate and the test build are one compilation: clippy-driver compiles the workspace's crates (as
    // `cargo clippy` does, but with code generation), so the dependencies are compiled once, not once checked for
    // clippy and once built for the tests. Both cargo runs below get the same wrapper, so the second reuses the
    // first's artifacts.
    let clippy = clippy_driver()?;
    let (cargo_args, test_args) = match args.iter().position(|a| a == "--") {
        Some(at) => args.split_at(at),
        None => (args, &[][..]),
    };
    let mut build = cargo(&root);
    build.args(["test", "--workspace", "--all-targets", "--features", "mpi", "--no-run"]).args(cargo_args);
    let mut command = cargo(&root);
    command
        .args(["test", "--workspace", "--features", "mpi", "--no-fail-fast"])
        .args(cargo_args)
        .args(test_args)
        .env("HYTRAIN_TEST_PYTHON", &python)
        .env("HYTRAIN_DEMO_DATA", &digits);
    for c in [&mut build, &mut command] {
        c.env("RUSTC_WORKSPACE_WRAPPER", &clippy).env("CLIPPY_ARGS", CLIPPY_DENY_WARNINGS);
    }
    if setup::is_root() {
        // Open MPI refuses to start as root without both of these; containers and CI machines often run as root.
        command.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    }
    println!("test: build and lint: {}", show(&build));
    let built = status_code(&mut build)?;
    println!("test: build and lint finished after {}", elapsed(started));
    if built != 0 {
        println!("test: the build failed on a compile error or a lint (warnings are denied); `cargo xtask lint` runs the gate alone");
        return Ok(built);
    }
    println!("test: {}", show(&command));
    let code = status_code(&mut command)?;
    println!("test: finished in {} (exit code {code})", elapsed(started));
    Ok(code)
}

/// What `cargo clippy -- -D warnings` hands clippy-driver (its arguments, joined by `__CLIPPY_HACKERY__` when
/// there are several): warnings, clippy's included, denied in the workspace's crates.
const CLIPPY_DENY_WARNINGS: &str = "-Dwarnings";

/// clippy-driver of the toolchain cargo builds with (`rustup component add clippy` installs it).
fn clippy_driver() -> Result<PathBuf> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let output = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .with_context(|| format!("cannot run `{} --print sysroot`", rustc.to_string_lossy()))?;
    if !output.status.success() {
        bail!("`{} --print sysroot` failed: {}", rustc.to_string_lossy(), String::from_utf8_lossy(&output.stderr));
    }
    let driver = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()).join("bin/clippy-driver");
    if !driver.is_file() {
        bail!("{} is missing: the lint gate needs clippy (`rustup component add clippy`)", driver.display());
    }
    Ok(driver)
}

/// `cargo fmt --all --check`: the workspace formatted by the root rustfmt.toml.
fn fmt_check(root: &Path) -> Command {
    let mut fmt = cargo(root);
    fmt.args(["fmt", "--all", "--check"]);
    fmt
}

/// `cargo xtask lint`: the set-up clippy needs (libtorch for torch-sys, Open MPI for the `mpi` feature), then the gate.
fn lint_alone() -> Result<u8> {
    let root = root();
    setup::libtorch(&root)?;
    setup::test_tools()?;
    lint(&root)
}

/// The lint gate alone: the workspace formatted with the root rustfmt.toml and clippy clean on every target with
/// warnings denied (the workspace's `[workspace.lints]` add `missing_docs` and `clippy::undocumented_unsafe_blocks`).
/// `cargo xtask test` applies the same lints in its test build instead. Returns the first failing step's exit
/// code, or 0.
fn lint(root: &Path) -> Result<u8> {
    let started = Instant::now();
    let fmt = fmt_check(root);
    let mut clippy = cargo(root);
    clippy.args(["clippy", "--workspace", "--all-targets", "--features", "mpi", "--", "-D", "warnings"]);
    let mut failed = 0;
    for mut command in [fmt, clippy] {
        println!("lint: {}", show(&command));
        let code = status_code(&mut command)?;
        if code != 0 {
            println!("lint: failed (exit code {code}): {}", show(&command));
            failed = if failed == 0 { code } else { failed };
        }
    }
    println!("lint: finished in {} ({})", elapsed(started), if failed == 0 { "clean" } else { "failed" });
    Ok(failed)
}

/// One step of the demo: what it shows and the hytrain arguments that show it. Later work swaps the job for real
/// training by changing this list.
#[derive(Debug)]
struct Step {
    title: &'static str,
    args: Vec<OsString>,
}

/// The accuracy on the digits' test split the demo promises; it fails when training falls short.
const DEMO_ACCURACY: f64 = 0.93;

/// Where the demo's run writes its model, checkpoints and metrics, relative to the repository root.
const DEMO_RUN: &str = "hytrain-out/demo";

fn demo_steps(hytrain: &Path, digits: &Path, run: &Path) -> Vec<Step> {
    let args = |list: &[&OsStr]| list.iter().map(|a| a.to_os_string()).collect();
    let under = |name: &str| run.join(name).into_os_string();
    let (model, checkpoints, output) = (under("model"), under("checkpoints"), under("output"));
    vec![
        Step { title: "how hytrain understands this job", args: args(&["explain".as_ref()]) },
        Step {
            title: "2 local workers train an MLP on the handwritten digits (1438 train, 359 test)",
            args: args(&[
                "launch".as_ref(),
                "--nproc-per-node".as_ref(),
                "2".as_ref(),
                "--".as_ref(),
                hytrain.as_os_str(),
                "train".as_ref(),
                "--model".as_ref(),
                "mlp".as_ref(),
                "--data".as_ref(),
                digits.as_os_str(),
                "--epochs".as_ref(),
                "15".as_ref(),
                "--batch-size".as_ref(),
                "32".as_ref(),
                "--lr".as_ref(),
                "0.1".as_ref(),
                "--momentum".as_ref(),
                "0.9".as_ref(),
                "--log-interval".as_ref(),
                "50".as_ref(),
                "--no-resume".as_ref(),
                "--model-dir".as_ref(),
                &model,
                "--checkpoint-dir".as_ref(),
                &checkpoints,
                "--output-dir".as_ref(),
                &output,
            ]),
        },
    ]
}

/// The validation accuracy of the last evaluation in a run's `metrics.jsonl`.
fn last_accuracy(metrics: &Path) -> Result<f64> {
    let text = fs::read_to_string(metrics).with_context(|| format!("cannot read {}", metrics.display()))?;
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|record| record["val_accuracy"].as_f64())
        .next_back()
        .with_context(|| format!("{} holds no val_accuracy record", metrics.display()))
}

fn demo() -> Result<u8> {
    let started = Instant::now();
    let root = root();
    setup::libtorch(&root)?;
    let digits = demo_data::digits(&root)?;
    println!("demo: building hytrain");
    let hytrain = build_binary(&root, "hytrain")?;
    let run = root.join(DEMO_RUN);
    let steps = demo_steps(&hytrain, &digits, &run);
    for (i, step) in steps.iter().enumerate() {
        let mut command = Command::new(&hytrain);
        command.args(&step.args).current_dir(&root).env("OMP_NUM_THREADS", "1");
        println!("\ndemo: [{}/{}] {}\ndemo: $ {}", i + 1, steps.len(), step.title, show(&command));
        let code = status_code(&mut command)?;
        if code != 0 {
            eprintln!("demo: step {} ({}) failed with exit code {code}", i + 1, step.title);
            return Ok(code);
        }
    }
    let accuracy = last_accuracy(&run.join("output/metrics.jsonl"))?;
    if accuracy < DEMO_ACCURACY {
        eprintln!("demo: test accuracy {accuracy:.4} is below the promised {DEMO_ACCURACY}");
        return Ok(1);
    }
    println!(
        "\ndemo: test accuracy {accuracy:.4} (promised >= {DEMO_ACCURACY}); model in {}\ndemo: all {} steps passed in {}",
        run.join("model").display(),
        steps.len(),
        elapsed(started)
    );
    Ok(0)
}

fn build_binary(root: &Path, name: &str) -> Result<PathBuf> {
    let built = build(root, &["--bin", name])?;
    built
        .into_iter()
        .find_map(|(target, exe)| (target == name).then_some(exe))
        .with_context(|| format!("cargo built no `{name}` executable"))
}

/// `cargo build ARGS`; returns (target name, executable) of every executable it built.
fn build(root: &Path, args: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let mut command = cargo(root);
    command.arg("build").args(args).arg("--message-format=json-render-diagnostics");
    command.stderr(std::process::Stdio::inherit());
    let output = command.output().context("cannot run cargo")?;
    if !output.status.success() {
        bail!("`cargo build {}` failed (errors above)", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter_map(|m| {
            let exe = m["executable"].as_str()?;
            Some((m["target"]["name"].as_str()?.to_string(), PathBuf::from(exe)))
        })
        .collect())
}

/// The comparisons `cargo xtask bench` runs, in order.
const BENCH_PARTS: &[&str] = &["allreduce", "step", "s3", "launch", "checkpoint", "zero", "recovery"];

/// Splits `--only a,b` off the bench's arguments; the rest go to criterion.
fn bench_parts(args: &[OsString]) -> Result<(Vec<&'static str>, Vec<OsString>)> {
    let mut parts: Vec<&'static str> = BENCH_PARTS.to_vec();
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--only" {
            let list = it.next().and_then(|l| l.to_str()).context("--only needs a list such as allreduce,launch")?;
            parts =
                list.split(',')
                    .map(|p| {
                        BENCH_PARTS.iter().find(|known| **known == p.trim()).copied().with_context(|| {
                            format!("unknown bench part '{p}'; the parts are {}", BENCH_PARTS.join(", "))
                        })
                    })
                    .collect::<Result<_>>()?;
        } else {
            rest.push(a.clone());
        }
    }
    Ok((parts, rest))
}

fn bench(args: &[OsString]) -> Result<u8> {
    let started = Instant::now();
    let root = root();
    let (parts, criterion_args) = bench_parts(args)?;
    gloo_peer(&root)?;
    setup::libtorch(&root)?;
    let python = venv::bench_venv(&root)?;
    // Every part appends its comparisons here; the table at the end is read back from it.
    let summary_file = env::temp_dir().join(format!("hytrain-bench-{}.jsonl", std::process::id()));
    let _ = fs::remove_file(&summary_file);
    let mut missing = Vec::new();
    let mut code = 0u8;
    for part in &parts {
        let outcome = match *part {
            "allreduce" => {
                let mut command = cargo(&root);
                command
                    .args(["bench", "--bench", "allreduce"])
                    .args(&criterion_args)
                    .env("HYTRAIN_BENCH_PYTHON", &python)
                    .env("HYTRAIN_BENCH_SUMMARY", &summary_file);
                println!("bench: {}", show(&command));
                // The bench runs the gloo peer with HYTRAIN_BENCH_PYTHON itself, in the same run.
                status_code(&mut command)
            }
            "step" => {
                // Training step time of LeNet and ResNet-18 beside PyTorch DDP on gloo (benches/ddp_step.py), and of
                // torchvision's ResNet-18 exported with python/hytrain_export beside DDP eager and torch.compile'd
                // (the bench exports it with this python, through python/tests/cached_export.py).
                let mut command = cargo(&root);
                command
                    .args(["bench", "--bench", "step_time"])
                    .env("HYTRAIN_BENCH_PYTHON", &python)
                    .env("HYTRAIN_BENCH_SUMMARY", &summary_file);
                println!("bench: {}", show(&command));
                status_code(&mut command)
            }
            "s3" => s3_read(&root, &python, &summary_file).map(|()| 0),
            "checkpoint" => checkpoint(&root, &python, &summary_file).map(|()| 0),
            "zero" => zero_bench::zero(&root, &python, &summary_file).map(|()| 0),
            "recovery" => release_hytrain(&root)
                .and_then(|hytrain| recovery::recovery(&root, &python, &hytrain, &summary_file))
                .map(|()| 0),
            _ => launch_to_first_step(&root, &python, &summary_file).map(|()| 0),
        };
        match outcome {
            Ok(0) => {}
            Ok(c) => {
                missing.push(format!("{part}: exited with code {c} (output above)"));
                code = c;
            }
            Err(e) => {
                missing.push(format!("{part}: {e:#}"));
                code = 1;
            }
        }
    }
    let rows = summary::read(&summary_file)?;
    let _ = fs::remove_file(&summary_file);
    println!(
        "\nbench: every comparison of this run ({} cores; ratios are hytrain / peer, both measured in this run)\n{}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        summary::table(&rows, &missing)?
    );
    println!("bench: finished in {} (exit code {code})", elapsed(started));
    Ok(code)
}

/// Appends one comparison to the bench's summary file.
fn summarize(file: &Path, row: serde_json::Value) -> Result<()> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .with_context(|| format!("cannot open {}", file.display()))?;
    writeln!(f, "{row}").with_context(|| format!("cannot write {}", file.display()))
}

/// Installs the S3 peers (boto3 and s3torchconnector) into the bench venv if missing.
fn s3_peers(python: &Path) -> Result<()> {
    let has_peers = || {
        Command::new(python)
            // s3torchconnector.dcp needs the `dcp` extra (tenacity), for the checkpoint bench's DCP peer.
            .args(["-c", "import boto3, s3torchconnector, s3torchconnector.dcp"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_peers() {
        println!("bench: installing boto3 and s3torchconnector into {}", venv::BENCH_VENV);
        // torch stays the pinned one: s3torchconnector would otherwise pull the newest.
        run(Command::new(python).args([
            "-m",
            "pip",
            "install",
            "--no-cache-dir",
            "boto3",
            "s3torchconnector[dcp]",
            &format!("torch=={}", wheel::TORCH_VERSION),
        ]))?;
    }
    Ok(())
}

/// S3 read throughput of hytrain's S3 source beside s3torchconnector and boto3, all against the same local s3s-fs
/// server (crates/hytrain-data/benches/s3_read.py).
fn s3_read(root: &Path, python: &Path, summary_file: &Path) -> Result<()> {
    s3_peers(python)?;
    let built = build(root, &["--release", "-p", "hytrain-data", "--examples"])?;
    let examples = built
        .iter()
        .find(|(name, _)| name == "s3_server")
        .and_then(|(_, exe)| exe.parent().map(Path::to_path_buf))
        .context("cargo built no s3_server example")?;
    let json = env::temp_dir().join(format!("hytrain-s3-bench-{}.json", std::process::id()));
    let runs = env::var("HYTRAIN_S3_BENCH_RUNS").unwrap_or_else(|_| "3".into());
    let mut command = Command::new(python);
    command
        .arg(root.join("crates/hytrain-data/benches/s3_read.py"))
        .arg("--examples")
        .arg(&examples)
        .args(["--runs", &runs, "--json"])
        .arg(&json);
    println!("bench: {}", show(&command));
    run(&mut command)?;
    let text = fs::read_to_string(&json).with_context(|| format!("cannot read {}", json.display()))?;
    let _ = fs::remove_file(&json);
    let v: serde_json::Value = serde_json::from_str(&text).context("s3_read.py wrote bad JSON")?;
    let mb = |reader: &str| {
        v["results"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["reader"] == reader))
            .and_then(|r| r["mb_per_s"].as_f64())
    };
    let ours = mb("hytrain S3").context("s3_read.py measured no 'hytrain S3' row")?;
    let shards = v["shards"].as_u64().unwrap_or(0);
    for (peer, target) in [("s3torchconnector", ">=1"), ("boto3, 8 threads", "")] {
        // Without the high-level package the script measures the connector's client directly.
        let theirs = mb(peer)
            .or_else(|| (peer == "s3torchconnector").then(|| mb("s3torchconnectorclient")).flatten())
            .with_context(|| format!("s3_read.py measured no '{peer}'"))?;
        summarize(
            summary_file,
            serde_json::json!({
                "comparison": format!("S3 read, {shards} shards from local s3s-fs"), "unit": "MB/s",
                "higher_is_better": true, "hytrain": ours, "peer_name": peer, "peer": theirs, "target": target,
            }),
        )?;
    }
    Ok(())
}

/// Checkpoints of one 512 MiB state dict to the same local s3s-fs server: hytrain's `CheckpointStore::s3` save and
/// load beside s3torchconnector's `S3Checkpoint` and DCP with its `S3StorageWriter`/`S3StorageReader`, and the
/// caller's stall under `AsyncCheckpointer` against a synchronous save (crates/hytrain-train/benches/checkpoint.py).
fn checkpoint(root: &Path, python: &Path, summary_file: &Path) -> Result<()> {
    s3_peers(python)?;
    let mut examples = Vec::new();
    for (package, example) in [("hytrain-data", "s3_server"), ("hytrain-train", "checkpoint_bench")] {
        let built = build(root, &["--release", "-p", package, "--example", example])?;
        let exe = built
            .into_iter()
            .find_map(|(name, exe)| (name == example).then_some(exe))
            .with_context(|| format!("cargo built no {example} example"))?;
        examples.push(exe);
    }
    // Both land in the same profile's examples folder, where the script looks for them.
    let folder = examples[0].parent().context("an example has no folder")?;
    let json = env::temp_dir().join(format!("hytrain-checkpoint-bench-{}.json", std::process::id()));
    let runs = env::var("HYTRAIN_CHECKPOINT_BENCH_RUNS").unwrap_or_else(|_| "3".into());
    let mut command = Command::new(python);
    command
        .arg(root.join("crates/hytrain-train/benches/checkpoint.py"))
        .arg("--examples")
        .arg(folder)
        .args(["--runs", &runs, "--json"])
        .arg(&json);
    println!("bench: {}", show(&command));
    run(&mut command)?;
    let text = fs::read_to_string(&json).with_context(|| format!("cannot read {}", json.display()))?;
    let _ = fs::remove_file(&json);
    let v: serde_json::Value = serde_json::from_str(&text).context("checkpoint.py wrote bad JSON")?;
    for row in checkpoint_rows(&v)? {
        summarize(summary_file, row)?;
    }
    Ok(())
}

/// The summary rows of checkpoint.py's JSON: save and load MB/s against each peer (issue 16: at least 2x
/// s3torchconnector's `S3Checkpoint`), and the stall of a background save over a synchronous one (at most 0.1x).
fn checkpoint_rows(v: &serde_json::Value) -> Result<Vec<serde_json::Value>> {
    let mib = v["bytes"].as_f64().context("checkpoint.py wrote no 'bytes'")? / (1u64 << 20) as f64;
    let figure = |side: &str, key: &str| {
        v["results"][side][key].as_f64().with_context(|| format!("checkpoint.py measured no '{key}' for '{side}'"))
    };
    let mut rows = Vec::new();
    for (op, way) in [("save", "to"), ("load", "from")] {
        let key = format!("{op}_mb_per_s");
        let ours = figure("hytrain", &key)?;
        for (peer, target) in [("s3torchconnector S3Checkpoint", ">=2"), ("DCP + S3StorageWriter/Reader", "")] {
            rows.push(serde_json::json!({
                "comparison": format!("checkpoint {op} {way} S3, {mib:.0} MiB state dict (local s3s-fs)"),
                "unit": "MB/s", "higher_is_better": true, "hytrain": ours, "peer_name": peer,
                "peer": figure(peer, &key)?, "target": target,
            }));
        }
    }
    for (store, title) in [("s3", "S3"), ("dir", "a folder")] {
        let stall = |key: &str| {
            v["stall"][store][key]
                .as_f64()
                .with_context(|| format!("checkpoint.py measured no stall '{key}' for '{store}'"))
        };
        rows.push(serde_json::json!({
            "comparison": format!("checkpoint stall to {title}, {mib:.0} MiB: background save (host copy)"),
            "unit": "s", "higher_is_better": false, "hytrain": stall("held_seconds")?,
            "peer_name": "hytrain synchronous save", "peer": stall("save_seconds")?, "target": "<=0.1",
        }));
    }
    Ok(rows)
}

/// Wall time from starting the launcher to the first completed training step: `hytrain launch` with 2 workers
/// training the digits MLP beside `torchrun --standalone` with 2 workers running the PyTorch DDP equivalent
/// (benches/first_step.py); median of several alternating rounds after one warm-up round each.
fn launch_to_first_step(root: &Path, python: &Path, summary_file: &Path) -> Result<()> {
    let digits = demo_data::digits(root)?;
    let hytrain = release_hytrain(root)?;
    let torchrun = python.with_file_name("torchrun");
    let script = root.join("benches/first_step.py");
    let rounds: usize = env::var("HYTRAIN_FIRST_STEP_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(5).max(1);
    let limit = std::time::Duration::from_secs(300);
    let scratch = env::temp_dir().join(format!("hytrain-first-step-{}", std::process::id()));
    let ours = |round: usize| {
        let out = scratch.join(format!("run-{round}"));
        let under = |name: &str| out.join(name).into_os_string();
        let mut c = Command::new(&hytrain);
        c.args(["launch", "--nproc-per-node", "2", "--"])
            .arg(&hytrain)
            .args(["train", "--model", "mlp", "--data"])
            .arg(&digits)
            .args(["--max-steps", "1", "--log-interval", "1", "--batch-size", "32"])
            .args(["--lr", "0.01", "--momentum", "0.5", "--no-resume", "--model-dir"])
            .arg(under("model"))
            .arg("--checkpoint-dir")
            .arg(under("checkpoints"))
            .arg("--output-dir")
            .arg(under("output"))
            .env("OMP_NUM_THREADS", "1")
            .current_dir(root);
        c
    };
    let theirs = || {
        let mut c = Command::new(&torchrun);
        c.args(["--standalone", "--nproc-per-node", "2"])
            .arg(&script)
            .arg("--data")
            .arg(&digits)
            .env("OMP_NUM_THREADS", "1")
            .current_dir(root);
        c
    };
    println!(
        "bench: launch to first step, 1 warm-up + {rounds} rounds each, alternating:\n  {}\n  {}",
        show(&ours(0)),
        show(&theirs())
    );
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for round in 0..=rounds {
        // Rounds alternate which side goes first, so a load that rises or falls favours neither.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut pair = [0.0f64; 2];
        for side in order {
            let t = if side == 0 {
                first_step::time_to_marker(&mut ours(round), first_step::MARKER, limit)
            } else {
                first_step::time_to_marker(&mut theirs(), first_step::MARKER, limit)
            };
            pair[side] = t?.as_secs_f64();
        }
        let _ = fs::remove_dir_all(&scratch);
        if round == 0 {
            println!("bench:   warm-up: hytrain {:.2} s, torchrun {:.2} s", pair[0], pair[1]);
            continue;
        }
        println!("bench:   round {round}: hytrain {:.2} s, torchrun {:.2} s", pair[0], pair[1]);
        a.push(pair[0]);
        b.push(pair[1]);
    }
    let (ours_s, theirs_s) = (first_step::median(&a), first_step::median(&b));
    println!(
        "bench: launch to first step, median of {rounds}: hytrain {ours_s:.2} s, torchrun {theirs_s:.2} s ({:.2}x)",
        ours_s / theirs_s
    );
    summarize(
        summary_file,
        serde_json::json!({
            "comparison": "launch to first step, 2 processes (digits MLP)", "unit": "s",
            "higher_is_better": false, "hytrain": ours_s, "peer_name": "torchrun + PyTorch DDP",
            "peer": theirs_s, "target": "<=0.5",
        }),
    )
}

/// Builds the `hytrain` binary in release mode and returns its path.
fn release_hytrain(root: &Path) -> Result<PathBuf> {
    println!("bench: building hytrain (release)");
    build(root, &["--release", "--bin", "hytrain"])?
        .into_iter()
        .find_map(|(name, exe)| (name == "hytrain").then_some(exe))
        .context("cargo built no hytrain executable")
}

fn scale_sim(args: &[OsString]) -> Result<u8> {
    let (given, extra) = scale_sim_args(args)?;
    let hytrain = match given {
        Some(path) => path,
        None => {
            let root = root();
            setup::libtorch(&root)?;
            release_hytrain(&root)?
        }
    };
    scale_sim::scale_sim(&hytrain, &extra)
}

/// `[--hytrain PATH] [-- TRAIN ARGS]`.
fn scale_sim_args(args: &[OsString]) -> Result<(Option<PathBuf>, Vec<String>)> {
    let mut hytrain = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--hytrain" {
            let path = PathBuf::from(it.next().context("--hytrain needs the path of a hytrain binary")?);
            if !path.is_file() {
                bail!("--hytrain {}: no such file", path.display());
            }
            hytrain = Some(path);
        } else if a == "--" {
            return Ok((hytrain, it.map(|a| a.to_string_lossy().into_owned()).collect()));
        } else {
            bail!("scale-sim takes [--hytrain PATH] [-- TRAIN ARGS], not `{}`", a.to_string_lossy());
        }
    }
    Ok((hytrain, Vec::new()))
}

/// The Python script that measures PyTorch's gloo allreduce beside hytrain's.
fn gloo_peer(root: &Path) -> Result<PathBuf> {
    let peer = root.join("benches/gloo_allreduce.py");
    if !peer.is_file() {
        bail!("{} is missing; it is the gloo peer the allreduce bench compares against", peer.display());
    }
    Ok(peer)
}

/// Runs a command to completion with inherited output; a non-zero exit is an error naming the command.
pub(crate) fn run(command: &mut Command) -> Result<()> {
    match status_code(command)? {
        0 => Ok(()),
        code => bail!("`{}` exited with code {code}", show(command)),
    }
}

/// Runs a command and returns its exit code (a death by signal counts as 128 + the signal, as shells report it).
fn status_code(command: &mut Command) -> Result<u8> {
    let status = command.status().with_context(|| {
        format!("cannot run `{}`: is {} installed?", show(command), command.get_program().to_string_lossy())
    })?;
    if let Some(code) = status.code() {
        return Ok(u8::try_from(code).unwrap_or(1));
    }
    use std::os::unix::process::ExitStatusExt;
    Ok(status.signal().map_or(1, |s| 128u8.saturating_add(s as u8)))
}

/// Whether a program can be run: a path that exists, or a name found on PATH.
pub(crate) fn on_path(program: impl AsRef<OsStr>) -> bool {
    let program = Path::new(program.as_ref());
    if program.components().count() > 1 {
        return program.is_file();
    }
    env::var_os("PATH").is_some_and(|path| env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn show(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn elapsed(started: Instant) -> String {
    let seconds = started.elapsed().as_secs();
    format!("{}m {:02}s", seconds / 60, seconds % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_runs_explain_then_trains_two_local_workers_on_the_digits() {
        let steps = demo_steps(Path::new("/t/hytrain"), Path::new("/d/digits"), Path::new("/r"));
        let lines: Vec<String> =
            steps.iter().map(|s| s.args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")).collect();
        assert_eq!(
            lines,
            [
                "explain",
                "launch --nproc-per-node 2 -- /t/hytrain train --model mlp --data /d/digits --epochs 15 \
                 --batch-size 32 --lr 0.1 --momentum 0.9 --log-interval 50 --no-resume --model-dir /r/model \
                 --checkpoint-dir /r/checkpoints --output-dir /r/output"
            ]
        );
    }

    #[test]
    fn the_demo_reads_the_last_validation_accuracy_and_refuses_a_file_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.jsonl");
        fs::write(
            &metrics,
            "{\"epoch\":1,\"val_accuracy\":0.5}\n{\"step\":3,\"train_loss\":0.1}\n{\"epoch\":2,\"val_accuracy\":0.97}\n",
        )
        .unwrap();
        assert_eq!(last_accuracy(&metrics).unwrap(), 0.97);
        fs::write(&metrics, "{\"step\":3,\"train_loss\":0.1}\n").unwrap();
        assert!(last_accuracy(&metrics).unwrap_err().to_string().contains("no val_accuracy"));
        assert!(last_accuracy(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_failing_command_reports_its_exit_code() {
        assert_eq!(status_code(Command::new("sh").args(["-c", "exit 3"])).unwrap(), 3);
        let error = format!("{:#}", run(Command::new("sh").args(["-c", "exit 3"])).unwrap_err());
        assert!(error.contains("`sh -c exit 3` exited with code 3"), "{error}");
    }

    #[test]
    fn a_missing_program_is_named_in_the_error() {
        let error = format!("{:#}", run(&mut Command::new("hytrain-no-such-program")).unwrap_err());
        assert!(error.contains("is hytrain-no-such-program installed?"), "{error}");
    }

    #[test]
    fn bench_without_its_gloo_peer_script_says_which_file_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let error = format!("{:#}", gloo_peer(dir.path()).unwrap_err());
        assert!(error.contains("benches/gloo_allreduce.py is missing"), "{error}");
        std::fs::create_dir(dir.path().join("benches")).unwrap();
        std::fs::write(dir.path().join("benches/gloo_allreduce.py"), "").unwrap();
        assert_eq!(gloo_peer(dir.path()).unwrap(), dir.path().join("benches/gloo_allreduce.py"));
    }

    #[test]
    fn bench_parts_are_picked_by_name_and_the_rest_goes_to_criterion() {
        let args: Vec<OsString> =
            ["--only", "launch,allreduce,checkpoint", "--warm-up-time", "1"].iter().map(OsString::from).collect();
        let (parts, rest) = bench_parts(&args).unwrap();
        assert_eq!(parts, ["launch", "allreduce", "checkpoint"]);
        assert_eq!(rest, ["--warm-up-time", "1"]);
        let (all, _) = bench_parts(&[]).unwrap();
        assert_eq!(all, BENCH_PARTS);
        let e = bench_parts(&[OsString::from("--only"), OsString::from("gpu")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown bench part 'gpu'; the parts are allreduce, step, s3, launch, checkpoint, zero, recovery"
        );
    }

    #[test]
    fn checkpoint_rows_compare_save_and_load_with_each_peer_and_the_stall_with_a_synchronous_save() {
        let v = serde_json::json!({
            "bytes": 536870912u64,
            "results": {
                "hytrain": {"save_mb_per_s": 400.0, "load_mb_per_s": 500.0},
                "s3torchconnector S3Checkpoint": {"save_mb_per_s": 100.0, "load_mb_per_s": 250.0},
                "DCP + S3StorageWriter/Reader": {"save_mb_per_s": 200.0, "load_mb_per_s": 125.0},
            },
            "stall": {
                "s3": {"save_seconds": 2.0, "held_seconds": 0.1},
                "dir": {"save_seconds": 1.0, "held_seconds": 0.1},
            },
        });
        let rows = checkpoint_rows(&v).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("summary.jsonl");
        for row in &rows {
            summarize(&file, row.clone()).unwrap();
        }
        let read = summary::read(&file).unwrap();
        let got: Vec<(String, &str, f64, String)> =
            read.iter().map(|r| (r.peer_name.clone(), r.unit.as_str(), r.ratio(), r.target.clone())).collect();
        let want = [
            ("s3torchconnector S3Checkpoint", "MB/s", 4.0, ">=2"),
            ("DCP + S3StorageWriter/Reader", "MB/s", 2.0, ""),
            ("s3torchconnector S3Checkpoint", "MB/s", 2.0, ">=2"),
            ("DCP + S3StorageWriter/Reader", "MB/s", 4.0, ""),
            ("hytrain synchronous save", "s", 0.05, "<=0.1"),
            ("hytrain synchronous save", "s", 0.1, "<=0.1"),
        ];
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert_eq!((g.0.as_str(), g.1, g.3.as_str()), (w.0, w.1, w.3));
            assert!((g.2 - w.2).abs() < 1e-12, "{g:?} against {w:?}");
        }
        assert!(read[0].comparison.starts_with("checkpoint save to S3, 512 MiB"));
        assert!(read[2].comparison.starts_with("checkpoint load from S3, 512 MiB"));
        assert!(read[4].comparison.contains("stall to S3"));
        assert!(!read[4].higher_is_better);
        let e = checkpoint_rows(&serde_json::json!({"bytes": 1, "results": {}})).unwrap_err();
        assert_eq!(e.to_string(), "checkpoint.py measured no 'save_mb_per_s' for 'hytrain'");
    }

    #[test]
    fn scale_sim_takes_a_binary_and_train_args_and_refuses_anything_else() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let (bin, extra) = scale_sim_args(&os(&["--hytrain", "/bin/sh", "--", "--bucket-mb", "5"])).unwrap();
        assert_eq!(bin, Some(PathBuf::from("/bin/sh")));
        assert_eq!(extra, ["--bucket-mb", "5"]);
        assert_eq!(scale_sim_args(&[]).unwrap(), (None, vec![]));
        let e = scale_sim_args(&os(&["--nodes", "8"])).unwrap_err().to_string();
        assert!(e.contains("not `--nodes`"), "{e}");
        let e = scale_sim_args(&os(&["--hytrain", "/nonexistent/hytrain"])).unwrap_err().to_string();
        assert!(e.contains("no such file"), "{e}");
    }

    #[test]
    fn programs_are_found_on_path_or_by_path() {
        assert!(on_path("sh"));
        assert!(on_path("/bin/sh"));
        assert!(!on_path("hytrain-no-such-program"));
        assert!(!on_path("/nonexistent/sh"));
    }
}
