//! The store's client: [`Store`], the connection to the job's rendezvous store that every rank holds.
//!
//! [`Store::rendezvous`] connects (retrying DNS and connection until the rendezvous timeout), proves the job token,
//! registers the rank, opens the rank's liveness watch and waits until every rank has joined. Global rank 0 also
//! starts the [`Server`] in its own process first and talks to it over loopback like any other rank, unless the
//! store runs outside ([`CommOptions::external_store`]), when rank 0 joins it as a client like the others.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hytrain_cluster::JobToken;

use super::admission::Ask;
use super::auth::{self, Handshake};
use super::liveness::{self, Liveness, StoreSide, WatchHost, VERDICT_WAIT};
use super::protocol::*;
use super::server::{Server, World};
use super::wire::*;
use crate::error::RankList;
use crate::{CommError, CommOptions, Membership};

/// Extra time a client allows past the deadline it gave the server, so the server's own "timed out" answer arrives
/// before the socket read gives up.
const ANSWER_SLACK: Duration = Duration::from_secs(10);
/// Upper bound of the wait between connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

struct Conn {
    stream: TcpStream,
    /// Set when a request failed half-way: the framing is lost, so later requests must not reuse the connection.
    broken: Option<String>,
}

struct Inner {
    conn: Mutex<Conn>,
    rank: usize,
    world_size: usize,
    host: String,
    port: u16,
    job_id: String,
    opts: CommOptions,
    local_ip: IpAddr,
    master_ip: IpAddr,
    /// Whether global rank 0's process hosts the store, as the store said when this rank joined.
    in_rank_zero: AtomicBool,
    /// How many times each named sequence (a barrier name, ring set-up) was used by this process; every rank uses
    /// them in the same order, so the count tells the ranks apart from earlier rounds without any coordination.
    generations: Mutex<HashMap<String, u64>>,
    /// The job's liveness watch (jobs of two or more ranks), and the abort of this connection when a rank is lost.
    liveness: Option<(Liveness, liveness::AbortRegistration)>,
    // Last field: dropped after the connection above, so rank 0's own connection closes before the listener does.
    _server: Option<Server>,
}

/// A job's node count as a range: the store admits nodes up to `max`, and once `min` are in, closes the round after
/// `last_call` (torchrun's `last_call_timeout`) or as soon as `max` are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeRange {
    /// Nodes the job needs at least (MIN).
    pub min: usize,
    /// Nodes the job takes at most (MAX).
    pub max: usize,
    /// How long the store waits for more nodes once `min` are in.
    pub last_call: Duration,
}

/// A node's place in its round: its node rank (in the order nodes came) and the round's node count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// This node's rank, `0..nnodes`.
    pub node_rank: usize,
    /// Nodes in the round.
    pub nnodes: usize,
}

/// A connection to the job's rendezvous store, hosted in-process by global rank 0 or running on its own.
///
/// Cheap to clone; clones share one connection, so requests from several threads are served one at a time (a
/// blocking `get` holds the connection until it returns). Every key is prefixed with the job id.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("rank", &self.inner.rank)
            .field("master", &format_args!("{}:{}", self.inner.host, self.inner.port))
            .field("job_id", &self.inner.job_id)
            .finish()
    }
}

