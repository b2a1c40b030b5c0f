//! Where the job's rendezvous store runs ([`Rendezvous`]): in global rank 0's process (the default), or outside
//! this process at an endpoint every rank connects to, most usefully a standalone `hytrain rendezvous` that
//! outlives any worker.
//!
//! Where it comes from, in order: the `--rendezvous-endpoint` flag ([`Rendezvous::external`], applied by the
//! binary); `HYTRAIN_RENDEZVOUS_ENDPOINT` (any platform); on Kubeflow, `PET_RDZV_ENDPOINT` with torchrun's c10d
//! rule: the pod whose host name the endpoint names hosts the store (in global rank 0, so that pod must be node 0),
//! every other pod connects to the endpoint. Otherwise global rank 0 hosts it at the master port.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::env::Env;
use crate::error::DetectError;
use crate::parse;
use crate::platform::Platform;
use crate::topology::Topology;

/// The variable naming a standalone store's `host:port` on any platform.
pub const RENDEZVOUS_ENDPOINT_VAR: &str = "HYTRAIN_RENDEZVOUS_ENDPOINT";
/// The port of a store endpoint given without one, and the default of `hytrain rendezvous --listen`: torchrun's
/// c10d default.
pub const DEFAULT_RENDEZVOUS_PORT: u16 = 29400;

/// Where the job's rendezvous store runs, as this process sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "store", rename_all = "kebab-case")]
pub enum Rendezvous {
    /// Global rank 0 hosts the store in its own process, listening on `port`; the other ranks reach it at the
    /// master address and `port`. Losing rank 0 ends the job, since the store goes with it.
    RankZero {
        /// The port rank 0 listens on (the master port, or the port of a `PET_RDZV_ENDPOINT` naming this pod).
        port: u16,
    },
    /// The store runs outside this process, at `host:port`; every rank of this process, rank 0 included, joins
    /// it as a client. With a standalone `hytrain rendezvous` there, any worker may be lost without the store.
    External {
        /// The store's host name or address (IPv6 without brackets).
        host: String,
        /// The store's port.
        port: u16,
        /// What named it: `--rendezvous-endpoint`, `HYTRAIN_RENDEZVOUS_ENDPOINT` or `PET_RDZV_ENDPOINT`.
        origin: String,
    },
}

impl Default for Rendezvous {
    fn default() -> Self {
        Rendezvous::RankZero { port: crate::DEFAULT_MASTER_PORT }
    }
}

impl Rendezvous {
    /// An external store at `value` (`host:port`, `[v6]:port`, or a host alone for port
    /// [`DEFAULT_RENDEZVOUS_PORT`]); `origin` names the flag or variable it came from, for errors and `explain`.
    pub fn external(origin: &str, value: &str) -> Result<Rendezvous, DetectError> {
        let (host, port) = parse::endpoint(origin, value)?;
        Ok(Rendezvous::External {
            host: unbracket(&host),
            port: port.unwrap_or(DEFAULT_RENDEZVOUS_PORT),
            origin: origin.to_owned(),
        })
    }

    /// The address and port this process connects to: `topology`'s master address for
    /// [`Rendezvous::RankZero`], the endpoint for [`Rendezvous::External`].
    pub fn endpoint<'a>(&'a self, topology: &'a Topology) -> (&'a str, u16) {
        match self {
            Rendezvous::RankZero { port } => (&topology.master_addr, *port),
            Rendezvous::External { host, port, .. } => (host, *port),
        }
    }

    /// Whether the store runs outside this process's job ranks' control (every rank connects as a client).
    pub fn is_external(&self) -> bool {
        matches!(self, Rendezvous::External { .. })
    }
}

impl fmt::Display for Rendezvous {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rendezvous::RankZero { port } => write!(f, "hosted by global rank 0 on port {port}"),
            Rendezvous::External { host, port, origin } => {
                let host = if host.contains(':') { format!("[{host}]") } else { host.clone() };
                write!(f, "external store at {host}:{port} (from {origin}); every rank joins it as a client")
            }
        }
    }
}

