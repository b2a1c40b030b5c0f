//! `hytrain train`: the main job. Layers the configuration (flags, `HYTRAIN_*`, SageMaker hyperparameters), joins
//! the other ranks, opens the training and validation data through the data plane, builds the model and runs
//! [`Trainer`](crate::train::Trainer) until done or stopped by SIGTERM/SIGINT.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{Arg, ArgMatches};

use super::device::{self, DeviceRequest};
use crate::cluster::{InputMode, Plan};
use crate::comm::recorder::{FlightRecorder, Recorded};
use crate::comm::{Collective, CommOptions, ReduceOp, Store};
use crate::data::augment::{Normalize, Transform};
use crate::data::format::{ShardIndex, INDEX_FILE};
use crate::data::source::{self, OpenOptions};
use crate::data::{
    Dataset, DatasetOptions, Format, Loader, LoaderConfig, Remainder, SamplerConfig, Split, TokenDtype, TokenOptions,
    DEFAULT_STREAM_WINDOW,
};
use crate::train::config::{self, ConfigSources, Layered, Origin};
use crate::train::model::{self, DataSpec, ExportedMetadata};
use crate::train::{Ddp, LoaderBatches, RunPaths, Summary, Trainer};

/// The training knobs of [`TrainConfig`](crate::train::TrainConfig) as flags (`--batch-size 128`), one per
/// configuration key; only those given on the command line are kept, so the environment and hyperparameters
/// still apply to the rest.
#[derive(Debug, Clone, Default)]
pub struct ConfigFlags(pub BTreeMap<String, String>);

impl clap::FromArgMatches for ConfigFlags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let given = config::KEYS
            .iter()
            .filter(|key| matches.value_source(key) == Some(ValueSource::CommandLine))
            .filter_map(|key| matches.get_one::<String>(key).map(|v| (key.replace('_', "-"), v.clone())))
            .collect();
        Ok(ConfigFlags(given))
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl clap::Args for ConfigFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        config::KEYS.iter().fold(cmd, |cmd, key| {
            let arg = Arg::new(*key).long(key.replace('_', "-")).help(config::help(key));
            cmd.arg(if config::is_switch(key) {
                arg.num_args(0..=1).default_missing_value("true").value_name("BOOL")
            } else {
                arg.value_name("VALUE")
            })
        })
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// `hytrain train`'s own settings (what is not a training knob): model, data, paths. Flags and `HYTRAIN_*` come in
/// here; SageMaker hyperparameters of the same names fill what is still unset.
#[derive(Debug, Clone, Default)]
pub struct JobFlags {
    /// Model name or TorchScript file.
    pub model: Option<String>,
    /// Training data source.
    pub data: Option<String>,
    /// Validation data source, or `none`.
    pub validation: Option<String>,
    /// The index of a Pipe channel's shards.
    pub data_index: Option<PathBuf>,
    /// Class count when the dataset names none.
    pub num_classes: Option<String>,
    /// Random crop and flip on training images.
    pub augment: Option<String>,
    /// Per-channel normalization: `auto`, `none` or `MEAN,.../STD,...`.
    pub normalize: Option<String>,
    /// Shorter side of each image after resizing.
    pub resize: Option<String>,
    /// Square crop after resizing.
    pub crop: Option<String>,
    /// Zero padding before the random crop.
    pub crop_padding: Option<String>,
    /// Drop the remainder instead of padding.
    pub drop_last: Option<String>,
    /// At most this many training samples per epoch.
    pub max_samples: Option<String>,
    /// Streaming order's shard window, or `off`.
    pub stream_window: Option<String>,
    /// Skip samples that do not decode.
    pub skip_bad_samples: Option<String>,
    /// Decode threads per rank.
    pub workers: Option<String>,
    /// Export folder.
    pub model_dir: Option<PathBuf>,
    /// Checkpoint folder, or `none`.
    pub checkpoint_dir: Option<PathBuf>,
    /// Folder of `metrics.jsonl`.
    pub output_dir: Option<PathBuf>,
    /// S3-compatible endpoint.
    pub s3_endpoint: Option<String>,
    /// S3 region.
    pub s3_region: Option<String>,
    /// `auto`, `cpu` or `cuda`.
    pub device: Option<String>,
    /// Token data: ids per sample.
    pub context_length: Option<String>,
    /// Token data: `uint16` or `uint32` ids in headerless files.
    pub token_dtype: Option<String>,
}

