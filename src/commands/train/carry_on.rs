//! Carrying on after a lost rank (issue 18): in a job whose node count is a range, on a standalone store, the
//! ranks left meet again at the store, rebuild their collective and take global rank 0's state, in this process
//! (see [`crate::train::elastic`]).

use std::time::Duration;

use anyhow::Context;

use super::TrainArgs;
use crate::cluster::Plan;
use crate::comm::recorder::{FlightRecorder, Recorded};
use crate::comm::{Collective, LostRank, Store};
use crate::train::elastic::CatchUp;
use crate::train::{Ddp, LoaderBatches, Optimizer, TrainConfig, Trainer};
use crate::watchdog::Watchdog;

/// How long a failed run waits for the store's word that a rank was lost before taking the failure as its own.
const VERDICT_WAIT: Duration = Duration::from_secs(5);

/// What a node needs to be admitted to the job's next round by the standalone store: its plan before admission
/// and the last call ([`super::super::rendezvous::admit`]).
#[derive(Debug, Clone)]
pub struct Rejoin {
    /// The plan as detected, with its node range.
    pub plan: Plan,
    /// How long the store waits for more nodes once MIN are in.
    pub last_call: Duration,
}

/// What a rank trains with and through, replaced whole when the job's ranks change.
pub(super) struct Engine {
    pub(super) ddp: Ddp,
    pub(super) optimizer: Box<dyn Optimizer>,
    /// The ring's store, at hand for NCCL's unique id; none under mpirun.
    pub(super) store: Option<Store>,
    pub(super) watchdog: Watchdog,
}

/// Whether the ranks left after a loss carry on (the job's node count is a range and the store runs on its own),
/// and how they meet again. Where they cannot (MPI, NCCL, a sharded optimizer without checkpoints to continue
/// from), a loss ends the job as it does with a fixed node count, and the log says why.
pub(super) fn elastic(
    plan: &Plan,
    args: &TrainArgs,
    cfg: &TrainConfig,
    device: tch::Device,
    checkpoints: bool,
) -> Option<Rejoin> {
    let rejoin = args.rejoin.clone().filter(|r| r.plan.nnodes_range.is_some() && plan.rendezvous.is_external())?;
    let why_not = if crate::launched_by_mpirun(plan) {
        Some("MPI cannot shrink a communicator")
    } else if device != tch::Device::Cpu {
        Some("the NCCL backend is not rebuilt in process yet")
    } else if cfg.shard != crate::train::ShardMode::None && !checkpoints {
        Some("with --shard each rank holds only its part of the optimizer state, and there is no checkpoint folder to continue from")
    } else {
        None
    };
    match why_not {
        Some(why) => {
            tracing::warn!("a lost rank ends this job ({why}); the platform's restart resumes it from its checkpoint");
            None
        }
        None => Some(rejoin),
    }
}

/// Joins the other ranks of `plan`. Under mpirun (built with MPI) there is no store.
pub(super) fn join(plan: &Plan, args: &TrainArgs) -> anyhow::Result<(Box<dyn Collective>, Option<Store>)> {
    let membership = crate::membership(plan);
    if crate::launched_by_mpirun(plan) && cfg!(feature = "mpi") {
        let comm = crate::comm::init(&membership, true, &args.comm).context("cannot join the other ranks")?;
        return Ok((comm, None));
    }
    let store = Store::rendezvous(&membership, &args.comm).context("cannot join the other ranks")?;
    let comm = crate::comm::connect(&store, &membership, &args.comm).context("cannot join the other ranks")?;
    Ok((comm, Some(store)))
}

/// The rank whose loss failed the run, when a rank was lost (the liveness verdict, given a moment to arrive).
pub(super) fn lost_rank(ddp: &mut Ddp) -> Option<LostRank> {
    ddp.collective().liveness()?.wait_lost(Some(VERDICT_WAIT))
}

/// Whether `lost` ran on the same node as global rank `rank`, with `local` processes per node: the processes a
/// `hytrain launch` started are one node at the store, and a node that lost one of them cannot be admitted whole.
pub(super) fn of_this_node(lost: &LostRank, rank: usize, local: usize) -> bool {
    !lost.store && local > 1 && lost.rank / local == rank / local
}

/// Why the ranks meet again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Why {
    /// A rank was lost: the round is over, and the step in flight is dropped.
    Lost,
    /// Nodes wait to join: every rank stopped at the same step boundary and leaves the round, which ends it.
    Joiners,
}

