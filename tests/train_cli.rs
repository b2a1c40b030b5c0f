//! `hytrain train` as users run it: real worker processes under `hytrain launch`, real data through the data plane
//! (the handwritten digits `cargo xtask test` packs into shards), real checkpoints on disk.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{command, wait};
use tch::Tensor;

/// The digits shards `cargo xtask test` writes (and names in HYTRAIN_DEMO_DATA).
fn digits() -> PathBuf {
    let path = std::env::var_os("HYTRAIN_DEMO_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/demo/digits"));
    assert!(
        path.join("train").is_dir() && path.join("test").is_dir(),
        "{} holds no digits shards: run the tests through `cargo xtask test`, which packs them",
        path.display()
    );
    path
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "hytrain failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(out),
        stderr(out)
    );
    // A job whose ranks all finish lost none, whatever its size (a single rank once reported itself lost as its
    // store connection closed at exit).
    assert!(
        !stderr(out).contains("lost rank"),
        "a successful job reported a lost rank:\n{}",
        stderr(out)
    );
}

/// `hytrain launch --nproc-per-node N -- hytrain train ARGS` in `dir`, with the environment of a laptop.
fn launch_train(dir: &Path, nproc: usize, args: &[&str]) -> Command {
    let mut all: Vec<String> = [
        "launch",
        "--nproc-per-node",
        &nproc.to_string(),
        "--",
        common::hytrain(),
        "train",
    ]
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

fn summary_value(out: &str, key: &str) -> f64 {
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with("steps="))
        .unwrap_or_else(|| panic!("no summary in:\n{out}"));
    let field = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {line}"));
    field
        .parse()
        .unwrap_or_else(|_| panic!("{key}={field} is not a number"))
}

fn weights(model_dir: &Path) -> Vec<(String, Tensor)> {
    let mut w = Tensor::read_safetensors(model_dir.join("model.safetensors")).unwrap();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

const DIGITS_JOB: &[&str] = &[
    "--model",
    "mlp",
    "--batch-size",
    "32",
    "--lr",
    "0.1",
    "--momentum",
    "0.9",
    "--seed",
    "3",
];

/// The digits job with `extra` flags as `hytrain launch --nproc-per-node N -- hytrain train ...` in `dir`.
fn digits_job(dir: &Path, nproc: usize, extra: &[&str]) -> Command {
    let data = digits();
    let mut args = DIGITS_JOB.to_vec();
    args.extend(["--data", data.to_str().unwrap()]);
    args.extend(extra);
    launch_train(dir, nproc, &args)
}

/// Runs a job to its end (or fails the test after 300 s).
fn finish(mut job: Command, what: &str) -> Output {
    wait(job.spawn().unwrap(), Duration::from_secs(300), what)
}

#[test]
fn two_workers_learn_the_digits_and_export_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = finish(
        digits_job(dir.path(), 2, &["--epochs", "15", "--log-interval", "20"]),
        "training",
    );
    assert_ok(&out);
    let text = stdout(&out);
    let accuracy = summary_value(&text, "val_accuracy");
    assert!(
        accuracy >= 0.93,
        "validation accuracy {accuracy} below 0.93:\n{text}"
    );
    assert!(
        text.contains("on 359 samples") || text.contains("on 360 samples"),
        "every test sample counted once:\n{text}"
    );
    let model = dir.path().join("hytrain-out/model");
    assert!(model.join("model.safetensors").is_file() && model.join("metadata.json").is_file());
    assert!(
        text.contains(&format!("model written to {}", "hytrain-out/model")),
        "{text}"
    );
    let metrics =
        std::fs::read_to_string(dir.path().join("hytrain-out/output/data/metrics.jsonl")).unwrap();
    assert!(
        metrics.lines().any(|l| l.contains("\"val_accuracy\"")),
        "{metrics}"
    );
}

