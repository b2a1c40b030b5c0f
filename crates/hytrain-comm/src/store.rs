//! The rendezvous store: a small key-value server hosted by global rank 0, and the client every rank uses.
//!
//! One TCP connection per client, one server thread per connection, one request at a time per connection. Blocking
//! requests (get, wait, the rendezvous itself) block on the server, which answers as soon as the condition holds or
//! the client's deadline passes, so no rank polls.

use std::collections::{BTreeSet, HashMap};
use std::io::{self, BufReader, BufWriter, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::RankList;
use crate::wire::*;
use crate::{CommError, CommOptions, Membership};

const HELLO: &[u8; 8] = b"HYTSTOR1";

const OP_SET: u8 = 1;
const OP_GET: u8 = 2;
const OP_ADD: u8 = 3;
const OP_WAIT: u8 = 4;
const OP_SET_IF_ABSENT: u8 = 5;
const OP_JOIN: u8 = 6;
const OP_AWAIT_JOINED: u8 = 7;

const ST_OK: u8 = 0;
const ST_TIMEOUT: u8 = 1;
const ST_ERR: u8 = 2;

/// Extra time a client allows past the deadline it gave the server, so the server's own "timed out" answer arrives
/// before the socket read gives up.
const ANSWER_SLACK: Duration = Duration::from_secs(10);
/// How often the accept loop checks whether the store was dropped.
const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// Upper bound of the wait between connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------------------------
// Server

struct ServerState {
    kv: HashMap<String, Vec<u8>>,
    job_id: String,
    world_size: usize,
    joined: BTreeSet<usize>,
}

struct Shared {
    state: Mutex<ServerState>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ServerState> {
        // A connection thread that panicked cannot leave the map half-updated (every update is one insert), so a
        // poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks until `ready` holds or `deadline` passes; returns whether it holds.
    fn wait_until(&self, deadline: Instant, mut ready: impl FnMut(&ServerState) -> bool) -> bool {
        let mut st = self.lock();
        loop {
            if ready(&st) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// The listening half, owned by rank 0's `Store`. Dropping it stops accepting new connections; connections already
/// open keep being served until their clients hang up, so ranks still finishing a rendezvous are not cut off.
struct Server {
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    fn start(
        port: u16,
        job_id: &str,
        world_size: usize,
    ) -> Result<(Server, SocketAddr), CommError> {
        let listener = bind_any(port).map_err(|source| CommError::Bind { port, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| CommError::Bind { port, source })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| CommError::Bind { port, source })?;
        let shared = Arc::new(Shared {
            state: Mutex::new(ServerState {
                kv: HashMap::new(),
                job_id: job_id.to_string(),
                world_size,
                joined: BTreeSet::new(),
            }),
            changed: Condvar::new(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let accept = std::thread::Builder::new()
            .name("hytrain-store".into())
            .spawn(move || accept_loop(listener, shared, stop2))
            .map_err(|source| CommError::Bind { port, source })?;
        tracing::debug!(port = local.port(), "rendezvous store listening");
        Ok((
            Server {
                stop,
                accept: Some(accept),
            },
            local,
        ))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// Listens on every interface, IPv6 and IPv4 where the kernel allows a dual-stack socket.
pub(crate) fn bind_any(port: u16) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let dual_stack = || -> io::Result<TcpListener> {
        let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
        // Explicitly, since net.ipv6.bindv6only=1 would otherwise shut out IPv4 peers.
        s.set_only_v6(false)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
        // Every rank of a large job connects at once; a short backlog would drop some of them for a while.
        s.listen(4096)?;
        Ok(s.into())
    };
    match dual_stack() {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(e),
        // Kernels or containers without IPv6 refuse the v6 socket; plain IPv4 then.
        Err(_) => TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)),
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let shared = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name("hytrain-store-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve(stream, &shared) {
                            tracing::debug!(%peer, error = %e, "store connection ended");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(%peer, error = %e, "store could not start a connection thread");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) => {
                tracing::debug!(error = %e, "store accept failed");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

fn serve(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    let mut r = BufReader::new(stream.try_clone()?);
    let mut w = BufWriter::new(stream);
    let mut hello = [0u8; 8];
    std::io::Read::read_exact(&mut r, &mut hello)?;
    if &hello != HELLO {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "client did not greet as a hytrain store client",
        ));
    }
    send(&mut w, HELLO)?;
    let mut out = Vec::new();
    loop {
        let op = match get_u8(&mut r) {
            Ok(op) => op,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        out.clear();
        match op {
            OP_SET => {
                let key = get_string(&mut r)?;
                let value = get_bytes(&mut r)?;
                shared.lock().kv.insert(key, value);
                shared.changed.notify_all();
                put_u8(&mut out, ST_OK);
            }
            OP_SET_IF_ABSENT => {
                let key = get_string(&mut r)?;
                let value = get_bytes(&mut r)?;
                let stored = shared.lock().kv.entry(key).or_insert(value).clone();
                shared.changed.notify_all();
                put_u8(&mut out, ST_OK);
                put_bytes(&mut out, &stored);
            }
            OP_GET => {
                let key = get_string(&mut r)?;
                let deadline = deadline_from(get_u64(&mut r)?);
                if shared.wait_until(deadline, |st| st.kv.contains_key(&key)) {
                    let v = shared.lock().kv.get(&key).cloned().unwrap_or_default();
                    put_u8(&mut out, ST_OK);
                    put_bytes(&mut out, &v);
                } else {
                    put_u8(&mut out, ST_TIMEOUT);
                }
            }
            OP_ADD => {
                let key = get_string(&mut r)?;
                let delta = get_u64(&mut r)? as i64;
                let mut st = shared.lock();
                let current = match st.kv.get(&key) {
                    None => Some(0),
                    Some(v) => std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse::<i64>().ok()),
                };
                match current {
                    Some(c) => {
                        let n = c.wrapping_add(delta);
                        st.kv.insert(key, n.to_string().into_bytes());
                        drop(st);
                        shared.changed.notify_all();
                        put_u8(&mut out, ST_OK);
                        put_u64(&mut out, n as u64);
                    }
                    None => {
                        drop(st);
                        put_u8(&mut out, ST_ERR);
                        put_bytes(
                            &mut out,
                            format!("key {key} holds a value that is not an integer").as_bytes(),
                        );
                    }
                }
            }
            OP_WAIT => {
                let n = get_u64(&mut r)? as usize;
                if n > MAX_FIELD / 8 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "too many keys"));
                }
                let keys = (0..n)
                    .map(|_| get_string(&mut r))
                    .collect::<io::Result<Vec<_>>>()?;
                let deadline = deadline_from(get_u64(&mut r)?);
                if shared.wait_until(deadline, |st| keys.iter().all(|k| st.kv.contains_key(k))) {
                    put_u8(&mut out, ST_OK);
                } else {
                    let st = shared.lock();
                    let missing: Vec<&String> =
                        keys.iter().filter(|k| !st.kv.contains_key(*k)).collect();
                    put_u8(&mut out, ST_TIMEOUT);
                    put_u64(&mut out, missing.len() as u64);
                    for k in missing {
                        put_bytes(&mut out, k.as_bytes());
                    }
                }
            }
            OP_JOIN => {
                let job = get_string(&mut r)?;
                let rank = get_u64(&mut r)? as usize;
                let world = get_u64(&mut r)? as usize;
                let mut st = shared.lock();
                let refusal = if job != st.job_id {
                    Some(format!(
                        "it hosts job '{}' but this rank belongs to job '{job}'; two jobs share this address and port",
                        st.job_id
                    ))
                } else if world != st.world_size {
                    Some(format!(
                        "this rank has world_size {world} but rank 0 has {}; every worker must get the same WORLD_SIZE",
                        st.world_size
                    ))
                } else if !st.joined.insert(rank) {
                    Some(format!(
                        "rank {rank} already joined; two workers were started with the same rank"
                    ))
                } else {
                    None
                };
                drop(st);
                shared.changed.notify_all();
                match refusal {
                    None => put_u8(&mut out, ST_OK),
                    Some(msg) => {
                        put_u8(&mut out, ST_ERR);
                        put_bytes(&mut out, msg.as_bytes());
                    }
                }
            }
            OP_AWAIT_JOINED => {
                let deadline = deadline_from(get_u64(&mut r)?);
                let complete = shared.wait_until(deadline, |st| st.joined.len() >= st.world_size);
                let st = shared.lock();
                let missing: Vec<u64> = (0..st.world_size)
                    .filter(|r| !st.joined.contains(r))
                    .map(|r| r as u64)
                    .collect();
                drop(st);
                put_u8(&mut out, if complete { ST_OK } else { ST_TIMEOUT });
                put_u64_list(&mut out, &missing);
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown store request {other}"),
                ));
            }
        }
        send(&mut w, &out)?;
    }
}

fn deadline_from(timeout_ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(timeout_ms.min(u32::MAX as u64))
}

// ---------------------------------------------------------------------------------------------------------------
// Client

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
    /// How many times each named sequence (a barrier name, ring set-up) was used by this process; every rank uses
    /// them in the same order, so the count tells the ranks apart from earlier rounds without any coordination.
    generations: Mutex<HashMap<String, u64>>,
    // Last field: dropped after the connection above, so rank 0's own connection closes before the listener does.
    _server: Option<Server>,
}

/// A connection to the job's rendezvous store, hosted in-process by global rank 0.
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
            .field(
                "master",
                &format_args!("{}:{}", self.inner.host, self.inner.port),
            )
            .field("job_id", &self.inner.job_id)
            .finish()
    }
}

