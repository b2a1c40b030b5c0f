//! Resuming a checkpoint with real `hytrain train` processes on the digits: a job whose shape (world size, batch
//! size, `--grad-accum`) differs from the checkpoint's continues exactly where the sample position maps, shares
//! what the checkpoint's ranks left of the epoch among its own under another world size (each sample once), starts
//! the next epoch where the checkpoint ends one, and is refused mid-epoch under another seed or stream window
//! unless `--restart-epoch-on-change` says to start the epoch over; libtorch's generator (dropout) continues as in an uninterrupted run; a job that
//! checkpoints to S3 (a real S3 server) and is killed resumes from S3.

use crate::jobs;
use crate::support;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use jobs::{assert_ok, digits, finish, launch_train, stderr, stdout, test_python};
use tch::Tensor;

/// `hytrain launch --nproc-per-node N -- hytrain train` on the digits with an MLP in `dir`, with `extra` flags.
fn job(dir: &Path, nproc: usize, extra: &[&str]) -> Command {
    let data = digits();
    let mut args: Vec<&str> = vec![
        "--data",
        data.to_str().unwrap(),
        "--lr",
        "0.1",
        "--momentum",
        "0.9",
        "--seed",
        "3",
        "--log-interval",
        "1",
        "--validation",
        "none",
    ];
    if !extra.contains(&"--model") {
        args.extend(["--model", "mlp"]);
    }
    args.extend(extra);
    launch_train(dir, nproc, &args)
}

/// The final weights of the job run in `dir`, sorted by name.
fn weights(dir: &Path) -> Vec<(String, Tensor)> {
    jobs::weights(&dir.join("hytrain-out/model"))
}

/// The largest absolute difference between two runs' final weights.
fn weight_difference(a: &Path, b: &Path) -> f64 {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(a.len(), b.len());
    a.iter().zip(&b).map(|((_, x), (_, y))| (x - y).abs().max().double_value(&[])).fold(0.0, f64::max)
}

/// The `epoch=` of rank 0's metrics line for `step`.
fn epoch_of_step(out: &str, step: u64) -> Option<u64> {
    let needle = format!(" step={step} ");
    let line = out.lines().find(|l| l.starts_with("epoch=") && l.contains(&needle))?;
    line.strip_prefix("epoch=")?.split_whitespace().next()?.parse().ok()
}

/// A first run of `nproc` ranks with `flags`, stopped at `--max-steps steps` mid-epoch: its checkpoint is the one the
/// tests resume.
fn first_run(dir: &Path, nproc: usize, steps: u64, flags: &[&str]) {
    let steps = steps.to_string();
    let mut args = vec!["--max-steps", &steps];
    args.extend(flags);
    assert_ok(&finish(job(dir, nproc, &args), "first run"));
}

/// One rank resumes two ranks' checkpoint of step 5 (5 batches of 32 each into epoch 1): it trains the rest of the
/// epoch, which is what `hytrain data digest` shares to one rank after two read 5 batches each.
#[test]
fn a_mid_epoch_checkpoint_of_two_ranks_is_continued_by_one_rank_training_what_they_left_once() {
    let dir = tempfile::tempdir().unwrap();
    first_run(dir.path(), 2, 5, &["--batch-size", "32"]);
    let out = finish(job(dir.path(), 1, &["--batch-size", "32", "--epochs", "1", "--digest-trained"]), "resumed run");
    assert_ok(&out);
    let err = stderr(&out);
    assert!(
        err.contains(
            "the checkpoint's job differs (world size 2, this job 1); continuing epoch 1 after its position (batch 5 \
             of 23 in epoch 1), this job's ranks sharing what the checkpoint's 2 left of it"
        ),
        "{err}"
    );
    let line =
        err.lines().find(|l| l.contains("trained digest: rank 0 of 1 trained ")).unwrap_or_else(|| panic!("{err}"));
    let data = digits();
    let mut args = vec!["data", "digest", "--data", data.to_str().unwrap(), "--world-size", "1", "--batch-size"];
    args.extend(["32", "--seed", "3", "--epochs", "1", "--regroup", "1:2x5"]);
    let expected = crate::common::run(&args, &[]);
    assert!(expected.status.success(), "{}", String::from_utf8_lossy(&expected.stderr));
    let expected = String::from_utf8(expected.stdout).unwrap();
    let hex = expected.strip_prefix("rank 0: ").unwrap_or_else(|| panic!("{expected}")).trim();
    assert!(line.ends_with(hex), "trained {line}, data digest says {hex}");
}