#[test]
fn validation_counts_each_test_sample_once_with_three_ranks_whatever_caps_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = digits();
    // --max-samples caps the training epoch only (it once capped validation too).
    let out = finish(
        digits_job(
            dir.path(),
            3,
            &["--max-steps", "3", "--test-batch-size", "50", "--max-samples", "150"],
        ),
        "training",
    );
    assert_ok(&out);
    let test_samples = std::fs::read_dir(data.join("test"))
        .unwrap()
        .map(|e| {
            let f = std::fs::File::open(e.unwrap().path()).unwrap();
            tar::Archive::new(f)
                .entries()
                .unwrap()
                .filter(|m| {
                    m.as_ref()
                        .unwrap()
                        .path()
                        .unwrap()
                        .extension()
                        .is_some_and(|x| x == "cls")
                })
                .count()
        })
        .sum::<usize>();
    assert!(
        stdout(&out).contains(&format!("on {test_samples} samples")),
        "{}",
        stdout(&out)
    );
}

/// Kills the whole job (launcher and workers) with SIGKILL once it has written a checkpoint, restarts the same
/// command, and compares the final weights with those of a run that was never interrupted.
#[test]
fn a_job_killed_mid_epoch_and_restarted_ends_with_the_weights_of_an_uninterrupted_run() {
    let job = [
        "--epochs",
        "12",
        "--checkpoint-every",
        "7",
        "--validation",
        "none",
    ];
    let clean = tempfile::tempdir().unwrap();
    assert_ok(&finish(digits_job(clean.path(), 2, &job), "clean run"));

    let killed = tempfile::tempdir().unwrap();
    let checkpoints = killed.path().join("hytrain-out/checkpoints");
    let mut first = digits_job(killed.path(), 2, &job);
    first.process_group(0);
    let mut child = first.spawn().unwrap();
    let started = Instant::now();
    let resume_from = loop {
        if let Ok(Some(found)) = hytrain::train::latest_valid(&checkpoints) {
            if found.checkpoint.meta.step >= 14 {
                break found;
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "no checkpoint after 240 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    // SIGKILL to the launcher's group; its workers die with it (PDEATHSIG) as on a lost node.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    assert!(!child.wait().unwrap().success());
    assert!(
        !killed
            .path()
            .join("hytrain-out/model/model.safetensors")
            .exists(),
        "the killed run finished before the kill; make it longer"
    );
    assert!(resume_from.checkpoint.meta.step > 0);

    let out = finish(digits_job(killed.path(), 2, &job), "restart");
    assert_ok(&out);
    assert!(
        stderr(&out).contains("resuming from checkpoint"),
        "the restart did not resume:\n{}",
        stderr(&out)
    );
    let (a, b) = (
        weights(&clean.path().join("hytrain-out/model")),
        weights(&killed.path().join("hytrain-out/model")),
    );
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let diff = (x - y).abs().max().double_value(&[]);
        assert!(
            diff <= 1e-6,
            "{name} differs by {diff} after kill and resume"
        );
    }
}

#[test]
fn sigterm_checkpoints_and_exits_143_and_the_next_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let child = digits_job(dir.path(), 2, &["--epochs", "200", "--validation", "none"])
        .spawn()
        .unwrap();
    let checkpoints = dir.path().join("hytrain-out/checkpoints");
    std::thread::sleep(Duration::from_secs(3));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = wait(child, Duration::from_secs(120), "stopping run");
    assert_eq!(out.status.code(), Some(143), "stderr:\n{}", stderr(&out));
    let saved = hytrain::train::latest_valid(&checkpoints)
        .unwrap()
        .expect("a checkpoint written on SIGTERM");
    let step = saved.checkpoint.meta.step;
    assert!(step > 0);

    let more = (step + 5).to_string();
    let out = finish(
        digits_job(
            dir.path(),
            2,
            &["--max-steps", &more, "--validation", "none"],
        ),
        "resumed run",
    );
    assert_ok(&out);
    assert!(stdout(&out).contains("(5 this run)"), "{}", stdout(&out));
    assert_eq!(summary_value(&stdout(&out), "steps"), (step + 5) as f64);
}

#[test]
fn an_unknown_hyperparameter_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = digits();
    let out = command(
        &["train", "--model", "mlp", "--data", data.to_str().unwrap()],
        &[("SM_HP_EPOCH", "3".into())],
    )
    .current_dir(dir.path())
    .output()
    .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown setting 'EPOCH' (from SM_HP_EPOCH)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_values_and_missing_data_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = digits();
    let run = |args: &[&str], env: &[(&str, String)]| {
        let out = command(args, env)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        stderr(&out)
    };
    let e = run(
        &["train", "--data", data.to_str().unwrap(), "--lr", "fast"],
        &[],
    );
    assert!(e.contains("lr") && e.contains("'fast'"), "{e}");
    let e = run(
        &["train", "--data", data.to_str().unwrap()],
        &[("HYTRAIN_BATCH_SIZE", "0".into())],
    );
    assert!(e.contains("HYTRAIN_BATCH_SIZE"), "{e}");
    let e = run(&["train"], &[]);
    assert!(
        e.contains("no training data") && e.contains("--data"),
        "{e}"
    );
    let e = run(
        &[
            "train",
            "--data",
            dir.path().join("missing").to_str().unwrap(),
        ],
        &[],
    );
    assert!(e.contains("missing"), "{e}");
    let e = run(
        &[
            "train",
            "--data",
            data.to_str().unwrap(),
            "--model",
            "vgg99",
        ],
        &[],
    );
    assert!(e.contains("vgg99"), "{e}");
    // --backend: the reference's gloo is accepted; a backend this job cannot use is refused, not ignored.
    let data = data.to_str().unwrap();
    let job = |backend: &'static str| {
        ["train", "--data", data, "--model", "mlp", "--max-steps", "1", "--device", "cpu", "--backend", backend]
    };
    let e = run(&job("nccl"), &[]);
    assert!(e.contains("--backend nccl") && e.contains("GPU") && e.contains("--device cpu"), "{e}");
    let e = run(&job("carrier-pigeon"), &[]);
    assert!(e.contains("carrier-pigeon") && e.contains("gloo, tcp, nccl, mpi"), "{e}");
    if !cfg!(feature = "mpi") {
        let e = run(&job("mpi"), &[]);
        assert!(e.contains("--backend mpi") && e.contains("--features mpi"), "{e}");
    }
    // Folders hytrain writes are folders: an s3:// URL must not become a local folder named `s3:`.
    for (flag, var) in [("--checkpoint-dir", "HYTRAIN_CHECKPOINT_DIR"), ("--model-dir", "HYTRAIN_MODEL_DIR")] {
        let e = run(&["train", "--data", data, "--model", "mlp", "--max-steps", "1", flag, "s3://bucket/run1"], &[]);
        assert!(e.contains(&format!("{flag} s3://bucket/run1")) && e.contains("cannot write to S3"), "{e}");
        let e = run(&["train", "--data", data, "--model", "mlp", "--max-steps", "1"], &[(var, "s3://bucket/run1".into())]);
        assert!(e.contains("s3://bucket/run1") && e.contains("cannot write to S3"), "{e}");
    }
    assert!(!dir.path().join("s3:").exists(), "a folder named s3: was written");
}

