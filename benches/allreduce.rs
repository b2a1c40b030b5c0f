//! Allreduce bus bandwidth on 2 local processes, per size: hytrain's TCP ring, hytrain's shared-memory transport,
//! and PyTorch's gloo backend (`benches/gloo_allreduce.py`), all in the same run.
//!
//! The criterion process is rank 0; it re-executes itself as rank 1 (HYTRAIN_BENCH_PEER_PORTS), and before each
//! timed batch tells the peer which transport, how many allreduces and of which size to run, so both sides always
//! do the same work. Both transports are connected for the whole run; commands travel over the ring.
//!
//! Run with `cargo xtask bench` (which also prepares the Python peer), or `cargo bench --bench allreduce`. With
//! HYTRAIN_BENCH_SUMMARY=FILE the 64 MiB comparison is appended to FILE as JSON lines for xtask's summary table.

use std::io::Write;
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use hytrain::comm::{self, Buffer, Collective, CommOptions, Membership, ReduceOp, Transport};

const SIZES_MIB: [usize; 5] = [1, 4, 16, 64, 256];
const WORLD: usize = 2;
const TRANSPORTS: [(Transport, &str); 2] = [(Transport::Ring, "hytrain_ring"), (Transport::Shm, "hytrain_shm")];

fn connect(rank: usize, port: u16, transport: Transport) -> Box<dyn Collective> {
    let m = Membership {
        rank,
        world_size: WORLD,
        local_rank: rank,
        local_world_size: WORLD,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    };
    let opts = CommOptions {
        rendezvous_timeout: Duration::from_secs(60),
        job_id: format!("bench-{transport}"),
        transport,
        ..CommOptions::default()
    };
    let c = comm::init(&m, false, &opts).expect("peer rendezvous on loopback");
    assert_eq!(c.backend(), transport.to_string(), "the transport asked for");
    c
}

/// Rank 1: obeys (transport, elements, iterations) commands until told to stop with 0 elements.
fn peer(ports: [u16; 2]) {
    let mut collectives: Vec<_> = TRANSPORTS.iter().zip(ports).map(|((t, _), p)| connect(1, p, *t)).collect();
    let mut buf = Vec::new();
    loop {
        let mut cmd = [0u8; 24];
        collectives[0].broadcast(&mut cmd, 0).expect("command from rank 0");
        let which = u64::from_le_bytes(cmd[..8].try_into().unwrap()) as usize;
        let elements = u64::from_le_bytes(cmd[8..16].try_into().unwrap()) as usize;
        let iters = u64::from_le_bytes(cmd[16..].try_into().unwrap());
        if elements == 0 {
            return;
        }
        buf.resize(elements, 1.0f32);
        for _ in 0..iters {
            collectives[which].allreduce(Buffer::F32(&mut buf), ReduceOp::Sum).expect("allreduce");
        }
    }
}

fn command(ring: &mut dyn Collective, which: usize, elements: usize, iters: u64) {
    let mut cmd = [0u8; 24];
    cmd[..8].copy_from_slice(&(which as u64).to_le_bytes());
    cmd[8..16].copy_from_slice(&(elements as u64).to_le_bytes());
    cmd[16..].copy_from_slice(&iters.to_le_bytes());
    ring.broadcast(&mut cmd, 0).expect("command to rank 1");
}

/// Best (transport index, bytes, seconds per allreduce) seen per size, for the comparison table.
static BEST: Mutex<Vec<(usize, usize, f64)>> = Mutex::new(Vec::new());

fn bench(c: &mut Criterion, collectives: &mut [Box<dyn Collective>]) {
    let mut group = c.benchmark_group("allreduce_2proc");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    for mib in SIZES_MIB {
        let bytes = mib << 20;
        let elements = bytes / 4;
        let mut buf = vec![1.0f32; elements];
        // Bus bytes: what each rank moves in a ring allreduce, so criterion's throughput is busbw.
        group.throughput(Throughput::Bytes((bytes * 2 * (WORLD - 1) / WORLD) as u64));
        for (which, (_, name)) in TRANSPORTS.iter().enumerate() {
            group.bench_with_input(BenchmarkId::new(*name, format!("{mib}MiB")), &elements, |b, _| {
                b.iter_custom(|iters| {
                    command(collectives[0].as_mut(), which, elements, iters);
                    let start = Instant::now();
                    for _ in 0..iters {
                        collectives[which].allreduce(Buffer::F32(&mut buf), ReduceOp::Sum).unwrap();
                    }
                    let elapsed = start.elapsed();
                    record(which, bytes, elapsed.as_secs_f64() / iters as f64);
                    elapsed
                })
            });
        }
    }
    group.finish();
}

