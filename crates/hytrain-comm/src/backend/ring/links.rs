//! The ring's links: how a rank connects to `rank + 1` and accepts `rank - 1` (addresses through the store, a
//! hello naming job, ring generation and rank, the job-token handshake both ways), and [`Links`], the two
//! connections and the sender thread a linked ring keeps.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hytrain_cluster::JobToken;

use super::pipeline::*;
use super::*;
use crate::net::bind_any;
use crate::rendezvous::auth::{self, Handshake, NONCE_LEN};
use crate::rendezvous::liveness::AbortRegistration;
use crate::rendezvous::wire::{get_bytes_max, get_u64, put_bytes, put_u64};

/// Version 2 of the ring link: the hello is followed by the job-token handshake (see `auth`).
pub(super) const HELLO: &[u8; 8] = b"HYTRING2";
/// Longest job id a connecting process may send before it has authenticated.
pub(super) const MAX_JOB_ID: usize = 4096;
/// How long a process connecting to a ring port may take to prove it holds the job token.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Ring connections allowed in the handshake at once; more are dropped, so a flood of silent clients neither
/// exhausts threads nor delays the real peer (which is admitted in parallel with them).
pub(super) const MAX_HANDSHAKES: usize = 64;

pub(super) struct Links {
    pub(super) prev: TcpStream,
    pub(super) next: TcpStream,
    pub(super) prev_rank: usize,
    pub(super) jobs: Option<mpsc::Sender<SendJob>>,
    pub(super) done: mpsc::Receiver<SendDone>,
    pub(super) sync: Arc<Handoff>,
    pub(super) reporter: Arc<Reporter>,
    pub(super) collective_timeout_secs: u64,
    pub(super) sender: Option<JoinHandle<()>>,
    /// Aborts both links when the liveness watch reports a lost rank, so a collective blocked on it returns.
    pub(super) _on_lost: Option<AbortRegistration>,
    /// Test hook: after this many received segments, close both connections as a crashing process would.
    #[cfg(test)]
    pub(super) sever_after: Option<usize>,
}

impl Links {
    /// Stops the sender and unblocks both directions; used when a collective fails.
    pub(super) fn abort(&self) {
        self.sync.lock().abort = true;
        self.sync.cv.notify_all();
        let _ = self.next.shutdown(Shutdown::Both);
        let _ = self.prev.shutdown(Shutdown::Both);
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(h) = self.sender.take() {
            let _ = h.join();
        }
    }
}