/// Meets the ranks left (and any node waiting to join) at the store in the job's next round and rebuilds `engine`
/// over them: every rank takes the new global rank 0's weights, buffers and optimizer state
/// ([`crate::train::elastic::catch_up`], which a node that joins calls at its start), or with a sharded engine
/// reload the job's last checkpoint. Returns the new engine, this node's plan in the new round and how the next run
/// starts (`trainer` ran the last one on this rank: where it stood and its learning-rate plan).
pub(super) fn rejoin(
    engine: Engine,
    why: Why,
    trainer: &Trainer,
    rejoin: &Rejoin,
    args: &TrainArgs,
    cfg: &TrainConfig,
    recorder: &FlightRecorder,
) -> anyhow::Result<(Engine, Plan, CatchUp)> {
    let Engine { ddp, optimizer, store, mut watchdog } = engine;
    let old_world = ddp.world_size();
    let state = optimizer.state();
    drop(optimizer);
    let (model, old_comm) = ddp.into_parts();
    drop(old_comm);
    match why {
        // The loss ended the round already.
        Why::Lost => watchdog.forget(),
        // Every rank's goodbye ends it, and the next round can begin.
        Why::Joiners => watchdog.finish(),
    }
    drop(store);
    let plan = super::super::rendezvous::admit(&rejoin.plan, &args.comm, rejoin.last_call)
        .context("the ranks left could not meet again")?;
    let t = &plan.topology;
    crate::logging::set_rank(t.rank, t.world_size, &t.current_host);
    recorder.new_round(t.rank, t.world_size);
    let (comm, store) = join(&plan, args).context("the ranks left could not meet again")?;
    let comm: Box<dyn Collective> = Box::new(Recorded::new(comm, recorder.clone()));
    let watchdog = Watchdog::start(comm.liveness(), plan.paths.failure_file.clone(), recorder.clone(), true);
    let mut ddp = Ddp::new(model, comm, cfg.ddp_options())?;
    let mut optimizer = ddp.build_optimizer(&cfg.optimizer_config())?;
    let (progress, lr) = (trainer.progress(), trainer.lr_plan());
    let carried = Some(crate::train::elastic::Carried { state: &state, progress, world_size: old_world, lr });
    let next = crate::train::elastic::catch_up(&mut ddp, optimizer.as_mut(), carried, cfg.batch_size)?;
    Ok((Engine { ddp, optimizer, store, watchdog }, plan, next))
}

/// Global rank 0's question at step boundaries: whether nodes wait at the store to join the job, while it runs
/// below MAX nodes (at MAX a node waits for a loss to make room).
pub(super) fn joiners_watch(plan: &Plan, store: Option<&Store>) -> Option<crate::train::JoinWatch> {
    let max = plan.nnodes_range?.max;
    let nodes = plan.topology.nnodes;
    let store = store?.clone();
    (plan.topology.rank == 0 && nodes < max).then(|| {
        Box::new(move || match store.nodes_waiting() {
            Ok(n) => n > 0,
            Err(e) => {
                tracing::warn!("cannot ask the store whether nodes wait to join: {e}");
                false
            }
        }) as crate::train::JoinWatch
    })
}

/// With --digest-trained: the batches this rank trained since the last such line, and their digest.
pub(super) fn log_trained_digest(train: &mut LoaderBatches, rank: usize, world_size: usize) {
    if let Some((batches, hex)) = train.take_digest() {
        tracing::info!("trained digest: rank {rank} of {world_size} trained {batches} batches: {hex}");
    }
}

/// A regroup as `hytrain data digest --regroup` takes it: `EPOCH:WxB,...`, the epoch from 1, in batches of
/// `batch_size`.
pub(super) fn regroup_text(regroup: &crate::data::Regroup, batch_size: usize) -> String {
    let sets: Vec<String> =
        regroup.before.iter().map(|r| format!("{}x{}", r.world_size, r.consumed / batch_size.max(1))).collect();
    format!("{}:{}", regroup.epoch + 1, sets.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_rank_is_of_this_node_when_it_shares_the_node_rank_and_nodes_have_several_processes() {
        let lost = |rank| LostRank { rank, host: "10.0.0.2:4000".into(), cause: "killed".into(), store: false };
        // Two processes per node: ranks 2 and 3 are node 1.
        assert!(of_this_node(&lost(3), 2, 2));
        assert!(!of_this_node(&lost(1), 2, 2));
        assert!(!of_this_node(&lost(0), 0, 1), "a node of one process is never the lost one's sibling");
        let store = LostRank { store: true, ..lost(0) };
        assert!(!of_this_node(&store, 1, 2), "a lost store is no rank of any node");
    }

    #[test]
    fn only_a_range_of_nodes_on_a_standalone_store_carries_on_and_not_on_a_gpu_or_with_shards_but_no_checkpoints() {
        let plan = crate::cluster::detect_from(&crate::cluster::Env::from_pairs([("HOSTNAME", "laptop")])).unwrap();
        let mut external = plan.clone();
        external.rendezvous = crate::cluster::Rendezvous::external("--rendezvous-endpoint", "10.0.0.9:29400").unwrap();
        external.set_nnodes("--nnodes", "2:4").unwrap();
        let ranged = Plan { rendezvous: plan.rendezvous.clone(), ..external.clone() };
        let args = |rejoin: &Plan| TrainArgs {
            config: super::super::ConfigFlags::default(),
            job: super::super::JobFlags::default(),
            comm: crate::comm::CommOptions::default(),
            rejoin: Some(Rejoin { plan: rejoin.clone(), last_call: std::time::Duration::from_secs(1) }),
        };
        let cfg = crate::train::TrainConfig::default();
        let cpu = tch::Device::Cpu;
        assert!(elastic(&external, &args(&external), &cfg, cpu, false).is_some());
        assert!(elastic(&ranged, &args(&ranged), &cfg, cpu, false).is_none(), "rank 0's store goes with rank 0");
        assert!(elastic(&plan, &args(&plan), &cfg, cpu, false).is_none(), "a fixed node count ends on a loss");
        let none = TrainArgs { rejoin: None, ..args(&external) };
        assert!(elastic(&external, &none, &cfg, cpu, false).is_none());
        assert!(elastic(&external, &args(&external), &cfg, tch::Device::Cuda(0), false).is_none());
        let sharded = crate::train::TrainConfig { shard: crate::train::ShardMode::Optimizer, ..cfg.clone() };
        assert!(elastic(&external, &args(&external), &sharded, cpu, false).is_none(), "nothing to continue from");
        assert!(elastic(&external, &args(&external), &sharded, cpu, true).is_some(), "its last checkpoint");
    }
}
