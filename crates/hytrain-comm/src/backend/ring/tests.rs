//! The ring's tests: real rings over loopback, ranks as threads of one process.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hytrain_cluster::{JobToken, TokenSource};

use super::links::*;
use super::pipeline::*;
use super::*;
use crate::backend::failure::{decode_failure, encode_failure};
use crate::conformance;
use crate::rendezvous::auth::{self, Handshake, NONCE_LEN};
use crate::testutil::{free_port, member, on_ranks, opts};

/// Rendezvous plus ring for `world` threads, then `f(rank, ring)` on each.
fn with_rings<T: Send>(world: usize, o: CommOptions, f: impl Fn(usize, &mut Ring) -> T + Sync) -> Vec<T> {
    let port = free_port();
    let linked = std::sync::Barrier::new(world);
    on_ranks(world, |rank| {
        let m = member(rank, world, port);
        let store = Store::rendezvous(&m, &o).expect("rendezvous");
        let mut ring = Ring::connect(&store, &m, &o).expect("ring");
        // Every ring is linked and no rank is inside a store call before any rank runs `f`: a rank that `f`
        // makes drop out must not be lost to a rank still linking or waiting. A thread barrier, not the store's:
        // a rank released from a store barrier can drop out while another still waits for its answer.
        linked.wait();
        f(rank, &mut ring)
    })
}

/// The conformance cases (tests/conformance/cases.rs) with segments small enough that every chunk is many
/// segments, the pipelining under test; the suite itself runs them at the default segment size.
#[test]
fn tiny_segments_pass_every_conformance_case() {
    for world in [2, 3] {
        let failures = with_rings(world, opts(60, 60), |_, ring| {
            ring.set_segment_bytes(1000);
            conformance::run(ring, conformance::Order::SameAsAllreduce, conformance::SMALL)
        });
        for (rank, bad) in failures.iter().enumerate() {
            assert!(bad.is_empty(), "world {world} rank {rank}: {bad:?}");
        }
    }
}

#[test]
fn barrier_returns_only_after_every_rank_entered() {
    use std::sync::atomic::AtomicBool;
    let late_entered = AtomicBool::new(false);
    let results = with_rings(3, opts(60, 60), |rank, ring| {
        if rank == 2 {
            std::thread::sleep(Duration::from_millis(300));
            late_entered.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        ring.barrier().unwrap();
        late_entered.load(std::sync::atomic::Ordering::SeqCst)
    });
    assert_eq!(results, [true, true, true]);
}

#[test]
fn two_rings_from_one_store_do_not_mix() {
    let port = free_port();
    let o = opts(60, 60);
    let results = on_ranks(3, |rank| {
        let m = member(rank, 3, port);
        let store = Store::rendezvous(&m, &o).unwrap();
        let mut a = Ring::connect(&store, &m, &o).unwrap();
        let mut b = Ring::connect(&store, &m, &o).unwrap();
        let mut x = vec![rank as f64; 1000];
        let mut y = vec![10.0 * rank as f64; 1000];
        b.allreduce(Buffer::F64(&mut y), ReduceOp::Sum).unwrap();
        a.allreduce(Buffer::F64(&mut x), ReduceOp::Sum).unwrap();
        (x[999], y[0])
    });
    assert!(results.iter().all(|r| *r == (3.0, 30.0)), "{results:?}");
}

#[test]
fn bad_arguments_are_refused_without_breaking_the_ring() {
    let results = with_rings(2, opts(60, 60), |_, ring| {
        let root = ring.broadcast(&mut [0u8; 4], 2).unwrap_err().to_string();
        let gather = ring.allgather(&[1, 2, 3], &mut [0u8; 5]).unwrap_err().to_string();
        let mut v = [1.0f32; 3];
        ring.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).unwrap();
        (root, gather, v)
    });
    for (root, gather, v) in results {
        assert!(root.contains("root 2 is not a rank (world_size 2)"), "{root}");
        assert!(gather.contains("output has 5 bytes but must hold 2 ranks x 3 input bytes"), "{gather}");
        assert_eq!(v, [2.0; 3]);
    }
}