#[test]
fn a_dataset_without_class_names_needs_num_classes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for entry in std::fs::read_dir(digits().join("train")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "tar") {
            std::fs::copy(&path, data.join(path.file_name().unwrap())).unwrap();
        }
    }
    let out = command(
        &["train", "--model", "mlp", "--data", data.to_str().unwrap()],
        &[],
    )
    .current_dir(dir.path())
    .output()
    .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--num-classes"), "{}", stderr(&out));
    let out = command(
        &[
            "train",
            "--model",
            "mlp",
            "--data",
            data.to_str().unwrap(),
            "--num-classes",
            "10",
            "--max-steps",
            "2",
        ],
        &[],
    )
    .current_dir(dir.path())
    .output()
    .unwrap();
    assert_ok(&out);
}

/// The value of `key` in each metrics line of `out` that has it.
fn metric_values(out: &str, key: &str) -> Vec<f64> {
    out.lines()
        .filter(|l| l.starts_with("epoch="))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        })
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{key}={v} is not a number"))
        })
        .collect()
}

#[test]
fn bf16_and_fp16_training_on_the_digits_lowers_the_loss() {
    for precision in ["bf16", "fp16"] {
        let dir = tempfile::tempdir().unwrap();
        let out = finish(
            digits_job(
                dir.path(),
                1,
                &[
                    "--precision",
                    precision,
                    "--epochs",
                    "2",
                    "--log-interval",
                    "5",
                ],
            ),
            precision,
        );
        assert_ok(&out);
        let text = stdout(&out);
        let losses = metric_values(&text, "train_loss");
        assert!(
            losses.len() >= 4,
            "{precision}: too few metrics lines:\n{text}"
        );
        let (first, last) = (losses[0], losses[losses.len() - 1]);
        assert!(
            last < 0.5 * first,
            "{precision}: train_loss went from {first} to {last}:\n{text}"
        );
        let scales = metric_values(&text, "loss_scale");
        if precision == "fp16" {
            assert_eq!(
                scales.len(),
                losses.len(),
                "every line shows the loss scale:\n{text}"
            );
            assert!(scales.iter().all(|s| *s > 0.0 && s.is_finite()), "{text}");
            assert!(
                text.contains("fp16 loss scale"),
                "the summary shows the scale:\n{text}"
            );
        } else {
            assert!(
                scales.is_empty() && !text.contains("skipped_steps"),
                "{text}"
            );
        }
    }
}

