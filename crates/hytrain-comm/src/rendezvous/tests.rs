//! The store's tests: a real server and real clients over loopback, several ranks as threads of one process.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hytrain_cluster::{JobToken, TokenSource};

use super::auth::{self, NONCE_LEN};
use super::client::*;
use super::protocol::*;
use super::server::{Server, World, HANDSHAKE_TIMEOUT};
use super::wire::*;
use crate::testutil::{free_port, member, on_ranks, opts};
use crate::*;

#[test]
fn set_get_add_wait_and_barrier_work_across_four_ranks() {
    let port = free_port();
    let results = on_ranks(4, |rank| -> Result<(i64, Vec<Vec<u8>>), CommError> {
        let store = Store::rendezvous(&member(rank, 4, port), &opts(30, 30))?;
        store.set(&format!("name/{rank}"), format!("rank-{rank}").as_bytes())?;
        store.add("total", rank as i64 + 1)?;
        let keys: Vec<String> = (0..4).map(|r| format!("name/{r}")).collect();
        store.wait(&keys.iter().map(String::as_str).collect::<Vec<_>>())?;
        let names = keys.iter().map(|k| store.get(k)).collect::<Result<Vec<_>, _>>()?;
        store.barrier("after-add")?;
        let total = store.add("total", 0)?;
        // The same barrier name twice: the second round must not see the first round's arrivals.
        store.barrier("after-add")?;
        Ok((total, names))
    });
    for r in results {
        let (total, names) = r.unwrap();
        assert_eq!(total, 1 + 2 + 3 + 4);
        let expect: Vec<Vec<u8>> = (0..4).map(|r| format!("rank-{r}").into_bytes()).collect();
        assert_eq!(names, expect);
    }
}

#[test]
fn get_waits_until_another_rank_sets_the_key() {
    let port = free_port();
    let results = on_ranks(2, |rank| -> Result<Vec<u8>, CommError> {
        let store = Store::rendezvous(&member(rank, 2, port), &opts(30, 30))?;
        if rank == 0 {
            std::thread::sleep(Duration::from_millis(300));
            store.set("late", b"value")?;
            store.barrier("done")?;
            Ok(Vec::new())
        } else {
            let v = store.get("late")?;
            store.barrier("done")?;
            Ok(v)
        }
    });
    assert_eq!(results[1].as_ref().unwrap(), b"value");
}

#[test]
fn one_store_serves_many_threads_of_one_rank() {
    let store = Store::rendezvous(&member(0, 1, free_port()), &opts(30, 30)).unwrap();
    std::thread::scope(|s| {
        for _ in 0..8 {
            let store = store.clone();
            s.spawn(move || {
                for _ in 0..50 {
                    store.add("n", 1).unwrap();
                }
            });
        }
    });
    assert_eq!(store.add("n", 0).unwrap(), 400);
    assert_eq!(store.get("n").unwrap(), b"400");
}

#[test]
fn workers_that_start_before_the_master_still_join() {
    let port = free_port();
    let results = on_ranks(4, |rank| {
        if rank == 0 {
            // The workers are already retrying against a closed port when the master comes up.
            std::thread::sleep(Duration::from_secs(3));
        }
        let store = Store::rendezvous(&member(rank, 4, port), &opts(60, 30))?;
        store.barrier("joined")
    });
    for r in results {
        r.unwrap();
    }
}

#[test]
fn unreachable_master_fails_within_the_timeout_naming_rank_host_and_port() {
    let port = free_port();
    let started = Instant::now();
    let err = Store::rendezvous(&member(3, 4, port), &opts(3, 3)).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("rank 3 could not reach master 127.0.0.1:{port} after 3 s (not connected: ")),
        "{msg}"
    );
    assert!(matches!(err, CommError::Unreachable { rank: 3, .. }));
}

