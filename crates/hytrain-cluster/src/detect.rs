//! Which launcher started this process, which platform runs the job, and the topology for every platform except
//! SageMaker (see `sagemaker.rs`). The precedence is documented on the crate root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::env::Env;
use crate::error::{shown, DetectError};
use crate::parse;
use crate::plan::{Launcher, Paths, Plan, Platform};
use crate::topology::{Topology, HYTRAIN_LAUNCH_MARK};

/// Master address when nobody names one: this machine, for a single-node job.
pub const DEFAULT_MASTER_ADDR: &str = "127.0.0.1";
/// Master port when nobody names one: torchrun's default.
pub const DEFAULT_MASTER_PORT: u16 = 29500;
/// Where SageMaker mounts the job's files; `HYTRAIN_SM_ROOT` replaces it.
pub const DEFAULT_SM_ROOT: &str = "/opt/ml";
/// Folder, relative to the working directory, that holds model, checkpoints and output off SageMaker.
pub const LOCAL_OUT_DIR: &str = "hytrain-out";

/// Variables only an MPI launcher sets for each rank.
const MPI_MARKERS: [&str; 5] = [
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "PMIX_RANK",
];
/// Variables the SageMaker platform or its toolkit sets.
const SAGEMAKER_MARKERS: [&str; 5] =
    ["SM_HOSTS", "SM_CURRENT_HOST", "SM_TRAINING_ENV", "TRAINING_JOB_NAME", "TRAINING_JOB_ARN"];
/// Variables a Kubeflow operator sets for torchrun (v1 and v2 alike).
const KUBEFLOW_MARKERS: [&str; 4] = ["PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_RDZV_ENDPOINT"];

/// The SageMaker root: `HYTRAIN_SM_ROOT`, else /opt/ml.
pub(crate) fn sm_root(env: &Env) -> PathBuf {
    PathBuf::from(env.value("HYTRAIN_SM_ROOT").unwrap_or(DEFAULT_SM_ROOT))
}

/// Who started this process; the innermost launcher wins (see the crate's Precedence section).
pub(crate) fn launcher(env: &Env) -> Launcher {
    if env.value("HYTRAIN_LAUNCHER") == Some(HYTRAIN_LAUNCH_MARK) {
        Launcher::HytrainLaunch
    } else if env.has("TORCHELASTIC_RUN_ID") {
        Launcher::Torchrun
    } else if MPI_MARKERS.iter().any(|v| env.has(v)) {
        Launcher::Mpirun
    } else if ["GROUP_RANK", "LOCAL_RANK", "RANK", "WORLD_SIZE"].iter().all(|v| env.has(v)) {
        Launcher::Torchrun
    } else {
        Launcher::None
    }
}

/// The outer platform (see the crate's Precedence section).
pub(crate) fn platform(env: &Env, root: &Path, launcher: Launcher) -> Result<Platform, DetectError> {
    if launcher == Launcher::HytrainLaunch {
        if let Some(v) = env.value("HYTRAIN_PLATFORM") {
            return v.parse::<Platform>().map_err(|problem: String| DetectError::Malformed {
                origin: "HYTRAIN_PLATFORM".to_owned(),
                problem: shown(&problem),
                expected: format!(
                    "one of {} (hytrain launch sets it for its workers)",
                    Platform::ALL.map(Platform::as_str).join(", ")
                ),
            });
        }
    }
    if SAGEMAKER_MARKERS.iter().any(|v| env.has(v)) || root.join("input/config/resourceconfig.json").exists() {
        return Ok(Platform::Sagemaker);
    }
    if KUBEFLOW_MARKERS.iter().any(|v| env.has(v)) {
        return Ok(if kubeflow_v1_shape(env, launcher) {
            Platform::KubeflowPytorchjob
        } else {
            Platform::KubeflowTrainjob
        });
    }
    Ok(match launcher {
        Launcher::Torchrun => Platform::Torchrun,
        Launcher::Mpirun => Platform::Mpi,
        Launcher::None | Launcher::HytrainLaunch => Platform::Local,
    })
}

