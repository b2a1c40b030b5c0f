//! The CPU backend: ranks linked in a TCP ring, each sending to `rank + 1` and receiving from `rank - 1`.
//!
//! A collective is a plan (see `schedule`) of steps cut into segments. A long-lived sender thread per ring writes
//! the send segments while the calling thread reads the receive segments and reduces them into the caller's buffer,
//! so the link carries data in both directions at once. Segment `j` of step `t` is only sent once segment `j` of
//! step `t - 1` has been received and reduced, which is all the ordering the ring needs.
//!
//! Both threads work on the caller's buffer through one raw pointer. They never touch the same bytes at the same
//! time: within a step the send and receive ranges are different chunks, and a chunk sent at step `t` can only be
//! written again by the receiver after the data derived from it has gone all the way around the ring, which
//! requires that the kernel has already copied it out of the buffer. Every collective waits for the sender to
//! finish (also when it fails or unwinds) before the borrow of the buffer ends.
//!
//! Every collective starts with a 32-byte header so that ranks calling different collectives, or the same one with
//! different sizes, fail with a message naming both calls instead of silently mixing data.

mod schedule;

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytemuck::Pod;
use half::bf16;

use crate::rendezvous::auth::{self, Handshake, JobToken, NONCE_LEN};
use crate::rendezvous::liveness::{AbortRegistration, LostRank};
use crate::net::bind_any;
use crate::rendezvous::liveness::VERDICT_WAIT;
use crate::rendezvous::wire::{get_bytes_max, get_u64, put_bytes, put_u64};
use crate::{Buffer, Collective, CommError, CommOptions, Liveness, Membership, ReduceOp, Store};
use schedule::{segment, segment_count, Action, Step};

/// Default segment: large enough that per-segment overhead (a syscall, a lock) is noise, small enough that the next
/// rank starts forwarding long before a chunk is complete.
pub const DEFAULT_SEGMENT_BYTES: usize = 512 << 10;

/// Version 2 of the ring link: the hello is followed by the job-token handshake (see `auth`).
const HELLO: &[u8; 8] = b"HYTRING2";
/// Longest job id a connecting process may send before it has authenticated.
const MAX_JOB_ID: usize = 4096;
/// How long a process connecting to a ring port may take to prove it holds the job token.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Ring connections allowed in the handshake at once; more are dropped, so a flood of silent clients neither
/// exhausts threads nor delays the real peer (which is admitted in parallel with them).
const MAX_HANDSHAKES: usize = 64;
const HEADER_MAGIC: u32 = u32::from_le_bytes(*b"HYTC");

const OP_ALLREDUCE: u8 = 1;
const OP_BROADCAST: u8 = 2;
const OP_ALLGATHER: u8 = 3;
const OP_BARRIER: u8 = 4;

const DT_U8: u8 = 0;
const DT_F32: u8 = 1;
const DT_F64: u8 = 2;
const DT_BF16: u8 = 3;

/// How long a failing rank tries to tell the store about its failure; the store's host may be the rank that died.
const FAILURE_REPORT_WITHIN: Duration = Duration::from_secs(10);

/// What every rank says about the collective it is about to run; the receiving rank compares it with its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    op: u8,
    dtype: u8,
    seq: u64,
    len: u64,
    aux: u64,
}

impl Header {
    fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        b[4] = self.op;
        b[5] = self.dtype;
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..32].copy_from_slice(&self.aux.to_le_bytes());
        b
    }

    fn decode(b: &[u8; 32]) -> Option<Header> {
        let word =
            |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().unwrap_or_default());
        (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == HEADER_MAGIC).then(|| Header {
            op: b[4],
            dtype: b[5],
            seq: word(8..16),
            len: word(16..24),
            aux: word(24..32),
        })
    }

    fn describe(&self) -> String {
        let dtype = match self.dtype {
            DT_F32 => "f32",
            DT_F64 => "f64",
            DT_BF16 => "bf16",
            _ => "u8",
        };
        match self.op {
            OP_ALLREDUCE => format!("allreduce of {} {dtype} values", self.len),
            OP_BROADCAST => format!("broadcast of {} bytes from rank {}", self.len, self.aux),
            OP_ALLGATHER => format!("allgather of {} bytes per rank", self.len),
            OP_BARRIER => "barrier".into(),
            other => format!("unknown collective {other}"),
        }
    }
}

struct Progress {
    /// Receive segments completed in the current collective.
    done: usize,
    /// The receiving side failed; the sender must stop.
    abort: bool,
    /// The sender failed first; a receive error after this is a consequence, not the cause.
    sender_failed: bool,
}

/// Names the root cause of a ring failure. The liveness watch knows which rank the job lost, whichever link this
/// rank saw break first; without a verdict (the failing rank is alive, e.g. it called a different collective), the
/// first failure recorded in the store is the cause, so ranks whose own error is only a consequence (a connection
/// the failing rank closed) report the same root cause.
struct Reporter {
    store: Store,
    liveness: Option<Liveness>,
    key: String,
    rank: usize,
}

impl Reporter {
    /// The liveness watch's verdict if the job has lost a rank, waiting up to `wait` for one.
    fn lost_within(&self, wait: Duration) -> Option<LostRank> {
        let live = self.liveness.as_ref()?;
        match wait.is_zero() {
            true => live.lost(),
            false => live.wait_lost(Some(wait)),
        }
    }

