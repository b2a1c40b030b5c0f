//! Kubeflow: a pod of a Training Operator v1 `PyTorchJob` or of a Trainer v2 `TrainJob`, run directly or under
//! torchrun or `hytrain launch`. Without a launcher, v1 puts the NODE rank in RANK and counts processes in
//! WORLD_SIZE, v2 gives only PET_*; both mean rank = node_rank * nproc_per_node + local_rank.

use crate::elastic::NodeRange;
use crate::env::Env;
use crate::error::{shown, DetectError};
use crate::launcher::{self, Launcher};
use crate::parse::{self, below, product, COUNT_EXPECTED, RANK_EXPECTED};
use crate::plan::Plan;
use crate::platform::{local, Platform};
use crate::topology::Counts;

/// The plan of a process in a Kubeflow pod; `platform` is the version [`super::detect`] recognised.
pub(crate) fn plan(env: &Env, platform: Platform, launcher: Launcher) -> Result<Plan, DetectError> {
    let mut notes = Vec::new();
    let (counts, range) = match launcher::counts(env, launcher, &mut notes)? {
        Some(counts) => (counts, None),
        None => counts(env, &mut notes)?,
    };
    let master = master(env, launcher, counts.nnodes, &mut notes)?;
    let nproc_per_node = pet_nproc(env)?;
    let mut plan = local::assemble(env, platform, launcher, counts, master, nproc_per_node, notes);
    // Settled once the store's place is known (`elastic::settle`).
    plan.nnodes_range = range;
    plan.max_restarts = parse::opt_number(env, "PET_MAX_RESTARTS", "a whole number of restarts such as 0 or 3")?;
    Ok(plan)
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
/// processes in WORLD_SIZE; v2 gives only PET_*; both mean the same node_rank * nproc + local_rank. An elastic
/// job's `PET_NNODES=MIN:MAX` comes back beside them; its node rank may be missing (node 0 stands in for it).
fn counts(env: &Env, notes: &mut Vec<String>) -> Result<(Counts, Option<NodeRange>), DetectError> {
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
    let range = match nnodes_env {
        Some(NNodes::Range(min, max)) => Some(NodeRange { min, max }),
        _ => None,
    };
    let (node_rank, node_var) = match node {
        Some(n) => n,
        None if nnodes == 1 || range.is_some() => (0, "PET_NODE_RANK"),
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
    let counts = Counts {
        rank: product(node_rank, n, "node rank x PET_NPROC_PER_NODE")?
            .checked_add(local_rank)
            .ok_or_else(|| DetectError::Inconsistent("global rank is too large".into()))?,
        local_rank,
        world_size,
        local_world_size: n,
        node_rank,
        nnodes,
    };
    Ok((counts, range))
}

/// The master: MASTER_ADDR (v1), else PET_MASTER_ADDR, else the host of PET_RDZV_ENDPOINT; the port likewise. A
/// job of several pods must name one; a single pod falls back to this machine.
fn master(env: &Env, launcher: Launcher, nnodes: usize, notes: &mut Vec<String>) -> Result<(String, u16), DetectError> {
    let mut addr = parse::opt_host(env, "MASTER_ADDR")?;
    let mut port = parse::opt_port(env, "MASTER_PORT")?;
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
    if addr.is_none() && nnodes > 1 {
        return Err(DetectError::Missing {
            var: "MASTER_ADDR".into(),
            hint: "no MASTER_ADDR, PET_MASTER_ADDR or PET_RDZV_ENDPOINT names the master of this multi-pod job".into(),
        });
    }
    Ok(local::master(addr, port, launcher, notes))
}
