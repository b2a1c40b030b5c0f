//! Carrying on after the job's ranks changed, in memory: the ranks that are left (and any that joined) take global
//! rank 0's weights, buffers, optimizer state, loss scale and place in the data, with no checkpoint and no
//! restart.
//!
//! A sharded engine (`--shard`) cannot: each rank held only its part of the optimizer state, and a lost rank's part
//! is gone. Its ranks all continue from the job's last checkpoint instead ([`CatchUp::FromCheckpoint`]), which
//! they read at the new world size (sharded checkpoints reshard; the epoch is regrouped from the checkpoint's
//! position), still in the same processes.
//!
//! A rank may have applied the step in flight when the loss came (it finished its allreduces before the lost rank
//! stopped sending) while another had not; taking everything from one rank makes every rank the same whichever it
//! was. That rank's step counter then says whether the step counts, and [`Progress::next_start`] where the epoch's
//! remaining samples are.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::precision::{GradScaler, GradScalerState};
use crate::trainer::{state_layout, zeros_of_layout, Progress, Start};
use crate::{model, Ddp, LrPlan, Optimizer, Result, ShardMode, TrainError};

/// What a rank carries into a new set of ranks: its optimizer state, where its last run stood, and how many ranks
/// that run had.
#[derive(Debug, Clone, Copy)]
pub struct Carried<'a> {
    /// Its optimizer state from before the change.
    pub state: &'a [(String, Tensor)],
    /// Where its last run stood.
    pub progress: &'a Progress,
    /// The ranks of that run.
    pub world_size: usize,
    /// That run's learning-rate schedule and planned end ([`crate::Trainer::lr_plan`]).
    pub lr: Option<&'a LrPlan>,
}

/// How the ranks of a new set continue ([`catch_up`]).
#[derive(Debug, Clone, PartialEq)]
pub enum CatchUp {
    /// None of them was training (the job's first round): the run starts as usual, resuming from its checkpoint.
    Fresh,
    /// Every rank took global rank 0's state and continues from this place.
    Continue(Start),
    /// A sharded engine's ranks were training: every rank continues from the job's last checkpoint, read at the new
    /// world size (a run that resumes, even one started with `--no-resume`).
    FromCheckpoint,
}

/// How a rank of a new set of ranks continues: when any of them carried state over from the set before (a rank
/// that was training, rather than one just started), every rank takes global rank 0's with [`take_rank0_state`]
/// and continues from the returned [`Start`], or with a sharded engine every rank reloads the last checkpoint;
/// when none did (the job's first round), the run starts as usual. `carried` is what this rank has, if anything.
/// Every rank of the new set calls it at the same point; global rank 0 must be one that carried state whenever any
/// did (the store ranks the nodes of the round before first).
pub fn catch_up(
    ddp: &mut Ddp,
    optimizer: &mut dyn Optimizer,
    carried: Option<Carried<'_>>,
    batch_size: usize,
) -> Result<CatchUp> {
    let mine = f64::from(u8::from(carried.is_some()));
    let mut counts = [mine, if ddp.rank() == 0 { mine } else { 0.0 }];
    ddp.allreduce_f64(&mut counts, crate::ReduceOp::Sum)?;
    if counts[0] == 0.0 {
        return Ok(CatchUp::Fresh);
    }
    if ddp.shard_mode() != ShardMode::None {
        return Ok(CatchUp::FromCheckpoint);
    }
    if counts[1] == 0.0 {
        return Err(TrainError::OptimizerState(format!(
            "{} rank(s) carried training state into this round but global rank 0 did not, so there is no state to \
             share; the store ranks the nodes of the round before first, so this happens only when they left it",
            counts[0]
        )));
    }
    let fresh = Progress::default();
    let c = carried.unwrap_or(Carried { state: &[], progress: &fresh, world_size: 1, lr: None });
    take_rank0_state(ddp, optimizer, c, batch_size).map(CatchUp::Continue)
}

/// What global rank 0 tells the others.
#[derive(Serialize, Deserialize)]
struct Header {
    start: Start,
    /// Optimizer state entries: name, shape, kind.
    optimizer: Vec<(String, Vec<i64>, String)>,
    grad_scaler: Option<GradScalerState>,
}

/// Makes every rank continue as global rank 0 of the new ranks does. `ddp` is the engine over the new ranks
/// (whose construction already gave every rank rank 0's weights and buffers) and `optimizer` a fresh one built on
/// it; `carried` is what this rank had before the change (rank 0's is what counts). Returns where the next run
/// starts, with rank 0's learning-rate plan ([`crate::Trainer::continue_at`]). Every rank of the new set calls it
/// at the same point.
pub fn take_rank0_state(
    ddp: &mut Ddp,
    optimizer: &mut dyn Optimizer,
    carried: Carried<'_>,
    batch_size: usize,
) -> Result<Start> {
    let Carried { state, progress, world_size: old_world, lr } = carried;
    if ddp.shard_mode() != ShardMode::None {
        return Err(TrainError::option(
            "shard",
            format!(
                "is {}: each rank held only its part of the optimizer state, and a lost rank's part is gone; \
                 sharded jobs continue from their checkpoint instead (catch_up)",
                ddp.shard_mode()
            ),
        ));
    }
    let rank = ddp.rank();
    let mut bytes = if rank == 0 {
        let header = Header {
            start: Start { lr: lr.cloned(), ..progress.next_start(old_world, batch_size) },
            optimizer: state_layout(state),
            grad_scaler: ddp.grad_scaler().map(|s| s.state().clone()),
        };
        serde_json::to_vec(&header).expect("the header serialises")
    } else {
        Vec::new()
    };
    ddp.broadcast_bytes(&mut bytes, "rank 0's place and optimizer layout broadcast")?;
    let header: Header = serde_json::from_slice(&bytes)
        .map_err(|e| TrainError::OptimizerState(format!("rank 0's header does not parse: {e}")))?;
    // Rank 0's own state, or room for it on the others (their own may lack entries rank 0 has: a rank that never
    // stepped has no moments yet).
    let state: Vec<(String, Tensor)> = if rank == 0 {
        state.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    } else {
        zeros_of_layout(&header.optimizer, model::device_of(ddp.model()))?
    };
    ddp.broadcast_tensors(&state, "optimizer state broadcast from rank 0")?;
    ddp.load_optimizer_state(optimizer, &state)?;
    if let (Some(state), Some(scaler)) = (header.grad_scaler, ddp.grad_scaler_mut()) {
        *scaler = GradScaler::from_state(state);
    }
    Ok(header.start)
}
