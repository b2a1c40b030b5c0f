//! The shared-memory backend's tests: ranks as threads laid out as nodes of `local` ranks, each backend picked the
//! way a job picks it (through `transport.rs`).

use std::time::{Duration, Instant};

use half::bf16;

use super::*;
use crate::conformance;
use crate::testutil::{free_port, member, on_ranks, opts};
use crate::transport::{connect, connect_with};

/// Rendezvous plus the backend `transport` picks for `world` threads laid out as nodes of `local` ranks.
fn with_backends<T: Send>(
    world: usize,
    local: usize,
    transport: Transport,
    slot_bytes: Option<usize>,
    collective_s: u64,
    f: impl Fn(usize, Result<Box<dyn Collective>, CommError>) -> T + Sync,
) -> Vec<T> {
    let port = free_port();
    let mut o = opts(60, collective_s);
    o.transport = transport;
    on_ranks(world, |rank| {
        let mut m = member(rank, world, port);
        m.local_rank = rank % local;
        m.local_world_size = local;
        let store = Store::rendezvous(&m, &o).expect("rendezvous");
        f(rank, connect_with(&store, &m, &o, slot_bytes))
    })
}

/// The conformance cases (tests/conformance/cases.rs) with slots small enough that every collective crosses many
/// rounds and both banks; the suite itself runs them with the default slots.
fn check_cases(world: usize, local: usize, slot_bytes: usize) {
    let results = with_backends(world, local, Transport::Shm, Some(slot_bytes), 60, |_, c| {
        let mut c = c.expect("shm backend");
        assert_eq!(c.backend(), "shm");
        conformance::run(c.as_mut(), conformance::Order::SameAsAllreduce, conformance::SMALL)
    });
    for (rank, bad) in results.iter().enumerate() {
        assert!(bad.is_empty(), "world {world} local {local} slot {slot_bytes} rank {rank}: {bad:?}");
    }
}

#[test]
fn three_local_ranks_with_tiny_slots_pass_every_conformance_case() {
    check_cases(3, 3, 192);
}

#[test]
fn three_nodes_of_two_ranks_with_tiny_slots_pass_every_conformance_case() {
    check_cases(6, 2, 256);
}

#[test]
fn slots_too_small_for_a_piece_per_rank_still_reduce_scatter_exactly() {
    // 64 bytes hold 8 f64 values: fewer than one per rank of nine, so reduce_scatter reduces everything.
    check_cases(9, 9, 64);
}

#[test]
fn ranks_calling_different_allreduces_fail_naming_both_calls() {
    let results = with_backends(2, 2, Transport::Shm, None, 60, |rank, c| {
        let mut c = c.unwrap();
        let mut v = vec![1.0f32; 10 + rank];
        let first = c.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).unwrap_err();
        let again = c.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).unwrap_err();
        (first.to_string(), again.to_string())
    });
    for (rank, (first, again)) in results.iter().enumerate() {
        assert!(
            first.contains("allreduce of 10 f32 values") && first.contains("allreduce of 11 f32 values"),
            "rank {rank}: {first}"
        );
        assert!(again.contains("unusable after an earlier failure"), "rank {rank}: {again}");
    }
}

#[test]
fn ranks_calling_reduce_scatter_against_allgather_blocks_fail_naming_both_calls() {
    let results = with_backends(2, 2, Transport::Shm, None, 60, |rank, c| {
        let mut c = c.unwrap();
        let mut v = vec![1.0f64; 6];
        let first = match rank {
            0 => c.reduce_scatter(Buffer::F64(&mut v), ReduceOp::Sum).unwrap_err(),
            _ => c.allgather_blocks(Buffer::F64(&mut v)).unwrap_err(),
        };
        let again = c.reduce_scatter(Buffer::F64(&mut v), ReduceOp::Sum).unwrap_err();
        (first.to_string(), again.to_string())
    });
    for (rank, (first, again)) in results.iter().enumerate() {
        assert!(
            first.contains("reduce_scatter of 6 f64 values") && first.contains("allgather_blocks of 6 f64 values"),
            "rank {rank}: {first}"
        );
        assert!(again.contains("unusable after an earlier failure"), "rank {rank}: {again}");
    }
}

#[test]
fn a_silent_local_rank_makes_reduce_scatter_and_allgather_blocks_time_out_naming_it() {
    for gather in [false, true] {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (tx, rx) = (std::sync::Mutex::new(tx), std::sync::Mutex::new(rx));
        let results = with_backends(3, 3, Transport::Shm, None, 2, |rank, c| {
            let mut c = c.unwrap();
            if rank == 1 {
                let rx = rx.lock().unwrap();
                for _ in 0..2 {
                    let _ = rx.recv_timeout(Duration::from_secs(30));
                }
                return None;
            }
            let mut v = vec![bf16::ONE; 999];
            let e = match gather {
                false => c.reduce_scatter(Buffer::Bf16(&mut v), ReduceOp::Avg).unwrap_err(),
                true => c.allgather_blocks(Buffer::Bf16(&mut v)).unwrap_err(),
            };
            let _ = tx.lock().unwrap().send(());
            Some(e)
        });
        let during = if gather { "allgather_blocks" } else { "reduce_scatter" };
        for r in [0, 2] {
            let e = results[r].as_ref().unwrap();
            assert!(e.to_string().contains(&format!("rank 1 was silent for 2 s during {during}")), "rank {r}: {e}");
        }
    }
}