#[test]
fn unresolvable_master_host_fails_naming_the_host() {
    let mut m = member(1, 2, 7777);
    m.master_addr = "no-such-host.invalid".into();
    let started = Instant::now();
    let msg = Store::rendezvous(&m, &opts(2, 2)).unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    assert!(msg.contains("rank 1 could not reach master no-such-host.invalid:7777"), "{msg}");
    assert!(msg.contains("cannot resolve no-such-host.invalid"), "{msg}");
}

#[test]
fn rendezvous_timeout_names_the_ranks_that_never_joined() {
    let port = free_port();
    let results = on_ranks(2, |rank| Store::rendezvous(&member(rank, 4, port), &opts(3, 3)).map(|_| ()));
    let master = results[0].as_ref().unwrap_err();
    assert!(matches!(master, CommError::RanksMissing { .. }), "{master}");
    assert!(master.to_string().contains(&format!("127.0.0.1:{port} (ranks still missing: 2-3)")), "{master}");
    let worker = results[1].as_ref().unwrap_err().to_string();
    assert!(
        worker.contains(&format!("rank 1 could not reach master 127.0.0.1:{port} after"))
            && worker.contains("(ranks still missing: 2-3)"),
        "{worker}"
    );
}

#[test]
fn master_port_already_in_use_is_reported_with_the_port() {
    let taken = TcpListener::bind(("0.0.0.0", 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = Store::rendezvous(&member(0, 2, port), &opts(3, 3)).unwrap_err();
    assert!(matches!(err, CommError::Bind { .. }));
    assert!(err.to_string().contains(&format!("on port {port}")), "{err}");
}

#[test]
fn jobs_of_one_rank_share_a_master_port_without_clashing() {
    // Two single-process jobs given the same MASTER_PORT (the default 29500 in practice), while a third process
    // holds that port: each store listens where the system puts it, so all of them work.
    let taken = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut jobs = Vec::new();
    for job in ["first", "second"] {
        let opts = CommOptions { job_id: job.into(), ..opts(5, 5) };
        let store = Store::rendezvous(&member(0, 1, port), &opts).unwrap();
        store.set("job", job.as_bytes()).unwrap();
        jobs.push(store);
    }
    let seen: Vec<Vec<u8>> = jobs.iter().map(|s| s.get("job").unwrap()).collect();
    assert_eq!(seen, [b"first".to_vec(), b"second".to_vec()], "each job has its own store");
}

#[test]
fn a_rank_of_another_job_on_the_same_port_is_refused() {
    let port = free_port();
    let results = on_ranks(2, |rank| {
        let mut o = opts(3, 3);
        o.job_id = if rank == 0 { "job-a".into() } else { "job-b".into() };
        Store::rendezvous(&member(rank, 2, port), &o).map(|_| ())
    });
    let refused = results[1].as_ref().unwrap_err().to_string();
    assert!(refused.contains("refused") && refused.contains("'job-a'") && refused.contains("'job-b'"), "{refused}");
    assert!(results[0].as_ref().unwrap_err().to_string().contains("ranks still missing: 1"));
}

#[test]
fn a_rank_with_a_different_world_size_is_refused() {
    let port = free_port();
    let results = on_ranks(2, |rank| Store::rendezvous(&member(rank, 2 + rank, port), &opts(3, 3)).map(|_| ()));
    let refused = results[1].as_ref().unwrap_err().to_string();
    assert!(refused.contains("world_size 3 but rank 0 has 2"), "{refused}");
}

#[test]
fn two_workers_with_the_same_rank_are_refused() {
    let port = free_port();
    let results = on_ranks(3, |i| Store::rendezvous(&member(i.min(1), 3, port), &opts(3, 3)).map(|_| ()));
    let errors: Vec<String> = results.iter().filter_map(|r| r.as_ref().err()).map(|e| e.to_string()).collect();
    assert!(errors.iter().any(|e| e.contains("rank 1 already joined")), "{errors:?}");
}

#[test]
fn a_port_held_by_another_service_fails_at_once_instead_of_retrying() {
    let other = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = other.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in other.incoming().flatten() {
            let mut s = s;
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    let started = Instant::now();
    let err = Store::rendezvous(&member(1, 2, port), &opts(60, 60)).unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    assert!(err.contains("not a hytrain rendezvous store") && err.contains(&format!(":{port}")), "{err}");
}

#[test]
fn wait_timeout_names_only_the_missing_keys() {
    let store = Store::rendezvous(&member(0, 1, free_port()), &opts(1, 5)).unwrap();
    store.set("present", b"").unwrap();
    let err = store.wait(&["present", "absent"]).unwrap_err().to_string();
    assert!(err.contains("'absent'") && !err.contains("'present'"), "{err}");
    let err = store.get("absent").unwrap_err().to_string();
    assert!(err.contains("rank 0 waited 1 s") && err.contains("key 'absent'"), "{err}");
}

#[test]
fn barrier_timeout_names_the_ranks_that_did_not_arrive() {
    let port = free_port();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let rx = Mutex::new(rx);
    let results = on_ranks(3, |rank| -> Result<(), CommError> {
        let store = Store::rendezvous(&member(rank, 3, port), &opts(30, 30))?;
        if rank == 2 {
            // Stays connected but never enters the barrier, until rank 0 has given up.
            let _ = rx.lock().unwrap().recv();
            return Ok(());
        }
        let result = store.barrier_timeout("sync", Duration::from_secs(2));
        if rank == 0 {
            let _ = tx.send(());
        }
        result
    });
    let err = results[0].as_ref().unwrap_err().to_string();
    assert!(err.contains("barrier 'sync' (ranks still missing: 2)"), "{err}");
    assert!(results[1].is_err());
}

#[test]
fn add_to_a_non_integer_value_fails_naming_the_key() {
    let store = Store::rendezvous(&member(0, 1, free_port()), &opts(5, 5)).unwrap();
    store.set("text", b"hello").unwrap();
    let err = store.add("text", 1).unwrap_err().to_string();
    assert!(err.contains("key test/text holds a value that is not an integer"), "{err}");
}

#[test]
fn set_if_absent_keeps_the_first_value() {
    let store = Store::rendezvous(&member(0, 1, free_port()), &opts(5, 5)).unwrap();
    assert_eq!(store.set_if_absent("first", b"a").unwrap(), b"a");
    assert_eq!(store.set_if_absent("first", b"b").unwrap(), b"a");
}

/// Reads a store client's hello as a server would; returns its nonce.
fn read_client_hello(s: &mut TcpStream) -> [u8; NONCE_LEN] {
    let mut hello = [0u8; 8];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, HELLO);
    get_bytes_max(s, MAX_JOB_ID).unwrap();
    let mut nonce = [0u8; NONCE_LEN];
    s.read_exact(&mut nonce).unwrap();
    nonce
}

#[test]
fn a_master_that_hangs_up_mid_request_is_reported_as_a_closed_connection() {
    // Greets like a store, then drops the connection on the first request, as a dying rank 0 would.
    let fake = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = fake.local_addr().unwrap().port();
    let o = opts(10, 10);
    let token = o.token();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = fake.accept() {
            let nonce = read_client_hello(&mut s);
            s.write_all(HELLO).unwrap();
            let context = auth::context(&[b"store", b"test"]);
            auth::respond(&mut s, &token, &context, &nonce).unwrap();
            let _ = get_u8(&mut s);
        }
    });
    let err = Store::rendezvous(&member(2, 3, port), &o).unwrap_err().to_string();
    assert!(
        err.contains(&format!("rank 2: rendezvous store at 127.0.0.1:{port} failed during rendezvous"))
            && err.contains("connection closed by the master"),
        "{err}"
    );
}

