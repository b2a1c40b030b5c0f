//! Allreduce bus bandwidth of hytrain's ring on 2 local processes, per size, and beside it PyTorch's gloo backend
//! measured in the same run by `benches/gloo_allreduce.py`.
//!
//! The criterion process is rank 0; it re-executes itself as rank 1 (HYTRAIN_BENCH_PEER=1), and before each timed
//! batch tells the peer how many allreduces of which size to run, so both sides always do the same work.
//!
//! Run with `cargo xtask bench` (which also prepares the Python peer), or `cargo bench --bench allreduce`.

use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use hytrain::comm::{self, Buffer, Collective, CommOptions, Membership, ReduceOp};

const SIZES_MIB: [usize; 5] = [1, 4, 16, 64, 256];
const WORLD: usize = 2;

fn membership(rank: usize, port: u16) -> Membership {
    Membership { rank, world_size: WORLD, local_rank: rank, local_world_size: WORLD, master_addr: "127.0.0.1".into(), master_port: port }
}

fn connect(rank: usize, port: u16) -> Box<dyn Collective> {
    let opts = CommOptions { rendezvous_timeout: Duration::from_secs(60), ..CommOptions::default() };
    comm::init(&membership(rank, port), false, &opts).expect("peer rendezvous on loopback")
}

/// Rank 1: obeys (elements, iterations) commands until told to stop with 0 elements.
fn peer(port: u16) {
    let mut c = connect(1, port);
    let mut buf = Vec::new();
    loop {
        let mut cmd = [0u8; 16];
        c.broadcast(&mut cmd, 0).expect("command from rank 0");
        let elements = u64::from_le_bytes(cmd[..8].try_into().unwrap()) as usize;
        let iters = u64::from_le_bytes(cmd[8..].try_into().unwrap());
        if elements == 0 {
            return;
        }
        buf.resize(elements, 1.0f32);
        for _ in 0..iters {
            c.allreduce(Buffer::F32(&mut buf), ReduceOp::Sum).expect("allreduce");
        }
    }
}

fn command(c: &mut dyn Collective, elements: usize, iters: u64) {
    let mut cmd = [0u8; 16];
    cmd[..8].copy_from_slice(&(elements as u64).to_le_bytes());
    cmd[8..].copy_from_slice(&iters.to_le_bytes());
    c.broadcast(&mut cmd, 0).expect("command to rank 1");
}

/// Best (bytes, seconds per allreduce) seen per size, for the comparison table.
static BEST: Mutex<Vec<(usize, f64)>> = Mutex::new(Vec::new());

fn bench(c: &mut Criterion, collective: &mut dyn Collective) {
    let mut group = c.benchmark_group("allreduce_2proc");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    for mib in SIZES_MIB {
        let bytes = mib << 20;
        let elements = bytes / 4;
        let mut buf = vec![1.0f32; elements];
        // Bus bytes: what each rank moves in a ring allreduce, so criterion's throughput is busbw.
        group.throughput(Throughput::Bytes((bytes * 2 * (WORLD - 1) / WORLD) as u64));
        group.bench_with_input(BenchmarkId::new("hytrain_ring", format!("{mib}MiB")), &elements, |b, _| {
            b.iter_custom(|iters| {
                command(collective, elements, iters);
                let start = Instant::now();
                for _ in 0..iters {
                    collective.allreduce(Buffer::F32(&mut buf), ReduceOp::Sum).unwrap();
                }
                let elapsed = start.elapsed();
                record(bytes, elapsed.as_secs_f64() / iters as f64);
                elapsed
            })
        });
    }
    group.finish();
}

fn record(bytes: usize, seconds: f64) {
    let mut best = BEST.lock().unwrap();
    match best.iter_mut().find(|(b, _)| *b == bytes) {
        Some(entry) => entry.1 = entry.1.min(seconds),
        None => best.push((bytes, seconds)),
    }
}

fn busbw_gbps(bytes: usize, seconds: f64) -> f64 {
    bytes as f64 * 2.0 * (WORLD - 1) as f64 / WORLD as f64 / seconds / 1e9
}

/// Runs the gloo peer script; returns busbw per size in GB/s, or why it could not.
fn gloo() -> Result<Vec<(usize, f64)>, String> {
    let python = std::env::var("HYTRAIN_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/gloo_allreduce.py");
    let sizes: Vec<String> = SIZES_MIB.iter().map(|m| (m << 20).to_string()).collect();
    let out = Command::new(&python)
        .arg(script)
        .arg(sizes.join(","))
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{python} {script} failed: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")));
    }
    let mut rows = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("bad line from gloo peer '{line}': {e}"))?;
        rows.push((v["bytes"].as_u64().unwrap_or(0) as usize, v["busbw_gbps"].as_f64().unwrap_or(0.0)));
    }
    Ok(rows)
}

fn main() {
    if let Ok(port) = std::env::var("HYTRAIN_BENCH_PEER_PORT") {
        peer(port.parse().expect("port"));
        return;
    }
    let port = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port();
    let mut child: Child = Command::new(std::env::current_exe().unwrap())
        .env("HYTRAIN_BENCH_PEER_PORT", port.to_string())
        .spawn()
        .expect("start the peer rank");
    let mut collective = connect(0, port);
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion, collective.as_mut());
    command(collective.as_mut(), 0, 0);
    child.wait().unwrap();
    criterion.final_summary();

    let ours = BEST.lock().unwrap().clone();
    let peer = gloo();
    println!("\nallreduce busbw, 2 processes on one host, f32 (GB/s; higher is better)");
    println!("| size | hytrain ring | PyTorch gloo | ratio |");
    println!("|---:|---:|---:|---:|");
    for (bytes, secs) in &ours {
        let mine = busbw_gbps(*bytes, *secs);
        let theirs = peer.as_ref().ok().and_then(|rows| rows.iter().find(|(b, _)| b == bytes)).map(|(_, g)| *g);
        match theirs {
            Some(g) => println!("| {} MiB | {mine:.2} | {g:.2} | {:.2}x |", bytes >> 20, mine / g),
            None => println!("| {} MiB | {mine:.2} | n/a | n/a |", bytes >> 20),
        }
    }
    if let Err(why) = peer {
        println!("gloo peer not measured: {why}");
    }
}
