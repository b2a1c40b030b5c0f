//! Project tasks, run as `cargo xtask <task>` (an alias in `.cargo/config.toml`). Plain Rust without libtorch, so it
//! builds on a bare machine and can then fetch libtorch for everything else.
//!
//! ```text
//! cargo xtask setup     # CPU libtorch in .libtorch (from PyPI's torch wheel), Open MPI + libclang for the tests
//! cargo xtask demo      # setup, build hytrain, run the demo job with 2 local workers
//! cargo xtask test      # setup, then the whole test suite (extra arguments go to `cargo test`)
//! cargo xtask bench     # setup, the allreduce and step-time benches, each beside PyTorch on the same machine
//! cargo xtask gpu-check # pack the GPU check (kernels, NCCL, timings beside PyTorch) for a machine with a GPU
//! cargo xtask fuzz      # each fuzz target in fuzz/ for 60 s under cargo-fuzz (installed if missing)
//! ```

mod demo_data;
mod fuzz;
mod gpu_check;
mod requirements;
mod setup;
mod venv;
mod wheel;

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
  test [ARGS]     setup, then `cargo test --workspace --features mpi [ARGS]`
  bench [ARGS]    setup, `cargo bench --bench allreduce [ARGS]` beside PyTorch's gloo (benches/gloo_allreduce.py),
                  then `cargo bench --bench step_time` beside PyTorch DDP (benches/ddp_step.py)
  fuzz [--seconds N] [TARGET...]
                  run each fuzz target (fuzz/fuzz_targets: launcher_env, train_config, store_wire,
                  webdataset_shard, npy, cifar) under cargo-fuzz for N s (default 60), installing cargo-fuzz
                  0.13.2 if missing; prints runs, execs/s, corpus size and crashes; exits 1 on a crash
  gpu-check       build hytrain-gpu-check and pack it with its scripts in target/gpu-check, to run on a GPU
                  machine with PyTorch (kernels against their CPU references, NCCL, timings beside PyTorch)

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
        Some("bench") => bench(&rest),
        Some("gpu-check") if rest.is_empty() => gpu_check::gpu_check(&root()),
        Some("fuzz") => fuzz::fuzz(&root(), &rest),
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
            eprintln!(
                "xtask: {} takes no arguments\n\n{USAGE}",
                task.unwrap().to_string_lossy()
            );
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
    setup::libtorch(&root)?;
    setup::test_tools()?;
    // Parity tests compare hytrain with PyTorch itself, run from this environment.
    let python = venv::bench_venv(&root)?;
    // Tests that train on real data read the demo's digits from here.
    let digits = demo_data::digits(&root)?;
    let mut command = cargo(&root);
    command
        .args(["test", "--workspace", "--features", "mpi", "--no-fail-fast"])
        .args(args)
        .env("HYTRAIN_TEST_PYTHON", &python)
        .env("HYTRAIN_DEMO_DATA", &digits);
    if setup::is_root() {
        // Open MPI refuses to start as root without both of these; containers and CI machines often run as root.
        command
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    }
    println!("test: {}", show(&command));
    let code = status_code(&mut command)?;
    println!("test: finished in {} (exit code {code})", elapsed(started));
    Ok(code)
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
        Step {
            title: "how hytrain understands this job",
            args: args(&["explain".as_ref()]),
        },
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
    let text = fs::read_to_string(metrics)
        .with_context(|| format!("cannot read {}", metrics.display()))?;
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|record| record["val_accuracy"].as_f64())
        .last()
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
        command
            .args(&step.args)
            .current_dir(&root)
            .env("OMP_NUM_THREADS", "1");
        println!(
            "\ndemo: [{}/{}] {}\ndemo: $ {}",
            i + 1,
            steps.len(),
            step.title,
            show(&command)
        );
        let code = status_code(&mut command)?;
        if code != 0 {
            eprintln!(
                "demo: step {} ({}) failed with exit code {code}",
                i + 1,
                step.title
            );
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
    let mut command = cargo(root);
    command.args([
        "build",
        "--bin",
        name,
        "--message-format=json-render-diagnostics",
    ]);
    command.stderr(std::process::Stdio::inherit());
    let output = command.output().context("cannot run cargo")?;
    if !output.status.success() {
        bail!("`cargo build --bin {name}` failed (errors above)");
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo built no `{name}` executable"))
}

fn bench(args: &[OsString]) -> Result<u8> {
    let started = Instant::now();
    let root = root();
    gloo_peer(&root)?;
    setup::libtorch(&root)?;
    let python = venv::bench_venv(&root)?;
    let mut command = cargo(&root);
    command
        .args(["bench", "--bench", "allreduce"])
        .args(args)
        .env("HYTRAIN_BENCH_PYTHON", &python);
    println!("bench: {}", show(&command));
    // The bench itself runs the gloo peer with HYTRAIN_BENCH_PYTHON, in the same run, and prints both side by side.
    let code = status_code(&mut command)?;
    // Training step time of LeNet and ResNet-18 beside PyTorch DDP on gloo (benches/ddp_step.py), also in one run.
    // ARGS are criterion's for the allreduce bench; step_time takes none.
    let mut step_time = cargo(&root);
    step_time
        .args(["bench", "--bench", "step_time"])
        .env("HYTRAIN_BENCH_PYTHON", &python);
    println!("bench: {}", show(&step_time));
    let step_code = status_code(&mut step_time)?;
    let code = if code != 0 { code } else { step_code };
    println!("bench: finished in {} (exit code {code})", elapsed(started));
    Ok(code)
}

/// The Python script that measures PyTorch's gloo allreduce beside hytrain's.
fn gloo_peer(root: &Path) -> Result<PathBuf> {
    let peer = root.join("benches/gloo_allreduce.py");
    if !peer.is_file() {
        bail!(
            "{} is missing; it is the gloo peer the allreduce bench compares against",
            peer.display()
        );
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
        format!(
            "cannot run `{}`: is {} installed?",
            show(command),
            command.get_program().to_string_lossy()
        )
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
    env::var_os("PATH")
        .is_some_and(|path| env::split_paths(&path).any(|dir| dir.join(program).is_file()))
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
        let steps = demo_steps(
            Path::new("/t/hytrain"),
            Path::new("/d/digits"),
            Path::new("/r"),
        );
        let lines: Vec<String> = steps
            .iter()
            .map(|s| {
                s.args
                    .iter()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
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
        assert!(last_accuracy(&metrics)
            .unwrap_err()
            .to_string()
            .contains("no val_accuracy"));
        assert!(last_accuracy(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_failing_command_reports_its_exit_code() {
        assert_eq!(
            status_code(Command::new("sh").args(["-c", "exit 3"])).unwrap(),
            3
        );
        let error = format!(
            "{:#}",
            run(Command::new("sh").args(["-c", "exit 3"])).unwrap_err()
        );
        assert!(
            error.contains("`sh -c exit 3` exited with code 3"),
            "{error}"
        );
    }

    #[test]
    fn a_missing_program_is_named_in_the_error() {
        let error = format!(
            "{:#}",
            run(&mut Command::new("hytrain-no-such-program")).unwrap_err()
        );
        assert!(
            error.contains("is hytrain-no-such-program installed?"),
            "{error}"
        );
    }

    #[test]
    fn bench_without_its_gloo_peer_script_says_which_file_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let error = format!("{:#}", gloo_peer(dir.path()).unwrap_err());
        assert!(
            error.contains("benches/gloo_allreduce.py is missing"),
            "{error}"
        );
        std::fs::create_dir(dir.path().join("benches")).unwrap();
        std::fs::write(dir.path().join("benches/gloo_allreduce.py"), "").unwrap();
        assert_eq!(
            gloo_peer(dir.path()).unwrap(),
            dir.path().join("benches/gloo_allreduce.py")
        );
    }

    #[test]
    fn programs_are_found_on_path_or_by_path() {
        assert!(on_path("sh"));
        assert!(on_path("/bin/sh"));
        assert!(!on_path("hytrain-no-such-program"));
        assert!(!on_path("/nonexistent/sh"));
    }
}