#[test]
fn two_fp16_ranks_skip_overflowing_steps_together_and_still_learn() {
    let dir = tempfile::tempdir().unwrap();
    let data = digits();
    // An initial scale of 2^32 overflows float16 in the first steps for sure (any gradient above 1.5e-5 does);
    // the scale then halves once per skipped step until the scaled gradients fit.
    let job = [
        "--model",
        "mlp",
        "--batch-size",
        "2",
        "--lr",
        "0.02",
        "--momentum",
        "0.9",
        "--seed",
        "3",
        "--epochs",
        "1",
        "--log-interval",
        "30",
        "--precision",
        "fp16",
        "--init-loss-scale",
        "4294967296",
        "--data",
        data.to_str().unwrap(),
    ];
    let out = finish(launch_train(dir.path(), 2, &job), "fp16 training");
    assert_ok(&out);
    let text = stdout(&out);
    let skipped = metric_values(&text, "skipped_steps");
    let scales = metric_values(&text, "loss_scale");
    assert!(
        skipped.last().is_some_and(|&n| n >= 1.0),
        "no step was skipped:\n{text}"
    );
    // Fewer than 2000 steps: the scale never grows, and halves once per skipped step.
    for (n, scale) in skipped.iter().zip(&scales) {
        assert_eq!(*scale, 4294967296.0 / 2f64.powf(*n), "{text}");
    }
    let losses = metric_values(&text, "train_loss");
    assert!(
        losses[losses.len() - 1] < 0.5 * losses[0],
        "the loss did not fall:\n{text}"
    );
    let accuracy = summary_value(&text, "val_accuracy");
    assert!(
        accuracy >= 0.8,
        "validation accuracy {accuracy} below 0.8:\n{text}"
    );
}

#[test]
fn an_unknown_precision_is_a_one_line_error_naming_the_allowed_values() {
    let dir = tempfile::tempdir().unwrap();
    let data = digits();
    for (args, env) in [
        (vec!["--precision", "fp8"], vec![]),
        (vec![], vec![("HYTRAIN_PRECISION", "int8".to_string())]),
    ] {
        let mut all = vec!["train", "--data", data.to_str().unwrap()];
        all.extend(args);
        let out = command(&all, &env)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let e = stderr(&out);
        let line = e
            .lines()
            .find(|l| l.to_ascii_lowercase().contains("precision"))
            .unwrap_or_else(|| panic!("{e}"));
        assert!(
            line.contains("fp32, bf16 or fp16")
                && (line.contains("'fp8'") || line.contains("HYTRAIN_PRECISION")),
            "{e}"
        );
    }
}

/// python/examples/digits_cnn.py exported with `python -m hytrain_export` (once per source change: cached under
/// .cache/exported by python/tests/cached_export.py), with the Python `cargo xtask test` sets up.
fn exported_digits_cnn() -> PathBuf {
    let python = std::env::var_os("HYTRAIN_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/bench-venv/bin/python")
        });
    let out = Command::new(&python)
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/tests/cached_export.py"))
        .arg("digits_cnn")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{} does not start ({e}): run the tests through `cargo xtask test`",
                python.display()
            )
        });
    assert!(
        out.status.success(),
        "exporting digits_cnn failed:\n{}{}",
        stdout(&out),
        stderr(&out)
    );
    PathBuf::from(stdout(&out).trim())
}

