//! `hytrain train` as users run it: real worker processes under `hytrain launch`, real data through the data plane
//! (the handwritten digits `cargo xtask test` packs into shards), real checkpoints on disk. Exported models have
//! their own file, train_exported.rs; both share the job helpers of jobs/mod.rs.

use crate::common;
use crate::jobs;

use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{command, wait};
use jobs::{assert_ok, digits, finish, launch_train, metric_values, stderr, stdout, summary_value, weights};

const DIGITS_JOB: &[&str] =
    &["--model", "mlp", "--batch-size", "32", "--lr", "0.1", "--momentum", "0.9", "--seed", "3"];

/// The digits job with `extra` flags as `hytrain launch --nproc-per-node N -- hytrain train ...` in `dir`.
fn digits_job(dir: &Path, nproc: usize, extra: &[&str]) -> Command {
    let data = digits();
    let mut args = DIGITS_JOB.to_vec();
    args.extend(["--data", data.to_str().unwrap()]);
    args.extend(extra);
    launch_train(dir, nproc, &args)
}

#[test]
fn two_workers_learn_the_digits_and_export_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = finish(digits_job(dir.path(), 2, &["--epochs", "15", "--log-interval", "20"]), "training");
    assert_ok(&out);
    let text = stdout(&out);
    let accuracy = summary_value(&text, "val_accuracy");
    assert!(accuracy >= 0.93, "validation accuracy {accuracy} below 0.93:\n{text}");
    assert!(
        text.contains("on 359 samples") || text.contains("on 360 samples"),
        "every test sample counted once:\n{text}"
    );
    let model = dir.path().join("hytrain-out/model");
    assert!(model.join("model.safetensors").is_file() && model.join("metadata.json").is_file());
    assert!(text.contains(&format!("model written to {}", "hytrain-out/model")), "{text}");
    let metrics = std::fs::read_to_string(dir.path().join("hytrain-out/output/data/metrics.jsonl")).unwrap();
    assert!(metrics.lines().any(|l| l.contains("\"val_accuracy\"")), "{metrics}");
}

#[test]
fn validation_counts_each_test_sample_once_with_three_ranks_whatever_caps_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = digits();
    // --max-samples caps the training epoch only (it once capped validation too).
    let out = finish(
        digits_job(dir.path(), 3, &["--max-steps", "3", "--test-batch-size", "50", "--max-samples", "150"]),
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
                .filter(|m| m.as_ref().unwrap().path().unwrap().extension().is_some_and(|x| x == "cls"))
                .count()
        })
        .sum::<usize>();
    assert!(stdout(&out).contains(&format!("on {test_samples} samples")), "{}", stdout(&out));
}

/// Kills the whole job (launcher and workers) with SIGKILL once it has written a checkpoint, restarts the same
/// command, and compares the final weights with those of a run that was never interrupted.
#[test]
fn a_job_killed_mid_epoch_and_restarted_ends_with_the_weights_of_an_uninterrupted_run() {
    let job = ["--epochs", "12", "--checkpoint-every", "7", "--validation", "none"];
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
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        assert!(started.elapsed() < Duration::from_secs(240), "no checkpoint after 240 s");
        std::thread::sleep(Duration::from_millis(5));
    };
    // SIGKILL to the launcher's group; its workers die with it (PDEATHSIG) as on a lost node.
    // SAFETY: kill(2) takes plain integers and touches no memory of this process.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    assert!(!child.wait().unwrap().success());
    assert!(
        !killed.path().join("hytrain-out/model/model.safetensors").exists(),
        "the killed run finished before the kill; make it longer"
    );
    assert!(resume_from.checkpoint.meta.step > 0);

    let out = finish(digits_job(killed.path(), 2, &job), "restart");
    assert_ok(&out);
    assert!(stderr(&out).contains("resuming from checkpoint"), "the restart did not resume:\n{}", stderr(&out));
    let (a, b) = (weights(&clean.path().join("hytrain-out/model")), weights(&killed.path().join("hytrain-out/model")));
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let diff = (x - y).abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "{name} differs by {diff} after kill and resume");
    }
}