/// Whether PET_* variables come from the v1 training operator rather than Trainer v2. v2 sets exactly PET_NNODES,
/// PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT and reserves RANK, WORLD_SIZE and
/// MASTER_ADDR; everything else is a v1 trait.
fn kubeflow_v1_shape(env: &Env, launcher: Launcher) -> bool {
    let operator_set = launcher == Launcher::None && ["RANK", "WORLD_SIZE", "MASTER_ADDR"].iter().any(|v| env.has(v));
    let elastic = env.has("PET_RDZV_ENDPOINT") || env.value("PET_NNODES").is_some_and(|v| v.contains(':'));
    // v1 names the master's headless service `<job>-master-0`; v2 names it `<job>-node-0-0.<job>`.
    let v1_master = env.value("PET_MASTER_ADDR").is_some_and(|v| v.trim().ends_with("-master-0"));
    // A v1 job without a Master replica gets only PET_NNODES; v2 always names the node rank and the master.
    let masterless = !env.has("PET_NODE_RANK") && !env.has("PET_MASTER_ADDR");
    operator_set || elastic || v1_master || masterless
}

/// The platform `parent` runs on, for the `HYTRAIN_PLATFORM` mark `hytrain launch` passes its workers.
pub(crate) fn outer_platform(parent: &Env) -> Option<Platform> {
    platform(parent, &sm_root(parent), launcher(parent)).ok()
}

/// Ranks and sizes, before master and hosts are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    pub local_world_size: usize,
    pub node_rank: usize,
    pub nnodes: usize,
}

impl Counts {
    /// One process alone.
    pub(crate) const SINGLE: Counts =
        Counts { rank: 0, local_rank: 0, world_size: 1, local_world_size: 1, node_rank: 0, nnodes: 1 };

    pub(crate) fn topology(
        self,
        master_addr: String,
        master_port: u16,
        hosts: Vec<String>,
        current_host: String,
    ) -> Topology {
        Topology {
            rank: self.rank,
            local_rank: self.local_rank,
            world_size: self.world_size,
            local_world_size: self.local_world_size,
            node_rank: self.node_rank,
            nnodes: self.nnodes,
            master_addr,
            master_port,
            hosts,
            current_host,
        }
    }
}

fn below(name: &str, value: usize, limit_name: &str, limit: usize) -> Result<(), DetectError> {
    if value < limit {
        Ok(())
    } else {
        Err(DetectError::OutOfRange { name: name.to_owned(), value, limit_name: limit_name.to_owned(), limit })
    }
}

fn product(a: usize, b: usize, what: &str) -> Result<usize, DetectError> {
    a.checked_mul(b)
        .ok_or_else(|| DetectError::Inconsistent(format!("{what} = {a} x {b} is too large to be a process count")))
}

fn required(env: &Env, var: &str, hint: &str) -> Result<usize, DetectError> {
    parse::opt_number(env, var, "a whole number such as 0, 1, 2")?
        .ok_or_else(|| DetectError::Missing { var: var.to_owned(), hint: hint.to_owned() })
}

const RANK_EXPECTED: &str = "a whole number such as 0, 1, 2";
const COUNT_EXPECTED: &str = "a whole number of at least 1 such as 1, 2, 8";

/// Local rank and local world size given by a launcher, with torchrun's meaning.
fn local_counts(env: &Env, rank_var: &str, size_var: &str, world: usize) -> Result<(usize, usize), DetectError> {
    let local_rank = parse::opt_number(env, rank_var, RANK_EXPECTED)?;
    let local_world = parse::opt_count(env, size_var, COUNT_EXPECTED)?;
    let local_world = match (local_rank, local_world) {
        (Some(_), None) => {
            return Err(DetectError::Missing {
                var: size_var.to_owned(),
                hint: format!("{rank_var} is set, so the number of processes on this node is needed too"),
            })
        }
        (_, w) => w.unwrap_or(1),
    };
    let local_rank = local_rank.unwrap_or(0);
    below(rank_var, local_rank, size_var, local_world)?;
    if local_world > world {
        return Err(DetectError::Inconsistent(format!(
            "{size_var}={local_world} is larger than the world size {world}: a node cannot run more processes than the job"
        )));
    }
    Ok((local_rank, local_world))
}

