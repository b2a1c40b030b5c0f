//! The [`Topology`] of one worker: ranks, sizes and where its peers meet.

use serde::{Deserialize, Serialize};

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

/// Ranks and sizes, before master and hosts are known: what a launcher's variables or a platform's own rules
/// give, which each platform's planner completes into a [`Topology`].
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

    /// The topology these counts make with the master and hosts the platform names.
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Rank 0 of node `node_rank` of `nnodes`, one process per node.
    pub(crate) fn node(node_rank: usize, nnodes: usize) -> Topology {
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
}
