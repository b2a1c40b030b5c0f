//! Sharded checkpoints (`--shard optimizer|gradients`): every rank writes its own blocks of the optimizer state,
//! `optimizer-shard-<r>-of-<w>.safetensors` (the optimizer's flat per-bucket tensors, `zero.bucket<b>.exp_avg`
//! ...), and rank 0 writes `model.safetensors` and, last, `meta.json` with the bucket layout and every shard's
//! size and SHA-256. Nobody materialises the whole optimizer state to save it.
//!
//! Saving ([`CheckpointStore::save_sharded`], every rank at the same step): rank 0 broadcasts the name of this
//! write's folder, every rank writes its shard into it, and the ranks allgather `(ok, size, SHA-256)`. Any rank's
//! failure fails every rank and rank 0 drops the write; otherwise rank 0 writes the model and the manifest (in a
//! folder: into the same aside folder, renamed into place as a whole) and tells every rank whether that worked.
//! A checkpoint whose manifest is missing, or one of whose shards is missing or differs from its manifest, does not
//! count; earlier checkpoints are untouched by a failed write.
//!
//! Resuming ([`CheckpointStore::resume_sharded`], every rank of a sharded run): rank 0 picks the newest checkpoint
//! whose manifest and model verify and tells every rank; each rank reads only the shard files that overlap its
//! blocks (at the same world size, its own), and the ranks agree that all of them verified, or pass together to
//! the next older checkpoint. At another world size each bucket's old blocks are laid end to end, the padding
//! dropped and the new block cut; with another bucket layout (another `--bucket-mb`) every rank assembles the
//! per-parameter state from all shards. An unsharded run, [`super::latest_valid`] and `hytrain checkpoint
//! consolidate` read every shard and assemble the per-parameter state (`fc.weight.exp_avg`).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use tch::Tensor;

use super::{
    sha256_hex, to_safetensors, verify_and_parse, Checkpoint, CheckpointMeta, CheckpointStore, MetaFile, Skipped,
    FORMAT, MODEL_FILE,
};
use crate::ddp::ShardMode;
use crate::model;
use crate::optim::Optimizer;
use crate::{Ddp, ReduceOp, Result, TrainError};

/// The file of rank `rank`'s shard in a checkpoint written by `world` ranks.
pub fn shard_file(rank: usize, world: usize) -> String {
    format!("optimizer-shard-{rank}-of-{world}.safetensors")
}

/// What a sharded checkpoint's manifest records to put its shards back together at any world size.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardLayout {
    /// Ranks that wrote it, one shard file each.
    pub world_size: usize,
    /// What the run sharded (`optimizer` or `gradients`).
    pub mode: ShardMode,
    /// The gradient buckets, whose flat buffers the shards are blocks of.
    pub buckets: Vec<ShardBucket>,
}

/// One gradient bucket of a [`ShardLayout`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardBucket {
    /// Its parameters, in buffer order.
    pub params: Vec<ShardParam>,
    /// Elements of the flat buffer without padding.
    pub numel: usize,
    /// Elements with padding: a multiple of the world size; rank r's block is the r-th of `world_size` equal parts.
    pub padded: usize,
    /// The optimizer state kept for the bucket (`exp_avg`, `exp_avg_sq`, `step`, `momentum_buffer`); `step` is
    /// one number per bucket, the same in every shard.
    pub state: Vec<String>,
}

/// One parameter of a [`ShardBucket`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardParam {
    /// Its name in the model.
    pub name: String,
    /// Its shape.
    pub shape: Vec<i64>,
    /// Where its values start in the flat buffer.
    pub offset: i64,
}

impl ShardBucket {
    /// The elements of the flat buffer old rank `rank` of `world` held.
    fn block(&self, rank: usize, world: usize) -> Range<usize> {
        hytrain_comm::block_range(self.padded, world, rank)
    }
}

/// A sharded checkpoint found by rank 0, as every rank needs it to read its shards.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ShardedCheckpoint {
    /// Its folder (or `s3://` URL).
    pub path: PathBuf,
    /// The layout of its optimizer state.
    pub layout: ShardLayout,
    /// On S3, the folder below `ckpt-<step>/` holding its files.
    pub(super) files_in: Option<String>,
    /// Each shard file's name, size and SHA-256, by old rank.
    pub(super) shards: Vec<(String, u64, String)>,
}