impl Store {
    /// Joins the job's rendezvous: rank 0 starts the store server on `master_port` (all interfaces), every rank
    /// connects to `master_addr:master_port` (retrying DNS and connection with exponential backoff and jitter),
    /// registers its rank, and waits until all `world_size` ranks have registered or `rendezvous_timeout` passes.
    ///
    /// Every connection to the store starts with the job-token handshake (see [`JobToken`]): a rank given a
    /// different token fails at once with "job token mismatch", naming the master's host and port, and a client
    /// that cannot prove it holds the token is dropped before it can send a request. A job of one rank, or one
    /// whose `master_addr` is a loopback address, listens on loopback only.
    ///
    /// A job of one rank has no one to meet at `master_port`, so its store listens on a port the system picks:
    /// two single-process jobs on one machine (two notebooks' runs, a test beside a job) never clash over the
    /// default port 29500.
    ///
    /// With [`CommOptions::external_store`], no rank hosts the store: every rank, rank 0 included, joins the store
    /// at `master_addr:master_port` (a standalone `hytrain rendezvous`), and losing rank 0 is a loss like any other.
    pub fn rendezvous(m: &Membership, opts: &CommOptions) -> Result<Store, CommError> {
        m.validate()?;
        opts.validate()?;
        let started = Instant::now();
        if m.rank != 0 || opts.external_store {
            return Store::join(m, opts, None, started);
        }
        let token = opts.token();
        if m.world_size > 1 && token.is_default() {
            warn_unconfigured_once();
        }
        let alone = m.world_size == 1;
        let port = if alone { 0 } else { m.master_port };
        let server = Server::start(listen_only_on(m), port, &opts.job_id, World::Fixed(m.world_size), token)?;
        if alone {
            let m = Membership { master_port: server.port(), ..m.clone() };
            return Store::join(&m, opts, Some(server), started);
        }
        Store::join(m, opts, Some(server), started)
    }

    /// The rendezvous once the store listens: through `server` when this process hosts it (reached over loopback,
    /// and kept until the last clone of the `Store` is dropped), else at `master_addr:master_port`. The client
    /// needs nothing else from the server, so a store that runs on its own is joined with `server: None` by
    /// every rank, rank 0 included. `started` is when the rendezvous began, for its deadline.
    pub(crate) fn join(
        m: &Membership,
        opts: &CommOptions,
        server: Option<Server>,
        started: Instant,
    ) -> Result<Store, CommError> {
        let deadline = started + opts.rendezvous_timeout;
        let hosts: Vec<&str> = if server.is_some() {
            // Rank 0 talks to its own server over loopback: its own host name may not resolve yet (Kubeflow creates
            // the service DNS record late), and peers never use the address of this connection.
            vec!["127.0.0.1", "::1"]
        } else {
            vec![&m.master_addr]
        };
        let stream = connect_with_retry(m, opts, &hosts, started, deadline)?;
        let watches = server.as_ref().map(Server::watches);
        let abort_handle = stream.try_clone().map_err(|e| CommError::Store {
            rank: m.rank,
            host: m.master_addr.clone(),
            port: m.master_port,
            op: "connect",
            detail: e.to_string(),
        })?;
        let local_ip = stream.local_addr().map(|a| a.ip()).unwrap_or(Ipv4Addr::UNSPECIFIED.into());
        let master_ip = stream.peer_addr().map(|a| a.ip()).unwrap_or(Ipv4Addr::UNSPECIFIED.into());
        let store = Store {
            inner: Arc::new(Inner {
                conn: Mutex::new(Conn { stream, broken: None }),
                rank: m.rank,
                world_size: m.world_size,
                host: m.master_addr.clone(),
                port: m.master_port,
                job_id: opts.job_id.clone(),
                opts: opts.clone(),
                local_ip,
                master_ip,
                in_rank_zero: AtomicBool::new(true),
                generations: Mutex::new(HashMap::new()),
                liveness: None,
                _server: server,
            }),
        };
        store.register()?;
        let store = if m.world_size > 1 {
            let live = store.watch(m, &hosts, started, deadline, watches)?;
            // A blocked request to a store that is gone or stopped ends when the watch says so.
            let registration = live.on_lost(move || {
                let _ = abort_handle.shutdown(std::net::Shutdown::Both);
            });
            let mut inner = Arc::into_inner(store.inner).expect("the store is not shared yet");
            inner.liveness = Some((live, registration));
            Store { inner: Arc::new(inner) }
        } else {
            store
        };
        store.await_joined(started, deadline)?;
        tracing::info!(
            rank = m.rank,
            world_size = m.world_size,
            master = %format_args!("{}:{}", m.master_addr, m.master_port),
            secs = started.elapsed().as_secs_f64(),
            "rendezvous complete"
        );
        Ok(store)
    }

