//! `hytrain doctor`: can every rank of this job reach every other, do collectives compute the right thing, and how
//! fast is allreduce? Runs under any launcher, prints a table (or one JSON object) on rank 0, exits 0 only if every
//! check passed on every rank.

use std::fmt::Write as _;
use std::time::Instant;

use half::bf16;
use serde::Serialize;

use crate::cluster::Plan;
use crate::comm::{self, Buffer, Collective, CommOptions, ReduceOp};

/// Vector lengths whose allreduce results are checked element by element: empty, one, fewer than any world size
/// has ranks, and an odd length that splits unevenly into ring chunks.
pub const CHECKED_LENGTHS: [usize; 4] = [0, 1, 7, 1_000_003];

/// Options of `hytrain doctor`.
#[derive(Debug, Clone)]
pub struct DoctorArgs {
    /// Message sizes, in bytes, whose allreduce bandwidth is measured.
    pub sizes: Vec<usize>,
    /// Timed allreduces per size (after two warm-up rounds); 0 picks a count by size.
    pub iters: usize,
    /// Rendezvous and collective deadlines.
    pub comm: CommOptions,
}

/// Everything doctor found, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// True when every check passed on every rank.
    pub ok: bool,
    /// Collective backend in use (`ring`, `mpi`).
    pub backend: String,
    /// Ranks in the job.
    pub world_size: usize,
    /// Every rank as every rank saw it after the exchange.
    pub peers: Vec<Peer>,
    /// libtorch as loaded by this binary.
    pub libtorch: Libtorch,
    /// Element-wise checked allreduces.
    pub allreduce_checks: Vec<AllreduceCheck>,
    /// Whether a broadcast from the last rank arrived intact everywhere.
    pub broadcast_ok: bool,
    /// Measured bandwidth per collective and size (every allreduce row, then reduce_scatter, then allgather).
    pub sizes: Vec<Bandwidth>,
    /// Ranks on which at least one check failed.
    pub failed_ranks: Vec<usize>,
}

/// One rank of the job.
#[derive(Debug, Clone, Serialize)]
pub struct Peer {
    /// Global rank.
    pub rank: usize,
    /// Host it runs on.
    pub host: String,
    /// Its process id.
    pub pid: u32,
}

/// What this binary's libtorch reports.
#[derive(Debug, Clone, Serialize)]
pub struct Libtorch {
    /// Whether a small tensor computation gave the right answer.
    pub ok: bool,
    /// Whether libtorch sees a CUDA device.
    pub cuda_available: bool,
}

/// An allreduce whose every element was compared with the value it must have.
#[derive(Debug, Clone, Serialize)]
pub struct AllreduceCheck {
    /// `f32`, `f64` or `bf16`.
    pub dtype: &'static str,
    /// `sum` or `avg`.
    pub op: &'static str,
    /// Vector length.
    pub elements: usize,
    /// Whether every element matched on this rank.
    pub ok: bool,
    /// The first and last element after the allreduce (absent when empty), for outside verification.
    pub first: Option<f64>,
    /// See `first`.
    pub last: Option<f64>,
}

/// The collectives whose bandwidth doctor measures: the allreduce DDP runs, and the reduce-scatter and allgather
/// that sharded training (`--shard`) runs instead.
pub const MEASURED_OPS: [&str; 3] = ["allreduce", "reduce_scatter", "allgather"];

/// One collective's bandwidth at one size.
#[derive(Debug, Clone, Serialize)]
pub struct Bandwidth {
    /// The collective: `allreduce`, `reduce_scatter` or `allgather` (in place, one block per rank).
    pub op: &'static str,
    /// Size of the whole buffer in bytes (f32 elements; for reduce_scatter and allgather a multiple of the world
    /// size, each rank's block being 1/world of it).
    pub bytes: usize,
    /// Mean time of one call, averaged over ranks, in milliseconds.
    pub time_ms: f64,
    /// Algorithm bandwidth: bytes / time, GB/s (1e9).
    pub algbw_gbps: f64,
    /// Bus bandwidth, the figure comparable across world sizes, as nccl-tests report it: algbw * 2(n-1)/n for
    /// allreduce, algbw * (n-1)/n for reduce_scatter and allgather (each moves half of what an allreduce does).
    pub busbw_gbps: f64,
}

/// The value rank `rank` contributes at index `i`; small integers so every sum is exact, also in bf16.
fn contribution(i: usize, rank: usize, modulus: usize) -> f64 {
    ((i % modulus) + rank) as f64
}

/// What the sum over `world` ranks must be at index `i`.
pub fn expected_sum(i: usize, world: usize, modulus: usize) -> f64 {
    (world * (i % modulus) + world * (world - 1) / 2) as f64
}

/// The modulus used for each dtype: bf16 holds integers exactly only up to 256.
pub fn modulus(dtype: &str) -> usize {
    if dtype == "bf16" {
        16
    } else {
        251
    }
}