#[test]
fn an_exported_pytorch_model_trains_on_two_workers_resumes_and_its_model_folder_trains_on() {
    let dir = tempfile::tempdir().unwrap();
    let exported = exported_digits_cnn();
    let data = digits();
    let job = |extra: &[&str]| {
        let mut args = vec![
            "--model",
            exported.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--batch-size",
            "32",
            "--lr",
            "0.05",
            "--momentum",
            "0.9",
            "--log-interval",
            "10",
        ];
        args.extend(extra);
        launch_train(dir.path(), 2, &args)
    };
    let out = finish(
        job(&["--max-steps", "30", "--validation", "none"]),
        "first run",
    );
    assert_ok(&out);
    assert_eq!(summary_value(&stdout(&out), "steps"), 30.0);
    // A second run resumes from the first's checkpoint and trains on to the end of epoch 4, validating each epoch
    // through the exported forward package.
    let out = finish(job(&["--epochs", "4"]), "resumed run");
    assert_ok(&out);
    let text = stdout(&out);
    let accuracy = summary_value(&text, "val_accuracy");
    assert!(
        accuracy >= 0.9,
        "validation accuracy {accuracy} below 0.9:\n{text}"
    );
    assert!(
        text.contains("on 359 samples") || text.contains("on 360 samples"),
        "every test sample once:\n{text}"
    );
    let losses = metric_values(&text, "train_loss");
    assert!(
        losses.last() < losses.first(),
        "the loss did not fall: {losses:?}"
    );
    let steps = summary_value(&text, "steps") as u64;
    assert!(
        text.contains(&format!("({} this run)", steps - 30)),
        "the second run did not resume at step 30:\n{text}"
    );
    let model = dir.path().join("hytrain-out/model");
    for file in [
        "model.safetensors",
        "metadata.json",
        "forward.pt2",
        "train_step.pt2",
        "hytrain-model.json",
    ] {
        assert!(model.join(file).is_file(), "the model folder has no {file}");
    }
    // The model folder is an exported model with the trained weights: training it again starts from them.
    let out = finish(
        launch_train(
            dir.path(),
            1,
            &[
                "--model",
                model.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--max-steps",
                "1",
                "--lr",
                "0",
                "--checkpoint-dir",
                "none",
                "--model-dir",
                "again",
            ],
        ),
        "training the exported folder",
    );
    assert_ok(&out);
    let (trained, again) = (weights(&model), weights(&dir.path().join("again")));
    assert_eq!(trained.len(), again.len());
    for ((n, a), (_, b)) in trained.iter().zip(&again) {
        // lr 0 leaves the parameters; BatchNorm statistics move with the one step's batch.
        if !n.contains("running") && !n.contains("num_batches") {
            assert!(a.equal(b), "{n} changed in a step with lr 0");
        }
    }
}

#[test]
fn an_exported_model_refuses_data_of_another_shape_and_other_precisions_before_step_1() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("exported-for-cifar");
    std::fs::create_dir(&copy).unwrap();
    for entry in std::fs::read_dir(exported_digits_cnn()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    let meta_path = copy.join("hytrain-model.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta["input"]["shape"] = serde_json::json!([3, 32, 32]);
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    let data = digits();
    let out = finish(
        launch_train(
            dir.path(),
            1,
            &[
                "--model",
                copy.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
            ],
        ),
        "mismatched data",
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("exported for inputs of shape [3, 32, 32] float32, but the data's samples are [1, 8, 8]"),
        "{}",
        stderr(&out)
    );
    let out = finish(
        launch_train(
            dir.path(),
            1,
            &[
                "--model",
                exported_digits_cnn().to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--precision",
                "bf16",
            ],
        ),
        "bf16 on an exported model",
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("train it with --precision fp32"),
        "{}",
        stderr(&out)
    );
    assert!(
        !stderr(&out).contains("step=1 "),
        "it trained before refusing"
    );
}

#[test]
fn a_pipe_channel_with_several_processes_per_host_is_refused_saying_what_works() {
    // One FIFO per pass per host: two readers would split the stream between them.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("training_0");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let spec = format!("pipe:{}", dir.path().join("training").display());
    let mut job = launch_train(dir.path(), 2, &["--data", &spec, "--model", "mlp", "--max-steps", "1"]);
    let out = wait(job.spawn().unwrap(), Duration::from_secs(60), "a Pipe job with 2 processes");
    assert!(!out.status.success(), "it trained");
    let e = stderr(&out);
    assert!(
        e.contains("Pipe") && e.contains("2 processes") && e.contains("FastFile") && e.contains("--nproc-per-node 1"),
        "{e}"
    );
}
