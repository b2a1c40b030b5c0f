//! The rendezvous store: a small key-value server hosted by global rank 0, and the client every rank uses.
//!
//! One TCP connection per client, one server thread per connection, one request at a time per connection. Blocking
//! requests (get, wait, the rendezvous itself) block on the server, which answers as soon as the condition holds or
//! the client's deadline passes, so no rank polls.

use std::collections::{BTreeSet, HashMap};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::auth::{self, Handshake, JobToken, NONCE_LEN};
use super::liveness::{self, Liveness, LostRank, Watches};
use super::wire::*;
use crate::error::RankList;
use crate::{CommError, CommOptions, Membership};

/// Version 2 of the store protocol: every connection starts with the job-token handshake (see `auth`).
const HELLO: &[u8; 8] = b"HYTSTOR2";
/// Longest job id a client may send before it has authenticated.
const MAX_JOB_ID: usize = 4096;
/// How long a client that has not yet proved it holds the job token may take to do so.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections allowed to be in the handshake at once; more are dropped at once (a real rank retries), so a flood
/// of clients that connect and say nothing cannot exhaust the master's threads.
const MAX_HANDSHAKES: usize = 256;
/// Most keys one wait request may name: a rank waits for one key per rank at most.
const MAX_WAIT_KEYS: usize = 1 << 20;

const OP_SET: u8 = 1;
const OP_GET: u8 = 2;
const OP_ADD: u8 = 3;
const OP_WAIT: u8 = 4;
const OP_SET_IF_ABSENT: u8 = 5;
const OP_JOIN: u8 = 6;
const OP_AWAIT_JOINED: u8 = 7;
/// Turns the connection into a liveness watch of one rank (see `liveness`).
const OP_WATCH: u8 = 8;

pub(crate) const ST_OK: u8 = 0;
const ST_TIMEOUT: u8 = 1;
pub(crate) const ST_ERR: u8 = 2;
/// A blocking request ended because the job lost a rank; the loss follows.
const ST_LOST: u8 = 3;

/// Extra time a client allows past the deadline it gave the server, so the server's own "timed out" answer arrives
/// before the socket read gives up.
const ANSWER_SLACK: Duration = Duration::from_secs(10);
/// How often the accept loop checks whether the store was dropped.
const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// How long a rank whose connection broke waits for the liveness watch to say which rank was lost; the store learns
/// of a killed process as fast as the rank does, so the verdict is normally there within milliseconds.
pub(crate) const VERDICT_WAIT: Duration = Duration::from_secs(3);
/// Upper bound of the wait between connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------------------------
// Server

pub(crate) struct ServerState {
    kv: HashMap<String, Vec<u8>>,
    job_id: String,
    pub(crate) world_size: usize,
    joined: BTreeSet<usize>,
    /// Connections that failed the token check, and where the last one came from, for the rendezvous error.
    refused: usize,
    last_refused: Option<SocketAddr>,
    /// Which ranks are watched, which left, and the job's first loss.
    pub(crate) watches: Watches,
}

