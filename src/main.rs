//! The `hytrain` binary: one worker artifact for Kubeflow, SageMaker, torchrun, mpirun and laptops.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use hytrain::cluster::{self, Env};
use hytrain::commands::{doctor, explain, launch, parse_seconds, parse_size};
use hytrain::comm::CommOptions;

#[derive(Parser)]
#[command(name = "hytrain", version, about = "Data-parallel training on libtorch for Kubeflow, SageMaker and laptops")]
struct Cli {
    /// Log level when RUST_LOG is not set (error, warn, info, debug, trace).
    #[arg(long, global = true, env = "HYTRAIN_LOG_LEVEL", default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
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
        /// Workers on this node: a number, or `auto` (the platform's setting, else one per CPU).
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
}

#[derive(Args)]
struct CommArgs {
    /// Seconds to wait for all ranks to rendezvous (DNS of peers may take minutes to appear).
    #[arg(long, env = "HYTRAIN_RENDEZVOUS_TIMEOUT", default_value = "900", value_parser = parse_seconds)]
    rendezvous_timeout: Duration,
    /// Seconds a collective may wait on a silent peer before the job fails instead of hanging.
    #[arg(long, env = "HYTRAIN_COLLECTIVE_TIMEOUT", default_value = "300", value_parser = parse_seconds)]
    collective_timeout: Duration,
}

impl CommArgs {
    fn options(&self) -> CommOptions {
        CommOptions { rendezvous_timeout: self.rendezvous_timeout, collective_timeout: self.collective_timeout, ..CommOptions::default() }
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

fn run(command: Command) -> anyhow::Result<ExitCode> {
    let env = Env::from_process();
    let plan = cluster::detect_from(&env)?;
    let t = &plan.topology;
    match command {
        Command::Launch { .. } => hytrain::logging::set_node(t.node_rank, t.nnodes, &t.current_host),
        _ => hytrain::logging::set_rank(t.rank, t.world_size, &t.current_host),
    }
    match command {
        Command::Explain { json } => {
            println!("{}", explain::render(&plan, json));
            Ok(ExitCode::SUCCESS)
        }
        Command::Launch { nproc_per_node, master_port, signal_grace, failure_grace, command } => {
            let args = launch::LaunchArgs { nproc_per_node, master_port, signal_grace, failure_grace, command };
            let code = launch::run(&plan, &env, &args)?;
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
        Command::Doctor { sizes, iters, json, comm } => {
            let report = doctor::run(&plan, &doctor::DoctorArgs { sizes, iters, comm: comm.options() })?;
            if plan.topology.rank == 0 {
                if json {
                    println!("{}", serde_json::to_string(&report)?);
                } else {
                    println!("{report}");
                }
            }
            Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}
