//! The store's server: a small key-value store that global rank 0 hosts in a background thread.
//!
//! One TCP connection per client, one thread per connection, one request at a time per connection. Blocking
//! requests (get, wait, the rendezvous itself) block here, on the store's condition variable, and are answered as
//! soon as the condition holds, the client's deadline passes or the job loses a rank, so no rank polls. Nothing a
//! client sends is acted on before it has proved it holds the job token.
//!
//! The server knows nothing of the client: it is started with [`Server::start`] and serves whoever connects. Rank
//! 0 hosts it for one run of its job, of a world size it knows ([`World::Fixed`]). A store that runs on its own
//! (`hytrain rendezvous`, [`World::FromJoiners`]) outlives the runs it serves, so it serves them in *rounds*: the
//! first rank to join a round sets its world size (the others must say the same), and the first join after a
//! round is over (a rank was lost, or every rank left) begins the next one with an empty key space. Each
//! connection belongs to the round its rank joined; once that round is over, its requests are answered with the
//! round's loss, and its liveness watch can no longer touch the new round, so nothing of an old run leaks into a
//! new one.

use std::collections::{BTreeSet, HashMap};
use std::io::{self, BufReader, BufWriter, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hytrain_cluster::JobToken;

use super::admission::{Admission, Ask, Standing};
use super::auth::{self, Handshake};
use super::liveness::{self, LostRank, WatchHost, Watches};
use super::protocol::*;
use super::wire::*;
use crate::error::RankList;
use crate::net::bind_any;
use crate::CommError;

/// How long a client that has not yet proved it holds the job token may take to do so.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections allowed to be in the handshake at once; more are dropped at once (a real rank retries), so a flood
/// of clients that connect and say nothing cannot exhaust the master's threads.
const MAX_HANDSHAKES: usize = 256;
/// How often the accept loop checks whether the store was dropped.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// Where a round's world size comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum World {
    /// Rank 0's store: one run of this many ranks.
    Fixed(usize),
    /// A store of its own: each round takes the world size of the first rank that joins it.
    FromJoiners,
}

struct ServerState {
    kv: HashMap<String, Vec<u8>>,
    job_id: String,
    world: World,
    /// The current round (always 0 for a [`World::Fixed`] store).
    round: u64,
    /// How the previous round ended, for requests of its ranks that come late.
    ended: Option<LostRank>,
    world_size: usize,
    /// The round's admission of nodes, when its node count is a range (standalone store only).
    admission: Option<Admission>,
    /// The nodes of the last round that had an admission, in node-rank order: they come first in the next.
    previous_nodes: Vec<String>,
    /// The nodes known to come to the next round: the last round's but a lost one, and those that waited for it.
    expected_nodes: Vec<String>,
    /// Nodes waiting for the running round to end so they can join the next; their count is in the round's
    /// key space at [`NODES_WAITING`], where the running ranks look.
    waiting: BTreeSet<String>,
    joined: BTreeSet<usize>,
    /// Connections that failed the token check, and where the last one came from, for the rendezvous error.
    refused: usize,
    last_refused: Option<SocketAddr>,
    /// Which ranks are watched, which left, and the job's first loss.
    watches: Watches,
}

struct Shared {
    state: Mutex<ServerState>,
    changed: Condvar,
    token: JobToken,
    /// Connections now in the handshake.
    handshakes: AtomicUsize,
}

impl ServerState {
    /// Whether the current round is over or not yet begun (no rank joined and no node is being admitted), so that
    /// the next join or admission begins a new one.
    fn round_over(&self) -> bool {
        if self.watches.lost().is_some() {
            return true;
        }
        if self.joined.is_empty() {
            return self.admission.is_none();
        }
        self.watches.all_left(self.world_size)
    }

    /// Begins the next round, of `world_size` ranks, forgetting everything of the one before.
    fn begin_round(&mut self, world_size: usize) {
        self.ended = self.watches.lost().cloned();
        self.round += 1;
        self.world_size = world_size;
        self.kv.clear();
        self.joined.clear();
        if let Some(admission) = self.admission.take() {
            self.previous_nodes = admission.nodes().to_vec();
            let lost = self.ended.as_ref().map(|l| l.rank / admission.local_world_size().max(1));
            self.expected_nodes = (admission.nodes().iter().enumerate())
                .filter(|(node_rank, _)| Some(*node_rank) != lost)
                .map(|(_, node)| node.clone())
                .chain(self.waiting.iter().cloned())
                .collect();
        } else {
            self.expected_nodes.clear();
        }
        self.waiting.clear();
        self.watches = Watches::default();
        tracing::info!(round = self.round, world_size, job = %self.job_id, "rendezvous store: a new round begins");
    }

