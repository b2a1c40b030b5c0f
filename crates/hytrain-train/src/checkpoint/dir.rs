//! Checkpoints in a folder: `ckpt-<step>/` directories, written atomically and found again after a crash.
//!
//! Writing: everything goes into `.tmp-ckpt-<step>-<pid>/`, each file is fsynced, the directory is renamed to
//! `ckpt-<step>` (or swapped with an existing one atomically) and the parent is fsynced; only then are checkpoints
//! beyond the newest `keep` deleted. Reading scans newest first and takes the first checkpoint whose files are all
//! present, match their manifest and parse.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use tch::Tensor;

use super::sharded::{read_all, ShardedCheckpoint};
use super::{
    decode_tensors, human_bytes, newest_valid, parse_manifest, Checkpoint, Encoded, MetaFile, Resume, META_FILE,
    MODEL_FILE, OPTIMIZER_FILE,
};
use crate::{Result, TrainError};

/// A checkpoint renamed aside while a new one of the same step replaces it: `.old-ckpt-<step>-<pid>`.
const DISPLACED_PREFIX: &str = ".old-ckpt-";

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TrainError + 'a {
    move |e| TrainError::io(action, path, e)
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

/// Writes `bytes` to a new file at `path` and syncs it.
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(io("create", path))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(io("write", path))
}

/// The step of a `ckpt-<step>` directory name.
pub(super) fn step_of(name: &str) -> Option<u64> {
    name.strip_prefix("ckpt-")?.parse().ok()
}

/// The complete checkpoints (`ckpt-<step>` directories) in `dir`, oldest first. A missing `dir` has none.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = subdirs_by_step(dir, step_of)?;
    found.sort();
    Ok(found)
}

/// The directories in `dir` whose name `step` reads a step from, with that step; none for a missing `dir`.
fn subdirs_by_step(dir: &Path, step: impl Fn(&str) -> Option<u64>) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TrainError::io("list", dir, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io("list", dir))?;
        if let (Some(step), true) = (entry.file_name().to_str().and_then(&step), entry.path().is_dir()) {
            found.push((step, entry.path()));
        }
    }
    Ok(found)
}

/// Writes `encoded` as `ckpt-<step>` in `dir` atomically, then deletes all but the newest `keep` checkpoints.
/// Returns the new checkpoint's path.
///
/// When the directory runs out of room (or a file-size or quota limit is hit) the partial write is removed,
/// earlier checkpoints are left as they were, and the error is [`TrainError::DiskFull`], saying how much room the
/// checkpoint needs and how much is free.
pub(super) fn save(dir: &Path, encoded: Encoded, keep: usize) -> Result<PathBuf> {
    let step = encoded.step;
    fs::create_dir_all(dir).map_err(io("create", dir))?;
    let tmp = dir.join(format!(".tmp-ckpt-{step}-{}", std::process::id()));
    if let Err(e) = write_aside(&encoded, &tmp) {
        // Frees what the partial write took, so the directory is as it was before this save.
        let _ = fs::remove_dir_all(&tmp);
        return Err(match out_of_space(&e) {
            Some(reason) => disk_full(dir, &encoded, reason),
            None => e,
        });
    }
    let dest = publish(dir, step, &tmp)?;
    prune(dir, keep)?;
    Ok(dest)
}

fn disk_full(dir: &Path, encoded: &Encoded, reason: &str) -> TrainError {
    let previous = match list_checkpoints(dir).ok().and_then(|c| c.last().cloned()) {
        Some((_, path)) => {
            format!("the previous checkpoint {} is intact and a restart resumes from it", path.display())
        }
        None => "there is no earlier checkpoint to resume from".to_string(),
    };
    TrainError::DiskFull {
        dir: dir.to_path_buf(),
        step: encoded.step,
        reason: reason.to_string(),
        room: format!(
            "about {}{}",
            human_bytes(encoded.size()),
            free_bytes(dir).map(|f| format!(", {} are free", human_bytes(f))).unwrap_or_default()
        ),
        previous,
    }
}

/// Writes the checkpoint's files into `tmp`, the manifest last, and syncs them.
fn write_aside(encoded: &Encoded, tmp: &Path) -> Result<()> {
    if tmp.exists() {
        fs::remove_dir_all(tmp).map_err(io("remove", tmp))?;
    }
    fs::create_dir(tmp).map_err(io("create", tmp))?;
    for (file, bytes) in &encoded.tensors {
        write_file(&tmp.join(file), bytes)?;
    }
    write_file(&tmp.join(META_FILE), &encoded.manifest())?;
    fsync(tmp)
}

