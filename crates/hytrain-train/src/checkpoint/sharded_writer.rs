//! Sharded checkpoints written in the background (`--shard optimizer|gradients` with checkpoints).
//!
//! At the step boundary every rank copies its optimizer blocks to host memory (rank 0 also the model) and training
//! goes on while a thread of each rank encodes, checksums and writes its shard. Whether every rank is done travels
//! with the flags the step loop already allreduces before each step ([`ShardedWriter::done_here`] in,
//! [`ShardedWriter::observe`] with the sum), so a checkpoint in flight adds no collective. Once every shard is
//! written the ranks exchange their shards' sizes and checksums, as [`CheckpointStore::save_sharded`] does, and
//! rank 0 writes the model and, last, the manifest, again in the background. Until then the checkpoint does not
//! count and the previous one is what a restart resumes from.
//!
//! At most one checkpoint is in flight: one due while the previous is still being written waits for it, and says
//! how long. A shard that cannot be written fails every rank at the exchange; a model or manifest that cannot be
//! written comes back on rank 0 at the next checkpoint or at [`ShardedWriter::finish`] and ends the job, as an
//! [`AsyncCheckpointer`](super::AsyncCheckpointer)'s failed write does. The copies cost host memory: one copy of
//! a rank's optimizer blocks (and on rank 0 of the model) while a checkpoint is in flight.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use super::sharded::{write_name, RECORD};
use super::writer::snapshot;
use super::{Checkpoint, CheckpointStore, ShardLayout};
use crate::optim::Optimizer;
use crate::{Ddp, Result, TrainError};

/// Writes one rank's sharded checkpoints in the background; every rank of a sharded engine holds one.
#[derive(Debug)]
pub struct ShardedWriter {
    store: Arc<CheckpointStore>,
    pending: Option<Pending>,
    /// Rank 0: the model and manifest of a checkpoint whose shards are all written, being written.
    committing: Option<(u64, JoinHandle<Result<PathBuf>>)>,
    /// Rank 0: the last checkpoint completed.
    last: Option<PathBuf>,
    held_secs: f64,
}

/// A checkpoint whose shards are being written.
#[derive(Debug)]
struct Pending {
    step: u64,
    write: String,
    layout: ShardLayout,
    /// Rank 0: the host copy of the model, with the checkpoint's meta.
    model: Option<Checkpoint>,
    /// This rank's shard: its record for the exchange.
    shard: JoinHandle<Result<[u8; RECORD]>>,
}

fn panicked(step: u64, what: &str) -> TrainError {
    TrainError::Checkpoint {
        path: PathBuf::new(),
        detail: format!("the thread writing the {what} of step {step} panicked; this is a bug in hytrain"),
    }
}

impl ShardedWriter {
    /// Writes into `store`.
    pub fn new(store: CheckpointStore) -> Self {
        ShardedWriter { store: Arc::new(store), pending: None, committing: None, last: None, held_secs: 0.0 }
    }

    /// The store written to.
    pub fn store(&self) -> &CheckpointStore {
        &self.store
    }

    /// Where checkpoints go (a folder or an `s3://` URL).
    pub fn location(&self) -> &Path {
        self.store.dir()
    }