fn with_token(mut o: CommOptions, secret: &str) -> CommOptions {
    o.job_token = Some(JobToken::new(TokenSource::Env, secret));
    o
}

#[test]
fn ranks_given_the_same_configured_token_rendezvous() {
    let port = free_port();
    let results = on_ranks(3, |rank| {
        let o = with_token(opts(30, 30), "shared-secret-of-this-job");
        let store = Store::rendezvous(&member(rank, 3, port), &o)?;
        store.set(&format!("k/{rank}"), b"v")?;
        store.barrier("joined")
    });
    for r in results {
        r.unwrap();
    }
}

#[test]
fn a_rank_with_the_wrong_token_fails_at_once_naming_the_master() {
    let port = free_port();
    let started = Instant::now();
    let results = on_ranks(2, |rank| {
        // Rank 0 waits only briefly; rank 1 would retry for a minute if a mismatch were worth retrying.
        let (o, secret) =
            if rank == 0 { (opts(4, 4), "the-right-secret-0123") } else { (opts(60, 60), "a-wrong-secret-456789") };
        let r = Store::rendezvous(&member(rank, 2, port), &with_token(o, secret)).map(|_| ());
        (r, started.elapsed())
    });
    let (worker, worker_took) = &results[1];
    let worker = worker.as_ref().unwrap_err();
    assert!(matches!(worker, CommError::TokenMismatch { rank: 1, .. }), "{worker}");
    let msg = worker.to_string();
    assert!(
        msg.starts_with(&format!(
            "rank 1: job token mismatch with the rendezvous store at 127.0.0.1:{port}: the master refused"
        )),
        "{msg}"
    );
    assert!(*worker_took < Duration::from_secs(30), "the mismatched rank took {worker_took:?}");
    let master = results[0].0.as_ref().unwrap_err().to_string();
    assert!(
        master.contains(
            "ranks still missing: 1; refused 1 connection that failed the job token check, the last from 127.0.0.1:"
        ),
        "{master}"
    );
    for m in [&msg, &master] {
        assert!(!m.contains("secret"), "a token leaked into: {m}");
    }
}

