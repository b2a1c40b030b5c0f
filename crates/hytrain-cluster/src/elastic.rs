//! A node count given as a range ([`NodeRange`]): `--nnodes MIN:MAX` ([`Plan::set_nnodes`]) or an elastic
//! PyTorchJob's `PET_NNODES=MIN:MAX`. The standalone store (`hytrain rendezvous`) then admits nodes up to MAX and
//! begins the run once MIN are in and its last call is over, giving node ranks in the order nodes came; the plan's
//! topology holds placeholders (node rank 0 of MAX) until the store has said.
//!
//! A range needs a store that exists before any rank is known, so one outside the job. A node is one process
//! started directly, or the processes one `hytrain launch` started together, which share the node identity it
//! gives them ([`crate::NODE_ID_VAR`]); torchrun and mpirun give their processes ranks of their own. An elastic
//! PyTorchJob that does not meet that keeps today's behaviour: a fixed size of MAX nodes, with the node rank the
//! pod was given.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::env::Env;
use crate::error::{shown, DetectError};
use crate::launcher::Launcher;
use crate::plan::Plan;
use crate::platform::Platform;

/// A job's node count as a range: at least `min` nodes, at most `max`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRange {
    /// Nodes the job needs at least.
    pub min: usize,
    /// Nodes the job takes at most.
    pub max: usize,
}

impl fmt::Display for NodeRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.min, self.max)
    }
}

impl NodeRange {
    /// `N` (a range of one size) or `MIN:MAX`, from `origin` (a flag or variable, for the error).
    pub fn parse(origin: &str, value: &str) -> Result<NodeRange, DetectError> {
        let expected = "a node count such as 2, or MIN:MAX such as 1:4";
        let count = |s: &str| match s.trim().parse::<usize>() {
            Ok(0) => Err(DetectError::Zero { var: origin.into() }),
            Ok(n) => Ok(n),
            Err(_) => {
                Err(DetectError::NotANumber { var: origin.into(), value: shown(value), expected: expected.into() })
            }
        };
        let (min, max) = match value.split_once(':') {
            None => (count(value)?, count(value)?),
            Some((min, max)) => (count(min)?, count(max)?),
        };
        if min > max {
            return Err(DetectError::Malformed {
                origin: origin.into(),
                problem: format!("min {min} is above max {max}"),
                expected: expected.into(),
            });
        }
        Ok(NodeRange { min, max })
    }
}

impl Plan {
    /// Gives this process's job the node count `value` (`--nnodes`, `N` or `MIN:MAX`): its node rank and node
    /// count then come from the standalone store at the rendezvous. Refused where that cannot work, with the
    /// reason: on SageMaker, under torchrun or mpirun, with several processes per node not started by `hytrain
    /// launch`, or without an external store.
    pub fn set_nnodes(&mut self, origin: &str, value: &str) -> Result<(), DetectError> {
        let range = NodeRange::parse(origin, value)?;
        let refuse = |why: String| Err(DetectError::Inconsistent(format!("{origin}={}: {why}", shown(value))));
        if self.platform == Platform::Sagemaker {
            return refuse(
                "SageMaker has no elastic training: a training job's instances are fixed when it starts and it ends \
                 when one is lost; drop it (SageMaker's hosts give the node count)"
                    .into(),
            );
        }
        if let Some(why) = self.range_refusal() {
            return refuse(why);
        }
        if !self.rendezvous.is_external() {
            return refuse(
                "a range of nodes needs a standalone rendezvous store (`hytrain rendezvous`), since node ranks come \
                 from it in the order nodes come; give --rendezvous-endpoint HOST:PORT"
                    .into(),
            );
        }
        self.nnodes_range = Some(range);
        Ok(())
    }

    /// Why this process cannot be a node of a range (or one process of a node), if it cannot: its launcher gave it
    /// a rank of its own, or the platform asks for several processes per node and no `hytrain launch` started
    /// them as one.
    pub fn range_refusal(&self) -> Option<String> {
        match self.launcher {
            Launcher::None if self.topology.local_world_size > 1 => Some(format!(
                "the platform asks for {} processes per node, which must be started as one node by `hytrain launch` \
                 (it gives them one node identity at the store); this process was started alone",
                self.topology.local_world_size
            )),
            Launcher::None => None,
            Launcher::HytrainLaunch if self.node_id.is_none() => Some(format!(
                "the hytrain launch that started this process gave it no node identity ({}); start the workers with \
                 a hytrain launch of this version",
                crate::NODE_ID_VAR
            )),
            Launcher::HytrainLaunch => None,
            other => Some(format!(
                "{other} already gave this process its rank; a node count range is for processes the platform starts \
                 directly or through hytrain launch"
            )),
        }
    }
}