#[test]
fn ranks_calling_different_collectives_fail_naming_both_calls() {
    let results = with_rings(2, opts(60, 60), |rank, ring| {
        let mut v = vec![1.0f32; 10 + rank];
        let first = ring.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).unwrap_err();
        let again = ring.barrier().unwrap_err();
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
fn ranks_calling_reduce_scatter_against_allreduce_or_allgather_blocks_fail_naming_both_calls() {
    let results = with_rings(2, opts(60, 60), |rank, ring| {
        let mut v = vec![1.0f32; 10];
        let first = match rank {
            0 => ring.reduce_scatter(Buffer::F32(&mut v), ReduceOp::Sum).unwrap_err(),
            _ => ring.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).unwrap_err(),
        };
        let again = ring.allgather_blocks(Buffer::F32(&mut v)).unwrap_err();
        (first.to_string(), again.to_string())
    });
    for (rank, (first, again)) in results.iter().enumerate() {
        assert!(
            first.contains("reduce_scatter of 10 f32 values") && first.contains("allreduce of 10 f32 values"),
            "rank {rank}: {first}"
        );
        assert!(again.contains("unusable after an earlier failure"), "rank {rank}: {again}");
    }
    let results = with_rings(2, opts(60, 60), |rank, ring| {
        let mut v = vec![bf16::ONE; 4];
        match rank {
            0 => ring.allgather_blocks(Buffer::Bf16(&mut v)).unwrap_err().to_string(),
            _ => ring.reduce_scatter(Buffer::Bf16(&mut v), ReduceOp::Avg).unwrap_err().to_string(),
        }
    });
    for (rank, e) in results.iter().enumerate() {
        assert!(
            e.contains("allgather_blocks of 4 bf16 values") && e.contains("reduce_scatter of 4 bf16 values"),
            "rank {rank}: {e}"
        );
    }
}

#[test]
fn a_rank_that_drops_its_connections_mid_reduce_scatter_or_allgather_blocks_is_named_by_every_other_rank() {
    for gather in [false, true] {
        let results = with_rings(4, opts(60, 30), |rank, ring| {
            ring.set_segment_bytes(4096);
            if rank == 2 {
                ring.links.as_mut().unwrap().sever_after = Some(3);
            }
            let mut v = vec![1.0f32; 400_000];
            let first = match gather {
                false => ring.reduce_scatter(Buffer::F32(&mut v), ReduceOp::Avg),
                true => ring.allgather_blocks(Buffer::F32(&mut v)),
            };
            match first {
                Err(e) => e,
                // A rank whose own block needed nothing rank 2 still had to forward may finish it (rank 1's block
                // takes only rank 2's first chunk, sent before it dropped its links): it must learn of the loss at
                // its next collective.
                Ok(()) => ring.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).unwrap_err(),
            }
        });
        for r in [0, 1, 3] {
            let e = &results[r];
            assert!(matches!(e, CommError::RankLost(lost) if lost.rank == 2), "gather {gather} rank {r}: {e}");
        }
    }
}

#[test]
fn a_silent_rank_makes_reduce_scatter_time_out_naming_it() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (tx, rx) = (Mutex::new(tx), Mutex::new(rx));
    let results = with_rings(3, opts(60, 2), |rank, ring| {
        if rank == 1 {
            let rx = rx.lock().unwrap();
            for _ in 0..2 {
                let _ = rx.recv_timeout(Duration::from_secs(30));
            }
            return None;
        }
        let mut v = vec![1.0f64; 999];
        let e = ring.reduce_scatter(Buffer::F64(&mut v), ReduceOp::Sum).unwrap_err();
        let _ = tx.lock().unwrap().send(());
        Some(e)
    });
    let e = results[2].as_ref().unwrap();
    assert!(e.to_string().contains("rank 1 was silent for 2 s during reduce_scatter"), "{e}");
}

