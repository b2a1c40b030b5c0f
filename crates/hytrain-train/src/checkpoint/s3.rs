//! Checkpoints below an S3 prefix, through hytrain-data's S3 client (the only crate that talks to S3).
//!
//! A checkpoint of step N is `ckpt-N/meta.json`, its manifest, and its tensor files in a folder of their own write,
//! `ckpt-N/<write>/model.safetensors` and `optimizer.safetensors`. The tensor files are uploaded first (multipart,
//! parts in parallel), the manifest last: S3 replaces an object only once its upload is complete, so a reader finds
//! either no manifest (the checkpoint does not exist yet) or one whose files are all there. A checkpoint written
//! again for the same step uploads into a new `<write>` folder and replaces the manifest last, so the old one stays
//! whole until then. A prefix copied from a folder checkpoint (`aws s3 sync`, files beside `meta.json`) reads too.
//!
//! Old checkpoints are deleted only once the new one is complete, with the leftovers of writes that never
//! finished.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use hytrain_data::source::{S3Options, S3};

use super::dir::step_of;
use bytes::Bytes;
use tch::Tensor;

use super::sharded::{read_all, ShardedCheckpoint};
use super::{
    decode_tensors, human_bytes, newest_valid, parse_manifest, write_id, Checkpoint, Encoded, MetaFile, Resume,
    META_FILE, MODEL_FILE, OPTIMIZER_FILE,
};
use crate::{Result, TrainError};

/// An S3 prefix holding checkpoints.
pub(super) struct S3Store {
    s3: S3,
    /// `s3://bucket/prefix` without a trailing `/`, as a path for [`super::CheckpointStore::dir`].
    location: PathBuf,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store").field("location", &self.location).finish()
    }
}

fn s3_error(during: String) -> impl FnOnce(hytrain_data::Error) -> TrainError {
    move |source| TrainError::Storage { during, source }
}

impl S3Store {
    pub(super) fn new(url: &str, options: &S3Options) -> Result<Self> {
        let trimmed = url.trim_end_matches('/');
        let s3 = S3::new(trimmed, options).map_err(s3_error(format!("opening the checkpoint location {url}")))?;
        Ok(S3Store { s3, location: PathBuf::from(trimmed) })
    }

    pub(super) fn location(&self) -> &Path {
        &self.location
    }

