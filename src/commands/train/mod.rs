//! `hytrain train`: the main job. Layers the configuration (flags, `HYTRAIN_*`, SageMaker hyperparameters), joins
//! the other ranks, opens the training and validation data through the data plane, builds the model and runs
//! [`Trainer`](crate::train::Trainer) until done or stopped by SIGTERM/SIGINT.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{Arg, ArgMatches};

use super::device::{self, DeviceRequest};
use crate::cluster::Plan;
use crate::comm::recorder::{FlightRecorder, Recorded};
use crate::comm::{Collective, CommOptions, ReduceOp};
use crate::data::augment::{Normalize, Transform};
use crate::data::{Format, Loader, LoaderConfig, Remainder, SamplerConfig, Split, TokenDtype};
use crate::train::config::{self, ConfigSources, Layered, Origin};
use crate::train::elastic::CatchUp;
use crate::train::model::{self, DataSpec};
use crate::train::{Ddp, LoaderBatches, RunPaths, Summary, Trainer};

mod carry_on;
mod sources;

use carry_on::Engine;
pub use carry_on::Rejoin;
use sources::*;

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
    /// Log the digest of the batches trained.
    pub digest_trained: Option<String>,
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
    ("digest_trained", &["digest_trained"]),
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
    /// How to be admitted again when the job's node count is a range (`--nnodes MIN:MAX`): the ranks left after
    /// a loss then carry on in memory.
    pub rejoin: Option<Rejoin>,
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
    digest_trained: bool,
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
            digest_trained: switch("digest_trained", &flags.digest_trained)?,
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

