//! Training step time of hytrain's engine against PyTorch DistributedDataParallel on gloo, in the same run: LeNet
//! and ResNet-18 (CIFAR variant), batch 64 per rank of 3x32x32 inputs, 2 local CPU processes, one intra-op thread
//! per process on both sides, SGD (lr 0.01, momentum 0.5) with cross-entropy.
//!
//! `resnet18_cifar` is torchvision's ResNet-18 as it comes (python/examples/resnet18_cifar.py, 10 classes, the same
//! inputs and optimizer) exported with `python -m hytrain_export` (through python/tests/cached_export.py, so the
//! minutes-long AOTInductor compile happens once per source and torch version) and trained by hytrain through its
//! compiled step, measured beside two peers: PyTorch DDP eager and PyTorch DDP under `torch.compile` (Inductor's
//! C++ backend). The export needs torchvision in HYTRAIN_BENCH_PYTHON's environment (`cargo xtask bench` installs
//! it).
//!
//! `gpt_bench` is python/examples/gpt.py at a bench size (vocabulary 512, context 128, 4 layers of 4 heads, 128
//! wide, the head tied to the token embedding; python/tests/cached_export.py's `gpt_bench`), exported and measured
//! against the same two peers on batches of 8 random sequences of 128 token ids per rank, next-token cross-entropy
//! over every position, AdamW (lr 1e-3, weight decay 0.01) on both sides.
//!
//! A step is forward, backward, gradient allreduce and optimizer update (hytrain's `Ddp::train_step`; on the
//! PyTorch side `zero_grad`, forward, `backward` with DDP's bucketed allreduce, `step`). Both sides train on 4
//! random batches made once before the clock starts, skip warm-up steps, and report rank 0's median step time;
//! each side runs HYTRAIN_STEP_BENCH_ROUNDS times (default 2, alternating which goes first) and keeps its best
//! median, since the machines these run on are shared and their load drifts. Beside wall time, each side reports
//! the CPU time its rank-0 process (all threads) spent per step, which other load moves much less.
//!
//! This process only drives: it starts each side's 2 ranks as processes with torchrun's variables (RANK,
//! WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT): for hytrain itself again with
//! HYTRAIN_STEP_BENCH_MODEL set (and HYTRAIN_STEP_BENCH_FOLDER, the exported folder, for an exported model), for
//! PyTorch `benches/ddp_step.py` under HYTRAIN_BENCH_PYTHON (default python3).
//!
//! Run with `cargo xtask bench` (which prepares the Python peer) or `cargo bench --bench step_time [MODEL...]` (MODEL
//! one of lenet, resnet18, resnet18_cifar, gpt_bench; default all). Step counts can be changed with
//! HYTRAIN_STEP_BENCH_STEPS, e.g. `lenet=20:200,resnet18=2:6,resnet18_cifar=3:20,gpt_bench=3:20` (warm-up:timed per
//! model).
//! HYTRAIN_STEP_BENCH_OVERLAP=false runs hytrain with its gradient allreduces after backward instead of overlapped
//! with it (`--overlap false`).

use std::io::Read;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hytrain_train::model::{self, ExportedModel, Model};
use hytrain_train::{AdamWConfig, Ddp, DdpOptions, OptimizerConfig, ReduceOp, SgdConfig};

const WORLD: usize = 2;
/// Images per rank per step.
const BATCH: i64 = 64;
/// Sequences per rank per step for the GPT (of its 128-token context).
const GPT_BATCH: i64 = 8;
/// (model, warm-up steps, timed steps). ResNet-18 takes seconds per step on one thread: few steps keep the bench
/// within minutes on a 2-core machine.
/// torchvision's ResNet-18 downsamples 32x32 inputs 4x in its stem, so its steps are about 15x shorter than the
/// CIFAR variant's; its compiled peer spends its first step (a warm-up step) compiling.
const DEFAULT_STEPS: [(&str, usize, usize); 4] =
    [("lenet", 20, 200), ("resnet18", 2, 6), (RESNET18_EXPORTED, 3, 20), (GPT_EXPORTED, 3, 20)];