/// Runs every check and measurement. Errors are communication failures; failed checks are in the report.
pub fn run(plan: &Plan, args: &DoctorArgs) -> anyhow::Result<Report> {
    let membership = crate::membership(plan);
    let collective = comm::init(&membership, crate::launched_by_mpirun(plan), &args.comm)?;
    // A hang or a loss during the checks leaves its account on stderr (the doctor writes no files).
    let recorder =
        comm::recorder::FlightRecorder::new(membership.rank, membership.world_size, comm::recorder::DEFAULT_CAPACITY);
    let mut collective: Box<dyn comm::Collective> =
        Box::new(comm::recorder::Recorded::new(collective, recorder.clone()));
    let watchdog =
        crate::watchdog::Watchdog::start(collective.liveness(), plan.paths.failure_file.clone(), recorder, false);
    let (rank, world) = (collective.rank(), collective.world_size());
    tracing::info!("doctor: {} backend up with {world} ranks", collective.backend());

    let peers = exchange_peers(collective.as_mut(), &plan.topology.current_host)?;
    let peers_ok = peers.iter().enumerate().all(|(i, p)| p.rank == i);
    let libtorch = check_libtorch();
    let allreduce_checks = check_allreduce(collective.as_mut(), rank, world)?;
    let broadcast_ok = check_broadcast(collective.as_mut())?;
    let sizes = measure(collective.as_mut(), &args.sizes, args.iters)?;

    let mine_ok = peers_ok && libtorch.ok && broadcast_ok && allreduce_checks.iter().all(|c| c.ok);
    let mut failed = vec![0.0f64; world];
    failed[rank] = if mine_ok { 0.0 } else { 1.0 };
    collective.allreduce(Buffer::F64(&mut failed), ReduceOp::Sum)?;
    let failed_ranks: Vec<usize> = (0..world).filter(|&r| failed[r] != 0.0).collect();
    let backend = collective.backend().to_owned();
    drop(collective);
    watchdog.finish();
    Ok(Report {
        ok: failed_ranks.is_empty(),
        backend,
        world_size: world,
        peers,
        libtorch,
        allreduce_checks,
        broadcast_ok,
        sizes,
        failed_ranks,
    })
}

const HOST_BYTES: usize = 64;
const PEER_RECORD: usize = 8 + 4 + HOST_BYTES;

/// Every rank sends (rank, pid, host) to every other; the exchange itself proves each pair can talk.
fn exchange_peers(collective: &mut dyn Collective, host: &str) -> anyhow::Result<Vec<Peer>> {
    let mut record = [0u8; PEER_RECORD];
    record[..8].copy_from_slice(&(collective.rank() as u64).to_le_bytes());
    record[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    let host_bytes = host.as_bytes();
    let n = host_bytes.len().min(HOST_BYTES);
    record[12..12 + n].copy_from_slice(&host_bytes[..n]);
    let mut all = vec![0u8; PEER_RECORD * collective.world_size()];
    collective.allgather(&record, &mut all)?;
    Ok(all
        .chunks_exact(PEER_RECORD)
        .map(|r| {
            let host = &r[12..];
            let end = host.iter().position(|&b| b == 0).unwrap_or(HOST_BYTES);
            Peer {
                rank: u64::from_le_bytes(r[..8].try_into().expect("8 bytes")) as usize,
                pid: u32::from_le_bytes(r[8..12].try_into().expect("4 bytes")),
                host: String::from_utf8_lossy(&host[..end]).into_owned(),
            }
        })
        .collect())
}

fn check_libtorch() -> Libtorch {
    let sum = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.5]).sum(tch::Kind::Float);
    Libtorch { ok: f64::try_from(sum).is_ok_and(|s| s == 6.5), cuda_available: tch::Cuda::is_available() }
}

fn check_allreduce(collective: &mut dyn Collective, rank: usize, world: usize) -> anyhow::Result<Vec<AllreduceCheck>> {
    let mut checks = Vec::new();
    for &len in &CHECKED_LENGTHS {
        for op in [ReduceOp::Sum, ReduceOp::Avg] {
            let (op_name, scale) = match op {
                ReduceOp::Sum => ("sum", 1.0),
                ReduceOp::Avg => ("avg", world as f64),
            };
            for dtype in ["f32", "f64", "bf16"] {
                let m = modulus(dtype);
                let want = |i: usize| expected_sum(i, world, m) / scale;
                let got: Vec<f64> = match dtype {
                    "f32" => {
                        let mut v: Vec<f32> = (0..len).map(|i| contribution(i, rank, m) as f32).collect();
                        collective.allreduce(Buffer::F32(&mut v), op)?;
                        v.into_iter().map(f64::from).collect()
                    }
                    "f64" => {
                        let mut v: Vec<f64> = (0..len).map(|i| contribution(i, rank, m)).collect();
                        collective.allreduce(Buffer::F64(&mut v), op)?;
                        v
                    }
                    _ => {
                        let mut v: Vec<bf16> = (0..len).map(|i| bf16::from_f64(contribution(i, rank, m))).collect();
                        collective.allreduce(Buffer::Bf16(&mut v), op)?;
                        v.into_iter().map(f64::from).collect()
                    }
                };
                // Averages are exact in f32/f64; in bf16 the quotient rounds to 8 significant bits.
                let tolerance = |w: f64| {
                    if dtype == "bf16" {
                        w.abs() / 128.0
                    } else {
                        0.0
                    }
                };
                let ok =
                    got.len() == len && got.iter().enumerate().all(|(i, &g)| (g - want(i)).abs() <= tolerance(want(i)));
                if !ok {
                    tracing::error!("allreduce {op_name} of {len} {dtype} values gave wrong results");
                }
                checks.push(AllreduceCheck {
                    dtype,
                    op: op_name,
                    elements: len,
                    ok,
                    first: got.first().copied(),
                    last: got.last().copied(),
                });
            }
        }
    }
    Ok(checks)
}

