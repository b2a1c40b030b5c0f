//! Checkpoints on disk: corrupted, and a full file system under them.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::common;
use crate::harness::*;
use crate::{PEER_TIMEOUT, RUN_LIMIT, WORLD};

/// The newest checkpoint is corrupted on disk; a restart skips it with a warning and resumes from the one before.
pub(crate) fn corrupted_checkpoint(dir: &Path, rng: &mut Rng) -> Result<Outcome, String> {
    let mut job = Job::new(dir);
    job.start_all(&["--max-steps", "10", "--validation", "none", "--checkpoint-every", "5"], PEER_TIMEOUT);
    let all: Vec<usize> = (0..WORLD).collect();
    job.wait_exits(&all, Instant::now(), RUN_LIMIT)?;
    let ckpt = dir.join("ckpt");
    if newest_valid(&ckpt)? != Some(10) {
        return Err(format!("the run did not checkpoint step 10:\n{}", job.logs()));
    }
    let file = ckpt.join("ckpt-10").join(if rng.next().is_multiple_of(2) {
        "model.safetensors"
    } else {
        "optimizer.safetensors"
    });
    let mut bytes = fs::read(&file).unwrap();
    let at = bytes.len() / 2 + rng.pick(0, 100) as usize;
    bytes[at] ^= 0x5A;
    fs::write(&file, bytes).unwrap();
    if newest_valid(&ckpt)? != Some(5) {
        return Err("the corrupted checkpoint 10 was still taken as valid".into());
    }
    restart_resumes(dir, &ckpt, 5)?;
    let log = fs::read_to_string(dir.join("restart-5/err0.txt")).unwrap_or_default();
    if !log.contains("skipping invalid checkpoint") || !log.contains("ckpt-10") {
        return Err(format!("the restart did not warn about the corrupt checkpoint:\n{log}"));
    }
    Ok(Outcome {
        detail: format!("flipped a byte of {}; skipped with a warning, resumed from step 5", file.display()),
        // Found when the restart reads it, not by a running job.
        detection: None,
    })
}

