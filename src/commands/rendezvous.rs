//! `hytrain rendezvous`: the job's rendezvous store in a process of its own, so that losing any worker, global
//! rank 0 included, leaves the store (and the other workers' view of the loss) intact. It serves run after run of
//! the job: a restarted set of workers rendezvouses again on the same process (see
//! [`StandaloneStore`](crate::comm::StandaloneStore)). A worker of a job whose node count is a range is admitted by
//! it first ([`admit`]).

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::cluster::{self, Env};
use crate::comm::{CommOptions, NodeRange, StandaloneStore, Store};

/// `hytrain rendezvous`'s flags.
#[derive(Debug, clap::Args)]
pub struct RendezvousArgs {
    /// Where to listen, HOST:PORT (0.0.0.0 or [::] for every interface); workers reach it through
    /// --rendezvous-endpoint, HYTRAIN_RENDEZVOUS_ENDPOINT or, on Kubeflow, PET_RDZV_ENDPOINT.
    #[arg(long, default_value = "0.0.0.0:29400", value_parser = parse_listen)]
    pub listen: SocketAddr,
}

/// `HOST:PORT` as a socket address, resolving a host name.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let bad = |why: String| format!("'{text}' {why}; expected HOST:PORT such as 0.0.0.0:29400 or [::]:29400");
    let mut addrs = text.to_socket_addrs().map_err(|e| bad(format!("is not an address to listen on ({e})")))?;
    addrs.next().ok_or_else(|| bad("resolves to no address".into()))
}

/// Runs the store until SIGTERM or SIGINT. The job token comes from `env` as the workers find theirs
/// ([`cluster::store_token`]); without one the store refuses to start.
pub fn serve(env: &Env, args: &RendezvousArgs) -> anyhow::Result<()> {
    let token = cluster::store_token(env).map_err(|e| anyhow::anyhow!("hytrain rendezvous cannot start: {e}"))?;
    let source = token.source.clone();
    let job_id = CommOptions::default().job_id;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).context("cannot install the signal handler")?;
    }
    let store = StandaloneStore::start(args.listen, &job_id, token)
        .map_err(|e| anyhow::anyhow!("hytrain rendezvous cannot listen on {}: {e}", args.listen))?;
    tracing::info!(
        "rendezvous store listening on {} for job '{job_id}' (job token {source}); serving until SIGTERM or SIGINT",
        store.local_addr()
    );
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    tracing::info!("rendezvous store stopping on a signal");
    Ok(())
}

/// The plan of a process whose node count is a range (`--nnodes MIN:MAX`, `PET_NNODES=MIN:MAX`) once the
/// standalone store has admitted its node: node rank and node count from the store, and its global rank and world
/// size from them (the processes of a node asking apart, with one node identity). A plan without a range is
/// returned as it is.
pub fn admit(plan: &cluster::Plan, opts: &CommOptions, last_call: Duration) -> anyhow::Result<cluster::Plan> {
    let Some(range) = plan.nnodes_range else {
        return Ok(plan.clone());
    };
    let t = &plan.topology;
    // The processes one `hytrain launch` started share its node identity; a process started alone is a node of its
    // own, told apart from others on its machine by its process id.
    let node = plan.node_id.clone().unwrap_or_else(|| format!("{}#{}", t.current_host, std::process::id()));
    let nodes = NodeRange { min: range.min, max: range.max, last_call };
    let admitted = Store::admit(&crate::membership(plan), opts, &node, &nodes)
        .map_err(|e| anyhow::anyhow!("this node was not admitted to the job: {e}"))?;
    let mut plan = plan.clone();
    let t = &mut plan.topology;
    t.node_rank = admitted.node_rank;
    t.nnodes = admitted.nnodes;
    t.rank = admitted.node_rank * t.local_world_size + t.local_rank;
    t.world_size = admitted.nnodes * t.local_world_size;
    Ok(plan)
}
