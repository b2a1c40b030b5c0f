//! Measures shared-memory allreduce bus bandwidth with ranks as threads of one process (each maps the segment itself).
//!
//! ```text
//! cargo run --release -p hytrain-comm --example shm_busbw -- [ranks=2] [MiB=64] [iterations=10]
//! ```
//! busbw = bytes * 2 (n - 1) / n / time, the figure NCCL and gloo benchmarks report.

use std::time::{Duration, Instant};

use hytrain_comm::{init, Buffer, CommOptions, Membership, ReduceOp, Transport};

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (ranks, mib, iters) = (arg(1, 2), arg(2, 64), arg(3, 10));
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let elems = mib * (1 << 20) / 4;
    let opts = CommOptions {
        rendezvous_timeout: Duration::from_secs(60),
        transport: Transport::Shm,
        ..CommOptions::default()
    };
    let times: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..ranks)
            .map(|rank| {
                let opts = opts.clone();
                s.spawn(move || {
                    let m = Membership {
                        rank,
                        world_size: ranks,
                        local_rank: rank,
                        local_world_size: ranks,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                    };
                    let mut ring = init(&m, false, &opts).unwrap();
                    assert_eq!(ring.backend(), "shm");
                    let mut v = vec![1.0f32; elems];
                    ring.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).unwrap(); // warm-up
                    ring.barrier().unwrap();
                    let t = Instant::now();
                    for _ in 0..iters {
                        ring.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).unwrap();
                    }
                    t.elapsed() / iters as u32
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let t = times.iter().max().unwrap().as_secs_f64();
    let bytes = (elems * 4) as f64;
    let busbw = bytes * 2.0 * (ranks as f64 - 1.0) / ranks as f64 / t;
    println!(
        "ranks={ranks} size={mib}MiB time={:.2}ms algbw={:.2}GB/s busbw={:.2}GB/s",
        t * 1e3,
        bytes / t / 1e9,
        busbw / 1e9
    );
}