fn check_broadcast(collective: &mut dyn Collective) -> anyhow::Result<bool> {
    let root = collective.world_size() - 1;
    let pattern = |i: usize| (i * 31 % 251) as u8;
    let mut bytes: Vec<u8> =
        if collective.rank() == root { (0..1 << 20).map(pattern).collect() } else { vec![0; 1 << 20] };
    collective.broadcast(&mut bytes, root)?;
    let ok = bytes.iter().enumerate().all(|(i, &b)| b == pattern(i));
    if !ok {
        tracing::error!("broadcast from rank {root} arrived corrupted");
    }
    Ok(ok)
}

/// Times every collective of [`MEASURED_OPS`] at every size, all allreduces first.
fn measure(collective: &mut dyn Collective, sizes: &[usize], iters: usize) -> anyhow::Result<Vec<Bandwidth>> {
    let world = collective.world_size();
    let mut out = Vec::with_capacity(sizes.len() * MEASURED_OPS.len());
    for op in MEASURED_OPS {
        for &bytes in sizes {
            // reduce_scatter and allgather split the buffer into one equal block per rank.
            let len = if op == "allreduce" { bytes / 4 } else { bytes / 4 / world * world };
            let mut buf = vec![1.0f32; len];
            let iters = if iters > 0 { iters } else { (256 << 20) / bytes.max(1 << 20) }.clamp(1, 50);
            let mut call = |buf: &mut [f32]| match op {
                "allreduce" => collective.allreduce(Buffer::F32(buf), ReduceOp::Sum),
                "reduce_scatter" => collective.reduce_scatter(Buffer::F32(buf), ReduceOp::Sum),
                _ => collective.allgather_blocks(Buffer::F32(buf)),
            };
            for _ in 0..2 {
                call(&mut buf)?;
            }
            let start = Instant::now();
            for _ in 0..iters {
                call(&mut buf)?;
            }
            let mut seconds = [start.elapsed().as_secs_f64() / iters as f64];
            collective.allreduce(Buffer::F64(&mut seconds), ReduceOp::Avg)?;
            let algbw = if seconds[0] > 0.0 { (len * 4) as f64 / seconds[0] / 1e9 } else { 0.0 };
            let moved = if op == "allreduce" { 2.0 } else { 1.0 };
            let factor = if world > 1 { moved * (world - 1) as f64 / world as f64 } else { 0.0 };
            out.push(Bandwidth {
                op,
                bytes: len * 4,
                time_ms: seconds[0] * 1e3,
                algbw_gbps: algbw,
                busbw_gbps: algbw * factor,
            });
        }
    }
    Ok(out)
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        let _ = writeln!(s, "hytrain doctor: {} ranks, backend {}", self.world_size, self.backend);
        for p in &self.peers {
            let _ = writeln!(s, "  rank {:>3}  {}  pid {}", p.rank, p.host, p.pid);
        }
        let checks_ok = self.allreduce_checks.iter().filter(|c| c.ok).count();
        let _ =
            writeln!(s, "  libtorch: {} (cuda available: {})", verdict(self.libtorch.ok), self.libtorch.cuda_available);
        let _ = writeln!(
            s,
            "  allreduce checks: {checks_ok}/{} exact (lengths {:?}; f32, f64, bf16; sum and avg)",
            self.allreduce_checks.len(),
            CHECKED_LENGTHS
        );
        let _ = writeln!(s, "  broadcast: {}", verdict(self.broadcast_ok));
        if !self.sizes.is_empty() {
            let _ = writeln!(
                s,
                "  {:<15} {:>10} {:>12} {:>14} {:>14}",
                "collective", "size", "time (ms)", "algbw (GB/s)", "busbw (GB/s)"
            );
            for b in &self.sizes {
                let _ = writeln!(
                    s,
                    "  {:<15} {:>10} {:>12.3} {:>14.3} {:>14.3}",
                    b.op,
                    super::format_size(b.bytes),
                    b.time_ms,
                    b.algbw_gbps,
                    b.busbw_gbps
                );
            }
        }
        if self.ok {
            let _ = write!(s, "all checks passed");
        } else {
            let _ = write!(s, "FAILED on ranks {:?}", self.failed_ranks);
        }
        f.write_str(&s)
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "FAILED"
    }
}
