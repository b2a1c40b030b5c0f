//! Checkpoints: `ckpt-<step>` holding `model.safetensors`, `optimizer.safetensors` and `meta.json`, the manifest
//! (step, data position, job shape, RNG, configuration, and the size and SHA-256 of both tensor files). A
//! checkpoint counts only once it is complete and its files match its manifest; a torn or corrupt newest one costs
//! only the steps since the one before.
//!
//! Two places hold them, with the same files:
//! - a folder ([`dir`]): written aside, fsynced and renamed into place;
//! - an S3 prefix, `s3://bucket/prefix` ([`s3`]): the tensor files are uploaded first, the manifest last; a
//!   checkpoint without its manifest does not exist for a reader.
//!
//! [`CheckpointStore::save`] writes one synchronously; [`AsyncCheckpointer`] takes a host copy at the step
//! boundary and writes it in the background while training goes on.
//!
//! A sharded engine (`--shard`) writes sharded checkpoints ([`sharded`]): `optimizer-shard-<r>-of-<w>.safetensors`
//! from every rank instead of `optimizer.safetensors`, and a manifest that also records the bucket layout, so
//! they resume at any world size and consolidate into one file ([`consolidate`]).

mod dir;
mod s3;
pub mod sharded;
mod sharded_writer;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use hytrain_data::source::S3Options;
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::precision::GradScalerState;
use crate::schedule::Schedule;
use crate::{Result, TrainError};

pub use dir::{latest_valid, list_checkpoints, read_checkpoint};
pub use sharded::{shard_file, ShardBucket, ShardLayout, ShardParam, ShardedCheckpoint, ShardedResume};
pub use sharded_writer::ShardedWriter;
pub use writer::AsyncCheckpointer;

/// The `format` field of `meta.json`; a checkpoint of another format is skipped.
pub const FORMAT: &str = "hytrain-checkpoint/1";
const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const META_FILE: &str = "meta.json";
/// Largest `meta.json` read: it holds the step, the data position and RNG states, a few KiB. The safetensors
/// files need no cap of ours: their checksums are verified first, and the safetensors reader refuses headers
/// over 100 MB itself.
const MAX_META_BYTES: u64 = 16 << 20;

/// Seed and generator state needed to continue a run's randomness.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    /// The run's `--seed`.
    pub seed: u64,
    /// Any further generator state the caller keeps (opaque here).
    #[serde(default)]
    pub state: serde_json::Value,
}

/// Everything about a checkpoint except its tensors.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointMeta {
    /// Optimizer steps completed.
    pub step: u64,
    /// The epoch in progress (or just finished) at `step`.
    pub epoch: u64,
    /// Where the data loader stands, as the loader reports it (opaque here).
    pub data_position: serde_json::Value,
    /// Seed and generator state.
    pub rng: RngState,
    /// The run's configuration (opaque here).
    pub config: serde_json::Value,
    /// The learning-rate schedule.
    pub schedule: Schedule,
    /// Model name.
    pub model: String,
    /// Optimizer name.
    pub optimizer: String,
    /// The fp16 loss scaler's state; absent for other precisions and in checkpoints written before hytrain had
    /// one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_scaler: Option<GradScalerState>,
}

/// `meta.json`: the manifest that makes a checkpoint count.
#[derive(serde::Serialize, serde::Deserialize)]
struct MetaFile {
    format: String,
    hytrain_version: String,
    #[serde(flatten)]
    meta: CheckpointMeta,
    /// SHA-256 (hex) of each tensor file.
    files: BTreeMap<String, String>,
    /// Size in bytes of each tensor file; absent in checkpoints written before hytrain recorded them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    sizes: BTreeMap<String, u64>,
    /// On S3, the folder below `ckpt-<step>/` holding the tensor files: each write uploads into a new one, so a
    /// checkpoint being replaced stays whole until the new manifest replaces the old. Absent in folders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    files_in: Option<String>,
    /// A sharded checkpoint's optimizer layout: its state is in one `optimizer-shard-<r>-of-<w>.safetensors` per
    /// rank (listed in `files`) instead of `optimizer.safetensors`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sharded: Option<ShardLayout>,
}

