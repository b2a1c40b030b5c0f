//! The [`Topology`] of one worker and the environment `hytrain launch` gives the workers it starts.

use serde::{Deserialize, Serialize};

use crate::env::Env;

/// Ranks and sizes of one process, and where its peers meet.
///
/// `rank` is always the global rank, whatever the launcher called RANK (Kubeflow v1 with `nprocPerNode` > 1 puts
/// the node rank there; hytrain corrects it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Topology {
    /// Global rank, in `0..world_size`.
    pub rank: usize,
    /// Rank among the processes of this node, in `0..local_world_size`.
    pub local_rank: usize,
    /// Number of processes in the job.
    pub world_size: usize,
    /// Number of processes on this node.
    pub local_world_size: usize,
    /// Index of this node, in `0..nnodes`.
    pub node_rank: usize,
    /// Number of nodes (pods, SageMaker hosts).
    pub nnodes: usize,
    /// Where global rank 0 hosts the rendezvous store: a host name or an IP address (IPv6 without brackets).
    pub master_addr: String,
    /// The store's port.
    pub master_port: u16,
    /// The nodes' host names in node-rank order when the platform names them (SageMaker, or a single node);
    /// empty otherwise.
    pub hosts: Vec<String>,
    /// This node's host name.
    pub current_host: String,
}

impl Topology {
    /// The topology of local worker `local_rank` when this node runs `nproc_per_node` processes (what
    /// `hytrain launch` gives each child): rank = node_rank * nproc_per_node + local_rank, world_size =
    /// nnodes * nproc_per_node. The caller keeps `local_rank < nproc_per_node`; arithmetic saturates rather than
    /// wrapping.
    pub fn worker(&self, nproc_per_node: usize, local_rank: usize) -> Topology {
        Topology {
            rank: self.node_rank.saturating_mul(nproc_per_node).saturating_add(local_rank),
            local_rank,
            world_size: self.nnodes.saturating_mul(nproc_per_node),
            local_world_size: nproc_per_node,
            node_rank: self.node_rank,
            nnodes: self.nnodes,
            master_addr: self.master_addr.clone(),
            master_port: self.master_port,
            hosts: self.hosts.clone(),
            current_host: self.current_host.clone(),
        }
    }

    /// `master_addr:master_port`, with brackets around an IPv6 address.
    pub fn master_endpoint(&self) -> String {
        if self.master_addr.contains(':') {
            format!("[{}]:{}", self.master_addr, self.master_port)
        } else {
            format!("{}:{}", self.master_addr, self.master_port)
        }
    }

    /// Whether this is global rank 0, the process that hosts the store and writes the model.
    pub fn is_rank_zero(&self) -> bool {
        self.rank == 0
    }
}

/// Value of `HYTRAIN_LAUNCHER` that marks a child of `hytrain launch`.
pub const HYTRAIN_LAUNCH_MARK: &str = "hytrain-launch";

/// Environment that a child started by `hytrain launch` gets, torchrun-compatible: RANK, LOCAL_RANK, WORLD_SIZE,
/// LOCAL_WORLD_SIZE, GROUP_RANK, NODE_RANK, GROUP_WORLD_SIZE, ROLE_RANK, ROLE_WORLD_SIZE, ROLE_NAME, MASTER_ADDR,
/// MASTER_PORT, plus `HYTRAIN_LAUNCHER=hytrain-launch` (marks the child so [`detect`](crate::detect) trusts RANK
/// as global), `HYTRAIN_PLATFORM` (the platform detected from `parent`, because the launcher overwrites the very
/// variables that told Kubeflow v1 from v2) and `OMP_NUM_THREADS=1` when there is more than one worker and the
/// user did not set it (as torchrun does, so N workers do not each start a thread per core).
pub fn worker_env(worker: &Topology, parent: &Env) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = [
        ("RANK", worker.rank.to_string()),
        ("LOCAL_RANK", worker.local_rank.to_string()),
        ("WORLD_SIZE", worker.world_size.to_string()),
        ("LOCAL_WORLD_SIZE", worker.local_world_size.to_string()),
        ("GROUP_RANK", worker.node_rank.to_string()),
        ("NODE_RANK", worker.node_rank.to_string()),
        ("GROUP_WORLD_SIZE", worker.nnodes.to_string()),
        ("ROLE_RANK", worker.rank.to_string()),
        ("ROLE_WORLD_SIZE", worker.world_size.to_string()),
        ("ROLE_NAME", "default".to_owned()),
        // Bare, not bracketed, for IPv6: the form PyTorch's env:// reads, and one detect() accepts too.
        ("MASTER_ADDR", worker.master_addr.clone()),
        ("MASTER_PORT", worker.master_port.to_string()),
        ("HYTRAIN_LAUNCHER", HYTRAIN_LAUNCH_MARK.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    if let Some(platform) = crate::detect::outer_platform(parent) {
        vars.push(("HYTRAIN_PLATFORM".to_owned(), platform.as_str().to_owned()));
    }
    if worker.local_world_size > 1 && parent.get("OMP_NUM_THREADS").is_none() {
        vars.push(("OMP_NUM_THREADS".to_owned(), "1".to_owned()));
    }
    vars
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(node_rank: usize, nnodes: usize) -> Topology {
        Topology {
            rank: node_rank,
            local_rank: 0,
            world_size: nnodes,
            local_world_size: 1,
            node_rank,
            nnodes,
            master_addr: "job-master-0".into(),
            master_port: 23456,
            hosts: vec![],
            current_host: "job-worker-0".into(),
        }
    }

    #[test]
    fn worker_rank_is_node_rank_times_nproc_plus_local_rank() {
        let w = node(2, 3).worker(4, 1);
        assert_eq!((w.rank, w.world_size, w.local_world_size, w.node_rank, w.nnodes), (9, 12, 4, 2, 3));
    }

    #[test]
    fn worker_env_sets_torchrun_variables_and_the_child_mark() {
        let w = node(1, 2).worker(2, 1);
        let env: std::collections::BTreeMap<_, _> = worker_env(&w, &Env::default()).into_iter().collect();
        for (k, v) in [
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("GROUP_RANK", "1"),
            ("NODE_RANK", "1"),
            ("GROUP_WORLD_SIZE", "2"),
            ("ROLE_RANK", "3"),
            ("ROLE_WORLD_SIZE", "4"),
            ("ROLE_NAME", "default"),
            ("MASTER_ADDR", "job-master-0"),
            ("MASTER_PORT", "23456"),
            ("HYTRAIN_LAUNCHER", "hytrain-launch"),
            ("OMP_NUM_THREADS", "1"),
        ] {
            assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}");
        }
    }

    #[test]
    fn worker_env_keeps_the_users_omp_num_threads_and_skips_it_for_one_worker() {
        let parent = Env::from_pairs([("OMP_NUM_THREADS", "8")]);
        let two = worker_env(&node(0, 1).worker(2, 0), &parent);
        assert!(!two.iter().any(|(k, _)| k == "OMP_NUM_THREADS"));
        let one = worker_env(&node(0, 1).worker(1, 0), &Env::default());
        assert!(!one.iter().any(|(k, _)| k == "OMP_NUM_THREADS"));
    }

    #[test]
    fn ipv6_master_gets_brackets_in_endpoint_but_not_in_env() {
        let mut t = node(0, 1);
        t.master_addr = "fe80::1".into();
        assert_eq!(t.master_endpoint(), "[fe80::1]:23456");
        let env = worker_env(&t.worker(1, 0), &Env::default());
        assert!(env.contains(&("MASTER_ADDR".to_owned(), "fe80::1".to_owned())));
    }
}