/// Settles an elastic PyTorchJob's `PET_NNODES=MIN:MAX` once the store's place is known: a range admitted by the
/// store when that can work, else today's fixed size of MAX with the pod's node rank, else an error saying why.
pub(crate) fn settle(env: &Env, plan: &mut Plan) -> Result<(), DetectError> {
    let Some(range) = plan.nnodes_range else {
        return Ok(());
    };
    let given = ["RANK", "PET_NODE_RANK"].iter().find(|v| env.value(v).is_some());
    // A `hytrain launch` of several workers reads the range too (launcher none, several processes): it starts
    // them, and they are admitted as one node.
    let launching = plan.launcher == Launcher::None && plan.topology.local_world_size > 1;
    if plan.rendezvous.is_external() && (launching || plan.range_refusal().is_none()) {
        plan.notes.push(format!(
            "elastic job (PET_NNODES={range}): the rendezvous store admits up to {} nodes and begins once {} are in \
             and its last call is over; node ranks come from the store in the order pods come{}",
            range.max,
            range.min,
            given.map(|v| format!(" ({v} is not used)")).unwrap_or_default()
        ));
        return Ok(());
    }
    plan.nnodes_range = None;
    if given.is_none() && plan.topology.nnodes > 1 {
        return Err(DetectError::Missing {
            var: "PET_NODE_RANK".into(),
            hint: "Kubeflow gave this pod no node rank (neither RANK nor PET_NODE_RANK, as in an elastic or \
                   Master-less PyTorchJob); run a standalone store (`hytrain rendezvous`) and point PET_RDZV_ENDPOINT \
                   at it, which gives node ranks in the order pods come, or start hytrain under torchrun"
                .into(),
        });
    }
    plan.notes.push(format!(
        "elastic PyTorchJob (PET_NNODES={range}): without a standalone rendezvous store (or under torchrun or \
         mpirun) hytrain's rendezvous is fixed-size and waits for {} nodes",
        range.max
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::tests::plan_of;

    const ELASTIC: [(&str, &str); 3] =
        [("PET_NNODES", "1:3"), ("PET_RDZV_ENDPOINT", "hytrain-rdzv:29400"), ("HOSTNAME", "job-worker-0")];

    #[test]
    fn node_counts_parse_as_one_size_or_a_range_and_bad_ones_are_refused() {
        assert_eq!(NodeRange::parse("--nnodes", "2").unwrap(), NodeRange { min: 2, max: 2 });
        assert_eq!(NodeRange::parse("--nnodes", "1:4").unwrap(), NodeRange { min: 1, max: 4 });
        let e = NodeRange::parse("--nnodes", "4:1").unwrap_err().to_string();
        assert_eq!(e, "--nnodes: min 4 is above max 1; expected a node count such as 2, or MIN:MAX such as 1:4");
        assert!(NodeRange::parse("--nnodes", "0:2").unwrap_err().to_string().contains("--nnodes=0"));
        assert!(NodeRange::parse("--nnodes", "a:2").unwrap_err().to_string().contains("not a whole number"));
    }

    #[test]
    fn an_elastic_pod_with_a_standalone_store_needs_no_node_rank_and_gets_a_range() {
        let plan = plan_of(&ELASTIC).unwrap();
        assert_eq!(plan.nnodes_range, Some(NodeRange { min: 1, max: 3 }));
        assert!(plan.to_string().contains("nodes:           1:3, admitted by the rendezvous store"), "{plan}");
    }

    #[test]
    fn an_elastic_pod_hosting_the_store_keeps_the_fixed_size_or_needs_a_node_rank() {
        let hosting =
            [("PET_NNODES", "1:3"), ("PET_RDZV_ENDPOINT", "job-worker-0:29400"), ("HOSTNAME", "job-worker-0")];
        let e = plan_of(&hosting).unwrap_err().to_string();
        assert!(e.starts_with("PET_NODE_RANK is not set;") && e.contains("hytrain rendezvous"), "{e}");
        let mut ranked = hosting.to_vec();
        ranked.push(("PET_NODE_RANK", "0"));
        let plan = plan_of(&ranked).unwrap();
        assert_eq!((plan.nnodes_range, plan.topology.nnodes), (None, 3));
        assert!(plan.notes.iter().any(|n| n.contains("fixed-size and waits for 3 nodes")), "{:?}", plan.notes);
    }

    #[test]
    fn the_nnodes_flag_is_refused_where_a_range_cannot_work_saying_why() {
        let mut sm = plan_of(&[("SM_HOSTS", "[\"algo-1\"]"), ("SM_CURRENT_HOST", "algo-1")]).unwrap();
        let e = sm.set_nnodes("--nnodes", "1:2").unwrap_err().to_string();
        assert!(e.starts_with("--nnodes=1:2: SageMaker has no elastic training"), "{e}");
        let mut hosted = plan_of(&[]).unwrap();
        let e = hosted.set_nnodes("--nnodes", "1:2").unwrap_err().to_string();
        assert!(e.contains("needs a standalone rendezvous store"), "{e}");
        let torchrun = [
            ("TORCHELASTIC_RUN_ID", "r"),
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("LOCAL_RANK", "0"),
            ("LOCAL_WORLD_SIZE", "1"),
            ("HYTRAIN_RENDEZVOUS_ENDPOINT", "127.0.0.1:29400"),
        ];
        let e = plan_of(&torchrun).unwrap().set_nnodes("--nnodes", "2").unwrap_err().to_string();
        assert!(e.contains("torchrun already gave this process its rank"), "{e}");
        let mut alone = plan_of(&[("HYTRAIN_RENDEZVOUS_ENDPOINT", "127.0.0.1:29400")]).unwrap();
        alone.set_nnodes("--nnodes", "1:4").unwrap();
        assert_eq!(alone.nnodes_range, Some(NodeRange { min: 1, max: 4 }));
    }

    /// A worker of `hytrain launch` (local rank 1 of 2) on a standalone store, with the launcher's node identity
    /// when given.
    fn launched(node_id: Option<&str>) -> Vec<(&str, &str)> {
        let mut env = vec![
            ("HYTRAIN_LAUNCHER", crate::HYTRAIN_LAUNCH_MARK),
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("HYTRAIN_RENDEZVOUS_ENDPOINT", "127.0.0.1:29400"),
        ];
        env.extend(node_id.map(|id| (crate::NODE_ID_VAR, id)));
        env
    }

    #[test]
    fn the_workers_of_one_hytrain_launch_are_one_node_of_a_range_by_the_identity_it_gives_them() {
        let mut worker = plan_of(&launched(Some("node-a#41.0"))).unwrap();
        worker.set_nnodes("--nnodes", "1:2").unwrap();
        assert_eq!(worker.nnodes_range, Some(NodeRange { min: 1, max: 2 }));
        assert_eq!(worker.node_id.as_deref(), Some("node-a#41.0"));
        assert!(worker.to_string().contains("node id:         node-a#41.0 (shared by the workers"), "{worker}");
        // Without the launcher's mark the variable means nothing: a process started alone is a node of its own.
        let stray = plan_of(&[(crate::NODE_ID_VAR, "node-a#41.0")]).unwrap();
        assert_eq!(stray.node_id, None);
    }

    #[test]
    fn several_processes_per_node_not_grouped_by_hytrain_launch_are_refused_a_range_saying_what_works() {
        let e = plan_of(&launched(None)).unwrap().set_nnodes("--nnodes", "1:2").unwrap_err().to_string();
        assert!(
            e.starts_with(
                "--nnodes=1:2: the hytrain launch that started this process gave it no node identity (HYTRAIN_NODE_ID)"
            ),
            "{e}"
        );
        // A pod asking for two processes per node, running one process without hytrain launch.
        let mut pod = ELASTIC.to_vec();
        pod.push(("PET_NPROC_PER_NODE", "2"));
        let plan = plan_of(&pod).unwrap();
        assert_eq!(plan.nnodes_range, Some(NodeRange { min: 1, max: 3 }), "hytrain launch reads the range too");
        let why = plan.range_refusal().expect("a lone process of a two-process pod is no node");
        assert!(
            why.starts_with(
                "the platform asks for 2 processes per node, which must be started as one node by `hytrain launch`"
            ),
            "{why}"
        );
    }
}
