//! What `hytrain launch` gives the workers it starts: torchrun's variables with the child mark and the parent's
//! platform ([`worker_env`]), and a fresh job token for a single-node job that has none ([`launch_token_env`]).

use crate::env::Env;
use crate::launcher::{self, HYTRAIN_LAUNCH_MARK};
use crate::plan::Plan;
use crate::platform;
use crate::token::{LAUNCH_ORIGIN, TOKEN_ORIGIN_VAR, TOKEN_VAR};
use crate::topology::Topology;

/// The variable through which `hytrain launch` gives the workers it starts together one node identity (its host,
/// its process id and how many times it restarted them), so that the standalone store admits them as one node of a
/// job whose node count is a range.
pub const NODE_ID_VAR: &str = "HYTRAIN_NODE_ID";

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
    // The platform `parent` runs on; an inconsistent parent environment fails the child's own detection instead.
    if let Ok(platform) = platform::detect(parent, &platform::sm_root(parent), launcher::detect(parent)) {
        vars.push(("HYTRAIN_PLATFORM".to_owned(), platform.as_str().to_owned()));
    }
    if worker.local_world_size > 1 && parent.get("OMP_NUM_THREADS").is_none() {
        vars.push(("OMP_NUM_THREADS".to_owned(), "1".to_owned()));
    }
    vars
}

/// The variables `hytrain launch` adds for its workers: a fresh random token, when the job runs on this one node
/// only (so every rank is a child of this launcher) and no secret was configured; nothing otherwise. A job that
/// spans nodes cannot share a random value this way, so it keeps its configured or derived token; so does a job
/// whose store runs outside (`hytrain rendezvous` could not know a token made up here).
pub fn launch_token_env(plan: &Plan) -> Result<Vec<(String, String)>, std::io::Error> {
    if plan.job_token.source.is_secret() || plan.topology.nnodes != 1 || plan.rendezvous.is_external() {
        return Ok(Vec::new());
    }
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(|e| {
        std::io::Error::other(format!("the operating system gave no random bytes for the job token: {e}"))
    })?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(vec![(TOKEN_VAR.to_owned(), hex), (TOKEN_ORIGIN_VAR.to_owned(), LAUNCH_ORIGIN.to_owned())])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::tests::{plan_of, SECRET};
    use crate::topology::tests::node;

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

    #[test]
    fn launch_generates_a_fresh_token_for_a_single_node_without_one() {
        let plan = plan_of(&[]).unwrap();
        let a = launch_token_env(&plan).unwrap();
        let b = launch_token_env(&plan).unwrap();
        assert_eq!(a[0].0, TOKEN_VAR);
        assert_eq!(a[0].1.len(), 64);
        assert_ne!(a[0].1, b[0].1, "two launches got the same token");
        assert_eq!(a[1], (TOKEN_ORIGIN_VAR.to_owned(), LAUNCH_ORIGIN.to_owned()));
    }

    #[test]
    fn launch_keeps_a_configured_token_and_multi_node_jobs_keep_theirs() {
        let configured = plan_of(&[(TOKEN_VAR, SECRET)]).unwrap();
        assert!(launch_token_env(&configured).unwrap().is_empty());
        let multi_node =
            plan_of(&[("PET_NNODES", "2"), ("PET_NODE_RANK", "1"), ("PET_MASTER_ADDR", "job-node-0-0.job")]).unwrap();
        assert!(launch_token_env(&multi_node).unwrap().is_empty());
        let external_store = plan_of(&[(crate::RENDEZVOUS_ENDPOINT_VAR, "127.0.0.1:29400")]).unwrap();
        assert!(launch_token_env(&external_store).unwrap().is_empty());
    }
}