    fn report(&self, local: CommError) -> CommError {
        // A broken link may be the first sign of a loss the store is announcing right now; other failures (a
        // mismatch) are this rank's own finding and need no wait.
        let wait = match local {
            CommError::PeerLost { .. } | CommError::Timeout { .. } => VERDICT_WAIT,
            _ => Duration::ZERO,
        };
        if let Some(lost) = self.lost_within(wait) {
            let e = CommError::RankLost(lost);
            tracing::error!(rank = self.rank, "{e} (this rank saw: {local})");
            return e;
        }
        let mine = encode_failure(self.rank, &local);
        let reported =
            match self
                .store
                .set_if_absent_within(&self.key, mine.as_bytes(), FAILURE_REPORT_WITHIN)
            {
                Ok(first) if first != mine.as_bytes() => {
                    match decode_failure(&first) {
                        // This rank is alive, so a record naming it describes the effect of its own failure, not a cause.
                        Some(
                            CommError::PeerLost { rank, .. } | CommError::Timeout { rank, .. },
                        ) if rank == self.rank => local,
                        Some(root) => {
                            tracing::warn!(
                                rank = self.rank,
                                "saw {local}; the first failure in the ring was: {root}"
                            );
                            root
                        }
                        None => local,
                    }
                }
                _ => local,
            };
        tracing::error!(rank = self.rank, "{reported}");
        reported
    }
}

struct Handoff {
    progress: Mutex<Progress>,
    cv: Condvar,
}

impl Handoff {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The caller's buffer as the sender thread sees it.
struct SendPtr(*const u8);
// SAFETY: the pointer is only dereferenced while the collective that created it waits for the sender to finish,
// on ranges the receiving thread does not write at that time (see the module comment).
unsafe impl Send for SendPtr {}

struct SendJob {
    base: SendPtr,
    esize: usize,
    seg: usize,
    header: [u8; 32],
    steps: Vec<Step>,
    during: &'static str,
}

struct SendDone {
    steps: Vec<Step>,
    /// `Err(None)`: stopped because the receiving side failed, which reports the error.
    result: Result<(), Option<CommError>>,
}

struct Links {
    prev: TcpStream,
    next: TcpStream,
    prev_rank: usize,
    jobs: Option<mpsc::Sender<SendJob>>,
    done: mpsc::Receiver<SendDone>,
    sync: Arc<Handoff>,
    reporter: Arc<Reporter>,
    collective_timeout_secs: u64,
    sender: Option<JoinHandle<()>>,
    /// Aborts both links when the liveness watch reports a lost rank, so a collective blocked on it returns.
    _on_lost: Option<AbortRegistration>,
    /// Test hook: after this many received segments, close both connections as a crashing process would.
    #[cfg(test)]
    sever_after: Option<usize>,
}

impl Links {
    /// Stops the sender and unblocks both directions; used when a collective fails.
    fn abort(&self) {
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

/// TCP ring collectives for CPU buffers (see the crate docs). Built with [`Ring::connect`] after a rendezvous.
pub struct Ring {
    rank: usize,
    world: usize,
    links: Option<Links>,
    seq: u64,
    broken: Option<String>,
    segment_bytes: usize,
    steps: Vec<Step>,
    send_steps: Vec<Step>,
    scratch: Vec<u64>,
    widened: Vec<f32>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("rank", &self.rank)
            .field("world_size", &self.world)
            .finish()
    }
}

impl Ring {
    /// Links this rank into the ring: listens on an ephemeral port, publishes its address in the store, connects to
    /// `rank + 1` and accepts `rank - 1`. Both ends check job id, ring generation and rank, and prove to each
    /// other that they hold the job token (`opts`' [`CommOptions::token`]), so a stray, stale or hostile
    /// connection is refused and cannot inject data. Every rank must call this the same number of times, in the
    /// same order.
    pub fn connect(store: &Store, m: &Membership, opts: &CommOptions) -> Result<Ring, CommError> {
        m.validate()?;
        if store.rank() != m.rank || store.world_size() != m.world_size {
            return Err(CommError::InvalidMembership(format!(
                "the store was joined as rank {} of {} but the ring is asked for rank {} of {}",
                store.rank(),
                store.world_size(),
                m.rank,
                m.world_size
            )));
        }
        let mut ring = Ring::unlinked(m);
        if m.world_size == 1 {
            return Ok(ring);
        }
        let generation = store.next_generation("ring");
        ring.links = Some(link(store, m, opts, generation)?);
        Ok(ring)
    }

    /// `m`'s place in a ring with no links yet: what a world of one keeps, and what [`Ring::connect`] and
    /// [`Ring::connect_group`] link.
    fn unlinked(m: &Membership) -> Ring {
        let mut ring = Ring {
            rank: m.rank,
            world: m.world_size,
            links: None,
            seq: 0,
            broken: None,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            steps: Vec::new(),
            send_steps: Vec::new(),
            scratch: Vec::new(),
            widened: Vec::new(),
        };
        ring.set_segment_bytes(DEFAULT_SEGMENT_BYTES);
        ring
    }

    /// Links a ring of a subset of the job's ranks (the node leaders of the shared-memory transport): `m` gives
    /// this rank's place in the subset, whose rank 0 must be the job's rank 0 (it hosts the store). Every member
    /// of the subset must call this the same number of times; generations are counted apart from [`Ring::connect`]
    /// and offset so that their store keys and handshakes never match a whole-job ring's.
    pub(crate) fn connect_group(
        store: &Store,
        m: &Membership,
        opts: &CommOptions,
    ) -> Result<Ring, CommError> {
        m.validate()?;
        let mut ring = Ring::unlinked(m);
        if m.world_size > 1 {
            let generation = (1 << 32) + store.next_generation("ring-group");
            ring.links = Some(link(store, m, opts, generation)?);
        }
        Ok(ring)
    }

    /// Changes the segment size (bytes, rounded down to whole elements, at least one element). Use the same value
    /// on every rank; the default is [`DEFAULT_SEGMENT_BYTES`].
    pub fn set_segment_bytes(&mut self, bytes: usize) {
        self.segment_bytes = bytes.max(8);
        self.scratch = vec![0u64; self.segment_bytes.div_ceil(8)];
    }

    fn usable(&self) -> Result<(), CommError> {
        match &self.broken {
            Some(why) => Err(CommError::Broken(why.clone())),
            None => Ok(()),
        }
    }