fn unbracket(host: &str) -> String {
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host).to_owned()
}

/// The rendezvous of a process whose platform and topology are known (see the module documentation for the
/// order; the flag is applied later by the binary).
pub(crate) fn detect(env: &Env, platform: Platform, topology: &Topology) -> Result<Rendezvous, DetectError> {
    if let Some(v) = env.value(RENDEZVOUS_ENDPOINT_VAR) {
        return Rendezvous::external(RENDEZVOUS_ENDPOINT_VAR, v);
    }
    let kubeflow = matches!(platform, Platform::KubeflowPytorchjob | Platform::KubeflowTrainjob);
    match env.value("PET_RDZV_ENDPOINT").filter(|_| kubeflow) {
        Some(v) => c10d(v, topology),
        None => Ok(Rendezvous::RankZero { port: topology.master_port }),
    }
}

/// torchrun's c10d rule for `PET_RDZV_ENDPOINT`: the pod it names hosts the store, the others connect to it.
fn c10d(value: &str, topology: &Topology) -> Result<Rendezvous, DetectError> {
    let Rendezvous::External { host, port, .. } = Rendezvous::external("PET_RDZV_ENDPOINT", value)? else {
        unreachable!("Rendezvous::external gives an external store")
    };
    if !names_this_host(&host, &topology.current_host) {
        return Ok(Rendezvous::External { host, port, origin: "PET_RDZV_ENDPOINT".into() });
    }
    if topology.node_rank != 0 {
        return Err(DetectError::Inconsistent(format!(
            "PET_RDZV_ENDPOINT={} names this pod ({}) as the store's host, but this pod is node {}; hytrain's \
             store lives in global rank 0, on node 0: point the endpoint at node 0's pod, or at a standalone \
             `hytrain rendezvous` Service",
            crate::error::shown(value),
            topology.current_host,
            topology.node_rank
        )));
    }
    Ok(Rendezvous::RankZero { port })
}

