//! Checkpoints: `ckpt-<step>/` directories holding `model.safetensors`, `optimizer.safetensors` and `meta.json`
//! (with the SHA-256 of both tensor files), written atomically and found again after a crash.
//!
//! Writing: everything goes into `.tmp-ckpt-<step>-<pid>/`, each file is fsynced, the directory is renamed to
//! `ckpt-<step>` (or swapped with an existing one atomically) and the parent is fsynced; only then are checkpoints
//! beyond the newest `keep` deleted. Reading
//! scans newest first and takes the first checkpoint whose files are all present, match their checksums and parse,
//! so a torn or corrupted newest one costs only the steps since the one before.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tch::{Device, Tensor};

use crate::precision::GradScalerState;
use crate::schedule::Schedule;
use crate::{Result, TrainError};

/// The `format` field of `meta.json`; a checkpoint of another format is skipped.
pub const FORMAT: &str = "hytrain-checkpoint/1";
const MODEL_FILE: &str = "model.safetensors";
/// Largest `meta.json` read: it holds the step, the data position and RNG states, a few KiB. The safetensors
/// files need no cap of ours: their checksums are verified first, and the safetensors reader refuses headers
/// over 100 MB itself.
const MAX_META_BYTES: u64 = 16 << 20;
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const META_FILE: &str = "meta.json";
/// A checkpoint renamed aside while a new one of the same step replaces it: `.old-ckpt-<step>-<pid>`.
const DISPLACED_PREFIX: &str = ".old-ckpt-";

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

#[derive(serde::Serialize, serde::Deserialize)]
struct MetaFile {
    format: String,
    hytrain_version: String,
    #[serde(flatten)]
    meta: CheckpointMeta,
    /// SHA-256 (hex) of each tensor file.
    files: BTreeMap<String, String>,
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
    /// Its directory.
    pub path: PathBuf,
    /// What was wrong with it.
    pub reason: String,
}

/// The newest valid checkpoint of a directory.
#[derive(Debug)]
pub struct Resume {
    /// Its contents.
    pub checkpoint: Checkpoint,
    /// Its directory.
    pub path: PathBuf,
    /// Newer checkpoints that were torn or corrupt, newest first.
    pub skipped: Vec<Skipped>,
}

/// Writes checkpoints into one directory and keeps the newest `keep` of them.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    dir: PathBuf,
    keep: usize,
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TrainError + 'a {
    move |e| TrainError::io(action, path, e)
}

/// Streamed, so verifying a checkpoint never holds a second copy of its (possibly multi-GiB) tensors.
fn sha256_file(path: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut file = File::open(path).map_err(io("read", path))?;
    std::io::copy(&mut file, &mut hasher).map_err(io("read", path))?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn fsync(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).map_err(io("fsync", path))
}

/// Swaps two directory entries atomically (`renameat2` with `RENAME_EXCHANGE`).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both are valid NUL-terminated paths for the duration of the call.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// No atomic swap off Linux: the caller falls back to renaming the old checkpoint aside.
#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from_raw_os_error(libc::ENOSYS))
}

fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let host = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?)))
        .collect::<Result<Vec<_>, tch::TchError>>()
        .map_err(|e| TrainError::torch(format!("preparing tensors for {}", path.display()), e))?;
    Tensor::write_safetensors(&host, path).map_err(|e| TrainError::torch(format!("writing {}", path.display()), e))?;
    fsync(path)
}

/// The step of a `ckpt-<step>` directory name.
fn step_of(name: &str) -> Option<u64> {
    name.strip_prefix("ckpt-")?.parse().ok()
}