#[test]
fn a_master_that_cannot_prove_the_token_is_not_trusted() {
    let fake = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = fake.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = fake.accept() {
            read_client_hello(&mut s);
            s.write_all(HELLO).unwrap();
            let _ = auth::respond_without_token(&mut s);
            // An impostor would now read requests; the rank must have hung up instead.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            assert!(rest.is_empty(), "the rank sent a request to an impostor");
        }
    });
    let err = Store::rendezvous(&member(1, 2, port), &with_token(opts(20, 20), "s")).unwrap_err();
    assert!(matches!(err, CommError::TokenMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!(
            "job token mismatch with the rendezvous store at 127.0.0.1:{port}: the master could not prove"
        )),
        "{err}"
    );
}

/// Reads from `s` until the server closes it or `within` passes; returns what arrived and whether it closed.
fn drain(s: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    s.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return (got, true),
            Err(_) => return (got, false),
        }
    }
}

fn connect_when_listening(port: u16) -> TcpStream {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(e) if Instant::now() > until => panic!("store never listened: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[test]
fn garbage_huge_lengths_and_bad_proofs_are_dropped_without_disturbing_the_job() {
    let port = free_port();
    let o = with_token(opts(60, 60), "secret-for-the-garbage-test");
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let wait = Mutex::new(wait);
    std::thread::scope(|scope| {
        let ranks: Vec<_> = (0..3)
            .map(|rank| {
                let (o, wait) = (&o, &wait);
                scope.spawn(move || -> Result<i64, CommError> {
                    if rank > 0 {
                        // The other ranks join only after the attacks, so rank 0's store is alone with them.
                        let _ = wait.lock().unwrap().recv();
                    }
                    let store = Store::rendezvous(&member(rank, 3, port), o)?;
                    let injected = store.get_timeout("injected", Duration::from_millis(200));
                    assert!(injected.is_err(), "an unauthenticated request was served");
                    store.add("sum", rank as i64 + 1)?;
                    store.barrier("added")?;
                    store.add("sum", 0)
                })
            })
            .collect();

        // Stays connected and silent throughout: must not hold up anyone.
        let mut silent = connect_when_listening(port);

        let mut garbage = connect_when_listening(port);
        garbage.write_all(&(0..1024u32).map(|i| (i * 7919 % 251) as u8).collect::<Vec<_>>()).unwrap();
        let (_, closed) = drain(&mut garbage, Duration::from_secs(15));
        assert!(closed, "garbage was not dropped");

        let mut huge = connect_when_listening(port);
        let mut frame = HELLO.to_vec();
        put_u64(&mut frame, u64::MAX);
        huge.write_all(&frame).unwrap();
        let (reply, closed) = drain(&mut huge, Duration::from_secs(15));
        assert!(closed && reply.is_empty(), "huge length prefix: {reply:?}");

        let mut forger = connect_when_listening(port);
        let mut frame = HELLO.to_vec();
        put_bytes(&mut frame, b"test");
        frame.extend_from_slice(&[7u8; NONCE_LEN]);
        forger.write_all(&frame).unwrap();
        let mut head = [0u8; 8 + 1 + NONCE_LEN];
        forger.read_exact(&mut head).unwrap();
        assert_eq!(head[8], auth::ACCEPTED);
        // A made-up proof, then a request as if it had been accepted.
        forger.write_all(&[0u8; 32]).unwrap();
        let mut status = [9u8; 1];
        forger.read_exact(&mut status).unwrap();
        assert_eq!(status[0], auth::REFUSED);
        let mut frame = Vec::new();
        put_u8(&mut frame, OP_SET);
        put_bytes(&mut frame, b"test/injected");
        put_bytes(&mut frame, b"evil");
        let _ = forger.write_all(&frame);
        let (reply, closed) = drain(&mut forger, Duration::from_secs(15));
        assert!(closed, "the forger was not dropped");
        assert!(reply.is_empty(), "the forger got: {reply:?}");

        drop(go);
        let sums: Vec<i64> = ranks.into_iter().map(|h| h.join().unwrap().unwrap()).collect();
        assert_eq!(sums, [6, 6, 6]);
        // The silent client is dropped once its handshake time is up.
        let (_, closed) = drain(&mut silent, HANDSHAKE_TIMEOUT + Duration::from_secs(10));
        assert!(closed, "a silent client kept its connection");
    });
}

#[test]
fn a_replayed_handshake_is_refused_and_the_job_goes_on() {
    let port = free_port();
    // Rank 1 reaches the store through a proxy that records everything it sends.
    let proxy = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let proxy_port = proxy.local_addr().unwrap().port();
    let recorded = Arc::new(Mutex::new(Vec::<u8>::new()));
    {
        let recorded = recorded.clone();
        std::thread::spawn(move || {
            let (client, _) = proxy.accept().unwrap();
            // Rank 1's later connections (its liveness watch) pass through unrecorded.
            std::thread::spawn(move || {
                while let Ok((c, _)) = proxy.accept() {
                    let s = connect_when_listening(port);
                    for (mut from, mut to) in [(c.try_clone().unwrap(), s.try_clone().unwrap()), (s, c)] {
                        std::thread::spawn(move || {
                            let _ = io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Write);
                        });
                    }
                }
            });
            let server = connect_when_listening(port);
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = c_in.read(&mut buf) {
                    if n == 0 || s_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    recorded.lock().unwrap().extend_from_slice(&buf[..n]);
                }
                let _ = s_out.shutdown(std::net::Shutdown::Write);
            });
            let (mut s_in, mut c_out) = (server, client);
            let _ = io::copy(&mut s_in, &mut c_out);
        });
    }
    let o = with_token(opts(30, 30), "secret-for-the-replay-test");
    let (replayed, replay_done) = std::sync::mpsc::channel::<()>();
    let replay_done = Mutex::new(replay_done);
    let results = on_ranks(2, |rank| -> Result<(), CommError> {
        let m = member(rank, 2, if rank == 0 { port } else { proxy_port });
        let store = Store::rendezvous(&m, &o)?;
        store.barrier("joined")?;
        if rank == 0 {
            // Replays what rank 1 sent, step by step as the store answers: its hello and nonce, its proof,
            // then its requests (the join included).
            let captured = recorded.lock().unwrap().clone();
            let hello_len = 8 + 8 + b"test".len() + NONCE_LEN;
            assert!(captured.len() > hello_len + 32, "nothing recorded");
            let mut replay = TcpStream::connect(("127.0.0.1", port)).unwrap();
            replay.write_all(&captured[..hello_len]).unwrap();
            let mut head = [0u8; 8 + 1 + NONCE_LEN];
            replay.read_exact(&mut head).unwrap();
            assert_eq!(&head[..8], HELLO);
            assert_eq!(head[8], auth::ACCEPTED);
            replay.write_all(&captured[hello_len..hello_len + 32]).unwrap();
            let mut status = [9u8; 1];
            replay.read_exact(&mut status).unwrap();
            assert_eq!(status[0], auth::REFUSED, "the replay got past the token check");
            let _ = replay.write_all(&captured[hello_len + 32..]);
            let (reply, closed) = drain(&mut replay, Duration::from_secs(15));
            assert!(closed && reply.is_empty(), "the replay was answered: {reply:?}");
            let _ = replayed.send(());
        } else {
            let _ = replay_done.lock().unwrap().recv_timeout(Duration::from_secs(60));
        }
        store.barrier("after-replay")
    });
    for r in results {
        r.unwrap();
    }
}