#[test]
fn sigterm_checkpoints_and_exits_143_and_the_next_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let child = digits_job(dir.path(), 2, &["--epochs", "200", "--validation", "none"]).spawn().unwrap();
    let checkpoints = dir.path().join("hytrain-out/checkpoints");
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: kill(2) takes plain integers and touches no memory of this process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = wait(child, Duration::from_secs(120), "stopping run");
    assert_eq!(out.status.code(), Some(143), "stderr:\n{}", stderr(&out));
    let saved = hytrain::train::latest_valid(&checkpoints).unwrap().expect("a checkpoint written on SIGTERM");
    let step = saved.checkpoint.meta.step;
    assert!(step > 0);
    // Each worker dumped its collectives' flight recorder on the signal; read back, no rank is missing.
    let output = dir.path().join("hytrain-out/output/data");
    let read = command(&["flight-recorder", output.to_str().unwrap()], &[]).output().unwrap();
    let text = String::from_utf8_lossy(&read.stdout);
    assert!(read.status.success(), "{text}{}", stderr(&read));
    for rank in 0..2 {
        assert!(text.contains(&format!("rank {rank} on ")) && text.contains("(SIGTERM received)"), "{text}");
    }
    assert!(!text.contains("no dump"), "{text}");

    let more = (step + 5).to_string();
    let out = finish(digits_job(dir.path(), 2, &["--max-steps", &more, "--validation", "none"]), "resumed run");
    assert_ok(&out);
    assert!(stdout(&out).contains("(5 this run)"), "{}", stdout(&out));
    assert_eq!(summary_value(&stdout(&out), "steps"), (step + 5) as f64);
}

#[test]
fn flight_recorder_diagnoses_dumps_and_refuses_a_folder_without_any() {
    let dir = tempfile::tempdir().unwrap();
    let out = command(&["flight-recorder", dir.path().to_str().unwrap()], &[]).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no flight recorder dumps (rank-N.json)"), "{}", stderr(&out));
    // Rank 0 waits in allreduce #12; rank 1 finished #11 and never called #12.
    let dump = |rank: usize, running: bool| {
        let record = |seq: u64, ended: bool| {
            serde_json::json!({"seq": seq, "kind": "allreduce", "bytes": 1024, "started_ms": 1000,
                "ended_ms": if ended { Some(1200) } else { None }, "error": null})
        };
        let records = if running { vec![record(11, true), record(12, false)] } else { vec![record(11, true)] };
        serde_json::json!({"rank": rank, "world_size": 2, "host": format!("node-{rank}"), "pid": 7,
            "reason": "SIGTERM received", "written_ms": 5000, "calls": if running { 13 } else { 12 }, "records": records})
    };
    let folder = dir.path().join("flight-recorder");
    std::fs::create_dir(&folder).unwrap();
    for (rank, running) in [(0, true), (1, false)] {
        std::fs::write(folder.join(format!("rank-{rank}.json")), dump(rank, running).to_string()).unwrap();
    }
    // The output folder above `flight-recorder/` is accepted too.
    let out = command(&["flight-recorder", dir.path().to_str().unwrap()], &[]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(text.contains("rank 0 on node-0 (SIGTERM received): in #12 allreduce"), "{text}");
    assert!(text.contains("behind: rank 1 has not called collective #12, while rank 0 waits in #12"), "{text}");
    std::fs::write(folder.join("rank-2.json"), "not json").unwrap();
    let out = command(&["flight-recorder", folder.to_str().unwrap()], &[]).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("rank-2.json is not a hytrain flight recorder dump"), "{}", stderr(&out));
}

#[test]
fn an_unknown_hyperparameter_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = digits();
    let out = command(&["train", "--model", "mlp", "--data", data.to_str().unwrap()], &[("SM_HP_EPOCH", "3".into())])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown setting 'EPOCH' (from SM_HP_EPOCH)"), "{}", stderr(&out));
}