/// The complete checkpoints (`ckpt-<step>` directories) in `dir`, oldest first. A missing `dir` has none.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TrainError::io("list", dir, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io("list", dir))?;
        if let Some(step) = entry.file_name().to_str().and_then(step_of) {
            if entry.path().is_dir() {
                found.push((step, entry.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}

impl CheckpointStore {
    /// A store in `dir` (created on first save) keeping the newest `keep` checkpoints (`--keep`, at least 1).
    pub fn new(dir: impl Into<PathBuf>, keep: usize) -> Result<Self> {
        if keep == 0 {
            return Err(TrainError::option("--keep", "must keep at least 1 checkpoint"));
        }
        Ok(CheckpointStore { dir: dir.into(), keep })
    }

    /// The directory checkpoints go to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `ckpt` as `ckpt-<step>` atomically, then deletes all but the newest `keep` checkpoints. Only one
    /// process (global rank 0) may call this for a directory. Returns the new checkpoint's path.
    ///
    /// When the directory runs out of room (or a file-size or quota limit is hit) the partial write is removed,
    /// earlier checkpoints are left as they were, and the error is [`TrainError::DiskFull`], saying how much room
    /// the checkpoint needs and how much is free.
    pub fn save(&self, ckpt: &Checkpoint) -> Result<PathBuf> {
        let step = ckpt.meta.step;
        fs::create_dir_all(&self.dir).map_err(io("create", &self.dir))?;
        let tmp = self.dir.join(format!(".tmp-ckpt-{step}-{}", std::process::id()));
        match self.write_aside(ckpt, &tmp) {
            Ok(()) => {}
            Err(e) => {
                // Frees what the partial write took, so the directory is as it was before this save.
                let _ = fs::remove_dir_all(&tmp);
                return Err(match out_of_space(&e) {
                    Some(reason) => self.disk_full(ckpt, reason),
                    None => e,
                });
            }
        }
        self.publish(step, &tmp)
    }

    fn disk_full(&self, ckpt: &Checkpoint, reason: &str) -> TrainError {
        let needed: u64 = ckpt
            .model
            .iter()
            .chain(&ckpt.optimizer)
            .map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
            .sum();
        let previous = match list_checkpoints(&self.dir).ok().and_then(|c| c.last().cloned()) {
            Some((_, path)) => {
                format!("the previous checkpoint {} is intact and a restart resumes from it", path.display())
            }
            None => "there is no earlier checkpoint to resume from".to_string(),
        };
        TrainError::DiskFull {
            dir: self.dir.clone(),
            step: ckpt.meta.step,
            reason: reason.to_string(),
            needed: human_bytes(needed),
            free: free_bytes(&self.dir).map(|f| format!(", {} are free", human_bytes(f))).unwrap_or_default(),
            previous,
        }
    }

    /// Writes the checkpoint's files into `tmp` and syncs them.
    fn write_aside(&self, ckpt: &Checkpoint, tmp: &Path) -> Result<()> {
        if tmp.exists() {
            fs::remove_dir_all(tmp).map_err(io("remove", tmp))?;
        }
        fs::create_dir(tmp).map_err(io("create", tmp))?;
        let mut files = BTreeMap::new();
        for (file, tensors) in [(MODEL_FILE, &ckpt.model), (OPTIMIZER_FILE, &ckpt.optimizer)] {
            let path = tmp.join(file);
            write_tensors(&path, tensors)?;
            files.insert(file.to_string(), sha256_file(&path)?);
        }
        let meta = MetaFile {
            format: FORMAT.into(),
            hytrain_version: env!("CARGO_PKG_VERSION").into(),
            meta: ckpt.meta.clone(),
            files,
        };
        let meta_path = tmp.join(META_FILE);
        let json = serde_json::to_vec_pretty(&meta).expect("checkpoint metadata serialises");
        let mut f = File::create(&meta_path).map_err(io("create", &meta_path))?;
        f.write_all(&json).and_then(|_| f.sync_all()).map_err(io("write", &meta_path))?;
        fsync(tmp)
    }

    /// Renames a complete `tmp` into place as `ckpt-<step>` and prunes old checkpoints.
    ///
    /// A resumed or `--no-resume` run can reach a step saved before; the new checkpoint then replaces the old by
    /// swapping the two directories in one `renameat2(RENAME_EXCHANGE)`, so `ckpt-<step>` is a complete checkpoint
    /// at every moment. Where the file system cannot swap (NFS, such as EFS, refuses it), the old one is renamed
    /// aside to `.old-ckpt-<step>-<pid>` and the new one in; a kill between the two leaves the old one there, and
    /// [`latest_valid`] takes it when no `ckpt-<step>` is valid.
    fn publish(&self, step: u64, tmp: &Path) -> Result<PathBuf> {
        let dest = self.dir.join(format!("ckpt-{step}"));
        if dest.exists() {
            match exchange(tmp, &dest) {
                // `tmp` now holds the old checkpoint.
                Ok(()) => {
                    fsync(&self.dir)?;
                    fs::remove_dir_all(tmp).map_err(io("remove", tmp))?;
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)) => {
                    self.replace_by_renames(step, tmp, &dest)?
                }
                Err(e) => return Err(TrainError::io("replace", &dest, e)),
            }
        } else {
            fs::rename(tmp, &dest).map_err(io("rename", tmp))?;
            fsync(&self.dir)?;
        }
        tracing::info!(path = %dest.display(), step, "checkpoint written");
        self.prune()?;
        Ok(dest)
    }

    /// Replaces `dest` by `tmp` where the file system cannot swap them: the old checkpoint is renamed aside, where
    /// [`latest_valid`] finds it should a kill come before the new one is renamed in.
    fn replace_by_renames(&self, step: u64, tmp: &Path, dest: &Path) -> Result<()> {
        let old = self.dir.join(format!("{DISPLACED_PREFIX}{step}-{}", std::process::id()));
        fs::rename(dest, &old).map_err(io("rename", dest))?;
        fs::rename(tmp, dest).map_err(io("rename", tmp))?;
        fsync(&self.dir)?;
        fs::remove_dir_all(&old).map_err(io("remove", &old))
    }

    /// Deletes checkpoints beyond the newest `keep` and leftovers of interrupted writes.
    fn prune(&self) -> Result<()> {
        let all = list_checkpoints(&self.dir)?;
        for (_, path) in all.iter().take(all.len().saturating_sub(self.keep)) {
            fs::remove_dir_all(path).map_err(io("remove", path))?;
            tracing::debug!(path = %path.display(), "old checkpoint removed");
        }
        for entry in fs::read_dir(&self.dir).map_err(io("list", &self.dir))?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".tmp-ckpt-") || name.starts_with(DISPLACED_PREFIX) {
                let path = entry.path();
                fs::remove_dir_all(&path).map_err(io("remove", &path))?;
                tracing::debug!(path = %path.display(), "leftover of an interrupted checkpoint write removed");
            }
        }
        Ok(())
    }

    /// The newest valid checkpoint in this store's directory; see [`latest_valid`].
    pub fn latest_valid(&self) -> Result<Option<Resume>> {
        latest_valid(&self.dir)
    }
}