/// Rank 0's checkpoint directory is a 200 KiB tmpfs: the first checkpoint (about 140 KiB) fits, the second does
/// not. A real full file system, mounted in a private mount namespace.
pub(crate) fn full_disk(dir: &Path, _rng: &mut Rng) -> Result<Outcome, String> {
    let namespace = [vec!["--user", "--map-root-user", "--mount"], vec!["--mount"]]
        .into_iter()
        .find(|flags| {
            Command::new("unshare")
                .args(flags)
                .args([
                    "sh",
                    "-c",
                    "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || mount -t tmpfs -o size=64k tmpfs /tmp",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .ok_or(
            "cannot mount a size-limited tmpfs for the full-disk case: `unshare --user --map-root-user --mount` and \
            `unshare --mount` both failed (the test needs user namespaces or root with CAP_SYS_ADMIN)",
        )?;
    let ckpt = dir.join("ckpt");
    let copy = dir.join("ckpt-after");
    fs::create_dir_all(&ckpt).unwrap();
    let mut job = Job::new(dir);
    job.start(1, TRAIN, PEER_TIMEOUT, None);
    job.start(2, TRAIN, PEER_TIMEOUT, None);
    let args = base_args(dir, TRAIN);
    let mut c = Command::new("unshare");
    c.args(&namespace)
        .args([
            "sh",
            "-c",
            // Exit 97: the mount failed. The tmpfs vanishes with the namespace, so what is on it is copied out.
            r#"mount -t tmpfs -o size=200k tmpfs "$CKPT" || exit 97; "$@"; rc=$?; cp -a "$CKPT" "$COPY"; exit $rc"#,
            "sh",
            common::hytrain(),
        ])
        .args(&args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CKPT", &ckpt)
        .env("COPY", &copy)
        .stdin(Stdio::null());
    for (k, v) in rank_env(0, job.port, PEER_TIMEOUT) {
        c.env(k, v);
    }
    job.redirect(&mut c, 0);
    job.ranks[0] = Some(c.spawn().unwrap());
    let all: Vec<usize> = (0..WORLD).collect();
    let started = Instant::now();
    job.wait_exits(&all, started, RUN_LIMIT)?;
    let (status, failed_at) = job.exits[0].unwrap();
    if status.code() == Some(97) {
        return Err(format!("mounting the tmpfs failed:\n{}", job.stderr(0)));
    }
    let err = job.stderr(0);
    let wanted = format!(
        "hytrain: error: no room for the checkpoint of step 10 in {}: No space left on device (it needs about",
        ckpt.display()
    );
    if status.success() || !err.contains(&wanted) || !err.contains("ckpt-5 is intact") {
        return Err(format!("rank 0 did not report the full disk as expected:\n{}", job.logs()));
    }
    // Rank 0 failing is a loss to the others.
    let took = job.survivors_name(&[1, 2], 0, failed_at, PEER_TIMEOUT)?;
    let left: Vec<String> = fs::read_dir(&copy)
        .map_err(|e| format!("nothing copied out of the tmpfs: {e}"))?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    if left != ["ckpt-5"] {
        return Err(format!("the full checkpoint directory holds {left:?}, not just ckpt-5"));
    }
    if newest_valid(&copy)? != Some(5) {
        return Err("checkpoint 5 does not verify after the full disk".into());
    }
    restart_resumes(dir, &copy, 5)?;
    Ok(Outcome {
        detail: format!(
            "tmpfs of 200 KiB under rank 0's checkpoints ({}); step 10 refused, ckpt-5 intact, resumed from step 5",
            namespace.join(" ")
        ),
        detection: Some(took),
    })
}

/// Rank 0 under `strace`, which SIGKILLs it as it enters its second `rename(2)`: the moment a checkpoint published
/// over an existing `ckpt-<step>` by renaming the old one aside and then the new one in has no `ckpt-<step>` at all.
/// `strace` counts each system call on each thread; every save of a run runs on its one checkpoint writer thread,
/// and nothing else in a stopped or short run renames.
fn start_rank0_killed_at_second_rename(job: &mut Job, extra: &[&str]) -> Result<(), String> {
    if Command::new("strace").arg("-V").output().is_err() {
        return Err("strace is not installed: this case needs it to kill rank 0 between two renames".into());
    }
    let args = base_args(&job.dir, extra);
    let mut c = Command::new("strace");
    c.args([
        "-f",
        "-qq",
        "-o",
        "/dev/null",
        "-e",
        "trace=rename,renameat,renameat2",
        "-e",
        "inject=rename,renameat,renameat2:signal=SIGKILL:when=2",
        common::hytrain(),
    ])
    .args(&args)
    .env_clear()
    .env("PATH", std::env::var("PATH").unwrap_or_default())
    .stdin(Stdio::null());
    for (k, v) in rank_env(0, job.port, PEER_TIMEOUT) {
        c.env(k, v);
    }
    job.redirect(&mut c, 0);
    job.ranks[0] = Some(c.spawn().unwrap());
    Ok(())
}

/// The process `strace` (pid `tracer`) runs.
fn tracee(tracer: i32) -> Result<i32, String> {
    let started = Instant::now();
    loop {
        let children = fs::read_to_string(format!("/proc/{tracer}/task/{tracer}/children")).unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next().and_then(|p| p.parse().ok()) {
            return Ok(pid);
        }
        if started.elapsed() > RUN_LIMIT {
            return Err(format!("strace (pid {tracer}) started no process"));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// After the kill: `ckpt-<step>` is valid and a restart resumes from it.
fn still_valid(dir: &Path, step: u64, job: &Job, moment: &str) -> Result<(), String> {
    let ckpt = dir.join("ckpt");
    let left: Vec<String> = fs::read_dir(&ckpt)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    match newest_valid(&ckpt)? {
        Some(s) if s == step => restart_resumes(dir, &ckpt, step),
        other => Err(format!(
            "after a kill {moment}, the newest valid checkpoint is {other:?}, not step {step}; {} holds {left:?}:\n{}",
            ckpt.display(),
            job.logs()
        )),
    }
}

/// With `--keep 1`, a job that resumes from `ckpt-5` and is stopped (SIGTERM) before its first step, and a
/// `--no-resume` job that reaches step 5 again, both checkpoint step 5 while `ckpt-5` exists; rank 0 is SIGKILLed
/// at its second rename, where replacing `ckpt-5` by renaming it aside and then the new one in has none. The newest
/// checkpoint must stay step 5 and valid throughout.
pub(crate) fn kill_rank0_while_replacing_a_checkpoint(dir: &Path, _rng: &mut Rng) -> Result<Outcome, String> {
    let first = ["--max-steps", "5", "--keep", "1", "--validation", "none"];
    let mut job = Job::new(dir);
    job.start_all(&first, PEER_TIMEOUT);
    let all: Vec<usize> = (0..WORLD).collect();
    job.wait_exits(&all, Instant::now(), RUN_LIMIT)?;
    if newest_valid(&dir.join("ckpt"))? != Some(5) {
        return Err(format!("the first run did not checkpoint step 5:\n{}", job.logs()));
    }
    drop(job);

    // SIGTERM reaches rank 0 while it waits for the others at the rendezvous (its handler is installed before
    // it logs anything), so the ranks agree to stop at the first step after the resume.
    let resumed = ["--max-steps", "40", "--keep", "1", "--validation", "none"];
    let mut job = Job::new(dir);
    start_rank0_killed_at_second_rename(&mut job, &resumed)?;
    job.wait_for("rank 0's first log line", RUN_LIMIT, |j| !j.stderr(0).is_empty())?;
    let rank0 = tracee(job.pid(0))?;
    // SAFETY: kill(2) takes plain integers and touches no memory of this process.
    unsafe { libc::kill(rank0, libc::SIGTERM) };
    job.start(1, &resumed, PEER_TIMEOUT, None);
    job.start(2, &resumed, PEER_TIMEOUT, None);
    job.wait_exits(&all, Instant::now(), RUN_LIMIT)?;
    if !job.stderr(0).contains("resuming from checkpoint") {
        return Err(format!("the second run did not resume:\n{}", job.logs()));
    }
    still_valid(dir, 5, &job, "as a stopped run re-saved the step it resumed from")?;
    drop(job);

    // A fresh run (another weight decay) over the same folder reaches step 5 and must replace ckpt-5; the
    // restart's newer checkpoints go first, so ckpt-5 is the newest again.
    for (step, path) in hytrain::train::checkpoint::list_checkpoints(&dir.join("ckpt")).unwrap_or_default() {
        if step != 5 {
            fs::remove_dir_all(path).unwrap();
        }
    }
    let fresh = ["--no-resume", "--weight-decay", "0.001", "--max-steps", "5", "--keep", "1", "--validation", "none"];
    let mut job = Job::new(dir);
    start_rank0_killed_at_second_rename(&mut job, &fresh)?;
    job.start(1, &fresh, PEER_TIMEOUT, None);
    job.start(2, &fresh, PEER_TIMEOUT, None);
    job.wait_exits(&all, Instant::now(), RUN_LIMIT)?;
    still_valid(dir, 5, &job, "as a --no-resume run replaced ckpt-5")?;
    // Read after the restart, which leaves ckpt-5 as it found it.
    let decay = hytrain::train::checkpoint::read_checkpoint(&dir.join("ckpt/ckpt-5"))
        .ok()
        .and_then(|c| c.meta.config.get("weight_decay").and_then(|v| v.as_f64()));
    if decay != Some(0.001) {
        return Err(format!(
            "ckpt-5 is not the --no-resume run's (its weight decay is {decay:?}, not 0.001):\n{}",
            job.logs()
        ));
    }
    Ok(Outcome {
        detail: "SIGKILL rank 0 at its second rename while re-saving ckpt-5 (stopped right after a resume, then \
                 replaced by a --no-resume run); ckpt-5 valid throughout, resumed from it"
            .into(),
        detection: None,
    })
}