    fn url(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("{}/{name}", self.location.display()))
    }

    pub(super) fn save(&self, mut encoded: Encoded, keep: usize) -> Result<PathBuf> {
        let step = encoded.step;
        let started = std::time::Instant::now();
        let write = write_id();
        for (file, bytes) in &encoded.tensors {
            let name = format!("ckpt-{step}/{write}/{file}");
            self.s3.put(&name, bytes.clone()).map_err(s3_error(format!("uploading checkpoint step {step}")))?;
        }
        encoded.meta.files_in = Some(write);
        let name = format!("ckpt-{step}/{META_FILE}");
        self.s3
            .put(&name, encoded.manifest().into())
            .map_err(s3_error(format!("uploading the manifest of checkpoint step {step}")))?;
        let dest = self.url(&format!("ckpt-{step}"));
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            path = %dest.display(),
            step,
            size = %human_bytes(encoded.size()),
            secs = format!("{secs:.2}"),
            "checkpoint written"
        );
        self.prune(keep)?;
        Ok(dest)
    }

    /// The objects of every `ckpt-<step>/`, by step.
    fn by_step(&self) -> Result<BTreeMap<u64, Vec<String>>> {
        let objects =
            self.s3.list_all().map_err(s3_error(format!("listing the checkpoints in {}", self.location.display())))?;
        let mut steps: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for object in objects {
            let step = object.name.split_once('/').and_then(|(first, _)| step_of(first));
            if let Some(step) = step {
                steps.entry(step).or_default().push(object.name);
            }
        }
        Ok(steps)
    }

    /// Deletes every checkpoint but the newest `keep` complete ones (those with a manifest), and in those the files
    /// their manifests do not name (leftovers of a write of the same step that never finished).
    fn prune(&self, keep: usize) -> Result<()> {
        let steps = self.by_step()?;
        let manifest = |step: u64| format!("ckpt-{step}/{META_FILE}");
        let complete: Vec<u64> =
            steps.iter().filter(|(s, names)| names.contains(&manifest(**s))).map(|(s, _)| *s).collect();
        let kept: BTreeSet<u64> = complete.iter().rev().take(keep).copied().collect();
        let mut doomed = Vec::new();
        for (step, names) in &steps {
            if !kept.contains(step) {
                doomed.extend(names.iter().cloned());
                continue;
            }
            let Some(meta) = self.read_manifest(*step)? else {
                // A manifest that does not parse is left alone: reading skips it, and no guess deletes files.
                continue;
            };
            let files_in = match &meta.files_in {
                Some(write) => format!("ckpt-{step}/{write}/"),
                None => format!("ckpt-{step}/"),
            };
            // A sharded checkpoint's files are its model and shards; an older manifest lists both tensor files.
            let wanted =
                |name: &str| name == manifest(*step) || meta.files.keys().any(|f| name == format!("{files_in}{f}"));
            doomed.extend(names.iter().filter(|n| !wanted(n)).cloned());
        }
        if doomed.is_empty() {
            return Ok(());
        }
        self.s3.delete(&doomed).map_err(s3_error(format!(
            "deleting {} objects of old or unfinished checkpoints in {}",
            doomed.len(),
            self.location.display()
        )))?;
        tracing::debug!(objects = doomed.len(), "old checkpoints and leftovers of unfinished writes removed");
        Ok(())
    }

    /// The manifest of `step`, `None` when it does not parse. Errors reaching S3 are returned.
    fn read_manifest(&self, step: u64) -> Result<Option<MetaFile>> {
        let name = format!("ckpt-{step}/{META_FILE}");
        let bytes = self.s3.read_whole(&name).map_err(s3_error(format!("reading {name}")))?;
        Ok(parse_manifest(&bytes, Some(step)).ok())
    }

    /// The newest checkpoint whose manifest is there and whose files match it; see [`super::latest_valid`].
    pub(super) fn latest_valid(&self) -> Result<Option<Resume>> {
        newest_valid(self.candidates()?, |path| self.read(path))
    }

    /// Reads and verifies the checkpoint at `path` (`s3://.../ckpt-<step>`); a sharded one's shards are all read
    /// and its optimizer state assembled per parameter.
    pub(super) fn read(&self, path: &Path) -> Result<Checkpoint> {
        let (mut ckpt, shards) = self.read_model(path)?;
        if let Some(shards) = shards {
            ckpt.optimizer = read_all(&shards, |q| self.read_shard(&shards, q))?;
        }
        Ok(ckpt)
    }

    /// An object's bytes, `None` when it does not exist.
    fn read_object(&self, object: &str) -> Result<Option<Vec<u8>>> {
        match self.s3.read_whole(object) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(hytrain_data::Error::Read { io, .. }) if io.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(s3_error(format!("reading {}", self.url(object).display()))(e)),
        }
    }

    /// Old rank `rank`'s shard of a sharded checkpoint, verified against its manifest.
    pub(super) fn read_shard(&self, shards: &ShardedCheckpoint, rank: usize) -> Result<Vec<(String, Tensor)>> {
        let bad = |detail: String| TrainError::Checkpoint { path: shards.path.clone(), detail };
        let name = shards.path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let files_in = match &shards.files_in {
            Some(write) => format!("{name}/{write}"),
            None => name.to_string(),
        };
        let file = &shards.shards[rank].0;
        let bytes =
            self.read_object(&format!("{files_in}/{file}"))?.ok_or_else(|| bad(format!("{file} is missing")))?;
        shards.decode(rank, &bytes).map_err(bad)
    }

    /// Uploads one rank's optimizer shard into the folder of the sharded write `write` of `step`.
    pub(super) fn put_shard(&self, step: u64, write: &str, file: &str, bytes: Bytes) -> Result<()> {
        let name = format!("ckpt-{step}/{write}/{file}");
        self.s3
            .put(&name, bytes)
            .map_err(s3_error(format!("uploading the optimizer shard {file} of checkpoint step {step}")))
    }

    /// Completes the sharded write `write` of `step` once every rank uploaded its shard: the model, then the
    /// manifest, then old checkpoints are pruned.
    pub(super) fn commit_sharded(
        &self,
        step: u64,
        write: &str,
        model: Bytes,
        mut meta: MetaFile,
        keep: usize,
    ) -> Result<PathBuf> {
        let name = format!("ckpt-{step}/{write}/{MODEL_FILE}");
        self.s3.put(&name, model).map_err(s3_error(format!("uploading checkpoint step {step}")))?;
        meta.files_in = Some(write.to_string());
        let manifest = serde_json::to_vec_pretty(&meta).expect("checkpoint metadata serialises");
        self.s3
            .put(&format!("ckpt-{step}/{META_FILE}"), manifest.into())
            .map_err(s3_error(format!("uploading the manifest of checkpoint step {step}")))?;
        let dest = self.url(&format!("ckpt-{step}"));
        tracing::info!(path = %dest.display(), step, "sharded checkpoint written");
        self.prune(keep)?;
        Ok(dest)
    }

    /// The checkpoints with a manifest, newest first.
    pub(super) fn candidates(&self) -> Result<Vec<PathBuf>> {
        let steps = self.by_step()?;
        Ok(steps
            .iter()
            .rev()
            .filter(|(step, names)| names.contains(&format!("ckpt-{step}/{META_FILE}")))
            .map(|(step, _)| self.url(&format!("ckpt-{step}")))
            .collect())
    }

    /// [`S3Store::read`] but for a sharded checkpoint's shards, whose records are returned instead.
    pub(super) fn read_model(&self, path: &Path) -> Result<(Checkpoint, Option<ShardedCheckpoint>)> {
        let bad = |detail: String| TrainError::Checkpoint { path: path.to_path_buf(), detail };
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        let step = step_of(&name);
        let read = |object: &str| self.read_object(object);
        let manifest = read(&format!("{name}/{META_FILE}"))?.ok_or_else(|| bad(format!("{META_FILE} is missing")))?;
        let meta = parse_manifest(&manifest, step).map_err(bad)?;
        let shards = ShardedCheckpoint::from_manifest(path, &meta).map_err(bad)?;
        let files_in = match &meta.files_in {
            Some(write) => format!("{name}/{write}"),
            None => name.clone(),
        };
        let files: &[&str] = if shards.is_some() { &[MODEL_FILE] } else { &[MODEL_FILE, OPTIMIZER_FILE] };
        let mut tensors = Vec::new();
        for file in files {
            let bytes = read(&format!("{files_in}/{file}"))?.ok_or_else(|| bad(format!("{file} is missing")))?;
            tensors.push(decode_tensors(&meta, file, &bytes).map_err(bad)?);
        }
        let optimizer = if shards.is_some() { Vec::new() } else { tensors.pop().expect("two files") };
        let model = tensors.pop().expect("the model file");
        Ok((Checkpoint { model, optimizer, meta: meta.meta }, shards))
    }
}