/// Renames a complete `tmp` into place as `ckpt-<step>`.
///
/// A resumed or `--no-resume` run can reach a step saved before; the new checkpoint then replaces the old by
/// swapping the two directories in one `renameat2(RENAME_EXCHANGE)`, so `ckpt-<step>` is a complete checkpoint at
/// every moment. Where the file system cannot swap (NFS, such as EFS, refuses it), the old one is renamed aside to
/// `.old-ckpt-<step>-<pid>` and the new one in; a kill between the two leaves the old one there, and
/// [`latest_valid`] takes it when no `ckpt-<step>` is valid.
fn publish(dir: &Path, step: u64, tmp: &Path) -> Result<PathBuf> {
    let dest = dir.join(format!("ckpt-{step}"));
    if dest.exists() {
        match exchange(tmp, &dest) {
            // `tmp` now holds the old checkpoint.
            Ok(()) => {
                fsync(dir)?;
                fs::remove_dir_all(tmp).map_err(io("remove", tmp))?;
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)) => {
                replace_by_renames(dir, step, tmp, &dest)?
            }
            Err(e) => return Err(TrainError::io("replace", &dest, e)),
        }
    } else {
        fs::rename(tmp, &dest).map_err(io("rename", tmp))?;
        fsync(dir)?;
    }
    tracing::info!(path = %dest.display(), step, "checkpoint written");
    Ok(dest)
}

/// Replaces `dest` by `tmp` where the file system cannot swap them: the old checkpoint is renamed aside, where
/// [`latest_valid`] finds it should a kill come before the new one is renamed in.
fn replace_by_renames(dir: &Path, step: u64, tmp: &Path, dest: &Path) -> Result<()> {
    let old = dir.join(format!("{DISPLACED_PREFIX}{step}-{}", std::process::id()));
    fs::rename(dest, &old).map_err(io("rename", dest))?;
    fs::rename(tmp, dest).map_err(io("rename", tmp))?;
    fsync(dir)?;
    fs::remove_dir_all(&old).map_err(io("remove", &old))
}

