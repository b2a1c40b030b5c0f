//! Helpers shared by the detection tests: environments as maps and SageMaker trees in temporary folders.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use hytrain_cluster::{detect_from, worker_env, DetectError, Env, Plan};

/// A SageMaker root that does not exist, so tests never see the machine's own /opt/ml.
pub const NO_SM_ROOT: &str = "/nonexistent/hytrain-cluster-tests/opt/ml";

/// An environment of exactly `pairs`, with HYTRAIN_SM_ROOT pointing nowhere.
pub fn env(pairs: &[(&str, &str)]) -> Env {
    let mut env = Env::from_pairs([("HYTRAIN_SM_ROOT", NO_SM_ROOT)]);
    env.extend(pairs.iter().copied());
    env
}

/// Detects and expects success.
pub fn plan(env: &Env) -> Plan {
    match detect_from(env) {
        Ok(plan) => plan,
        Err(e) => panic!("detection failed: {e}"),
    }
}

/// Detects and expects failure; checks the message is one line and returns it.
pub fn error(env: &Env) -> String {
    match detect_from(env) {
        Ok(plan) => panic!("detection should fail but gave:\n{plan}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "message is not one line: {msg:?}");
            assert!(!matches!(e, DetectError::Inconsistent(ref s) if s.is_empty()));
            msg
        }
    }
}

/// The environment `hytrain launch` gives local worker `local_rank` of `nproc` on the node `parent` describes.
pub fn child_env(parent: &Env, nproc: usize, local_rank: usize) -> Env {
    let p = plan(parent);
    let mut child = parent.clone();
    child.extend(worker_env(&p.topology.worker(nproc, local_rank), parent));
    child
}

/// A SageMaker root in a temporary folder.
pub struct SmTree {
    dir: tempfile::TempDir,
}

impl SmTree {
    pub fn new() -> SmTree {
        SmTree { dir: tempfile::tempdir().expect("temporary folder") }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self, name: &str) -> PathBuf {
        self.root().join("input/config").join(name)
    }

    /// Writes `<root>/input/config/<name>`.
    pub fn write_config(&self, name: &str, text: &str) -> &SmTree {
        let path = self.config(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
        self
    }

    /// An environment of `pairs` with HYTRAIN_SM_ROOT at this tree.
    pub fn env(&self, pairs: &[(&str, &str)]) -> Env {
        let mut env = Env::from_pairs([("HYTRAIN_SM_ROOT", self.root().to_str().unwrap())]);
        env.extend(pairs.iter().copied());
        env
    }
}

/// resourceconfig.json of a homogeneous cluster.
pub fn resource_config(current: &str, hosts: &[&str]) -> String {
    serde_json::json!({
        "current_host": current,
        "current_instance_type": "ml.c5.xlarge",
        "current_group_name": "homogeneousCluster",
        "hosts": hosts,
        "instance_groups": [{"instance_group_name": "homogeneousCluster", "instance_type": "ml.c5.xlarge", "hosts": hosts}],
        "network_interface_name": "eth0"
    })
    .to_string()
}