    /// Asks the standalone store at `m`'s master address to admit this node to the job's next round of
    /// `nodes.min` to `nodes.max` nodes (see [`NodeRange`]), waiting at most the rendezvous timeout. Returns this
    /// node's rank, given in the order nodes came, and the round's node count; the node's processes then rendezvous
    /// with [`Store::rendezvous`] as ranks `node_rank * local_world_size + local_rank` of
    /// `nnodes * local_world_size`. `node` tells this node from the others (its host name and process id).
    pub fn admit(m: &Membership, opts: &CommOptions, node: &str, nodes: &NodeRange) -> Result<Admitted, CommError> {
        opts.validate()?;
        let started = Instant::now();
        let deadline = started + opts.rendezvous_timeout;
        let hosts = [m.master_addr.as_str()];
        let mut stream = connect_with_retry(m, opts, &hosts, started, deadline)?;
        let ask = Ask {
            node: node.to_string(),
            min: nodes.min,
            max: nodes.max,
            last_call: nodes.last_call,
            local_world_size: m.local_world_size,
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let failed = |detail: String| CommError::Store {
            rank: m.rank,
            host: m.master_addr.clone(),
            port: m.master_port,
            op: "admission",
            detail,
        };
        let answer = (|| -> io::Result<Result<Admitted, (u8, String, usize)>> {
            stream.set_read_timeout(Some(remaining + ANSWER_SLACK))?;
            stream.write_all(&admit_request(&opts.job_id, &ask, remaining))?;
            Ok(match get_u8(&mut stream)? {
                ST_OK => {
                    Ok(Admitted { node_rank: get_u64(&mut stream)? as usize, nnodes: get_u64(&mut stream)? as usize })
                }
                ST_TIMEOUT => Err((ST_TIMEOUT, String::new(), get_u64(&mut stream)? as usize)),
                _ => Err((
                    ST_ERR,
                    String::from_utf8_lossy(&get_bytes_max(&mut stream, auth::MAX_REASON)?).into_owned(),
                    0,
                )),
            })
        })()
        .map_err(|e| failed(describe_io(&e, remaining, false)))?;
        match answer {
            Ok(admitted) => {
                tracing::info!(
                    node_rank = admitted.node_rank,
                    nnodes = admitted.nnodes,
                    secs = started.elapsed().as_secs_f64(),
                    "admitted to the rendezvous"
                );
                Ok(admitted)
            }
            Err((ST_TIMEOUT, _, came)) => Err(CommError::TooFewNodes {
                came,
                needed: nodes.min,
                max: nodes.max,
                host: m.master_addr.clone(),
                port: m.master_port,
                secs: started.elapsed().as_secs_f64().round() as u64,
            }),
            Err((_, detail, _)) => {
                Err(CommError::Rejected { rank: m.rank, host: m.master_addr.clone(), port: m.master_port, detail })
            }
        }
    }

    /// Registers this rank with the store.
    fn register(&self) -> Result<(), CommError> {
        let i = &self.inner;
        let mut frame = Vec::new();
        put_u8(&mut frame, OP_JOIN);
        put_bytes(&mut frame, i.job_id.as_bytes());
        put_u64(&mut frame, i.rank as u64);
        put_u64(&mut frame, i.world_size as u64);
        let status = self.call("rendezvous", &frame, i.opts.collective_timeout, |st, r| match st {
            ST_OK => Ok(Ok(get_u8(r)? != 0)),
            _ => Ok(Err(String::from_utf8_lossy(&get_bytes(r)?).into_owned())),
        })?;
        match status {
            Ok(in_rank_zero) => i.in_rank_zero.store(in_rank_zero, Ordering::SeqCst),
            Err(detail) => {
                return Err(CommError::Rejected { rank: i.rank, host: i.host.clone(), port: i.port, detail });
            }
        }
        tracing::debug!(rank = i.rank, "joined the rendezvous; waiting for the other ranks");
        Ok(())
    }

    /// Opens this rank's liveness watch on a second connection (see `liveness`).
    fn watch(
        &self,
        m: &Membership,
        hosts: &[&str],
        started: Instant,
        deadline: Instant,
        server: Option<Arc<dyn WatchHost>>,
    ) -> Result<Liveness, CommError> {
        let i = &self.inner;
        // The master answered this rank's join a moment ago; if it cannot be reached now, it is gone.
        let deadline = deadline.min(Instant::now() + i.opts.peer_timeout / 2);
        let side = self.store_side();
        let mut stream = connect_with_retry(m, &i.opts, hosts, started, deadline).map_err(|e| {
            CommError::RankLost(side.lost(&format!("stopped answering during the rendezvous ({e})"), None))
        })?;
        let failed = |detail: String| self.store_error("watch", detail);
        let answer = (|| -> io::Result<Result<(), String>> {
            stream.set_read_timeout(Some(i.opts.collective_timeout.min(Duration::from_secs(60))))?;
            stream.write_all(&watch_request(i.rank, i.opts.peer_timeout))?;
            Ok(match get_u8(&mut stream)? {
                ST_OK => Ok(()),
                _ => Err(String::from_utf8_lossy(&get_bytes_max(&mut stream, auth::MAX_REASON)?).into_owned()),
            })
        })()
        .map_err(|e| failed(describe_io(&e, i.opts.collective_timeout, self.store_in_rank_zero())))?;
        answer.map_err(failed)?;
        Liveness::start(stream, i.rank, i.world_size, i.opts.peer_timeout, side, server)
            .map_err(|e| failed(format!("cannot start the watch: {e}")))
    }

    /// Where the store runs, for the verdict when it goes away.
    fn store_side(&self) -> StoreSide {
        StoreSide { endpoint: endpoint(&self.inner.host, self.inner.port), in_rank_zero: self.store_in_rank_zero() }
    }

    /// Whether global rank 0's process hosts the store (else it runs on its own), as the store said when this
    /// rank joined. Rank 0 then reached it over loopback, so its peers reach rank 0 at the master's address.
    pub(crate) fn store_in_rank_zero(&self) -> bool {
        self.inner.in_rank_zero.load(Ordering::SeqCst)
    }

    /// Waits until every rank has registered.
    fn await_joined(&self, started: Instant, deadline: Instant) -> Result<(), CommError> {
        let i = &self.inner;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let mut frame = Vec::new();
        put_u8(&mut frame, OP_AWAIT_JOINED);
        put_u64(&mut frame, remaining.as_millis() as u64);
        let (complete, missing, note) = self.call("rendezvous", &frame, remaining + ANSWER_SLACK, |st, r| {
            let missing = get_u64_list(r)?;
            let note = get_bytes_max(r, auth::MAX_REASON)?;
            Ok((st == ST_OK, missing, String::from_utf8_lossy(&note).into_owned()))
        })?;
        if complete {
            return Ok(());
        }
        let missing = RankList(missing.into_iter().map(|r| r as usize).collect());
        let secs = started.elapsed().as_secs_f64().round() as u64;
        Err(if i.rank == 0 {
            CommError::RanksMissing { host: i.host.clone(), port: i.port, secs, missing, note }
        } else {
            CommError::Unreachable {
                rank: i.rank,
                host: i.host.clone(),
                port: i.port,
                secs,
                detail: format!("ranks still missing: {missing}{note}"),
            }
        })
    }

    /// Stores `value` under `key`, replacing any earlier value.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), CommError> {
        let mut frame = Vec::with_capacity(key.len() + value.len() + 32);
        put_u8(&mut frame, OP_SET);
        put_bytes(&mut frame, self.key(key).as_bytes());
        put_bytes(&mut frame, value);
        self.call("set", &frame, self.inner.opts.collective_timeout, |_, _| Ok(()))
    }