pub(crate) struct Shared {
    state: Mutex<ServerState>,
    pub(crate) changed: Condvar,
    token: JobToken,
    /// Connections now in the handshake.
    handshakes: AtomicUsize,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, ServerState> {
        // A connection thread that panicked cannot leave the map half-updated (every update is one insert), so a
        // poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks until `ready` holds or `deadline` passes; returns whether it holds.
    pub(crate) fn wait_until(
        &self,
        deadline: Instant,
        mut ready: impl FnMut(&ServerState) -> bool,
    ) -> bool {
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
        only: Option<IpAddr>,
        port: u16,
        job_id: &str,
        world_size: usize,
        token: JobToken,
    ) -> Result<(Server, Arc<Shared>), CommError> {
        let listener = match only {
            Some(ip) => TcpListener::bind((ip, port)),
            None => bind_any(port),
        }
        .map_err(|source| CommError::Bind { port, source })?;
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
                refused: 0,
                last_refused: None,
                watches: Watches::default(),
            }),
            changed: Condvar::new(),
            token,
            handshakes: AtomicUsize::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, shared2) = (stop.clone(), shared.clone());
        let accept = std::thread::Builder::new()
            .name("hytrain-store".into())
            .spawn(move || accept_loop(listener, shared2, stop2))
            .map_err(|source| CommError::Bind { port, source })?;
        tracing::debug!(port = local.port(), "rendezvous store listening");
        Ok((
            Server {
                stop,
                accept: Some(accept),
            },
            shared,
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
                if shared.handshakes.fetch_add(1, Ordering::SeqCst) >= MAX_HANDSHAKES {
                    shared.handshakes.fetch_sub(1, Ordering::SeqCst);
                    tracing::debug!(%peer, "store dropped a connection: too many handshakes in progress");
                    continue;
                }
                let shared = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name("hytrain-store-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve(stream, peer, &shared) {
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

/// Decrements the handshake count when a connection leaves the handshake, however it leaves.
struct InHandshake<'a>(&'a AtomicUsize);

impl Drop for InHandshake<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The server's half of the handshake: the client's hello, the job check, the token challenge. Nothing the
/// client sends is acted on before it has proved it holds the job token.
/// A client's greeting: the protocol magic, its job id and its challenge nonce. Read before the client has
/// proved anything, so every length in it is bounded.
fn read_hello(r: &mut impl Read) -> io::Result<(Vec<u8>, [u8; NONCE_LEN])> {
    let mut hello = [0u8; 8];
    r.read_exact(&mut hello)?;
    if &hello != HELLO {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "client did not greet as a hytrain store client",
        ));
    }
    let job = get_bytes_max(r, MAX_JOB_ID)?;
    let mut nonce = [0u8; NONCE_LEN];
    r.read_exact(&mut nonce)?;
    Ok((job, nonce))
}

/// One request of an authenticated client, as decoded off the wire.
#[derive(Debug)]
enum Request {
    Set {
        key: String,
        value: Vec<u8>,
    },
    SetIfAbsent {
        key: String,
        value: Vec<u8>,
    },
    Get {
        key: String,
        timeout_ms: u64,
    },
    Add {
        key: String,
        delta: i64,
    },
    Wait {
        keys: Vec<String>,
        timeout_ms: u64,
    },
    Join {
        job: String,
        rank: usize,
        world: usize,
    },
    AwaitJoined {
        timeout_ms: u64,
    },
    /// Turns the connection into `rank`'s liveness watch (see [`crate::liveness`]).
    Watch {
        rank: usize,
        timeout_ms: u64,
    },
}

/// The next request, or `None` when the client closed the connection between requests.
fn read_request(r: &mut impl Read) -> io::Result<Option<Request>> {
    let op = match get_u8(r) {
        Ok(op) => op,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(Some(match op {
        OP_SET => Request::Set {
            key: get_string(r)?,
            value: get_bytes(r)?,
        },
        OP_SET_IF_ABSENT => Request::SetIfAbsent {
            key: get_string(r)?,
            value: get_bytes(r)?,
        },
        OP_GET => Request::Get {
            key: get_string(r)?,
            timeout_ms: get_u64(r)?,
        },
        OP_ADD => Request::Add {
            key: get_string(r)?,
            delta: get_u64(r)? as i64,
        },
        OP_WAIT => {
            let n = get_count(r, MAX_WAIT_KEYS, "keys")?;
            let keys = (0..n)
                .map(|_| get_string(r))
                .collect::<io::Result<Vec<_>>>()?;
            Request::Wait {
                keys,
                timeout_ms: get_u64(r)?,
            }
        }
        OP_JOIN => Request::Join {
            job: get_string(r)?,
            rank: get_u64(r)? as usize,
            world: get_u64(r)? as usize,
        },
        OP_AWAIT_JOINED => Request::AwaitJoined {
            timeout_ms: get_u64(r)?,
        },
        OP_WATCH => Request::Watch {
            rank: get_u64(r)? as usize,
            timeout_ms: get_u64(r)?,
        },
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown store request {other}"),
            ))
        }
    }))
}

/// Decodes a client's greeting and then requests from `bytes` until they end or one is malformed, returning how
/// many requests decoded: the store's wire format without a socket, for the fuzz targets.
pub(crate) fn decode_stream(bytes: &[u8]) -> usize {
    let mut r = bytes;
    if read_hello(&mut r).is_err() {
        return 0;
    }
    let mut n = 0;
    while let Ok(Some(_)) = read_request(&mut r) {
        n += 1;
    }
    n
}

