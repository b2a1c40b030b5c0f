//! Carrying on after the job's ranks changed, in memory: the ranks that are left (and any that joined) take global
//! rank 0's weights, buffers, optimizer state, loss scale and place in the data, with no checkpoint and no
//! restart.
//!
//! A rank may have applied the step in flight when the loss came (it finished its allreduces before the lost rank
//! stopped sending) while another had not; taking everything from one rank makes every rank the same whichever it
//! was. That rank's step counter then says whether the step counts, and [`Progress::next_start`] where the epoch's
//! remaining samples are.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::checkpoint::sharded::broadcast_bytes;
use crate::precision::{GradScaler, GradScalerState};
use crate::trainer::{kind_from_name, Progress, Start};
use crate::{model, Ddp, Optimizer, Result, ShardMode, TrainError};

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
/// it; `state` is this rank's optimizer state from before the change, `progress` where its last run stood and
/// `old_world` the ranks it ran with (rank 0's are the ones that count). Returns where the next run starts
/// ([`crate::Trainer::continue_at`]). Every rank of the new set calls it at the same point.
pub fn take_rank0_state(
    ddp: &mut Ddp,
    optimizer: &mut dyn Optimizer,
    state: &[(String, Tensor)],
    progress: &Progress,
    old_world: usize,
    batch_size: usize,
) -> Result<Start> {
    if ddp.shard_mode() != ShardMode::None {
        return Err(TrainError::option(
            "shard",
            format!(
                "is {}: each rank held only its part of the optimizer state, and a lost rank's part is gone; \
                 sharded jobs restart from their checkpoint instead",
                ddp.shard_mode()
            ),
        ));
    }
    let rank = ddp.rank();
    let mut bytes = if rank == 0 {
        let header = Header {
            start: progress.next_start(old_world, batch_size),
            optimizer: state.iter().map(|(n, t)| (n.clone(), t.size(), format!("{:?}", t.kind()))).collect(),
            grad_scaler: ddp.grad_scaler().map(|s| s.state().clone()),
        };
        serde_json::to_vec(&header).expect("the header serialises")
    } else {
        Vec::new()
    };
    broadcast_bytes(ddp, &mut bytes, "rank 0's place and optimizer layout broadcast")?;
    let header: Header = serde_json::from_slice(&bytes)
        .map_err(|e| TrainError::OptimizerState(format!("rank 0's header does not parse: {e}")))?;
    // Rank 0's own state, or room for it on the others (their own may lack entries rank 0 has: a rank that never
    // stepped has no moments yet).
    let state: Vec<(String, Tensor)> = if rank == 0 {
        state.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    } else {
        let device = model::device_of(ddp.model());
        header
            .optimizer
            .iter()
            .map(|(name, shape, kind)| {
                let kind = kind_from_name(kind).ok_or_else(|| {
                    TrainError::OptimizerState(format!("entry {name} has dtype {kind}, which hytrain cannot load"))
                })?;
                Tensor::f_zeros(shape.as_slice(), (kind, device))
                    .map(|t| (name.clone(), t))
                    .map_err(|e| TrainError::torch("allocating optimizer state", e))
            })
            .collect::<Result<_>>()?
    };
    ddp.broadcast_tensors(&state, "optimizer state broadcast from rank 0")?;
    ddp.load_optimizer_state(optimizer, &state)?;
    if let (Some(state), Some(scaler)) = (header.grad_scaler, ddp.grad_scaler_mut()) {
        *scaler = GradScaler::from_state(state);
    }
    Ok(header.start)
}
