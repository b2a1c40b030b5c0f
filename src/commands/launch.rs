//! `hytrain launch`: one worker process per slot on this node, the way torchrun starts them.
//!
//! The launcher works as the command of a SageMaker host or a Kubeflow pod: the node rank, node count and master
//! come from the detected plan, and each child gets torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, ...) so
//! any torchrun-aware program runs under it. It forwards SIGTERM and SIGINT to the workers, and when one worker
//! fails it stops the others and, as torchrun's `--max-restarts`, starts them all again while restarts are left
//! (a training job rejoins the others and resumes from its last checkpoint), else exits with that worker's code.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cluster::{self, Env, Plan, Platform};

/// How many workers to start on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NprocPerNode {
    /// What the platform asks for (Kubeflow's nprocPerNode, SageMaker's processes per host), else one per visible
    /// GPU, else one per CPU (torchrun's `auto`).
    Auto,
    /// Exactly this many.
    Count(usize),
}

impl std::str::FromStr for NprocPerNode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            n => match n.parse::<usize>() {
                Ok(0) | Err(_) => Err(format!("'{s}' is not a process count; use a number >= 1 or 'auto'")),
                Ok(n) => Ok(Self::Count(n)),
            },
        }
    }
}

/// Options of `hytrain launch`.
#[derive(Debug, Clone)]
pub struct LaunchArgs {
    /// Workers on this node.
    pub nproc_per_node: NprocPerNode,
    /// Overrides the master port; on a single local node a free port is picked when this is not given.
    pub master_port: Option<u16>,
    /// After SIGTERM/SIGINT, how long workers get to checkpoint and exit before SIGKILL.
    pub signal_grace: Duration,
    /// After one worker fails, how long the others get to exit after SIGTERM before SIGKILL.
    pub failure_grace: Duration,
    /// How many times to start every worker again after one fails; `None`: the platform's (Kubeflow's
    /// `PET_MAX_RESTARTS`), else none.
    pub max_restarts: Option<usize>,
    /// The worker command and its arguments.
    pub command: Vec<String>,
}

/// Decides the per-node process count: `auto` is what the platform asks for, else, as torchrun's `auto`, one per
/// GPU the CUDA driver sees (after CUDA_VISIBLE_DEVICES) when it sees any, else one per CPU.
pub fn resolve_nproc(plan: &Plan, requested: NprocPerNode) -> usize {
    resolve_nproc_with(plan, requested, || {
        hytrain_cuda::CudaDriver::load().ok().map(|driver| driver.device_count() as usize)
    })
}

/// [`resolve_nproc`] with the GPU count from `visible_gpus` (asked only when it matters).
pub fn resolve_nproc_with(plan: &Plan, requested: NprocPerNode, visible_gpus: impl FnOnce() -> Option<usize>) -> usize {
    match requested {
        NprocPerNode::Count(n) => n,
        NprocPerNode::Auto => {
            if let Some(n) = plan.nproc_per_node_hint() {
                tracing::info!("--nproc-per-node auto: {n} process(es), as the platform asks");
                return n;
            }
            if let Some(n) = visible_gpus().filter(|&n| n > 0) {
                tracing::info!("--nproc-per-node auto: {n} process(es), one per visible GPU");
                return n;
            }
            let n = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
            tracing::info!("--nproc-per-node auto: {n} process(es), one per CPU (no GPU visible)");
            n
        }
    }
}

struct Worker {
    rank: usize,
    local_rank: usize,
    child: Child,
    status: Option<ExitStatus>,
}