fn admit(mut s: &TcpStream, peer: SocketAddr, shared: &Shared) -> io::Result<bool> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    s.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let (job, nonce) = read_hello(&mut s)?;
    s.write_all(HELLO)?;
    let job_id = shared.lock().job_id.clone();
    if job != job_id.as_bytes() {
        let theirs: String = String::from_utf8_lossy(&job).escape_debug().collect();
        auth::refuse(
            &mut s,
            &format!(
                "it hosts job '{job_id}' but this rank belongs to job '{theirs}'; two jobs share this address and port"
            ),
        )?;
        return Ok(false);
    }
    let context = auth::context(&[b"store", job_id.as_bytes()]);
    match auth::respond(&mut s, &shared.token, &context, &nonce) {
        Ok(()) => {}
        Err(Handshake::BadProof) => {
            let refused = {
                let mut st = shared.lock();
                st.refused += 1;
                st.last_refused = Some(peer);
                st.refused
            };
            // Logged, but sparsely: whoever keeps knocking must not be able to flood the log.
            if refused <= 10 || refused.is_power_of_two() {
                tracing::warn!(
                    %peer,
                    refused,
                    "refused a rendezvous connection: job token mismatch (it did not prove it holds this job's token)"
                );
            }
            shared.changed.notify_all();
            return Ok(false);
        }
        Err(Handshake::Io(e)) => return Err(e),
        Err(other) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("handshake ended with {other:?}"),
            ))
        }
    }
    // Authenticated clients may block on a request for as long as their deadline says.
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    Ok(true)
}

fn serve(stream: TcpStream, peer: SocketAddr, shared: &Shared) -> io::Result<()> {
    {
        let _counted = InHandshake(&shared.handshakes);
        if !admit(&stream, peer, shared)? {
            return Ok(());
        }
    }
    let mut joined = None;
    let result = serve_requests(stream, peer, shared, &mut joined);
    if let Some(rank) = joined {
        // A rank that joined dies before its liveness watch is up: only this connection can tell. A job of one
        // rank has no watch and nobody to tell: its connection closes when it ends.
        let alone_or_watched = {
            let st = shared.lock();
            st.world_size == 1 || st.watches.is_watched(rank)
        };
        if !alone_or_watched {
            liveness::declare_lost(
                shared,
                LostRank {
                    rank,
                    host: peer.ip().to_string(),
                    cause: "its connection to the rendezvous store closed during the rendezvous (the process \
                            exited or was killed)"
                        .into(),
                },
            );
        }
    }
    result
}