#[test]
fn bad_values_and_missing_data_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = digits();
    let run = |args: &[&str], env: &[(&str, String)]| {
        let out = command(args, env).current_dir(dir.path()).stdin(Stdio::null()).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        stderr(&out)
    };
    let e = run(&["train", "--data", data.to_str().unwrap(), "--lr", "fast"], &[]);
    assert!(e.contains("lr") && e.contains("'fast'"), "{e}");
    let e = run(&["train", "--data", data.to_str().unwrap()], &[("HYTRAIN_BATCH_SIZE", "0".into())]);
    assert!(e.contains("HYTRAIN_BATCH_SIZE"), "{e}");
    let e = run(&["train"], &[]);
    assert!(e.contains("no training data") && e.contains("--data"), "{e}");
    let e = run(&["train", "--data", dir.path().join("missing").to_str().unwrap()], &[]);
    assert!(e.contains("missing"), "{e}");
    let e = run(&["train", "--data", data.to_str().unwrap(), "--model", "vgg99"], &[]);
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
    let e = run(&job("mpi"), &[]);
    let why = if cfg!(feature = "mpi") { "started by mpirun" } else { "--features mpi" };
    assert!(e.contains("--backend mpi") && e.contains(why), "{e}");
    // Places hytrain writes are folders or S3: another URL must not become a local folder named `gs:`, and
    // metrics.jsonl is appended to a local file.
    for (flag, var) in [("--checkpoint-dir", "HYTRAIN_CHECKPOINT_DIR"), ("--model-dir", "HYTRAIN_MODEL_DIR")] {
        let e = run(&["train", "--data", data, "--model", "mlp", "--max-steps", "1", flag, "gs://bucket/run1"], &[]);
        assert!(e.contains(&format!("{flag} gs://bucket/run1")) && e.contains("not gs://"), "{e}");
        let e = run(&["train", "--data", data, "--model", "mlp", "--max-steps", "1"], &[(var, "s3:///run1".into())]);
        assert!(e.contains("s3:///run1") && e.contains("no bucket"), "{e}");
    }
    let e =
        run(&["train", "--data", data, "--model", "mlp", "--max-steps", "1", "--output-dir", "s3://bucket/out"], &[]);
    assert!(e.contains("--output-dir s3://bucket/out") && e.contains("metrics.jsonl"), "{e}");
    assert!(
        !dir.path().join("gs:").exists() && !dir.path().join("s3:").exists(),
        "a folder named for a URL was written"
    );
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
    let out = command(&["train", "--model", "mlp", "--data", data.to_str().unwrap()], &[])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--num-classes"), "{}", stderr(&out));
    let out = command(
        &["train", "--model", "mlp", "--data", data.to_str().unwrap(), "--num-classes", "10", "--max-steps", "2"],
        &[],
    )
    .current_dir(dir.path())
    .output()
    .unwrap();
    assert_ok(&out);
}

