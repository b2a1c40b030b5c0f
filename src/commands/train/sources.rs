//! Where the training and validation data come from, and opening them: `--data` or the platform's channels,
//! SageMaker Pipe channels and their index, the sample counts a host shares between its processes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::Job;
use crate::cluster::{InputMode, Plan};
use crate::comm::Store;
use crate::data::format::{ShardIndex, INDEX_FILE};
use crate::data::source::{self, OpenOptions};
use crate::data::{Dataset, DatasetOptions, Format, Split, TokenOptions, DEFAULT_STREAM_WINDOW};
use crate::train::model::ExportedMetadata;

/// The training data: `--data`, else the platform's `train` or `training` channel.
pub(super) fn training_spec(plan: &Plan, job: &Job) -> anyhow::Result<String> {
    if let Some(spec) = &job.data {
        return Ok(spec.clone());
    }
    for name in ["train", "training"] {
        if plan.paths.channels.contains_key(name) {
            return Ok(format!("channel:{name}"));
        }
    }
    let channels: Vec<&String> = plan.paths.channels.keys().collect();
    if channels.is_empty() {
        bail!("no training data: give --data with a folder, s3://bucket/prefix or channel:NAME (or HYTRAIN_DATA)");
    }
    bail!(
        "no training data: this job's channels are {channels:?} but none is called train or training; give \
         --data channel:NAME"
    )
}

/// Whether `spec` reads a SageMaker Pipe channel (read once per epoch, so it cannot also serve a test split).
pub(super) fn is_pipe(plan: &Plan, spec: &str) -> bool {
    spec.starts_with("pipe:")
        || spec
            .strip_prefix("channel:")
            .and_then(|name| plan.paths.channels.get(name))
            .is_some_and(|c| c.input_mode == InputMode::Pipe)
}

/// The sampler's stream window for the data `spec` names: `--stream-window` when given, else a Pipe channel's
/// default (its shards arrive in order while the epoch runs), else none (all shards shuffled).
pub(super) fn stream_window(plan: &Plan, job: &Job, spec: &str) -> Option<usize> {
    job.stream_window.unwrap_or_else(|| is_pipe(plan, spec).then_some(DEFAULT_STREAM_WINDOW))
}

/// Refuses a Pipe channel read by several processes of one host: SageMaker streams each pass through one FIFO per
/// host, and two readers would split the stream between them (each opening `<channel>_0` and waiting or reading
/// part of it).
pub(super) fn check_pipe_readers(plan: &Plan, job: &Job, train_spec: &str) -> anyhow::Result<()> {
    let per_host = plan.topology.local_world_size;
    if per_host <= 1 {
        return Ok(());
    }
    let mut specs = vec![train_spec.to_string()];
    specs.extend(job.validation.clone().filter(|v| v != "none"));
    specs.extend(
        ["validation", "val", "test"]
            .iter()
            .filter(|name| plan.paths.channels.contains_key(**name))
            .map(|name| format!("channel:{name}")),
    );
    if let Some(spec) = specs.iter().find(|s| is_pipe(plan, s)) {
        bail!(
            "{spec} is read in SageMaker Pipe mode, which streams each pass through one FIFO per host that only one \
             process can read, but this host runs {per_host} processes; give the channel File or FastFile input \
             mode (TrainingInputMode, or the channel's InputMode), or run one process per host (--nproc-per-node 1)"
        );
    }
    Ok(())
}

/// Opens the dataset `spec` names, with the sample counts the host's local rank 0 took (see [`HostCounts`]) and
/// those `index` gives (a Pipe channel's, from `--data-index`).
pub(super) fn open_dataset(
    spec: &str,
    options: &OpenOptions,
    split: Split,
    job: &Job,
    tokens: &TokenOptions,
    counts: &mut HostCounts<'_>,
    index: Option<&ShardIndex>,
) -> anyhow::Result<Dataset> {
    counts.open(|given| {
        let source = source::open(spec, options).with_context(|| format!("cannot open {spec}"))?;
        let mut known = given.clone();
        known.shards.extend(index.iter().flat_map(|i| i.shards.iter().cloned()));
        Ok(Dataset::open_with_counts(
            source,
            &DatasetOptions { split, skip_bad_samples: job.skip_bad_samples, tokens: tokens.clone() },
            &known,
        )?)
    })
}