impl Store {
    /// Joins the job's rendezvous: rank 0 starts the store server on `master_port` (all interfaces), every rank
    /// connects to `master_addr:master_port` (retrying DNS and connection with exponential backoff and jitter),
    /// registers its rank, and waits until all `world_size` ranks have registered or `rendezvous_timeout` passes.
    pub fn rendezvous(m: &Membership, opts: &CommOptions) -> Result<Store, CommError> {
        m.validate()?;
        let started = Instant::now();
        let deadline = started + opts.rendezvous_timeout;
        let (server, stream) = if m.rank == 0 {
            let (server, _) = Server::start(m.master_port, &opts.job_id, m.world_size)?;
            // Rank 0 talks to its own server over loopback: its own host name may not resolve yet (Kubeflow creates
            // the service DNS record late), and peers never use the address of this connection.
            let stream = connect_with_retry(m, opts, &["127.0.0.1", "::1"], started, deadline)?;
            (Some(server), stream)
        } else {
            (
                None,
                connect_with_retry(m, opts, &[&m.master_addr], started, deadline)?,
            )
        };
        let local_ip = stream
            .local_addr()
            .map(|a| a.ip())
            .unwrap_or(Ipv4Addr::UNSPECIFIED.into());
        let master_ip = stream
            .peer_addr()
            .map(|a| a.ip())
            .unwrap_or(Ipv4Addr::UNSPECIFIED.into());
        let store = Store {
            inner: Arc::new(Inner {
                conn: Mutex::new(Conn {
                    stream,
                    broken: None,
                }),
                rank: m.rank,
                world_size: m.world_size,
                host: m.master_addr.clone(),
                port: m.master_port,
                job_id: opts.job_id.clone(),
                opts: opts.clone(),
                local_ip,
                master_ip,
                generations: Mutex::new(HashMap::new()),
                _server: server,
            }),
        };
        store.join(started, deadline)?;
        tracing::info!(
            rank = m.rank,
            world_size = m.world_size,
            master = %format_args!("{}:{}", m.master_addr, m.master_port),
            secs = started.elapsed().as_secs_f64(),
            "rendezvous complete"
        );
        Ok(store)
    }