    /// Runs the plan in `self.steps` over `buf`; a failure marks the ring unusable.
    fn run<T: Pod>(
        &mut self,
        during: &'static str,
        op: u8,
        dtype: u8,
        aux: u64,
        buf: &mut [T],
        reduce: fn(&mut [T], &[T]),
    ) -> Result<(), CommError> {
        self.usable()?;
        let header = Header {
            op,
            dtype,
            seq: self.seq,
            len: buf.len() as u64,
            aux,
        };
        self.seq += 1;
        let outcome = self.exchange(during, header, buf, reduce);
        if let Err(e) = &outcome {
            self.broken = Some(e.to_string());
        }
        outcome
    }

    fn exchange<T: Pod>(
        &mut self,
        during: &'static str,
        header: Header,
        buf: &mut [T],
        reduce: fn(&mut [T], &[T]),
    ) -> Result<(), CommError> {
        let gone = || CommError::Broken("the ring's sender thread is gone".into());
        let esize = std::mem::size_of::<T>();
        let seg = (self.segment_bytes / esize).max(1);
        let Ring {
            links,
            steps,
            send_steps,
            scratch,
            ..
        } = self;
        let links = links.as_mut().ok_or_else(gone)?;
        let jobs = links.jobs.as_ref().ok_or_else(gone)?;
        send_steps.clear();
        send_steps.extend_from_slice(steps);
        {
            let mut p = links.sync.lock();
            p.done = 0;
            p.abort = false;
            p.sender_failed = false;
        }
        let base = buf.as_mut_ptr();
        let job = SendJob {
            base: SendPtr(base as *const u8),
            esize,
            seg,
            header: header.encode(),
            steps: std::mem::take(send_steps),
            during,
        };
        jobs.send(job).map_err(|_| gone())?;
        let mut flight = InFlight {
            links,
            finished: false,
        };

        let received = receive(
            flight.links,
            &header,
            base,
            buf.len(),
            steps,
            seg,
            scratch,
            reduce,
        );
        let recv_error = match received {
            Ok(()) => None,
            Err(f) => {
                let links = &*flight.links;
                let consequence = links.sync.lock().sender_failed;
                let reported = match f {
                    _ if consequence => None,
                    Failure::Recv(e) => Some(links.reporter.report(io_error(
                        links.prev_rank,
                        during,
                        links.collective_timeout_secs,
                        &e,
                    ))),
                    Failure::Mismatch(m) => Some(links.reporter.report(CommError::Mismatch(m))),
                    #[cfg(test)]
                    Failure::Severed => Some(CommError::Broken("severed by the test".into())),
                };
                // Recorded first, then the connections close: a neighbour that sees them close finds the record.
                links.abort();
                Some(reported)
            }
        };
        let done = flight.links.done.recv().map_err(|_| gone())?;
        flight.finished = true;
        *send_steps = done.steps;
        outcome(recv_error, done.result, &flight.links.reporter, during)
    }

    fn allreduce_typed<T: Pod>(
        &mut self,
        buf: &mut [T],
        op: u8,
        dtype: u8,
        reduce: fn(&mut [T], &[T]),
    ) -> Result<(), CommError> {
        self.usable()?;
        if self.world == 1 {
            return Ok(());
        }
        schedule::allreduce(buf.len(), self.world, self.rank, &mut self.steps);
        self.run(
            if op == OP_BARRIER {
                "barrier"
            } else {
                "allreduce"
            },
            op,
            dtype,
            0,
            buf,
            reduce,
        )
    }
}

/// A collective's result from what its two halves saw: the receiving side's reported error (`Some(None)`: it failed
/// only because the sender had) and the sender's result (`Err(None)`: it stopped because it was told to).
fn outcome(
    received: Option<Option<CommError>>,
    sent: Result<(), Option<CommError>>,
    reporter: &Reporter,
    during: &str,
) -> Result<(), CommError> {
    match (received, sent) {
        (None, Ok(())) => Ok(()),
        (Some(Some(e)), _) => Err(e),
        (_, Err(Some(e))) => Err(e),
        // Neither side failed on its own: the liveness watch aborted the collective (a rank was lost while this
        // rank's own links still worked, e.g. that rank's store connection dropped), so the verdict is the cause.
        _ => Err(match reporter.lost_within(Duration::ZERO) {
            Some(lost) => {
                let e = CommError::RankLost(lost);
                tracing::error!(rank = reporter.rank, "{e}");
                e
            }
            None => CommError::Broken(format!("{during} stopped without a recorded cause")),
        }),
    }
}

/// Keeps the caller's buffer borrowed until the sender thread has let go of it, also on unwinding.
struct InFlight<'a> {
    links: &'a mut Links,
    finished: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.links.abort();
            let _ = self.links.done.recv();
        }
    }
}

enum Failure {
    Recv(io::Error),
    Mismatch(String),
    #[cfg(test)]
    Severed,
}

