//! Ranks SIGKILLed at seeded moments: rendezvous, data loading, steps, allreduces, checkpoints, validation.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::{PEER_TIMEOUT, RUN_LIMIT, WORLD};

/// SIGKILL of a seeded rank once rank 0 has printed a seeded step.
pub(crate) fn kill_at_step(dir: &Path, rng: &mut Rng) -> Result<Outcome, String> {
    let victim = rng.rank(&[0, 1, 2]);
    let step = rng.pick(3, 40);
    let mut job = Job::new(dir);
    job.start_all(TRAIN, PEER_TIMEOUT);
    job.at_step(step)?;
    let fault = Instant::now();
    job.kill(victim);
    let survivors: Vec<usize> = (0..WORLD).filter(|&r| r != victim).collect();
    let took = job.survivors_name(&survivors, victim, fault, PEER_TIMEOUT)?;
    let state = state_intact(dir)?;
    Ok(Outcome { detail: format!("SIGKILL rank {victim} at step {step}; {state}"), detection: Some(took) })
}

/// The others are blocked in the step's allreduce waiting for the victim when it dies: it is stopped first, the
/// others run into the collective, then it is killed.
pub(crate) fn kill_mid_allreduce(dir: &Path, rng: &mut Rng) -> Result<Outcome, String> {
    let victim = rng.rank(&[0, 1, 2]);
    let step = rng.pick(3, 40);
    let mut job = Job::new(dir);
    job.start_all(TRAIN, PEER_TIMEOUT);
    job.at_step(step)?;
    job.signal(victim, libc::SIGSTOP);
    // Long enough for the others to finish their step and block in the next allreduce; far below the peer timeout.
    std::thread::sleep(Duration::from_millis(500));
    job.poll();
    if let Some(r) = (0..WORLD).find(|&r| job.exits[r].is_some()) {
        return Err(format!("rank {r} exited while rank {victim} was only stopped:\n{}", job.logs()));
    }
    let fault = Instant::now();
    job.kill(victim);
    let survivors: Vec<usize> = (0..WORLD).filter(|&r| r != victim).collect();
    let took = job.survivors_name(&survivors, victim, fault, PEER_TIMEOUT)?;
    let state = state_intact(dir)?;
    Ok(Outcome {
        detail: format!("SIGKILL rank {victim} while the others wait in an allreduce after step {step}; {state}"),
        detection: Some(took),
    })
}

/// A rank dies after joining the rendezvous while the job still waits for a rank that has not started.
pub(crate) fn kill_during_rendezvous(dir: &Path, rng: &mut Rng) -> Result<Outcome, String> {
    let victim = rng.rank(&[0, 1]);
    let survivor = 1 - victim;
    let mut job = Job::new(dir);
    job.start(0, TRAIN, PEER_TIMEOUT, None);
    job.start(1, TRAIN, PEER_TIMEOUT, None);
    job.wait_for("the rendezvous join", RUN_LIMIT, |j| {
        j.stderr(victim).contains("joined the rendezvous") && j.stderr(survivor).contains("joined the rendezvous")
    })?;
    let fault = Instant::now();
    job.kill(victim);
    let took = job.survivors_name(&[survivor], victim, fault, PEER_TIMEOUT)?;
    let state = state_intact(dir)?;
    Ok(Outcome {
        detail: format!("SIGKILL rank {victim} in the rendezvous (rank 2 not yet started); {state}"),
        detection: Some(took),
    })
}

/// A rank dies right after the rendezvous, while the others open and load the data.
pub(crate) fn kill_while_loading(dir: &Path, rng: &mut Rng) -> Result<Outcome, String> {
    let victim = rng.rank(&[0, 1, 2]);
    let mut job = Job::new(dir);
    job.start_all(TRAIN, PEER_TIMEOUT);
    job.wait_for("the rendezvous", RUN_LIMIT, |j| j.stderr(victim).contains("rendezvous complete"))?;
    let fault = Instant::now();
    job.kill(victim);
    let survivors: Vec<usize> = (0..WORLD).filter(|&r| r != victim).collect();
    let took = job.survivors_name(&survivors, victim, fault, PEER_TIMEOUT)?;
    let state = state_intact(dir)?;
    Ok(Outcome { detail: format!("SIGKILL rank {victim} as the ranks load data; {state}"), detection: Some(took) })
}

/// Rank 0 writes a checkpoint after every step, so that is where it spends its time when another rank dies.
pub(crate) fn kill_while_rank0_checkpoints(dir: &Path, rng: &mut Rng) -> Result<Outcome, String> {
    let victim = rng.rank(&[1, 2]);
    let step = rng.pick(3, 30);
    let mut job = Job::new(dir);
    job.start_all(&["--epochs", "500", "--validation", "none", "--checkpoint-every", "1"], PEER_TIMEOUT);
    job.at_step(step)?;
    let fault = Instant::now();
    job.kill(victim);
    let took = job.survivors_name(&[0, 3 - victim], victim, fault, PEER_TIMEOUT)?;
    let state = state_intact(dir)?;
    Ok(Outcome {
        detail: format!("SIGKILL rank {victim} while rank 0 checkpoints every step (at step {step}); {state}"),
        detection: Some(took),
    })
}

/// Rank 0 itself dies while it writes a checkpoint: the torn one must not be taken for valid.
pub(crate) fn kill_rank0_mid_checkpoint(dir: &Path, rng: &mut Rng) -> Result<Outcome, String> {
    let step = rng.pick(3, 30);
    let delay = Duration::from_millis(rng.pick(0, 15));
    let mut job = Job::new(dir);
    job.start_all(&["--epochs", "500", "--validation", "none", "--checkpoint-every", "1"], PEER_TIMEOUT);
    let line = format!("{}/ckpt-{step} step={step}", dir.join("ckpt").display());
    job.wait_for(&format!("checkpoint {step}"), RUN_LIMIT, |j| j.stderr(0).contains(&line))?;
    std::thread::sleep(delay);
    let fault = Instant::now();
    job.kill(0);
    let took = job.survivors_name(&[1, 2], 0, fault, PEER_TIMEOUT)?;
    let state = state_intact(dir)?;
    Ok(Outcome {
        detail: format!("SIGKILL rank 0 {} ms after checkpoint {step}, in its next write; {state}", delay.as_millis()),
        detection: Some(took),
    })
}

/// A rank dies as the first epoch ends, while the ranks validate (one sample per batch, so validation is long).
pub(crate) fn kill_during_validation(dir: &Path, rng: &mut Rng) -> Result<Outcome, String> {
    let victim = rng.rank(&[0, 1, 2]);
    let mut job = Job::new(dir);
    job.start_all(&["--epochs", "500", "--test-batch-size", "1", "--checkpoint-every", "5"], PEER_TIMEOUT);
    job.wait_for("the training line", RUN_LIMIT, |j| j.stderr(0).contains("steps_per_epoch="))?;
    let log = job.stderr(0);
    let per_epoch: u64 = log
        .split("steps_per_epoch=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no steps_per_epoch in:\n{log}"))?;
    job.at_step(per_epoch)?;
    let fault = Instant::now();
    job.kill(victim);
    let survivors: Vec<usize> = (0..WORLD).filter(|&r| r != victim).collect();
    let took = job.survivors_name(&survivors, victim, fault, PEER_TIMEOUT)?;
    let state = state_intact(dir)?;
    Ok(Outcome {
        detail: format!("SIGKILL rank {victim} at the end of epoch 1 (step {per_epoch}), in validation; {state}"),
        detection: Some(took),
    })
}