#[test]
fn a_mid_epoch_checkpoint_read_in_another_order_is_refused_naming_what_changed_and_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    first_run(dir.path(), 2, 5, &["--batch-size", "32"]);
    let resumed = ["--batch-size", "32", "--max-steps", "8", "--stream-window", "16"];
    let out = finish(job(dir.path(), 2, &resumed), "resumed run");
    let err = stderr(&out);
    assert!(!out.status.success(), "a job reading the epoch in another order resumed mid-epoch:\n{err}");
    let line = err.lines().find(|l| l.contains("hytrain: error:")).unwrap_or_else(|| panic!("no error in:\n{err}"));
    for part in [
        "ckpt-5",
        "stream window off, this job 16",
        "batch 5 of 23 in epoch 1",
        "--restart-epoch-on-change",
        "--no-resume",
    ] {
        assert!(line.contains(part), "'{part}' missing from: {line}");
    }
    assert!(!dir.path().join("hytrain-out/checkpoints/ckpt-6").exists(), "the refused job trained");
}

#[test]
fn restart_epoch_on_change_starts_the_epoch_over_in_the_new_order_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    first_run(dir.path(), 2, 5, &["--batch-size", "32"]);
    let resumed = ["--batch-size", "32", "--max-steps", "8", "--stream-window", "16"];
    let out = finish(job(dir.path(), 1, &[&resumed[..], &["--restart-epoch-on-change"]].concat()), "resumed run");
    assert_ok(&out);
    let err = stderr(&out);
    assert!(
        err.contains("world size 2, this job 1; stream window off, this job 16")
            && err.contains("starting epoch 1 over from its first batch at step 5"),
        "the log does not say the epoch starts over:\n{err}"
    );
    assert!(stdout(&out).contains("steps            8 (3 this run)"), "{}", stdout(&out));
    // The same from the environment, as the other knobs.
    let again = tempfile::tempdir().unwrap();
    first_run(again.path(), 2, 5, &["--batch-size", "32"]);
    let mut resumed = job(again.path(), 1, &resumed);
    resumed.env("HYTRAIN_RESTART_EPOCH_ON_CHANGE", "true");
    assert_ok(&finish(resumed, "resumed run"));
}

/// Same world size and samples per step (16 x 2 = 32 x 1): the position maps to batch 10 of 16 samples (of 44: whole
/// steps only, the 45th, partial, batch is left out), and the run
/// sees exactly the samples of an uninterrupted one (only the summation order of the gradients differs).
#[test]
fn half_the_batch_with_double_grad_accum_continues_the_epoch_exactly() {
    let clean = tempfile::tempdir().unwrap();
    assert_ok(&finish(job(clean.path(), 2, &["--batch-size", "32", "--max-steps", "12"]), "uninterrupted run"));
    let dir = tempfile::tempdir().unwrap();
    first_run(dir.path(), 2, 5, &["--batch-size", "32"]);
    let out =
        finish(job(dir.path(), 2, &["--batch-size", "16", "--grad-accum", "2", "--max-steps", "12"]), "resumed run");
    assert_ok(&out);
    assert!(stderr(&out).contains("continuing epoch 1 at batch 10 of 44"), "{}", stderr(&out));
    let diff = weight_difference(clean.path(), dir.path());
    assert!(diff < 1e-4, "the resumed run's weights differ from the uninterrupted run's by {diff}");
}

/// A checkpoint at the end of an epoch maps onto any shape: the next epoch starts from its beginning.
#[test]
fn a_checkpoint_at_an_epoch_end_continues_with_the_next_epoch_whatever_the_world_size() {
    let dir = tempfile::tempdir().unwrap();
    // 1438 digits over 2 ranks at 32: 23 batches per rank and epoch.
    assert_ok(&finish(job(dir.path(), 2, &["--batch-size", "32", "--epochs", "1"]), "first run"));
    let out = finish(job(dir.path(), 1, &["--batch-size", "32", "--max-steps", "25"]), "resumed run");
    assert_ok(&out);
    assert_eq!(epoch_of_step(&stdout(&out), 24), Some(2), "step 24 is not in epoch 2:\n{}", stdout(&out));
}

/// The Python `cargo xtask test` sets up (torch).
/// A TorchScript MLP for the 8x8 digits with dropout, which draws on libtorch's generator every step.
fn dropout_model(dir: &Path) -> PathBuf {
    let path = dir.join("dropout.pt");
    let script = "import sys, torch, torch.nn as nn\n\
                  torch.manual_seed(0)\n\
                  m = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 10))\n\
                  torch.jit.script(m).save(sys.argv[1])\n";
    let out = Command::new(test_python()).args(["-c", script]).arg(&path).output().unwrap_or_else(|e| {
        panic!("{} does not start ({e}): run the tests through `cargo xtask test`", test_python().display())
    });
    assert!(out.status.success(), "scripting the model failed:\n{}", stderr(&out));
    path
}

#[test]
fn dropout_after_a_resume_draws_what_an_uninterrupted_run_draws() {
    let models = tempfile::tempdir().unwrap();
    let model = dropout_model(models.path());
    let model = model.to_str().unwrap();
    let flags = ["--model", model, "--batch-size", "32"];
    let clean = tempfile::tempdir().unwrap();
    assert_ok(&finish(job(clean.path(), 1, &[&flags[..], &["--max-steps", "8"]].concat()), "uninterrupted run"));
    let dir = tempfile::tempdir().unwrap();
    first_run(dir.path(), 1, 4, &flags);
    let out = finish(job(dir.path(), 1, &[&flags[..], &["--max-steps", "8"]].concat()), "resumed run");
    assert_ok(&out);
    assert!(stderr(&out).contains("resuming from checkpoint"), "{}", stderr(&out));
    let diff = weight_difference(clean.path(), dir.path());
    assert!(diff <= 1e-6, "the resumed run's weights differ from the uninterrupted run's by {diff}");
}

