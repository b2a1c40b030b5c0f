//! Where am I? `hytrain-cluster` turns the environment a launcher hands a worker (Kubeflow PyTorchJob v1, Kubeflow
//! Trainer v2, SageMaker with or without its training toolkit, torchrun, mpirun, or nothing) into one [`Plan`]:
//! the platform, the launcher, the [`Topology`] (global rank, local rank, node rank, sizes, master address and
//! port, hosts), the [`Paths`] (SageMaker channels, model, checkpoint and output directories) and the
//! hyperparameters.
//!
//! This is the only crate of hytrain that reads launcher environment variables or SageMaker's /opt/ml files.
//! [`detect_from`] is a pure function of an [`Env`] map (plus the SageMaker files under `HYTRAIN_SM_ROOT`), so
//! every launcher shape is testable without the launcher.
//!
//! ```no_run
//! let plan = hytrain_cluster::detect().expect("launcher environment is consistent");
//! println!("rank {} of {}", plan.topology.rank, plan.topology.world_size);
//! ```
//!
//! ```
//! use hytrain_cluster::{detect_from, Env, Launcher, Platform};
//! // A Kubeflow PyTorchJob v1 worker pod with nprocPerNode 2, as the training operator sets it up: RANK is the
//! // NODE rank there and WORLD_SIZE counts processes.
//! let env = Env::from_pairs([
//!     ("HYTRAIN_SM_ROOT", "/nonexistent"),
//!     ("MASTER_ADDR", "job-master-0"), ("MASTER_PORT", "23456"),
//!     ("WORLD_SIZE", "6"), ("RANK", "2"),
//!     ("PET_NODE_RANK", "2"), ("PET_NNODES", "3"), ("PET_NPROC_PER_NODE", "2"),
//! ]);
//! let plan = detect_from(&env).unwrap();
//! assert_eq!(plan.platform, Platform::KubeflowPytorchjob);
//! assert_eq!(plan.launcher, Launcher::None);
//! assert_eq!((plan.topology.node_rank, plan.topology.nnodes), (2, 3));
//! assert_eq!(plan.nproc_per_node_hint(), Some(2));
//! // What `hytrain launch` computes for its second worker on this pod:
//! assert_eq!(plan.topology.worker(2, 1).rank, 5);
//! ```
//!
//! ## Precedence
//!
//! **Launcher** (who started this process) — the innermost launcher wins, because an outer one's variables leak
//! into the environment of processes started further in:
//! 1. `HYTRAIN_LAUNCHER=hytrain-launch` → [`Launcher::HytrainLaunch`] (set by [`worker_env`] for each child;
//!    checked first so that `mpirun ... hytrain launch` children are not taken for MPI ranks).
//! 2. `TORCHELASTIC_RUN_ID` → [`Launcher::Torchrun`] (torchrun sets it for every worker).
//! 3. Any of `OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE`, `OMPI_COMM_WORLD_LOCAL_RANK`,
//!    `OMPI_COMM_WORLD_LOCAL_SIZE`, `PMIX_RANK` → [`Launcher::Mpirun`].
//! 4. `GROUP_RANK`, `LOCAL_RANK`, `RANK` and `WORLD_SIZE` all set → [`Launcher::Torchrun`].
//! 5. Otherwise [`Launcher::None`].
//!
//! Under torchrun and `hytrain launch`, RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE are global (torchrun
//! semantics); GROUP_RANK (else NODE_RANK, else RANK / LOCAL_WORLD_SIZE) is the node rank. Under mpirun ranks come
//! from `OMPI_COMM_WORLD_*`, node_rank = rank / local size, and the master is MASTER_ADDR/MASTER_PORT or
//! 127.0.0.1:29500 (the MPI backend needs no store).
//!
//! **Platform** (the outer system):
//! 1. Under `hytrain launch`, `HYTRAIN_PLATFORM` (the parent's platform, which [`worker_env`] passes on because
//!    the launcher overwrites RANK/WORLD_SIZE/MASTER_ADDR, the very variables that tell Kubeflow v1 from v2).
//! 2. [`Platform::Sagemaker`] when `SM_HOSTS`, `SM_CURRENT_HOST`, `SM_TRAINING_ENV`, `TRAINING_JOB_NAME` or
//!    `TRAINING_JOB_ARN` is set, or `<root>/input/config/resourceconfig.json` exists. `<root>` is
//!    `HYTRAIN_SM_ROOT`, else /opt/ml.
//! 3. Kubeflow when `PET_NNODES`, `PET_NODE_RANK`, `PET_MASTER_ADDR` or `PET_RDZV_ENDPOINT` is set:
//!    [`Platform::KubeflowPytorchjob`] (v1) when the operator's RANK/WORLD_SIZE/MASTER_ADDR are present with no
//!    launcher, or the job is elastic (`PET_RDZV_ENDPOINT`, `PET_NNODES=min:max`), or `PET_MASTER_ADDR` is a v1
//!    master service (`<job>-master-0`), or neither PET_NODE_RANK nor PET_MASTER_ADDR is set (a v1 job without a
//!    Master replica); otherwise [`Platform::KubeflowTrainjob`] (Trainer v2, which sets only PET_*).
//! 4. Otherwise [`Platform::Torchrun`] or [`Platform::Mpi`] when such a launcher is present, else
//!    [`Platform::Local`].
//!
//! **Topology with no launcher:**
//! - Kubeflow: node_rank = RANK (v1) or PET_NODE_RANK (they must agree when both are set); N =
//!   PET_NPROC_PER_NODE when numeric, else 1 (the v1 operator's own rule for "auto"); nnodes = WORLD_SIZE / N
//!   (which must divide) else PET_NNODES (the max of an elastic `min:max`); rank = node_rank * N + local_rank
//!   with local_rank = LOCAL_RANK or 0. With N > 1 a note says to start the pod's processes with `hytrain
//!   launch`. Master: MASTER_ADDR, else PET_MASTER_ADDR, else the host of PET_RDZV_ENDPOINT; port likewise,
//!   else 29500.
//! - SageMaker: hosts sorted as strings (algo-10 < algo-2, as SageMaker does); the distribution group is the
//!   hosts of `SM_DISTRIBUTION_INSTANCE_GROUPS` (else hyperparameter `sagemaker_distribution_instance_groups`),
//!   else all hosts; node_rank = rank = index of the current host in it; master = its first host (MASTER_ADDR
//!   wins when set); a host outside the group trains alone. Port: MASTER_PORT (7777 when a toolkit launcher
//!   set it), else [`SAGEMAKER_DEFAULT_MASTER_PORT`]. A toolkit variable wins over the file it derives from
//!   (`SM_HOSTS` over resourceconfig.json, `SM_HPS` over hyperparameters.json, `SM_CHANNEL_<NAME>` over
//!   `<root>/input/data/<name>`, ...).
//! - Local: rank 0 of 1, unless RANK/WORLD_SIZE are set by hand (env:// style); master MASTER_ADDR/MASTER_PORT
//!   or 127.0.0.1:29500.
//!
//! **Rendezvous** ([`Rendezvous`], `rendezvous.rs`): `HYTRAIN_RENDEZVOUS_ENDPOINT` (any platform; the binary's
//! `--rendezvous-endpoint` wins over it) names an external store every rank joins as a client; on Kubeflow,
//! `PET_RDZV_ENDPOINT` follows torchrun's c10d rule (the pod it names hosts the store in global rank 0, on the
//! endpoint's port, and must be node 0; other pods connect to it); otherwise global rank 0 hosts it at the master
//! port. An elastic job's `PET_NNODES=MIN:MAX` with an external store, and a pod of one process or of the processes
//! one `hytrain launch` started (which share its node identity, [`NODE_ID_VAR`]), becomes a [`NodeRange`] the store
//! admits nodes by (node ranks from the store, in arrival order; the topology's node rank and sizes are
//! placeholders until then); under torchrun or mpirun it keeps the fixed size of MAX with the pod's node rank.
//!
//! **Job token** (the secret ranks authenticate each other with, see hytrain-comm): `HYTRAIN_JOB_TOKEN`, else the
//! file `HYTRAIN_JOB_TOKEN_FILE` names (setting both is an error; at least [`MIN_TOKEN_BYTES`] bytes, surrounding
//! whitespace dropped), else on SageMaker a value derived from `TRAINING_JOB_ARN`, else a default derived from the
//! launcher's run id that guards against accidents only. [`launch_token_env`] gives the workers of a one-node
//! `hytrain launch` a random one instead. The plan shows only the token's [`TokenSource`].
//!
//! Paths off SageMaker default to `./hytrain-out/{model,checkpoints,output}`; the CLI overrides them. An empty
//! variable counts as unset. Bad or inconsistent input is a [`DetectError`] whose message is one line naming the
//! variable or file and the expected form; detection never panics.
//!
//! ## Layout
//!
//! Dependencies between the files point one way, down this list:
//! - `lib.rs`: [`detect`] / [`detect_from`], the one entry point: launcher, platform, that platform's planner,
//!   then the token.
//! - `launch.rs`: what `hytrain launch` gives its workers ([`worker_env`], [`launch_token_env`]).
//! - `platform/`: which [`Platform`] runs the job (`platform::detect`) and one planner per platform,
//!   `platform::{kubeflow, sagemaker, local}::plan` (`local` also covers torchrun and mpirun outside a cluster).
//! - `plan.rs`: the [`Plan`] and the descriptions only it holds ([`Paths`], [`SageMaker`], ...).
//! - `token.rs`: the [`JobToken`] and where it comes from (`token::detect`).
//! - `rendezvous.rs`: where the store runs ([`Rendezvous`]): in global rank 0, or outside at an endpoint.
//! - `elastic.rs`: a node count given as a range ([`NodeRange`], `Plan::set_nnodes`).
//! - `launcher.rs`: which [`Launcher`] started this process (`launcher::detect`) and the counts its variables give.
//! - `channel.rs`, `topology.rs`, `parse.rs`, `env.rs`, `error.rs`: the leaves.
//!
//! ## Types other crates share
//!
//! [`JobToken`] (hytrain-comm authenticates connections with it) and [`Channel`] with [`InputMode`] and
//! [`S3Distribution`] (hytrain-data opens channels) are defined here and nowhere else: this crate finds them, it
//! is the bottom of the dependency graph (serde, thiserror and getrandom only, no libtorch, no network), so
//! depending on it costs the other crates nothing, and the plan's values reach them as they are, with no second
//! definition and no conversion to keep in step.