/// A checkpoint's contents.
#[derive(Debug)]
pub struct Checkpoint {
    /// Model parameters and buffers by name.
    pub model: Vec<(String, Tensor)>,
    /// Optimizer state by name ([`crate::optim::Optimizer::state`]).
    pub optimizer: Vec<(String, Tensor)>,
    /// Step, epoch, data position, RNG, configuration, schedule.
    pub meta: CheckpointMeta,
}

/// A checkpoint passed over while looking for the newest valid one, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Its directory (or `s3://` URL).
    pub path: PathBuf,
    /// What was wrong with it.
    pub reason: String,
}

/// The newest valid checkpoint of a directory or S3 prefix.
#[derive(Debug)]
pub struct Resume {
    /// Its contents.
    pub checkpoint: Checkpoint,
    /// Its directory (or `s3://` URL).
    pub path: PathBuf,
    /// Newer checkpoints that were torn or corrupt, newest first.
    pub skipped: Vec<Skipped>,
}

/// A checkpoint as the bytes of its files: what a store writes.
struct Encoded {
    step: u64,
    /// The tensor files, model first.
    tensors: [(&'static str, Bytes); 2],
    meta: MetaFile,
}

impl Encoded {
    fn size(&self) -> u64 {
        self.tensors.iter().map(|(_, b)| b.len() as u64).sum()
    }

    /// `meta.json`'s bytes.
    fn manifest(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(&self.meta).expect("checkpoint metadata serialises")
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A host tensor as safetensors sees it: its bytes borrowed, not copied.
struct HostView<'a> {
    tensor: &'a Tensor,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
}

impl<'a> HostView<'a> {
    fn new(name: &str, tensor: &'a Tensor) -> Result<Self> {
        let bad = |detail: String| TrainError::Checkpoint { path: PathBuf::new(), detail };
        if tensor.device() != Device::Cpu || !tensor.is_contiguous() {
            return Err(bad(format!("tensor {name} is not a contiguous host tensor; this is a bug in hytrain")));
        }
        let dtype = safetensors::Dtype::try_from(tensor.kind())
            .map_err(|e| bad(format!("tensor {name} cannot be saved: {e}")))?;
        let shape = tensor.size().iter().map(|&d| d as usize).collect();
        Ok(HostView { tensor, dtype, shape })
    }
}

impl safetensors::View for HostView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let len = self.data_len();
        if len == 0 {
            return std::borrow::Cow::Borrowed(&[]);
        }
        // SAFETY: the tensor is a contiguous host tensor (checked in `new`) of `len` bytes starting at its data
        // pointer, and it is borrowed for as long as the slice.
        std::borrow::Cow::Borrowed(unsafe { std::slice::from_raw_parts(self.tensor.data_ptr() as *const u8, len) })
    }

    fn data_len(&self) -> usize {
        self.tensor.numel() * self.tensor.kind().elt_size_in_bytes()
    }
}

/// `tensors` as a safetensors file.
fn to_safetensors(file: &str, tensors: &[(String, Tensor)]) -> Result<Bytes> {
    let host = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?)))
        .collect::<std::result::Result<Vec<_>, tch::TchError>>()
        .map_err(|e| TrainError::torch(format!("preparing tensors for {file}"), e))?;
    let views = host.iter().map(|(n, t)| Ok((n.as_str(), HostView::new(n, t)?))).collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, &None).map_err(|e| TrainError::Checkpoint {
        path: PathBuf::from(file),
        detail: format!("cannot encode {file}: {e}"),
    })?;
    Ok(Bytes::from(bytes))
}