#[test]
fn a_rank_that_dies_is_named_to_every_other_rank_and_ends_their_blocking_requests() {
    let port = free_port();
    let started = Instant::now();
    // Rank 2 dies only once every rank is out of the store barrier: a rank still inside it would have its request
    // ended by the loss too, which is right but not what this test looks at.
    let all_out = std::sync::Barrier::new(3);
    let results = on_ranks(3, |rank| {
        let store = Store::rendezvous(&member(rank, 3, port), &opts(30, 30)).unwrap();
        store.barrier("joined").unwrap();
        all_out.wait();
        let live = store.liveness().unwrap();
        if rank == 2 {
            live.sever();
            return None;
        }
        // Blocked on a key nobody will set; the loss ends the wait long before its deadline.
        let e = store.get_timeout("never", Duration::from_secs(60)).unwrap_err();
        // The store's answer to the request and its verdict on the watch travel on two connections; either
        // may arrive first.
        Some((live.wait_lost(Some(Duration::from_secs(10))), e))
    });
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    for r in [0, 1] {
        let (lost, e) = results[r].as_ref().unwrap();
        let lost = lost.as_ref().expect("a verdict");
        assert_eq!(lost.rank, 2);
        assert_eq!(lost.host, "127.0.0.1");
        assert!(matches!(e, CommError::RankLost(l) if l.rank == 2), "rank {r}: {e}");
    }
}