    /// Stores `value` under `key` unless the key exists; returns the value the key holds afterwards (the first
    /// writer's). Lets several ranks race to record one fact, such as the first failure.
    pub fn set_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, CommError> {
        let mut frame = Vec::new();
        put_u8(&mut frame, OP_SET_IF_ABSENT);
        put_bytes(&mut frame, self.key(key).as_bytes());
        put_bytes(&mut frame, value);
        self.call("set", &frame, self.inner.opts.collective_timeout, |_, r| get_bytes(r))
    }

    /// [`Store::set_if_absent`] that gives up after `answer_within` (used on failure paths, where the master may be
    /// the rank that died).
    pub(crate) fn set_if_absent_within(
        &self,
        key: &str,
        value: &[u8],
        answer_within: Duration,
    ) -> Result<Vec<u8>, CommError> {
        let mut frame = Vec::new();
        put_u8(&mut frame, OP_SET_IF_ABSENT);
        put_bytes(&mut frame, self.key(key).as_bytes());
        put_bytes(&mut frame, value);
        self.call("set", &frame, answer_within, |_, r| get_bytes(r))
    }

    /// Returns the value of `key`, waiting until some rank sets it (at most `rendezvous_timeout`).
    pub fn get(&self, key: &str) -> Result<Vec<u8>, CommError> {
        self.get_timeout(key, self.inner.opts.rendezvous_timeout)
    }