/// torchvision's ResNet-18, trained exported (python/tests/cached_export.py's name for it).
const RESNET18_EXPORTED: &str = "resnet18_cifar";
/// python/examples/gpt.py at the bench's size, trained exported (python/tests/cached_export.py's name for it).
const GPT_EXPORTED: &str = "gpt_bench";

/// Whether hytrain trains `model_name` from a folder written by python/hytrain_export.
fn is_exported(model_name: &str) -> bool {
    [RESNET18_EXPORTED, GPT_EXPORTED].contains(&model_name)
}

/// Samples per rank per step: sequences for the GPT, images otherwise (benches/ddp_step.py is given the same).
fn batch_size(model_name: &str) -> i64 {
    if model_name == GPT_EXPORTED {
        GPT_BATCH
    } else {
        BATCH
    }
}
/// A side that has not finished by then is killed and reported as failed, never waited on forever.
const DEADLINE: Duration = Duration::from_secs(900);

/// Rank 0's measurement of one side in one round.
#[derive(Debug, Clone)]
struct Measured {
    median_ms: f64,
    /// Median CPU time of rank 0's process (all its threads) per timed step.
    cpu_median_ms: f64,
    /// hytrain only: mean time per timed step the training thread spent on gradient allreduces (pack and unpack
    /// included); with overlap only what backward did not hide.
    allreduce_ms: Option<f64>,
    /// hytrain only: mean allreduce work per timed step wherever it ran (the communication thread with overlap).
    allreduce_busy_ms: Option<f64>,
    /// hytrain only: mean time per timed step broadcasting BatchNorm buffers from rank 0.
    broadcast_ms: Option<f64>,
    /// hytrain only: mean time of one allreduce of two f64 flags, what the training loop adds per step.
    flag_allreduce_us: Option<f64>,
    /// PyTorch only: the first warm-up step (torch.compile's compile included).
    first_step_ms: Option<f64>,
}

/// Who hytrain is measured against.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Peer {
    /// PyTorch DDP on gloo, eager.
    Eager,
    /// The same DDP module under `torch.compile` (Inductor).
    Compiled,
}

impl Peer {
    /// benches/ddp_step.py's mode argument.
    fn mode(self) -> &'static str {
        match self {
            Peer::Eager => "eager",
            Peer::Compiled => "compile",
        }
    }

    /// Name in the tables.
    fn label(self) -> &'static str {
        match self {
            Peer::Eager => "PyTorch DDP",
            Peer::Compiled => "PyTorch DDP + torch.compile",
        }
    }

    /// Name in the summary table.
    fn summary_name(self) -> &'static str {
        match self {
            Peer::Eager => "PyTorch DDP (gloo)",
            Peer::Compiled => "PyTorch DDP + torch.compile (gloo, Inductor)",
        }
    }
}

/// The peers a model is measured against: the exported model also against compiled PyTorch, which is what hytrain's
/// AOTInductor-compiled step competes with.
fn peers(model_name: &str) -> &'static [Peer] {
    if is_exported(model_name) {
        &[Peer::Eager, Peer::Compiled]
    } else {
        &[Peer::Eager]
    }
}

/// One model's measurements: hytrain's best round and each peer's.
struct ModelRun {
    name: String,
    ours: Result<Measured>,
    theirs: Vec<(Peer, Result<Measured>)>,
}