#[test]
fn a_rank_that_exits_mid_allreduce_makes_the_others_fail_naming_it() {
    let started = Instant::now();
    let results = with_rings(3, opts(60, 30), |rank, ring| {
        if rank == 1 {
            // The ring closes when the rank's thread ends, as when a worker process dies while its peers are
            // blocked waiting for its data.
            std::thread::sleep(Duration::from_millis(300));
            return None;
        }
        let mut v = vec![1.0f32; 1_000_003];
        Some(ring.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).unwrap_err())
    });
    assert!(started.elapsed() < Duration::from_secs(25), "took {:?}", started.elapsed());
    for r in [0, 2] {
        let e = results[r].as_ref().unwrap();
        assert!(matches!(e, CommError::PeerLost { rank: 1, .. }), "rank {r}: {e}");
        assert_eq!(e.to_string(), "lost rank 1 (connection closed during allreduce)");
    }
}

#[test]
fn a_rank_that_drops_its_connections_mid_stream_makes_the_others_fail_naming_it() {
    let started = Instant::now();
    let results = with_rings(4, opts(60, 30), |rank, ring| {
        ring.set_segment_bytes(4096);
        if rank == 2 {
            ring.links.as_mut().unwrap().sever_after = Some(5);
        }
        let mut v = vec![1.0f32; 200_000];
        ring.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).unwrap_err()
    });
    assert!(started.elapsed() < Duration::from_secs(25), "took {:?}", started.elapsed());
    for r in [0, 1, 3] {
        let e = &results[r];
        // Every rank names rank 2, the one that died, whichever link it saw break first: the liveness watch's
        // verdict, not a neighbour that only failed because of rank 2.
        assert!(matches!(e, CommError::RankLost(lost) if lost.rank == 2), "rank {r}: {e}");
        assert!(
            e.to_string().starts_with("lost rank 2 on 127.0.0.1: its connection to the rendezvous store closed"),
            "{e}"
        );
    }
}

#[test]
fn a_rank_lost_between_collectives_breaks_the_ring_of_every_other_rank_at_once() {
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (tx, rx) = (Mutex::new(tx), Mutex::new(rx));
    let results = with_rings(3, opts(60, 60), |rank, ring| {
        let mut v = vec![1.0f32; 1000];
        ring.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).unwrap();
        if rank == 1 {
            // Dies only once both others are done with the allreduce, so they are between collectives.
            let rx = rx.lock().unwrap();
            for _ in 0..2 {
                rx.recv_timeout(Duration::from_secs(30)).unwrap();
            }
            ring.liveness().unwrap().sever();
            return None;
        }
        tx.lock().unwrap().send(()).unwrap();
        let lost = ring.liveness().unwrap().wait_lost(Some(Duration::from_secs(20)));
        // The ring was aborted by the verdict: the next collective fails at once, naming rank 1.
        let e = ring.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).unwrap_err();
        Some((lost, e))
    });
    assert!(started.elapsed() < Duration::from_secs(25), "took {:?}", started.elapsed());
    for r in [0, 2] {
        let (lost, e) = results[r].as_ref().unwrap();
        assert_eq!(lost.as_ref().map(|l| l.rank), Some(1), "rank {r}");
        assert!(matches!(e, CommError::RankLost(l) if l.rank == 1), "rank {r}: {e}");
    }
}