    /// Like [`Store::get`] with an explicit deadline.
    pub fn get_timeout(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, CommError> {
        let mut frame = Vec::new();
        put_u8(&mut frame, OP_GET);
        put_bytes(&mut frame, self.key(key).as_bytes());
        put_u64(&mut frame, timeout.as_millis() as u64);
        let v = self.call("get", &frame, timeout + ANSWER_SLACK, |st, r| match st {
            ST_OK => Ok(Some(get_bytes(r)?)),
            _ => Ok(None),
        })?;
        v.ok_or_else(|| self.timeout_error(timeout, format!("key '{key}'")))
    }

    /// Adds `delta` to the integer stored at `key` (a missing key counts as 0) and returns the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64, CommError> {
        let mut frame = Vec::new();
        put_u8(&mut frame, OP_ADD);
        put_bytes(&mut frame, self.key(key).as_bytes());
        put_u64(&mut frame, delta as u64);
        let v = self.call("add", &frame, self.inner.opts.collective_timeout, |st, r| match st {
            ST_OK => Ok(Ok(get_u64(r)? as i64)),
            _ => Ok(Err(String::from_utf8_lossy(&get_bytes(r)?).into_owned())),
        })?;
        v.map_err(|detail| self.store_error("add", detail))
    }

    /// Waits until every key in `keys` exists (at most `rendezvous_timeout`); on timeout the error names the keys
    /// still missing.
    pub fn wait(&self, keys: &[&str]) -> Result<(), CommError> {
        let missing = self.wait_for(keys, self.inner.opts.rendezvous_timeout)?;
        if missing.is_empty() {
            Ok(())
        } else {
            let what = format!("keys {}", missing.iter().map(|k| format!("'{k}'")).collect::<Vec<_>>().join(", "));
            Err(self.timeout_error(self.inner.opts.rendezvous_timeout, what))
        }
    }

    /// Returns the keys (unprefixed) still missing after waiting up to `timeout`; empty when all exist.
    fn wait_for(&self, keys: &[&str], timeout: Duration) -> Result<Vec<String>, CommError> {
        let mut frame = Vec::new();
        put_u8(&mut frame, OP_WAIT);
        put_u64(&mut frame, keys.len() as u64);
        for k in keys {
            put_bytes(&mut frame, self.key(k).as_bytes());
        }
        put_u64(&mut frame, timeout.as_millis() as u64);
        let missing = self.call("wait", &frame, timeout + ANSWER_SLACK, |st, r| {
            if st == ST_OK {
                return Ok(Vec::new());
            }
            let n = get_u64(r)? as usize;
            (0..n).map(|_| get_string(r)).collect::<io::Result<Vec<_>>>()
        })?;
        let prefix = format!("{}/", self.inner.job_id);
        Ok(missing.into_iter().map(|k| k.strip_prefix(&prefix).map(str::to_string).unwrap_or(k)).collect())
    }

    /// How many nodes wait at the standalone store for this round to end so they can join the next (a job whose
    /// node count is a range): the ranks make room for them at a step boundary. One small request.
    pub fn nodes_waiting(&self) -> Result<usize, CommError> {
        Ok(self.add(super::server::NODES_WAITING, 0)?.max(0) as usize)
    }