/// One hytrain rank: rendezvous from the torchrun-style environment, then time `warmup + steps` train steps of
/// `model_name` (built in, or loaded from the exported `folder`).
fn hytrain_rank(model_name: &str, folder: Option<&str>, warmup: usize, steps: usize) -> Result<()> {
    tch::set_num_threads(1);
    let plan = hytrain::cluster::detect().context("reading the rank's torchrun-style environment")?;
    let membership = hytrain::membership(&plan);
    let options = hytrain::comm::CommOptions { rendezvous_timeout: Duration::from_secs(120), ..Default::default() };
    let comm = hytrain::comm::init(&membership, false, &options).context("rendezvous of the hytrain ranks")?;
    let rank = membership.rank;
    tch::manual_seed(rank as i64);
    let net: Box<dyn Model> = match folder {
        Some(folder) => Box::new(ExportedModel::load(folder, tch::Device::Cpu)?),
        None => model::build(model_name, 10, &[3, 32, 32], tch::Device::Cpu)?,
    };
    let options = DdpOptions { overlap: overlap()?, ..Default::default() };
    let mut ddp = Ddp::new(net, comm, options)?;
    let batch = batch_size(model_name);
    // 4 batches, made before the clock starts. The GPT: AdamW on random sequences of its 128-token context from its
    // 512-token vocabulary (python/tests/cached_export.py's gpt_bench), targets as many random tokens.
    let (optimizer, lr, batches): (_, _, Vec<Vec<(tch::Tensor, tch::Tensor)>>) = if model_name == GPT_EXPORTED {
        let tokens = || tch::Tensor::randint(512, [batch, 128], tch::kind::INT64_CPU);
        let batches = (0..4).map(|_| vec![(tokens(), tokens())]).collect();
        (OptimizerConfig::AdamW(AdamWConfig::default()), 1e-3, batches)
    } else {
        let sgd = OptimizerConfig::Sgd(SgdConfig { momentum: 0.5, ..Default::default() });
        let batches = (0..4)
            .map(|_| {
                vec![(
                    tch::Tensor::randn([batch, 3, 32, 32], tch::kind::FLOAT_CPU),
                    tch::Tensor::randint(10, [batch], tch::kind::INT64_CPU),
                )]
            })
            .collect();
        (sgd, 0.01, batches)
    };
    let mut optimizer = optimizer.build(ddp.parameters())?;
    let mut times = Vec::with_capacity(steps);
    let mut cpu_times = Vec::with_capacity(steps);
    let mut before = ddp.stats().clone();
    for i in 0..warmup + steps {
        if i == warmup {
            before = ddp.stats().clone();
        }
        let started = Instant::now();
        let cpu_started = process_cpu_secs();
        ddp.train_step(&batches[i % batches.len()], optimizer.as_mut(), lr)?;
        if i >= warmup {
            times.push(started.elapsed().as_secs_f64());
            cpu_times.push(process_cpu_secs() - cpu_started);
        }
    }
    let after = ddp.stats().clone();
    // What `Trainer::run` adds to every step besides `train_step`: one allreduce of two f64 flags.
    let flag_rounds = 50;
    let started = Instant::now();
    for _ in 0..flag_rounds {
        ddp.allreduce_f64(&mut [0.0, 0.0], ReduceOp::Sum)?;
    }
    let flag_us = started.elapsed().as_secs_f64() / flag_rounds as f64 * 1e6;
    if rank == 0 {
        let per_step = |secs: f64| secs / steps as f64 * 1e3;
        let row = serde_json::json!({
            "side": "hytrain",
            "model": model_name,
            "median_ms": median(&mut times) * 1e3,
            "cpu_median_ms": median(&mut cpu_times) * 1e3,
            "allreduce_ms": per_step(after.allreduce_secs - before.allreduce_secs),
            "allreduce_busy_ms": per_step(after.allreduce_busy_secs - before.allreduce_busy_secs),
            "broadcast_ms": per_step(after.broadcast_secs - before.broadcast_secs),
            "flag_allreduce_us": flag_us,
            "steps": steps,
        });
        println!("{row}");
    }
    Ok(())
}