impl ShardedCheckpoint {
    /// Its shard files' records from its manifest, or why they are not all there.
    pub(super) fn from_manifest(path: &Path, meta: &MetaFile) -> std::result::Result<Option<Self>, String> {
        let Some(layout) = &meta.sharded else {
            return Ok(None);
        };
        let mut shards = Vec::with_capacity(layout.world_size);
        for r in 0..layout.world_size {
            let file = shard_file(r, layout.world_size);
            let sha = meta.files.get(&file).ok_or_else(|| format!("meta.json lists no checksum for {file}"))?;
            let size = *meta.sizes.get(&file).ok_or_else(|| format!("meta.json lists no size for {file}"))?;
            shards.push((file, size, sha.clone()));
        }
        Ok(Some(ShardedCheckpoint {
            path: path.to_path_buf(),
            layout: layout.clone(),
            files_in: meta.files_in.clone(),
            shards,
        }))
    }

    /// Old rank `rank`'s shard, from the bytes of its file: checked against the manifest and against the layout.
    pub(super) fn decode(&self, rank: usize, bytes: &[u8]) -> std::result::Result<Vec<(String, Tensor)>, String> {
        let (file, size, sha) = &self.shards[rank];
        let tensors = verify_and_parse(file, bytes, sha, Some(*size))?;
        let world = self.layout.world_size;
        for (b, bucket) in self.layout.buckets.iter().enumerate() {
            let len = bucket.block(rank, world).len() as i64;
            for key in &bucket.state {
                let name = state_name(b, key);
                let t = tensors
                    .iter()
                    .find(|(n, _)| *n == name)
                    .ok_or_else(|| format!("{file} has no tensor {name}, which meta.json lists"))?;
                if key != "step" && t.1.size() != [len] {
                    return Err(format!("{file}: {name} has shape {:?}, the layout says [{len}]", t.1.size()));
                }
            }
        }
        Ok(tensors)
    }
}

/// The optimizer's name for state `key` of bucket `b`'s block.
fn state_name(b: usize, key: &str) -> String {
    format!("zero.bucket{b}.{key}")
}

/// The per-parameter optimizer state (`fc.weight.exp_avg`, DDP's checkpoint format) from every shard of a layout,
/// in old-rank order.
pub(crate) fn assemble(
    layout: &ShardLayout,
    shards: &[Vec<(String, Tensor)>],
) -> std::result::Result<Vec<(String, Tensor)>, String> {
    let torch = |e: tch::TchError| format!("assembling the optimizer state: {e}");
    let mut out = Vec::new();
    for (b, bucket) in layout.buckets.iter().enumerate() {
        for key in &bucket.state {
            let name = state_name(b, key);
            let parts: Vec<&Tensor> = shards
                .iter()
                .map(|s| s.iter().find(|(n, _)| *n == name).map(|(_, t)| t).ok_or_else(|| format!("no {name}")))
                .collect::<std::result::Result<_, _>>()?;
            if key == "step" {
                for p in &bucket.params {
                    out.push((format!("{}.{key}", p.name), parts[0].copy()));
                }
                continue;
            }
            let flat = Tensor::f_cat(&parts, 0).map_err(torch)?;
            for p in &bucket.params {
                let numel: i64 = p.shape.iter().product();
                let t = flat.f_narrow(0, p.offset, numel).and_then(|t| t.f_view(p.shape.as_slice())).map_err(torch)?;
                out.push((format!("{}.{key}", p.name), t.copy()));
            }
        }
    }
    Ok(out)
}