    fn join(&self, started: Instant, deadline: Instant) -> Result<(), CommError> {
        let i = &self.inner;
        let mut frame = Vec::new();
        put_u8(&mut frame, OP_JOIN);
        put_bytes(&mut frame, i.job_id.as_bytes());
        put_u64(&mut frame, i.rank as u64);
        put_u64(&mut frame, i.world_size as u64);
        let status = self.call(
            "rendezvous",
            &frame,
            i.opts.collective_timeout,
            |st, r| match st {
                ST_OK => Ok(Ok(())),
                _ => Ok(Err(String::from_utf8_lossy(&get_bytes(r)?).into_owned())),
            },
        )?;
        if let Err(detail) = status {
            return Err(CommError::Rejected {
                rank: i.rank,
                host: i.host.clone(),
                port: i.port,
                detail,
            });
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let mut frame = Vec::new();
        put_u8(&mut frame, OP_AWAIT_JOINED);
        put_u64(&mut frame, remaining.as_millis() as u64);
        let (complete, missing) =
            self.call("rendezvous", &frame, remaining + ANSWER_SLACK, |st, r| {
                let missing = get_u64_list(r)?;
                Ok((st == ST_OK, missing))
            })?;
        if complete {
            return Ok(());
        }
        let missing = RankList(missing.into_iter().map(|r| r as usize).collect());
        let secs = started.elapsed().as_secs_f64().round() as u64;
        Err(if i.rank == 0 {
            CommError::RanksMissing {
                host: i.host.clone(),
                port: i.port,
                secs,
                missing,
            }
        } else {
            CommError::Unreachable {
                rank: i.rank,
                host: i.host.clone(),
                port: i.port,
                secs,
                detail: format!("ranks still missing: {missing}"),
            }
        })
    }

    /// Stores `value` under `key`, replacing any earlier value.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), CommError> {
        let mut frame = Vec::with_capacity(key.len() + value.len() + 32);
        put_u8(&mut frame, OP_SET);
        put_bytes(&mut frame, self.key(key).as_bytes());
        put_bytes(&mut frame, value);
        self.call("set", &frame, self.inner.opts.collective_timeout, |_, _| {
            Ok(())
        })
    }