/// Answers requests on an admitted connection; `joined` is set to the rank that joined on it.
fn serve_requests(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    joined: &mut Option<usize>,
) -> io::Result<()> {
    let stream_for_watch = stream.try_clone()?;
    let mut r = BufReader::new(stream.try_clone()?);
    let mut w = BufWriter::new(stream);
    let mut out = Vec::new();
    while let Some(request) = read_request(&mut r)? {
        out.clear();
        match request {
            Request::Set { key, value } => {
                shared.lock().kv.insert(key, value);
                shared.changed.notify_all();
                put_u8(&mut out, ST_OK);
            }
            Request::SetIfAbsent { key, value } => {
                let stored = shared.lock().kv.entry(key).or_insert(value).clone();
                shared.changed.notify_all();
                put_u8(&mut out, ST_OK);
                put_bytes(&mut out, &stored);
            }
            Request::Get { key, timeout_ms } => {
                let deadline = deadline_from(timeout_ms);
                shared.wait_until(deadline, |st| {
                    st.kv.contains_key(&key) || st.watches.lost.is_some()
                });
                let st = shared.lock();
                if let Some(v) = st.kv.get(&key) {
                    put_u8(&mut out, ST_OK);
                    put_bytes(&mut out, v);
                } else if let Some(lost) = &st.watches.lost {
                    put_lost(&mut out, lost);
                } else {
                    put_u8(&mut out, ST_TIMEOUT);
                }
            }
            Request::Add { key, delta } => {
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
            Request::Wait { keys, timeout_ms } => {
                let deadline = deadline_from(timeout_ms);
                let all = |st: &ServerState| keys.iter().all(|k| st.kv.contains_key(k));
                shared.wait_until(deadline, |st| all(st) || st.watches.lost.is_some());
                let lost = shared.lock().watches.lost.clone();
                if all(&shared.lock()) {
                    put_u8(&mut out, ST_OK);
                } else if let Some(lost) = lost {
                    put_lost(&mut out, &lost);
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
            Request::Join { job, rank, world } => {
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
                    None => {
                        *joined = Some(rank);
                        put_u8(&mut out, ST_OK)
                    }
                    Some(msg) => {
                        put_u8(&mut out, ST_ERR);
                        put_bytes(&mut out, msg.as_bytes());
                    }
                }
            }
            Request::AwaitJoined { timeout_ms } => {
                let deadline = deadline_from(timeout_ms);
                let complete = |st: &ServerState| st.joined.len() >= st.world_size;
                shared.wait_until(deadline, |st| complete(st) || st.watches.lost.is_some());
                let st = shared.lock();
                if let (false, Some(lost)) = (complete(&st), &st.watches.lost) {
                    put_lost(&mut out, lost);
                    drop(st);
                    send(&mut w, &out)?;
                    continue;
                }
                let complete = complete(&st);
                let missing: Vec<u64> = (0..st.world_size)
                    .filter(|r| !st.joined.contains(r))
                    .map(|r| r as u64)
                    .collect();
                // A rank given the wrong token fails on its own side at once; this tells rank 0 why it waited.
                let note = match (st.refused, st.last_refused) {
                    (0, _) | (_, None) => String::new(),
                    (n, Some(from)) => format!(
                        "; refused {n} connection{} that failed the job token check, the last from {from}",
                        if n == 1 { "" } else { "s" }
                    ),
                };
                drop(st);
                put_u8(&mut out, if complete { ST_OK } else { ST_TIMEOUT });
                put_u64_list(&mut out, &missing);
                put_bytes(&mut out, note.as_bytes());
            }
            Request::Watch { rank, timeout_ms } => {
                let timeout = Duration::from_millis(timeout_ms.clamp(1, u32::MAX as u64));
                drop((r, w));
                *joined = None;
                return liveness::serve_watch(stream_for_watch, peer, shared, rank, timeout);
            }
        }
        send(&mut w, &out)?;
    }
    Ok(())
}

fn put_lost(out: &mut Vec<u8>, lost: &LostRank) {
    put_u8(out, ST_LOST);
    liveness::encode_lost(out, lost);
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
    /// The job's liveness watch (jobs of two or more ranks), and the abort of this connection when a rank is lost.
    liveness: Option<(Liveness, liveness::AbortRegistration)>,
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
    ///
    /// Every connection to the store starts with the job-token handshake (see [`JobToken`]): a rank given a
    /// different token fails at once with "job token mismatch", naming the master's host and port, and a client
    /// that cannot prove it holds the token is dropped before it can send a request. A job of one rank, or one
    /// whose `master_addr` is a loopback address, listens on loopback only.
    pub fn rendezvous(m: &Membership, opts: &CommOptions) -> Result<Store, CommError> {
        m.validate()?;
        opts.validate()?;
        let started = Instant::now();
        let deadline = started + opts.rendezvous_timeout;
        let token = opts.token();
        let hosts: Vec<&str> = if m.rank == 0 {
            // Rank 0 talks to its own server over loopback: its own host name may not resolve yet (Kubeflow creates
            // the service DNS record late), and peers never use the address of this connection.
            vec!["127.0.0.1", "::1"]
        } else {
            vec![&m.master_addr]
        };
        let (server, stream) = if m.rank == 0 {
            if m.world_size > 1 && !token.is_configured() {
                warn_unconfigured_once();
            }
            let server = Server::start(
                listen_only_on(m),
                m.master_port,
                &opts.job_id,
                m.world_size,
                token.clone(),
            )?;
            let stream = connect_with_retry(m, opts, &hosts, started, deadline)?;
            (Some(server), stream)
        } else {
            (
                None,
                connect_with_retry(m, opts, &hosts, started, deadline)?,
            )
        };
        let (server, server_state) = match server {
            Some((server, state)) => (Some(server), Some(state)),
            None => (None, None),
        };
        let abort_handle = stream.try_clone().map_err(|e| CommError::Store {
            rank: m.rank,
            host: m.master_addr.clone(),
            port: m.master_port,
            op: "connect",
            detail: e.to_string(),
        })?;
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
                liveness: None,
                _server: server,
            }),
        };
        store.register()?;
        let store = if m.world_size > 1 {
            let live = store.watch(m, &hosts, started, deadline, server_state)?;
            // A blocked request to a store that is gone or stopped ends when the watch says so.
            let registration = live.on_lost(move || {
                let _ = abort_handle.shutdown(std::net::Shutdown::Both);
            });
            let mut inner = Arc::into_inner(store.inner).expect("the store is not shared yet");
            inner.liveness = Some((live, registration));
            Store {
                inner: Arc::new(inner),
            }
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

    /// Registers this rank with the store.
    fn register(&self) -> Result<(), CommError> {
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
        tracing::debug!(
            rank = i.rank,
            "joined the rendezvous; waiting for the other ranks"
        );
        Ok(())
    }

    /// Opens this rank's liveness watch on a second connection (see `liveness`).
    fn watch(
        &self,
        m: &Membership,
        hosts: &[&str],
        started: Instant,
        deadline: Instant,
        server: Option<Arc<Shared>>,
    ) -> Result<Liveness, CommError> {
        let i = &self.inner;
        // The master answered this rank's join a moment ago; if it cannot be reached now, it is gone.
        let deadline = deadline.min(Instant::now() + i.opts.peer_timeout / 2);
        let mut stream = connect_with_retry(m, &i.opts, hosts, started, deadline).map_err(|e| {
            CommError::RankLost(LostRank {
                rank: 0,
                host: endpoint(&i.host, i.port),
                cause: format!(
                    "the rendezvous store it hosts stopped answering during the rendezvous ({e})"
                ),
            })
        })?;
        let failed = |detail: String| self.store_error("watch", detail);
        let answer = (|| -> io::Result<Result<(), String>> {
            stream
                .set_read_timeout(Some(i.opts.collective_timeout.min(Duration::from_secs(60))))?;
            stream.write_all(&liveness::watch_request(
                OP_WATCH,
                i.rank,
                i.opts.peer_timeout,
            ))?;
            Ok(match get_u8(&mut stream)? {
                ST_OK => Ok(()),
                _ => Err(
                    String::from_utf8_lossy(&get_bytes_max(&mut stream, auth::MAX_REASON)?)
                        .into_owned(),
                ),
            })
        })()
        .map_err(|e| failed(describe_io(&e, i.opts.collective_timeout)))?;
        answer.map_err(failed)?;
        Liveness::start(
            stream,
            i.rank,
            i.world_size,
            i.opts.peer_timeout,
            endpoint(&i.host, i.port),
            server,
        )
        .map_err(|e| failed(format!("cannot start the watch: {e}")))
    }

    /// Waits until every rank has registered.
    fn await_joined(&self, started: Instant, deadline: Instant) -> Result<(), CommError> {
        let i = &self.inner;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let mut frame = Vec::new();
        put_u8(&mut frame, OP_AWAIT_JOINED);
        put_u64(&mut frame, remaining.as_millis() as u64);
        let (complete, missing, note) =
            self.call("rendezvous", &frame, remaining + ANSWER_SLACK, |st, r| {
                let missing = get_u64_list(r)?;
                let note = get_bytes_max(r, auth::MAX_REASON)?;
                Ok((
                    st == ST_OK,
                    missing,
                    String::from_utf8_lossy(&note).into_owned(),
                ))
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
                note,
            }
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

    /// This rank's view of the job's liveness: which rank was lost, if any, and the goodbye at the end (see
    /// [`Liveness`]). `None` for a job of one rank.
    pub fn liveness(&self) -> Option<Liveness> {
        self.inner.liveness.as_ref().map(|(l, _)| l.clone())
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
            if status == ST_LOST {
                return Ok(Err(liveness::decode_lost(&mut conn.stream)?));
            }
            parse(status, &mut conn.stream).map(Ok)
        })();
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(lost)) => Err(CommError::RankLost(lost)),
            Err(e) => {
                let detail = describe_io(&e, answer_within);
                conn.broken = Some(detail.clone());
                // The watch may already know why the connection broke.
                match self
                    .liveness()
                    .and_then(|l| l.wait_lost(Some(VERDICT_WAIT)))
                {
                    Some(lost) => Err(CommError::RankLost(lost)),
                    None => Err(self.store_error(op, detail)),
                }
            }
        }
    }
}