#[allow(clippy::too_many_arguments)]
fn receive<T: Pod>(
    links: &mut Links,
    mine: &Header,
    base: *mut T,
    len: usize,
    steps: &[Step],
    seg: usize,
    scratch: &mut [u64],
    reduce: fn(&mut [T], &[T]),
) -> Result<(), Failure> {
    let esize = std::mem::size_of::<T>();
    let mut raw = [0u8; 32];
    links.prev.read_exact(&mut raw).map_err(Failure::Recv)?;
    match Header::decode(&raw) {
        Some(theirs) if theirs == *mine => {}
        Some(theirs) => {
            return Err(Failure::Mismatch(format!(
                "rank {} called {} as collective #{} but this rank called {} as collective #{}; every rank must \
                 issue the same collectives in the same order with the same sizes",
                links.prev_rank,
                theirs.describe(),
                theirs.seq,
                mine.describe(),
                mine.seq
            )))
        }
        None => {
            return Err(Failure::Mismatch(format!(
                "rank {} sent data where a collective header was expected (the ranks' collectives got out of step)",
                links.prev_rank
            )))
        }
    }
    #[cfg(test)]
    let mut received = 0usize;
    for step in steps {
        for j in 0..segment_count(&step.recv, seg) {
            #[cfg(test)]
            {
                if links.sever_after == Some(received) {
                    // As a killed process: its watch closes without a goodbye, its links close, and it reports
                    // nothing (its own sender must not record the broken link it sees as a failure of rank + 1).
                    links.sync.lock().abort = true;
                    links.sync.cv.notify_all();
                    if let Some(live) = &links.reporter.liveness {
                        live.sever();
                    }
                    let _ = links.next.shutdown(Shutdown::Both);
                    let _ = links.prev.shutdown(Shutdown::Both);
                    return Err(Failure::Severed);
                }
                received += 1;
            }
            let r = segment(&step.recv, seg, j);
            debug_assert!(r.end <= len);
            match step.action {
                Action::Copy => {
                    // SAFETY: `r` lies within the buffer, and the sender is not reading it now (module comment).
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            base.add(r.start) as *mut u8,
                            r.len() * esize,
                        )
                    };
                    links.prev.read_exact(dst).map_err(Failure::Recv)?;
                }
                Action::Reduce => {
                    let tmp = &mut bytemuck::cast_slice_mut::<u64, u8>(scratch)[..r.len() * esize];
                    links.prev.read_exact(tmp).map_err(Failure::Recv)?;
                    // SAFETY: as above.
                    let dst = unsafe { std::slice::from_raw_parts_mut(base.add(r.start), r.len()) };
                    reduce(dst, bytemuck::cast_slice(tmp));
                }
            }
            links.sync.lock().done += 1;
            links.sync.cv.notify_all();
        }
    }
    Ok(())
}

/// What the sender thread owns.
struct SenderThread {
    next: TcpStream,
    /// A handle on the receiving connection, to unblock the receiving thread when sending fails.
    prev: TcpStream,
    jobs: mpsc::Receiver<SendJob>,
    done: mpsc::Sender<SendDone>,
    sync: Arc<Handoff>,
    reporter: Arc<Reporter>,
    next_rank: usize,
    timeout_secs: u64,
}

fn sender_main(t: SenderThread) {
    let SenderThread {
        mut next,
        prev,
        jobs,
        done,
        sync,
        reporter,
        next_rank,
        timeout_secs,
    } = t;
    while let Ok(job) = jobs.recv() {
        let result = send_job(&mut next, &job, &sync).map_err(|e| {
            {
                let mut p = sync.lock();
                if p.abort {
                    return None;
                }
                p.sender_failed = true;
            }
            let reported = reporter.report(io_error(next_rank, job.during, timeout_secs, &e));
            // The receiving thread may be blocked on a peer that is waiting for our data; wake it up.
            let _ = prev.shutdown(Shutdown::Both);
            Some(reported)
        });
        if done
            .send(SendDone {
                steps: job.steps,
                result,
            })
            .is_err()
        {
            break;
        }
    }
}

fn send_job(next: &mut TcpStream, job: &SendJob, sync: &Handoff) -> io::Result<()> {
    next.write_all(&job.header)?;
    let mut prev_step_base = 0;
    for (t, step) in job.steps.iter().enumerate() {
        for j in 0..segment_count(&step.send, job.seg) {
            if t > 0 {
                let need = prev_step_base + j + 1;
                let mut p = sync.lock();
                while p.done < need && !p.abort {
                    p = sync.cv.wait(p).unwrap_or_else(|e| e.into_inner());
                }
                if p.abort {
                    return Err(io::Error::new(
                        io::ErrorKind::Interrupted,
                        "collective aborted",
                    ));
                }
            }
            let r = segment(&step.send, job.seg, j);
            // SAFETY: `r` lies within the caller's buffer, which outlives this job, and no thread writes it now.
            let bytes = unsafe {
                std::slice::from_raw_parts(job.base.0.add(r.start * job.esize), r.len() * job.esize)
            };
            next.write_all(bytes)?;
        }
        if t > 0 {
            prev_step_base += segment_count(&job.steps[t - 1].recv, job.seg);
        }
    }
    Ok(())
}

fn io_error(peer: usize, during: &'static str, timeout_secs: u64, e: &io::Error) -> CommError {
    use io::ErrorKind::*;
    match e.kind() {
        WouldBlock | TimedOut => CommError::Timeout {
            rank: peer,
            during,
            secs: timeout_secs,
        },
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected => {
            CommError::PeerLost {
                rank: peer,
                during,
                cause: "connection closed".into(),
            }
        }
        _ => CommError::PeerLost {
            rank: peer,
            during,
            cause: e.to_string(),
        },
    }
}

fn static_op(name: &str) -> &'static str {
    match name {
        "allreduce" => "allreduce",
        "broadcast" => "broadcast",
        "allgather" => "allgather",
        "barrier" => "barrier",
        _ => "a collective",
    }
}

/// One line per field: `reporter`, kind, then the kind's fields.
pub(crate) fn encode_failure(reporter: usize, e: &CommError) -> String {
    match e {
        CommError::PeerLost {
            rank,
            during,
            cause,
        } => format!("{reporter}\nlost\n{rank}\n{during}\n{cause}"),
        CommError::Timeout { rank, during, secs } => {
            format!("{reporter}\ntimeout\n{rank}\n{during}\n{secs}")
        }
        other => format!("{reporter}\nother\n{other}"),
    }
}

pub(crate) fn decode_failure(b: &[u8]) -> Option<CommError> {
    let s = std::str::from_utf8(b).ok()?;
    let mut f = s.splitn(5, '\n');
    let reporter: usize = f.next()?.parse().ok()?;
    match f.next()? {
        "lost" => Some(CommError::PeerLost {
            rank: f.next()?.parse().ok()?,
            during: static_op(f.next()?),
            cause: f.next()?.to_string(),
        }),
        "timeout" => Some(CommError::Timeout {
            rank: f.next()?.parse().ok()?,
            during: static_op(f.next()?),
            secs: f.next()?.parse().ok()?,
        }),
        "other" => Some(CommError::Remote {
            rank: reporter,
            message: s.splitn(3, '\n').nth(2)?.to_string(),
        }),
        _ => None,
    }
}