    /// Stores `value` under `key` unless the key exists; returns the value the key holds afterwards (the first
    /// writer's). Lets several ranks race to record one fact, such as the first failure.
    pub fn set_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, CommError> {
        let mut frame = Vec::new();
        put_u8(&mut frame, OP_SET_IF_ABSENT);
        put_bytes(&mut frame, self.key(key).as_bytes());
        put_bytes(&mut frame, value);
        self.call("set", &frame, self.inner.opts.collective_timeout, |_, r| {
            get_bytes(r)
        })
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
        let v = self.call(
            "add",
            &frame,
            self.inner.opts.collective_timeout,
            |st, r| match st {
                ST_OK => Ok(Ok(get_u64(r)? as i64)),
                _ => Ok(Err(String::from_utf8_lossy(&get_bytes(r)?).into_owned())),
            },
        )?;
        v.map_err(|detail| self.store_error("add", detail))
    }

    /// Waits until every key in `keys` exists (at most `rendezvous_timeout`); on timeout the error names the keys
    /// still missing.
    pub fn wait(&self, keys: &[&str]) -> Result<(), CommError> {
        let missing = self.wait_for(keys, self.inner.opts.rendezvous_timeout)?;
        if missing.is_empty() {
            Ok(())
        } else {
            let what = format!(
                "keys {}",
                missing
                    .iter()
                    .map(|k| format!("'{k}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
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
            (0..n)
                .map(|_| get_string(r))
                .collect::<io::Result<Vec<_>>>()
        })?;
        let prefix = format!("{}/", self.inner.job_id);
        Ok(missing
            .into_iter()
            .map(|k| k.strip_prefix(&prefix).map(str::to_string).unwrap_or(k))
            .collect())
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
        let arrived: Vec<String> = (0..self.inner.world_size)
            .map(|r| format!("{base}/arrived/{r}"))
            .collect();
        let arrived: Vec<&str> = arrived.iter().map(String::as_str).collect();
        let missing = self.wait_for(&arrived, Duration::ZERO)?;
        let ranks = RankList(
            missing
                .iter()
                .filter_map(|k| k.rsplit('/').next()?.parse().ok())
                .collect(),
        );
        Err(self.timeout_error(
            timeout,
            format!("barrier '{name}' (ranks still missing: {ranks})"),
        ))
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

    /// Counts how often `name` was used on this rank, starting at 0.
    pub(crate) fn next_generation(&self, name: &str) -> u64 {
        let mut g = self
            .inner
            .generations
            .lock()
            .unwrap_or_else(|p| p.into_inner());
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
        CommError::Store {
            rank: i.rank,
            host: i.host.clone(),
            port: i.port,
            op,
            detail,
        }
    }

    fn timeout_error(&self, waited: Duration, what: String) -> CommError {
        let i = &self.inner;
        CommError::StoreTimeout {
            rank: i.rank,
            host: i.host.clone(),
            port: i.port,
            secs: waited.as_secs(),
            what,
        }
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
            return Err(self.store_error(
                op,
                format!("connection unusable after an earlier failure: {why}"),
            ));
        }
        let result = (|| {
            conn.stream
                .set_read_timeout(Some(answer_within.max(Duration::from_millis(1))))?;
            conn.stream.write_all(frame)?;
            let status = get_u8(&mut conn.stream)?;
            parse(status, &mut conn.stream)
        })();
        result.map_err(|e| {
            let detail = describe_io(&e, answer_within);
            conn.broken = Some(detail.clone());
            self.store_error(op, detail)
        })
    }
}

fn describe_io(e: &io::Error, waited: Duration) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => "connection closed by the master (did rank 0 exit?)".into(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("no answer within {} s (is rank 0 stuck?)", waited.as_secs())
        }
        _ => e.to_string(),
    }
}