    /// Publishes how many nodes wait for the next round, where the running round's ranks look.
    fn publish_waiting(&mut self) {
        let key = format!("{}/{NODES_WAITING}", self.job_id);
        self.kv.insert(key, self.waiting.len().to_string().into_bytes());
    }

    /// The answer to a request of a rank of round `round` after it is over.
    fn stale(&self, rank: usize) -> LostRank {
        self.ended.clone().unwrap_or_else(|| LostRank {
            rank,
            host: String::new(),
            cause: "the store began a new round of this job (the workers of a new run joined); this rank belongs \
                    to a run that is over"
                .into(),
            store: true,
        })
    }
}

/// A connection's rank and the round it joined.
#[derive(Debug, Clone, Copy)]
struct Joined {
    rank: usize,
    round: u64,
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
            st = self.changed.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

impl WatchHost for Shared {
    fn with_watches(&self, f: &mut dyn FnMut(&mut Watches, usize)) {
        let mut st = self.lock();
        let world = st.world_size;
        f(&mut st.watches, world);
    }

    fn notify(&self) {
        self.changed.notify_all();
    }

    fn wait_watches(&self, deadline: Instant, ready: &mut dyn FnMut(&Watches) -> bool) -> bool {
        self.wait_until(deadline, |st| ready(&st.watches))
    }
}

/// The store as one round's liveness watches see it: once the round is over, they see ended watches
/// ([`Watches::ended`]), so a late loss or goodbye of an old run is told to no one.
struct InRound<'a> {
    shared: &'a Shared,
    round: u64,
}

impl WatchHost for InRound<'_> {
    fn with_watches(&self, f: &mut dyn FnMut(&mut Watches, usize)) {
        let mut st = self.shared.lock();
        if st.round == self.round {
            let world = st.world_size;
            f(&mut st.watches, world);
        } else {
            f(&mut Watches::ended(), 0);
        }
    }

    fn notify(&self) {
        self.shared.changed.notify_all();
    }

    fn wait_watches(&self, deadline: Instant, ready: &mut dyn FnMut(&Watches) -> bool) -> bool {
        self.shared.wait_until(deadline, |st| st.round != self.round || ready(&st.watches))
    }
}