    /// Waits until all `world_size` ranks have called `barrier` with this `name` (at most `rendezvous_timeout`).
    /// A name may be reused: the n-th call on each rank meets the n-th call on the others.
    pub fn barrier(&self, name: &str) -> Result<(), CommError> {
        self.barrier_timeout(name, self.inner.opts.rendezvous_timeout)
    }

    /// [`Store::barrier`] with an explicit deadline.
    pub fn barrier_timeout(&self, name: &str, timeout: Duration) -> Result<(), CommError> {
        let gen = self.next_generation(&format!("barrier/{name}"));
        let base = format!("barrier/{name}/{gen}");
        self.set(&format!("{base}/arrived/{}", self.inner.rank), b"")?;
        let n = self.add(&format!("{base}/count"), 1)?;
        if n == self.inner.world_size as i64 {
            self.set(&format!("{base}/done"), b"")?;
        }
        let done = format!("{base}/done");
        if self.wait_for(&[&done], timeout)?.is_empty() {
            return Ok(());
        }
        let arrived: Vec<String> = (0..self.inner.world_size).map(|r| format!("{base}/arrived/{r}")).collect();
        let arrived: Vec<&str> = arrived.iter().map(String::as_str).collect();
        let missing = self.wait_for(&arrived, Duration::ZERO)?;
        let ranks = RankList(missing.iter().filter_map(|k| k.rsplit('/').next()?.parse().ok()).collect());
        Err(self.timeout_error(timeout, format!("barrier '{name}' (ranks still missing: {ranks})")))
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.inner.rank
    }

    /// The number of ranks in the job.
    pub fn world_size(&self) -> usize {
        self.inner.world_size
    }

    /// The options the rendezvous was made with.
    pub fn options(&self) -> &CommOptions {
        &self.inner.opts
    }

    /// This host's address on the interface that reaches the master; peers can reach this rank there.
    pub fn local_ip(&self) -> IpAddr {
        self.inner.local_ip
    }

    /// The master's address as this rank reached it (loopback on rank 0).
    pub fn master_ip(&self) -> IpAddr {
        self.inner.master_ip
    }

    /// This rank's view of the job's liveness: which rank was lost, if any, and the goodbye at the end (see
    /// [`Liveness`]). `None` for a job of one rank.
    pub fn liveness(&self) -> Option<Liveness> {
        self.inner.liveness.as_ref().map(|(l, _)| l.clone())
    }

    /// Counts how often `name` was used on this rank, starting at 0.
    pub(crate) fn next_generation(&self, name: &str) -> u64 {
        let mut g = self.inner.generations.lock().unwrap_or_else(|p| p.into_inner());
        let e = g.entry(name.to_string()).or_insert(0);
        let v = *e;
        *e += 1;
        v
    }

    fn key(&self, key: &str) -> String {
        format!("{}/{key}", self.inner.job_id)
    }

    fn store_error(&self, op: &'static str, detail: String) -> CommError {
        let i = &self.inner;
        CommError::Store { rank: i.rank, host: i.host.clone(), port: i.port, op, detail }
    }

    fn timeout_error(&self, waited: Duration, what: String) -> CommError {
        let i = &self.inner;
        CommError::StoreTimeout { rank: i.rank, host: i.host.clone(), port: i.port, secs: waited.as_secs(), what }
    }

    /// Sends one request and parses its answer with `parse(status, reader)` while holding the connection.
    fn call<T>(
        &self,
        op: &'static str,
        frame: &[u8],
        answer_within: Duration,
        parse: impl FnOnce(u8, &mut TcpStream) -> io::Result<T>,
    ) -> Result<T, CommError> {
        let mut conn = self.inner.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &conn.broken {
            return Err(self.store_error(op, format!("connection unusable after an earlier failure: {why}")));
        }
        let result = (|| {
            conn.stream.set_read_timeout(Some(answer_within.max(Duration::from_millis(1))))?;
            conn.stream.write_all(frame)?;
            let status = get_u8(&mut conn.stream)?;
            if status == ST_LOST {
                return Ok(Err(liveness::decode_lost(&mut conn.stream)?));
            }
            parse(status, &mut conn.stream).map(Ok)
        })();
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(lost)) => Err(CommError::RankLost(lost)),
            Err(e) => {
                let detail = describe_io(&e, answer_within, self.store_in_rank_zero());
                conn.broken = Some(detail.clone());
                // The watch may already know why the connection broke.
                match self.liveness().and_then(|l| l.wait_lost(Some(VERDICT_WAIT))) {
                    Some(lost) => Err(CommError::RankLost(lost)),
                    None => Err(self.store_error(op, detail)),
                }
            }
        }
    }
}