#[test]
fn bf16_and_fp16_training_on_the_digits_lowers_the_loss() {
    for precision in ["bf16", "fp16"] {
        let dir = tempfile::tempdir().unwrap();
        let out = finish(
            digits_job(dir.path(), 1, &["--precision", precision, "--epochs", "2", "--log-interval", "5"]),
            precision,
        );
        assert_ok(&out);
        let text = stdout(&out);
        let losses = metric_values(&text, "train_loss");
        assert!(losses.len() >= 4, "{precision}: too few metrics lines:\n{text}");
        let (first, last) = (losses[0], losses[losses.len() - 1]);
        assert!(last < 0.5 * first, "{precision}: train_loss went from {first} to {last}:\n{text}");
        let scales = metric_values(&text, "loss_scale");
        if precision == "fp16" {
            assert_eq!(scales.len(), losses.len(), "every line shows the loss scale:\n{text}");
            assert!(scales.iter().all(|s| *s > 0.0 && s.is_finite()), "{text}");
            assert!(text.contains("fp16 loss scale"), "the summary shows the scale:\n{text}");
        } else {
            assert!(scales.is_empty() && !text.contains("skipped_steps"), "{text}");
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
    assert!(skipped.last().is_some_and(|&n| n >= 1.0), "no step was skipped:\n{text}");
    // Fewer than 2000 steps: the scale never grows, and halves once per skipped step.
    for (n, scale) in skipped.iter().zip(&scales) {
        assert_eq!(*scale, 4294967296.0 / 2f64.powf(*n), "{text}");
    }
    let losses = metric_values(&text, "train_loss");
    assert!(losses[losses.len() - 1] < 0.5 * losses[0], "the loss did not fall:\n{text}");
    let accuracy = summary_value(&text, "val_accuracy");
    assert!(accuracy >= 0.8, "validation accuracy {accuracy} below 0.8:\n{text}");
}

#[test]
fn an_unknown_precision_is_a_one_line_error_naming_the_allowed_values() {
    let dir = tempfile::tempdir().unwrap();
    let data = digits();
    for (args, env) in [(vec!["--precision", "fp8"], vec![]), (vec![], vec![("HYTRAIN_PRECISION", "int8".to_string())])]
    {
        let mut all = vec!["train", "--data", data.to_str().unwrap()];
        all.extend(args);
        let out = command(&all, &env).current_dir(dir.path()).output().unwrap();
        assert!(!out.status.success());
        let e = stderr(&out);
        let line = e.lines().find(|l| l.to_ascii_lowercase().contains("precision")).unwrap_or_else(|| panic!("{e}"));
        assert!(
            line.contains("fp32, bf16 or fp16") && (line.contains("'fp8'") || line.contains("HYTRAIN_PRECISION")),
            "{e}"
        );
    }
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

#[test]
fn photos_of_different_sizes_train_resized_and_cropped_and_the_model_records_the_transform() {
    let dir = tempfile::tempdir().unwrap();
    let shards = common::pack_images(&common::photo_folder(dir.path()), dir.path());
    let job = |extra: &[&str]| {
        let mut args =
            vec!["--model", "mlp", "--data", shards.to_str().unwrap(), "--batch-size", "4", "--max-steps", "3"];
        args.extend(extra);
        launch_train(dir.path(), 1, &args)
    };
    let out = finish(
        job(&[
            "--resize",
            "12",
            "--crop",
            "10",
            "--crop-padding",
            "2",
            "--augment",
            "--normalize",
            "0.5,0.4,0.3/0.25,0.2,0.1",
        ]),
        "training on photos",
    );
    assert_ok(&out);
    assert!(stdout(&out).contains("on 8 samples"), "validation read every test photo:\n{}", stdout(&out));
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("hytrain-out/model/metadata.json")).unwrap()).unwrap();
    assert_eq!(meta["input_shape"], serde_json::json!([3, 10, 10]));
    let t = &meta["extra"]["transform"];
    assert_eq!(
        (t["resize"].as_u64(), t["crop"].as_u64(), t["crop_padding"].as_u64()),
        (Some(12), Some(10), Some(2)),
        "{t}"
    );
    assert_eq!(t["train_augment"], serde_json::json!(true), "{t}");
    let close = |key: &str, want: [f64; 3]| {
        let got: Vec<f64> = t[key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert!(got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6), "{key}: {got:?}");
    };
    close("mean", [0.5, 0.4, 0.3]);
    close("std", [0.25, 0.2, 0.1]);
    // Inference repeats it: the recorded torchvision code turns any photo into the model's input.
    let script = r#"
import json, sys
from PIL import Image
from torchvision import transforms
meta = json.load(open(sys.argv[1]))
t = eval(meta["extra"]["transform"]["torchvision"])
print(list(t(Image.new("RGB", (31, 12), (90, 60, 30))).shape))
"#;
    let py = Command::new(jobs::test_python())
        .args(["-c", script])
        .arg(dir.path().join("hytrain-out/model/metadata.json"))
        .output()
        .unwrap();
    assert!(py.status.success(), "the recorded transform does not run in torchvision:\n{}", stderr(&py));
    assert_eq!(stdout(&py).trim(), "[3, 10, 10]");

    // Through the environment as through flags, and refused there with the syntax too.
    let mut bad = job(&["--resize", "12", "--crop", "10"]);
    bad.env("HYTRAIN_NORMALIZE", "mean=0.5");
    let out = finish(bad, "a bad normalization");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("MEAN,MEAN,MEAN/STD,STD,STD") && stderr(&out).contains("'mean=0.5'"),
        "{}",
        stderr(&out)
    );
    let out = finish(job(&["--resize", "12", "--crop-padding", "-1"]), "a negative padding");
    assert!(
        !out.status.success() && stderr(&out).contains("--crop-padding must be a whole number"),
        "{}",
        stderr(&out)
    );
}

