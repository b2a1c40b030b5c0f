//! Resuming a run from the newest valid checkpoint: rank 0 reads it and broadcasts what every rank needs.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::{Run, RunPaths};
use crate::checkpoint::{CheckpointMeta, ShardedWriter};
use crate::model;
use crate::precision::GradScaler;
use crate::{Result, TrainError};

/// What rank 0 tells the others about the checkpoint it resumes from.
#[derive(serde::Serialize, serde::Deserialize)]
struct ResumeHeader {
    error: Option<String>,
    path: Option<PathBuf>,
    meta: Option<CheckpointMeta>,
    /// Optimizer state entries: name, shape, kind.
    optimizer: Vec<(String, Vec<i64>, String)>,
}

/// An optimizer state's layout, which rank 0 sends ahead of the values: each entry's name, shape and kind.
pub(crate) fn state_layout(state: &[(String, Tensor)]) -> Vec<(String, Vec<i64>, String)> {
    state.iter().map(|(n, t)| (n.clone(), t.size(), format!("{:?}", t.kind()))).collect()
}

/// Zero tensors of `layout` on `device`, into which rank 0's optimizer state is broadcast.
pub(crate) fn zeros_of_layout(layout: &[(String, Vec<i64>, String)], device: Device) -> Result<Vec<(String, Tensor)>> {
    layout
        .iter()
        .map(|(name, shape, kind)| {
            let kind = kind_from_name(kind).ok_or_else(|| {
                TrainError::OptimizerState(format!("entry {name} has dtype {kind}, which hytrain cannot load"))
            })?;
            Tensor::f_zeros(shape.as_slice(), (kind, device))
                .map(|t| (name.clone(), t))
                .map_err(|e| TrainError::torch("allocating optimizer state", e))
        })
        .collect()
}

fn kind_from_name(name: &str) -> Option<Kind> {
    Some(match name {
        "Float" => Kind::Float,
        "Double" => Kind::Double,
        "Half" => Kind::Half,
        "BFloat16" => Kind::BFloat16,
        "Int64" => Kind::Int64,
        "Int" => Kind::Int,
        "Int16" => Kind::Int16,
        "Int8" => Kind::Int8,
        "Uint8" => Kind::Uint8,
        "Bool" => Kind::Bool,
        _ => return None,
    })
}

impl Run<'_> {
    /// Rank 0 finds and loads the newest valid checkpoint, then broadcasts its step, position, weights and
    /// optimizer state, so every rank continues from it whether or not it can see the directory.
    pub(super) fn resume(&mut self, paths: &RunPaths) -> Result<Option<(PathBuf, CheckpointMeta)>> {
        if let Some(store) = self.sharded.as_ref().map(ShardedWriter::store) {
            // Every rank reads its own optimizer shards; rank 0 the model, broadcast.
            if self.config.no_resume {
                return Ok(None);
            }
            let Some(found) = store.resume_sharded(self.ddp, self.optimizer)? else {
                return Ok(None);
            };
            self.restore_generators(&found.path, &found.meta)?;
            tracing::info!(
                rank = self.ddp.rank(),
                path = %found.path.display(),
                step = found.meta.step,
                epoch = found.meta.epoch + 1,
                position = %found.meta.data_position,
                shards = ?found.read,
                "resuming from checkpoint"
            );
            return Ok(Some((found.path, found.meta)));
        }
        let rank = self.ddp.rank();
        let mut header = ResumeHeader { error: None, path: None, meta: None, optimizer: Vec::new() };
        let mut optimizer_state = Vec::new();
        if rank == 0 && !self.config.no_resume {
            match self.load_latest() {
                Ok(Some((path, meta, state))) => {
                    header.optimizer = state_layout(&state);
                    header.path = Some(path);
                    header.meta = Some(meta);
                    optimizer_state = state;
                }
                Ok(None) => {}
                Err(e) => header.error = Some(e.to_string()),
            }
        }
        if self.ddp.world_size() > 1 {
            let mut bytes =
                if rank == 0 { serde_json::to_vec(&header).expect("header serialises") } else { Vec::new() };
            self.ddp.broadcast_bytes(&mut bytes, "resume decision broadcast")?;
            header = serde_json::from_slice(&bytes).map_err(|e| TrainError::Checkpoint {
                path: paths.checkpoint_dir.clone().unwrap_or_default(),
                detail: format!("resume header from rank 0 does not parse: {e}"),
            })?;
        }
        if let Some(detail) = header.error {
            return Err(TrainError::Checkpoint { path: paths.checkpoint_dir.clone().unwrap_or_default(), detail });
        }
        let (Some(path), Some(meta)) = (header.path, header.meta) else {
            return Ok(None);
        };
        self.restore_generators(&path, &meta)?;
        if self.ddp.world_size() > 1 {
            let weights = model::state_tensors(self.ddp.model());
            self.ddp.broadcast_tensors(&weights, "checkpoint weights broadcast from rank 0")?;
            if rank != 0 {
                optimizer_state = zeros_of_layout(&header.optimizer, model::device_of(self.ddp.model()))?;
            }
            self.ddp.broadcast_tensors(&optimizer_state, "optimizer state broadcast from rank 0")?;
            if rank != 0 {
                self.ddp.load_optimizer_state(self.optimizer, &optimizer_state)?;
            }
        }
        tracing::info!(
            rank,
            path = %path.display(),
            step = meta.step,
            epoch = meta.epoch + 1,
            position = %meta.data_position,
            "resuming from checkpoint"
        );
        Ok(Some((path, meta)))
    }

    /// The loss scaler and the random generators as `meta` recorded them.
    fn restore_generators(&mut self, path: &Path, meta: &CheckpointMeta) -> Result<()> {
        // Every rank has the header, so every rank's scaler continues alike. A checkpoint of another precision
        // (or from before fp16 existed) has no scaler state: the scaler then starts afresh.
        if let (Some(state), Some(scaler)) = (&meta.grad_scaler, self.ddp.grad_scaler_mut()) {
            *scaler = GradScaler::from_state(state.clone());
        }
        // Rank 0's generators are every rank's (all seed and draw alike), so dropout continues as if uninterrupted.
        crate::rng::restore(model::device_of(self.ddp.model()), &meta.rng.state).map_err(|e| TrainError::Checkpoint {
            path: path.to_path_buf(),
            detail: format!(
                "libtorch's random generator state does not load: {e} (written by another libtorch?); resume \
                     with the libtorch that wrote it, or start afresh with --no-resume"
            ),
        })
    }

    /// Rank 0: the newest valid checkpoint loaded into the model and optimizer.
    #[allow(clippy::type_complexity)]
    fn load_latest(&mut self) -> Result<Option<(PathBuf, CheckpointMeta, Vec<(String, Tensor)>)>> {
        let Some(checkpoints) = &self.checkpoints else {
            return Ok(None);
        };
        let Some(resume) = checkpoints.store().latest_valid()? else {
            return Ok(None);
        };
        let ckpt = resume.checkpoint;
        model::load_state_tensors(self.ddp.model(), &ckpt.model)?;
        self.ddp.load_optimizer_state(self.optimizer, &ckpt.optimizer)?;
        Ok(Some((resume.path, ckpt.meta, ckpt.optimizer)))
    }
}