/// Deletes checkpoints beyond the newest `keep` and leftovers of interrupted writes.
fn prune(dir: &Path, keep: usize) -> Result<()> {
    let all = list_checkpoints(dir)?;
    for (_, path) in all.iter().take(all.len().saturating_sub(keep)) {
        fs::remove_dir_all(path).map_err(io("remove", path))?;
        tracing::debug!(path = %path.display(), "old checkpoint removed");
    }
    for entry in fs::read_dir(dir).map_err(io("list", dir))?.flatten() {
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
    // SAFETY: statvfs is a plain C struct of integers, for which all-zero bytes are a valid value.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid C string and `s` a writable statvfs for the call to fill.
    if unsafe { libc::statvfs(path.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

/// Reads and verifies one checkpoint directory: known format, files present with the sizes and SHA-256 of its
/// manifest, tensors parse, and the step in `meta.json` matches the directory name. A sharded checkpoint's shards
/// are all read and its optimizer state assembled per parameter (`fc.weight.exp_avg`).
pub fn read_checkpoint(path: &Path) -> Result<Checkpoint> {
    let (mut ckpt, shards) = read_model(path)?;
    if let Some(shards) = shards {
        ckpt.optimizer = read_all(&shards, |q| read_shard(&shards, q))?;
    }
    Ok(ckpt)
}

/// [`read_checkpoint`] but for a sharded checkpoint's shards: its optimizer state is left empty and its shard
/// records returned.
pub(super) fn read_model(path: &Path) -> Result<(Checkpoint, Option<ShardedCheckpoint>)> {
    let bad = |detail: String| TrainError::Checkpoint { path: path.to_path_buf(), detail };
    let meta_path = path.join(META_FILE);
    let size = fs::metadata(&meta_path).map_err(|e| bad(format!("cannot read {META_FILE}: {e}")))?.len();
    if size > super::MAX_META_BYTES {
        return Err(bad(format!(
            "{META_FILE} is {size} bytes, over the limit of {} MiB (this crate writes a few KiB)",
            super::MAX_META_BYTES >> 20
        )));
    }
    let text = fs::read(&meta_path).map_err(|e| bad(format!("cannot read {META_FILE}: {e}")))?;
    let dir_step = path.file_name().and_then(|n| n.to_str()).and_then(step_of);
    let meta = parse_manifest(&text, dir_step).map_err(bad)?;
    let shards = ShardedCheckpoint::from_manifest(path, &meta).map_err(bad)?;
    let files: &[&str] = if shards.is_some() { &[MODEL_FILE] } else { &[MODEL_FILE, OPTIMIZER_FILE] };
    let mut tensors = Vec::new();
    for file in files {
        let file_path = path.join(file);
        if !file_path.is_file() {
            return Err(bad(format!("{file} is missing")));
        }
        let bytes = fs::read(&file_path).map_err(io("read", &file_path))?;
        tensors.push(decode_tensors(&meta, file, &bytes).map_err(bad)?);
    }
    let optimizer = if shards.is_some() { Vec::new() } else { tensors.pop().expect("two files") };
    let model = tensors.pop().expect("the model file");
    Ok((Checkpoint { model, optimizer, meta: meta.meta }, shards))
}

/// Old rank `rank`'s shard of a sharded checkpoint in a folder, verified against its manifest.
pub(super) fn read_shard(shards: &ShardedCheckpoint, rank: usize) -> Result<Vec<(String, Tensor)>> {
    let bad = |detail: String| TrainError::Checkpoint { path: shards.path.clone(), detail };
    let file = &shards.shards[rank].0;
    let file_path = shards.path.join(file);
    let bytes = match fs::read(&file_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(bad(format!("{file} is missing"))),
        Err(e) => return Err(TrainError::io("read", &file_path, e)),
    };
    shards.decode(rank, &bytes).map_err(bad)
}

/// The folder a sharded write of `step` collects its files in before it is renamed into place.
fn sharded_aside(dir: &Path, step: u64, write: &str) -> PathBuf {
    dir.join(format!(".tmp-ckpt-{step}-{write}"))
}

/// Writes one rank's optimizer shard into the folder of the sharded write `write` of `step`.
pub(super) fn put_shard(dir: &Path, step: u64, write: &str, file: &str, bytes: &[u8]) -> Result<()> {
    let tmp = sharded_aside(dir, step, write);
    fs::create_dir_all(&tmp).map_err(io("create", &tmp))?;
    let path = tmp.join(file);
    write_file(&path, bytes).inspect_err(|_| {
        let _ = fs::remove_file(&path);
    })
}

/// Completes the sharded write `write` of `step` once every rank wrote its shard: checks that every shard is in
/// this rank's view of the folder (the folder must be shared), writes the model and the manifest, and renames the
/// folder into place as [`save`] does.
pub(super) fn commit_sharded(
    dir: &Path,
    step: u64,
    write: &str,
    model: &[u8],
    meta: MetaFile,
    keep: usize,
) -> Result<PathBuf> {
    let tmp = sharded_aside(dir, step, write);
    for (file, size) in meta.sizes.iter().filter(|(f, _)| f.as_str() != MODEL_FILE) {
        let found = fs::metadata(tmp.join(file)).map(|m| m.len()).ok();
        if found != Some(*size) {
            return Err(TrainError::Checkpoint {
                path: dir.to_path_buf(),
                detail: format!(
                    "the optimizer shard {file} another rank wrote is not in rank 0's view of {} ({}): with --shard, \
                     every rank must see the same checkpoint folder (a shared file system), or give an s3:// \
                     --checkpoint-dir",
                    tmp.display(),
                    match found {
                        Some(n) => format!("{n} bytes instead of {size}"),
                        None => "missing".into(),
                    }
                ),
            });
        }
    }
    write_file(&tmp.join(MODEL_FILE), model)?;
    let manifest = serde_json::to_vec_pretty(&meta).expect("checkpoint metadata serialises");
    write_file(&tmp.join(META_FILE), &manifest)?;
    fsync(&tmp)?;
    let dest = publish(dir, step, &tmp)?;
    prune(dir, keep)?;
    Ok(dest)
}

/// Removes what the failed sharded write `write` of `step` left.
pub(super) fn abandon(dir: &Path, step: u64, write: &str) {
    let _ = fs::remove_dir_all(sharded_aside(dir, step, write));
}

/// Every checkpoint of `dir` with a name of one, newest first, those renamed aside after their step's.
pub(super) fn candidates(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut candidates = list_checkpoints(dir)?;
    candidates.extend(list_displaced(dir)?);
    // Newest step first; for one step `ckpt-<step>` before a displaced copy ("." sorts before "c").
    candidates.sort_by(|(a, pa), (b, pb)| b.cmp(a).then(pb.cmp(pa)));
    Ok(candidates.into_iter().map(|(_, path)| path).collect())
}

/// The newest checkpoint in `dir` that verifies ([`read_checkpoint`]); newer ones that do not are skipped with a
/// warning naming them and why. A checkpoint renamed aside by a replace that was interrupted
/// (`.old-ckpt-<step>-<pid>`, see [`save`]) stands in for a `ckpt-<step>` that is missing or
/// invalid. `None` when the directory has no valid checkpoint (or does not exist).
pub fn latest_valid(dir: &Path) -> Result<Option<Resume>> {
    newest_valid(candidates(dir)?, read_checkpoint)
}

/// Checkpoints renamed aside by an interrupted replace (`.old-ckpt-<step>-<pid>` directories) in `dir`.
fn list_displaced(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    subdirs_by_step(dir, |name| {
        let (step, _pid) = name.strip_prefix(DISPLACED_PREFIX)?.split_once('-')?;
        step.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::super::{encode, CheckpointMeta, RngState};
    use super::*;
    use crate::schedule::Schedule;
    use tch::Tensor;

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
        save(dir.path(), encode(&checkpoint(3, 1.0)).unwrap(), 1).unwrap();
        let tmp = dir.path().join(".tmp-ckpt-3-1");
        write_aside(&encode(&checkpoint(3, 2.0)).unwrap(), &tmp).unwrap();
        let dest = dir.path().join("ckpt-3");
        replace_by_renames(dir.path(), 3, &tmp, &dest).unwrap();
        let names: Vec<String> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["ckpt-3"]);
        let w = read_checkpoint(&dest).unwrap().model.remove(0).1;
        assert_eq!(w.double_value(&[0]), 2.0);
    }
}