/// What went wrong with one connection attempt: worth retrying, or a definite answer that retrying won't change.
enum Attempt {
    Retry(String),
    Fatal(String),
}

fn connect_with_retry(
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
        let last = match try_connect(hosts, m.master_port, deadline) {
            Ok(s) => {
                if attempts > 1 {
                    tracing::info!(
                        rank = m.rank,
                        attempts,
                        "reached master {}:{}",
                        m.master_addr,
                        m.master_port
                    );
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

fn try_connect(hosts: &[&str], port: u16, deadline: Instant) -> Result<TcpStream, Attempt> {
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
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10));
        match TcpStream::connect_timeout(&addr, remaining.min(Duration::from_secs(10))) {
            Ok(s) => return greet(s, remaining.min(Duration::from_secs(30))),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(Attempt::Retry(last))
}

fn greet(mut s: TcpStream, within: Duration) -> Result<TcpStream, Attempt> {
    let io = |e: io::Error| Attempt::Retry(format!("connected but the greeting failed: {e}"));
    s.set_nodelay(true).map_err(io)?;
    s.set_read_timeout(Some(within)).map_err(io)?;
    s.write_all(HELLO).map_err(io)?;
    let mut reply = [0u8; 8];
    match std::io::Read::read_exact(&mut s, &mut reply) {
        Ok(()) if &reply == HELLO => Ok(s),
        Ok(()) => Err(Attempt::Fatal(
            "the service on this port is not a hytrain rendezvous store (wrong MASTER_PORT?)".into(),
        )),
        // The server may be closing a listener from an earlier job; a fresh attempt decides.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(io(e)),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Err(Attempt::Fatal(
            format!("the service on this port did not answer the greeting within {} s; it is not a hytrain rendezvous store (wrong MASTER_PORT?)", within.as_secs()),
        )),
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{free_port, member, on_ranks, opts};

    #[test]
    fn set_get_add_wait_and_barrier_work_across_four_ranks() {
        let port = free_port();
        let results = on_ranks(4, |rank| -> Result<(i64, Vec<Vec<u8>>), CommError> {
            let store = Store::rendezvous(&member(rank, 4, port), &opts(30, 30))?;
            store.set(&format!("name/{rank}"), format!("rank-{rank}").as_bytes())?;
            store.add("total", rank as i64 + 1)?;
            let keys: Vec<String> = (0..4).map(|r| format!("name/{r}")).collect();
            store.wait(&keys.iter().map(String::as_str).collect::<Vec<_>>())?;
            let names = keys
                .iter()
                .map(|k| store.get(k))
                .collect::<Result<Vec<_>, _>>()?;
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
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "took {:?}",
            started.elapsed()
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!(
                "rank 3 could not reach master 127.0.0.1:{port} after 3 s (not connected: "
            )),
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
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "took {:?}",
            started.elapsed()
        );
        assert!(
            msg.contains("rank 1 could not reach master no-such-host.invalid:7777"),
            "{msg}"
        );
        assert!(msg.contains("cannot resolve no-such-host.invalid"), "{msg}");
    }

    #[test]
    fn rendezvous_timeout_names_the_ranks_that_never_joined() {
        let port = free_port();
        let results = on_ranks(2, |rank| {
            Store::rendezvous(&member(rank, 4, port), &opts(3, 3)).map(|_| ())
        });
        let master = results[0].as_ref().unwrap_err();
        assert!(matches!(master, CommError::RanksMissing { .. }), "{master}");
        assert!(
            master
                .to_string()
                .contains(&format!("127.0.0.1:{port} (ranks still missing: 2-3)")),
            "{master}"
        );
        let worker = results[1].as_ref().unwrap_err().to_string();
        assert!(
            worker.contains(&format!(
                "rank 1 could not reach master 127.0.0.1:{port} after"
            )) && worker.contains("(ranks still missing: 2-3)"),
            "{worker}"
        );
    }

    #[test]
    fn master_port_already_in_use_is_reported_with_the_port() {
        let taken = TcpListener::bind(("0.0.0.0", 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = Store::rendezvous(&member(0, 2, port), &opts(3, 3)).unwrap_err();
        assert!(matches!(err, CommError::Bind { .. }));
        assert!(
            err.to_string().contains(&format!("on port {port}")),
            "{err}"
        );
    }

    #[test]
    fn a_rank_of_another_job_on_the_same_port_is_refused() {
        let port = free_port();
        let results = on_ranks(2, |rank| {
            let mut o = opts(3, 3);
            o.job_id = if rank == 0 {
                "job-a".into()
            } else {
                "job-b".into()
            };
            Store::rendezvous(&member(rank, 2, port), &o).map(|_| ())
        });
        let refused = results[1].as_ref().unwrap_err().to_string();
        assert!(
            refused.contains("refused")
                && refused.contains("'job-a'")
                && refused.contains("'job-b'"),
            "{refused}"
        );
        assert!(results[0]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("ranks still missing: 1"));
    }

    #[test]
    fn a_rank_with_a_different_world_size_is_refused() {
        let port = free_port();
        let results = on_ranks(2, |rank| {
            Store::rendezvous(&member(rank, 2 + rank, port), &opts(3, 3)).map(|_| ())
        });
        let refused = results[1].as_ref().unwrap_err().to_string();
        assert!(
            refused.contains("world_size 3 but rank 0 has 2"),
            "{refused}"
        );
    }

    #[test]
    fn two_workers_with_the_same_rank_are_refused() {
        let port = free_port();
        let results = on_ranks(3, |i| {
            Store::rendezvous(&member(i.min(1), 3, port), &opts(3, 3)).map(|_| ())
        });
        let errors: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors.iter().any(|e| e.contains("rank 1 already joined")),
            "{errors:?}"
        );
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
        let err = Store::rendezvous(&member(1, 2, port), &opts(60, 60))
            .unwrap_err()
            .to_string();
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "took {:?}",
            started.elapsed()
        );
        assert!(
            err.contains("not a hytrain rendezvous store") && err.contains(&format!(":{port}")),
            "{err}"
        );
    }

    #[test]
    fn wait_timeout_names_only_the_missing_keys() {
        let store = Store::rendezvous(&member(0, 1, free_port()), &opts(1, 5)).unwrap();
        store.set("present", b"").unwrap();
        let err = store.wait(&["present", "absent"]).unwrap_err().to_string();
        assert!(
            err.contains("'absent'") && !err.contains("'present'"),
            "{err}"
        );
        let err = store.get("absent").unwrap_err().to_string();
        assert!(
            err.contains("rank 0 waited 1 s") && err.contains("key 'absent'"),
            "{err}"
        );
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
        assert!(
            err.contains("barrier 'sync' (ranks still missing: 2)"),
            "{err}"
        );
        assert!(results[1].is_err());
    }

    #[test]
    fn add_to_a_non_integer_value_fails_naming_the_key() {
        let store = Store::rendezvous(&member(0, 1, free_port()), &opts(5, 5)).unwrap();
        store.set("text", b"hello").unwrap();
        let err = store.add("text", 1).unwrap_err().to_string();
        assert!(
            err.contains("key test/text holds a value that is not an integer"),
            "{err}"
        );
    }

    #[test]
    fn set_if_absent_keeps_the_first_value() {
        let store = Store::rendezvous(&member(0, 1, free_port()), &opts(5, 5)).unwrap();
        assert_eq!(store.set_if_absent("first", b"a").unwrap(), b"a");
        assert_eq!(store.set_if_absent("first", b"b").unwrap(), b"a");
    }

    #[test]
    fn a_master_that_hangs_up_mid_request_is_reported_as_a_closed_connection() {
        // Greets like a store, then drops the connection on the first request, as a dying rank 0 would.
        let fake = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = fake.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = fake.accept() {
                let mut hello = [0u8; 8];
                let _ = std::io::Read::read_exact(&mut s, &mut hello);
                let _ = s.write_all(HELLO);
                let _ = get_u8(&mut s);
            }
        });
        let err = Store::rendezvous(&member(2, 3, port), &opts(10, 10))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "rank 2: rendezvous store at 127.0.0.1:{port} failed during rendezvous"
            )) && err.contains("connection closed by the master"),
            "{err}"
        );
    }
}