/// `--data-index FILE`: the index (`index.json`, as `hytrain data pack` writes it) of the shards a Pipe channel
/// delivers, which the channel itself cannot carry. Its training shards (those under `train/` when it lists any,
/// else all), in key order as SageMaker delivers them, become the Pipe's shards: their sizes let the first pass
/// stream like the later ones, and their counts spare reading it whole before the first batch (not with
/// `--skip-bad-samples`, whose counts leave out bad samples only a read finds).
pub(super) fn pipe_index(plan: &Plan, job: &Job, train_spec: &str) -> anyhow::Result<Option<ShardIndex>> {
    let Some(path) = &job.data_index else {
        return Ok(None);
    };
    if !is_pipe(plan, train_spec) {
        bail!(
            "--data-index {} names the index of a SageMaker Pipe channel, which cannot hold one; {train_spec} is not \
             one (a folder or S3 prefix keeps its own {INDEX_FILE}, as `hytrain data pack` writes it)",
            path.display()
        );
    }
    let text = std::fs::read(path).with_context(|| format!("cannot read --data-index {}", path.display()))?;
    let index: ShardIndex = serde_json::from_slice(&text).with_context(|| {
        format!("--data-index {} is not a shard index as `hytrain data pack` writes it", path.display())
    })?;
    let mut shards = index.shards;
    if shards.iter().any(|e| e.name.starts_with("train/")) {
        shards.retain(|e| e.name.starts_with("train/"));
    }
    // SageMaker delivers a channel's objects in key order, bytewise.
    shards.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    if shards.is_empty() {
        bail!("--data-index {} lists no shards", path.display());
    }
    for (i, entry) in shards.iter_mut().enumerate() {
        entry.name = source::Pipe::shard_name(i);
    }
    tracing::info!(
        "{} shard(s) of {train_spec} known from --data-index {}: its first epoch starts before the pass has arrived",
        shards.len(),
        path.display()
    );
    Ok(Some(ShardIndex { shards }))
}

/// The processes of one host count a dataset's samples once between them: local rank 0 opens each dataset as
/// usual (reading every shard that no index.json lists) and hands its counts to the host's other processes
/// through the rendezvous store, which open with them instead of reading the shards again. One count per host,
/// not per job, so hosts of a ShardedByS3Key channel, which hold different objects, each count their own. Under
/// mpirun there is no store and every process counts.
pub(super) struct HostCounts<'a> {
    pub(super) store: Option<&'a Store>,
    pub(super) node_rank: usize,
    pub(super) local_rank: usize,
    /// Datasets opened so far: every process of the host opens the same ones in the same order.
    pub(super) opened: usize,
}

impl HostCounts<'_> {
    /// Opens a dataset with `open`, given the counts local rank 0 took (none on local rank 0 itself).
    fn open(&mut self, open: impl FnOnce(&ShardIndex) -> anyhow::Result<Dataset>) -> anyhow::Result<Dataset> {
        let key = format!("data-counts/{}/{}", self.node_rank, self.opened);
        self.opened += 1;
        let Some(store) = self.store else {
            return open(&ShardIndex::default());
        };
        if self.local_rank == 0 {
            let opened = open(&ShardIndex::default());
            // A failure is published too (as no counts), so the others open by themselves and report it rather
            // than wait for counts that never come.
            let counts = opened.as_ref().map(Dataset::counts).unwrap_or_default();
            let value = serde_json::to_vec(&counts).context("cannot encode the sample counts")?;
            store.set(&key, &value).context("cannot hand the sample counts to this host's other processes")?;
            return opened;
        }
        let value = store.get(&key).context("waiting for local rank 0 to count the dataset's samples")?;
        // Counts that do not parse are no counts: this process then counts by itself.
        let given: ShardIndex = serde_json::from_slice(&value).unwrap_or_default();
        open(&given)
    }
}

/// The local folder `spec` reads (a path, or a SageMaker File channel), where a sample index may be kept.
pub(super) fn local_data_folder(plan: &Plan, spec: &str) -> Option<PathBuf> {
    if let Some(name) = spec.strip_prefix("channel:") {
        let channel = plan.paths.channels.get(name)?;
        return (channel.input_mode == InputMode::File).then(|| channel.path.clone());
    }
    if spec.starts_with("pipe:") || spec.contains("://") && !spec.starts_with("file://") {
        return None;
    }
    let path = PathBuf::from(spec.strip_prefix("file://").unwrap_or(spec));
    path.is_dir().then_some(path)
}

