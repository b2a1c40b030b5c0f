//! Fault injection with real processes: three `hytrain train` ranks on the handwritten digits (as three nodes of a
//! torchrun-style job would run them, each its own process), and faults a cluster really has: a rank SIGKILLed at
//! seeded moments (during the rendezvous, while the others load data, at a training step, while the others wait in
//! an allreduce, while rank 0 writes a checkpoint, during validation), a rank's rendezvous connection cut, a rank
//! stopped (SIGSTOP), a corrupted checkpoint, a full disk under the checkpoint directory (a real size-limited
//! tmpfs), and unauthenticated clients at the rendezvous port.
//!
//! Every case checks that every surviving rank exits non-zero within a bounded time with a message naming the lost
//! rank, and that nothing checkpointed is lost: the newest valid checkpoint loads and a restarted job resumes from
//! it. The moments and victims come from a seeded generator (HYTRAIN_FAULT_SEED, default 7) and are observed
//! through the ranks' own log lines, not through test hooks in the binary. At the end the suite prints how many
//! faults it injected, how many the job survived (detected correctly, state intact) and the longest detection
//! time.
//!
//! S3 faults (503 SlowDown, 500s, resets, truncated and stalled bodies) are injected by
//! crates/hytrain-data/tests/s3_faults.rs through a faulting proxy in front of the real s3s-fs server; this suite
//! does not repeat them.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The peer timeout the jobs run with; a rank that dies is noticed at once, so it only bounds the stall case.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// The stall case's shorter peer timeout.
const STALL_PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// What a survivor may take on top of the detection itself: the watchdog's grace (2 s) and scheduling on a loaded
/// 2-core machine.
const SLACK: Duration = Duration::from_secs(5);
/// A bound for whole runs (start to exit) of the short jobs.
const RUN_LIMIT: Duration = Duration::from_secs(120);
const WORLD: usize = 3;
const TOKEN: &str = "fault-injection-suite-token";

fn digits() -> PathBuf {
    let path = std::env::var_os("HYTRAIN_DEMO_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/demo/digits"));
    assert!(
        path.join("train").is_dir(),
        "{} holds no digits shards: run the tests through `cargo xtask test`, which packs them",
        path.display()
    );
    path
}

/// splitmix64: the seeded choices of victims and moments.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    fn pick(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn rank(&mut self, from: &[usize]) -> usize {
        from[self.next() as usize % from.len()]
    }
}

/// One job's folder and processes; every process left is killed when it is dropped, so no case leaks a rank.
struct Job {
    dir: PathBuf,
    port: u16,
    ranks: Vec<Option<Child>>,
    exits: Vec<Option<(ExitStatus, Instant)>>,
}