/// What an I/O error on the store connection means; `in_rank_zero`: whether rank 0's process hosts the store.
fn describe_io(e: &io::Error, waited: Duration, in_rank_zero: bool) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => {
            if in_rank_zero {
                "connection closed by the master (lost rank 0: it exited or was killed)".into()
            } else {
                "connection closed by the rendezvous store (its process exited or was killed)".into()
            }
        }
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            let who = if in_rank_zero { "rank 0" } else { "the rendezvous store" };
            format!("no answer within {} s (is {who} stuck?)", waited.as_secs())
        }
        _ => e.to_string(),
    }
}

/// The address the store listens on when it need not be reachable from other hosts: loopback for a job of one
/// rank, or the master address itself when that is a loopback address. `None`: every interface.
pub(super) fn listen_only_on(m: &Membership) -> Option<IpAddr> {
    if m.world_size == 1 {
        return Some(Ipv4Addr::LOCALHOST.into());
    }
    let addr = m.master_addr.trim();
    let addr = addr.strip_prefix('[').and_then(|a| a.strip_suffix(']')).unwrap_or(addr);
    addr.parse::<IpAddr>().ok().filter(IpAddr::is_loopback)
}

fn warn_unconfigured_once() {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            "no job token configured: the rendezvous and the ring accept any process that knows this job's identity, \
             which keeps other jobs out by accident but not an attacker; set HYTRAIN_JOB_TOKEN (or \
             HYTRAIN_JOB_TOKEN_FILE) to the same random secret on every rank"
        )
    });
}

/// What went wrong with one connection attempt: worth retrying, or a definite answer that retrying won't change.
enum Attempt {
    Retry(String),
    /// Not a hytrain store, or one that does not answer.
    Fatal(String),
    /// A hytrain store of another job: its reason.
    Rejected(String),
    /// The token check failed: what the rank should know.
    Mismatch(String),
}