/// Encodes `ckpt`'s tensors (host tensors, or device ones copied here) and its manifest.
fn encode(ckpt: &Checkpoint) -> Result<Encoded> {
    let tensors = [
        (MODEL_FILE, to_safetensors(MODEL_FILE, &ckpt.model)?),
        (OPTIMIZER_FILE, to_safetensors(OPTIMIZER_FILE, &ckpt.optimizer)?),
    ];
    let files = tensors.iter().map(|(f, b)| (f.to_string(), sha256_hex(b))).collect();
    let sizes = tensors.iter().map(|(f, b)| (f.to_string(), b.len() as u64)).collect();
    let meta = MetaFile {
        format: FORMAT.into(),
        hytrain_version: env!("CARGO_PKG_VERSION").into(),
        meta: ckpt.meta.clone(),
        files,
        sizes,
        files_in: None,
        sharded: None,
    };
    Ok(Encoded { step: ckpt.meta.step, tensors, meta })
}

/// Parses and checks `meta.json` of the checkpoint of `step` (when the name says one).
fn parse_manifest(bytes: &[u8], step: Option<u64>) -> std::result::Result<MetaFile, String> {
    if bytes.len() as u64 > MAX_META_BYTES {
        return Err(format!(
            "{META_FILE} is {} bytes, over the limit of {} MiB (this crate writes a few KiB)",
            bytes.len(),
            MAX_META_BYTES >> 20
        ));
    }
    let meta: MetaFile = serde_json::from_slice(bytes).map_err(|e| format!("{META_FILE} does not parse: {e}"))?;
    if meta.format != FORMAT {
        return Err(format!("format '{}' is not {FORMAT}", meta.format));
    }
    if step.is_some_and(|s| s != meta.meta.step) {
        return Err(format!("{META_FILE} says step {} but the checkpoint is named for another", meta.meta.step));
    }
    Ok(meta)
}

/// Checks a tensor file against the manifest and parses it.
fn decode_tensors(meta: &MetaFile, file: &str, bytes: &[u8]) -> std::result::Result<Vec<(String, Tensor)>, String> {
    let want = meta.files.get(file).ok_or_else(|| format!("{META_FILE} lists no checksum for {file}"))?;
    verify_and_parse(file, bytes, want, meta.sizes.get(file).copied())
}

/// Checks a tensor file's size (when recorded) and SHA-256 and parses it.
fn verify_and_parse(
    file: &str,
    bytes: &[u8],
    want: &str,
    size: Option<u64>,
) -> std::result::Result<Vec<(String, Tensor)>, String> {
    if let Some(size) = size {
        if size != bytes.len() as u64 {
            return Err(format!("{file} is {} bytes, {META_FILE} recorded {size} (torn or replaced)", bytes.len()));
        }
    }
    let got = sha256_hex(bytes);
    if got != want {
        return Err(format!("{file} has SHA-256 {got}, {META_FILE} recorded {want} (corrupt or torn)"));
    }
    let parsed = safetensors::SafeTensors::deserialize(bytes).map_err(|e| format!("{file} does not parse: {e}"))?;
    parsed
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let kind = Kind::try_from(view.dtype()).map_err(|e| format!("{file}: tensor {name}: {e}"))?;
            let size: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            Tensor::f_from_data_size(view.data(), &size, kind)
                .map(|t| (name.clone(), t))
                .map_err(|e| format!("{file}: tensor {name} does not load: {e}"))
        })
        .collect()
}

/// A name for one write's folder, unique per process and moment.
fn write_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{nanos:x}-{}", std::process::id())
}

/// The first of `candidates` (newest first) that reads and verifies; those before it that are torn, corrupt or
/// of another format are skipped with a warning naming them and why. Any other failure (the disk or S3 cannot be
/// read) is returned: an older checkpoint is not taken because the newer one could not be reached.
fn newest_valid(
    candidates: impl IntoIterator<Item = PathBuf>,
    read: impl Fn(&Path) -> Result<Checkpoint>,
) -> Result<Option<Resume>> {
    let mut skipped = Vec::new();
    for path in candidates {
        match read(&path) {
            Ok(checkpoint) => return Ok(Some(Resume { checkpoint, path, skipped })),
            Err(TrainError::Checkpoint { detail: reason, .. }) => {
                tracing::warn!(path = %path.display(), %reason, "skipping invalid checkpoint");
                skipped.push(Skipped { path, reason });
            }
            Err(other) => return Err(other),
        }
    }
    Ok(None)
}