/// The operating system's words when `e` means the disk (or a size or quota limit) is full.
fn out_of_space(e: &TrainError) -> Option<&'static str> {
    const FULL: [(i32, &str); 3] = [
        (libc::ENOSPC, "No space left on device"),
        (libc::EFBIG, "File too large"),
        (libc::EDQUOT, "Disk quota exceeded"),
    ];
    if let TrainError::Io { source, .. } = e {
        if let Some(code) = source.raw_os_error() {
            return FULL.iter().find(|(c, _)| *c == code).map(|(_, w)| *w);
        }
    }
    // libtorch's safetensors writer reports the OS error only as text, e.g. "... (os error 28)".
    let text = match e {
        TrainError::Torch { source, .. } => source.to_string(),
        other => other.to_string(),
    };
    FULL.iter().find(|(c, w)| text.contains(&format!("(os error {c})")) || text.contains(w)).map(|(_, w)| *w)
}

/// Free bytes for an unprivileged writer on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid C string and `s` a writable statvfs for the call to fill.
    if unsafe { libc::statvfs(path.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.0} KiB", n as f64 / 1024.0),
        n => format!("{n} bytes"),
    }
}

/// Reads and verifies one checkpoint directory: known format, files present with matching SHA-256, tensors parse,
/// and the step in `meta.json` matches the directory name.
pub fn read_checkpoint(path: &Path) -> Result<Checkpoint> {
    let bad = |detail: String| TrainError::Checkpoint { path: path.to_path_buf(), detail };
    let meta_path = path.join(META_FILE);
    let size = fs::metadata(&meta_path).map_err(|e| bad(format!("cannot read {META_FILE}: {e}")))?.len();
    if size > MAX_META_BYTES {
        return Err(bad(format!(
            "{META_FILE} is {size} bytes, over the limit of {} MiB (this crate writes a few KiB)",
            MAX_META_BYTES >> 20
        )));
    }
    let text = fs::read(&meta_path).map_err(|e| bad(format!("cannot read {META_FILE}: {e}")))?;
    let meta: MetaFile = serde_json::from_slice(&text).map_err(|e| bad(format!("{META_FILE} does not parse: {e}")))?;
    if meta.format != FORMAT {
        return Err(bad(format!("format '{}' is not {FORMAT}", meta.format)));
    }
    let dir_step = path.file_name().and_then(|n| n.to_str()).and_then(step_of);
    if dir_step.is_some_and(|s| s != meta.meta.step) {
        return Err(bad(format!("{META_FILE} says step {} but the directory is named for another", meta.meta.step)));
    }
    let mut tensors = Vec::new();
    for file in [MODEL_FILE, OPTIMIZER_FILE] {
        let want = meta.files.get(file).ok_or_else(|| bad(format!("{META_FILE} lists no checksum for {file}")))?;
        let file_path = path.join(file);
        if !file_path.is_file() {
            return Err(bad(format!("{file} is missing")));
        }
        let got = sha256_file(&file_path)?;
        if &got != want {
            return Err(bad(format!("{file} has SHA-256 {got}, {META_FILE} recorded {want} (corrupt or torn)")));
        }
        tensors.push(Tensor::read_safetensors(&file_path).map_err(|e| bad(format!("{file} does not parse: {e}")))?);
    }
    let optimizer = tensors.pop().expect("two files");
    let model = tensors.pop().expect("two files");
    Ok(Checkpoint { model, optimizer, meta: meta.meta })
}

