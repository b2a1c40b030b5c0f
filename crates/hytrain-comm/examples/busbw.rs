//! Measures allreduce bus bandwidth of one transport with ranks as threads of one process: the TCP ring over
//! loopback, or shared memory (each rank maps the segment itself).
//!
//! ```text
//! cargo run --release -p hytrain-comm --example busbw -- ring|shm [ranks=2] [MiB=64] [iterations=10] [ring segment KiB=512]
//! ```
//! busbw = bytes * 2 (n - 1) / n / time, the figure NCCL and gloo benchmarks report.

use std::time::{Duration, Instant};

use hytrain_comm::{init, Buffer, Collective, CommOptions, Membership, ReduceOp, Ring, Store, Transport};

fn main() {
    let transport = match std::env::args().nth(1).as_deref() {
        Some("ring") => Transport::Ring,
        Some("shm") => Transport::Shm,
        other => {
            eprintln!("busbw: the first argument is the transport, ring or shm, not {other:?}");
            std::process::exit(2);
        }
    };
    let arg = |i: usize, default: usize| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (ranks, mib, iters, seg_kib) = (arg(2, 2), arg(3, 64), arg(4, 10), arg(5, 512));
    let port = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port();
    let elems = mib * (1 << 20) / 4;
    let opts = CommOptions { rendezvous_timeout: Duration::from_secs(60), transport, ..CommOptions::default() };
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
                    let mut collective: Box<dyn Collective> = match transport {
                        Transport::Ring => {
                            let store = Store::rendezvous(&m, &opts).unwrap();
                            let mut ring = Ring::connect(&store, &m, &opts).unwrap();
                            ring.set_segment_bytes(seg_kib << 10);
                            Box::new(ring)
                        }
                        _ => init(&m, false, &opts).unwrap(),
                    };
                    assert_eq!(collective.backend(), transport.to_string());
                    let mut v = vec![1.0f32; elems];
                    collective.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).unwrap(); // warm-up
                    collective.barrier().unwrap();
                    let t = Instant::now();
                    for _ in 0..iters {
                        collective.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).unwrap();
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
        "transport={transport} ranks={ranks} size={mib}MiB time={:.2}ms algbw={:.2}GB/s busbw={:.2}GB/s",
        t * 1e3,
        bytes / t / 1e9,
        busbw / 1e9
    );
}
