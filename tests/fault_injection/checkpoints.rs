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
    job.start_all(
        &[
            "--max-steps",
            "10",
            "--validation",
            "none",
            "--checkpoint-every",
            "5",
        ],
        PEER_TIMEOUT,
    );
    let all: Vec<usize> = (0..WORLD).collect();
    job.wait_exits(&all, Instant::now(), RUN_LIMIT)?;
    let ckpt = dir.join("ckpt");
    if newest_valid(&ckpt)? != Some(10) {
        return Err(format!(
            "the run did not checkpoint step 10:\n{}",
            job.logs()
        ));
    }
    let file = ckpt.join("ckpt-10").join(if rng.next() % 2 == 0 {
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
        return Err(format!(
            "the restart did not warn about the corrupt checkpoint:\n{log}"
        ));
    }
    Ok(Outcome {
        detail: format!(
            "flipped a byte of {}; skipped with a warning, resumed from step 5",
            file.display()
        ),
        // Found when the restart reads it, not by a running job.
        detection: None,
    })
}

/// Rank 0's checkpoint directory is a 200 KiB tmpfs: the first checkpoint (about 140 KiB) fits, the second does
/// not. A real full file system, mounted in a private mount namespace.
pub(crate) fn full_disk(dir: &Path, _rng: &mut Rng) -> Result<Outcome, String> {
    let namespace = [
        vec!["--user", "--map-root-user", "--mount"],
        vec!["--mount"],
    ]
    .into_iter()
    .find(|flags| {
        Command::new("unshare")
            .args(flags)
            .args(["sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || mount -t tmpfs -o size=64k tmpfs /tmp"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
    .ok_or("cannot mount a size-limited tmpfs for the full-disk case: `unshare --user --map-root-user --mount` and \
            `unshare --mount` both failed (the test needs user namespaces or root with CAP_SYS_ADMIN)")?;
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
        return Err(format!(
            "rank 0 did not report the full disk as expected:\n{}",
            job.logs()
        ));
    }
    // Rank 0 failing is a loss to the others.
    let took = job.survivors_name(&[1, 2], 0, failed_at, PEER_TIMEOUT)?;
    let left: Vec<String> = fs::read_dir(&copy)
        .map_err(|e| format!("nothing copied out of the tmpfs: {e}"))?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    if left != ["ckpt-5"] {
        return Err(format!(
            "the full checkpoint directory holds {left:?}, not just ckpt-5"
        ));
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