use std::path::PathBuf;

mod channel;
mod elastic;
mod env;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod launch;
mod launcher;
mod parse;
mod plan;
mod platform;
mod rendezvous;
mod token;
mod topology;

pub use channel::{Channel, InputMode, S3Distribution};
pub use elastic::NodeRange;
pub use env::Env;
pub use error::DetectError;
pub use launch::{launch_token_env, worker_env, NODE_ID_VAR};
pub use launcher::{Launcher, HYTRAIN_LAUNCH_MARK};
pub use plan::{Distribution, InstanceGroup, Paths, Plan, SageMaker};
pub use platform::sagemaker::SAGEMAKER_DEFAULT_MASTER_PORT;
pub use platform::{Platform, DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT, DEFAULT_SM_ROOT, LOCAL_OUT_DIR};
pub use rendezvous::{Rendezvous, DEFAULT_RENDEZVOUS_PORT, RENDEZVOUS_ENDPOINT_VAR};
pub use token::{
    store_token, JobToken, TokenSource, LAUNCH_ORIGIN, MIN_TOKEN_BYTES, TOKEN_FILE_VAR, TOKEN_ORIGIN_VAR, TOKEN_VAR,
};
pub use topology::Topology;

/// Detects the plan of this process from its real environment; the SageMaker root is `$HYTRAIN_SM_ROOT` or
/// /opt/ml.
pub fn detect() -> Result<Plan, DetectError> {
    detect_from(&Env::from_process())
}

