//! The fault suite's harness: jobs of separate rank processes, their logs and exits, and the resume check.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::common::{self, digits};
use crate::{PEER_TIMEOUT, RUN_LIMIT, TOKEN, WORLD};

/// splitmix64: the seeded choices of victims and moments.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    pub(crate) fn pick(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    pub(crate) fn rank(&mut self, from: &[usize]) -> usize {
        from[self.next() as usize % from.len()]
    }
}

/// One job's folder and processes; every process left is killed when it is dropped, so no case leaks a rank.
pub(crate) struct Job {
    pub(crate) dir: PathBuf,
    pub(crate) port: u16,
    pub(crate) ranks: Vec<Option<Child>>,
    pub(crate) exits: Vec<Option<(ExitStatus, Instant)>>,
}

impl Drop for Job {
    fn drop(&mut self) {
        for child in self.ranks.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) fn base_args(dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--model",
        "mlp",
        "--data",
        digits().to_str().unwrap(),
        "--batch-size",
        "32",
        "--lr",
        "0.1",
        "--momentum",
        "0.9",
        "--seed",
        "3",
        "--log-interval",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (flag, sub) in [("--checkpoint-dir", "ckpt"), ("--model-dir", "model"), ("--output-dir", "output")] {
        if !extra.contains(&flag) {
            args.push(flag.into());
            args.push(dir.join(sub).to_str().unwrap().into());
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The environment a torchrun-style launcher gives rank `rank` (each rank its own "node").
pub(crate) fn rank_env(rank: usize, port: u16, peer_timeout: Duration) -> Vec<(&'static str, String)> {
    vec![
        ("RANK", rank.to_string()),
        ("WORLD_SIZE", WORLD.to_string()),
        ("LOCAL_RANK", "0".into()),
        ("LOCAL_WORLD_SIZE", "1".into()),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", port.to_string()),
        ("HYTRAIN_JOB_TOKEN", TOKEN.into()),
        ("HYTRAIN_PEER_TIMEOUT", peer_timeout.as_secs_f64().to_string()),
        ("HYTRAIN_RENDEZVOUS_TIMEOUT", "120".into()),
        ("OMP_NUM_THREADS", "1".into()),
        // The rendezvous' "joined" line is a debug line.
        ("RUST_LOG", "info,hytrain_comm=debug".into()),
    ]
}

impl Job {
    pub(crate) fn new(dir: &Path) -> Job {
        Job {
            dir: dir.to_path_buf(),
            port: common::free_port(),
            ranks: (0..WORLD).map(|_| None).collect(),
            exits: vec![None; WORLD],
        }
    }

    /// Starts `rank` with `extra` flags; `master_port` overrides the port it reaches the store at.
    pub(crate) fn start(&mut self, rank: usize, extra: &[&str], peer_timeout: Duration, master_port: Option<u16>) {
        let args = base_args(&self.dir, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env = rank_env(rank, master_port.unwrap_or(self.port), peer_timeout);
        let mut c = common::command(&args, &env);
        self.redirect(&mut c, rank);
        self.ranks[rank] = Some(c.spawn().unwrap());
    }

    pub(crate) fn start_all(&mut self, extra: &[&str], peer_timeout: Duration) {
        for rank in 0..WORLD {
            self.start(rank, extra, peer_timeout, None);
        }
    }

    pub(crate) fn redirect(&self, c: &mut Command, rank: usize) {
        c.current_dir(&self.dir)
            .stdout(fs::File::create(self.dir.join(format!("out{rank}.txt"))).unwrap())
            .stderr(fs::File::create(self.dir.join(format!("err{rank}.txt"))).unwrap());
    }

    pub(crate) fn stderr(&self, rank: usize) -> String {
        fs::read_to_string(self.dir.join(format!("err{rank}.txt"))).unwrap_or_default()
    }

    pub(crate) fn stdout(&self, rank: usize) -> String {
        fs::read_to_string(self.dir.join(format!("out{rank}.txt"))).unwrap_or_default()
    }

    pub(crate) fn logs(&self) -> String {
        (0..WORLD)
            .map(|r| format!("--- rank {r} stdout:\n{}--- rank {r} stderr:\n{}", self.stdout(r), self.stderr(r)))
            .collect()
    }

    pub(crate) fn pid(&self, rank: usize) -> i32 {
        self.ranks[rank].as_ref().expect("rank running").id() as i32
    }

    pub(crate) fn signal(&self, rank: usize, signal: i32) {
        // SAFETY: kill(2) takes plain integers and touches no memory of this process.
        unsafe { libc::kill(self.pid(rank), signal) };
    }

    /// Records exits; true when `rank` has exited.
    pub(crate) fn poll(&mut self) {
        for (rank, child) in self.ranks.iter_mut().enumerate() {
            if let (Some(c), None) = (child.as_mut(), self.exits[rank]) {
                if let Ok(Some(status)) = c.try_wait() {
                    self.exits[rank] = Some((status, Instant::now()));
                }
            }
        }
    }

    /// Waits until `ready(self)` holds; fails naming `what` if a rank exits first or `limit` passes.
    pub(crate) fn wait_for(&mut self, what: &str, limit: Duration, ready: impl Fn(&Job) -> bool) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if ready(self) {
                return Ok(());
            }
            self.poll();
            if let Some(rank) = (0..WORLD).find(|&r| self.exits[r].is_some()) {
                return Err(format!("rank {rank} exited before {what}:\n{}", self.logs()));
            }
            if start.elapsed() > limit {
                return Err(format!("no {what} within {limit:?}:\n{}", self.logs()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until rank 0 has printed the metrics line of `step`.
    pub(crate) fn at_step(&mut self, step: u64) -> Result<(), String> {
        let needle = format!(" step={step} ");
        self.wait_for(&format!("step {step}"), RUN_LIMIT, |j| j.stdout(0).contains(&needle))
    }

    /// Waits (at most `limit` after `since`) for every rank in `ranks` to exit; returns when the last one did.
    pub(crate) fn wait_exits(&mut self, ranks: &[usize], since: Instant, limit: Duration) -> Result<Duration, String> {
        loop {
            self.poll();
            if ranks.iter().all(|&r| self.exits[r].is_some()) {
                let last = ranks.iter().map(|&r| self.exits[r].unwrap().1).max().unwrap();
                return Ok(last.saturating_duration_since(since));
            }
            if since.elapsed() > limit {
                let running: Vec<usize> = ranks.iter().copied().filter(|&r| self.exits[r].is_none()).collect();
                return Err(format!("ranks {running:?} still running {limit:?} after the fault:\n{}", self.logs()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILLs `rank` and reaps it.
    pub(crate) fn kill(&mut self, rank: usize) {
        if let Some(mut c) = self.ranks[rank].take() {
            let _ = c.kill();
            let status = c.wait().unwrap();
            self.exits[rank] = Some((status, Instant::now()));
        }
    }

    /// Every rank in `survivors` exited non-zero within `limit` of `fault` and says, in its error, that `victim`
    /// was lost. Returns the detection time (fault to the last survivor's exit).
    pub(crate) fn survivors_name(
        &mut self,
        survivors: &[usize],
        victim: usize,
        fault: Instant,
        limit: Duration,
    ) -> Result<Duration, String> {
        let took = self.wait_exits(survivors, fault, limit)?;
        for &r in survivors {
            let (status, _) = self.exits[r].unwrap();
            if status.success() {
                return Err(format!("rank {r} exited 0 after rank {victim} was lost:\n{}", self.logs()));
            }
            let err = self.stderr(r);
            let error_part = err.find("hytrain: error:").map(|i| &err[i..]).unwrap_or("");
            if !error_part.contains(&format!("lost rank {victim}")) {
                return Err(format!("rank {r}'s error does not name rank {victim} as lost:\n{}", self.logs()));
            }
        }
        Ok(took)
    }
}

/// The newest valid checkpoint's step, if any; a checkpoint directory that holds a `ckpt-*` that does not verify
/// newer than it is fine (skipped with a warning), but none may be unreadable as a whole.
pub(crate) fn newest_valid(dir: &Path) -> Result<Option<u64>, String> {
    hytrain::train::latest_valid(dir)
        .map(|r| r.map(|r| r.checkpoint.meta.step))
        .map_err(|e| format!("cannot scan {}: {e}", dir.display()))
}

/// Restarts the whole job on `ckpt` for two more steps and checks it resumes from `step`.
pub(crate) fn restart_resumes(dir: &Path, ckpt: &Path, step: u64) -> Result<(), String> {
    let run = dir.join(format!("restart-{step}"));
    fs::create_dir_all(&run).unwrap();
    let mut job = Job::new(&run);
    let target = (step + 2).to_string();
    let flags = ["--checkpoint-dir", ckpt.to_str().unwrap(), "--max-steps", &target, "--validation", "none"];
    job.start_all(&flags, PEER_TIMEOUT);
    let all: Vec<usize> = (0..WORLD).collect();
    job.wait_exits(&all, Instant::now(), RUN_LIMIT)?;
    for r in 0..WORLD {
        if !job.exits[r].unwrap().0.success() {
            return Err(format!("the restart failed on rank {r}:\n{}", job.logs()));
        }
    }
    let log = job.stderr(0);
    let out = job.stdout(0);
    if !log.contains("resuming from checkpoint")
        || !out.contains(&format!("steps={target} "))
        || !out.contains("(2 this run)")
    {
        return Err(format!("the restart did not resume from step {step}:\n{}", job.logs()));
    }
    Ok(())
}

/// After a kill: the newest valid checkpoint loads and a restart resumes from it (or there was none to lose).
pub(crate) fn state_intact(dir: &Path) -> Result<String, String> {
    let ckpt = dir.join("ckpt");
    match newest_valid(&ckpt)? {
        Some(step) => {
            restart_resumes(dir, &ckpt, step)?;
            Ok(format!("resumed from step {step}"))
        }
        None => Ok("no checkpoint yet, nothing to lose".into()),
    }
}

/// What a case reports.
pub(crate) struct Outcome {
    pub(crate) detail: String,
    pub(crate) detection: Option<Duration>,
}

pub(crate) type Case = Box<dyn FnOnce(&Path, &mut Rng) -> Result<Outcome, String>>;

pub(crate) const TRAIN: &[&str] = &["--epochs", "500", "--validation", "none", "--checkpoint-every", "5"];