#[test]
fn ranks_that_leave_are_not_lost_and_rank_0_waits_for_them() {
    let port = free_port();
    let results = on_ranks(3, |rank| {
        let store = Store::rendezvous(&member(rank, 3, port), &opts(30, 30)).unwrap();
        store.barrier("joined").unwrap();
        let live = store.liveness().unwrap();
        if rank == 0 {
            // Rank 0 is done first but stays until the others have said goodbye.
            let t = Instant::now();
            live.leave();
            return (None, t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(300 * rank as u64));
        let lost = live.wait_lost(Some(Duration::from_millis(200)));
        drop(store);
        drop(live);
        (lost, Duration::ZERO)
    });
    for (rank, (lost, _)) in results.iter().enumerate() {
        assert_eq!(lost, &None, "rank {rank}");
    }
    assert!(results[0].1 >= Duration::from_millis(500), "rank 0 left after {:?}", results[0].1);
}

#[test]
fn a_rank_that_stops_sending_heartbeats_is_lost_after_the_peer_timeout() {
    let port = free_port();
    let mut o = opts(30, 30);
    o.peer_timeout = Duration::from_secs(1);
    let rank0 = std::thread::spawn({
        let o = o.clone();
        move || {
            let store = Store::rendezvous(&member(0, 2, port), &o)?;
            let t = Instant::now();
            let lost = store.liveness().unwrap().wait_lost(Some(Duration::from_secs(20)));
            Ok::<_, CommError>((lost, t.elapsed()))
        }
    });
    // Rank 1 joins and opens its watch as a real rank would, then falls silent, as a stopped process does.
    let m = member(1, 2, port);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(20);
    let hosts = ["127.0.0.1"];
    let mut main = connect_with_retry(&m, &o, &hosts, started, deadline).unwrap();
    let mut join = Vec::new();
    put_u8(&mut join, OP_JOIN);
    put_bytes(&mut join, b"test");
    put_u64(&mut join, 1);
    put_u64(&mut join, 2);
    main.write_all(&join).unwrap();
    assert_eq!(get_u8(&mut main).unwrap(), ST_OK);
    assert_eq!(get_u8(&mut main).unwrap(), 1, "rank 0's process hosts this store");
    let mut watch = connect_with_retry(&m, &o, &hosts, started, deadline).unwrap();
    watch.write_all(&watch_request(1, o.peer_timeout)).unwrap();
    assert_eq!(get_u8(&mut watch).unwrap(), ST_OK);
    let (lost, after) = rank0.join().unwrap().unwrap();
    let lost = lost.expect("rank 1 declared lost");
    assert_eq!(lost.rank, 1);
    assert!(lost.cause.contains("no heartbeat for 1 s"), "{lost}");
    assert!(after < Duration::from_secs(10), "noticed after {after:?}");
    drop((main, watch));
}

#[test]
fn zero_deadlines_are_refused_naming_the_option() {
    let mut o = opts(30, 30);
    o.peer_timeout = Duration::ZERO;
    let e = Store::rendezvous(&member(0, 1, free_port()), &o).unwrap_err().to_string();
    assert_eq!(e, "invalid options: peer_timeout is 0; give a positive number of seconds");
}

#[test]
fn a_single_rank_job_listens_on_loopback_only() {
    assert_eq!(listen_only_on(&member(0, 1, 1)), Some(Ipv4Addr::LOCALHOST.into()));
    assert_eq!(listen_only_on(&member(0, 2, 1)), Some(Ipv4Addr::LOCALHOST.into()));
    let mut m = member(0, 2, 1);
    m.master_addr = "[::1]".into();
    assert_eq!(listen_only_on(&m), Some(Ipv6Addr::LOCALHOST.into()));
    m.master_addr = "algo-1".into();
    assert_eq!(listen_only_on(&m), None);
    m.master_addr = "10.0.0.1".into();
    assert_eq!(listen_only_on(&m), None);
}

#[test]
fn a_store_started_on_its_own_serves_a_job_whose_ranks_all_join_as_clients() {
    // What a standalone store needs: the server without any rank around it, and clients that do not host it.
    let port = free_port();
    let o = opts(30, 30);
    let server = Server::start(Some(Ipv4Addr::LOCALHOST.into()), port, &o.job_id, World::Fixed(3), o.token()).unwrap();
    let results = on_ranks(3, |rank| -> Result<Vec<u8>, CommError> {
        let store = Store::join(&member(rank, 3, port), &o, None, Instant::now())?;
        store.set(&format!("k/{rank}"), &[rank as u8])?;
        store.barrier("all")?;
        let next = store.get(&format!("k/{}", (rank + 1) % 3))?;
        store.barrier("read")?;
        assert_eq!(store.liveness().and_then(|l| l.lost()), None);
        Ok(next)
    });
    for (rank, r) in results.into_iter().enumerate() {
        assert_eq!(r.unwrap(), vec![((rank + 1) % 3) as u8], "rank {rank}");
    }
    drop(server);
}