/// Whether `host` (from an endpoint) is this machine, named `current` (the pod's host name): the same name, the
/// same name inside a longer DNS name (`job-worker-0.job.ns.svc`), or a loopback name or address.
fn names_this_host(host: &str, current: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let current = current.to_ascii_lowercase();
    if host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()) {
        return true;
    }
    host == current || host.split('.').next() == Some(current.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::tests::plan_of;

    const ELASTIC: [(&str, &str); 3] = [("PET_NNODES", "2"), ("PET_NPROC_PER_NODE", "1"), ("PET_MAX_RESTARTS", "3")];

    fn pod(host: &str, node: &str, endpoint: &str) -> Result<crate::Plan, DetectError> {
        let mut env = ELASTIC.to_vec();
        env.extend([("HOSTNAME", host), ("PET_NODE_RANK", node), ("PET_RDZV_ENDPOINT", endpoint)]);
        plan_of(&env)
    }

    #[test]
    fn without_an_endpoint_rank_0_hosts_the_store_at_the_master_port() {
        let plan =
            plan_of(&[("PET_NNODES", "2"), ("PET_NODE_RANK", "1"), ("PET_MASTER_ADDR", "job-node-0-0.job")]).unwrap();
        assert_eq!(plan.rendezvous, Rendezvous::RankZero { port: 29500 });
        assert!(plan.to_string().contains("rendezvous:      hosted by global rank 0 on port 29500\n"), "{plan}");
    }

    #[test]
    fn pet_rdzv_endpoint_naming_this_pod_makes_its_rank_0_host_the_store_on_the_endpoints_port() {
        let plan = pod("job-worker-0", "0", "job-worker-0:29400").unwrap();
        assert_eq!(plan.rendezvous, Rendezvous::RankZero { port: 29400 });
        let fqdn = pod("job-worker-0", "0", "job-worker-0.job.default.svc:29401").unwrap();
        assert_eq!(fqdn.rendezvous, Rendezvous::RankZero { port: 29401 });
    }

    #[test]
    fn pet_rdzv_endpoint_naming_another_host_is_an_external_store_for_every_pod() {
        for (host, node) in [("job-worker-0", "0"), ("job-worker-1", "1")] {
            let plan = pod(host, node, "hytrain-rdzv.ns.svc:29400").unwrap();
            assert_eq!(
                plan.rendezvous,
                Rendezvous::External {
                    host: "hytrain-rdzv.ns.svc".into(),
                    port: 29400,
                    origin: "PET_RDZV_ENDPOINT".into()
                },
                "{host}"
            );
        }
        let other_pod = pod("job-worker-1", "1", "job-worker-0:29400").unwrap();
        assert!(other_pod.rendezvous.is_external());
        assert_eq!(other_pod.rendezvous.endpoint(&other_pod.topology), ("job-worker-0", 29400));
    }

    #[test]
    fn pet_rdzv_endpoint_naming_a_pod_that_is_not_node_0_is_refused() {
        let e = pod("job-worker-1", "1", "job-worker-1:29400").unwrap_err().to_string();
        assert!(e.contains("names this pod (job-worker-1) as the store's host, but this pod is node 1"), "{e}");
    }

    #[test]
    fn the_endpoint_variable_wins_and_works_off_kubeflow_too() {
        let mut env = ELASTIC.to_vec();
        env.extend([("HOSTNAME", "job-worker-0"), ("PET_NODE_RANK", "0"), ("PET_RDZV_ENDPOINT", "job-worker-0")]);
        env.push((RENDEZVOUS_ENDPOINT_VAR, "[fd00::5]"));
        let plan = plan_of(&env).unwrap();
        assert_eq!(plan.rendezvous.endpoint(&plan.topology), ("fd00::5", DEFAULT_RENDEZVOUS_PORT));
        assert!(plan.to_string().contains("external store at [fd00::5]:29400 (from HYTRAIN_RENDEZVOUS_ENDPOINT)"));
        let sm = plan_of(&[
            ("SM_HOSTS", "[\"algo-1\",\"algo-2\"]"),
            ("SM_CURRENT_HOST", "algo-2"),
            (RENDEZVOUS_ENDPOINT_VAR, "10.0.0.9:29400"),
        ])
        .unwrap();
        assert!(sm.rendezvous.is_external());
        // Off Kubeflow, PET_RDZV_ENDPOINT is torchrun's business, not the store's.
        let sm = plan_of(&[
            ("SM_HOSTS", "[\"algo-1\",\"algo-2\"]"),
            ("SM_CURRENT_HOST", "algo-1"),
            ("PET_RDZV_ENDPOINT", "10.0.0.9:29400"),
        ])
        .unwrap();
        assert_eq!(sm.rendezvous, Rendezvous::RankZero { port: sm.topology.master_port });
    }

    #[test]
    fn a_malformed_endpoint_is_refused_naming_the_variable() {
        let e = plan_of(&[(RENDEZVOUS_ENDPOINT_VAR, "host:notaport")]).unwrap_err().to_string();
        assert!(e.starts_with("HYTRAIN_RENDEZVOUS_ENDPOINT="), "{e}");
        let e = Rendezvous::external("--rendezvous-endpoint", "a:b:c").unwrap_err().to_string();
        assert!(e.contains("--rendezvous-endpoint") && e.contains("expected host:port"), "{e}");
    }

    #[test]
    fn a_loopback_or_identical_name_is_this_host() {
        assert!(names_this_host("localhost", "pod"));
        assert!(names_this_host("127.0.0.1", "pod"));
        assert!(names_this_host("POD.ns.svc", "pod"));
        assert!(!names_this_host("pod-1", "pod"));
        assert!(!names_this_host("other.pod", "pod"));
    }
}
