//! Which platform runs the job ([`Platform`]), and one planner per platform that turns its environment into a
//! [`Plan`](crate::Plan): [`kubeflow`] (PyTorchJob v1 and TrainJob v2), [`sagemaker`] (with or without the
//! training toolkit) and [`local`] (no cluster platform: a laptop, a plain container, or torchrun or mpirun on
//! their own). The launcher that started the process ([`crate::launcher`]) is asked first by every planner, since
//! it can run inside any platform. The precedence is documented on the crate root.

pub(crate) mod kubeflow;
pub(crate) mod local;
pub(crate) mod sagemaker;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::env::Env;
use crate::error::{shown, DetectError};
use crate::launcher::Launcher;

/// The outer system that runs the job. torchrun and mpi are the platform only when neither Kubeflow nor SageMaker
/// is detected around them.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Platform {
    /// Kubeflow Training Operator v1 `PyTorchJob`.
    KubeflowPytorchjob,
    /// Kubeflow Trainer v2 `TrainJob` with the torch runtime.
    KubeflowTrainjob,
    /// An Amazon SageMaker training job, with or without the training toolkit.
    Sagemaker,
    /// torchrun (torch.distributed.run) outside any cluster platform.
    Torchrun,
    /// mpirun outside any cluster platform.
    Mpi,
    /// Nothing detected: a laptop or a plain container.
    Local,
}

impl Platform {
    /// Every platform, in the order of [`Platform::as_str`]'s documentation.
    pub const ALL: [Platform; 6] = [
        Platform::KubeflowPytorchjob,
        Platform::KubeflowTrainjob,
        Platform::Sagemaker,
        Platform::Torchrun,
        Platform::Mpi,
        Platform::Local,
    ];

    /// The kebab-case name used in JSON and in `HYTRAIN_PLATFORM`.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::KubeflowPytorchjob => "kubeflow-pytorchjob",
            Platform::KubeflowTrainjob => "kubeflow-trainjob",
            Platform::Sagemaker => "sagemaker",
            Platform::Torchrun => "torchrun",
            Platform::Mpi => "mpi",
            Platform::Local => "local",
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Platform {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Platform::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| format!("'{s}' is not a platform"))
    }
}

/// Master address when nobody names one: this machine, for a single-node job.
pub const DEFAULT_MASTER_ADDR: &str = "127.0.0.1";
/// Master port when nobody names one: torchrun's default.
pub const DEFAULT_MASTER_PORT: u16 = 29500;
/// Where SageMaker mounts the job's files; `HYTRAIN_SM_ROOT` replaces it.
pub const DEFAULT_SM_ROOT: &str = "/opt/ml";
/// Folder, relative to the working directory, that holds model, checkpoints and output off SageMaker.
pub const LOCAL_OUT_DIR: &str = "hytrain-out";

/// Variables the SageMaker platform or its toolkit sets.
const SAGEMAKER_MARKERS: [&str; 5] =
    ["SM_HOSTS", "SM_CURRENT_HOST", "SM_TRAINING_ENV", "TRAINING_JOB_NAME", "TRAINING_JOB_ARN"];
/// Variables a Kubeflow operator sets for torchrun (v1 and v2 alike).
const KUBEFLOW_MARKERS: [&str; 4] = ["PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_RDZV_ENDPOINT"];

/// The SageMaker root: `HYTRAIN_SM_ROOT`, else /opt/ml.
pub(crate) fn sm_root(env: &Env) -> PathBuf {
    PathBuf::from(env.value("HYTRAIN_SM_ROOT").unwrap_or(DEFAULT_SM_ROOT))
}

/// The outer platform (see the crate's Precedence section).
pub(crate) fn detect(env: &Env, root: &Path, launcher: Launcher) -> Result<Platform, DetectError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_names_round_trip_through_from_str_and_json() {
        for p in Platform::ALL {
            assert_eq!(p.as_str().parse::<Platform>().unwrap(), p);
            assert_eq!(serde_json::to_value(p).unwrap(), serde_json::json!(p.as_str()));
        }
        assert!("kubeflow".parse::<Platform>().is_err());
        assert_eq!(serde_json::to_value(Launcher::HytrainLaunch).unwrap(), serde_json::json!("hytrain-launch"));
    }
}
