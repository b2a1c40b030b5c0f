//! Liveness: how every rank learns within seconds that another rank is gone, whatever it was doing.
//!
//! Besides its request connection, every rank of a job of two or more keeps a second connection to the rendezvous
//! store, the *watch*. Both ends send a one-byte beat a few times per peer timeout. The store's end of a watch
//! declares its rank lost when the connection closes without a goodbye (the process exited or was killed: the
//! kernel closes its sockets at once) or when no beat came for the peer timeout (the process is stopped or cut off
//! from the network). Only the first loss is kept, so ranks that fail *because* of it are not blamed, and it is sent
//! to every watch at once; blocking store requests end with it too. A rank's end of the watch declares the store
//! lost when it closes the watch or falls silent for the peer timeout: rank 0, when the store lives in rank 0's
//! process, else the store itself (a standalone `hytrain rendezvous`, see [`StoreSide`]).
//!
//! On a verdict, a rank aborts what could block on the lost rank (its ring links, its store connection), so a
//! collective in progress returns [`CommError::RankLost`](crate::CommError::RankLost) at once; a caller that is
//! busy elsewhere (loading data, writing a checkpoint) learns it from [`Liveness::wait_lost`].
//!
//! A rank that finishes says goodbye with [`Liveness::leave`] (or by dropping every handle); one that gives up on
//! an error of its own calls [`Liveness::abandon`], so the others stop at once instead of waiting for it.
//!
//! The store end runs inside the store's server but sees the store only through [`WatchHost`]: the job's
//! [`Watches`] under the store's lock, and a way to wake the store's blocked requests. So this file depends on the
//! protocol's status bytes and the wire encoding only, and the server depends on it, not the other way round.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::protocol::{ST_ERR, ST_OK};
use super::wire::{get_bytes_max, get_u64, get_u8, put_bytes, put_u64, put_u8};

/// A beat: "still here".
pub(crate) const BEAT: u8 = 1;
/// Client to store: this rank is done with the job; its connection closing next is not a loss.
pub(crate) const LEAVE: u8 = 2;
/// Store to client: the job lost a rank (rank, host, cause follow).
pub(crate) const LOST: u8 = 3;
/// Client to store: this rank gives up on an error of its own.
pub(crate) const ABANDON: u8 = 4;

/// How long a rank whose connection broke waits for the liveness watch to say which rank was lost; the store learns
/// of a killed process as fast as the rank does, so the verdict is normally there within milliseconds.
pub(crate) const VERDICT_WAIT: Duration = Duration::from_secs(3);

/// Longest host or cause text in a loss message.
const MAX_TEXT: usize = 4096;

/// How often beats go out for a given peer timeout: several per timeout, so one delayed beat is not a loss, and at
/// least once a second, so a loss notice is never queued behind a long wait.
pub(crate) fn beat_interval(peer_timeout: Duration) -> Duration {
    (peer_timeout / 5).clamp(Duration::from_millis(20), Duration::from_secs(1))
}

/// A rank the job lost, and how that was noticed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostRank {
    /// The global rank that is gone.
    pub rank: usize,
    /// Where it ran, as the store saw its address (for rank 0: the master's `host:port`).
    pub host: String,
    /// How the loss was noticed, e.g. "its connection to the rendezvous store closed (the process exited or was
    /// killed)".
    pub cause: String,
    /// Set when what the job lost is a rendezvous store that runs on its own (`hytrain rendezvous`), not a rank:
    /// `rank` is then 0 and means nothing, and `host` is the store's `host:port`.
    pub store: bool,
}

impl std::fmt::Display for LostRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.store {
            write!(f, "lost the rendezvous store at {}: {}", self.host, self.cause)
        } else {
            write!(f, "lost rank {} on {}: {}", self.rank, self.host, self.cause)
        }
    }
}

pub(crate) fn encode_lost(out: &mut Vec<u8>, lost: &LostRank) {
    put_u64(out, lost.rank as u64);
    put_bytes(out, lost.host.as_bytes());
    put_bytes(out, lost.cause.as_bytes());
    put_u8(out, lost.store as u8);
}