    /// Every rank at the same step: copies this rank's optimizer blocks (and on rank 0 `model`, which only rank 0
    /// gives) and starts writing the shard in the background. Waits first for a checkpoint still in flight.
    pub fn save(
        &mut self,
        ddp: &mut Ddp,
        optimizer: &dyn Optimizer,
        model: Option<&Checkpoint>,
        step: u64,
    ) -> Result<()> {
        let held = Instant::now();
        if let Some(earlier) = self.writing() {
            tracing::info!(step, earlier, "checkpoint of step {step} waits for the write of step {earlier}");
        }
        self.complete(ddp)?;
        self.join_commit()?;
        let (rank, world) = (ddp.rank(), ddp.world_size());
        let layout = ddp.shard_layout(optimizer)?;
        let write = write_name(ddp)?;
        let state = snapshot(&optimizer.state(), Vec::new())?;
        let model = model
            .map(|m| -> Result<Checkpoint> {
                Ok(Checkpoint { model: snapshot(&m.model, Vec::new())?, optimizer: Vec::new(), meta: m.meta.clone() })
            })
            .transpose()?;
        let store = Arc::clone(&self.store);
        let name = write.clone();
        let shard = std::thread::Builder::new()
            .name("hytrain-shard-writer".into())
            .spawn(move || store.write_shard(step, &name, rank, world, &state))
            .map_err(|e| TrainError::Checkpoint {
                path: self.store.dir().to_path_buf(),
                detail: format!("cannot start the thread writing the optimizer shard of step {step}: {e}"),
            })?;
        self.pending = Some(Pending { step, write, layout, model, shard });
        self.held_secs += held.elapsed().as_secs_f64();
        Ok(())
    }

    /// This rank's part of the step loop's flags: 1 when a checkpoint is in flight and this rank's shard is written.
    pub fn done_here(&self) -> f64 {
        f64::from(u8::from(self.pending.as_ref().is_some_and(|p| p.shard.is_finished())))
    }

    /// Every rank at the same step, with the sum of [`ShardedWriter::done_here`] over the ranks: once every rank's
    /// shard is written, exchanges the records and has rank 0 write the model and the manifest in the background.
    pub fn observe(&mut self, ddp: &mut Ddp, done: f64) -> Result<()> {
        if self.pending.is_some() && done >= ddp.world_size() as f64 {
            self.complete(ddp)?;
        }
        Ok(())
    }

    /// Every rank at the end of the run: completes the checkpoint in flight. Rank 0 returns the last checkpoint
    /// written.
    pub fn finish(&mut self, ddp: &mut Ddp) -> Result<Option<PathBuf>> {
        let held = Instant::now();
        self.complete(ddp)?;
        self.join_commit()?;
        self.held_secs += held.elapsed().as_secs_f64();
        Ok(self.last.clone())
    }

    /// The step of the checkpoint being written, if any.
    pub fn writing(&self) -> Option<u64> {
        self.pending.as_ref().map(|p| p.step).or(self.committing.as_ref().map(|(step, _)| *step))
    }

    /// Seconds the step loop waited for checkpoints: the copies, and waits for a write still in flight.
    pub fn held_secs(&self) -> f64 {
        self.held_secs
    }

    /// Every rank: waits for this rank's shard, exchanges the records and starts rank 0's commit.
    fn complete(&mut self, ddp: &mut Ddp) -> Result<()> {
        let Some(pending) = self.pending.take() else {
            return Ok(());
        };
        let Pending { step, write, layout, model, shard } = pending;
        let written = shard.join().unwrap_or_else(|_| Err(panicked(step, "optimizer shard")));
        let records = self.store.exchange_records(ddp, step, &write, written)?;
        if let Some(model) = model {
            let store = Arc::clone(&self.store);
            let commit = std::thread::Builder::new()
                .name("hytrain-shard-commit".into())
                .spawn(move || store.commit_records(step, &write, &model, layout, &records))
                .map_err(|e| TrainError::Checkpoint {
                    path: self.store.dir().to_path_buf(),
                    detail: format!("cannot start the thread writing the manifest of step {step}: {e}"),
                })?;
            self.committing = Some((step, commit));
        }
        Ok(())
    }

    /// Rank 0: waits for the model and manifest being written.
    fn join_commit(&mut self) -> Result<()> {
        if let Some((step, commit)) = self.committing.take() {
            let path = commit.join().unwrap_or_else(|_| Err(panicked(step, "model and manifest")))?;
            tracing::info!(step, path = %path.display(), "sharded checkpoint written");
            self.last = Some(path);
        }
        Ok(())
    }
}