#[test]
fn a_silent_local_rank_makes_the_others_time_out_naming_it() {
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (tx, rx) = (std::sync::Mutex::new(tx), std::sync::Mutex::new(rx));
    let results = with_backends(3, 3, Transport::Shm, None, 2, |rank, c| {
        let mut c = c.unwrap();
        if rank == 1 {
            // Alive and mapped, but never joins: wait until both others have given up.
            let rx = rx.lock().unwrap();
            for _ in 0..2 {
                let _ = rx.recv_timeout(Duration::from_secs(30));
            }
            return None;
        }
        let mut v = vec![1.0f64; 1000];
        let e = c.allreduce(Buffer::F64(&mut v), ReduceOp::Sum).unwrap_err();
        let _ = tx.lock().unwrap().send(());
        Some(e)
    });
    assert!(started.elapsed() < Duration::from_secs(25), "took {:?}", started.elapsed());
    for r in [0, 2] {
        let e = results[r].as_ref().unwrap();
        assert!(matches!(e, CommError::Timeout { rank: 1, secs: 2, .. }), "rank {r}: {e}");
    }
}

#[test]
fn the_other_collectives_work_beside_the_shared_memory_allreduce() {
    let results = with_backends(4, 2, Transport::Shm, None, 60, |rank, c| {
        let mut c = c.unwrap();
        let mut b = vec![rank as u8; 5];
        c.broadcast(&mut b, 3).unwrap();
        let mut all = vec![0u8; 8];
        c.allgather(&[rank as u8, 9], &mut all).unwrap();
        c.barrier().unwrap();
        let mut v = [rank as f32];
        c.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).unwrap();
        (b, all, v[0])
    });
    for (b, all, v) in results {
        assert_eq!(b, [3; 5]);
        assert_eq!(all, [0, 9, 1, 9, 2, 9, 3, 9]);
        assert_eq!(v, 6.0);
    }
}

#[test]
fn a_topology_that_is_not_whole_nodes_falls_back_to_the_ring_or_is_refused_when_shm_is_forced() {
    // Three ranks that claim nodes of two: the last node would be half empty.
    let auto = with_backends(3, 2, Transport::Auto, None, 60, |_, c| {
        let mut c = c.unwrap();
        let mut v = [1.0f32; 3];
        c.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).unwrap();
        (c.backend(), v[0])
    });
    assert!(auto.iter().all(|r| *r == ("ring", 3.0)), "{auto:?}");
    let forced = with_backends(3, 2, Transport::Shm, None, 60, |_, c| c.err().map(|e| e.to_string()));
    for e in forced {
        let e = e.expect("forced shm must fail");
        assert!(
            e.contains("the shm transport cannot be used")
                && e.contains("world_size 3 is not a multiple of local_world_size 2"),
            "{e}"
        );
    }
}

#[test]
fn ring_transport_and_one_rank_per_node_use_the_ring() {
    let ring = with_backends(2, 2, Transport::Ring, None, 60, |_, c| c.unwrap().backend());
    assert_eq!(ring, ["ring", "ring"]);
    let spread = with_backends(2, 1, Transport::Auto, None, 60, |_, c| c.unwrap().backend());
    assert_eq!(spread, ["ring", "ring"]);
}

#[test]
fn transports_parse_by_name_and_refuse_others() {
    assert_eq!("auto".parse::<Transport>(), Ok(Transport::Auto));
    assert_eq!(" SHM ".parse::<Transport>(), Ok(Transport::Shm));
    assert_eq!("ring".parse::<Transport>(), Ok(Transport::Ring));
    assert_eq!("nccl".parse::<Transport>().unwrap_err(), "unknown transport 'nccl'; use auto, ring or shm");
    assert_eq!(Transport::Shm.to_string(), "shm");
}

#[test]
fn the_segment_file_is_gone_once_every_rank_has_mapped_it() {
    let job = format!("unlink-check-{}", free_port());
    let port = free_port();
    let mut o = opts(60, 60);
    o.job_id = job.clone();
    o.transport = Transport::Shm;
    let seen = on_ranks(2, |rank| {
        let m = member(rank, 2, port);
        let store = Store::rendezvous(&m, &o).unwrap();
        let mut c = connect(&store, &m, &o).unwrap();
        // Once an allreduce has completed, both ranks are past the set-up, while both still hold the mapping.
        let mut v = [1.0f32];
        c.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).unwrap();
        let left: Vec<_> = std::fs::read_dir("/dev/shm")
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(&job))
            .map(|e| e.file_name())
            .collect();
        c.barrier().unwrap();
        (c.backend(), v[0], left)
    });
    for (backend, v, left) in seen {
        assert_eq!((backend, v), ("shm", 2.0));
        assert!(left.is_empty(), "{left:?}");
    }
}