impl Drop for Job {
    fn drop(&mut self) {
        for child in self.ranks.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn base_args(dir: &Path, extra: &[&str]) -> Vec<String> {
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
    for (flag, sub) in [
        ("--checkpoint-dir", "ckpt"),
        ("--model-dir", "model"),
        ("--output-dir", "output"),
    ] {
        if !extra.contains(&flag) {
            args.push(flag.into());
            args.push(dir.join(sub).to_str().unwrap().into());
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The environment a torchrun-style launcher gives rank `rank` (each rank its own "node").
fn rank_env(rank: usize, port: u16, peer_timeout: Duration) -> Vec<(&'static str, String)> {
    vec![
        ("RANK", rank.to_string()),
        ("WORLD_SIZE", WORLD.to_string()),
        ("LOCAL_RANK", "0".into()),
        ("LOCAL_WORLD_SIZE", "1".into()),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", port.to_string()),
        ("HYTRAIN_JOB_TOKEN", TOKEN.into()),
        (
            "HYTRAIN_PEER_TIMEOUT",
            peer_timeout.as_secs_f64().to_string(),
        ),
        ("HYTRAIN_RENDEZVOUS_TIMEOUT", "120".into()),
        ("OMP_NUM_THREADS", "1".into()),
        // The rendezvous' "joined" line is a debug line.
        ("RUST_LOG", "info,hytrain_comm=debug".into()),
    ]
}

impl Job {
    fn new(dir: &Path) -> Job {
        Job {
            dir: dir.to_path_buf(),
            port: common::free_port(),
            ranks: (0..WORLD).map(|_| None).collect(),
            exits: vec![None; WORLD],
        }
    }

    /// Starts `rank` with `extra` flags; `master_port` overrides the port it reaches the store at.
    fn start(
        &mut self,
        rank: usize,
        extra: &[&str],
        peer_timeout: Duration,
        master_port: Option<u16>,
    ) {
        let args = base_args(&self.dir, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env = rank_env(rank, master_port.unwrap_or(self.port), peer_timeout);
        let mut c = common::command(&args, &env);
        self.redirect(&mut c, rank);
        self.ranks[rank] = Some(c.spawn().unwrap());
    }

    fn start_all(&mut self, extra: &[&str], peer_timeout: Duration) {
        for rank in 0..WORLD {
            self.start(rank, extra, peer_timeout, None);
        }
    }

    fn redirect(&self, c: &mut Command, rank: usize) {
        c.current_dir(&self.dir)
            .stdout(fs::File::create(self.dir.join(format!("out{rank}.txt"))).unwrap())
            .stderr(fs::File::create(self.dir.join(format!("err{rank}.txt"))).unwrap());
    }

    fn stderr(&self, rank: usize) -> String {
        fs::read_to_string(self.dir.join(format!("err{rank}.txt"))).unwrap_or_default()
    }

    fn stdout(&self, rank: usize) -> String {
        fs::read_to_string(self.dir.join(format!("out{rank}.txt"))).unwrap_or_default()
    }

    fn logs(&self) -> String {
        (0..WORLD)
            .map(|r| {
                format!(
                    "--- rank {r} stdout:\n{}--- rank {r} stderr:\n{}",
                    self.stdout(r),
                    self.stderr(r)
                )
            })
            .collect()
    }

    fn pid(&self, rank: usize) -> i32 {
        self.ranks[rank].as_ref().expect("rank running").id() as i32
    }

    fn signal(&self, rank: usize, signal: i32) {
        unsafe { libc::kill(self.pid(rank), signal) };
    }

    /// Records exits; true when `rank` has exited.
    fn poll(&mut self) {
        for (rank, child) in self.ranks.iter_mut().enumerate() {
            if let (Some(c), None) = (child.as_mut(), self.exits[rank]) {
                if let Ok(Some(status)) = c.try_wait() {
                    self.exits[rank] = Some((status, Instant::now()));
                }
            }
        }
    }

    /// Waits until `ready(self)` holds; fails naming `what` if a rank exits first or `limit` passes.
    fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        ready: impl Fn(&Job) -> bool,
    ) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if ready(self) {
                return Ok(());
            }
            self.poll();
            if let Some(rank) = (0..WORLD).find(|&r| self.exits[r].is_some()) {
                return Err(format!(
                    "rank {rank} exited before {what}:\n{}",
                    self.logs()
                ));
            }
            if start.elapsed() > limit {
                return Err(format!("no {what} within {limit:?}:\n{}", self.logs()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until rank 0 has printed the metrics line of `step`.
    fn at_step(&mut self, step: u64) -> Result<(), String> {
        let needle = format!(" step={step} ");
        self.wait_for(&format!("step {step}"), RUN_LIMIT, |j| {
            j.stdout(0).contains(&needle)
        })
    }

    /// Waits (at most `limit` after `since`) for every rank in `ranks` to exit; returns when the last one did.
    fn wait_exits(
        &mut self,
        ranks: &[usize],
        since: Instant,
        limit: Duration,
    ) -> Result<Duration, String> {
        loop {
            self.poll();
            if ranks.iter().all(|&r| self.exits[r].is_some()) {
                let last = ranks
                    .iter()
                    .map(|&r| self.exits[r].unwrap().1)
                    .max()
                    .unwrap();
                return Ok(last.saturating_duration_since(since));
            }
            if since.elapsed() > limit {
                let running: Vec<usize> = ranks
                    .iter()
                    .copied()
                    .filter(|&r| self.exits[r].is_none())
                    .collect();
                return Err(format!(
                    "ranks {running:?} still running {limit:?} after the fault:\n{}",
                    self.logs()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILLs `rank` and reaps it.
    fn kill(&mut self, rank: usize) {
        if let Some(mut c) = self.ranks[rank].take() {
            let _ = c.kill();
            let status = c.wait().unwrap();
            self.exits[rank] = Some((status, Instant::now()));
        }
    }

    /// Every rank in `survivors` exited non-zero within `limit` of `fault` and says, in its error, that `victim`
    /// was lost. Returns the detection time (fault to the last survivor's exit).
    fn survivors_name(
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
                return Err(format!(
                    "rank {r} exited 0 after rank {victim} was lost:\n{}",
                    self.logs()
                ));
            }
            let err = self.stderr(r);
            let error_part = err.find("hytrain: error:").map(|i| &err[i..]).unwrap_or("");
            if !error_part.contains(&format!("lost rank {victim}")) {
                return Err(format!(
                    "rank {r}'s error does not name rank {victim} as lost:\n{}",
                    self.logs()
                ));
            }
        }
        Ok(took)
    }
}

/// The newest valid checkpoint's step, if any; a checkpoint directory that holds a `ckpt-*` that does not verify
/// newer than it is fine (skipped with a warning), but none may be unreadable as a whole.
fn newest_valid(dir: &Path) -> Result<Option<u64>, String> {
    hytrain::train::latest_valid(dir)
        .map(|r| r.map(|r| r.checkpoint.meta.step))
        .map_err(|e| format!("cannot scan {}: {e}", dir.display()))
}

/// Restarts the whole job on `ckpt` for two more steps and checks it resumes from `step`.
fn restart_resumes(dir: &Path, ckpt: &Path, step: u64) -> Result<(), String> {
    let run = dir.join(format!("restart-{step}"));
    fs::create_dir_all(&run).unwrap();
    let mut job = Job::new(&run);
    let target = (step + 2).to_string();
    let flags = [
        "--checkpoint-dir",
        ckpt.to_str().unwrap(),
        "--max-steps",
        &target,
        "--validation",
        "none",
    ];
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
        return Err(format!(
            "the restart did not resume from step {step}:\n{}",
            job.logs()
        ));
    }
    Ok(())
}

/// After a kill: the newest valid checkpoint loads and a restart resumes from it (or there was none to lose).
fn state_intact(dir: &Path) -> Result<String, String> {
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
struct Outcome {
    detail: String,
    detection: Option<Duration>,
}

type Case = Box<dyn FnOnce(&Path, &mut Rng) -> Result<Outcome, String>>;

const TRAIN: &[&str] = &[
    "--epochs",
    "500",
    "--validation",
    "none",
    "--checkpoint-every",
    "5",
];

/// SIGKILL of a seeded rank once rank 0 has printed a seeded step.
fn kill_at_step(dir: &Path, rng: &mut Rng) -> Result<Outcome, String> {
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
    Ok(Outcome {
        detail: format!("SIGKILL rank {victim} at step {step}; {state}"),
        detection: Some(took),
    })
}

/// The others are blocked in the step's allreduce waiting for the victim when it dies: it is stopped first, the
/// others run into the collective, then it is killed.
fn kill_mid_allreduce(dir: &Path, rng: &mut Rng) -> Result<Outcome, String> {
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
        return Err(format!(
            "rank {r} exited while rank {victim} was only stopped:\n{}",
            job.logs()
        ));
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
fn kill_during_rendezvous(dir: &Path, rng: &mut Rng) -> Result<Outcome, String> {
    let victim = rng.rank(&[0, 1]);
    let survivor = 1 - victim;
    let mut job = Job::new(dir);
    job.start(0, TRAIN, PEER_TIMEOUT, None);
    job.start(1, TRAIN, PEER_TIMEOUT, None);
    job.wait_for("the rendezvous join", RUN_LIMIT, |j| {
        j.stderr(victim).contains("joined the rendezvous")
            && j.stderr(survivor).contains("joined the rendezvous")
    })?;
    let fault = Instant::now();
    job.kill(victim);
    let took = job.survivors_name(&[survivor], victim, fault, PEER_TIMEOUT)?;
    let state = state_intact(dir)?;
    Ok(Outcome {
        detail: format!(
            "SIGKILL rank {victim} in the rendezvous (rank 2 not yet started); {state}"
        ),
        detection: Some(took),
    })
}

/// A rank dies right after the rendezvous, while the others open and load the data.
fn kill_while_loading(dir: &Path, rng: &mut Rng) -> Result<Outcome, String> {
    let victim = rng.rank(&[0, 1, 2]);
    let mut job = Job::new(dir);
    job.start_all(TRAIN, PEER_TIMEOUT);
    job.wait_for("the rendezvous", RUN_LIMIT, |j| {
        j.stderr(victim).contains("rendezvous complete")
    })?;
    let fault = Instant::now();
    job.kill(victim);
    let survivors: Vec<usize> = (0..WORLD).filter(|&r| r != victim).collect();
    let took = job.survivors_name(&survivors, victim, fault, PEER_TIMEOUT)?;
    let state = state_intact(dir)?;
    Ok(Outcome {
        detail: format!("SIGKILL rank {victim} as the ranks load data; {state}"),
        detection: Some(took),
    })
}

/// Rank 0 writes a checkpoint after every step, so that is where it spends its time when another rank dies.
fn kill_while_rank0_checkpoints(dir: &Path, rng: &mut Rng) -> Result<Outcome, String> {
    let victim = rng.rank(&[1, 2]);
    let step = rng.pick(3, 30);
    let mut job = Job::new(dir);
    job.start_all(
        &[
            "--epochs",
            "500",
            "--validation",
            "none",
            "--checkpoint-every",
            "1",
        ],
        PEER_TIMEOUT,
    );
    job.at_step(step)?;
    let fault = Instant::now();
    job.kill(victim);
    let took = job.survivors_name(&[0, 3 - victim], victim, fault, PEER_TIMEOUT)?;
    let state = state_intact(dir)?;
    Ok(Outcome {
        detail: format!(
            "SIGKILL rank {victim} while rank 0 checkpoints every step (at step {step}); {state}"
        ),
        detection: Some(took),
    })
}

/// Rank 0 itself dies while it writes a checkpoint: the torn one must not be taken for valid.
fn kill_rank0_mid_checkpoint(dir: &Path, rng: &mut Rng) -> Result<Outcome, String> {
    let step = rng.pick(3, 30);
    let delay = Duration::from_millis(rng.pick(0, 15));
    let mut job = Job::new(dir);
    job.start_all(
        &[
            "--epochs",
            "500",
            "--validation",
            "none",
            "--checkpoint-every",
            "1",
        ],
        PEER_TIMEOUT,
    );
    let line = format!("{}/ckpt-{step} step={step}", dir.join("ckpt").display());
    job.wait_for(&format!("checkpoint {step}"), RUN_LIMIT, |j| {
        j.stderr(0).contains(&line)
    })?;
    std::thread::sleep(delay);
    let fault = Instant::now();
    job.kill(0);
    let took = job.survivors_name(&[1, 2], 0, fault, PEER_TIMEOUT)?;
    let state = state_intact(dir)?;
    Ok(Outcome {
        detail: format!(
            "SIGKILL rank 0 {} ms after checkpoint {step}, in its next write; {state}",
            delay.as_millis()
        ),
        detection: Some(took),
    })
}

/// A rank dies as the first epoch ends, while the ranks validate (one sample per batch, so validation is long).
fn kill_during_validation(dir: &Path, rng: &mut Rng) -> Result<Outcome, String> {
    let victim = rng.rank(&[0, 1, 2]);
    let mut job = Job::new(dir);
    job.start_all(
        &[
            "--epochs",
            "500",
            "--test-batch-size",
            "1",
            "--checkpoint-every",
            "5",
        ],
        PEER_TIMEOUT,
    );
    job.wait_for("the training line", RUN_LIMIT, |j| {
        j.stderr(0).contains("steps_per_epoch=")
    })?;
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

/// A TCP relay for one rank's rendezvous connections that the test can cut, as a network fault would.
struct Relay {
    port: u16,
    links: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(to: u16) -> Relay {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let links = Arc::new(Mutex::new(Vec::new()));
        let kept = links.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                kept.lock()
                    .unwrap()
                    .extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Relay { port, links }
    }

    fn cut(&self) {
        for s in self.links.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// A rank's connections to the rendezvous store are cut while it trains; the store takes it for lost.
fn dropped_rendezvous_connection(dir: &Path, rng: &mut Rng) -> Result<Outcome, String> {
    let victim = rng.rank(&[1, 2]);
    let step = rng.pick(3, 30);
    let mut job = Job::new(dir);
    let relay = Relay::start(job.port);
    for rank in 0..WORLD {
        job.start(
            rank,
            TRAIN,
            PEER_TIMEOUT,
            (rank == victim).then_some(relay.port),
        );
    }
    job.at_step(step)?;
    let fault = Instant::now();
    relay.cut();
    let others: Vec<usize> = (0..WORLD).filter(|&r| r != victim).collect();
    let took = job.survivors_name(&others, victim, fault, PEER_TIMEOUT)?;
    // The cut-off rank cannot tell a dead master from a dead link; it must stop too, blaming rank 0.
    job.survivors_name(&[victim], 0, fault, PEER_TIMEOUT)?;
    let state = state_intact(dir)?;
    Ok(Outcome {
        detail: format!("cut rank {victim}'s rendezvous connections at step {step}; {state}"),
        detection: Some(took),
    })
}

/// A rank is stopped (SIGSTOP): alive, connected, silent. The others must give up within the peer timeout.
fn stalled_peer(dir: &Path, rng: &mut Rng) -> Result<Outcome, String> {
    let victim = rng.rank(&[0, 1, 2]);
    let step = rng.pick(3, 30);
    let mut job = Job::new(dir);
    job.start_all(TRAIN, STALL_PEER_TIMEOUT);
    job.at_step(step)?;
    let fault = Instant::now();
    job.signal(victim, libc::SIGSTOP);
    let survivors: Vec<usize> = (0..WORLD).filter(|&r| r != victim).collect();
    let result = job.survivors_name(&survivors, victim, fault, STALL_PEER_TIMEOUT + SLACK);
    job.signal(victim, libc::SIGCONT);
    job.kill(victim);
    let took = result?;
    if took < STALL_PEER_TIMEOUT.mul_f64(0.8) {
        return Err(format!(
            "the stopped rank was declared lost after {took:?}, before the peer timeout"
        ));
    }
    let state = state_intact(dir)?;
    Ok(Outcome {
        detail: format!(
            "SIGSTOP rank {victim} at step {step} (peer timeout {STALL_PEER_TIMEOUT:?}); {state}"
        ),
        detection: Some(took),
    })
}

/// The newest checkpoint is corrupted on disk; a restart skips it with a warning and resumes from the one before.
fn corrupted_checkpoint(dir: &Path, rng: &mut Rng) -> Result<Outcome, String> {
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
fn full_disk(dir: &Path, _rng: &mut Rng) -> Result<Outcome, String> {
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

/// Whether the server closed `s` within 30 s.
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// Clients without the job token at the rendezvous port, while the job trains: garbage, a forged proof, and a
/// real hytrain process with the wrong token claiming rank 1. All are refused; the job finishes.
fn unauthenticated_clients(dir: &Path, _rng: &mut Rng) -> Result<Outcome, String> {
    let mut job = Job::new(dir);
    // Long enough that the job is still training when the last client has been refused.
    job.start_all(
        &[
            "--max-steps",
            "400",
            "--validation",
            "none",
            "--checkpoint-every",
            "50",
        ],
        PEER_TIMEOUT,
    );
    job.at_step(3)?;
    let fault = Instant::now();
    let mut garbage = TcpStream::connect(("127.0.0.1", job.port)).map_err(|e| e.to_string())?;
    garbage.write_all(&[0xAB; 4096]).unwrap();
    if !closed_by_server(&mut garbage) {
        return Err("garbage at the rendezvous port was not dropped".into());
    }
    let mut forger = TcpStream::connect(("127.0.0.1", job.port)).map_err(|e| e.to_string())?;
    let mut hello = b"HYTSTOR2".to_vec();
    hello.extend_from_slice(&7u64.to_le_bytes());
    hello.extend_from_slice(b"hytrain");
    hello.extend_from_slice(&[7u8; 32]);
    forger.write_all(&hello).unwrap();
    forger.write_all(&[0u8; 32]).unwrap();
    if !closed_by_server(&mut forger) {
        return Err("a forged proof was not dropped".into());
    }
    let impostor = common::command(
        &base_args(
            dir,
            &[
                "--max-steps",
                "400",
                "--validation",
                "none",
                "--checkpoint-dir",
                "none",
            ],
        )
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
        &rank_env(1, job.port, PEER_TIMEOUT)
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    if k == "HYTRAIN_JOB_TOKEN" {
                        "not-the-job-token-0123".to_string()
                    } else {
                        v
                    },
                )
            })
            .collect::<Vec<_>>(),
    )
    .current_dir(dir)
    .spawn()
    .unwrap();
    let impostor = common::wait(impostor, Duration::from_secs(60), "the wrong-token rank");
    let said = String::from_utf8_lossy(&impostor.stderr);
    if impostor.status.success() || !said.contains("job token mismatch") {
        return Err(format!("the wrong-token process was not refused:\n{said}"));
    }
    let refused_in = fault.elapsed();
    let all: Vec<usize> = (0..WORLD).collect();
    job.wait_exits(&all, fault, RUN_LIMIT)?;
    for r in 0..WORLD {
        if !job.exits[r].unwrap().0.success() {
            return Err(format!(
                "the job failed on rank {r} after unauthenticated clients:\n{}",
                job.logs()
            ));
        }
    }
    if !job.stdout(0).contains("steps=400 ")
        || !job.stderr(0).contains("refused a rendezvous connection")
    {
        return Err(format!(
            "the job did not finish 60 steps or log the refusal:\n{}",
            job.logs()
        ));
    }
    Ok(Outcome {
        detail:
            "garbage, a forged proof and a wrong-token rank refused; the job finished 400 steps"
                .into(),
        detection: Some(refused_in),
    })
}

#[test]
fn every_injected_fault_is_detected_naming_the_lost_rank_and_loses_no_checkpointed_state() {
    let seed: u64 = std::env::var("HYTRAIN_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let mut rng = Rng(seed);
    let cases: Vec<(&str, Case)> = vec![
        ("kill in rendezvous", Box::new(kill_during_rendezvous)),
        ("kill while loading data", Box::new(kill_while_loading)),
        ("kill at a step", Box::new(kill_at_step)),
        ("kill at a step", Box::new(kill_at_step)),
        ("kill at a step", Box::new(kill_at_step)),
        ("kill mid-allreduce", Box::new(kill_mid_allreduce)),
        ("kill mid-allreduce", Box::new(kill_mid_allreduce)),
        (
            "kill while rank 0 checkpoints",
            Box::new(kill_while_rank0_checkpoints),
        ),
        (
            "kill rank 0 mid-checkpoint",
            Box::new(kill_rank0_mid_checkpoint),
        ),
        ("kill during validation", Box::new(kill_during_validation)),
        (
            "dropped rendezvous connection",
            Box::new(dropped_rendezvous_connection),
        ),
        ("stalled peer", Box::new(stalled_peer)),
        ("corrupted checkpoint", Box::new(corrupted_checkpoint)),
        ("full disk", Box::new(full_disk)),
        ("unauthenticated clients", Box::new(unauthenticated_clients)),
    ];
    let root = tempfile::tempdir().unwrap();
    let suite = Instant::now();
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (i, (name, case)) in cases.into_iter().enumerate() {
        let dir = root.path().join(format!("case-{i}"));
        fs::create_dir_all(&dir).unwrap();
        let started = Instant::now();
        let outcome = case(&dir, &mut rng);
        let secs = started.elapsed().as_secs_f64();
        match outcome {
            Ok(o) => {
                println!(
                    "fault {:>2} {name:<30} survived  detected in {:>6}  ({secs:.1} s) {}",
                    i + 1,
                    o.detection
                        .map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64())),
                    o.detail
                );
                report.push((name, o.detection));
            }
            Err(e) => {
                println!("fault {:>2} {name:<30} FAILED ({secs:.1} s)", i + 1);
                failures.push(format!("fault {} ({name}): {e}", i + 1));
            }
        }
    }
    let injected = report.len() + failures.len();
    let longest = report
        .iter()
        .filter_map(|(name, d)| d.map(|d| (d, *name)))
        .max();
    let summary = format!(
        "fault injection summary (seed {seed}): {injected} faults injected, {} survived (detected correctly, state \
         intact), longest detection time {} ; suite took {:.0} s",
        report.len(),
        longest.map_or("-".into(), |(d, name)| format!("{:.2} s ({name})", d.as_secs_f64())),
        suite.elapsed().as_secs_f64()
    );
    // Straight to the process's stderr, past the test harness's capture: `cargo xtask test` shows the summary even
    // when the suite passes.
    let _ = writeln!(std::io::stderr(), "{summary}");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