/// Keys [`JobFlags`] takes from hyperparameters, with the spellings accepted for each (the reference script's
/// `model-type` and `data-dir` among them).
const JOB_KEYS: &[(&str, &[&str])] = &[
    ("model", &["model", "model_type", "arch"]),
    ("data", &["data", "data_dir", "efs_dir_path", "train_data"]),
    ("validation", &["validation", "val_data", "test_data"]),
    ("data_index", &["data_index"]),
    ("num_classes", &["num_classes"]),
    ("augment", &["augment"]),
    ("normalize", &["normalize"]),
    ("resize", &["resize"]),
    ("crop", &["crop", "crop_size"]),
    ("crop_padding", &["crop_padding"]),
    ("drop_last", &["drop_last"]),
    ("max_samples", &["max_samples"]),
    ("stream_window", &["stream_window"]),
    ("skip_bad_samples", &["skip_bad_samples"]),
    ("workers", &["workers", "num_workers"]),
    ("model_dir", &["model_dir"]),
    ("checkpoint_dir", &["checkpoint_dir"]),
    ("output_dir", &["output_dir"]),
    ("s3_endpoint", &["s3_endpoint"]),
    ("s3_region", &["s3_region"]),
    ("device", &["device"]),
    ("context_length", &["context_length", "block_size", "seq_len"]),
    ("token_dtype", &["token_dtype"]),
];

/// Everything `hytrain train` was given.
#[derive(Debug, Clone)]
pub struct TrainArgs {
    /// Training knobs from the command line.
    pub config: ConfigFlags,
    /// Model, data and paths.
    pub job: JobFlags,
    /// Rendezvous and collective deadlines.
    pub comm: CommOptions,
}

/// The settled job: every value with its final meaning.
#[derive(Debug, Clone)]
struct Job {
    model: String,
    data: Option<String>,
    validation: Option<String>,
    data_index: Option<PathBuf>,
    num_classes: Option<i64>,
    augment: bool,
    normalize: Normalize,
    resize: Option<usize>,
    crop: Option<usize>,
    crop_padding: usize,
    drop_last: bool,
    max_samples: Option<usize>,
    /// `--stream-window` when given: `Some(None)` for `off`; `None` lets the source decide.
    stream_window: Option<Option<usize>>,
    skip_bad_samples: bool,
    workers: Option<usize>,
    model_dir: Option<PathBuf>,
    checkpoint_dir: Option<PathBuf>,
    output_dir: Option<PathBuf>,
    s3_endpoint: Option<String>,
    s3_region: Option<String>,
    device: DeviceRequest,
    context_length: Option<usize>,
    token_dtype: TokenDtype,
}

fn parse_bool(key: &str, value: &str) -> anyhow::Result<bool> {
    Ok(config::parse_bool(key, value)?)
}

fn parse_count<T: std::str::FromStr>(key: &str, value: &str) -> anyhow::Result<T> {
    value.parse().map_err(|_| anyhow::anyhow!("{key} must be a whole number, got '{value}'"))
}