/// Counts from torchrun-style variables: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE are global.
pub(crate) fn torchrun_counts(env: &Env) -> Result<Counts, DetectError> {
    let hint = "torchrun and hytrain launch set it for every worker they start";
    let rank = required(env, "RANK", hint)?;
    let world_size = required(env, "WORLD_SIZE", hint)?;
    if world_size == 0 {
        return Err(DetectError::Zero { var: "WORLD_SIZE".into() });
    }
    below("RANK", rank, "WORLD_SIZE", world_size)?;
    let (local_rank, local_world_size) = local_counts(env, "LOCAL_RANK", "LOCAL_WORLD_SIZE", world_size)?;
    let (node_rank, node_var) = match parse::opt_number(env, "GROUP_RANK", RANK_EXPECTED)? {
        Some(n) => (n, "GROUP_RANK"),
        None => match parse::opt_number(env, "NODE_RANK", RANK_EXPECTED)? {
            Some(n) => (n, "NODE_RANK"),
            None => (rank / local_world_size, "RANK/LOCAL_WORLD_SIZE"),
        },
    };
    let (nnodes, nnodes_var) = match parse::opt_count(env, "GROUP_WORLD_SIZE", COUNT_EXPECTED)? {
        Some(n) => (n, "GROUP_WORLD_SIZE"),
        None => (world_size.div_ceil(local_world_size), "WORLD_SIZE/LOCAL_WORLD_SIZE"),
    };
    below(node_var, node_rank, nnodes_var, nnodes)?;
    Ok(Counts { rank, local_rank, world_size, local_world_size, node_rank, nnodes })
}

/// Counts from Open MPI's per-rank variables (or PMIx's rank).
pub(crate) fn mpi_counts(env: &Env, notes: &mut Vec<String>) -> Result<Counts, DetectError> {
    let hint = "mpirun (Open MPI) sets it for every rank";
    let rank = match parse::opt_number(env, "OMPI_COMM_WORLD_RANK", RANK_EXPECTED)? {
        Some(r) => r,
        None => parse::opt_number(env, "PMIX_RANK", RANK_EXPECTED)?
            .ok_or_else(|| DetectError::Missing { var: "OMPI_COMM_WORLD_RANK".into(), hint: hint.into() })?,
    };
    let world_size = required(env, "OMPI_COMM_WORLD_SIZE", hint)?;
    if world_size == 0 {
        return Err(DetectError::Zero { var: "OMPI_COMM_WORLD_SIZE".into() });
    }
    below("OMPI_COMM_WORLD_RANK", rank, "OMPI_COMM_WORLD_SIZE", world_size)?;
    let (local_rank, local_world_size) =
        local_counts(env, "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", world_size)?;
    notes.push(
        "launched by mpirun: node_rank = rank / local size assumes ranks are packed node by node (--map-by slot)"
            .into(),
    );
    Ok(Counts {
        rank,
        local_rank,
        world_size,
        local_world_size,
        node_rank: rank / local_world_size,
        nnodes: world_size.div_ceil(local_world_size),
    })
}

/// `PET_NNODES`: a node count, or `min:max` for an elastic job.
enum NNodes {
    Fixed(usize),
    Range(usize, usize),
}

fn pet_nnodes(env: &Env) -> Result<Option<NNodes>, DetectError> {
    let Some(v) = env.value("PET_NNODES") else {
        return Ok(None);
    };
    let expected = "a node count such as 2, or min:max such as 1:4";
    let count = |s: &str| match parse::number("PET_NNODES", s, expected) {
        Ok(0) => Err(DetectError::Zero { var: "PET_NNODES".into() }),
        Ok(n) => Ok(n),
        Err(_) => Err(DetectError::NotANumber { var: "PET_NNODES".into(), value: shown(v), expected: expected.into() }),
    };
    Ok(Some(match v.split_once(':') {
        None => NNodes::Fixed(count(v)?),
        Some((min, max)) => {
            let (min, max) = (count(min)?, count(max)?);
            if min > max {
                return Err(DetectError::Malformed {
                    origin: "PET_NNODES".into(),
                    problem: format!("min {min} is above max {max}"),
                    expected: expected.into(),
                });
            }
            NNodes::Range(min, max)
        }
    }))
}

/// `PET_NPROC_PER_NODE` when it is a number; `None` when absent or "auto".
pub(crate) fn pet_nproc(env: &Env) -> Result<Option<usize>, DetectError> {
    match env.value("PET_NPROC_PER_NODE") {
        None => Ok(None),
        Some(v) if v.trim().eq_ignore_ascii_case("auto") => Ok(None),
        Some(_) => parse::opt_count(env, "PET_NPROC_PER_NODE", "a number of processes per node such as 2, or auto"),
    }
}