#[test]
fn a_collective_stopped_by_the_liveness_verdict_alone_names_the_lost_rank() {
    let results = with_rings(3, opts(60, 60), |rank, ring| {
        let reporter = &ring.links.as_ref().unwrap().reporter;
        // Before any loss: a sender told to stop with a receiver that finished has no cause to give.
        let before = outcome(None, Err(None), reporter, "allreduce").unwrap_err();
        ring.barrier().expect("every rank looked before the loss");
        if rank == 1 {
            ring.liveness().unwrap().sever();
            return None;
        }
        ring.liveness().unwrap().wait_lost(Some(Duration::from_secs(20))).expect("the watch reports rank 1 lost");
        let reporter = &ring.links.as_ref().unwrap().reporter;
        let after = outcome(None, Err(None), reporter, "allreduce").unwrap_err();
        let consequence = outcome(Some(None), Err(None), reporter, "allreduce").unwrap_err();
        Some((before, after, consequence))
    });
    for r in [0, 2] {
        let (before, after, consequence) = results[r].as_ref().unwrap();
        assert!(
            matches!(before, CommError::Broken(m) if m == "allreduce stopped without a recorded cause"),
            "rank {r}: {before}"
        );
        for e in [after, consequence] {
            assert!(matches!(e, CommError::RankLost(l) if l.rank == 1), "rank {r}: {e}");
        }
    }
}

#[test]
fn a_rank_whose_store_connection_drops_mid_collective_is_named_by_every_other_rank() {
    // Rank 2's ring links keep working while its store connection closes: the others' collectives are stopped
    // by the liveness verdict, possibly after their own halves finished; each names rank 2 all the same.
    let results = with_rings(3, opts(60, 30), |rank, ring| {
        ring.set_segment_bytes(4096);
        let mut v = vec![1.0f32; 100_000];
        if rank == 2 {
            ring.liveness().unwrap().sever();
        }
        (0..20).find_map(|_| ring.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).err())
    });
    for r in [0, 1] {
        let e = results[r].as_ref().unwrap_or_else(|| panic!("rank {r} never failed"));
        assert!(matches!(e, CommError::RankLost(l) if l.rank == 2), "rank {r}: {e}");
    }
}

#[test]
fn a_silent_rank_makes_its_successor_time_out_naming_it() {
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (tx, rx) = (Mutex::new(tx), Mutex::new(rx));
    let results = with_rings(3, opts(60, 2), |rank, ring| {
        if rank == 1 {
            // Alive, connected, but never joins the collective until both others have given up: hanging up
            // earlier would let rank 2 see a closed connection instead of the silence under test.
            let rx = rx.lock().unwrap();
            for _ in 0..2 {
                let _ = rx.recv_timeout(Duration::from_secs(30));
            }
            return None;
        }
        let mut v = vec![1.0f64; 1000];
        let e = ring.allreduce(Buffer::F64(&mut v), ReduceOp::Sum).unwrap_err();
        let _ = tx.lock().unwrap().send(());
        Some(e)
    });
    assert!(started.elapsed() < Duration::from_secs(25), "took {:?}", started.elapsed());
    let e = results[2].as_ref().unwrap();
    assert!(matches!(e, CommError::Timeout { rank: 1, secs: 2, .. }), "{e}");
    assert!(e.to_string().contains("rank 1 was silent for 2 s during allreduce"), "{e}");
    assert!(results[0].is_some());
}

#[test]
fn ring_setup_fails_naming_the_store_key_when_a_rank_never_links() {
    let port = free_port();
    let results = on_ranks(2, |rank| {
        let m = member(rank, 2, port);
        let o = opts(3, 3);
        let store = Store::rendezvous(&m, &o).unwrap();
        if rank == 1 {
            std::thread::sleep(Duration::from_secs(4));
            return Ok(());
        }
        Ring::connect(&store, &m, &o).map(|_| ())
    });
    let e = results[0].as_ref().unwrap_err().to_string();
    assert!(e.contains("rank 0 waited 3 s") && e.contains("ring/0/addr/1"), "{e}");
}

fn expected() -> Expected {
    Expected { job_id: "test".into(), generation: 0, prev_rank: 1, rank: 2, world: 3 }
}

fn hello(job_id: &str) -> Hello<'_> {
    Hello { job_id, generation: 0, from_rank: 1, world: 3 }
}