/// The listening half, owned by rank 0's `Store`. Dropping it stops accepting new connections; connections already
/// open keep being served until their clients hang up, so ranks still finishing a rendezvous are not cut off.
pub(crate) struct Server {
    /// The address it listens on (the port asked for, or the system's choice when asked for 0).
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Server {
    pub(crate) fn start(
        only: Option<IpAddr>,
        port: u16,
        job_id: &str,
        world: World,
        token: JobToken,
    ) -> Result<Server, CommError> {
        let listener = match only {
            Some(ip) => TcpListener::bind((ip, port)),
            None => bind_any(port),
        }
        .map_err(|source| CommError::Bind { port, source })?;
        let local = listener.local_addr().map_err(|source| CommError::Bind { port, source })?;
        listener.set_nonblocking(true).map_err(|source| CommError::Bind { port, source })?;
        let shared = Arc::new(Shared {
            state: Mutex::new(ServerState {
                kv: HashMap::new(),
                job_id: job_id.to_string(),
                world,
                round: 0,
                ended: None,
                world_size: match world {
                    World::Fixed(n) => n,
                    World::FromJoiners => 0,
                },
                admission: None,
                previous_nodes: Vec::new(),
                expected_nodes: Vec::new(),
                waiting: BTreeSet::new(),
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
        Ok(Server { addr: local, stop, accept: Some(accept), shared })
    }

    /// The port it listens on.
    pub(crate) fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The address it listens on.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The store's liveness state, for rank 0's own [`Liveness`](crate::Liveness): it waits there for the other
    /// ranks to leave before its process, and with it the store, ends.
    pub(crate) fn watches(&self) -> Arc<dyn WatchHost> {
        self.shared.clone()
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
                let spawned = std::thread::Builder::new().name("hytrain-store-conn".into()).spawn(move || {
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
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("handshake ended with {other:?}")))
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
    if let Some(Joined { rank, round }) = joined {
        // A rank that joined dies before its liveness watch is up: only this connection can tell. A job of one
        // rank has no watch and nobody to tell: its connection closes when it ends.
        let round_host = InRound { shared, round };
        let mut alone_or_watched = true;
        round_host.with_watches(&mut |watches, world| alone_or_watched = world <= 1 || watches.is_watched(rank));
        if !alone_or_watched {
            liveness::declare_lost(
                &round_host,
                LostRank {
                    rank,
                    host: peer.ip().to_string(),
                    cause: "its connection to the rendezvous store closed during the rendezvous (the process \
                            exited or was killed)"
                        .into(),
                    store: false,
                },
            );
        }
    }
    result
}

/// Answers requests on an admitted connection; `joined` is set to the rank that joined on it, and its round.
fn serve_requests(stream: TcpStream, peer: SocketAddr, shared: &Shared, joined: &mut Option<Joined>) -> io::Result<()> {
    let stream_for_watch = stream.try_clone()?;
    let mut r = BufReader::new(stream.try_clone()?);
    let mut w = BufWriter::new(stream);
    let mut out = Vec::new();
    while let Some(request) = read_request(&mut r)? {
        out.clear();
        // The round this connection's requests belong to: its rank's, else the current one.
        let (round, stale) = {
            let st = shared.lock();
            let round = joined.map_or(st.round, |j| j.round);
            (round, joined.filter(|j| j.round != st.round).map(|j| st.stale(j.rank)))
        };
        if let Some(lost) = stale.filter(|_| !matches!(request, Request::Watch { .. })) {
            put_lost(&mut out, &lost);
            send(&mut w, &out)?;
            continue;
        }
        // A blocking request also ends when its round does.
        let over = |st: &ServerState| st.round != round;
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
                shared.wait_until(deadline, |st| over(st) || st.kv.contains_key(&key) || st.watches.lost().is_some());
                let st = shared.lock();
                if over(&st) {
                    put_lost(&mut out, &st.stale(joined.map_or(0, |j| j.rank)));
                } else if let Some(v) = st.kv.get(&key) {
                    put_u8(&mut out, ST_OK);
                    put_bytes(&mut out, v);
                } else if let Some(lost) = st.watches.lost() {
                    put_lost(&mut out, lost);
                } else {
                    put_u8(&mut out, ST_TIMEOUT);
                }
            }
            Request::Add { key, delta } => {
                let mut st = shared.lock();
                let current = match st.kv.get(&key) {
                    None => Some(0),
                    Some(v) => std::str::from_utf8(v).ok().and_then(|s| s.parse::<i64>().ok()),
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
                        put_bytes(&mut out, format!("key {key} holds a value that is not an integer").as_bytes());
                    }
                }
            }
            Request::Wait { keys, timeout_ms } => {
                let deadline = deadline_from(timeout_ms);
                let all = |st: &ServerState| keys.iter().all(|k| st.kv.contains_key(k));
                shared.wait_until(deadline, |st| over(st) || all(st) || st.watches.lost().is_some());
                let lost = {
                    let st = shared.lock();
                    if over(&st) {
                        Some(st.stale(joined.map_or(0, |j| j.rank)))
                    } else {
                        st.watches.lost().cloned()
                    }
                };
                if lost.is_none() && all(&shared.lock()) {
                    put_u8(&mut out, ST_OK);
                } else if let Some(lost) = lost {
                    put_lost(&mut out, &lost);
                } else {
                    let st = shared.lock();
                    let missing: Vec<&String> = keys.iter().filter(|k| !st.kv.contains_key(*k)).collect();
                    put_u8(&mut out, ST_TIMEOUT);
                    put_u64(&mut out, missing.len() as u64);
                    for k in missing {
                        put_bytes(&mut out, k.as_bytes());
                    }
                }
            }
            Request::Join { job, rank, world } => {
                let mut st = shared.lock();
                if st.world == World::FromJoiners && job == st.job_id && joined.is_none() && st.round_over() {
                    st.begin_round(world);
                }
                let refusal = if st.admission.as_ref().is_some_and(|a| !a.closed()) {
                    Some(
                        "the round is still admitting nodes (--nnodes MIN:MAX); a rank joins after its node was \
                          admitted"
                            .to_string(),
                    )
                } else if job != st.job_id {
                    Some(format!(
                        "it hosts job '{}' but this rank belongs to job '{job}'; two jobs share this address and port",
                        st.job_id
                    ))
                } else if world != st.world_size {
                    let others = match st.world {
                        World::Fixed(_) => "rank 0 has".to_string(),
                        World::FromJoiners => {
                            let (s, has) = if st.joined.len() == 1 { ("", "has") } else { ("s", "have") };
                            let ranks = RankList(st.joined.iter().copied().collect());
                            format!("the rank{s} that joined this round of the standalone store before it (rank{s} {ranks}) {has}")
                        }
                    };
                    Some(format!(
                        "this rank has world_size {world} but {others} {}; every worker must get the same WORLD_SIZE",
                        st.world_size
                    ))
                } else if rank >= st.world_size {
                    Some(format!("rank {rank} is not below the world size {}", st.world_size))
                } else if !st.joined.insert(rank) {
                    Some(format!("rank {rank} already joined; two workers were started with the same rank"))
                } else {
                    None
                };
                let round = st.round;
                let in_rank_zero = matches!(st.world, World::Fixed(_));
                drop(st);
                shared.changed.notify_all();
                match refusal {
                    None => {
                        *joined = Some(Joined { rank, round });
                        put_u8(&mut out, ST_OK);
                        put_u8(&mut out, in_rank_zero as u8);
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
                shared.wait_until(deadline, |st| over(st) || complete(st) || st.watches.lost().is_some());
                let st = shared.lock();
                let lost =
                    if over(&st) { Some(st.stale(joined.map_or(0, |j| j.rank))) } else { st.watches.lost().cloned() };
                if let (false, Some(lost)) = (complete(&st), lost) {
                    put_lost(&mut out, &lost);
                    drop(st);
                    send(&mut w, &out)?;
                    continue;
                }
                let complete = complete(&st);
                let missing: Vec<u64> =
                    (0..st.world_size).filter(|r| !st.joined.contains(r)).map(|r| r as u64).collect();
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
            Request::Admit { job, ask, timeout_ms } => {
                let gone = || hung_up(&stream_for_watch);
                admit_node(shared, &job, &ask, deadline_from(timeout_ms), &gone, &mut out)
            }
            Request::Watch { rank, timeout_ms } => {
                let timeout = Duration::from_millis(timeout_ms.clamp(1, u32::MAX as u64));
                drop((r, w));
                *joined = None;
                let round = InRound { shared, round: shared.lock().round };
                return liveness::serve_watch(stream_for_watch, peer, &round, rank, timeout);
            }
        }
        send(&mut w, &out)?;
    }
    Ok(())
}

/// How often a node waiting for admission is checked for having hung up.
const ADMISSION_CHECK: Duration = Duration::from_millis(200);

/// The key (in a round's key space, under the job id) where the store counts the nodes waiting for the round to
/// end; ranks read it with [`crate::Store::nodes_waiting`].
pub(crate) const NODES_WAITING: &str = "hytrain/nodes-waiting";

/// Whether the client of `stream` closed its end: a node that died while waiting for admission must not count.
/// Only called while the connection's own thread waits, so nothing else reads it.
fn hung_up(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let closed = matches!(stream.peek(&mut [0u8; 1]), Ok(0));
    let _ = stream.set_nonblocking(false);
    closed
}

/// Admits `ask`'s node to the current round (beginning one when the last is over), waiting until the round's node
/// count is settled or `deadline` passes, and writes the answer to `out`. A node whose connection closes while it
/// waits (`gone`) leaves the admission.
fn admit_node(shared: &Shared, job: &str, ask: &Ask, deadline: Instant, gone: &dyn Fn() -> bool, out: &mut Vec<u8>) {
    let mut st = shared.lock();
    let refusal = if st.world != World::FromJoiners {
        Some(
            "this store is hosted by rank 0 for a job of a fixed size; a range of nodes needs a standalone store \
              (hytrain rendezvous)"
                .to_string(),
        )
    } else if job != st.job_id {
        Some(format!("it serves job '{}' but this node belongs to job '{job}'", st.job_id))
    } else if !(1..=ask.max).contains(&ask.min) || ask.local_world_size == 0 {
        Some(format!("{}:{} nodes of {} process(es) is no valid range", ask.min, ask.max, ask.local_world_size))
    } else {
        None
    };
    if let Some(why) = refusal {
        put_u8(out, ST_ERR);
        put_bytes(out, why.as_bytes());
        return;
    }
    loop {
        if st.round_over() {
            st.begin_round(0);
            let (previous, expected) = (st.previous_nodes.clone(), st.expected_nodes.clone());
            st.admission = Some(Admission::open(ask, previous, expected));
        }
        let running = st.admission.as_ref().filter(|a| a.closed() && !a.nodes().contains(&ask.node));
        let Some(running) = running else { break };
        // The round began without this node: it waits for the next, which the running ranks begin at a step
        // boundary once they see it waiting (a job that cannot, or one at MAX, makes it wait out its deadline).
        let nodes = running.nodes().len();
        let round = st.round;
        st.waiting.insert(ask.node.clone());
        st.publish_waiting();
        tracing::info!(node = %ask.node, nodes, "a node waits for the running round of the job to end");
        let ended = loop {
            if st.round != round || st.round_over() {
                break true;
            }
            let now = Instant::now();
            if now >= deadline || gone() {
                break false;
            }
            let wake = deadline.min(now + ADMISSION_CHECK);
            st = shared.changed.wait_timeout(st, wake - now).unwrap_or_else(|p| p.into_inner()).0;
        };
        if st.round == round {
            st.waiting.remove(&ask.node);
            st.publish_waiting();
        }
        if !ended {
            put_u8(out, ST_ERR);
            put_bytes(
                out,
                format!(
                    "the job's round of {nodes} node(s) (at most {}) was still running when this node's wait ended; \
                     its ranks make room for a new node at a step boundary (a job of a range of nodes training on \
                     the CPU), or it is at MAX",
                    ask.max
                )
                .as_bytes(),
            );
            return;
        }
    }
    let round = st.round;
    let Some(admission) = st.admission.as_mut() else {
        put_u8(out, ST_ERR);
        put_bytes(
            out,
            b"the round began without an admission of nodes (its ranks are joining with a fixed world size)",
        );
        return;
    };
    let mut standing = admission.arrive(ask, Instant::now());
    loop {
        match standing {
            Standing::Admitted { node_rank, nnodes } => {
                st.world_size = st.admission.as_ref().map_or(0, Admission::world_size);
                drop(st);
                shared.changed.notify_all();
                put_u8(out, ST_OK);
                put_u64(out, node_rank as u64);
                put_u64(out, nnodes as u64);
                return;
            }
            Standing::Refused(why) => {
                put_u8(out, ST_ERR);
                put_bytes(out, why.as_bytes());
                return;
            }
            Standing::Waiting { until } => {
                let now = Instant::now();
                if gone() {
                    if let Some(a) = st.admission.as_mut() {
                        a.leave(&ask.node);
                    }
                    tracing::info!(node = %ask.node, "a node waiting for admission hung up; it no longer counts");
                    return;
                }
                if now >= deadline {
                    let (came, needed) = st.admission.as_mut().map_or((0, ask.min), |a| a.leave(&ask.node));
                    drop(st);
                    shared.changed.notify_all();
                    put_u8(out, ST_TIMEOUT);
                    put_u64(out, came as u64);
                    put_u64(out, needed as u64);
                    return;
                }
                // Woken by another node's arrival, or at the end of the last call or of this node's wait.
                let wake = until.map_or(deadline, |u| u.min(deadline)).min(now + ADMISSION_CHECK).max(now);
                st = shared.changed.wait_timeout(st, wake - now).unwrap_or_else(|p| p.into_inner()).0;
                if st.round != round {
                    put_u8(out, ST_ERR);
                    put_bytes(out, b"the store began a new round while this node waited for admission");
                    return;
                }
                standing = match st.admission.as_mut() {
                    Some(a) => a.look(&ask.node, Instant::now()),
                    None => Standing::Refused("the round's admission is gone".into()),
                };
            }
        }
    }
}

fn put_lost(out: &mut Vec<u8>, lost: &LostRank) {
    put_u8(out, ST_LOST);
    liveness::encode_lost(out, lost);
}

fn deadline_from(timeout_ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(timeout_ms.min(u32::MAX as u64))
}