impl Job {
    /// Flags and env over hyperparameters (`unknown` of the layered configuration); a hyperparameter that is
    /// neither a training knob nor a job key is refused, so a typo does not silently train with a default.
    fn settle(flags: &JobFlags, unknown: &[(Origin, String, String)]) -> anyhow::Result<Job> {
        let mut from_hp: BTreeMap<&str, (String, &Origin)> = BTreeMap::new();
        for (origin, key, value) in unknown {
            let canonical = config::canonical_key(key);
            let Some((name, _)) = JOB_KEYS.iter().find(|(_, spellings)| spellings.contains(&canonical.as_str())) else {
                let known: Vec<&str> = config::KEYS.iter().chain(JOB_KEYS.iter().map(|(k, _)| k)).copied().collect();
                bail!("unknown setting '{key}' (from {origin}); known settings: {}", known.join(", "));
            };
            // Sources come lowest precedence first, so a later one overwrites.
            from_hp.insert(name, (config::unquote(value), origin));
        }
        let pick = |name: &str, flag: &Option<String>| -> Option<(String, String)> {
            match flag {
                Some(v) => Some((v.clone(), format!("--{}", name.replace('_', "-")))),
                None => from_hp.get(name).map(|(v, origin)| (v.clone(), format!("{name} (from {origin})"))),
            }
        };
        let text = |name: &str, flag: &Option<String>| pick(name, flag).map(|(v, _)| v);
        let path = |name: &str, flag: &Option<PathBuf>| -> Option<PathBuf> {
            flag.clone().or_else(|| from_hp.get(name).map(|(v, _)| PathBuf::from(v)))
        };
        let switch = |name: &str, flag: &Option<String>| -> anyhow::Result<bool> {
            pick(name, flag).map_or(Ok(false), |(v, key)| parse_bool(&key, &v))
        };
        let count = |name: &str, flag: &Option<String>| -> anyhow::Result<Option<usize>> {
            pick(name, flag).map(|(v, key)| parse_count::<usize>(&key, &v)).transpose()
        };
        let num_classes = match pick("num_classes", &flags.num_classes) {
            None => None,
            Some((v, key)) => match parse_count::<i64>(&key, &v)? {
                n if n >= 1 => Some(n),
                _ => bail!("{key} must be at least 1, got '{v}'"),
            },
        };
        let at_least_one = |name: &str, flag: &Option<String>| -> anyhow::Result<Option<usize>> {
            match pick(name, flag) {
                None => Ok(None),
                Some((v, key)) => match parse_count::<usize>(&key, &v)? {
                    n if n >= 1 => Ok(Some(n)),
                    _ => bail!("{key} must be at least 1, got '{v}'"),
                },
            }
        };
        let none_is_off = |p: Option<PathBuf>| p.filter(|p| p.as_os_str() != "none");
        Ok(Job {
            model: text("model", &flags.model).unwrap_or_else(|| "lenet".into()),
            data: text("data", &flags.data),
            validation: text("validation", &flags.validation),
            data_index: path("data_index", &flags.data_index),
            num_classes,
            augment: switch("augment", &flags.augment)?,
            normalize: match pick("normalize", &flags.normalize) {
                None => Normalize::Auto,
                Some((v, key)) => v.parse().map_err(|e| anyhow::anyhow!("{key}: {e}"))?,
            },
            resize: at_least_one("resize", &flags.resize)?,
            crop: at_least_one("crop", &flags.crop)?,
            crop_padding: count("crop_padding", &flags.crop_padding)?.unwrap_or(Transform::default().crop_padding),
            drop_last: switch("drop_last", &flags.drop_last)?,
            max_samples: count("max_samples", &flags.max_samples)?,
            stream_window: pick("stream_window", &flags.stream_window)
                .map(|(v, key)| super::data::parse_stream_window(&v).map_err(|e| anyhow::anyhow!("{key}: {e}")))
                .transpose()?,
            skip_bad_samples: switch("skip_bad_samples", &flags.skip_bad_samples)?,
            workers: count("workers", &flags.workers)?,
            model_dir: location("model-dir", none_is_off(path("model_dir", &flags.model_dir)), true)?,
            checkpoint_dir: location("checkpoint-dir", path("checkpoint_dir", &flags.checkpoint_dir), true)?,
            output_dir: location("output-dir", none_is_off(path("output_dir", &flags.output_dir)), false)?,
            s3_endpoint: text("s3_endpoint", &flags.s3_endpoint),
            s3_region: text("s3_region", &flags.s3_region),
            device: match pick("device", &flags.device) {
                None => DeviceRequest::default(),
                Some((v, key)) => v.parse().map_err(|e| anyhow::anyhow!("{key}: {e}"))?,
            },
            context_length: match pick("context_length", &flags.context_length) {
                None => None,
                Some((v, key)) => match parse_count::<usize>(&key, &v)? {
                    n if n >= 1 => Some(n),
                    _ => bail!("{key} must be at least 1, got '{v}'"),
                },
            },
            token_dtype: match pick("token_dtype", &flags.token_dtype) {
                None => TokenDtype::default(),
                Some((v, key)) => v.parse().map_err(|e| anyhow::anyhow!("{key}: {e}"))?,
            },
        })
    }
}