/// A digits job reading its training data from a Pipe channel in `dir` for `epochs` epochs: a thread plays
/// SageMaker, delivering the shards concatenated in key order through training_0, training_1, ... Returns the job's
/// output once it ends.
fn pipe_job(dir: &Path, epochs: usize, extra: &[&str]) -> std::process::Output {
    let data = digits();
    let mut shards: Vec<_> = std::fs::read_dir(data.join("train")).unwrap().map(|e| e.unwrap().path()).collect();
    shards.sort();
    let stream: Vec<u8> = shards.iter().flat_map(|s| std::fs::read(s).unwrap()).collect();
    let fifos: Vec<_> = (0..epochs).map(|e| dir.join(format!("training_{e}"))).collect();
    for fifo in &fifos {
        assert!(Command::new("mkfifo").arg(fifo).status().unwrap().success());
    }
    let writer = std::thread::spawn(move || {
        for fifo in fifos {
            // A job that fails stops reading; the rest of the stream has nowhere to go.
            let Ok(mut file) = std::fs::OpenOptions::new().write(true).open(&fifo) else { return };
            if std::io::Write::write_all(&mut file, &stream).is_err() {
                return;
            }
        }
    });
    let spec = format!("pipe:{}", dir.join("training").display());
    let validation = data.join("test");
    let epochs_text = epochs.to_string();
    let mut args = DIGITS_JOB.to_vec();
    args.extend(["--data", &spec, "--validation", validation.to_str().unwrap(), "--epochs", &epochs_text]);
    // A Pipe channel carries shards only: no classes.json comes with them.
    args.extend(["--num-classes", "10"]);
    args.extend(extra);
    let mut job = launch_train(dir, 1, &args);
    let out = wait(job.spawn().unwrap(), Duration::from_secs(120), "training from a Pipe channel");
    if !out.status.success() {
        // Unblock a writer still waiting for a reader (the job failed before opening every FIFO).
        for e in 0..epochs {
            let fifo = dir.join(format!("training_{e}"));
            let _ = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(fifo);
        }
    }
    writer.join().unwrap();
    out
}

#[test]
fn a_pipe_channel_trains_epoch_after_epoch_from_its_fifos() {
    let dir = tempfile::tempdir().unwrap();
    let epochs = 3;
    let out = pipe_job(dir.path(), epochs, &[]);
    assert_ok(&out);
    let text = stdout(&out);
    let accuracy = summary_value(&text, "val_accuracy");
    assert!(accuracy >= 0.85, "validation accuracy {accuracy} below 0.85:\n{text}");
    let passes = stderr(&out).matches("read one pass of the Pipe channel").count();
    assert_eq!(passes, epochs, "one pass per epoch:\n{}", stderr(&out));
    assert!(stderr(&out).contains("counted the samples of 4 of 4 shard(s) by reading them"), "{}", stderr(&out));
}