/// Starts the workers, supervises them and returns the exit code the launcher should exit with.
pub fn run(plan: &Plan, parent_env: &Env, args: &LaunchArgs) -> anyhow::Result<i32> {
    let Some((program, program_args)) = args.command.split_first() else {
        bail!("hytrain launch needs a command to run: hytrain launch --nproc-per-node N -- COMMAND [ARGS...]");
    };
    let nproc = resolve_nproc(plan, args.nproc_per_node);
    if let Some(hint) = plan.nproc_per_node_hint() {
        if hint != nproc {
            tracing::warn!(
                "the platform asks for {hint} processes per node, starting {nproc} as --nproc-per-node says"
            );
        }
    }
    let mut node = plan.topology.clone();
    node.master_port = match args.master_port {
        Some(port) => port,
        None if plan.platform == Platform::Local && node.nnodes == 1 => free_port()?,
        None => node.master_port,
    };
    match plan.nnodes_range {
        Some(range) => tracing::info!(
            "starting {nproc} workers as one node of --nnodes {range} (the rendezvous store gives its node rank): {}",
            args.command.join(" ")
        ),
        None => tracing::info!(
            "starting {nproc} workers on node {} of {}, master {}:{}: {}",
            node.node_rank,
            node.nnodes,
            node.master_addr,
            node.master_port,
            args.command.join(" ")
        ),
    }

    // Every worker of a single node is a child of this launcher, so they can share a secret nobody else knows.
    let token_env = cluster::launch_token_env(plan).context("cannot generate a job token")?;
    if !token_env.is_empty() {
        tracing::info!("no job token configured; generated one for this node's workers");
    }

    let signal = Arc::new(AtomicI32::new(0));
    let _signals = forward_signals_to(&signal)?;

    let max_restarts = args.max_restarts.or(plan.max_restarts).unwrap_or(0);
    let mut restarts = 0;
    loop {
        // The workers of one start are one node at the store; restarted, they are a new node that joins.
        let node_id = format!("{}#{}.{restarts}", node.current_host, std::process::id());
        let node_env = [(cluster::NODE_ID_VAR.to_owned(), node_id)];
        let env: Vec<_> = token_env.iter().chain(&node_env).cloned().collect();
        let mut workers = start_workers(&node, nproc, parent_env, &env, program, program_args)?;
        let ended = supervise(&mut workers, &signal, args);
        match ended {
            Ended::Failed(code) if restarts < max_restarts => {
                restarts += 1;
                tracing::warn!(
                    "restarting the {nproc} workers of this node (restart {restarts} of {max_restarts}, \
                     --max-restarts); a worker failed with exit code {code}"
                );
                if plan.platform == Platform::Local && node.nnodes == 1 && args.master_port.is_none() {
                    // The old store's port may still be held by its connections' TIME_WAIT.
                    node.master_port = free_port()?;
                }
            }
            Ended::Failed(code) if max_restarts > 0 => {
                tracing::error!("a worker failed after {restarts} restarts of {max_restarts}; giving up");
                return Ok(code);
            }
            Ended::Failed(code) | Ended::Finished(code) => return Ok(code),
        }
    }
}

/// Starts one worker per local rank of `node`; on a failure to start one, kills those started.
fn start_workers(
    node: &cluster::Topology,
    nproc: usize,
    parent_env: &Env,
    extra_env: &[(String, String)],
    program: &str,
    program_args: &[String],
) -> anyhow::Result<Vec<Worker>> {
    let mut workers = Vec::with_capacity(nproc);
    for local_rank in 0..nproc {
        let topology = node.worker(nproc, local_rank);
        let mut command = Command::new(program);
        command
            .args(program_args)
            .envs(cluster::worker_env(&topology, parent_env))
            .envs(extra_env.iter().map(|(k, v)| (k, v)));
        // Own process group: a terminal's Ctrl-C reaches only the launcher, which forwards it once.
        command.process_group(0);
        // SAFETY: prctl is async-signal-safe and touches only the child's own state after fork.
        unsafe {
            command.pre_exec(|| {
                // A launcher killed with SIGKILL cannot stop its workers; let the kernel do it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                kill_all(&mut workers);
                return Err(e).with_context(|| format!("could not start worker {local_rank}: {program}"));
            }
        };
        workers.push(Worker { rank: topology.rank, local_rank, child, status: None });
    }
    Ok(workers)
}

/// How a set of workers ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Every worker exited by itself, or the launcher was signalled and passed the signal on: the launcher's exit
    /// code, which a restart must not replace.
    Finished(i32),
    /// A worker failed (the launcher stopped the others): that worker's exit code.
    Failed(i32),
}

