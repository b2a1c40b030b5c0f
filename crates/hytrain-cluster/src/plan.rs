//! The [`Plan`]: what detection found, in the launchers' own words. Only descriptions live here; each platform's
//! planner (`platform/`) fills them in.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::channel::Channel;
use crate::elastic::NodeRange;
use crate::launcher::Launcher;
use crate::platform::Platform;
use crate::rendezvous::Rendezvous;
use crate::token::JobToken;
use crate::topology::Topology;

/// Everything a worker needs to know about where it runs, as `hytrain explain --json` prints it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Plan {
    /// The outer system that started the job.
    pub platform: Platform,
    /// Who started this very process.
    pub launcher: Launcher,
    /// Ranks, sizes and the master's address.
    pub topology: Topology,
    /// Where data comes from and results go.
    pub paths: Paths,
    /// Hyperparameters the platform passed (SageMaker), decoded to plain strings; empty elsewhere.
    pub hyperparameters: BTreeMap<String, String>,
    /// SageMaker-only facts; `None` on every other platform.
    pub sagemaker: Option<SageMaker>,
    /// Processes per node the platform asks for, if it says (see [`Plan::nproc_per_node_hint`]).
    pub nproc_per_node: Option<usize>,
    /// Human-readable remarks on choices detection made (defaults taken, ambiguities resolved).
    pub notes: Vec<String>,
    /// Host names mapped to addresses by `HYTRAIN_HOST_ALIASES`, like lines of /etc/hosts (see
    /// [`Plan::address_of`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub host_aliases: BTreeMap<String, String>,
    /// The secret ranks authenticate each other with; serialized and displayed as its source only.
    #[serde(default)]
    pub job_token: JobToken,
    /// Where the rendezvous store runs: in global rank 0, or outside at an endpoint every rank joins.
    #[serde(default)]
    pub rendezvous: Rendezvous,
    /// A node count given as a range: the store admits the nodes and gives node ranks, and the topology's ranks and
    /// sizes are placeholders (node 0 of MAX) until then. `None`: the topology is the job's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nnodes_range: Option<NodeRange>,
    /// How many times `hytrain launch` may restart this node's workers after one fails, as torchrun's
    /// `--max-restarts`: Kubeflow's `PET_MAX_RESTARTS` (an elastic PyTorchJob's `maxRestarts`). `None` when the
    /// platform does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restarts: Option<usize>,
    /// What tells this process's node from the others at the standalone store, shared by the processes one
    /// `hytrain launch` started together ([`NODE_ID_VAR`](crate::NODE_ID_VAR)); `None` for a process started
    /// otherwise, which is a node of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
}

impl Plan {
    /// The `nproc_per_node` the platform asks for: Kubeflow's numeric `PET_NPROC_PER_NODE`, SageMaker's
    /// `sagemaker_mpi_num_of_processes_per_host`, or SageMaker's GPU count (at least 1) when
    /// `sagemaker_torch_distributed_enabled` is on. `None` when the platform does not say or says "auto".
    pub fn nproc_per_node_hint(&self) -> Option<usize> {
        self.nproc_per_node
    }

    /// The interface NCCL should use between hosts, as SageMaker's training toolkit sets `NCCL_SOCKET_IFNAME`:
    /// SageMaker's network interface (`SM_NETWORK_INTERFACE_NAME`, else resourceconfig.json's
    /// `network_interface_name`). `None` off SageMaker.
    pub fn nccl_socket_ifname(&self) -> Option<&str> {
        self.sagemaker.as_ref()?.network_interface_name.as_deref()
    }

    /// The address to connect to for `host`: its `HYTRAIN_HOST_ALIASES` entry, else the name itself (resolved by
    /// DNS when connecting). The aliases let a job shaped like a multi-host SageMaker or Kubeflow job run on one
    /// machine, `algo-1=127.0.0.1,algo-2=127.0.0.1`, without editing /etc/hosts.
    pub fn address_of(&self, host: &str) -> String {
        self.host_aliases.get(host).cloned().unwrap_or_else(|| host.to_owned())
    }
}

/// Where input data is and where results go.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Paths {
    /// Input channels by name (SageMaker); empty elsewhere.
    pub channels: BTreeMap<String, Channel>,
    /// Where the final model goes (SageMaker uploads it as model.tar.gz).
    pub model_dir: PathBuf,
    /// Where checkpoints go (SageMaker mirrors it to S3 and restores it on restart).
    pub checkpoint_dir: Option<PathBuf>,
    /// Where output files go.
    pub output_dir: PathBuf,
    /// Where extra output data goes (SageMaker uploads it as output.tar.gz).
    pub output_data_dir: PathBuf,
    /// Where a failure reason goes (SageMaker's `FailureReason` is its first 1024 characters).
    pub failure_file: Option<PathBuf>,
}