/// Where to write the reason a job failed, known even when [`detect_from`] itself fails: SageMaker's failure file
/// (`$SM_OUTPUT_DIR/failure`, else `<root>/output/failure`) when the markers say SageMaker, else `None`. A failed
/// detection then still shows up as the training job's `FailureReason` instead of a bare "AlgorithmError".
pub fn failure_file(env: &Env) -> Option<PathBuf> {
    let root = platform::sm_root(env);
    match platform::detect(env, &root, launcher::detect(env)) {
        Ok(Platform::Sagemaker) => Some(platform::sagemaker::failure_file(env, &root)),
        _ => None,
    }
}

/// Detects the plan from `env` (and the SageMaker files under `env["HYTRAIN_SM_ROOT"]`, else /opt/ml), following
/// the precedence in the crate documentation.
pub fn detect_from(env: &Env) -> Result<Plan, DetectError> {
    let root = platform::sm_root(env);
    let launcher = launcher::detect(env);
    let platform = platform::detect(env, &root, launcher)?;
    let mut plan = match platform {
        Platform::Sagemaker => platform::sagemaker::plan(env, &root, launcher)?,
        Platform::KubeflowPytorchjob | Platform::KubeflowTrainjob => platform::kubeflow::plan(env, platform, launcher)?,
        Platform::Torchrun | Platform::Mpi | Platform::Local => platform::local::plan(env, platform, launcher)?,
    };
    plan.host_aliases = parse::host_aliases(env)?;
    plan.rendezvous = rendezvous::detect(env, platform, &plan.topology)?;
    if launcher == Launcher::HytrainLaunch {
        plan.node_id = env.value(NODE_ID_VAR).map(str::to_owned);
    }
    elastic::settle(env, &mut plan)?;
    let job_arn = plan.sagemaker.as_ref().and_then(|s| s.job_arn.as_deref());
    plan.job_token = token::detect(env, launcher, job_arn)?;
    Ok(plan)
}