/// Keeps the sample counts this host read the shards for in an index.json beside the training data, so the next
/// job reads none of them to count: only in a writable local folder without one, and not with
/// `--skip-bad-samples`, whose counts leave bad samples out. A folder that cannot take it costs a warning.
pub(super) fn keep_counts(plan: &Plan, job: &Job, train_spec: &str, sets: &[(&Dataset, &str)]) {
    if job.skip_bad_samples {
        return;
    }
    let Some(folder) = local_data_folder(plan, train_spec) else {
        return;
    };
    if folder.join(INDEX_FILE).exists() {
        return;
    }
    // Only formats whose counts take reading the data; the others count from sizes and headers.
    let read_to_count = |ds: &Dataset| matches!(ds.format(), Format::Tar | Format::CifarPy);
    let mut shards = BTreeMap::new();
    for (ds, spec) in sets {
        if *spec == train_spec && read_to_count(ds) {
            for entry in ds.counts().shards {
                shards.insert(entry.name.clone(), entry);
            }
        }
    }
    if shards.is_empty() {
        return;
    }
    let index = ShardIndex { shards: shards.into_values().collect() };
    let path = folder.join(INDEX_FILE);
    match crate::data::format::write_index(&folder, &index) {
        Ok(()) => tracing::info!(
            "kept the sample counts of {} shard(s) in {}: the next job reads no shard to count them",
            index.shards.len(),
            path.display()
        ),
        Err(e) => {
            tracing::warn!("not keeping the sample counts in {} ({e}); the next job counts them again", path.display())
        }
    }
}

/// How to cut token data: `--context-length` and `--token-dtype`, the context length defaulting to the sequence
/// length of an exported model that takes token ids, whose vocabulary then bounds the ids.
pub(super) fn token_options(job: &Job) -> anyhow::Result<TokenOptions> {
    let exported =
        if Path::new(&job.model).is_dir() { Some(ExportedMetadata::read(Path::new(&job.model))?) } else { None };
    let model_context = exported.as_ref().and_then(ExportedMetadata::context_length);
    Ok(TokenOptions {
        context_length: job.context_length.or(model_context),
        dtype: job.token_dtype,
        vocab_size: exported
            .as_ref()
            .filter(|_| model_context.is_some())
            .and_then(ExportedMetadata::classes)
            .and_then(|v| usize::try_from(v).ok()),
    })
}

/// The validation data: `--validation` (its test split when it has one, else all of it), else a `validation`,
/// `val` or `test` channel, else the training data's own test split when it has one; `--validation none` turns
/// evaluation off.
pub(super) fn validation_dataset(
    plan: &Plan,
    job: &Job,
    train_spec: &str,
    options: &OpenOptions,
    tokens: &TokenOptions,
    counts: &mut HostCounts<'_>,
) -> anyhow::Result<Option<(Dataset, String)>> {
    let mut whole_or_test = |spec: &str| -> anyhow::Result<(Dataset, String)> {
        match open_dataset(spec, options, Split::Test, job, tokens, counts, None) {
            Err(e) if matches!(e.downcast_ref(), Some(crate::data::Error::NoSplit { .. })) => {
                open_dataset(spec, options, Split::Train, job, tokens, counts, None)
            }
            other => other,
        }
        .map(|ds| (ds, spec.to_string()))
    };
    if let Some(spec) = &job.validation {
        if spec == "none" {
            return Ok(None);
        }
        return whole_or_test(spec).map(Some).with_context(|| format!("cannot open the validation data {spec}"));
    }
    for name in ["validation", "val", "test"] {
        if plan.paths.channels.contains_key(name) {
            return whole_or_test(&format!("channel:{name}")).map(Some);
        }
    }
    if is_pipe(plan, train_spec) {
        return Ok(None);
    }
    match open_dataset(train_spec, options, Split::Test, job, tokens, counts, None) {
        Ok(ds) => Ok(Some((ds, train_spec.to_string()))),
        Err(e) if matches!(e.downcast_ref(), Some(crate::data::Error::NoSplit { .. })) => Ok(None),
        Err(e) => Err(e.context(format!("cannot open the test split of {train_spec}"))),
    }
}