/// The newest checkpoint in `dir` that verifies ([`read_checkpoint`]); newer ones that do not are skipped with a
/// warning naming them and why. A checkpoint renamed aside by a replace that was interrupted
/// (`.old-ckpt-<step>-<pid>`, see [`CheckpointStore::save`]) stands in for a `ckpt-<step>` that is missing or
/// invalid. `None` when the directory has no valid checkpoint (or does not exist).
pub fn latest_valid(dir: &Path) -> Result<Option<Resume>> {
    let mut candidates = list_checkpoints(dir)?;
    candidates.extend(list_displaced(dir)?);
    // Newest step first; for one step `ckpt-<step>` before a displaced copy ("." sorts before "c").
    candidates.sort_by(|(a, pa), (b, pb)| b.cmp(a).then(pb.cmp(pa)));
    let mut skipped = Vec::new();
    for (_, path) in candidates {
        match read_checkpoint(&path) {
            Ok(checkpoint) => return Ok(Some(Resume { checkpoint, path, skipped })),
            Err(e) => {
                let reason = match e {
                    TrainError::Checkpoint { detail, .. } => detail,
                    other => other.to_string(),
                };
                tracing::warn!(path = %path.display(), %reason, "skipping invalid checkpoint");
                skipped.push(Skipped { path, reason });
            }
        }
    }
    Ok(None)
}

/// Checkpoints renamed aside by an interrupted replace (`.old-ckpt-<step>-<pid>` directories) in `dir`.
fn list_displaced(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TrainError::io("list", dir, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io("list", dir))?;
        let name = entry.file_name();
        let step = name
            .to_str()
            .and_then(|n| n.strip_prefix(DISPLACED_PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(step, _pid)| step.parse().ok());
        if let (Some(step), true) = (step, entry.path().is_dir()) {
            found.push((step, entry.path()));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(step: u64, value: f32) -> Checkpoint {
        Checkpoint {
            model: vec![("w".into(), Tensor::from_slice(&[value]))],
            optimizer: vec![],
            meta: CheckpointMeta {
                step,
                epoch: 0,
                data_position: serde_json::Value::Null,
                rng: RngState::default(),
                config: serde_json::Value::Null,
                schedule: Schedule::Constant,
                model: "m".into(),
                optimizer: "sgd".into(),
                grad_scaler: None,
            },
        }
    }

    /// The fallback for file systems without `RENAME_EXCHANGE` (NFS), which this machine's may not reproduce.
    #[test]
    fn replacing_by_renames_leaves_the_new_checkpoint_and_nothing_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path(), 1).unwrap();
        store.save(&checkpoint(3, 1.0)).unwrap();
        let tmp = dir.path().join(".tmp-ckpt-3-1");
        store.write_aside(&checkpoint(3, 2.0), &tmp).unwrap();
        let dest = dir.path().join("ckpt-3");
        store.replace_by_renames(3, &tmp, &dest).unwrap();
        let names: Vec<String> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["ckpt-3"]);
        let w = read_checkpoint(&dest).unwrap().model.remove(0).1;
        assert_eq!(w.double_value(&[0]), 2.0);
    }
}