#[test]
fn a_pipe_channels_index_gives_its_counts_and_a_wrong_one_or_one_for_a_folder_is_refused() {
    // The digits' index.json lists train/ and test/ shards: the train/ ones, in key order, are the channel's.
    let index = digits().join("index.json");
    let dir = tempfile::tempdir().unwrap();
    let out = pipe_job(dir.path(), 2, &["--data-index", index.to_str().unwrap()]);
    assert_ok(&out);
    let e = stderr(&out);
    assert!(e.contains("4 shard(s) of pipe:") && e.contains("known from --data-index"), "{e}");
    assert!(!e.contains("counted the samples of 4 of 4"), "no shard read to count it:\n{e}");
    assert!(summary_value(&stdout(&out), "val_accuracy") >= 0.8, "{}", stdout(&out));

    // An index of other data: the first pass stops at the first shard that differs, naming it.
    let text = std::fs::read_to_string(&index).unwrap();
    let wrong = dir.path().join("wrong-index.json");
    std::fs::write(&wrong, text.replacen("\"bytes\": 738304", "\"bytes\": 738816", 1)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = pipe_job(dir.path(), 1, &["--data-index", wrong.to_str().unwrap()]);
    assert!(!out.status.success(), "trained with a wrong index");
    let e = stderr(&out);
    assert!(e.contains("shard 1 is 738304 bytes in this pass where 738816 were expected"), "{e}");

    // A folder keeps its own index.
    let data = digits();
    let mut job = digits_job(dir.path(), 1, &["--data-index", index.to_str().unwrap(), "--max-steps", "1"]);
    let out = wait(job.spawn().unwrap(), Duration::from_secs(60), "a folder with --data-index");
    assert!(!out.status.success(), "a folder took --data-index");
    let e = stderr(&out);
    assert!(e.contains("--data-index") && e.contains("Pipe") && e.contains(data.to_str().unwrap()), "{e}");
}

/// `hytrain launch --max-restarts N` with a worker that fails the first time it starts (a wrapper exits 3 before
/// running hytrain train once; the marker file remembers): the launcher stops the other worker, starts both again
/// and the job finishes; without restarts left the launcher exits with the worker's code.
fn launch_with_a_worker_failing_once(dir: &Path, restarts: &str) -> std::process::Output {
    let data = digits();
    let marker = dir.join("failed-once");
    let script = format!(
        "if [ \"$LOCAL_RANK\" = 1 ] && [ ! -e '{marker}' ]; then touch '{marker}'; exit 3; fi; exec \"$0\" \"$@\"",
        marker = marker.display()
    );
    let mut args: Vec<String> =
        ["launch", "--nproc-per-node", "2", "--max-restarts", restarts, "--"].iter().map(|s| s.to_string()).collect();
    args.extend(["sh", "-c", &script, common::hytrain(), "train"].iter().map(|s| s.to_string()));
    args.extend(DIGITS_JOB.iter().map(|s| s.to_string()));
    args.extend(["--data", data.to_str().unwrap(), "--max-steps", "6", "--validation", "none"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut job = command(&args, &[("OMP_NUM_THREADS", "1".into())]);
    job.current_dir(dir);
    wait(job.spawn().unwrap(), Duration::from_secs(120), "a launch with a worker failing once")
}

#[test]
fn launch_restarts_its_workers_after_a_failure_while_restarts_are_left() {
    let dir = tempfile::tempdir().unwrap();
    let out = launch_with_a_worker_failing_once(dir.path(), "1");
    assert_ok(&out);
    let e = stderr(&out);
    assert!(e.contains("restarting the 2 workers of this node (restart 1 of 1"), "{e}");
    assert_eq!(summary_value(&stdout(&out), "steps"), 6.0, "{}", stdout(&out));

    let dir = tempfile::tempdir().unwrap();
    let out = launch_with_a_worker_failing_once(dir.path(), "0");
    assert_eq!(out.status.code(), Some(3), "the launcher exits with the failed worker's code: {}", stderr(&out));
    assert!(!stderr(&out).contains("restarting"), "{}", stderr(&out));
}