/// Where a store keeps its checkpoints.
#[derive(Debug)]
enum Backend {
    Dir(PathBuf),
    S3(s3::S3Store),
}

/// Writes checkpoints into one directory or S3 prefix and keeps the newest `keep` of them. Only one process
/// (global rank 0) may write to a location.
#[derive(Debug)]
pub struct CheckpointStore {
    backend: Backend,
    keep: usize,
}

impl CheckpointStore {
    /// A store in the folder `dir` (created on first save) keeping the newest `keep` checkpoints (`--keep`, at
    /// least 1).
    pub fn new(dir: impl Into<PathBuf>, keep: usize) -> Result<Self> {
        check_keep(keep)?;
        Ok(CheckpointStore { backend: Backend::Dir(dir.into()), keep })
    }

    /// A store below `url` (`s3://bucket/prefix`), reached with `options` (`--s3-endpoint`, `--s3-region`, the
    /// default credential chain), keeping the newest `keep` checkpoints. Sends no request yet.
    pub fn s3(url: &str, options: &S3Options, keep: usize) -> Result<Self> {
        check_keep(keep)?;
        Ok(CheckpointStore { backend: Backend::S3(s3::S3Store::new(url, options)?), keep })
    }

    /// A store for `location`: an `s3://` URL or a folder.
    pub fn at(location: &Path, options: &S3Options, keep: usize) -> Result<Self> {
        match location.to_str().filter(|l| l.starts_with("s3://")) {
            Some(url) => Self::s3(url, options, keep),
            None => Self::new(location, keep),
        }
    }

    /// The folder (or `s3://` URL) checkpoints go to.
    pub fn dir(&self) -> &Path {
        match &self.backend {
            Backend::Dir(dir) => dir,
            Backend::S3(s3) => s3.location(),
        }
    }

    /// Writes `ckpt` as `ckpt-<step>`, then deletes all but the newest `keep` checkpoints; returns the new
    /// checkpoint's path (or URL). A failed write leaves earlier checkpoints as they were.
    ///
    /// In a folder, a write that runs out of room removes its partial files and the error is
    /// [`TrainError::DiskFull`], saying how much room the checkpoint needs and how much is free.
    pub fn save(&self, ckpt: &Checkpoint) -> Result<PathBuf> {
        self.write(encode(ckpt)?)
    }

    fn write(&self, encoded: Encoded) -> Result<PathBuf> {
        match &self.backend {
            Backend::Dir(dir) => dir::save(dir, encoded, self.keep),
            Backend::S3(s3) => s3.save(encoded, self.keep),
        }
    }

    /// Writes rank `file`'s optimizer shard of the sharded checkpoint of `step` being written as `write`.
    fn put_shard(&self, step: u64, write: &str, file: &str, bytes: Bytes) -> Result<()> {
        match &self.backend {
            Backend::Dir(dir) => dir::put_shard(dir, step, write, file, &bytes),
            Backend::S3(s3) => s3.put_shard(step, write, file, bytes),
        }
    }

    /// Completes the sharded checkpoint of `step` whose shards are all written: the model, then the manifest.
    fn commit_sharded(&self, step: u64, write: &str, model: Bytes, meta: MetaFile) -> Result<PathBuf> {
        match &self.backend {
            Backend::Dir(dir) => dir::commit_sharded(dir, step, write, &model, meta, self.keep),
            Backend::S3(s3) => s3.commit_sharded(step, write, model, meta, self.keep),
        }
    }

    /// Drops what a failed sharded write left (in a folder; on S3 the next write's pruning deletes it).
    fn abandon(&self, step: u64, write: &str) {
        if let Backend::Dir(dir) = &self.backend {
            dir::abandon(dir, step, write);
        }
    }

    /// The checkpoints with a manifest, newest first, not yet verified.
    fn candidates(&self) -> Result<Vec<PathBuf>> {
        match &self.backend {
            Backend::Dir(dir) => dir::candidates(dir),
            Backend::S3(s3) => s3.candidates(),
        }
    }