/// CPU time of this process (all its threads) so far, in seconds.
fn process_cpu_secs() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into `ts`, a valid and exclusively borrowed local.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Starts one side's `WORLD` ranks, waits for all of them (killing them all past the deadline or when one fails),
/// and parses rank 0's JSON line.
fn run_side(side: &str, command: impl Fn() -> Command) -> Result<Measured> {
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port();
    let mut ranks: Vec<Child> = Vec::new();
    for rank in 0..WORLD {
        let mut c = command();
        c.env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", WORLD.to_string())
            .env("LOCAL_WORLD_SIZE", WORLD.to_string())
            .env("GROUP_RANK", "0")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("OMP_NUM_THREADS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match c.spawn() {
            Ok(child) => ranks.push(child),
            Err(e) => {
                for mut started in ranks {
                    let _ = started.kill();
                    let _ = started.wait();
                }
                bail!("{side}: cannot start rank {rank} ({c:?}): {e}");
            }
        }
    }
    // Outputs are small (one line, a few warnings); reading them after exit cannot fill a pipe and block.
    let started = Instant::now();
    let mut codes = [None; WORLD];
    while codes.iter().any(Option::is_none) {
        for (rank, child) in ranks.iter_mut().enumerate() {
            if codes[rank].is_none() {
                codes[rank] = child.try_wait()?;
            }
        }
        let failed = codes.iter().any(|c| c.is_some_and(|s| !s.success()));
        if failed || started.elapsed() > DEADLINE {
            for child in ranks.iter_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let mut why = String::new();
            for (rank, child) in ranks.iter_mut().enumerate() {
                let mut err = String::new();
                let _ = child.stderr.take().map(|mut s| s.read_to_string(&mut err));
                if let Some(line) = err.lines().rev().find(|l| !l.trim().is_empty()) {
                    why.push_str(&format!(" rank {rank}: {line};"));
                }
            }
            let what = if failed { "a rank failed" } else { "ranks did not finish within the deadline" };
            bail!("{side}: {what}:{why}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    ranks[0].stdout.take().expect("piped").read_to_string(&mut out)?;
    let line = out
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| anyhow!("{side}: rank 0 printed no result line; its output was: {}", out.trim()))?;
    let v: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("{side}: bad result line '{line}'"))?;
    let field = |name: &str| v[name].as_f64().ok_or_else(|| anyhow!("{side}: no {name} in '{line}'"));
    Ok(Measured {
        median_ms: field("median_ms")?,
        cpu_median_ms: field("cpu_median_ms")?,
        allreduce_ms: v["allreduce_ms"].as_f64(),
        allreduce_busy_ms: v["allreduce_busy_ms"].as_f64(),
        broadcast_ms: v["broadcast_ms"].as_f64(),
        flag_allreduce_us: v["flag_allreduce_us"].as_f64(),
        first_step_ms: v["first_step_ms"].as_f64(),
    })
}

/// Warm-up and timed steps per model: the defaults, or HYTRAIN_STEP_BENCH_STEPS (`model=warmup:steps,...`).
fn step_counts() -> Result<Vec<(String, usize, usize)>> {
    let mut counts: Vec<(String, usize, usize)> =
        DEFAULT_STEPS.iter().map(|(m, w, s)| (m.to_string(), *w, *s)).collect();
    let Ok(spec) = std::env::var("HYTRAIN_STEP_BENCH_STEPS") else {
        return Ok(counts);
    };
    for item in spec.split(',').filter(|s| !s.is_empty()) {
        let parsed = item.split_once('=').and_then(|(m, ws)| {
            let (w, s) = ws.split_once(':')?;
            Some((m, w.parse::<usize>().ok()?, s.parse::<usize>().ok()?))
        });
        match parsed {
            Some((m, w, s)) if s > 0 => match counts.iter_mut().find(|c| c.0 == m) {
                Some(c) => (c.1, c.2) = (w, s),
                None => bail!("HYTRAIN_STEP_BENCH_STEPS: unknown model '{m}'; the bench runs {}", model_names()),
            },
            _ => bail!(
                "HYTRAIN_STEP_BENCH_STEPS: '{item}' is not model=warmup:steps with at least one timed step \
                 (e.g. lenet=20:200,resnet18=2:6,resnet18_cifar=3:20)"
            ),
        }
    }
    Ok(counts)
}

/// The models the bench knows, for messages.
fn model_names() -> String {
    DEFAULT_STEPS.map(|(m, _, _)| m).join(", ")
}

/// Whether hytrain overlaps allreduces with backward: HYTRAIN_STEP_BENCH_OVERLAP, default true.
fn overlap() -> Result<bool> {
    match std::env::var("HYTRAIN_STEP_BENCH_OVERLAP") {
        Err(_) => Ok(true),
        Ok(v) => Ok(hytrain_train::config::parse_bool("HYTRAIN_STEP_BENCH_OVERLAP", &v)?),
    }
}

/// Rounds per side: HYTRAIN_STEP_BENCH_ROUNDS, default 2.
fn rounds() -> Result<usize> {
    match std::env::var("HYTRAIN_STEP_BENCH_ROUNDS") {
        Err(_) => Ok(2),
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("HYTRAIN_STEP_BENCH_ROUNDS: '{v}' is not a positive number of rounds"),
        },
    }
}