fn add_f32(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

fn add_f64(dst: &mut [f64], src: &[f64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

fn copy_only(_: &mut [u8], _: &[u8]) {}

impl Collective for Ring {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn backend(&self) -> &'static str {
        "ring"
    }

    fn allreduce(&mut self, buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError> {
        let n = self.world;
        match buf {
            Buffer::F32(b) => {
                self.allreduce_typed(b, OP_ALLREDUCE, DT_F32, add_f32)?;
                if op == ReduceOp::Avg && n > 1 {
                    b.iter_mut().for_each(|x| *x /= n as f32);
                }
            }
            Buffer::F64(b) => {
                self.allreduce_typed(b, OP_ALLREDUCE, DT_F64, add_f64)?;
                if op == ReduceOp::Avg && n > 1 {
                    b.iter_mut().for_each(|x| *x /= n as f64);
                }
            }
            Buffer::Bf16(b) => {
                if n == 1 {
                    return self.usable();
                }
                // Partial sums travel as f32 so the only rounding to bf16 is the final one.
                let mut wide = std::mem::take(&mut self.widened);
                wide.clear();
                wide.extend(b.iter().map(|x| x.to_f32()));
                let result = self.allreduce_typed(&mut wide, OP_ALLREDUCE, DT_BF16, add_f32);
                if result.is_ok() {
                    let scale = if op == ReduceOp::Avg { n as f32 } else { 1.0 };
                    for (d, s) in b.iter_mut().zip(&wide) {
                        *d = bf16::from_f32(*s / scale);
                    }
                }
                self.widened = wide;
                result?;
            }
        }
        Ok(())
    }

    fn broadcast(&mut self, bytes: &mut [u8], root: usize) -> Result<(), CommError> {
        if root >= self.world {
            return Err(CommError::InvalidArgument {
                op: "broadcast",
                detail: format!("root {root} is not a rank (world_size {})", self.world),
            });
        }
        self.usable()?;
        if self.world == 1 {
            return Ok(());
        }
        schedule::broadcast(bytes.len(), self.world, self.rank, root, &mut self.steps);
        self.run(
            "broadcast",
            OP_BROADCAST,
            DT_U8,
            root as u64,
            bytes,
            copy_only,
        )
    }

    fn allgather(&mut self, input: &[u8], output: &mut [u8]) -> Result<(), CommError> {
        if input.len().checked_mul(self.world) != Some(output.len()) {
            return Err(CommError::InvalidArgument {
                op: "allgather",
                detail: format!(
                    "output has {} bytes but must hold {} ranks x {} input bytes",
                    output.len(),
                    self.world,
                    input.len()
                ),
            });
        }
        self.usable()?;
        let block = input.len();
        output[self.rank * block..(self.rank + 1) * block].copy_from_slice(input);
        if self.world == 1 {
            return Ok(());
        }
        schedule::allgather(block, self.world, self.rank, &mut self.steps);
        self.run("allgather", OP_ALLGATHER, DT_U8, 0, output, copy_only)
    }

    fn liveness(&self) -> Option<Liveness> {
        self.links
            .as_ref()
            .and_then(|l| l.reporter.liveness.clone())
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        // A one-element allreduce: its result depends on every rank, so no rank can leave before all arrived.
        let mut one = [1.0f32];
        self.allreduce_typed(&mut one, OP_BARRIER, DT_F32, add_f32)?;
        if one[0] != self.world as f32 {
            return Err(CommError::Mismatch(format!(
                "barrier counted {} ranks instead of {}",
                one[0], self.world
            )));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Set-up

fn link(
    store: &Store,
    m: &Membership,
    opts: &CommOptions,
    generation: u64,
) -> Result<Links, CommError> {
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
    let listener = ring_listener(store, m)
        .map_err(|e| setup(prev_rank, &"*:0", format!("cannot listen: {e}")))?;
    let port = listener
        .local_addr()
        .map_err(|e| setup(prev_rank, &"*:0", e.to_string()))?
        .port();
    let me = SocketAddr::new(store.local_ip(), port);
    store.set(
        &format!("ring/{generation}/addr/{rank}"),
        me.to_string().as_bytes(),
    )?;

    // Accepting runs beside connecting: rank - 1 finishes its handshake only once this rank answers it, while
    // this rank may be waiting for rank + 1 to answer its own.
    let stop = Arc::new(AtomicBool::new(false));
    // A rank lost while the ring is being built (the next rank died before it answered) ends the set-up at once.
    let liveness = store.liveness();
    let verdict = || {
        liveness
            .as_ref()
            .and_then(Liveness::lost)
            .map(CommError::RankLost)
    };
    let _stop_on_loss = liveness.as_ref().map(|live| {
        let stop = stop.clone();
        live.on_lost(move || stop.store(true, Ordering::SeqCst))
    });
    let acceptor = {
        let expect = Expected {
            job_id: opts.job_id.clone(),
            generation,
            prev_rank,
            rank,
            world,
        };
        let (token, stop) = (token.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("hytrain-ring-accept-{rank}"))
            .spawn(move || accept_prev(listener, expect, &token, deadline, &stop))
            .map_err(|e| {
                setup(
                    prev_rank,
                    &format!("port {port}"),
                    format!("cannot start the accepting thread: {e}"),
                )
            })?
    };
    let connected = (|| {
        let published = store.get(&format!("ring/{generation}/addr/{next_rank}"))?;
        let published = String::from_utf8_lossy(&published).into_owned();
        let parsed: SocketAddr = published.parse().map_err(|_| {
            setup(
                next_rank,
                &published,
                "published address does not parse".into(),
            )
        })?;
        // Rank 0 publishes the loopback address it used for its own store; everyone else reaches rank 0's host at
        // the address they reached the master at.
        let next_addr = if next_rank == 0 {
            SocketAddr::new(store.master_ip(), parsed.port())
        } else {
            parsed
        };
        let mut next = connect_with_retry(next_addr, deadline, &stop)
            .map_err(|e| setup(next_rank, &next_addr, e))?;
        let hello = Hello {
            job_id: &opts.job_id,
            generation,
            from_rank: rank,
            world,
        };
        introduce(&mut next, &hello, &token, deadline).map_err(|f| match f {
            Handshake::Refused(reason) => setup(
                next_rank,
                &next_addr,
                format!("it refused our handshake: {reason}"),
            ),
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
        progress: Mutex::new(Progress {
            done: 0,
            abort: false,
            sender_failed: false,
        }),
        cv: Condvar::new(),
    });
    let liveness = store.liveness();
    let on_lost = match &liveness {
        Some(live) => {
            let (next, prev, sync) = (
                next.try_clone()
                    .map_err(|e| setup(next_rank, &next_addr, e.to_string()))?,
                prev.try_clone()
                    .map_err(|e| setup(prev_rank, &"socket", e.to_string()))?,
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
    let reporter = Arc::new(Reporter {
        store: store.clone(),
        liveness,
        key: format!("ring/{generation}/failure"),
        rank,
    });
    let timeout_secs = opts.collective_timeout.as_secs();
    let (job_tx, job_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let sender = {
        let next = next
            .try_clone()
            .map_err(|e| setup(next_rank, &next_addr, e.to_string()))?;
        let prev = prev
            .try_clone()
            .map_err(|e| setup(prev_rank, &"socket", e.to_string()))?;
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
            .map_err(|e| {
                setup(
                    next_rank,
                    &next_addr,
                    format!("cannot start the sender thread: {e}"),
                )
            })?
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

fn connect_with_retry(
    addr: SocketAddr,
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<TcpStream, String> {
    let mut backoff = Duration::from_millis(20);
    loop {
        if stop.load(Ordering::SeqCst) {
            return Err("stopped: the job lost a rank".into());
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(
            &addr,
            remaining.clamp(Duration::from_millis(10), Duration::from_secs(10)),
        ) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() + backoff >= deadline => {
                return Err(format!("cannot connect: {e}"))
            }
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
/// address is a loopback address.
fn ring_listener(store: &Store, m: &Membership) -> io::Result<TcpListener> {
    let only: Option<IpAddr> = if m.rank == 0 {
        let addr = m.master_addr.trim();
        let addr = addr
            .strip_prefix('[')
            .and_then(|a| a.strip_suffix(']'))
            .unwrap_or(addr);
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
struct Hello<'a> {
    job_id: &'a str,
    generation: u64,
    from_rank: usize,
    world: usize,
}

impl Hello<'_> {
    /// What both ends' proofs cover: a proof made for one link cannot open another.
    fn context(&self) -> Vec<u8> {
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
fn introduce(
    next: &mut TcpStream,
    hello: &Hello<'_>,
    token: &JobToken,
    deadline: Instant,
) -> Result<(), Handshake> {
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
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
struct Expected {
    job_id: String,
    generation: u64,
    prev_rank: usize,
    rank: usize,
    world: usize,
}

/// The accepting side's handshake with one connection: its hello must name `prev_rank` of this job and ring
/// generation, and it must prove it holds the job token.
fn admit(
    s: &mut TcpStream,
    expect: &Expected,
    token: &JobToken,
    within: Duration,
) -> Result<(), String> {
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
    let (generation, from_rank, world) = (
        get_u64(s).map_err(io)?,
        get_u64(s).map_err(io)?,
        get_u64(s).map_err(io)?,
    );
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
        return Err(format!(
            "it is not rank {} of this job and ring generation",
            expect.prev_rank
        ));
    }
    let hello = Hello {
        job_id: &expect.job_id,
        generation,
        from_rank: expect.prev_rank,
        world: expect.world,
    };
    match auth::respond(s, token, &hello.context(), &nonce) {
        Ok(()) => Ok(()),
        Err(Handshake::BadProof) => {
            Err("job token mismatch (it did not prove it holds this job's token)".into())
        }
        Err(Handshake::Io(e)) => Err(io(e)),
        Err(other) => Err(format!("no valid handshake: {other:?}")),
    }
}

/// Accepts connections until one from `prev_rank` of this job and ring generation has proved it holds the token.
/// Each connection is checked on its own thread, so connections that stall or lie cannot hold up the real peer.
fn accept_prev(
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
                let (expect, token, tx, counted) =
                    (expect.clone(), token.clone(), tx.clone(), in_flight.clone());
                let spawned = std::thread::Builder::new()
                    .name("hytrain-ring-admit".into())
                    .spawn(move || {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{free_port, member, on_ranks, opts};

    /// Rendezvous plus ring for `world` threads, then `f(rank, ring)` on each.
    fn with_rings<T: Send>(
        world: usize,
        o: CommOptions,
        f: impl Fn(usize, &mut Ring) -> T + Sync,
    ) -> Vec<T> {
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

    /// Small integers, so sums and averages are exact in f32, f64 and bf16.
    fn value(i: usize, rank: usize) -> f64 {
        ((i * 7 + rank * 3) % 17) as f64
    }

    fn check_allreduce_exact(world: usize, segment_bytes: usize, lens: &[usize]) {
        let results = with_rings(world, opts(60, 60), |rank, ring| {
            ring.set_segment_bytes(segment_bytes);
            let mut bad = Vec::new();
            for &len in lens {
                for op in [ReduceOp::Sum, ReduceOp::Avg] {
                    let sum = |i: usize| (0..world).map(|r| value(i, r)).sum::<f64>();
                    let n = world as f64;
                    let mut a: Vec<f32> = (0..len).map(|i| value(i, rank) as f32).collect();
                    ring.allreduce(Buffer::F32(&mut a), op).unwrap();
                    let ok = a.iter().enumerate().all(|(i, v)| {
                        *v == if op == ReduceOp::Avg {
                            sum(i) as f32 / n as f32
                        } else {
                            sum(i) as f32
                        }
                    });
                    if !ok {
                        bad.push(format!("f32 {op:?} len {len}"));
                    }
                    let mut b: Vec<f64> = (0..len).map(|i| value(i, rank)).collect();
                    ring.allreduce(Buffer::F64(&mut b), op).unwrap();
                    if !b.iter().enumerate().all(|(i, v)| {
                        *v == if op == ReduceOp::Avg {
                            sum(i) / n
                        } else {
                            sum(i)
                        }
                    }) {
                        bad.push(format!("f64 {op:?} len {len}"));
                    }
                    let mut c: Vec<bf16> =
                        (0..len).map(|i| bf16::from_f64(value(i, rank))).collect();
                    ring.allreduce(Buffer::Bf16(&mut c), op).unwrap();
                    let ok = c.iter().enumerate().all(|(i, v)| {
                        *v == bf16::from_f32(if op == ReduceOp::Avg {
                            sum(i) as f32 / n as f32
                        } else {
                            sum(i) as f32
                        })
                    });
                    if !ok {
                        bad.push(format!("bf16 {op:?} len {len}"));
                    }
                }
            }
            bad
        });
        for (rank, bad) in results.iter().enumerate() {
            assert!(
                bad.is_empty(),
                "world {world} rank {rank} wrong results: {bad:?}"
            );
        }
    }

    const LENS: &[usize] = &[0, 1, 7, 1_000_003];

    #[test]
    fn two_ranks_allreduce_to_the_exact_sum_and_average() {
        check_allreduce_exact(2, DEFAULT_SEGMENT_BYTES, LENS);
    }

    #[test]
    fn three_ranks_allreduce_to_the_exact_sum_and_average() {
        check_allreduce_exact(3, DEFAULT_SEGMENT_BYTES, LENS);
    }

    #[test]
    fn four_ranks_allreduce_to_the_exact_sum_and_average() {
        check_allreduce_exact(4, DEFAULT_SEGMENT_BYTES, LENS);
    }

    #[test]
    fn tiny_segments_pipeline_many_segments_per_chunk_correctly() {
        check_allreduce_exact(3, 40, &[0, 1, 7, 1000, 10_007]);
    }

    #[test]
    fn broadcast_delivers_the_roots_bytes_from_every_root() {
        let world = 4;
        let results = with_rings(world, opts(60, 60), |rank, ring| {
            ring.set_segment_bytes(1000);
            let mut ok = true;
            for root in 0..world {
                for len in [0usize, 1, 7, 100_003] {
                    let mut b: Vec<u8> = (0..len)
                        .map(|i| {
                            if rank == root {
                                (i * 31 + root) as u8
                            } else {
                                0xEE
                            }
                        })
                        .collect();
                    ring.broadcast(&mut b, root).unwrap();
                    ok &= b
                        .iter()
                        .enumerate()
                        .all(|(i, v)| *v == (i * 31 + root) as u8);
                }
            }
            ok
        });
        assert!(results.iter().all(|ok| *ok), "{results:?}");
    }

    #[test]
    fn allgather_concatenates_every_ranks_input_in_rank_order() {
        let world = 3;
        let results = with_rings(world, opts(60, 60), |rank, ring| {
            ring.set_segment_bytes(4096);
            let mut ok = true;
            for len in [0usize, 1, 7, 100_003] {
                let input: Vec<u8> = (0..len).map(|i| (i + rank * 100) as u8).collect();
                let mut out = vec![0u8; len * world];
                ring.allgather(&input, &mut out).unwrap();
                for (r, block) in
                    out.chunks(len.max(1))
                        .enumerate()
                        .take(if len == 0 { 0 } else { world })
                {
                    ok &= block
                        .iter()
                        .enumerate()
                        .all(|(i, v)| *v == (i + r * 100) as u8);
                }
            }
            ok
        });
        assert!(results.iter().all(|ok| *ok), "{results:?}");
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
            let gather = ring
                .allgather(&[1, 2, 3], &mut [0u8; 5])
                .unwrap_err()
                .to_string();
            let mut v = [1.0f32; 3];
            ring.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).unwrap();
            (root, gather, v)
        });
        for (root, gather, v) in results {
            assert!(
                root.contains("root 2 is not a rank (world_size 2)"),
                "{root}"
            );
            assert!(
                gather.contains("output has 5 bytes but must hold 2 ranks x 3 input bytes"),
                "{gather}"
            );
            assert_eq!(v, [2.0; 3]);
        }
    }

    #[test]
    fn ranks_calling_different_collectives_fail_naming_both_calls() {
        let results = with_rings(2, opts(60, 60), |rank, ring| {
            let mut v = vec![1.0f32; 10 + rank];
            let first = ring
                .allreduce(Buffer::F32(&mut v), ReduceOp::Sum)
                .unwrap_err();
            let again = ring.barrier().unwrap_err();
            (first.to_string(), again.to_string())
        });
        for (rank, (first, again)) in results.iter().enumerate() {
            assert!(
                first.contains("allreduce of 10 f32 values")
                    && first.contains("allreduce of 11 f32 values"),
                "rank {rank}: {first}"
            );
            assert!(
                again.contains("unusable after an earlier failure"),
                "rank {rank}: {again}"
            );
        }
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
            Some(
                ring.allreduce(Buffer::F32(&mut v), ReduceOp::Sum)
                    .unwrap_err(),
            )
        });
        assert!(
            started.elapsed() < Duration::from_secs(25),
            "took {:?}",
            started.elapsed()
        );
        for r in [0, 2] {
            let e = results[r].as_ref().unwrap();
            assert!(
                matches!(e, CommError::PeerLost { rank: 1, .. }),
                "rank {r}: {e}"
            );
            assert_eq!(
                e.to_string(),
                "lost rank 1 (connection closed during allreduce)"
            );
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
            ring.allreduce(Buffer::F32(&mut v), ReduceOp::Sum)
                .unwrap_err()
        });
        assert!(
            started.elapsed() < Duration::from_secs(25),
            "took {:?}",
            started.elapsed()
        );
        for r in [0, 1, 3] {
            let e = &results[r];
            // Every rank names rank 2, the one that died, whichever link it saw break first: the liveness watch's
            // verdict, not a neighbour that only failed because of rank 2.
            assert!(
                matches!(e, CommError::RankLost(lost) if lost.rank == 2),
                "rank {r}: {e}"
            );
            assert!(
                e.to_string().starts_with(
                    "lost rank 2 on 127.0.0.1: its connection to the rendezvous store closed"
                ),
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
            let lost = ring
                .liveness()
                .unwrap()
                .wait_lost(Some(Duration::from_secs(20)));
            // The ring was aborted by the verdict: the next collective fails at once, naming rank 1.
            let e = ring
                .allreduce(Buffer::F32(&mut v), ReduceOp::Sum)
                .unwrap_err();
            Some((lost, e))
        });
        assert!(
            started.elapsed() < Duration::from_secs(25),
            "took {:?}",
            started.elapsed()
        );
        for r in [0, 2] {
            let (lost, e) = results[r].as_ref().unwrap();
            assert_eq!(lost.as_ref().map(|l| l.rank), Some(1), "rank {r}");
            assert!(
                matches!(e, CommError::RankLost(l) if l.rank == 1),
                "rank {r}: {e}"
            );
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
            ring.liveness()
                .unwrap()
                .wait_lost(Some(Duration::from_secs(20)))
                .expect("the watch reports rank 1 lost");
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
                assert!(
                    matches!(e, CommError::RankLost(l) if l.rank == 1),
                    "rank {r}: {e}"
                );
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
            let e = results[r]
                .as_ref()
                .unwrap_or_else(|| panic!("rank {r} never failed"));
            assert!(
                matches!(e, CommError::RankLost(l) if l.rank == 2),
                "rank {r}: {e}"
            );
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
            let e = ring
                .allreduce(Buffer::F64(&mut v), ReduceOp::Sum)
                .unwrap_err();
            let _ = tx.lock().unwrap().send(());
            Some(e)
        });
        assert!(
            started.elapsed() < Duration::from_secs(25),
            "took {:?}",
            started.elapsed()
        );
        let e = results[2].as_ref().unwrap();
        assert!(
            matches!(
                e,
                CommError::Timeout {
                    rank: 1,
                    secs: 2,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("rank 1 was silent for 2 s during allreduce"),
            "{e}"
        );
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
        assert!(
            e.contains("rank 0 waited 3 s") && e.contains("ring/0/addr/1"),
            "{e}"
        );
    }

    fn expected() -> Expected {
        Expected {
            job_id: "test".into(),
            generation: 0,
            prev_rank: 1,
            rank: 2,
            world: 3,
        }
    }

    fn hello(job_id: &str) -> Hello<'_> {
        Hello {
            job_id,
            generation: 0,
            from_rank: 1,
            world: 3,
        }
    }

    #[test]
    fn strays_silent_clients_and_wrong_tokens_are_refused_and_the_real_peer_accepted() {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let token = JobToken::new("ring-secret").unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let peer_token = token.clone();
        let peers = std::thread::spawn(move || {
            // Connects and says nothing: must not hold up the others.
            let silent = TcpStream::connect(addr).unwrap();
            let mut other_job = TcpStream::connect(addr).unwrap();
            let refused =
                introduce(&mut other_job, &hello("other-job"), &peer_token, deadline).unwrap_err();
            let mut forger = TcpStream::connect(addr).unwrap();
            let wrong = JobToken::new("not-the-ring-secret").unwrap();
            let forged = introduce(&mut forger, &hello("test"), &wrong, deadline).unwrap_err();
            let mut real = TcpStream::connect(addr).unwrap();
            introduce(&mut real, &hello("test"), &peer_token, deadline).unwrap();
            real.write_all(b"data").unwrap();
            (silent, refused, forged, real)
        });
        let accepted = accept_prev(
            listener,
            expected(),
            &token,
            deadline,
            &AtomicBool::new(false),
        );
        let (mut silent, refused, forged, _real) = peers.join().unwrap();
        let mut got = [0u8; 4];
        accepted.unwrap().read_exact(&mut got).unwrap();
        assert_eq!(&got, b"data");
        assert!(
            matches!(&refused, Handshake::Refused(why) if why.contains("waiting for rank 1")),
            "{refused:?}"
        );
        assert!(matches!(forged, Handshake::ProofRefused), "{forged:?}");
        // The real peer got in while the silent one was still being waited on.
        silent
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let still_open = matches!(
            silent.read(&mut [0u8; 1]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
        );
        assert!(
            still_open,
            "the silent client was dropped before the real peer was accepted"
        );
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
        let token = JobToken::new("ring-secret").unwrap();
        let e = introduce(
            &mut s,
            &hello("test"),
            &token,
            Instant::now() + Duration::from_secs(20),
        )
        .unwrap_err();
        assert!(matches!(e, Handshake::BadProof), "{e:?}");
    }

    #[test]
    fn ranks_with_a_configured_token_link_the_ring_and_reduce() {
        let mut o = opts(60, 60);
        o.job_token = Some(JobToken::new("configured-ring-secret").unwrap());
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
            CommError::PeerLost {
                rank: 5,
                during: "broadcast",
                cause: "connection closed".into(),
            },
            CommError::Timeout {
                rank: 1,
                during: "barrier",
                secs: 300,
            },
        ] {
            assert_eq!(
                decode_failure(encode_failure(0, &e).as_bytes())
                    .unwrap()
                    .to_string(),
                e.to_string()
            );
        }
        let other =
            decode_failure(encode_failure(3, &CommError::Mismatch("x\ny".into())).as_bytes())
                .unwrap();
        assert_eq!(
            other.to_string(),
            "rank 3 failed first: collective mismatch: x\ny"
        );
    }

    #[test]
    fn headers_decode_what_they_encode_and_refuse_data() {
        let h = Header {
            op: OP_BROADCAST,
            dtype: DT_U8,
            seq: 7,
            len: 12,
            aux: 3,
        };
        assert_eq!(Header::decode(&h.encode()), Some(h));
        assert_eq!(Header::decode(&[0u8; 32]), None);
        assert_eq!(h.describe(), "broadcast of 12 bytes from rank 3");
    }
}