/// This rank's blocks, laid out as the checkpoint's: for each bucket `b`, `blocks[b]` is this rank's block of its
/// padded flat buffer. `read(q)` gives old rank `q`'s shard; only those overlapping the blocks are asked for (at
/// the same world size, this rank's own).
pub(crate) fn cut(
    layout: &ShardLayout,
    blocks: &[Range<usize>],
    read: &mut dyn FnMut(usize) -> Result<Vec<(String, Tensor)>>,
) -> Result<Vec<(String, Tensor)>> {
    let world = layout.world_size;
    let mut cache: BTreeMap<usize, Vec<(String, Tensor)>> = BTreeMap::new();
    let mut out = Vec::new();
    for (b, (bucket, block)) in layout.buckets.iter().zip(blocks).enumerate() {
        // The values past `numel` are padding, zero in every layout.
        let real = block.start.min(bucket.numel)..block.end.min(bucket.numel);
        let mut owners: Vec<usize> =
            (0..world).filter(|&q| overlap(&bucket.block(q, world), &real).is_some()).collect();
        if owners.is_empty() {
            // A block of padding only: the step count is all it needs, from the shard that held its start.
            owners.push((0..world).find(|&q| bucket.block(q, world).contains(&block.start)).unwrap_or(world - 1));
        }
        for &q in &owners {
            if let std::collections::btree_map::Entry::Vacant(e) = cache.entry(q) {
                e.insert(read(q)?);
            }
        }
        for key in &bucket.state {
            let name = state_name(b, key);
            let torch = |e| TrainError::torch(format!("resharding optimizer state {name}"), e);
            let find = |q: usize| cache[&q].iter().find(|(n, _)| *n == name).map(|(_, t)| t).expect("checked");
            if key == "step" {
                out.push((name.clone(), find(owners[0]).copy()));
                continue;
            }
            let first = find(owners[0]);
            let own = Tensor::f_zeros([block.len() as i64], (first.kind(), first.device())).map_err(torch)?;
            for &q in &owners {
                let old = bucket.block(q, world);
                let Some(both) = overlap(&old, &real) else { continue };
                let src = find(q).f_narrow(0, (both.start - old.start) as i64, both.len() as i64).map_err(torch)?;
                tch::no_grad(|| own.f_narrow(0, (both.start - block.start) as i64, both.len() as i64)?.f_copy_(&src))
                    .map_err(torch)?;
            }
            out.push((name, own));
        }
    }
    Ok(out)
}

fn overlap(a: &Range<usize>, b: &Range<usize>) -> Option<Range<usize>> {
    let r = a.start.max(b.start)..a.end.min(b.end);
    (r.start < r.end).then_some(r)
}

/// A sharded checkpoint a run resumed from.
#[derive(Debug)]
pub struct ShardedResume {
    /// Its folder (or `s3://` URL).
    pub path: PathBuf,
    /// Step, epoch, data position, RNG, configuration, schedule.
    pub meta: CheckpointMeta,
    /// Newer checkpoints that were torn or corrupt (on rank 0), newest first.
    pub skipped: Vec<Skipped>,
    /// The optimizer shard files this rank read (none for an unsharded checkpoint, whose state rank 0 sends).
    pub read: Vec<String>,
}

/// What rank 0 tells the others about a checkpoint to resume from.
#[derive(serde::Serialize, serde::Deserialize)]
enum Offer {
    /// None is valid (or there is none).
    Nothing,
    /// Rank 0 could not look (S3 or the disk failed).
    Failed(String),
    /// An unsharded checkpoint: its per-parameter optimizer state follows as a broadcast (name, shape, kind).
    Unsharded { path: PathBuf, meta: Box<CheckpointMeta>, optimizer: Vec<(String, Vec<i64>, String)> },
    /// A sharded checkpoint whose manifest and model verified: every rank reads its shards.
    Sharded { meta: Box<CheckpointMeta>, shards: ShardedCheckpoint },
}

fn comm(during: &str) -> impl FnOnce(crate::CommError) -> TrainError + '_ {
    move |source| TrainError::Comm { during: during.into(), source }
}

/// A shard's record in the allgather after writing: ok, size, SHA-256.
pub(super) const RECORD: usize = 1 + 8 + 32;

/// A fresh name for one write of a sharded checkpoint, rank 0's on every rank (every rank writes into it).
pub(super) fn write_name(ddp: &mut Ddp) -> Result<String> {
    let mut write = if ddp.rank() == 0 { super::write_id().into_bytes() } else { Vec::new() };
    ddp.broadcast_bytes(&mut write, "checkpoint write name broadcast")?;
    Ok(String::from_utf8_lossy(&write).into_owned())
}