fn describe_io(e: &io::Error, waited: Duration) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => {
            "connection closed by the master (lost rank 0: it exited or was killed)".into()
        }
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("no answer within {} s (is rank 0 stuck?)", waited.as_secs())
        }
        _ => e.to_string(),
    }
}

/// The address the store listens on when it need not be reachable from other hosts: loopback for a job of one
/// rank, or the master address itself when that is a loopback address. `None`: every interface.
fn listen_only_on(m: &Membership) -> Option<IpAddr> {
    if m.world_size == 1 {
        return Some(Ipv4Addr::LOCALHOST.into());
    }
    let addr = m.master_addr.trim();
    let addr = addr
        .strip_prefix('[')
        .and_then(|a| a.strip_suffix(']'))
        .unwrap_or(addr);
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
        let last = match try_connect(hosts, m.master_port, deadline, &opts.job_id, &opts.token()) {
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
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10));
        match TcpStream::connect_timeout(&addr, remaining.min(Duration::from_secs(10))) {
            Ok(s) => return greet(s, remaining.min(Duration::from_secs(30)), job_id, token),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(Attempt::Retry(last))
}

fn greet(
    mut s: TcpStream,
    within: Duration,
    job_id: &str,
    token: &JobToken,
) -> Result<TcpStream, Attempt> {
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
        let err = Store::rendezvous(&member(2, 3, port), &o)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "rank 2: rendezvous store at 127.0.0.1:{port} failed during rendezvous"
            )) && err.contains("connection closed by the master"),
            "{err}"
        );
    }

    fn with_token(mut o: CommOptions, secret: &str) -> CommOptions {
        o.job_token = Some(JobToken::new(secret).unwrap());
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
            let (o, secret) = if rank == 0 {
                (opts(4, 4), "the-right-secret-0123")
            } else {
                (opts(60, 60), "a-wrong-secret-456789")
            };
            let r = Store::rendezvous(&member(rank, 2, port), &with_token(o, secret)).map(|_| ());
            (r, started.elapsed())
        });
        let (worker, worker_took) = &results[1];
        let worker = worker.as_ref().unwrap_err();
        assert!(
            matches!(worker, CommError::TokenMismatch { rank: 1, .. }),
            "{worker}"
        );
        let msg = worker.to_string();
        assert!(
            msg.starts_with(&format!(
                "rank 1: job token mismatch with the rendezvous store at 127.0.0.1:{port}: the master refused"
            )),
            "{msg}"
        );
        assert!(
            *worker_took < Duration::from_secs(30),
            "the mismatched rank took {worker_took:?}"
        );
        let master = results[0].0.as_ref().unwrap_err().to_string();
        assert!(
            master.contains("ranks still missing: 1; refused 1 connection that failed the job token check, the last from 127.0.0.1:"),
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
        let err =
            Store::rendezvous(&member(1, 2, port), &with_token(opts(20, 20), "s")).unwrap_err();
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
            garbage
                .write_all(
                    &(0..1024u32)
                        .map(|i| (i * 7919 % 251) as u8)
                        .collect::<Vec<_>>(),
                )
                .unwrap();
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
            let sums: Vec<i64> = ranks
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect();
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
                        for (mut from, mut to) in
                            [(c.try_clone().unwrap(), s.try_clone().unwrap()), (s, c)]
                        {
                            std::thread::spawn(move || {
                                let _ = io::copy(&mut from, &mut to);
                                let _ = to.shutdown(std::net::Shutdown::Write);
                            });
                        }
                    }
                });
                let server = connect_when_listening(port);
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
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
                replay
                    .write_all(&captured[hello_len..hello_len + 32])
                    .unwrap();
                let mut status = [9u8; 1];
                replay.read_exact(&mut status).unwrap();
                assert_eq!(
                    status[0],
                    auth::REFUSED,
                    "the replay got past the token check"
                );
                let _ = replay.write_all(&captured[hello_len + 32..]);
                let (reply, closed) = drain(&mut replay, Duration::from_secs(15));
                assert!(
                    closed && reply.is_empty(),
                    "the replay was answered: {reply:?}"
                );
                let _ = replayed.send(());
            } else {
                let _ = replay_done
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(60));
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
        let results = on_ranks(3, |rank| {
            let store = Store::rendezvous(&member(rank, 3, port), &opts(30, 30)).unwrap();
            store.barrier("joined").unwrap();
            let live = store.liveness().unwrap();
            if rank == 2 {
                live.sever();
                return None;
            }
            // Blocked on a key nobody will set; the loss ends the wait long before its deadline.
            let e = store
                .get_timeout("never", Duration::from_secs(60))
                .unwrap_err();
            // The store's answer to the request and its verdict on the watch travel on two connections; either
            // may arrive first.
            Some((live.wait_lost(Some(Duration::from_secs(10))), e))
        });
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "took {:?}",
            started.elapsed()
        );
        for r in [0, 1] {
            let (lost, e) = results[r].as_ref().unwrap();
            let lost = lost.as_ref().expect("a verdict");
            assert_eq!(lost.rank, 2);
            assert_eq!(lost.host, "127.0.0.1");
            assert!(
                matches!(e, CommError::RankLost(l) if l.rank == 2),
                "rank {r}: {e}"
            );
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
        assert!(
            results[0].1 >= Duration::from_millis(500),
            "rank 0 left after {:?}",
            results[0].1
        );
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
                let lost = store
                    .liveness()
                    .unwrap()
                    .wait_lost(Some(Duration::from_secs(20)));
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
        let mut watch = connect_with_retry(&m, &o, &hosts, started, deadline).unwrap();
        watch
            .write_all(&liveness::watch_request(OP_WATCH, 1, o.peer_timeout))
            .unwrap();
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
        let e = Store::rendezvous(&member(0, 1, free_port()), &o)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid options: peer_timeout is 0; give a positive number of seconds"
        );
    }

    #[test]
    fn a_single_rank_job_listens_on_loopback_only() {
        assert_eq!(
            listen_only_on(&member(0, 1, 1)),
            Some(Ipv4Addr::LOCALHOST.into())
        );
        assert_eq!(
            listen_only_on(&member(0, 2, 1)),
            Some(Ipv4Addr::LOCALHOST.into())
        );
        let mut m = member(0, 2, 1);
        m.master_addr = "[::1]".into();
        assert_eq!(listen_only_on(&m), Some(Ipv6Addr::LOCALHOST.into()));
        m.master_addr = "algo-1".into();
        assert_eq!(listen_only_on(&m), None);
        m.master_addr = "10.0.0.1".into();
        assert_eq!(listen_only_on(&m), None);
    }
}