#[test]
fn a_checkpoint_whose_generator_state_does_not_load_is_refused_saying_what_to_do() {
    let models = tempfile::tempdir().unwrap();
    let model = dropout_model(models.path());
    let flags = ["--model", model.to_str().unwrap(), "--batch-size", "32"];
    let dir = tempfile::tempdir().unwrap();
    first_run(dir.path(), 1, 4, &flags);
    let meta = dir.path().join("hytrain-out/checkpoints/ckpt-4/meta.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&meta).unwrap()).unwrap();
    json["rng"]["state"]["torch_cpu"] = "00ff".into();
    std::fs::write(&meta, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    let out = finish(job(dir.path(), 1, &[&flags[..], &["--max-steps", "8"]].concat()), "resumed run");
    assert!(!out.status.success(), "a checkpoint with a broken generator state resumed:\n{}", stderr(&out));
    let err = stderr(&out);
    let line = err.lines().find(|l| l.contains("hytrain: error:")).unwrap_or_else(|| panic!("no error in:\n{err}"));
    assert!(
        line.contains("ckpt-4") && line.contains("libtorch's random generator") && line.contains("--no-resume"),
        "{line}"
    );
}

/// A job with `--checkpoint-dir` and `--model-dir` on S3 (the local S3 server) is killed with SIGKILL in the middle
/// of uploading a checkpoint, restarted with the same command, resumes from the last complete checkpoint in S3, and
/// ends with the weights of an uninterrupted run.
#[test]
fn a_job_checkpointing_to_s3_killed_and_restarted_resumes_from_s3_and_ends_as_an_uninterrupted_run() {
    let root = tempfile::tempdir().unwrap();
    let server = support::LocalS3::start(root.path());
    std::fs::create_dir_all(root.path().join("bkt")).unwrap();
    let endpoint = server.endpoint();
    let flags = ["--epochs", "12", "--checkpoint-every", "7"];
    let s3_job = |dir: &Path| {
        let mut args = flags.to_vec();
        args.extend([
            "--checkpoint-dir",
            "s3://bkt/run/ckpt",
            "--model-dir",
            "s3://bkt/run/model",
            "--s3-endpoint",
            &endpoint,
        ]);
        let mut c = job(dir, 2, &args);
        c.env("AWS_ACCESS_KEY_ID", support::ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", support::SECRET_KEY)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true");
        c
    };
    let clean = tempfile::tempdir().unwrap();
    assert_ok(&finish(job(clean.path(), 2, &flags), "clean run"));

    let killed = tempfile::tempdir().unwrap();
    let store = hytrain::train::CheckpointStore::s3("s3://bkt/run/ckpt", &server.options(), 1).unwrap();
    let mut first = s3_job(killed.path());
    first.process_group(0);
    let mut child = first.spawn().unwrap();
    let started = Instant::now();
    let complete = loop {
        if let Ok(Some(found)) = store.latest_valid() {
            if found.checkpoint.meta.step >= 14 {
                break found.checkpoint.meta.step;
            }
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        assert!(started.elapsed() < Duration::from_secs(240), "no checkpoint in S3 after 240 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    // The next checkpoint's upload is held unanswered, and the job killed in the middle of it.
    let uploads = server.faults.count("PutObject");
    server.faults.inject("PutObject", support::Fault::Hold, usize::MAX);
    let arrived = server.faults.wait_for("PutObject", uploads + 1, Duration::from_secs(240));
    assert!(arrived > uploads, "no upload of a later checkpoint began");
    // SAFETY: kill(2) on the process group of the launcher we spawned; its workers die with it (PDEATHSIG).
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    assert!(!child.wait().unwrap().success());
    server.faults.reset();
    server.faults.open_held();
    let newest = store.latest_valid().unwrap().unwrap().checkpoint.meta.step;
    assert!(newest >= complete, "the checkpoint complete before the kill is no longer found");
    let model = root.path().join("bkt/run/model");
    assert!(!model.join("model.safetensors").exists(), "the killed run finished before the kill; make it longer");
    assert!(!killed.path().join("s3:").exists() && !killed.path().join("hytrain-out/checkpoints").exists());

    let out = finish(s3_job(killed.path()), "restart");
    assert_ok(&out);
    let log = stderr(&out);
    assert!(log.contains("resuming from checkpoint") && log.contains("s3://bkt/run/ckpt/ckpt-"), "{log}");
    assert!(model.join("metadata.json").exists(), "the model's metadata was not uploaded last");
    let (a, b) = (weights(clean.path()), jobs::weights(&model));
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let diff = (x - y).abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "{name} differs by {diff} after kill and resume from S3");
    }
}