pub(super) fn link(store: &Store, m: &Membership, opts: &CommOptions, generation: u64) -> Result<Links, CommError> {
    let (rank, world) = (m.rank, m.world_size);
    let next_rank = (rank + 1) % world;
    let prev_rank = (rank + world - 1) % world;
    let deadline = Instant::now() + opts.rendezvous_timeout;
    let setup = |peer: usize, addr: &dyn std::fmt::Display, detail: String| CommError::RingSetup {
        rank,
        peer,
        addr: addr.to_string(),
        detail,
    };

    let token = opts.token();
    let listener = ring_listener(store, m).map_err(|e| setup(prev_rank, &"*:0", format!("cannot listen: {e}")))?;
    let port = listener.local_addr().map_err(|e| setup(prev_rank, &"*:0", e.to_string()))?.port();
    let me = SocketAddr::new(store.local_ip(), port);
    store.set(&format!("ring/{generation}/addr/{rank}"), me.to_string().as_bytes())?;

    // Accepting runs beside connecting: rank - 1 finishes its handshake only once this rank answers it, while
    // this rank may be waiting for rank + 1 to answer its own.
    let stop = Arc::new(AtomicBool::new(false));
    // A rank lost while the ring is being built (the next rank died before it answered) ends the set-up at once.
    let liveness = store.liveness();
    let verdict = || liveness.as_ref().and_then(Liveness::lost).map(CommError::RankLost);
    let _stop_on_loss = liveness.as_ref().map(|live| {
        let stop = stop.clone();
        live.on_lost(move || stop.store(true, Ordering::SeqCst))
    });
    let acceptor = {
        let expect = Expected { job_id: opts.job_id.clone(), generation, prev_rank, rank, world };
        let (token, stop) = (token.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("hytrain-ring-accept-{rank}"))
            .spawn(move || accept_prev(listener, expect, &token, deadline, &stop))
            .map_err(|e| setup(prev_rank, &format!("port {port}"), format!("cannot start the accepting thread: {e}")))?
    };
    let connected = (|| {
        let published = store.get(&format!("ring/{generation}/addr/{next_rank}"))?;
        let published = String::from_utf8_lossy(&published).into_owned();
        let parsed: SocketAddr =
            published.parse().map_err(|_| setup(next_rank, &published, "published address does not parse".into()))?;
        // Rank 0 hosting the store publishes the loopback address it used for it; everyone else reaches rank 0's
        // host at the address they reached the master at. With a store of its own, rank 0 is like any rank.
        let next_addr = if next_rank == 0 && store.store_in_rank_zero() {
            SocketAddr::new(store.master_ip(), parsed.port())
        } else {
            parsed
        };
        let mut next = connect_with_retry(next_addr, deadline, &stop).map_err(|e| setup(next_rank, &next_addr, e))?;
        let hello = Hello { job_id: &opts.job_id, generation, from_rank: rank, world };
        introduce(&mut next, &hello, &token, deadline).map_err(|f| match f {
            Handshake::Refused(reason) => setup(next_rank, &next_addr, format!("it refused our handshake: {reason}")),
            Handshake::ProofRefused => CommError::TokenMismatch {
                rank,
                peer: format!("rank {next_rank}"),
                addr: next_addr.to_string(),
                detail: "it refused this rank's proof; every rank must be given the same job token".into(),
            },
            Handshake::BadProof => CommError::TokenMismatch {
                rank,
                peer: format!("rank {next_rank}"),
                addr: next_addr.to_string(),
                detail: "what listens at its published address could not prove it holds this job's token".into(),
            },
            Handshake::Io(e) => setup(next_rank, &next_addr, format!("no handshake answer: {e}")),
        })?;
        Ok((next, next_addr))
    })();
    let (next, next_addr) = match connected {
        Ok(c) => c,
        Err(e) => {
            stop.store(true, Ordering::SeqCst);
            let _ = acceptor.join();
            return Err(verdict().unwrap_or(e));
        }
    };
    let prev = acceptor
        .join()
        .unwrap_or_else(|_| Err("the accepting thread panicked".into()))
        .map_err(|e| verdict().unwrap_or_else(|| setup(prev_rank, &format!("port {port}"), e)))?;

    for (s, peer) in [(&next, next_rank), (&prev, prev_rank)] {
        let configure = || -> io::Result<()> {
            s.set_nodelay(true)?;
            // Socket buffer sizes are left to Linux's autotuning: fixing SO_SNDBUF/SO_RCVBUF turns autotuning off
            // and caps them at net.core.[rw]mem_max, which is smaller than what autotuning reaches.
            s.set_read_timeout(Some(opts.collective_timeout))?;
            s.set_write_timeout(Some(opts.collective_timeout))
        };
        configure().map_err(|e| setup(peer, &"socket", e.to_string()))?;
    }

    let sync = Arc::new(Handoff {
        progress: Mutex::new(Progress { done: 0, abort: false, sender_failed: false }),
        cv: Condvar::new(),
    });
    let liveness = store.liveness();
    let on_lost = match &liveness {
        Some(live) => {
            let (next, prev, sync) = (
                next.try_clone().map_err(|e| setup(next_rank, &next_addr, e.to_string()))?,
                prev.try_clone().map_err(|e| setup(prev_rank, &"socket", e.to_string()))?,
                sync.clone(),
            );
            Some(live.on_lost(move || {
                sync.lock().abort = true;
                sync.cv.notify_all();
                let _ = next.shutdown(Shutdown::Both);
                let _ = prev.shutdown(Shutdown::Both);
            }))
        }
        None => None,
    };
    let reporter =
        Arc::new(Reporter { store: store.clone(), liveness, key: format!("ring/{generation}/failure"), rank });
    let timeout_secs = opts.collective_timeout.as_secs();
    let (job_tx, job_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let sender = {
        let next = next.try_clone().map_err(|e| setup(next_rank, &next_addr, e.to_string()))?;
        let prev = prev.try_clone().map_err(|e| setup(prev_rank, &"socket", e.to_string()))?;
        let (sync, reporter) = (sync.clone(), reporter.clone());
        std::thread::Builder::new()
            .name(format!("hytrain-ring-send-{rank}"))
            .spawn(move || {
                sender_main(SenderThread {
                    next,
                    prev,
                    jobs: job_rx,
                    done: done_tx,
                    sync,
                    reporter,
                    next_rank,
                    timeout_secs,
                })
            })
            .map_err(|e| setup(next_rank, &next_addr, format!("cannot start the sender thread: {e}")))?
    };
    tracing::debug!(rank, next = next_rank, %next_addr, "ring connected");
    Ok(Links {
        prev,
        next,
        prev_rank,
        jobs: Some(job_tx),
        done: done_rx,
        sync,
        reporter,
        collective_timeout_secs: timeout_secs,
        sender: Some(sender),
        _on_lost: on_lost,
        #[cfg(test)]
        sever_after: None,
    })
}

pub(super) fn connect_with_retry(addr: SocketAddr, deadline: Instant, stop: &AtomicBool) -> Result<TcpStream, String> {
    let mut backoff = Duration::from_millis(20);
    loop {
        if stop.load(Ordering::SeqCst) {
            return Err("stopped: the job lost a rank".into());
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(&addr, remaining.clamp(Duration::from_millis(10), Duration::from_secs(10))) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() + backoff >= deadline => return Err(format!("cannot connect: {e}")),
            Err(_) => {
                std::thread::sleep(backoff.mul_f64(0.5 + fastrand::f64()));
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Where this rank's ring port listens. Peers other than rank 0 are reached at the address they published, the
/// local address of their store connection, so they listen there only. Rank 0 is reached at whatever address the
/// others reached the master at, which it cannot know, so it listens on every interface, unless the master
/// address is a loopback address. With a store of its own, rank 0 reached it like any rank and listens like one.
pub(super) fn ring_listener(store: &Store, m: &Membership) -> io::Result<TcpListener> {
    let only: Option<IpAddr> = if m.rank == 0 && store.store_in_rank_zero() {
        let addr = m.master_addr.trim();
        let addr = addr.strip_prefix('[').and_then(|a| a.strip_suffix(']')).unwrap_or(addr);
        addr.parse::<IpAddr>().ok().filter(IpAddr::is_loopback)
    } else {
        Some(store.local_ip()).filter(|ip| !ip.is_unspecified())
    };
    match only {
        Some(ip) => TcpListener::bind((ip, 0)).or_else(|e| {
            tracing::debug!(rank = m.rank, %ip, error = %e, "cannot listen on the store's interface only; listening on all");
            bind_any(0)
        }),
        None => bind_any(0),
    }
}

/// What the connecting rank says about itself.
pub(super) struct Hello<'a> {
    pub(super) job_id: &'a str,
    pub(super) generation: u64,
    pub(super) from_rank: usize,
    pub(super) world: usize,
}

impl Hello<'_> {
    /// What both ends' proofs cover: a proof made for one link cannot open another.
    pub(super) fn context(&self) -> Vec<u8> {
        auth::context(&[
            b"ring",
            self.job_id.as_bytes(),
            &self.generation.to_le_bytes(),
            &(self.from_rank as u64).to_le_bytes(),
            &(self.world as u64).to_le_bytes(),
        ])
    }
}

/// The connecting side's handshake with `rank + 1`.
pub(super) fn introduce(
    next: &mut TcpStream,
    hello: &Hello<'_>,
    token: &JobToken,
    deadline: Instant,
) -> Result<(), Handshake> {
    let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    next.set_read_timeout(Some(remaining))?;
    next.set_write_timeout(Some(remaining))?;
    let nonce = auth::nonce()?;
    let mut frame = Vec::with_capacity(96);
    frame.extend_from_slice(HELLO);
    put_bytes(&mut frame, hello.job_id.as_bytes());
    put_u64(&mut frame, hello.generation);
    put_u64(&mut frame, hello.from_rank as u64);
    put_u64(&mut frame, hello.world as u64);
    frame.extend_from_slice(&nonce);
    next.write_all(&frame)?;
    auth::initiate(next, token, &hello.context(), &nonce)
}

/// Whom the accepting side waits for.
pub(super) struct Expected {
    pub(super) job_id: String,
    pub(super) generation: u64,
    pub(super) prev_rank: usize,
    pub(super) rank: usize,
    pub(super) world: usize,
}

/// The accepting side's handshake with one connection: its hello must name `prev_rank` of this job and ring
/// generation, and it must prove it holds the job token.
pub(super) fn admit(s: &mut TcpStream, expect: &Expected, token: &JobToken, within: Duration) -> Result<(), String> {
    let io = |e: io::Error| format!("no valid handshake: {e}");
    s.set_nonblocking(false).map_err(io)?;
    s.set_read_timeout(Some(within)).map_err(io)?;
    s.set_write_timeout(Some(within)).map_err(io)?;
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).map_err(io)?;
    if &magic != HELLO {
        return Err("it did not greet as a hytrain ring peer".into());
    }
    let job = get_bytes_max(s, MAX_JOB_ID).map_err(io)?;
    let (generation, from_rank, world) = (get_u64(s).map_err(io)?, get_u64(s).map_err(io)?, get_u64(s).map_err(io)?);
    let mut nonce = [0u8; NONCE_LEN];
    s.read_exact(&mut nonce).map_err(io)?;
    if job != expect.job_id.as_bytes()
        || generation != expect.generation
        || from_rank != expect.prev_rank as u64
        || world != expect.world as u64
    {
        let _ = auth::refuse(
            s,
            &format!(
                "this port is rank {}'s ring link {} of a job of {} ranks, waiting for rank {}",
                expect.rank, expect.generation, expect.world, expect.prev_rank
            ),
        );
        return Err(format!("it is not rank {} of this job and ring generation", expect.prev_rank));
    }
    let hello = Hello { job_id: &expect.job_id, generation, from_rank: expect.prev_rank, world: expect.world };
    match auth::respond(s, token, &hello.context(), &nonce) {
        Ok(()) => Ok(()),
        Err(Handshake::BadProof) => Err("job token mismatch (it did not prove it holds this job's token)".into()),
        Err(Handshake::Io(e)) => Err(io(e)),
        Err(other) => Err(format!("no valid handshake: {other:?}")),
    }
}

/// Accepts connections until one from `prev_rank` of this job and ring generation has proved it holds the token.
/// Each connection is checked on its own thread, so connections that stall or lie cannot hold up the real peer.
pub(super) fn accept_prev(
    listener: TcpListener,
    expect: Expected,
    token: &JobToken,
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<TcpStream, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let expect = Arc::new(expect);
    let (tx, rx) = mpsc::channel::<(SocketAddr, Result<TcpStream, String>)>();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut refused = 0usize;
    loop {
        while let Ok((from, outcome)) = rx.try_recv() {
            match outcome {
                Ok(s) => return Ok(s),
                Err(why) => {
                    refused += 1;
                    if refused <= 10 || refused.is_power_of_two() {
                        tracing::warn!(%from, refused, "refused a ring connection: {why}");
                    }
                }
            }
        }
        if stop.load(Ordering::SeqCst) {
            return Err("stopped".into());
        }
        match listener.accept() {
            Ok((mut s, from)) => {
                if in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_HANDSHAKES {
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    refused += 1;
                    continue;
                }
                let within = deadline
                    .saturating_duration_since(Instant::now())
                    .clamp(Duration::from_millis(10), HANDSHAKE_TIMEOUT);
                let (expect, token, tx, counted) = (expect.clone(), token.clone(), tx.clone(), in_flight.clone());
                let spawned = std::thread::Builder::new().name("hytrain-ring-admit".into()).spawn(move || {
                    let outcome = admit(&mut s, &expect, &token, within).map(|()| s);
                    counted.fetch_sub(1, Ordering::SeqCst);
                    let _ = tx.send((from, outcome));
                });
                if spawned.is_err() {
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    refused += 1;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "rank {} never connected to this rank (refused {refused} other connections)",
                        expect.prev_rank
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(format!("accept failed: {e}")),
        }
    }
}