#[cfg(test)]
mod request_tests {
    use super::*;

    fn hello(job: &[u8]) -> Vec<u8> {
        let mut out = HELLO.to_vec();
        put_bytes(&mut out, job);
        out.extend_from_slice(&[7u8; NONCE_LEN]);
        out
    }

    #[test]
    fn requests_framed_as_the_client_frames_them_decode_back() {
        let mut f = hello(b"job-1");
        put_u8(&mut f, OP_SET);
        put_bytes(&mut f, b"job/k");
        put_bytes(&mut f, b"value");
        put_u8(&mut f, OP_WAIT);
        put_u64(&mut f, 2);
        put_bytes(&mut f, b"a");
        put_bytes(&mut f, b"b");
        put_u64(&mut f, 1500);
        put_u8(&mut f, OP_JOIN);
        put_bytes(&mut f, b"job-1");
        put_u64(&mut f, 3);
        put_u64(&mut f, 4);
        let mut r = &f[..];
        assert_eq!(read_hello(&mut r).unwrap().0, b"job-1");
        assert!(
            matches!(read_request(&mut r).unwrap(), Some(Request::Set { key, value }) if key == "job/k" && value == b"value")
        );
        assert!(
            matches!(read_request(&mut r).unwrap(), Some(Request::Wait { keys, timeout_ms: 1500 }) if keys == ["a", "b"])
        );
        assert!(matches!(
            read_request(&mut r).unwrap(),
            Some(Request::Join {
                rank: 3,
                world: 4,
                ..
            })
        ));
        assert!(read_request(&mut r).unwrap().is_none());
        assert_eq!(decode_stream(&f), 3);
    }

    #[test]
    fn a_wait_naming_more_keys_than_the_limit_is_refused_before_any_is_read() {
        let mut f = vec![OP_WAIT];
        put_u64(&mut f, MAX_WAIT_KEYS as u64 + 1);
        let e = read_request(&mut &f[..]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(
            e.to_string()
                .contains(&format!("exceed the protocol limit of {MAX_WAIT_KEYS}")),
            "{e}"
        );
    }

    #[test]
    fn a_greeting_with_an_oversized_job_id_is_refused_before_it_is_read() {
        let mut f = HELLO.to_vec();
        put_u64(&mut f, MAX_JOB_ID as u64 + 1);
        let e = read_hello(&mut &f[..]).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("exceeds the protocol limit of {MAX_JOB_ID} bytes")),
            "{e}"
        );
        let e = read_request(&mut &[42u8][..]).unwrap_err();
        assert!(e.to_string().contains("unknown store request 42"), "{e}");
    }
}