pub(super) fn connect_with_retry(
    m: &Membership,
    opts: &CommOptions,
    hosts: &[&str],
    started: Instant,
    deadline: Instant,
) -> Result<TcpStream, CommError> {
    let mut backoff = Duration::from_millis(100);
    let mut attempts = 0u32;
    let mut last_log = started;
    loop {
        attempts += 1;
        let last = match try_connect(hosts, m.master_port, deadline, &opts.job_id, &opts.token()) {
            Ok(s) => {
                if attempts > 1 {
                    tracing::info!(rank = m.rank, attempts, "reached master {}:{}", m.master_addr, m.master_port);
                }
                return Ok(s);
            }
            Err(Attempt::Fatal(detail)) => {
                return Err(CommError::Store {
                    rank: m.rank,
                    host: m.master_addr.clone(),
                    port: m.master_port,
                    op: "connect",
                    detail,
                });
            }
            Err(Attempt::Rejected(detail)) => {
                return Err(CommError::Rejected {
                    rank: m.rank,
                    host: m.master_addr.clone(),
                    port: m.master_port,
                    detail,
                });
            }
            Err(Attempt::Mismatch(detail)) => {
                return Err(CommError::TokenMismatch {
                    rank: m.rank,
                    peer: "the rendezvous store".into(),
                    addr: endpoint(&m.master_addr, m.master_port),
                    detail,
                });
            }
            Err(Attempt::Retry(e)) => e,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(CommError::Unreachable {
                rank: m.rank,
                host: m.master_addr.clone(),
                port: m.master_port,
                secs: started.elapsed().as_secs_f64().round() as u64,
                detail: format!("not connected: {last}"),
            });
        }
        if attempts == 1 || now.duration_since(last_log) >= Duration::from_secs(30) {
            last_log = now;
            tracing::info!(
                rank = m.rank,
                "waiting for master {}:{}: {last} (retrying for up to {} s)",
                m.master_addr,
                m.master_port,
                opts.rendezvous_timeout.as_secs()
            );
        }
        // Jitter keeps hundreds of ranks that started together from hammering the master in lockstep.
        let pause = backoff.mul_f64(0.5 + fastrand::f64()).min(deadline - now);
        std::thread::sleep(pause);
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// `host:port`, with brackets around an IPv6 address.
pub(crate) fn endpoint(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn try_connect(
    hosts: &[&str],
    port: u16,
    deadline: Instant,
    job_id: &str,
    token: &JobToken,
) -> Result<TcpStream, Attempt> {
    let mut last = String::new();
    let mut addrs = Vec::new();
    for host in hosts {
        match (*host, port).to_socket_addrs() {
            Ok(a) => addrs.extend(a),
            Err(e) => last = format!("cannot resolve {host}: {e}"),
        }
    }
    if addrs.is_empty() && last.is_empty() {
        last = format!("{} resolved to no address", hosts.join(", "));
    }
    for addr in addrs {
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
        match TcpStream::connect_timeout(&addr, remaining.min(Duration::from_secs(10))) {
            Ok(s) => return greet(s, remaining.min(Duration::from_secs(30)), job_id, token),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(Attempt::Retry(last))
}

fn greet(mut s: TcpStream, within: Duration, job_id: &str, token: &JobToken) -> Result<TcpStream, Attempt> {
    let io = |e: io::Error| Attempt::Retry(format!("connected but the greeting failed: {e}"));
    s.set_nodelay(true).map_err(io)?;
    s.set_read_timeout(Some(within)).map_err(io)?;
    s.set_write_timeout(Some(within)).map_err(io)?;
    let nonce = auth::nonce().map_err(|e| Attempt::Fatal(e.to_string()))?;
    let mut hello = Vec::with_capacity(64 + job_id.len());
    hello.extend_from_slice(HELLO);
    put_bytes(&mut hello, job_id.as_bytes());
    hello.extend_from_slice(&nonce);
    s.write_all(&hello).map_err(io)?;
    let mut reply = [0u8; 8];
    match s.read_exact(&mut reply) {
        Ok(()) if &reply == HELLO => {}
        Ok(()) => return Err(Attempt::Fatal(
            "the service on this port is not a hytrain rendezvous store of this version (wrong MASTER_PORT, or ranks running different hytrain versions?)".into(),
        )),
        // The server may be closing a listener from an earlier job; a fresh attempt decides.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(io(e)),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Err(Attempt::Fatal(
            format!("the service on this port did not answer the greeting within {} s; it is not a hytrain rendezvous store (wrong MASTER_PORT?)", within.as_secs()),
        )),
        Err(e) => return Err(io(e)),
    }
    let context = auth::context(&[b"store", job_id.as_bytes()]);
    match auth::initiate(&mut s, token, &context, &nonce) {
        Ok(()) => {}
        Err(Handshake::Refused(reason)) => return Err(Attempt::Rejected(reason)),
        Err(Handshake::ProofRefused) => {
            return Err(Attempt::Mismatch(
                "the master refused this rank's proof; every rank must be given the same job token \
                 (HYTRAIN_JOB_TOKEN or the contents of HYTRAIN_JOB_TOKEN_FILE)"
                    .into(),
            ))
        }
        Err(Handshake::BadProof) => {
            return Err(Attempt::Mismatch(
                "the master could not prove it holds this job's token; what listens there is not this job's rank 0 \
                 (or it was given a different HYTRAIN_JOB_TOKEN)"
                    .into(),
            ))
        }
        // Dropped in the handshake: the master may be busy with many ranks at once; a fresh attempt decides.
        Err(Handshake::Io(e)) => return Err(io(e)),
    }
    s.set_write_timeout(None).map_err(io)?;
    Ok(s)
}