/// Counts for a process a Kubeflow pod runs directly (no launcher). v1 puts the NODE rank in RANK and counts
/// processes in WORLD_SIZE; v2 gives only PET_*; both mean the same node_rank * nproc + local_rank.
fn kubeflow_counts(env: &Env, notes: &mut Vec<String>) -> Result<Counts, DetectError> {
    let nproc = pet_nproc(env)?;
    let n = nproc.unwrap_or(1);
    let rank = parse::opt_number(env, "RANK", RANK_EXPECTED)?;
    let pet_node_rank = parse::opt_number(env, "PET_NODE_RANK", RANK_EXPECTED)?;
    let node = match (rank, pet_node_rank) {
        (Some(a), Some(b)) if a != b => {
            return Err(DetectError::Inconsistent(format!(
                "RANK={a} and PET_NODE_RANK={b} disagree; the Kubeflow training operator sets both to the pod index"
            )))
        }
        (Some(a), _) => Some((a, "RANK")),
        (None, Some(b)) => Some((b, "PET_NODE_RANK")),
        (None, None) => None,
    };
    let world = parse::opt_count(env, "WORLD_SIZE", COUNT_EXPECTED)?;
    let nnodes_env = pet_nnodes(env)?;
    let (nnodes, nnodes_var) = match (world, &nnodes_env) {
        (Some(w), _) => {
            if w % n != 0 {
                return Err(DetectError::NotMultiple {
                    var: "WORLD_SIZE".into(),
                    value: w,
                    divisor_var: "PET_NPROC_PER_NODE".into(),
                    divisor: n,
                    why: "Kubeflow sets WORLD_SIZE to pods x nprocPerNode".into(),
                });
            }
            let nn = w / n;
            if let Some(NNodes::Fixed(p)) = nnodes_env {
                if p != nn {
                    return Err(DetectError::Inconsistent(format!(
                        "PET_NNODES={p} disagrees with WORLD_SIZE={w} / PET_NPROC_PER_NODE={n} = {nn} pods"
                    )));
                }
            }
            (nn, if n == 1 { "WORLD_SIZE" } else { "WORLD_SIZE/PET_NPROC_PER_NODE" })
        }
        (None, Some(NNodes::Fixed(p))) => (*p, "PET_NNODES"),
        (None, Some(NNodes::Range(_, max))) => (*max, "PET_NNODES"),
        (None, None) => {
            return Err(DetectError::Missing {
                var: "PET_NNODES".into(),
                hint: "Kubeflow sets WORLD_SIZE (v1 with a Master replica) or PET_NNODES to the job's size".into(),
            })
        }
    };
    if let Some(NNodes::Range(min, max)) = nnodes_env {
        notes.push(format!(
            "elastic PyTorchJob (PET_NNODES={min}:{max}): hytrain rendezvous is fixed-size and waits for {nnodes} \
             nodes; give minReplicas = maxReplicas or run under torchrun"
        ));
    }
    let (node_rank, node_var) = match node {
        Some(n) => n,
        None if nnodes == 1 => (0, "PET_NODE_RANK"),
        None => {
            return Err(DetectError::Missing {
                var: "PET_NODE_RANK".into(),
                hint: "Kubeflow gave this pod no node rank (neither RANK nor PET_NODE_RANK, as in an elastic or \
                       Master-less PyTorchJob); start hytrain under torchrun, whose rendezvous assigns node ranks"
                    .into(),
            })
        }
    };
    below(node_var, node_rank, nnodes_var, nnodes)?;
    let local_rank = parse::opt_number(env, "LOCAL_RANK", RANK_EXPECTED)?;
    below("LOCAL_RANK", local_rank.unwrap_or(0), "PET_NPROC_PER_NODE", n)?;
    let world_size = product(nnodes, n, "nodes x PET_NPROC_PER_NODE")?;
    if n > 1 && local_rank.is_none() {
        notes.push(format!(
            "PET_NPROC_PER_NODE={n}: {node_var}={node_rank} is this pod's node rank and the world counts \
             {world_size} processes; start this pod's {n} processes with `hytrain launch` (this lone process is \
             local rank 0)"
        ));
    }
    if nproc.is_none() && env.has("PET_NPROC_PER_NODE") {
        notes.push(
            "PET_NPROC_PER_NODE=auto: this process counts as its node's only worker; `hytrain launch \
             --nproc-per-node auto` starts one per device"
                .into(),
        );
    }
    let local_rank = local_rank.unwrap_or(0);
    Ok(Counts {
        rank: product(node_rank, n, "node rank x PET_NPROC_PER_NODE")?
            .checked_add(local_rank)
            .ok_or_else(|| DetectError::Inconsistent("global rank is too large".into()))?,
        local_rank,
        world_size,
        local_world_size: n,
        node_rank,
        nnodes,
    })
}