impl CheckpointStore {
    /// Writes a sharded checkpoint of `step`: every rank of a sharded engine calls it at the same step. Each rank
    /// writes its optimizer shard; rank 0 then writes `model` (its `model` and `meta`; the other ranks give `None`)
    /// and the manifest, last. Any rank's failure fails every rank and leaves earlier checkpoints as they were; a
    /// checkpoint folder must be shared by every rank (a network file system), or be an `s3://` prefix. Returns
    /// the checkpoint's path on rank 0.
    pub fn save_sharded(
        &self,
        ddp: &mut Ddp,
        optimizer: &dyn Optimizer,
        model: Option<&Checkpoint>,
        step: u64,
    ) -> Result<Option<PathBuf>> {
        let (rank, world) = (ddp.rank(), ddp.world_size());
        let layout = ddp.shard_layout(optimizer)?;
        let write = write_name(ddp)?;
        let written = self.write_shard(step, &write, rank, world, &optimizer.state());
        let records = self.exchange_records(ddp, step, &write, written)?;
        let mut outcome = vec![0u8];
        let mut path = None;
        if rank == 0 {
            // Checked here, not before: the other ranks wait for the outcome either way.
            let committed = match model {
                Some(model) => self.commit_records(step, &write, model, layout, &records),
                None => {
                    self.abandon(step, &write);
                    Err(TrainError::Checkpoint {
                        path: self.dir().to_path_buf(),
                        detail: "rank 0 saved a sharded checkpoint without the model; this is a bug in hytrain".into(),
                    })
                }
            };
            match committed {
                Ok(p) => path = Some(p),
                Err(e) => {
                    outcome[0] = 1;
                    ddp.broadcast_bytes(&mut outcome, "checkpoint outcome broadcast")?;
                    return Err(e);
                }
            }
        }
        ddp.broadcast_bytes(&mut outcome, "checkpoint outcome broadcast")?;
        if outcome[0] != 0 {
            return Err(TrainError::Checkpoint {
                path: self.dir().to_path_buf(),
                detail: format!(
                    "rank 0 could not write the model and manifest of step {step} (see its log); this checkpoint \
                     does not count and the earlier ones are untouched"
                ),
            });
        }
        Ok(path)
    }

