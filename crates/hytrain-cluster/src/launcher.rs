//! Who started this process ([`Launcher`]) and the ranks and sizes its variables give. A launcher can run inside
//! any platform (torchrun in a Kubeflow pod, mpirun on SageMaker), so every platform's planner asks here first.
//! The precedence is documented on the crate root.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::env::Env;
use crate::error::DetectError;
use crate::parse::{self, below, COUNT_EXPECTED, RANK_EXPECTED};
use crate::topology::Counts;

/// Who started this process.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Launcher {
    /// Nobody in particular: the platform ran it directly (a pod's command, SageMaker's `train`, a shell).
    None,
    /// torchrun; `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE` are global (torchrun semantics).
    Torchrun,
    /// mpirun (Open MPI); ranks come from `OMPI_COMM_WORLD_*`.
    Mpirun,
    /// `hytrain launch`; same variables and meaning as torchrun.
    HytrainLaunch,
}

impl Launcher {
    /// The kebab-case name used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Launcher::None => "none",
            Launcher::Torchrun => "torchrun",
            Launcher::Mpirun => "mpirun",
            Launcher::HytrainLaunch => "hytrain-launch",
        }
    }
}

impl fmt::Display for Launcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Value of `HYTRAIN_LAUNCHER` that marks a child of `hytrain launch`.
pub const HYTRAIN_LAUNCH_MARK: &str = "hytrain-launch";

/// Variables only an MPI launcher sets for each rank.
const MPI_MARKERS: [&str; 5] = [
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "PMIX_RANK",
];

/// Who started this process; the innermost launcher wins (see the crate's Precedence section).
pub(crate) fn detect(env: &Env) -> Launcher {
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

/// The counts `launcher` gives this process, whatever the platform; `None` when no launcher started it, so the
/// platform's own rules apply.
pub(crate) fn counts(env: &Env, launcher: Launcher, notes: &mut Vec<String>) -> Result<Option<Counts>, DetectError> {
    match launcher {
        Launcher::Torchrun | Launcher::HytrainLaunch => torchrun_counts(env).map(Some),
        Launcher::Mpirun => mpi_counts(env, notes).map(Some),
        Launcher::None => Ok(None),
    }
}

fn required(env: &Env, var: &str, hint: &str) -> Result<usize, DetectError> {
    parse::opt_number(env, var, "a whole number such as 0, 1, 2")?
        .ok_or_else(|| DetectError::Missing { var: var.to_owned(), hint: hint.to_owned() })
}

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

/// Counts from torchrun-style variables: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE are global. Also what a
/// user sets by hand for env:// style jobs (see the local platform).
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