/// Counts with no launcher and no platform: one process, unless RANK/WORLD_SIZE were set by hand (env:// style).
fn local_process_counts(env: &Env, notes: &mut Vec<String>) -> Result<Counts, DetectError> {
    if env.has("RANK") || env.has("WORLD_SIZE") {
        notes.push("RANK and WORLD_SIZE taken from the environment (env:// style, no launcher detected)".into());
        torchrun_counts(env)
    } else {
        Ok(Counts::SINGLE)
    }
}

fn master(
    env: &Env,
    platform: Platform,
    launcher: Launcher,
    nnodes: usize,
    notes: &mut Vec<String>,
) -> Result<(String, u16), DetectError> {
    let kubeflow = matches!(platform, Platform::KubeflowPytorchjob | Platform::KubeflowTrainjob);
    let mut addr = parse::opt_host(env, "MASTER_ADDR")?;
    let mut port = parse::opt_port(env, "MASTER_PORT")?;
    if kubeflow {
        if addr.is_none() {
            addr = parse::opt_host(env, "PET_MASTER_ADDR")?;
        }
        if port.is_none() {
            port = parse::opt_port(env, "PET_MASTER_PORT")?;
        }
        if let (None, Some(v)) = (&addr, env.value("PET_RDZV_ENDPOINT")) {
            let (h, p) = parse::endpoint("PET_RDZV_ENDPOINT", v)?;
            addr = Some(h);
            port = port.or(p);
            notes.push("master taken from PET_RDZV_ENDPOINT (no MASTER_ADDR or PET_MASTER_ADDR)".into());
        }
    }
    if launcher == Launcher::Mpirun {
        notes.push(
            "the MPI backend needs no store; master_addr/master_port (MASTER_ADDR/MASTER_PORT or defaults) serve \
             only the TCP backend"
                .into(),
        );
    }
    let addr = match addr {
        Some(a) => a,
        None if kubeflow && nnodes > 1 => {
            return Err(DetectError::Missing {
                var: "MASTER_ADDR".into(),
                hint: "no MASTER_ADDR, PET_MASTER_ADDR or PET_RDZV_ENDPOINT names the master of this multi-pod job"
                    .into(),
            })
        }
        None => DEFAULT_MASTER_ADDR.to_owned(),
    };
    Ok((addr, port.unwrap_or(DEFAULT_MASTER_PORT)))
}

/// Paths off SageMaker: under ./hytrain-out; the CLI's --model-dir and friends replace them.
fn local_paths() -> Paths {
    let out = Path::new(LOCAL_OUT_DIR);
    Paths {
        channels: BTreeMap::new(),
        model_dir: out.join("model"),
        checkpoint_dir: Some(out.join("checkpoints")),
        output_dir: out.join("output"),
        output_data_dir: out.join("output").join("data"),
        failure_file: None,
    }
}

/// This machine's name: HOSTNAME (Kubernetes sets it to the pod name), else "localhost".
pub(crate) fn hostname(env: &Env) -> String {
    env.value("HOSTNAME").unwrap_or("localhost").to_owned()
}

/// The plan for every platform but SageMaker.
pub(crate) fn plan(env: &Env, platform: Platform, launcher: Launcher) -> Result<Plan, DetectError> {
    let mut notes = Vec::new();
    let kubeflow = matches!(platform, Platform::KubeflowPytorchjob | Platform::KubeflowTrainjob);
    let counts = match launcher {
        Launcher::Torchrun | Launcher::HytrainLaunch => torchrun_counts(env)?,
        Launcher::Mpirun => mpi_counts(env, &mut notes)?,
        Launcher::None if kubeflow => kubeflow_counts(env, &mut notes)?,
        Launcher::None => local_process_counts(env, &mut notes)?,
    };
    let (master_addr, master_port) = master(env, platform, launcher, counts.nnodes, &mut notes)?;
    let nproc_per_node = if kubeflow { pet_nproc(env)? } else { None };
    let current_host = hostname(env);
    let hosts = if counts.nnodes == 1 { vec![current_host.clone()] } else { Vec::new() };
    if platform == Platform::Local && launcher == Launcher::None && counts == Counts::SINGLE {
        notes.push("no launcher or platform detected: a single local process".into());
    }
    Ok(Plan {
        platform,
        launcher,
        topology: counts.topology(master_addr, master_port, hosts, current_host),
        paths: local_paths(),
        hyperparameters: BTreeMap::new(),
        sagemaker: None,
        nproc_per_node,
        notes,
        host_aliases: BTreeMap::new(),
        job_token: Default::default(),
    })
}