/// Checks a place hytrain writes to: a folder, or with `s3_ok` an `s3://bucket/prefix` URL. Any other URL is refused
/// rather than becoming a local folder named `gs:` while the job "succeeds" with nothing where the user looks.
fn location(flag: &str, path: Option<PathBuf>, s3_ok: bool) -> anyhow::Result<Option<PathBuf>> {
    let Some((scheme, rest)) = path.as_ref().and_then(|p| p.to_str()).and_then(|p| p.split_once("://")) else {
        return Ok(path);
    };
    let value = path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    match scheme {
        "s3" if s3_ok && rest.split('/').next().is_some_and(|bucket| !bucket.is_empty()) => Ok(path),
        "s3" if s3_ok => bail!("--{flag} {value}: no bucket; expected s3://bucket/prefix"),
        "s3" => bail!(
            "--{flag} {value}: hytrain appends metrics.jsonl to a local file, not to S3; give a folder (on \
             SageMaker /opt/ml/output/data, which SageMaker uploads when the job ends)"
        ),
        _ if s3_ok => bail!("--{flag} {value}: hytrain writes to folders and s3:// URLs, not {scheme}://"),
        _ => bail!("--{flag} {value}: hytrain writes folders, not {scheme}:// URLs; give a local or mounted folder"),
    }
}

/// The layered configuration of this job: `HYTRAIN_*` and `SM_HP_*` from `env`, hyperparameters from the plan,
/// flags from `cli`.
pub fn layered(plan: &Plan, env: &crate::cluster::Env, cli: &ConfigFlags) -> anyhow::Result<Layered> {
    let sources = ConfigSources {
        cli: cli.0.clone(),
        env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        hyperparameters: plan.hyperparameters.clone(),
    };
    Ok(config::layer(&sources)?)
}