#[test]
fn strays_silent_clients_and_wrong_tokens_are_refused_and_the_real_peer_accepted() {
    let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let token = JobToken::new(TokenSource::Env, "ring-secret");
    let deadline = Instant::now() + Duration::from_secs(60);
    let peer_token = token.clone();
    let peers = std::thread::spawn(move || {
        // Connects and says nothing: must not hold up the others.
        let silent = TcpStream::connect(addr).unwrap();
        let mut other_job = TcpStream::connect(addr).unwrap();
        let refused = introduce(&mut other_job, &hello("other-job"), &peer_token, deadline).unwrap_err();
        let mut forger = TcpStream::connect(addr).unwrap();
        let wrong = JobToken::new(TokenSource::Env, "not-the-ring-secret");
        let forged = introduce(&mut forger, &hello("test"), &wrong, deadline).unwrap_err();
        let mut real = TcpStream::connect(addr).unwrap();
        introduce(&mut real, &hello("test"), &peer_token, deadline).unwrap();
        real.write_all(b"data").unwrap();
        (silent, refused, forged, real)
    });
    let accepted = accept_prev(listener, expected(), &token, deadline, &AtomicBool::new(false));
    let (mut silent, refused, forged, _real) = peers.join().unwrap();
    let mut got = [0u8; 4];
    accepted.unwrap().read_exact(&mut got).unwrap();
    assert_eq!(&got, b"data");
    assert!(matches!(&refused, Handshake::Refused(why) if why.contains("waiting for rank 1")), "{refused:?}");
    assert!(matches!(forged, Handshake::ProofRefused), "{forged:?}");
    // The real peer got in while the silent one was still being waited on.
    silent.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let still_open = matches!(
        silent.read(&mut [0u8; 1]),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
    );
    assert!(still_open, "the silent client was dropped before the real peer was accepted");
}

#[test]
fn a_ring_peer_that_cannot_prove_the_token_is_not_trusted() {
    let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut hello = vec![0u8; 8 + 8 + 4 + 24 + NONCE_LEN];
        s.read_exact(&mut hello).unwrap();
        let _ = auth::respond_without_token(&mut s);
    });
    let mut s = TcpStream::connect(addr).unwrap();
    let token = JobToken::new(TokenSource::Env, "ring-secret");
    let e = introduce(&mut s, &hello("test"), &token, Instant::now() + Duration::from_secs(20)).unwrap_err();
    assert!(matches!(e, Handshake::BadProof), "{e:?}");
}

#[test]
fn ranks_with_a_configured_token_link_the_ring_and_reduce() {
    let mut o = opts(60, 60);
    o.job_token = Some(JobToken::new(TokenSource::Env, "configured-ring-secret"));
    let results = with_rings(3, o, |rank, ring| {
        let mut v = vec![rank as f32 + 1.0; 1000];
        ring.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).unwrap();
        v[999]
    });
    assert_eq!(results, [6.0, 6.0, 6.0]);
}

#[test]
fn failure_records_round_trip_through_the_store_encoding() {
    for e in [
        CommError::PeerLost { rank: 5, during: "broadcast", cause: "connection closed".into() },
        CommError::Timeout { rank: 1, during: "barrier", secs: 300 },
    ] {
        assert_eq!(decode_failure(encode_failure(0, &e).as_bytes()).unwrap().to_string(), e.to_string());
    }
    let other = decode_failure(encode_failure(3, &CommError::Mismatch("x\ny".into())).as_bytes()).unwrap();
    assert_eq!(other.to_string(), "rank 3 failed first: collective mismatch: x\ny");
}

#[test]
fn headers_decode_what_they_encode_and_refuse_data() {
    let h = Header { op: OP_BROADCAST, dtype: DT_U8, seq: 7, len: 12, aux: 3 };
    assert_eq!(Header::decode(&h.encode()), Some(h));
    assert_eq!(Header::decode(&[0u8; 32]), None);
    assert_eq!(h.describe(), "broadcast of 12 bytes from rank 3");
}