    /// Encodes `state` (host tensors, or device ones copied here) as rank `rank`'s shard of the write `write` of
    /// `step` and writes it: the shard's record for the exchange.
    pub(super) fn write_shard(
        &self,
        step: u64,
        write: &str,
        rank: usize,
        world: usize,
        state: &[(String, Tensor)],
    ) -> Result<[u8; RECORD]> {
        let file = shard_file(rank, world);
        let bytes = to_safetensors(&file, state)?;
        let mut record = [0u8; RECORD];
        record[0] = 1;
        record[1..9].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
        record[9..].copy_from_slice(&sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(&bytes)));
        self.put_shard(step, write, &file, bytes)?;
        Ok(record)
    }

    /// Every rank: allgathers the shards' records of the write `write` (this rank's is `written`). If any rank's
    /// write failed, rank 0 drops the write and every rank returns an error; else every rank's record, in rank order.
    pub(super) fn exchange_records(
        &self,
        ddp: &mut Ddp,
        step: u64,
        write: &str,
        written: Result<[u8; RECORD]>,
    ) -> Result<Vec<u8>> {
        let (rank, world) = (ddp.rank(), ddp.world_size());
        let record = written.as_ref().map_or([0u8; RECORD], |r| *r);
        let mut records = vec![0u8; RECORD * world];
        ddp.collective().allgather(&record, &mut records).map_err(comm("checkpoint shard records allgather"))?;
        let failed: Vec<usize> = (0..world).filter(|&r| records[r * RECORD] == 0).collect();
        if failed.is_empty() {
            return Ok(records);
        }
        if rank == 0 {
            self.abandon(step, write);
        }
        tracing::error!(rank, step, ranks = ?failed, "an optimizer shard could not be written; the checkpoint is dropped");
        Err(written.err().unwrap_or_else(|| TrainError::Checkpoint {
            path: self.dir().to_path_buf(),
            detail: format!(
                "rank(s) {failed:?} could not write their optimizer shard of step {step} (see their log); this \
                 checkpoint does not count and the earlier ones are untouched"
            ),
        }))
    }

    /// Rank 0, once every shard of the write `write` is written (`records`, in rank order): writes `model` and,
    /// last, the manifest. On failure the write is dropped and the earlier checkpoints stay as they were.
    pub(super) fn commit_records(
        &self,
        step: u64,
        write: &str,
        model: &Checkpoint,
        layout: ShardLayout,
        records: &[u8],
    ) -> Result<PathBuf> {
        let committed = (|| {
            let model_bytes = to_safetensors(MODEL_FILE, &model.model)?;
            let mut files = BTreeMap::from([(MODEL_FILE.to_string(), sha256_hex(&model_bytes))]);
            let mut sizes = BTreeMap::from([(MODEL_FILE.to_string(), model_bytes.len() as u64)]);
            for (r, rec) in records.chunks_exact(RECORD).enumerate() {
                let file = shard_file(r, layout.world_size);
                let size = u64::from_le_bytes(rec[1..9].try_into().expect("8 bytes"));
                files.insert(file.clone(), rec[9..].iter().map(|b| format!("{b:02x}")).collect());
                sizes.insert(file, size);
            }
            let meta = MetaFile {
                format: FORMAT.into(),
                hytrain_version: env!("CARGO_PKG_VERSION").into(),
                meta: model.meta.clone(),
                files,
                sizes,
                files_in: None,
                sharded: Some(layout),
            };
            self.commit_sharded(step, write, model_bytes, meta)
        })();
        if committed.is_err() {
            self.abandon(step, write);
        }
        committed
    }

    /// Resumes every rank of a sharded engine from the newest valid checkpoint of this store, sharded or not: the
    /// model (rank 0 reads it and broadcasts the weights) and this rank's optimizer blocks. Every rank calls it;
    /// `None` when there is no valid checkpoint, and then nothing was changed.
    pub fn resume_sharded(&self, ddp: &mut Ddp, optimizer: &mut dyn Optimizer) -> Result<Option<ShardedResume>> {
        let rank = ddp.rank();
        let mut candidates = if rank == 0 { self.candidates()?.into_iter() } else { Vec::new().into_iter() };
        let mut skipped = Vec::new();
        // Rank 0's weights before it tried a checkpoint, put back should the ranks pass over it.
        let before: Vec<(String, Tensor)> = if rank == 0 {
            model::state_tensors(ddp.model()).iter().map(|(n, t)| (n.clone(), t.copy())).collect()
        } else {
            Vec::new()
        };
        loop {
            let mut held = None;
            let mut offer = Offer::Nothing;
            if rank == 0 {
                for path in candidates.by_ref() {
                    // A checkpoint of another model fails every rank with rank 0's reason rather than be skipped.
                    let read = self.read_model(&path).and_then(|found| {
                        match model::load_state_tensors(ddp.model(), &found.0.model) {
                            Ok(()) => Ok(found),
                            Err(e) => Err(TrainError::ModelConfig {
                                model: ddp.model().name().to_string(),
                                detail: format!(
                                    "{} holds another model's weights ({e}); resume with the model that wrote it, or \
                                 start afresh with --no-resume or another --checkpoint-dir",
                                    path.display()
                                ),
                            }),
                        }
                    });
                    match read {
                        Ok((ckpt, None)) => {
                            let optimizer = crate::trainer::state_layout(&ckpt.optimizer);
                            offer =
                                Offer::Unsharded { path: path.clone(), meta: Box::new(ckpt.meta.clone()), optimizer };
                            held = Some(ckpt);
                            break;
                        }
                        Ok((ckpt, Some(shards))) => {
                            offer = Offer::Sharded { meta: Box::new(ckpt.meta.clone()), shards };
                            held = Some(ckpt);
                            break;
                        }
                        Err(TrainError::Checkpoint { detail: reason, .. }) => {
                            tracing::warn!(path = %path.display(), %reason, "skipping invalid checkpoint");
                            skipped.push(Skipped { path, reason });
                        }
                        Err(e) => {
                            offer = Offer::Failed(e.to_string());
                            break;
                        }
                    }
                }
            }
            let mut bytes = if rank == 0 { serde_json::to_vec(&offer).expect("offer serialises") } else { Vec::new() };
            ddp.broadcast_bytes(&mut bytes, "resume decision broadcast")?;
            offer = serde_json::from_slice(&bytes).map_err(|e| TrainError::Checkpoint {
                path: self.dir().to_path_buf(),
                detail: format!("resume decision from rank 0 does not parse: {e}"),
            })?;
            match offer {
                Offer::Nothing => return Ok(None),
                Offer::Failed(detail) => return Err(TrainError::Checkpoint { path: self.dir().to_path_buf(), detail }),
                Offer::Unsharded { path, meta, optimizer: entries } => {
                    let device = model::device_of(ddp.model());
                    let state = match held {
                        Some(ckpt) => ckpt.optimizer,
                        None => crate::trainer::zeros_of_layout(&entries, device)?,
                    };
                    let weights = model::state_tensors(ddp.model());
                    ddp.broadcast_tensors(&weights, "checkpoint weights broadcast from rank 0")?;
                    ddp.broadcast_tensors(&state, "optimizer state broadcast from rank 0")?;
                    ddp.load_optimizer_state(optimizer, &state)?;
                    return Ok(Some(ShardedResume { path, meta: *meta, skipped, read: Vec::new() }));
                }
                Offer::Sharded { meta, shards } => {
                    let mut read = Vec::new();
                    let prepared = ddp.prepare_sharded_state(optimizer, &shards.layout, &mut |q| {
                        read.push(shards.shards[q].0.clone());
                        self.read_shard(&shards, q)
                    });
                    // [invalid, unreadable]: a missing or corrupt shard passes to an older checkpoint; a store
                    // that cannot be reached fails every rank.
                    let mut flags = match &prepared {
                        Ok(_) => [0.0, 0.0],
                        Err(TrainError::Checkpoint { detail, .. }) => {
                            tracing::warn!(rank, path = %shards.path.display(), reason = %detail, "optimizer shard invalid");
                            [1.0, 0.0]
                        }
                        Err(_) => [0.0, 1.0],
                    };
                    ddp.allreduce_f64(&mut flags, ReduceOp::Sum)?;
                    if flags[1] > 0.0 {
                        return Err(prepared
                            .err()
                            .filter(|e| !matches!(e, TrainError::Checkpoint { .. }))
                            .unwrap_or_else(|| TrainError::Checkpoint {
                                path: shards.path.clone(),
                                detail: "another rank could not read its optimizer shard (see its log)".into(),
                            }));
                    }
                    if flags[0] > 0.0 {
                        if rank == 0 {
                            model::load_state_tensors(ddp.model(), &before)?;
                            let reason = match prepared.err() {
                                Some(TrainError::Checkpoint { detail, .. }) => detail,
                                _ => format!(
                                    "{} rank(s) found their optimizer shard missing or corrupt (see their log)",
                                    flags[0]
                                ),
                            };
                            tracing::warn!(path = %shards.path.display(), %reason, "skipping invalid checkpoint");
                            skipped.push(Skipped { path: shards.path.clone(), reason });
                        }
                        continue;
                    }
                    let (state, per_parameter) = prepared.expect("checked");
                    let weights = model::state_tensors(ddp.model());
                    ddp.broadcast_tensors(&weights, "checkpoint weights broadcast from rank 0")?;
                    if per_parameter {
                        ddp.load_optimizer_state(optimizer, &state)?;
                    } else {
                        optimizer.load_state(&state)?;
                    }
                    tracing::info!(rank, path = %shards.path.display(), files = ?read, "optimizer shards read");
                    return Ok(Some(ShardedResume { path: shards.path, meta: *meta, skipped, read }));
                }
            }
        }
    }
}

/// Every shard of `shards` read and assembled per parameter.
pub(super) fn read_all(
    shards: &ShardedCheckpoint,
    mut read: impl FnMut(usize) -> Result<Vec<(String, Tensor)>>,
) -> Result<Vec<(String, Tensor)>> {
    let all = (0..shards.layout.world_size).map(&mut read).collect::<Result<Vec<_>>>()?;
    assemble(&shards.layout, &all).map_err(|detail| TrainError::Checkpoint { path: shards.path.clone(), detail })
}