/// The best of a side's rounds: lowest median wall time and, separately, lowest median CPU time; the first error
/// when no round succeeded.
fn best(rounds: Vec<Result<Measured>>) -> Result<Measured> {
    let mut first_error = None;
    let mut best: Option<Measured> = None;
    let mut cpu = f64::INFINITY;
    for r in rounds {
        match r {
            Ok(m) => {
                cpu = cpu.min(m.cpu_median_ms);
                if best.as_ref().is_none_or(|b| m.median_ms < b.median_ms) {
                    best = Some(m);
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let mut best = best.ok_or_else(|| first_error.expect("at least one round"))?;
    best.cpu_median_ms = cpu;
    Ok(best)
}

/// A row of a comparison table: both values and their ratio, or n/a where a side was not measured.
fn row(
    model_name: &str,
    peer: Peer,
    ours: &Result<Measured>,
    theirs: &Result<Measured>,
    value: fn(&Measured) -> f64,
) -> String {
    let fmt = |m: &Result<Measured>| m.as_ref().map_or("n/a".to_string(), |m| format!("{:.1}", value(m)));
    let ratio = match (ours, theirs) {
        (Ok(a), Ok(b)) => format!("{:.2}", value(a) / value(b)),
        _ => "n/a".into(),
    };
    format!("| {model_name} | {} | {} | {} | {ratio} |", peer.label(), fmt(ours), fmt(theirs))
}

fn main() -> ExitCode {
    // One line per failure, never a backtrace: the driver reports a rank's last line of stderr.
    let result = match std::env::var("HYTRAIN_STEP_BENCH_MODEL") {
        Ok(model_name) => rank_main(&model_name),
        Err(_) => drive(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("step_time: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A rank started by [`drive`]: its step counts come in the environment.
fn rank_main(model_name: &str) -> Result<()> {
    let count = |name: &str| -> Result<usize> {
        let v = std::env::var(name).with_context(|| format!("{name} is not set"))?;
        v.parse().with_context(|| format!("{name}: '{v}' is not a number of steps"))
    };
    let folder = std::env::var("HYTRAIN_STEP_BENCH_FOLDER").ok();
    hytrain_rank(model_name, folder.as_deref(), count("HYTRAIN_STEP_BENCH_WARMUP")?, count("HYTRAIN_STEP_BENCH_TIMED")?)
}

/// Exports `model_name` through python/tests/cached_export.py (a cached folder after the first time) and returns
/// the folder.
fn exported_folder(python: &str, model_name: &str) -> Result<String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/tests/cached_export.py");
    eprintln!("step_time: {model_name}: exporting with {python} {script} {model_name} (cached after the first time)");
    let out = Command::new(python)
        .arg(script)
        .arg(model_name)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {python} {script}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let folder = stdout.lines().rev().find(|l| !l.trim().is_empty());
    match folder {
        Some(folder) if out.status.success() => Ok(folder.trim().to_string()),
        _ => bail!(
            "exporting {model_name} failed ({}; it needs torch 2.11, and torchvision for resnet18_cifar, in \
             {python}'s environment): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

/// Runs every side for every model and prints the tables.
fn drive() -> Result<()> {
    // `cargo bench` passes `--bench`; other arguments select models by name.
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    if let Some(unknown) = filter.iter().find(|f| !DEFAULT_STEPS.iter().any(|(m, _, _)| m == f)) {
        bail!("unknown model '{unknown}'; the bench runs {}", model_names());
    }
    let python = std::env::var("HYTRAIN_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/ddp_step.py");
    let exe = std::env::current_exe()?;
    let rounds = rounds()?;
    let overlap = if overlap()? { "on" } else { "off" };
    let mut runs = Vec::new();
    for (model_name, warmup, steps) in step_counts()? {
        if !filter.is_empty() && !filter.contains(&model_name) {
            continue;
        }
        let peers = peers(&model_name);
        // What hytrain's ranks build: a built-in model by name, an exported one from its folder.
        let target = if is_exported(&model_name) {
            exported_folder(&python, &model_name).map(Some).map_err(|e| format!("{e:#}"))
        } else {
            Ok(None)
        };
        eprintln!(
            "step_time: {model_name}: {rounds} round(s) of {warmup} warm-up + {steps} timed steps per side \
             (hytrain, {})",
            peers.iter().map(|p| p.label()).collect::<Vec<_>>().join(", ")
        );
        let hytrain = || match &target {
            Ok(target) => run_side("hytrain", || {
                let mut c = Command::new(&exe);
                if let Some(folder) = target {
                    c.env("HYTRAIN_STEP_BENCH_FOLDER", folder);
                }
                c.env("HYTRAIN_STEP_BENCH_MODEL", &model_name)
                    .env("HYTRAIN_STEP_BENCH_WARMUP", warmup.to_string())
                    .env("HYTRAIN_STEP_BENCH_TIMED", steps.to_string());
                c
            }),
            Err(e) => Err(anyhow!("hytrain: {e}")),
        };
        let pytorch = |peer: Peer| match &target {
            Ok(_) => run_side(&format!("pytorch {}", peer.mode()), || {
                let mut c = Command::new(&python);
                c.arg(script)
                    .arg(&model_name)
                    .arg(warmup.to_string())
                    .arg(steps.to_string())
                    .arg(batch_size(&model_name).to_string())
                    .arg(peer.mode());
                c
            }),
            Err(_) => Err(anyhow!("pytorch {}: not run, the export failed", peer.mode())),
        };
        // Side 0 is hytrain, then the peers. Rounds alternate the order (reversed every other round), so a load
        // that rises or falls during the run favours no side.
        let sides = 1 + peers.len();
        let mut measured: Vec<Vec<Result<Measured>>> = (0..sides).map(|_| Vec::new()).collect();
        for round in 0..rounds {
            let order: Vec<usize> = if round % 2 == 0 { (0..sides).collect() } else { (0..sides).rev().collect() };
            for side in order {
                let m = if side == 0 { hytrain() } else { pytorch(peers[side - 1]) };
                measured[side].push(m);
            }
        }
        let mut best_of = measured.into_iter().map(best);
        let ours = best_of.next().expect("hytrain's side");
        runs.push(ModelRun { name: model_name, ours, theirs: peers.iter().copied().zip(best_of).collect() });
    }
    println!(
        "\nstep time, {WORLD} CPU processes, batch {BATCH} per rank ({GPT_EXPORTED}: {GPT_BATCH} sequences of 128 \
         tokens), 1 intra-op thread each (rank 0's median ms per step, best of {rounds} round(s); lower is better); \
         hytrain's allreduce/backward overlap {overlap} ({RESNET18_EXPORTED} is torchvision's ResNet-18 and \
         {GPT_EXPORTED} python/examples/gpt.py, exported with hytrain_export: a compiled step \
         returns every gradient at once, so its allreduces follow it)"
    );
    let table = |what: &str, value: fn(&Measured) -> f64| {
        println!("| model | peer | hytrain {what} | peer {what} | ratio (hytrain/peer) |");
        println!("|---|---|---:|---:|---:|");
        for run in &runs {
            for (peer, theirs) in &run.theirs {
                println!("{}", row(&run.name, *peer, &run.ours, theirs, value));
            }
        }
    };
    table("step ms", |m| m.median_ms);
    println!("\nCPU time of rank 0's process per step (all threads; less moved by other load than wall time)");
    table("CPU ms", |m| m.cpu_median_ms);
    println!();
    for run in &runs {
        if let Ok(Measured {
            allreduce_ms: Some(a),
            allreduce_busy_ms: Some(busy),
            broadcast_ms: Some(b),
            flag_allreduce_us: Some(f),
            ..
        }) = &run.ours
        {
            println!(
                "hytrain {}: of each step {a:.1} ms waiting for gradient allreduces after backward \
                 ({busy:.1} ms of allreduce work in all: pack, unpack and waiting for the other rank included), \
                 {b:.1} ms broadcasting buffers; the training loop's per-step flag allreduce would add {f:.0} us",
                run.name
            );
        }
        for (peer, theirs) in &run.theirs {
            if let (Peer::Compiled, Ok(Measured { first_step_ms: Some(first), .. })) = (peer, theirs) {
                println!(
                    "{} {}: first step {:.1} s (torch.compile compiling), a warm-up step",
                    peer.label(),
                    run.name,
                    first / 1e3
                );
            }
        }
    }
    for run in &runs {
        for (peer, theirs) in &run.theirs {
            if let (Ok(a), Ok(b)) = (&run.ours, theirs) {
                summarize(&run.name, *peer, a.median_ms, b.median_ms)?;
            }
        }
    }
    let mut failures = Vec::new();
    let mut sides = 0;
    for run in &runs {
        sides += 1 + run.theirs.len();
        let all = std::iter::once(&run.ours).chain(run.theirs.iter().map(|(_, m)| m));
        for e in all.filter_map(|m| m.as_ref().err()) {
            failures.push(format!("{}: {e:#}", run.name));
        }
    }
    for f in &failures {
        println!("not measured: {f}");
    }
    if failures.is_empty() {
        Ok(())
    } else {
        bail!("{} of {sides} sides failed", failures.len())
    }
}

/// Appends a row to the summary file `cargo xtask bench` prints its one table from (HYTRAIN_BENCH_SUMMARY).
fn summarize(model_name: &str, peer: Peer, ours_ms: f64, theirs_ms: f64) -> Result<()> {
    let Ok(path) = std::env::var("HYTRAIN_BENCH_SUMMARY") else {
        return Ok(());
    };
    // Issue 8's targets: LeNet at most 0.8x PyTorch DDP's step time, ResNet-18 at most 1.0x. Issue 13's for the
    // exported models: at most 0.8x eager DDP, at most 1.0x DDP under torch.compile.
    let target = match (model_name, peer) {
        ("lenet", _) => "<=0.8",
        (m, Peer::Eager) if is_exported(m) => "<=0.8",
        _ => "<=1.0",
    };
    let comparison = match model_name {
        RESNET18_EXPORTED => {
            format!("step time {model_name} (exported torchvision ResNet-18), {WORLD} processes")
        }
        GPT_EXPORTED => format!("step time {model_name} (exported GPT, AdamW), {WORLD} processes"),
        _ => format!("step time {model_name}, {WORLD} processes"),
    };
    let row = serde_json::json!({
        "comparison": comparison, "unit": "ms", "higher_is_better": false,
        "hytrain": ours_ms, "peer_name": peer.summary_name(), "peer": theirs_ms, "target": target,
    });
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open the summary file {path}"))?;
    use std::io::Write;
    writeln!(f, "{row}").with_context(|| format!("cannot write {path}"))
}