/// Facts only a SageMaker job has.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SageMaker {
    /// `TRAINING_JOB_NAME` (or the toolkit's job name).
    pub job_name: Option<String>,
    /// `TRAINING_JOB_ARN`.
    pub job_arn: Option<String>,
    /// `SAGEMAKER_REGION` (or `AWS_REGION`).
    pub region: Option<String>,
    /// The network interface peers are reached through (`NCCL_SOCKET_IFNAME` wants it).
    pub network_interface_name: Option<String>,
    /// The instance type of this host, e.g. `ml.p4d.24xlarge`.
    pub current_instance_type: Option<String>,
    /// The instance group this host belongs to.
    pub instance_group: Option<String>,
    /// Every instance group of a heterogeneous cluster by name.
    pub instance_groups: BTreeMap<String, InstanceGroup>,
    /// The instance groups distributed training runs on; empty means all hosts.
    pub distribution_instance_groups: Vec<String>,
    /// Every host of the job, sorted as SageMaker sorts them (as strings: algo-10 before algo-2).
    pub hosts: Vec<String>,
    /// Whether the SageMaker training toolkit set up the environment (`SM_*` variables present).
    pub toolkit: bool,
    /// `SM_NUM_GPUS`, when the toolkit says.
    pub num_gpus: Option<usize>,
    /// `SM_NUM_CPUS`, when the toolkit says.
    pub num_cpus: Option<usize>,
    /// Which distribution the hyperparameters ask for.
    pub distribution: Distribution,
    /// Where SageMaker mirrors the checkpoint directory (`checkpointconfig.json` `S3Uri`).
    pub checkpoint_s3_uri: Option<String>,
}

/// One instance group of a SageMaker heterogeneous cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceGroup {
    /// Its instance type.
    pub instance_type: Option<String>,
    /// Its hosts, sorted.
    pub hosts: Vec<String>,
}

/// The runner SageMaker's hyperparameters select.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Distribution {
    /// One plain process per host.
    None,
    /// `sagemaker_mpi_enabled`: mpirun.
    Mpi,
    /// `sagemaker_torch_distributed_enabled`: torchrun.
    TorchDistributed,
    /// `sagemaker_distributed_dataparallel_enabled` / `sagemaker_pytorch_ddp_enabled`: SMDDP or PyTorch DDP runner.
    Smddp,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.topology;
        writeln!(f, "platform:        {} (launcher: {})", self.platform, self.launcher)?;
        writeln!(
            f,
            "rank:            {} of {} (local rank {} of {}, node {} of {})",
            t.rank, t.world_size, t.local_rank, t.local_world_size, t.node_rank, t.nnodes
        )?;
        writeln!(f, "master:          {}", t.master_endpoint())?;
        writeln!(f, "rendezvous:      {}", self.rendezvous)?;
        if let Some(range) = self.nnodes_range {
            writeln!(f, "nodes:           {range}, admitted by the rendezvous store (node rank given there)")?;
        }
        if let Some(id) = &self.node_id {
            writeln!(f, "node id:         {id} (shared by the workers hytrain launch started together)")?;
        }
        writeln!(f, "job token:       {}", self.job_token.source)?;
        writeln!(f, "current host:    {}", t.current_host)?;
        if !t.hosts.is_empty() {
            writeln!(f, "hosts:           {}", t.hosts.join(", "))?;
        }
        match self.nproc_per_node {
            Some(n) => writeln!(f, "nproc_per_node:  {n} (asked by the platform)")?,
            None => writeln!(f, "nproc_per_node:  not given (auto)")?,
        }
        if let Some(n) = self.max_restarts {
            writeln!(f, "max restarts:    {n} (hytrain launch restarts this node's workers after a failure)")?;
        }
        let p = &self.paths;
        writeln!(f, "model dir:       {}", p.model_dir.display())?;
        if let Some(c) = &p.checkpoint_dir {
            writeln!(f, "checkpoint dir:  {}", c.display())?;
        }
        writeln!(f, "output dir:      {}", p.output_dir.display())?;
        writeln!(f, "output data dir: {}", p.output_data_dir.display())?;
        if let Some(ff) = &p.failure_file {
            writeln!(f, "failure file:    {}", ff.display())?;
        }
        if !p.channels.is_empty() {
            writeln!(f, "channels:")?;
            for (name, c) in &p.channels {
                write!(f, "  {name}: {} ({:?}, {:?}", c.path.display(), c.input_mode, c.s3_distribution)?;
                if let Some(ct) = &c.content_type {
                    write!(f, ", {ct}")?;
                }
                writeln!(f, ")")?;
            }
        }
        if let Some(sm) = &self.sagemaker {
            writeln!(f, "sagemaker:")?;
            let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".to_owned());
            writeln!(f, "  job name:      {}", opt(&sm.job_name))?;
            writeln!(
                f,
                "  toolkit:       {}",
                if sm.toolkit { "yes (SM_* variables)" } else { "no (read input/config/*.json)" }
            )?;
            writeln!(f, "  instance type: {}", opt(&sm.current_instance_type))?;
            if let Some(g) = &sm.instance_group {
                writeln!(f, "  instance group: {g}")?;
            }
            if !sm.distribution_instance_groups.is_empty() {
                writeln!(f, "  distribution groups: {}", sm.distribution_instance_groups.join(", "))?;
            }
            writeln!(f, "  all hosts:     {}", sm.hosts.join(", "))?;
            writeln!(f, "  distribution:  {:?}", sm.distribution)?;
            if let Some(n) = sm.num_gpus {
                writeln!(f, "  gpus:          {n}")?;
            }
            if let Some(i) = &sm.network_interface_name {
                writeln!(f, "  interface:     {i}")?;
            }
        }
        if !self.hyperparameters.is_empty() {
            writeln!(f, "hyperparameters:")?;
            for (k, v) in &self.hyperparameters {
                writeln!(f, "  {k} = {v}")?;
            }
        }
        if !self.notes.is_empty() {
            writeln!(f, "notes:")?;
            for n in &self.notes {
                writeln!(f, "  - {n}")?;
            }
        }
        Ok(())
    }
}