fn record(which: usize, bytes: usize, seconds: f64) {
    let mut best = BEST.lock().unwrap();
    match best.iter_mut().find(|(w, b, _)| *w == which && *b == bytes) {
        Some(entry) => entry.2 = entry.2.min(seconds),
        None => best.push((which, bytes, seconds)),
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
        return Err(format!(
            "{python} {script} failed: {}",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
        ));
    }
    let mut rows = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("bad line from gloo peer '{line}': {e}"))?;
        rows.push((v["bytes"].as_u64().unwrap_or(0) as usize, v["busbw_gbps"].as_f64().unwrap_or(0.0)));
    }
    Ok(rows)
}

/// Appends a row to the summary file xtask's bench reads, when it asked for one.
fn summarize(comparison: &str, ours: f64, peer: f64, target: &str) {
    let Ok(path) = std::env::var("HYTRAIN_BENCH_SUMMARY") else { return };
    let row = serde_json::json!({
        "comparison": comparison, "unit": "GB/s busbw", "higher_is_better": true,
        "hytrain": ours, "peer_name": "PyTorch gloo", "peer": peer, "target": target,
    });
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("summary file");
    writeln!(f, "{row}").expect("write the summary");
}

fn main() {
    if let Ok(ports) = std::env::var("HYTRAIN_BENCH_PEER_PORTS") {
        let p: Vec<u16> = ports.split(',').map(|p| p.parse().expect("port")).collect();
        peer([p[0], p[1]]);
        return;
    }
    let free = || std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port();
    let ports = [free(), free()];
    let mut child: Child = Command::new(std::env::current_exe().unwrap())
        .env("HYTRAIN_BENCH_PEER_PORTS", format!("{},{}", ports[0], ports[1]))
        .spawn()
        .expect("start the peer rank");
    let mut collectives: Vec<_> = TRANSPORTS.iter().zip(ports).map(|((t, _), p)| connect(0, p, *t)).collect();
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion, &mut collectives);
    command(collectives[0].as_mut(), 0, 0, 0);
    child.wait().unwrap();
    criterion.final_summary();

    let best = BEST.lock().unwrap().clone();
    let peer = gloo();
    println!("\nallreduce busbw, 2 processes on one host, f32 (GB/s; higher is better; ratios against gloo)");
    println!("| size | hytrain ring | hytrain shm | PyTorch gloo | ring / gloo | shm / gloo |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for mib in SIZES_MIB {
        let bytes = mib << 20;
        let of = |which: usize| {
            best.iter().find(|(w, b, _)| *w == which && *b == bytes).map(|(_, _, s)| busbw_gbps(bytes, *s))
        };
        let (ring, shm) = (of(0), of(1));
        let gloo = peer.as_ref().ok().and_then(|rows| rows.iter().find(|(b, _)| *b == bytes)).map(|(_, g)| *g);
        let show = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.2}"));
        let ratio = |v: Option<f64>| match (v, gloo) {
            (Some(v), Some(g)) => format!("{:.2}x", v / g),
            _ => "n/a".into(),
        };
        println!("| {mib} MiB | {} | {} | {} | {} | {} |", show(ring), show(shm), show(gloo), ratio(ring), ratio(shm));
        if mib == 64 {
            if let (Some(ring), Some(shm), Some(g)) = (ring, shm, gloo) {
                summarize("allreduce 64 MiB, 2 processes: shm", shm, g, ">=3");
                summarize("allreduce 64 MiB, 2 processes: ring", ring, g, "");
            }
        }
    }
    if let Err(why) = peer {
        println!("gloo peer not measured: {why}");
    }
}