/// What `hytrain train` did on this rank.
#[derive(Debug)]
pub struct Finished {
    /// The run's summary.
    pub summary: Summary,
    /// This process's global rank at the end: another than it began with when the job's ranks changed.
    pub rank: usize,
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
) -> anyhow::Result<Finished> {
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
    let device = device::select(job.device, t.local_rank, env.get("CUDA_VISIBLE_DEVICES"))?;
    let checkpoint_dir = match &job.checkpoint_dir {
        Some(dir) if dir.as_os_str() == "none" => None,
        Some(dir) => Some(dir.clone()),
        None => plan.paths.checkpoint_dir.clone(),
    };
    let elastic = carry_on::elastic(plan, args, cfg, device, checkpoint_dir.is_some());
    let (comm, store) = carry_on::join(plan, args)?;
    let mut comm: Box<dyn Collective> = Box::new(Recorded::new(comm, recorder.clone()));
    // From here on a lost rank ends this one too (unless the ranks left carry on), and this rank failing ends
    // the others.
    let watchdog = crate::watchdog::Watchdog::start(
        comm.liveness(),
        plan.paths.failure_file.clone(),
        recorder.clone(),
        elastic.is_some(),
    );
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
    if job.digest_trained {
        // From here on: the batch just read to learn the shape is read again by the first step.
        train = train.digesting();
    }
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
    let steps_per_epoch = crate::train::BatchSource::batches_per_epoch(&train) / cfg.grad_accum as u64;
    let mut schedule = cfg.schedule_for(cfg.total_steps(steps_per_epoch))?;
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
        checkpoint_dir,
        model_dir: job.model_dir.clone().or_else(|| Some(plan.paths.model_dir.clone())),
        output_dir: Some(output_dir),
        s3: options.s3.clone(),
    };
    let mut trainer = Trainer::new();
    let optimizer = ddp.build_optimizer(&cfg.optimizer_config())?;
    let mut engine = Engine { ddp, optimizer, store, watchdog };
    // The settings each run goes by: a sharded job that carries on reloads its checkpoint even if it began with
    // --no-resume.
    let mut run_cfg = cfg.clone();
    if elastic.is_some() {
        // A node that joins a job in progress takes its state from global rank 0, or its checkpoint.
        match crate::train::elastic::catch_up(&mut engine.ddp, engine.optimizer.as_mut(), None, cfg.batch_size)? {
            CatchUp::Fresh => {}
            CatchUp::Continue(start) => {
                tracing::info!(
                    step = start.step,
                    epoch = start.epoch + 1,
                    regroup = %start.regroup.as_ref().map_or_else(String::new, |r| carry_on::regroup_text(r, cfg.batch_size)),
                    "joining the job in progress, from rank 0's state"
                );
                trainer.continue_at(start);
            }
            CatchUp::FromCheckpoint => {
                tracing::info!("joining the job in progress, from its last checkpoint (--shard {})", cfg.shard);
                run_cfg.no_resume = false;
            }
        }
        trainer.watch_for_joiners(carry_on::joiners_watch(plan, engine.store.as_ref()));
    }
    // Changes of ranks this process carried on through, and the step the last round began at.
    let (mut changes, mut round_from) = (0, None::<u64>);
    let mut summary = loop {
        let result = trainer.run(
            &mut engine.ddp,
            engine.optimizer.as_mut(),
            &schedule,
            &run_cfg,
            &mut train,
            eval.as_mut().map(|e| e as &mut dyn crate::train::BatchSource),
            &paths,
            stop,
        );
        let error = match result {
            Ok(summary) => break summary,
            Err(error) => error,
        };
        let Some(rejoin) = &elastic else {
            return Err(error.into());
        };
        let progress = trainer.progress().clone();
        let range = rejoin.plan.nnodes_range.map_or_else(String::new, |r| r.to_string());
        let why = if let crate::train::TrainError::NodesWaiting { step } = &error {
            tracing::info!("nodes wait to join (--nnodes {range}): making room for them after step {step}");
            carry_on::Why::Joiners
        } else if let Some(lost) = carry_on::lost_rank(&mut engine.ddp) {
            let local = plan.topology.local_world_size;
            if carry_on::of_this_node(&lost, engine.ddp.rank(), local) {
                return Err(anyhow::Error::new(error).context(format!(
                    "{lost}, a process of this node (--nnodes {range}, {local} processes per node): the node leaves \
                     the job, which the others carry on; hytrain launch --max-restarts starts its processes again, \
                     and they join it as a new node"
                )));
            }
            if lost.store {
                // Every rank is alive: they wait for the store to come back at its address (the Deployment
                // restarting its pod), within the rendezvous timeout, and meet again there.
                tracing::warn!(
                    "{lost}; waiting for it to come back at the same address (a restarted `hytrain rendezvous`) for \
                     up to the rendezvous timeout, then the ranks meet again and carry on (--nnodes {range}): step {} \
                     of epoch {} was in flight ({error})",
                    progress.step + 1,
                    progress.epoch + 1
                );
            } else {
                tracing::warn!(
                    "{lost}; carrying on without it (--nnodes {range}): step {} of epoch {} was in flight ({error})",
                    progress.step + 1,
                    progress.epoch + 1
                );
            }
            carry_on::Why::Lost
        } else {
            return Err(error.into());
        };
        let (old_rank, old_world) = (engine.ddp.rank(), engine.ddp.world_size());
        carry_on::log_trained_digest(&mut train, old_rank, old_world);
        let (next, plan, caught_up) = carry_on::rejoin(engine, why, &trainer, rejoin, args, cfg, recorder)?;
        engine = next;
        trainer.watch_for_joiners(carry_on::joiners_watch(&plan, engine.store.as_ref()));
        // The data: the rest of the epoch shared among the ranks left (the run applies the regroup), then whole
        // epochs at their number.
        let t = &plan.topology;
        let (rank, world_size) =
            SamplerConfig::ranks_for(sharded_by_host, t.rank, t.world_size, t.local_rank, t.local_world_size);
        train.rejoin(rank, world_size).context("cannot share the training data among the ranks left")?;
        if let Some(eval) = eval.as_mut() {
            eval.rejoin(t.rank, t.world_size).context("cannot share the validation data among the ranks left")?;
        }
        changes += 1;
        match caught_up {
            // The run continues rank 0's learning-rate plan over what is left (`Start::lr`).
            CatchUp::Continue(start) => {
                tracing::warn!(
                    rank = t.rank,
                    was = old_rank,
                    world_size = t.world_size,
                    was_world_size = old_world,
                    step = start.step,
                    epoch = start.epoch + 1,
                    regroup = %start.regroup.as_ref().map_or_else(String::new, |r| carry_on::regroup_text(r, cfg.batch_size)),
                    "continuing with the ranks of the new round, from rank 0's state"
                );
                round_from = Some(start.step);
                trainer.continue_at(start);
            }
            CatchUp::FromCheckpoint | CatchUp::Fresh => {
                tracing::warn!(
                    rank = t.rank,
                    was = old_rank,
                    world_size = t.world_size,
                    was_world_size = old_world,
                    "continuing with the ranks of the new round, from the job's last checkpoint (--shard {}: each \
                     rank held only its part of the optimizer state)",
                    cfg.shard
                );
                // As a restarted job would, and as a node that joins does.
                let steps_per_epoch = crate::train::BatchSource::batches_per_epoch(&train) / cfg.grad_accum as u64;
                schedule = cfg.schedule_for(cfg.total_steps(steps_per_epoch))?;
                run_cfg.no_resume = false;
                round_from = None;
            }
        }
    };
    if changes > 0 {
        let from = round_from.map_or_else(|| "the job's last checkpoint".to_string(), |s| format!("step {s}"));
        tracing::info!(
            "the job's ranks changed {changes} time(s) while this process trained: the summary's samples, rates and \
             times are those of the last round, {} rank(s) from {from}",
            engine.ddp.world_size()
        );
    }
    carry_on::log_trained_digest(&mut train, engine.ddp.rank(), engine.ddp.world_size());
    engine.watchdog.finish();
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
    Ok(Finished { summary, rank: engine.ddp.rank() })
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
        assert_eq!(
            stream_window(&plan, &job, "pipe:/opt/ml/input/data/training"),
            Some(crate::data::DEFAULT_STREAM_WINDOW)
        );
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