    /// The checkpoint at `path` verified but for a sharded one's shards, which are left to each rank.
    fn read_model(&self, path: &Path) -> Result<(Checkpoint, Option<ShardedCheckpoint>)> {
        match &self.backend {
            Backend::Dir(_) => dir::read_model(path),
            Backend::S3(s3) => s3.read_model(path),
        }
    }

    /// Old rank `rank`'s shard of `shards`, verified.
    fn read_shard(&self, shards: &ShardedCheckpoint, rank: usize) -> Result<Vec<(String, Tensor)>> {
        match &self.backend {
            Backend::Dir(_) => dir::read_shard(shards, rank),
            Backend::S3(s3) => s3.read_shard(shards, rank),
        }
    }

    /// The checkpoint of `step`, verified (a sharded one's state assembled per parameter), or the newest valid one
    /// when `step` is `None`. A missing or invalid checkpoint of `step` is an error saying why.
    pub fn read_step(&self, step: Option<u64>) -> Result<Resume> {
        let Some(step) = step else {
            return self.latest_valid()?.ok_or_else(|| TrainError::Checkpoint {
                path: self.dir().to_path_buf(),
                detail: "holds no valid checkpoint (ckpt-<step> with a meta.json whose files verify)".into(),
            });
        };
        let path = PathBuf::from(format!("{}/ckpt-{step}", self.dir().display()));
        let checkpoint = match &self.backend {
            Backend::Dir(_) => dir::read_checkpoint(&path)?,
            Backend::S3(s3) => s3.read(&path)?,
        };
        Ok(Resume { checkpoint, path, skipped: Vec::new() })
    }

    /// The newest valid checkpoint of this store; see [`latest_valid`]. `None` when there is none.
    pub fn latest_valid(&self) -> Result<Option<Resume>> {
        match &self.backend {
            Backend::Dir(dir) => latest_valid(dir),
            Backend::S3(s3) => s3.latest_valid(),
        }
    }
}

fn check_keep(keep: usize) -> Result<()> {
    if keep == 0 {
        return Err(TrainError::option("--keep", "must keep at least 1 checkpoint"));
    }
    Ok(())
}

/// What [`consolidate`] wrote.
#[derive(Debug)]
pub struct Consolidated {
    /// The checkpoint read.
    pub from: PathBuf,
    /// Its step.
    pub step: u64,
    /// Model tensors written.
    pub model: usize,
    /// Optimizer state entries written (`optimizer.<param>.<state>`).
    pub optimizer: usize,
    /// Bytes of the file.
    pub bytes: u64,
}

/// The prefix of optimizer state entries in a consolidated file.
pub const CONSOLIDATED_OPTIMIZER_PREFIX: &str = "optimizer.";

/// Writes the checkpoint of `step` (the newest valid one when `None`) of `store`, sharded or not, as one
/// safetensors file `out`: the model's tensors under their names, and the per-parameter optimizer state
/// (`fc.weight.exp_avg`, as an unsharded run saves it) under `optimizer.`. Written aside and renamed into place.
pub fn consolidate(store: &CheckpointStore, step: Option<u64>, out: &Path) -> Result<Consolidated> {
    let found = store.read_step(step)?;
    let ckpt = found.checkpoint;
    let mut tensors = ckpt.model;
    let model = tensors.len();
    let optimizer = ckpt.optimizer.len();
    tensors.extend(ckpt.optimizer.into_iter().map(|(n, t)| (format!("{CONSOLIDATED_OPTIMIZER_PREFIX}{n}"), t)));
    let name = out.display().to_string();
    let bytes = to_safetensors(&name, &tensors)?;
    let tmp = out.with_file_name(format!(
        ".{}.tmp-{}",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("consolidated"),
        std::process::id()
    ));
    std::fs::write(&tmp, &bytes).and_then(|_| std::fs::rename(&tmp, out)).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        TrainError::io("write", out, e)
    })?;
    Ok(Consolidated { from: found.path, step: ckpt.meta.step, model, optimizer, bytes: bytes.len() as u64 })
}

/// `n` bytes for people: "137 KiB", "1.5 GiB".
fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.0} KiB", n as f64 / 1024.0),
        n => format!("{n} bytes"),
    }
}
