//! The `hytrain` binary: one worker artifact for Kubeflow, SageMaker, torchrun, mpirun and laptops.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use hytrain::cluster::{self, Env};
use hytrain::comm::recorder::FlightRecorder;
use hytrain::comm::CommOptions;
use hytrain::commands::{
    checkpoint, data, doctor, explain, launch, parse_deadline, parse_seconds, parse_size, rendezvous, train,
};

#[derive(Parser)]
#[command(name = "hytrain", version, about = "Data-parallel training on libtorch for Kubeflow, SageMaker and laptops")]
struct Cli {
    /// Log level when RUST_LOG is not set (error, warn, info, debug, trace).
    #[arg(long, global = true, env = "HYTRAIN_LOG_LEVEL", default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

/// `hytrain train`'s flags: the job's (data, paths), the training configuration's, the collectives'.
#[derive(Args)]
struct TrainCommand {
    #[command(flatten)]
    job: TrainJobArgs,
    #[command(flatten)]
    config: train::ConfigFlags,
    #[command(flatten)]
    comm: CommArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Print what hytrain detected: platform, launcher, ranks, master, paths, hyperparameters.
    Explain {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Start one worker per slot on this node, like torchrun: hytrain launch --nproc-per-node N -- CMD [ARGS...]
    Launch {
        /// Workers on this node: a number, or `auto` (the platform's setting, else one per visible GPU, else one
        /// per CPU).
        #[arg(long, default_value = "auto", env = "HYTRAIN_NPROC_PER_NODE")]
        nproc_per_node: launch::NprocPerNode,
        /// Master port for the workers' rendezvous (default: the platform's; a free port on a single local node).
        #[arg(long)]
        master_port: Option<u16>,
        /// Seconds workers get after a forwarded SIGTERM/SIGINT before SIGKILL (SageMaker allows 120 in all).
        #[arg(long, default_value = "100", value_parser = parse_seconds)]
        signal_grace: Duration,
        /// Seconds the other workers get to exit after one worker fails, before SIGKILL.
        #[arg(long, default_value = "5", value_parser = parse_seconds)]
        failure_grace: Duration,
        /// Times to start every worker of this node again after one fails, as torchrun's --max-restarts (a
        /// training job rejoins and resumes from its last checkpoint) [default: Kubeflow's PET_MAX_RESTARTS, else 0].
        #[arg(long, env = "HYTRAIN_MAX_RESTARTS")]
        max_restarts: Option<usize>,
        /// The worker command.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Check that every rank reaches every other and that collectives are exact; measure allreduce bandwidth.
    Doctor {
        /// Allreduce sizes to measure, comma-separated (e.g. 1MiB,64MiB).
        #[arg(long, value_delimiter = ',', default_value = "1MiB,16MiB,64MiB", value_parser = parse_size)]
        sizes: Vec<usize>,
        /// Timed iterations per size (0: chosen by size).
        #[arg(long, default_value_t = 0)]
        iters: usize,
        /// One JSON object on stdout (rank 0) instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        comm: CommArgs,
    },
    /// Train a model data-parallel: every rank runs this (under `hytrain launch`, torchrun, Kubeflow or SageMaker).
    ///
    /// Every training flag can also come from `HYTRAIN_<FLAG>` (HYTRAIN_BATCH_SIZE), SageMaker hyperparameters or
    /// SM_HP_<FLAG>; precedence: flag > HYTRAIN_* > hyperparameters.json > SM_HP_* > default.
    // Boxed: the training flags outweigh every other command's (clippy::large_enum_variant).
    Train(Box<TrainCommand>),
    /// Datasets: pack into shards, inspect, digest the exact batches a rank would see.
    #[command(subcommand)]
    Data(DataCommand),
    /// Checkpoints: consolidate a sharded one into one file.
    #[command(subcommand)]
    Checkpoint(CheckpointCommand),
    /// Run the job's rendezvous store on its own (workers join it through --rendezvous-endpoint,
    /// HYTRAIN_RENDEZVOUS_ENDPOINT or PET_RDZV_ENDPOINT), so that losing any worker, rank 0 included, leaves it
    /// standing; it serves run after run of the job until SIGTERM or SIGINT. The job token comes from the same
    /// variables as the workers' (HYTRAIN_JOB_TOKEN, HYTRAIN_JOB_TOKEN_FILE, TRAINING_JOB_ARN, or the run id
    /// TORCHELASTIC_RUN_ID, PET_RDZV_ID, TRAINING_JOB_NAME).
    Rendezvous(rendezvous::RendezvousArgs),
    /// Read the ranks' flight recorder dumps after a hang or a loss (`rank-N.json`, written to `flight-recorder/`
    /// in the output folder) and name the collective each rank was in and the rank that was behind.
    FlightRecorder {
        /// The folder of dumps, or the output folder that holds `flight-recorder/`.
        dir: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum CheckpointCommand {
    /// Write a checkpoint (sharded by --shard or not) as one safetensors file: the model's tensors under their
    /// names and the per-parameter optimizer state under `optimizer.` (`optimizer.fc.weight.exp_avg`).
    Consolidate {
        /// The checkpoint folder or s3://bucket/prefix the run wrote (its --checkpoint-dir).
        #[arg(long)]
        checkpoint_dir: std::path::PathBuf,
        /// The step to consolidate (default: the newest valid checkpoint).
        #[arg(long)]
        step: Option<u64>,
        /// The safetensors file to write.
        #[arg(long)]
        out: std::path::PathBuf,
        /// S3-compatible endpoint URL for an s3:// --checkpoint-dir (MinIO, LocalStack).
        #[arg(long, env = "HYTRAIN_S3_ENDPOINT")]
        s3_endpoint: Option<String>,
        /// AWS region for an s3:// --checkpoint-dir.
        #[arg(long, env = "HYTRAIN_S3_REGION")]
        s3_region: Option<String>,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// One SHA-256 per rank of the exact batch stream (inputs and labels) that rank would train on.
    Digest(Box<DigestCommand>),
    /// Convert CIFAR-10, MNIST or an image-folder tree into WebDataset tar shards.
    Pack {
        #[command(flatten)]
        source: SourceArgs,
        /// Output folder for the shards.
        #[arg(long)]
        out: std::path::PathBuf,
        /// The input is a tree of images, one folder per class.
        #[arg(long)]
        image_folder: bool,
        /// Target shard size.
        #[arg(long, default_value = "64MiB", value_parser = parse_size)]
        shard_size: usize,
        /// Leave out samples that do not decode (counted) instead of failing.
        #[arg(long)]
        skip_bad_samples: bool,
    },
    /// Samples, classes and shard sizes of any source.
    Inspect {
        #[command(flatten)]
        source: SourceArgs,
        #[command(flatten)]
        tokens: TokenArgs,
    },
}

/// `hytrain data digest`'s flags.
#[derive(clap::Args)]
struct DigestCommand {
    #[command(flatten)]
    source: SourceArgs,
    /// Ranks in the job.
    #[arg(long, default_value_t = 1)]
    world_size: usize,
    /// The rank to digest (default: every rank).
    #[arg(long)]
    rank: Option<usize>,
    /// Epochs, from --first-epoch.
    #[arg(long, default_value_t = 1)]
    epochs: u64,
    /// The first epoch digested, from 1 (a job that carried on after its ranks changed digests from the epoch
    /// of the change).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    first_epoch: u64,
    /// Samples per batch per rank.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Seed of shuffling and augmentation.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Apply the training augmentation (random crop with --crop-padding, horizontal flip).
    #[arg(long)]
    augment: bool,
    #[command(flatten)]
    transform: TransformArgs,
    /// train or test.
    #[arg(long, default_value = "train", value_parser = data::parse_split)]
    split: hytrain::data::Split,
    /// Drop the samples that do not divide evenly among ranks instead of padding with repeats.
    #[arg(long)]
    drop_last: bool,
    /// At most this many samples per epoch.
    #[arg(long)]
    max_samples: Option<usize>,
    /// Streaming order, as training uses for a Pipe channel: shards shuffled within a window of N, ranks
    /// interleaved; `off` shuffles all shards [default: off].
    #[arg(long, value_name = "N|off")]
    stream_window: Option<String>,
    /// An epoch whose ranks changed part-way, as a job that lost a rank and carried on read it: EPOCH:WxB
    /// says W ranks read B batches each of that epoch (from 1, as the training log counts) before
    /// --world-size ranks shared the rest (more sets of earlier readers follow with commas: 1:4x5,3x2).
    #[arg(long, value_name = "EPOCH:WxB[,WxB]")]
    regroup: Option<String>,
    /// Skip samples that do not decode (counted) instead of failing.
    #[arg(long)]
    skip_bad_samples: bool,
    #[command(flatten)]
    tokens: TokenArgs,
}

/// What happens to each image before the batch (`hytrain data digest`; `hytrain train` takes the same flags).
#[derive(Args)]
struct TransformArgs {
    /// Per-channel normalization after scaling to [0, 1]: auto (CIFAR-10's mean/std for 3 channels, MNIST's for
    /// 1), none, or MEAN,MEAN,MEAN/STD,STD,STD.
    #[arg(long, default_value = "auto", value_parser = parse_normalize)]
    normalize: hytrain::data::augment::Normalize,
    /// Resize each image's shorter side to N pixels, keeping its aspect ratio (bilinear, antialiased).
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    resize: Option<usize>,
    /// Crop to N x N after resizing: at random with --augment, in the center otherwise.
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    crop: Option<usize>,
    /// Zero padding on each side before the random crop of --augment.
    #[arg(long, value_name = "N", default_value_t = 4)]
    crop_padding: usize,
}

fn parse_normalize(text: &str) -> Result<hytrain::data::augment::Normalize, String> {
    text.parse()
}

fn parse_positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("must be a whole number, at least 1, got '{text}'")),
    }
}

/// How token data (.bin files of ids) is cut into samples.
#[derive(Args)]
struct TokenArgs {
    /// Token data: ids per sample (the model's sequence length).
    #[arg(long)]
    context_length: Option<usize>,
    /// Token data: how headerless .bin files store ids, uint16 (nanoGPT's) or uint32.
    #[arg(long, default_value = "uint16")]
    token_dtype: hytrain::data::TokenDtype,
}

#[derive(Args)]
struct SourceArgs {
    /// The dataset: a folder (EFS, FSx, a SageMaker File channel), s3://bucket/prefix, pipe:/path/stem or
    /// channel:NAME.
    #[arg(long)]
    data: String,
    /// An S3-compatible endpoint, e.g. http://127.0.0.1:9000 (path-style requests).
    #[arg(long, env = "HYTRAIN_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// The S3 region (default: the SDK's chain, else us-east-1).
    #[arg(long, env = "HYTRAIN_S3_REGION")]
    s3_region: Option<String>,
}

#[derive(Args)]
struct TrainJobArgs {
    /// lenet, resnet18, mlp, mlp:H1,H2 or a TorchScript file (path.pt) [default: lenet].
    #[arg(long, visible_alias = "model-type", env = "HYTRAIN_MODEL")]
    model: Option<String>,
    /// Training data: a folder (EFS, FSx, a SageMaker channel), s3://bucket/prefix, pipe:/path/stem or
    /// channel:NAME [default: the platform's train or training channel].
    #[arg(long, visible_alias = "data-dir", env = "HYTRAIN_DATA")]
    data: Option<String>,
    /// Validation data, or `none` [default: a validation/val/test channel, else the training data's test split].
    #[arg(long, env = "HYTRAIN_VALIDATION")]
    validation: Option<String>,
    /// The index.json `hytrain data pack` wrote for the shards a SageMaker Pipe channel delivers (which the channel
    /// cannot carry; e.g. from a small File channel): the first epoch then starts before the pass has arrived.
    #[arg(long, env = "HYTRAIN_DATA_INDEX")]
    data_index: Option<std::path::PathBuf>,
    /// Classes, when the dataset names none (no classes.json).
    #[arg(long, env = "HYTRAIN_NUM_CLASSES")]
    num_classes: Option<String>,
    /// Random crop (padding --crop-padding) and horizontal flip of training images.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", env = "HYTRAIN_AUGMENT")]
    augment: Option<String>,
    /// Per-channel normalization after scaling to [0, 1]: auto (CIFAR-10's mean/std for 3 channels, MNIST's for
    /// 1), none, or MEAN,MEAN,MEAN/STD,STD,STD [default: auto].
    #[arg(long, env = "HYTRAIN_NORMALIZE")]
    normalize: Option<String>,
    /// Resize each image's shorter side to N pixels, keeping its aspect ratio (bilinear, antialiased).
    #[arg(long, value_name = "N", env = "HYTRAIN_RESIZE")]
    resize: Option<String>,
    /// Crop to N x N after resizing: at random (--augment) in training, in the center for validation.
    #[arg(long, value_name = "N", env = "HYTRAIN_CROP")]
    crop: Option<String>,
    /// Zero padding on each side before the random crop of --augment [default: 4].
    #[arg(long, value_name = "N", allow_negative_numbers = true, env = "HYTRAIN_CROP_PADDING")]
    crop_padding: Option<String>,
    /// Drop the training samples that do not divide evenly among ranks instead of repeating some.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", env = "HYTRAIN_DROP_LAST")]
    drop_last: Option<String>,
    /// At most this many training samples per epoch, all ranks together.
    #[arg(long, env = "HYTRAIN_MAX_SAMPLES")]
    max_samples: Option<String>,
    /// Read the training data in streaming order: shards shuffled only within a window of N (as WebDataset's
    /// shardshuffle), ranks interleaved, so an epoch starts once its first shards arrive; `off` shuffles all
    /// shards [default: 16 for a SageMaker Pipe channel, else off].
    #[arg(long, value_name = "N|off", env = "HYTRAIN_STREAM_WINDOW")]
    stream_window: Option<String>,
    /// Skip (and count) samples that do not decode instead of failing.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", env = "HYTRAIN_SKIP_BAD_SAMPLES")]
    skip_bad_samples: Option<String>,
    /// Log the SHA-256 of the batch stream each rank trained on, as `hytrain data digest` computes it, when the
    /// run ends and whenever the job's ranks change: proof of what was trained.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", env = "HYTRAIN_DIGEST_TRAINED")]
    digest_trained: Option<String>,
    /// Decode threads per rank [default: the cores, at most 8].
    #[arg(long, env = "HYTRAIN_WORKERS")]
    workers: Option<String>,
    /// Where rank 0 exports the trained model: a folder or s3://bucket/prefix [default: SM_MODEL_DIR, else
    /// ./hytrain-out/model].
    #[arg(long, env = "HYTRAIN_MODEL_DIR")]
    model_dir: Option<std::path::PathBuf>,
    /// Checkpoints, written by rank 0 in the background and resumed from: a folder or s3://bucket/prefix; `none`
    /// for no checkpoints [default: SageMaker's checkpoint dir, else ./hytrain-out/checkpoints].
    #[arg(long, env = "HYTRAIN_CHECKPOINT_DIR")]
    checkpoint_dir: Option<std::path::PathBuf>,
    /// The folder metrics.jsonl goes to [default: SageMaker's output/data, else ./hytrain-out/output].
    #[arg(long, env = "HYTRAIN_OUTPUT_DIR")]
    output_dir: Option<std::path::PathBuf>,
    /// An S3-compatible endpoint, e.g. http://127.0.0.1:9000 (path-style requests).
    #[arg(long, env = "HYTRAIN_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// The S3 region (default: the SDK's chain, else us-east-1).
    #[arg(long, env = "HYTRAIN_S3_REGION")]
    s3_region: Option<String>,
    /// auto (a GPU when libtorch_cuda.so and a GPU are there, else the CPU), cpu or cuda; each process takes
    /// cuda:LOCAL_RANK and averages gradients with NCCL [default: auto].
    #[arg(long, env = "HYTRAIN_DEVICE")]
    device: Option<String>,
    /// Token data (.bin): ids per sample [default: the sequence length of an exported model that takes ids].
    #[arg(long, env = "HYTRAIN_CONTEXT_LENGTH")]
    context_length: Option<String>,
    /// Token data: how headerless .bin files store ids, uint16 (nanoGPT's) or uint32 [default: uint16].
    #[arg(long, env = "HYTRAIN_TOKEN_DTYPE")]
    token_dtype: Option<String>,
}

impl TrainJobArgs {
    fn flags(self) -> train::JobFlags {
        train::JobFlags {
            model: self.model,
            data: self.data,
            validation: self.validation,
            data_index: self.data_index,
            num_classes: self.num_classes,
            augment: self.augment,
            normalize: self.normalize,
            resize: self.resize,
            crop: self.crop,
            crop_padding: self.crop_padding,
            drop_last: self.drop_last,
            max_samples: self.max_samples,
            stream_window: self.stream_window,
            skip_bad_samples: self.skip_bad_samples,
            digest_trained: self.digest_trained,
            workers: self.workers,
            model_dir: self.model_dir,
            checkpoint_dir: self.checkpoint_dir,
            output_dir: self.output_dir,
            s3_endpoint: self.s3_endpoint,
            s3_region: self.s3_region,
            device: self.device,
            context_length: self.context_length,
            token_dtype: self.token_dtype,
        }
    }
}

#[derive(Args)]
struct CommArgs {
    /// Seconds to wait for all ranks to rendezvous (DNS of peers may take minutes to appear).
    #[arg(long, env = "HYTRAIN_RENDEZVOUS_TIMEOUT", default_value = "900", value_parser = parse_deadline)]
    rendezvous_timeout: Duration,
    /// Seconds a collective may wait on a silent peer before the job fails instead of hanging.
    #[arg(long, env = "HYTRAIN_COLLECTIVE_TIMEOUT", default_value = "300", value_parser = parse_deadline)]
    collective_timeout: Duration,
    /// Seconds without a heartbeat after which a rank counts as lost (stopped, hung or cut off); every rank then
    /// exits naming it. A rank that dies outright is noticed at once.
    #[arg(long, env = "HYTRAIN_PEER_TIMEOUT", default_value = "30", value_parser = parse_deadline)]
    peer_timeout: Duration,
    /// How ranks exchange data: auto (shared memory between the processes of a node, a ring between nodes),
    /// ring (TCP between all ranks) or shm (shared memory, failing at start-up if it cannot be set up).
    #[arg(long, env = "HYTRAIN_COMM_TRANSPORT", default_value = "auto")]
    comm_transport: hytrain::comm::Transport,
    /// HOST:PORT of a standalone rendezvous store (`hytrain rendezvous`) that every rank, rank 0 included, joins
    /// as a client, so that losing rank 0 no longer ends the job's view of its ranks [default:
    /// HYTRAIN_RENDEZVOUS_ENDPOINT, else Kubeflow's PET_RDZV_ENDPOINT, else rank 0 hosts the store].
    #[arg(long)]
    rendezvous_endpoint: Option<String>,
    /// Nodes in the job, N or MIN:MAX: the standalone store (--rendezvous-endpoint) admits nodes up to MAX, begins
    /// once MIN are in and the last call is over, and gives node ranks in the order nodes came; a node is one
    /// process, or the processes one `hytrain launch` starts [default: the platform's; Kubeflow's
    /// PET_NNODES=MIN:MAX works the same].
    #[arg(long)]
    nnodes: Option<String>,
    /// Seconds the store waits for more nodes once MIN are in (torchrun's last_call_timeout).
    #[arg(long, env = "HYTRAIN_LAST_CALL_TIMEOUT", default_value = "30", value_parser = parse_deadline)]
    last_call_timeout: Duration,
}

impl CommArgs {
    /// `plan` with the store --rendezvous-endpoint names and the node count --nnodes gives, when given, and with
    /// this node's rank from the store when the node count is a range. Tags the log lines with the rank.
    fn plan(&self, plan: &cluster::Plan) -> anyhow::Result<cluster::Plan> {
        let plan = self.before_admission(plan)?;
        let plan = rendezvous::admit(&plan, &self.options(&plan), self.last_call_timeout)?;
        let t = &plan.topology;
        hytrain::logging::set_rank(t.rank, t.world_size, &t.current_host);
        Ok(plan)
    }

    /// `plan` with the store --rendezvous-endpoint names and the node count --nnodes gives, when given.
    fn before_admission(&self, plan: &cluster::Plan) -> anyhow::Result<cluster::Plan> {
        let mut plan = plan.clone();
        if let Some(endpoint) = &self.rendezvous_endpoint {
            plan.rendezvous = cluster::Rendezvous::external("--rendezvous-endpoint", endpoint)?;
        }
        if let Some(nnodes) = &self.nnodes {
            plan.set_nnodes("--nnodes", nnodes)?;
        }
        if let (Some(range), Some(why)) = (plan.nnodes_range, plan.range_refusal()) {
            anyhow::bail!("PET_NNODES={range}: {why}");
        }
        Ok(plan)
    }

    fn options(&self, plan: &cluster::Plan) -> CommOptions {
        CommOptions {
            rendezvous_timeout: self.rendezvous_timeout,
            collective_timeout: self.collective_timeout,
            peer_timeout: self.peer_timeout,
            job_token: Some(plan.job_token.clone()),
            transport: self.comm_transport,
            external_store: plan.rendezvous.is_external(),
            ..CommOptions::default()
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    hytrain::logging::init(&cli.log_level);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            // The first line says what went wrong; the chain below it says where.
            eprintln!("hytrain: error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Writes `text` and a newline to stdout, in one write: the workers of one `hytrain launch` share its stdout, and
/// a text written in pieces (a multi-line JSON plan, then its last line) could interleave with another worker's (a
/// pipe keeps writes of up to 4 KiB whole). A reader that went away (`hytrain explain | head -1`) is no error: the
/// rest of the output is not wanted, as for any Unix tool (the process ignores SIGPIPE, so a write fails instead).
fn say(text: impl std::fmt::Display) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(format!("{text}\n").as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        written => written.context("cannot write to standard output"),
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    let env = Env::from_process();
    if let Command::Rendezvous(args) = &command {
        // The store is no worker: it has no plan of its own to detect.
        hytrain::logging::set_store(env.get("HOSTNAME").unwrap_or("localhost"));
        rendezvous::serve(&env, args)?;
        return Ok(ExitCode::SUCCESS);
    }
    let plan = match cluster::detect_from(&env) {
        Ok(plan) => plan,
        Err(e) => {
            if let Some(path) = cluster::failure_file(&env) {
                write_failure_reason(&path, &e);
            }
            return Err(e.into());
        }
    };
    let t = &plan.topology;
    match command {
        Command::Launch { .. } => hytrain::logging::set_node(t.node_rank, t.nnodes, &t.current_host),
        // Their rank may come from the store (`CommArgs::plan`).
        Command::Train(_) | Command::Doctor { .. } => {}
        _ => hytrain::logging::set_rank(t.rank, t.world_size, &t.current_host),
    }
    match command {
        Command::Explain { json } => {
            say(explain::render(&plan, &env, json))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Launch { nproc_per_node, master_port, signal_grace, failure_grace, max_restarts, command } => {
            let args =
                launch::LaunchArgs { nproc_per_node, master_port, signal_grace, failure_grace, max_restarts, command };
            let code = launch::run(&plan, &env, &args)?;
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
        Command::Doctor { sizes, iters, json, comm } => {
            let plan = comm.plan(&plan)?;
            let report = doctor::run(&plan, &doctor::DoctorArgs { sizes, iters, comm: comm.options(&plan) })?;
            if plan.topology.rank == 0 {
                if json {
                    say(serde_json::to_string(&report)?)?;
                } else {
                    say(&report)?;
                }
            }
            Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Train(train) => {
            let TrainCommand { job, config, comm } = *train;
            let detected = comm.before_admission(&plan)?;
            let plan = comm.plan(&plan)?;
            let rejoin = detected
                .nnodes_range
                .map(|_| train::Rejoin { plan: detected.clone(), last_call: comm.last_call_timeout });
            let args = train::TrainArgs { config, job: job.flags(), comm: comm.options(&plan), rejoin };
            run_train(&plan, &env, &args)
        }
        Command::Data(command) => run_data(&plan, command),
        Command::Rendezvous(_) => unreachable!("the store is served before any plan is detected"),
        Command::FlightRecorder { dir } => {
            let dir = if dir.join("flight-recorder").is_dir() { dir.join("flight-recorder") } else { dir };
            let dumps = hytrain::comm::recorder::read_dumps(&dir).map_err(anyhow::Error::msg)?;
            if dumps.is_empty() {
                anyhow::bail!(
                    "no flight recorder dumps (rank-N.json) in {}: give the folder `flight-recorder` inside the job's \
                     output folder (--output-dir; on SageMaker /opt/ml/output/data, in output.tar.gz)",
                    dir.display()
                );
            }
            say(hytrain::comm::recorder::diagnose(&dumps))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Checkpoint(CheckpointCommand::Consolidate { checkpoint_dir, step, out, s3_endpoint, s3_region }) => {
            let s3 = data::open_options(&plan, s3_endpoint, s3_region).s3;
            let args = checkpoint::ConsolidateArgs { checkpoint_dir, step, out, s3 };
            let done = checkpoint::consolidate(&args)?;
            say(format!(
                "consolidated step {} of {} into {}: {} model tensors, {} optimizer state entries, {} bytes",
                done.step,
                done.from.display(),
                args.out.display(),
                done.model,
                done.optimizer,
                done.bytes
            ))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs `hytrain train`; SIGTERM or SIGINT asks the ranks to checkpoint and stop together, a second SIGINT ends
/// the process at once. A stopped run exits 143 (SIGTERM's code), so Kubernetes' OnFailure restarts it and it
/// resumes.
///
/// The collectives' flight recorder is dumped (once) on the first of: a signal, a lost rank (by the watchdog), a
/// failed run that had reached the collectives.
fn run_train(plan: &cluster::Plan, env: &Env, args: &train::TrainArgs) -> anyhow::Result<ExitCode> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t = &plan.topology;
    let recorder = FlightRecorder::new(t.rank, t.world_size, hytrain::comm::recorder::DEFAULT_CAPACITY);
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, stop.clone())
            .context("cannot install the signal handler")?;
        signal_hook::flag::register(signal, stop.clone()).context("cannot install the signal handler")?;
    }
    dump_on_signals(&recorder)?;
    let result = train::run(plan, env, args, &stop, &recorder);
    let (summary, rank) = match result {
        Ok(finished) => (finished.summary, finished.rank),
        Err(e) => {
            if let Some(path) = &plan.paths.failure_file {
                write_failure_reason(path, &e);
            }
            if recorder.calls() > 0 {
                recorder.dump(&format!("failed: {e:#}"));
            }
            return Err(e);
        }
    };
    if rank == 0 {
        say(&summary)?;
        if let Some(dir) = &summary.exported_to {
            say(format!("model written to {}", dir.display()))?;
        }
    }
    if let (Some(failure), false) = (&plan.paths.failure_file, summary.stopped) {
        // Beside the failure file, as SageMaker's training toolkit does on every host that finished.
        let success = failure.with_file_name("success");
        std::fs::write(&success, "").with_context(|| format!("cannot write {}", success.display()))?;
    }
    Ok(if summary.stopped { ExitCode::from(143) } else { ExitCode::SUCCESS })
}

/// Dumps `recorder` when SIGTERM or SIGINT arrives, from a thread of its own: a rank stuck in a collective never
/// reaches the step boundary where the stop flag is read, and the platform's SIGKILL follows its grace period.
fn dump_on_signals(recorder: &FlightRecorder) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).context("cannot install the signal handler")?;
    let recorder = recorder.clone();
    std::thread::Builder::new()
        .name("hytrain-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let name = if signal == SIGTERM { "SIGTERM" } else { "SIGINT" };
                recorder.dump(&format!("{name} received"));
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// Writes why the job failed where SageMaker shows it (the first 1024 characters become the job's
/// FailureReason). Best effort: the error itself is still printed and sets the exit code.
fn write_failure_reason(path: &std::path::Path, error: &dyn std::fmt::Display) {
    let _ = std::fs::create_dir_all(path.parent().unwrap_or(std::path::Path::new(".")));
    let _ = std::fs::write(path, format!("{error:#}\n"));
}

fn run_data(plan: &cluster::Plan, command: DataCommand) -> anyhow::Result<ExitCode> {
    let open = |s: &SourceArgs| {
        let options = data::open_options(plan, s.s3_endpoint.clone(), s.s3_region.clone());
        hytrain::data::source::open(&s.data, &options).with_context(|| format!("cannot open {}", s.data))
    };
    match command {
        DataCommand::Digest(digest) => {
            let DigestCommand {
                source,
                world_size,
                rank,
                epochs,
                first_epoch,
                batch_size,
                seed,
                augment,
                transform,
                split,
                drop_last,
                max_samples,
                stream_window,
                regroup,
                skip_bad_samples,
                tokens,
            } = *digest;
            let regroup = match regroup {
                Some(text) => {
                    Some(data::parse_regroup(&text, batch_size).map_err(|e| anyhow::anyhow!("--regroup: {e}"))?)
                }
                None => None,
            };
            let options = data::open_options(plan, source.s3_endpoint.clone(), source.s3_region.clone());
            let args = hytrain::data::DigestArgs {
                world_size,
                epochs,
                first_epoch: first_epoch - 1,
                batch_size,
                seed,
                augment,
                normalize: transform.normalize,
                resize: transform.resize,
                crop: transform.crop,
                crop_padding: transform.crop_padding,
                split,
                remainder: data::remainder(drop_last),
                max_samples,
                stream_window: match stream_window {
                    Some(text) => {
                        data::parse_stream_window(&text).map_err(|e| anyhow::anyhow!("--stream-window: {e}"))?
                    }
                    None => None,
                },
                regroup,
                skip_bad_samples,
                context_length: tokens.context_length,
                token_dtype: tokens.token_dtype,
                ..hytrain::data::DigestArgs::default()
            };
            let request = data::DigestRequest { data: source.data.clone(), rank, args };
            for (rank, hex) in data::digest(&options, &request)? {
                say(format!("rank {rank}: {hex}"))?;
            }
        }
        DataCommand::Pack { source, out, image_folder, shard_size, skip_bad_samples } => {
            let report = hytrain::data::pack(
                open(&source)?,
                &data::pack_options(out, image_folder, shard_size, skip_bad_samples),
            )?;
            say(&report)?;
        }
        DataCommand::Inspect { source, tokens } => {
            let tokens = hytrain::data::TokenOptions {
                context_length: tokens.context_length,
                dtype: tokens.token_dtype,
                vocab_size: None,
            };
            say(hytrain::data::inspect(open(&source)?, &tokens)?)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