/// Waits for the workers, forwarding signals and stopping everyone when one fails.
fn supervise(workers: &mut [Worker], signal: &AtomicI32, args: &LaunchArgs) -> Ended {
    let mut verdict: Option<Ended> = None;
    // Once set, the workers still running at this instant get SIGKILL.
    let mut kill_at: Option<Instant> = None;
    let mut killed = false;
    loop {
        let received = signal.swap(0, Ordering::SeqCst);
        if received != 0 {
            tracing::warn!("received signal {received}; forwarding it to {} workers", alive(workers));
            signal_all(workers, received);
            verdict.get_or_insert(Ended::Finished(128 + received));
            kill_at.get_or_insert(Instant::now() + args.signal_grace);
        }
        let mut stop_others = false;
        for w in workers.iter_mut().filter(|w| w.status.is_none()) {
            match w.child.try_wait() {
                Ok(Some(status)) => {
                    w.status = Some(status);
                    let code = exit_code(status);
                    if code != 0 && verdict.is_none() {
                        tracing::error!(
                            "worker rank {} (local rank {}, pid {}) failed: {}; stopping the other workers",
                            w.rank,
                            w.local_rank,
                            w.child.id(),
                            describe(status)
                        );
                        verdict = Some(Ended::Failed(code));
                        kill_at = Some(Instant::now() + args.failure_grace);
                        stop_others = true;
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("cannot poll worker rank {}: {e}", w.rank),
            }
        }
        if stop_others {
            signal_all(workers, libc::SIGTERM);
        }
        if alive(workers) == 0 {
            return verdict.unwrap_or(Ended::Finished(0));
        }
        if !killed && kill_at.is_some_and(|at| Instant::now() >= at) {
            tracing::warn!("{} workers still running after the grace period; killing them", alive(workers));
            signal_all(workers, libc::SIGKILL);
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill_all(workers: &mut [Worker]) {
    signal_all(workers, libc::SIGKILL);
    for w in workers.iter_mut() {
        let _ = w.child.wait();
    }
}

/// Signals each running worker's whole process group, so a worker that is a shell script does not leave its own
/// children running (and holding the job's stdout) after it is gone.
fn signal_all(workers: &[Worker], sig: i32) {
    for w in workers.iter().filter(|w| w.status.is_none()) {
        // SAFETY: kill(2) on the process group of a child we spawned as its group leader and have not reaped.
        unsafe {
            libc::kill(-(w.child.id() as libc::pid_t), sig);
        }
    }
}

fn alive(workers: &[Worker]) -> usize {
    workers.iter().filter(|w| w.status.is_none()).count()
}

/// The shell's convention: the exit code, or 128 + the signal that killed the process.
fn exit_code(status: ExitStatus) -> i32 {
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "unknown status".to_owned(),
    }
}

fn forward_signals_to(slot: &Arc<AtomicI32>) -> anyhow::Result<Vec<signal_hook::SigId>> {
    let mut ids = Vec::new();
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let slot = Arc::clone(slot);
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
        let id = unsafe { signal_hook::low_level::register(sig, move || slot.store(sig, Ordering::SeqCst)) }
            .with_context(|| format!("cannot install a handler for signal {sig}"))?;
        ids.push(id);
    }
    Ok(ids)
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).context("cannot find a free local port")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local_plan() -> Plan {
        cluster::detect_from(&Env::from_pairs([("HOSTNAME", "laptop")])).unwrap()
    }

    #[test]
    fn auto_is_the_platforms_count_first_then_one_per_gpu_then_one_per_cpu() {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let mut plan = local_plan();
        assert_eq!(plan.nproc_per_node_hint(), None);
        assert_eq!(resolve_nproc_with(&plan, NprocPerNode::Auto, || Some(8)), 8);
        assert_eq!(resolve_nproc_with(&plan, NprocPerNode::Auto, || Some(0)), cpus);
        assert_eq!(resolve_nproc_with(&plan, NprocPerNode::Auto, || None), cpus);
        plan.nproc_per_node = Some(4);
        let asked = std::cell::Cell::new(false);
        let n = resolve_nproc_with(&plan, NprocPerNode::Auto, || {
            asked.set(true);
            Some(8)
        });
        assert_eq!((n, asked.get()), (4, false), "the platform's count wins without looking for GPUs");
        assert_eq!(resolve_nproc_with(&plan, NprocPerNode::Count(2), || Some(8)), 2);
    }
}