pub(crate) fn decode_lost(r: &mut impl Read) -> io::Result<LostRank> {
    let rank = get_u64(r)? as usize;
    let host = String::from_utf8_lossy(&get_bytes_max(r, MAX_TEXT)?).into_owned();
    let cause = String::from_utf8_lossy(&get_bytes_max(r, MAX_TEXT)?).into_owned();
    let store = get_u8(r)? != 0;
    Ok(LostRank { rank, host, cause, store })
}

/// Where a rank's store runs, for the verdict when the store itself goes: in rank 0's process (its loss is rank
/// 0's) or in a process of its own at `endpoint`.
#[derive(Debug, Clone)]
pub(crate) struct StoreSide {
    /// The store's `host:port`.
    pub(crate) endpoint: String,
    /// Whether global rank 0's process hosts it.
    pub(crate) in_rank_zero: bool,
}

impl StoreSide {
    /// The verdict when the store `event` ("closed the connection"); `why` says what that means of its process
    /// ("exited or was killed").
    pub(crate) fn lost(&self, event: &str, why: Option<&str>) -> LostRank {
        let cause = match (self.in_rank_zero, why) {
            (true, Some(why)) => format!("the rendezvous store it hosts {event} (rank 0 {why})"),
            (true, None) => format!("the rendezvous store it hosts {event}"),
            (false, Some(why)) => format!("the store {event} (its process {why})"),
            (false, None) => format!("the store {event}"),
        };
        LostRank { rank: 0, host: self.endpoint.clone(), cause, store: !self.in_rank_zero }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Store side

/// One rank's watch as the store sees it.
pub(crate) struct Member {
    left: bool,
    /// The write half, shared by the beats of this watch's thread and loss notices sent from other threads.
    writer: Arc<Mutex<TcpStream>>,
}

/// What the store keeps about liveness, inside its state lock.
#[derive(Default)]
pub(crate) struct Watches {
    members: HashMap<usize, Member>,
    /// The job's first loss; later ones are consequences.
    lost: Option<LostRank>,
}

/// What the store end of liveness needs from the store it runs in, and all it may touch there: the job's
/// [`Watches`], kept under the store's own lock so that a loss and the store's blocking requests are decided
/// together, and a way to wake those requests. The server implements it; liveness knows nothing else of the store.
pub(crate) trait WatchHost: Send + Sync {
    /// Runs `f` on the watches and the job's world size, under the store's lock.
    fn with_watches(&self, f: &mut dyn FnMut(&mut Watches, usize));
    /// Wakes every request blocked on the store; called after the watches changed, without the lock held.
    fn notify(&self);
    /// Blocks until `ready` holds for the watches or `deadline` passes; returns whether it holds.
    fn wait_watches(&self, deadline: Instant, ready: &mut dyn FnMut(&Watches) -> bool) -> bool;
}

/// [`WatchHost::with_watches`] for a closure that returns a value.
fn with<R>(host: &dyn WatchHost, f: impl FnOnce(&mut Watches, usize) -> R) -> R {
    let mut f = Some(f);
    let mut out = None;
    host.with_watches(&mut |w, world| out = f.take().map(|f| f(w, world)));
    out.expect("with_watches runs its closure once")
}

impl Watches {
    /// The job's first loss, if it lost a rank.
    pub(crate) fn lost(&self) -> Option<&LostRank> {
        self.lost.as_ref()
    }

    /// Whether `rank` has (or had) a watch.
    pub(crate) fn is_watched(&self, rank: usize) -> bool {
        self.members.contains_key(&rank)
    }

    /// The watches of a round of the store that is over: a loss is recorded already, so a late loss or goodbye
    /// of that round's ranks changes nothing and is told to no one.
    pub(crate) fn ended() -> Watches {
        let over = LostRank { rank: 0, host: String::new(), cause: "the round is over".into(), store: false };
        Watches { members: HashMap::new(), lost: Some(over) }
    }

    /// Whether every rank below `world_size` has left the job on purpose.
    pub(crate) fn all_left(&self, world_size: usize) -> bool {
        (0..world_size).all(|r| self.members.get(&r).is_some_and(|m| m.left))
    }
}

fn lock(m: &Mutex<TcpStream>) -> MutexGuard<'_, TcpStream> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records `lost` as the job's loss unless one is recorded already, and tells every watching rank.
pub(crate) fn declare_lost(host: &dyn WatchHost, lost: LostRank) {
    let writers: Option<Vec<Arc<Mutex<TcpStream>>>> = with(host, |watches, _| {
        if watches.lost.is_some() {
            return None;
        }
        tracing::error!(rank = lost.rank, host = %lost.host, "{lost}");
        watches.lost = Some(lost.clone());
        Some(watches.members.values().filter(|m| !m.left).map(|m| m.writer.clone()).collect())
    });
    let Some(writers) = writers else {
        return;
    };
    host.notify();
    let mut frame = vec![LOST];
    encode_lost(&mut frame, &lost);
    for w in writers {
        // Bounded by the write timeout set when the watch began: a stopped rank cannot hold up the others.
        let _ = lock(&w).write_all(&frame);
    }
}

/// Serves one watch connection (after its `OP_WATCH` request) until the rank leaves or is lost.
pub(crate) fn serve_watch(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &dyn WatchHost,
    rank: usize,
    peer_timeout: Duration,
) -> io::Result<()> {
    let beat = beat_interval(peer_timeout);
    let host = peer.ip().to_string();
    stream.set_read_timeout(Some(beat))?;
    stream.set_write_timeout(Some(beat.max(Duration::from_millis(500))))?;
    let writer = Arc::new(Mutex::new(stream.try_clone()?));
    let registered = with(shared, |watches, world| {
        let taken = watches.members.get(&rank).is_some_and(|m| !m.left);
        if rank >= world || taken {
            return Err(world);
        }
        watches.members.insert(rank, Member { left: false, writer: writer.clone() });
        Ok(watches.lost.clone())
    });
    let lost_already = match registered {
        Ok(lost) => lost,
        Err(world) => {
            let mut frame = vec![ST_ERR];
            put_bytes(
                &mut frame,
                format!("rank {rank} cannot be watched (world_size {world}, or already watched)").as_bytes(),
            );
            return lock(&writer).write_all(&frame);
        }
    };
    lock(&writer).write_all(&[ST_OK])?;
    if let Some(lost) = lost_already {
        let mut frame = vec![LOST];
        encode_lost(&mut frame, &lost);
        let _ = lock(&writer).write_all(&frame);
    }
    let lose = |cause: String| declare_lost(shared, LostRank { rank, host: host.clone(), cause, store: false });
    watch_loop(stream, shared, rank, peer_timeout, &writer, &lose);
    // Closing the store's end tells a rank that said goodbye that it was heard, and ends its watch thread.
    let _ = lock(&writer).shutdown(Shutdown::Both);
    Ok(())
}

fn watch_loop(
    stream: TcpStream,
    shared: &dyn WatchHost,
    rank: usize,
    peer_timeout: Duration,
    writer: &Mutex<TcpStream>,
    lose: &dyn Fn(String),
) {
    let beat = beat_interval(peer_timeout);
    let mut reader = stream;
    let mut last_heard = Instant::now();
    let mut last_beat = Instant::now();
    loop {
        match get_u8(&mut reader) {
            Ok(BEAT) => last_heard = Instant::now(),
            Ok(LEAVE) => {
                shared.with_watches(&mut |watches, _| {
                    if let Some(m) = watches.members.get_mut(&rank) {
                        m.left = true;
                    }
                });
                shared.notify();
                tracing::debug!(rank, "rank left the job");
                return;
            }
            Ok(ABANDON) => {
                lose("it stopped on an error of its own (see its log)".into());
                return;
            }
            Ok(other) => {
                lose(format!("its watch connection sent nonsense ({other})"));
                return;
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => {
                lose("its connection to the rendezvous store closed (the process exited or was killed)".into());
                return;
            }
        }
        if last_heard.elapsed() > peer_timeout {
            lose(format!(
                "no heartbeat for {:.0} s, the peer timeout (the process is stopped, hung or cut off from the network)",
                peer_timeout.as_secs_f64()
            ));
            return;
        }
        if last_beat.elapsed() >= beat {
            last_beat = Instant::now();
            if lock(writer).write_all(&[BEAT]).is_err() {
                lose("its connection to the rendezvous store broke (the process exited or was killed)".into());
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Rank side

type Aborter = Box<dyn Fn() + Send + Sync>;

/// What the watch thread and the handles share.
struct Core {
    verdict: Mutex<Option<LostRank>>,
    changed: Condvar,
    aborters: Mutex<Vec<(u64, Aborter)>>,
    next_aborter: AtomicU64,
    /// Set once this rank said goodbye (or gave up): the watch closing after that is expected.
    left: AtomicBool,
    writer: Mutex<TcpStream>,
}

impl Core {
    fn verdict(&self) -> MutexGuard<'_, Option<LostRank>> {
        self.verdict.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, lost: LostRank) {
        {
            let mut v = self.verdict();
            if v.is_some() {
                return;
            }
            *v = Some(lost);
        }
        self.changed.notify_all();
        for (_, abort) in self.aborters.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            abort();
        }
    }

    fn say(&self, message: u8) -> io::Result<()> {
        let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        (&*w).write_all(&[message])
    }
}

struct Handle {
    core: Arc<Core>,
    rank: usize,
    world_size: usize,
    peer_timeout: Duration,
    /// Rank 0's own store, so that it can wait for the others to leave before its process (and the store) ends.
    server: Option<Arc<dyn WatchHost>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Handle {
    fn finish(&self, message: u8) {
        if self.core.left.swap(true, Ordering::SeqCst) {
            return;
        }
        let sent = self.core.say(message);
        // Half-close: the store reads the goodbye, then closes its end, which ends the watch thread.
        let _ = self.core.writer.lock().unwrap_or_else(|p| p.into_inner()).shutdown(Shutdown::Write);
        self.core.changed.notify_all();
        if sent.is_ok() {
            if let Some(h) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.finish(LEAVE);
    }
}

/// This rank's view of the job's liveness (see the module docs). Cheap to clone; the watch ends with a goodbye
/// when the last clone (including the one inside the [`Store`](crate::Store)) is dropped.
#[derive(Clone)]
pub struct Liveness {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Liveness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Liveness").field("rank", &self.handle.rank).field("lost", &self.lost()).finish()
    }
}

/// Removes an abort action when the thing it aborts is dropped.
pub(crate) struct AbortRegistration {
    core: Arc<Core>,
    id: u64,
}

impl Drop for AbortRegistration {
    fn drop(&mut self) {
        self.core.aborters.lock().unwrap_or_else(|p| p.into_inner()).retain(|(id, _)| *id != self.id);
    }
}

impl Liveness {
    /// Starts watching over `stream`, a connection on which the store accepted `OP_WATCH` for `rank`.
    pub(crate) fn start(
        stream: TcpStream,
        rank: usize,
        world_size: usize,
        peer_timeout: Duration,
        store: StoreSide,
        server: Option<Arc<dyn WatchHost>>,
    ) -> io::Result<Liveness> {
        let beat = beat_interval(peer_timeout);
        stream.set_read_timeout(Some(beat))?;
        stream.set_write_timeout(Some(beat.max(Duration::from_millis(500))))?;
        let core = Arc::new(Core {
            verdict: Mutex::new(None),
            changed: Condvar::new(),
            aborters: Mutex::new(Vec::new()),
            next_aborter: AtomicU64::new(0),
            left: AtomicBool::new(false),
            writer: Mutex::new(stream.try_clone()?),
        });
        let thread = {
            let core = core.clone();
            std::thread::Builder::new()
                .name(format!("hytrain-watch-{rank}"))
                .spawn(move || watch(stream, &core, peer_timeout, &store))?
        };
        Ok(Liveness {
            handle: Arc::new(Handle { core, rank, world_size, peer_timeout, server, thread: Mutex::new(Some(thread)) }),
        })
    }

    /// The rank the job lost, if any.
    pub fn lost(&self) -> Option<LostRank> {
        self.handle.core.verdict().clone()
    }

    /// Blocks until the job loses a rank (its [`LostRank`]), this rank leaves (`None`), or `timeout` passes
    /// (`None`; `timeout: None` waits without limit).
    pub fn wait_lost(&self, timeout: Option<Duration>) -> Option<LostRank> {
        let core = &self.handle.core;
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut v = core.verdict();
        loop {
            if v.is_some() {
                return v.clone();
            }
            if core.left.load(Ordering::SeqCst) {
                return None;
            }
            let wait = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(w) if !w.is_zero() => w,
                    _ => return None,
                },
                // Rechecks `left` now and then; a goodbye also notifies.
                None => Duration::from_secs(1),
            };
            v = core.changed.wait_timeout(v, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Says goodbye: this rank is done with the job, so its process ending is not a loss. Rank 0, whose process
    /// hosts the store, then waits (at most the peer timeout) until every other rank has left too, so that a rank
    /// still finishing does not see the store vanish and take it for a loss.
    pub fn leave(&self) {
        self.handle.finish(LEAVE);
        if let Some(server) = &self.handle.server {
            let deadline = Instant::now() + self.handle.peer_timeout;
            let world = self.handle.world_size;
            let done = server.wait_watches(deadline, &mut |watches| watches.all_left(world) || watches.lost.is_some());
            if !done {
                tracing::warn!(
                    rank = self.handle.rank,
                    "not every rank left the job within the peer timeout; rank 0 exits anyway"
                );
            }
        }
    }

    /// Gives up on an error of this rank's own: every other rank is told at once that this rank is lost.
    pub fn abandon(&self) {
        self.handle.finish(ABANDON);
    }

    /// Runs `abort` once the job loses a rank (at once if it has already), until the registration is dropped.
    pub(crate) fn on_lost(&self, abort: impl Fn() + Send + Sync + 'static) -> AbortRegistration {
        let core = &self.handle.core;
        let id = core.next_aborter.fetch_add(1, Ordering::SeqCst);
        core.aborters.lock().unwrap_or_else(|p| p.into_inner()).push((id, Box::new(abort)));
        if core.verdict().is_some() {
            abort_all(core);
        }
        AbortRegistration { core: core.clone(), id }
    }

    /// Test hook: the watch closes without a goodbye, as when the process is killed.
    #[cfg(test)]
    pub(crate) fn sever(&self) {
        self.handle.core.left.store(true, Ordering::SeqCst);
        let _ = self.handle.core.writer.lock().unwrap_or_else(|p| p.into_inner()).shutdown(Shutdown::Both);
    }
}

fn abort_all(core: &Core) {
    for (_, abort) in core.aborters.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        abort();
    }
}

/// The watch thread: beats to the store, reads its beats and loss notices, and records a verdict.
fn watch(mut stream: TcpStream, core: &Core, peer_timeout: Duration, store: &StoreSide) {
    let beat = beat_interval(peer_timeout);
    const KILLED: Option<&str> = Some("exited or was killed");
    let mut last_heard = Instant::now();
    let mut last_beat: Option<Instant> = None;
    loop {
        let left = core.left.load(Ordering::SeqCst);
        if !left && last_beat.is_none_or(|t| t.elapsed() >= beat) {
            last_beat = Some(Instant::now());
            if core.say(BEAT).is_err() && !core.left.load(Ordering::SeqCst) {
                core.record(store.lost("broke the connection", KILLED));
                return;
            }
        }
        match get_u8(&mut stream) {
            Ok(BEAT) => last_heard = Instant::now(),
            Ok(LOST) => {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                match decode_lost(&mut stream) {
                    Ok(lost) => core.record(lost),
                    Err(e) => core.record(store.lost(&format!("sent a broken loss notice: {e}"), None)),
                }
                return;
            }
            Ok(other) => {
                core.record(store.lost(&format!("sent nonsense on the watch ({other})"), None));
                return;
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if core.left.load(Ordering::SeqCst) {
                    // Said goodbye; the store closes its end soon, but nothing more is needed from it.
                    if last_heard.elapsed() > peer_timeout {
                        return;
                    }
                } else if last_heard.elapsed() > peer_timeout {
                    core.record(store.lost(
                        &format!("sent nothing for {:.0} s, the peer timeout", peer_timeout.as_secs_f64()),
                        Some("is stopped, hung or cut off from the network"),
                    ));
                    return;
                }
            }
            Err(_) => {
                if !core.left.load(Ordering::SeqCst) {
                    core.record(store.lost("closed the connection", KILLED));
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
