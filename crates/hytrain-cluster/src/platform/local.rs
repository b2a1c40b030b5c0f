//! No cluster platform around the job: a laptop, a plain container, or torchrun or mpirun on their own
//! ([`Platform::Local`], [`Platform::Torchrun`], [`Platform::Mpi`]). Results go under `./hytrain-out`. Kubeflow
//! pods are planned the same way once their own rules have given the counts and the master ([`assemble`]).

use std::collections::BTreeMap;
use std::path::Path;

use crate::env::Env;
use crate::error::DetectError;
use crate::launcher::{self, Launcher};
use crate::parse;
use crate::plan::{Paths, Plan};
use crate::platform::{Platform, DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT, LOCAL_OUT_DIR};
use crate::topology::Counts;

/// The plan of a process with no cluster platform around it.
pub(crate) fn plan(env: &Env, platform: Platform, launcher: Launcher) -> Result<Plan, DetectError> {
    let mut notes = Vec::new();
    let counts = match launcher::counts(env, launcher, &mut notes)? {
        Some(counts) => counts,
        None => process_counts(env, &mut notes)?,
    };
    let addr = parse::opt_host(env, "MASTER_ADDR")?;
    let port = parse::opt_port(env, "MASTER_PORT")?;
    let master = master(addr, port, launcher, &mut notes);
    if platform == Platform::Local && launcher == Launcher::None && counts == Counts::SINGLE {
        notes.push("no launcher or platform detected: a single local process".into());
    }
    Ok(assemble(env, platform, launcher, counts, master, None, notes))
}

/// Counts with no launcher and no platform: one process, unless RANK/WORLD_SIZE were set by hand (env:// style).
fn process_counts(env: &Env, notes: &mut Vec<String>) -> Result<Counts, DetectError> {
    if env.has("RANK") || env.has("WORLD_SIZE") {
        notes.push("RANK and WORLD_SIZE taken from the environment (env:// style, no launcher detected)".into());
        launcher::torchrun_counts(env)
    } else {
        Ok(Counts::SINGLE)
    }
}

/// The master once the platform had its say (`addr`, `port`), else this machine and torchrun's port. Under mpirun
/// a note says that only the TCP backend uses it.
pub(crate) fn master(
    addr: Option<String>,
    port: Option<u16>,
    launcher: Launcher,
    notes: &mut Vec<String>,
) -> (String, u16) {
    if launcher == Launcher::Mpirun {
        notes.push(
            "the MPI backend needs no store; master_addr/master_port (MASTER_ADDR/MASTER_PORT or defaults) serve \
             only the TCP backend"
                .into(),
        );
    }
    (addr.unwrap_or_else(|| DEFAULT_MASTER_ADDR.to_owned()), port.unwrap_or(DEFAULT_MASTER_PORT))
}

/// Paths off SageMaker: under ./hytrain-out; the CLI's --model-dir and friends replace them.
fn paths() -> Paths {
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
fn hostname(env: &Env) -> String {
    env.value("HOSTNAME").unwrap_or("localhost").to_owned()
}

/// The plan of a process off SageMaker once its planner knows the counts and the master: this machine's host
/// name (the only host named, on a single node), paths under ./hytrain-out, no hyperparameters.
pub(crate) fn assemble(
    env: &Env,
    platform: Platform,
    launcher: Launcher,
    counts: Counts,
    (master_addr, master_port): (String, u16),
    nproc_per_node: Option<usize>,
    notes: Vec<String>,
) -> Plan {
    let current_host = hostname(env);
    let hosts = if counts.nnodes == 1 { vec![current_host.clone()] } else { Vec::new() };
    Plan {
        platform,
        launcher,
        topology: counts.topology(master_addr, master_port, hosts, current_host),
        paths: paths(),
        hyperparameters: BTreeMap::new(),
        sagemaker: None,
        nproc_per_node,
        notes,
        host_aliases: BTreeMap::new(),
        job_token: Default::default(),
        rendezvous: Default::default(),
        nnodes_range: None,
        max_restarts: None,
        node_id: None,
    }
}