/// The training data: `--data`, else the platform's `train` or `training` channel.
fn training_spec(plan: &Plan, job: &Job) -> anyhow::Result<String> {
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
fn is_pipe(plan: &Plan, spec: &str) -> bool {
    spec.starts_with("pipe:")
        || spec
            .strip_prefix("channel:")
            .and_then(|name| plan.paths.channels.get(name))
            .is_some_and(|c| c.input_mode == InputMode::Pipe)
}

/// The sampler's stream window for the data `spec` names: `--stream-window` when given, else a Pipe channel's
/// default (its shards arrive in order while the epoch runs), else none (all shards shuffled).
fn stream_window(plan: &Plan, job: &Job, spec: &str) -> Option<usize> {
    job.stream_window.unwrap_or_else(|| is_pipe(plan, spec).then_some(DEFAULT_STREAM_WINDOW))
}

/// Refuses a Pipe channel read by several processes of one host: SageMaker streams each pass through one FIFO per
/// host, and two readers would split the stream between them (each opening `<channel>_0` and waiting or reading
/// part of it).
fn check_pipe_readers(plan: &Plan, job: &Job, train_spec: &str) -> anyhow::Result<()> {
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
fn open_dataset(
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
fn pipe_index(plan: &Plan, job: &Job, train_spec: &str) -> anyhow::Result<Option<ShardIndex>> {
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
struct HostCounts<'a> {
    store: Option<&'a Store>,
    node_rank: usize,
    local_rank: usize,
    /// Datasets opened so far: every process of the host opens the same ones in the same order.
    opened: usize,
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
fn local_data_folder(plan: &Plan, spec: &str) -> Option<PathBuf> {
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
fn keep_counts(plan: &Plan, job: &Job, train_spec: &str, sets: &[(&Dataset, &str)]) {
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
fn token_options(job: &Job) -> anyhow::Result<TokenOptions> {
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
fn validation_dataset(
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

/// What hytrain averages gradients with for `--backend` (one of `BACKENDS`).
pub fn backend_use(backend: &str) -> &'static str {
    match backend {
        "nccl" => "NCCL across the GPUs (needs --device cuda)",
        "mpi" => "MPI's allreduce under mpirun (needs the MPI build)",
        _ => "the ring over TCP and shared memory between local ranks on the CPU, NCCL on GPUs",
    }
}

/// Refuses a `--backend` this job cannot use rather than ignoring it.
fn check_backend(backend: &str, device: tch::Device, mpi_launch: bool) -> anyhow::Result<()> {
    match backend {
        "nccl" if !device.is_cuda() => bail!(
            "--backend nccl needs GPUs, but this job trains on the CPU (--device cpu, or no GPU found); drop \
             --backend (hytrain uses NCCL whenever it trains on GPUs) or pass --backend gloo"
        ),
        "mpi" if !cfg!(feature = "mpi") => bail!(
            "--backend mpi needs hytrain built with MPI (cargo build --features mpi), which this binary is not; \
             pass --backend gloo for hytrain's own ring and shared memory"
        ),
        "mpi" if !mpi_launch => bail!(
            "--backend mpi averages through MPI, which needs the job started by mpirun; start it with mpirun or \
             pass --backend gloo"
        ),
        _ => Ok(()),
    }
}

/// The smallest of `value` over all ranks.
fn min_over_ranks(comm: &mut dyn Collective, value: usize) -> anyhow::Result<usize> {
    // The collectives sum; a min is each rank's value in its own slot, summed, then the smallest slot.
    let mut slots = vec![0.0f64; comm.world_size()];
    slots[comm.rank()] = value as f64;
    comm.allreduce(crate::comm::Buffer::F64(&mut slots), ReduceOp::Sum)
        .context("agreeing on the per-host sample count")?;
    Ok(slots.iter().fold(f64::INFINITY, |a, &b| a.min(b)) as usize)
}

/// Runs the job on this rank; `stop` is set by SIGTERM/SIGINT.
///
/// Every collective call is recorded in `recorder`, whose dumps go to `flight-recorder/` in the output folder.
pub fn run(
    plan: &Plan,
    env: &crate::cluster::Env,
    args: &TrainArgs,
    stop: &AtomicBool,
    recorder: &FlightRecorder,
) -> anyhow::Result<Summary> {
    let layered = layered(plan, env, &args.config)?;
    let job = Job::settle(&args.job, &layered.unknown)?;
    let output_dir = job.output_dir.clone().unwrap_or_else(|| plan.paths.output_data_dir.clone());
    recorder.set_dump_dir(Some(output_dir.join("flight-recorder")));
    let cfg = &layered.config;
    let t = &plan.topology;
    for (key, origin) in layered.origins.iter().filter(|(_, o)| **o != Origin::Default) {
        tracing::debug!(key, %origin, "setting taken");
    }

    // Before NCCL, and before any thread that might read the environment starts.
    device::set_nccl_socket_ifname(plan.nccl_socket_ifname(), env.get("NCCL_SOCKET_IFNAME"));
    // Rendezvous first: a rank whose data fails to open then ends the job at once instead of leaving the others
    // waiting for it at the rendezvous.
    let membership = crate::membership(plan);
    // The ring's store stays at hand: a GPU job hands NCCL's unique id through it. Under mpirun (built with MPI)
    // there is no store.
    let (comm, store): (Box<dyn Collective>, Option<Store>) =
        if crate::launched_by_mpirun(plan) && cfg!(feature = "mpi") {
            let comm = crate::comm::init(&membership, true, &args.comm).context("cannot join the other ranks")?;
            (comm, None)
        } else {
            let store = Store::rendezvous(&membership, &args.comm).context("cannot join the other ranks")?;
            let comm = crate::comm::connect(&store, &membership, &args.comm).context("cannot join the other ranks")?;
            (comm, Some(store))
        };
    let mut comm: Box<dyn Collective> = Box::new(Recorded::new(comm, recorder.clone()));
    // From here on a lost rank ends this one too, and this rank failing ends the others.
    let watchdog = crate::watchdog::Watchdog::start(comm.liveness(), plan.paths.failure_file.clone(), recorder.clone());
    let device = device::select(job.device, t.local_rank, env.get("CUDA_VISIBLE_DEVICES"))?;
    check_backend(&cfg.backend, device, crate::launched_by_mpirun(plan))?;
    let options = super::data::open_options(plan, job.s3_endpoint.clone(), job.s3_region.clone());
    let train_spec = training_spec(plan, &job)?;
    check_pipe_readers(plan, &job, &train_spec)?;
    let tokens = token_options(&job)?;
    let mut counts = HostCounts {
        // Alone on its host, a process has nobody to hand its counts to.
        store: store.as_ref().filter(|_| t.local_world_size > 1),
        node_rank: t.node_rank,
        local_rank: t.local_rank,
        opened: 0,
    };
    let index = pipe_index(plan, &job, &train_spec)?;
    let mut train_options = options.clone();
    train_options.pipe.shard_sizes = index.as_ref().map(|i| i.shards.iter().map(|e| e.bytes).collect());
    let counts_given = index.filter(|_| !job.skip_bad_samples);
    let train_set =
        open_dataset(&train_spec, &train_options, Split::Train, &job, &tokens, &mut counts, counts_given.as_ref())
            .with_context(|| format!("cannot read the training data {train_spec}"))?;
    let sharded_by_host = train_set.source().already_sharded_by_host();
    let eval = validation_dataset(plan, &job, &train_spec, &options, &tokens, &mut counts)?;
    if t.local_rank == 0 {
        let mut sets = vec![(&train_set, train_spec.as_str())];
        sets.extend(eval.iter().map(|(ds, spec)| (ds, spec.as_str())));
        keep_counts(plan, &job, &train_spec, &sets);
    }
    let train_set = Arc::new(train_set);
    let eval_window = eval.as_ref().and_then(|(_, spec)| stream_window(plan, &job, spec));
    let eval_set = eval.map(|(ds, _)| Arc::new(ds));

    let (rank, world_size) =
        SamplerConfig::ranks_for(sharded_by_host, t.rank, t.world_size, t.local_rank, t.local_world_size);
    let mut max_samples = job.max_samples;
    if sharded_by_host && t.world_size > 1 {
        // Each host holds its own part; every rank must still take the same number of steps.
        let per_rank = train_set.len() / world_size;
        let fewest = min_over_ranks(comm.as_mut(), per_rank)? * world_size;
        max_samples = Some(max_samples.map_or(fewest, |m| m.min(fewest)));
    }
    let mut loader = LoaderConfig { batch_size: cfg.batch_size, ..LoaderConfig::default() };
    if let Some(workers) = job.workers {
        loader.workers = workers.max(1);
    }
    loader.transform = Transform {
        augment: job.augment,
        normalize: job.normalize.clone(),
        resize: job.resize,
        crop: job.crop,
        crop_padding: job.crop_padding,
        ..Transform::default()
    };
    loader.sampler = SamplerConfig {
        seed: cfg.seed,
        world_size,
        rank,
        remainder: if job.drop_last { Remainder::Drop } else { Remainder::Pad },
        max_samples,
        stream_window: stream_window(plan, &job, &train_spec),
        ..SamplerConfig::default()
    };
    let mut train = LoaderBatches::training(Loader::new(train_set.clone(), loader.clone())?, cfg.batch_size);
    let mut eval = match &eval_set {
        Some(set) => {
            let config = LoaderConfig {
                batch_size: cfg.test_batch_size,
                // Whatever caps training (--max-samples, a ShardedByS3Key host's minimum), validation counts
                // every sample once.
                sampler: SamplerConfig {
                    rank: t.rank,
                    world_size: t.world_size,
                    max_samples: None,
                    stream_window: eval_window,
                    ..loader.sampler.clone()
                },
                ..loader.clone()
            };
            Some(LoaderBatches::evaluation(set.clone(), config)?)
        }
        None => {
            tracing::info!("no validation data (give --validation SOURCE): the run reports training loss only");
            None
        }
    };

    let input_shape = first_input_shape(&mut train)?;
    let data_spec = if train_set.format() == Format::Tokens {
        let image_flags = [
            ("--augment", job.augment),
            ("--normalize", job.normalize != Normalize::default()),
            ("--resize", job.resize.is_some()),
            ("--crop", job.crop.is_some()),
        ];
        let given: Vec<&str> = image_flags.iter().filter(|(_, on)| *on).map(|(flag, _)| *flag).collect();
        if !given.is_empty() {
            bail!(
                "{} holds token ids, which {} would not change (they transform images); drop {}",
                train_set.source_desc(),
                given.join(", "),
                if given.len() == 1 { "it" } else { "them" }
            );
        }
        DataSpec { num_classes: job.num_classes, ..DataSpec::tokens(input_shape[0]) }
    } else {
        let num_classes = match (job.num_classes, train_set.classes()) {
            (Some(n), _) => n,
            (None, Some(classes)) => classes.len() as i64,
            (None, None) => bail!(
                "{} names no classes (no classes.json beside its shards); give --num-classes N",
                train_set.source_desc()
            ),
        };
        DataSpec::classes(&input_shape, num_classes)
    };
    tch::manual_seed(cfg.seed as i64);
    let net = model::build_for(&job.model, &data_spec, device)?;
    let mut ddp = Ddp::new(net, comm, cfg.ddp_options())?;
    if let tch::Device::Cuda(ordinal) = device {
        let nccl = device::nccl_collective(store.as_ref(), ddp.collective(), ordinal, args.comm.collective_timeout)
            .context("cannot start the NCCL backend")?;
        let side = if cfg.overlap {
            Some(device::side_stream(ordinal).context("cannot overlap gradient allreduces with backward")?)
        } else {
            None
        };
        ddp = ddp.with_device_collective(Box::new(nccl), side)?;
    }
    let mut optimizer = ddp.build_optimizer(&cfg.optimizer_config())?;
    let steps_per_epoch = crate::train::BatchSource::batches_per_epoch(&train) / cfg.grad_accum as u64;
    let schedule = cfg.schedule_for(cfg.total_steps(steps_per_epoch))?;
    if t.rank == 0 {
        tracing::info!(
            model = %job.model,
            data = %train_spec,
            samples = train_set.len(),
            validation = eval_set.as_ref().map_or(0, |s| s.len()),
            batch_size = cfg.batch_size,
            world_size = t.world_size,
            steps_per_epoch,
            "training"
        );
    }
    let paths = RunPaths {
        checkpoint_dir: match &job.checkpoint_dir {
            Some(dir) if dir.as_os_str() == "none" => None,
            Some(dir) => Some(dir.clone()),
            None => plan.paths.checkpoint_dir.clone(),
        },
        model_dir: job.model_dir.clone().or_else(|| Some(plan.paths.model_dir.clone())),
        output_dir: Some(output_dir),
        s3: options.s3.clone(),
    };
    let mut summary = Trainer::new().run(
        &mut ddp,
        optimizer.as_mut(),
        &schedule,
        cfg,
        &mut train,
        eval.as_mut().map(|e| e as &mut dyn crate::train::BatchSource),
        &paths,
        stop,
    )?;
    watchdog.finish();
    if let (Some(dir), false) = (&summary.exported_to, train_set.format() == Format::Tokens) {
        // Inference must repeat what validation did to each image; the model folder says what that was.
        let channels = input_shape.first().copied().unwrap_or(0) as usize;
        match loader.transform.record(channels) {
            Ok(transform) => crate::train::export::record_extra(dir, "transform", transform)
                .context("cannot record the data transforms in the exported metadata.json")?,
            // Inputs that are tensors, not images, of a channel count no normalization covers: nothing to repeat.
            Err(e) => tracing::warn!("no data transforms recorded in metadata.json: {e}"),
        }
    }
    let model_url = paths.model_dir.as_ref().and_then(|d| d.to_str()).filter(|d| d.starts_with("s3://"));
    if let (Some(url), Some(local)) = (model_url, summary.exported_to.clone()) {
        crate::train::export::upload(&local, url, &paths.s3)
            .with_context(|| format!("cannot upload the model to {url}"))?;
        let _ = std::fs::remove_dir_all(&local);
        summary.exported_to = Some(PathBuf::from(url));
    }
    Ok(summary)
}

/// The shape of one input sample, read from the first training batch.
fn first_input_shape(train: &mut LoaderBatches) -> anyhow::Result<Vec<i64>> {
    let mut batches = crate::train::BatchSource::epoch(train, 0, 0)
        .map_err(|e| anyhow::anyhow!("cannot read the first training batch: {e}"))?;
    match batches.next() {
        Some(Ok((xs, _))) => Ok(xs.size()[1..].to_vec()),
        Some(Err(e)) => bail!("cannot read the first training batch: {e}"),
        None => bail!("the training data yields no batch"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hyperparameters(pairs: &[(&str, &str)]) -> Vec<(Origin, String, String)> {
        pairs.iter().map(|(k, v)| (Origin::SageMakerHyperparameters, k.to_string(), format!("\"{v}\""))).collect()
    }

    #[test]
    fn image_transforms_come_from_hyperparameters_and_flags_win() {
        let hp = hyperparameters(&[
            ("normalize", "0.5,0.5,0.5/0.2,0.2,0.2"),
            ("resize", "256"),
            ("crop-size", "224"),
            ("crop_padding", "0"),
        ]);
        let job = Job::settle(&JobFlags::default(), &hp).unwrap();
        assert_eq!(job.normalize, Normalize::MeanStd { mean: vec![0.5; 3], std: vec![0.2; 3] });
        assert_eq!((job.resize, job.crop, job.crop_padding), (Some(256), Some(224), 0));
        let flags = JobFlags { normalize: Some("none".into()), crop: Some("200".into()), ..JobFlags::default() };
        let job = Job::settle(&flags, &hp).unwrap();
        assert_eq!((job.normalize, job.crop), (Normalize::Off, Some(200)));
        let job = Job::settle(&JobFlags::default(), &[]).unwrap();
        assert_eq!(
            (job.normalize, job.resize, job.crop, job.crop_padding),
            (Normalize::Auto, None, None, 4),
            "the reference's transforms when nothing is said"
        );
    }

    #[test]
    fn bad_image_transforms_from_hyperparameters_are_refused_naming_them() {
        let refused = |key: &str, value: &str| {
            Job::settle(&JobFlags::default(), &hyperparameters(&[(key, value)])).unwrap_err().to_string()
        };
        let e = refused("normalize", "imagenet");
        assert!(e.contains("normalize (from") && e.contains("MEAN,MEAN,MEAN/STD,STD,STD"), "{e}");
        let e = refused("resize", "0");
        assert!(e.contains("resize (from") && e.contains("at least 1"), "{e}");
        let e = refused("crop", "big");
        assert!(e.contains("crop (from") && e.contains("whole number"), "{e}");
    }

    #[test]
    fn a_pipe_channel_streams_unless_told_otherwise_and_bad_windows_are_refused() {
        let plan = crate::cluster::detect_from(&crate::cluster::Env::from_pairs([("HOSTNAME", "laptop")])).unwrap();
        let job = Job::settle(&JobFlags::default(), &[]).unwrap();
        assert_eq!(stream_window(&plan, &job, "pipe:/opt/ml/input/data/training"), Some(DEFAULT_STREAM_WINDOW));
        assert_eq!(stream_window(&plan, &job, "/mnt/efs/cifar10"), None);
        assert_eq!(stream_window(&plan, &job, "s3://bucket/cifar10"), None);
        let job = Job::settle(&JobFlags::default(), &hyperparameters(&[("stream_window", "4")])).unwrap();
        assert_eq!(stream_window(&plan, &job, "s3://bucket/cifar10"), Some(4));
        let flags = JobFlags { stream_window: Some("off".into()), ..JobFlags::default() };
        let job = Job::settle(&flags, &hyperparameters(&[("stream_window", "4")])).unwrap();
        assert_eq!(stream_window(&plan, &job, "pipe:/opt/ml/input/data/training"), None, "the flag wins");
        for bad in ["0", "-1", "many"] {
            let e = Job::settle(&JobFlags::default(), &hyperparameters(&[("stream_window", bad)])).unwrap_err();
            let e = e.to_string();
            assert!(e.contains("stream_window (from") && e.contains("at least 1") && e.contains("off"), "{e}");
        }
    }
}
