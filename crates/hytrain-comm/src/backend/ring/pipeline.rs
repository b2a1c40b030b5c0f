//! The data path of one collective: the header every rank sends first (so that mismatched calls fail naming both),
//! the sender thread that writes a plan's send segments while the calling thread receives and reduces, and how a
//! failure is named (the liveness verdict, else the first failure recorded in the store).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use bytemuck::Pod;

use super::links::Links;
use super::schedule::{segment, segment_count, Action, Step};
use super::*;
use crate::backend::failure::{decode_failure, encode_failure};
use crate::rendezvous::liveness::{LostRank, VERDICT_WAIT};

pub(super) const HEADER_MAGIC: u32 = u32::from_le_bytes(*b"HYTC");

/// How long a failing rank tries to tell the store about its failure; the store's host may be the rank that died.
pub(super) const FAILURE_REPORT_WITHIN: Duration = Duration::from_secs(10);

/// What every rank says about the collective it is about to run; the receiving rank compares it with its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) op: u8,
    pub(super) dtype: u8,
    pub(super) seq: u64,
    pub(super) len: u64,
    pub(super) aux: u64,
}

impl Header {
    pub(super) fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        b[4] = self.op;
        b[5] = self.dtype;
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..32].copy_from_slice(&self.aux.to_le_bytes());
        b
    }

    pub(super) fn decode(b: &[u8; 32]) -> Option<Header> {
        let word = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().unwrap_or_default());
        (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == HEADER_MAGIC).then(|| Header {
            op: b[4],
            dtype: b[5],
            seq: word(8..16),
            len: word(16..24),
            aux: word(24..32),
        })
    }

    pub(super) fn describe(&self) -> String {
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
            OP_REDUCE_SCATTER => format!("reduce_scatter of {} {dtype} values", self.len),
            OP_ALLGATHER_BLOCKS => format!("allgather_blocks of {} {dtype} values", self.len),
            other => format!("unknown collective {other}"),
        }
    }
}

pub(super) struct Progress {
    /// Receive segments completed in the current collective.
    pub(super) done: usize,
    /// The receiving side failed; the sender must stop.
    pub(super) abort: bool,
    /// The sender failed first; a receive error after this is a consequence, not the cause.
    pub(super) sender_failed: bool,
}

/// Names the root cause of a ring failure. The liveness watch knows which rank the job lost, whichever link this
/// rank saw break first; without a verdict (the failing rank is alive, e.g. it called a different collective), the
/// first failure recorded in the store is the cause, so ranks whose own error is only a consequence (a connection
/// the failing rank closed) report the same root cause.
pub(super) struct Reporter {
    pub(super) store: Store,
    pub(super) liveness: Option<Liveness>,
    pub(super) key: String,
    pub(super) rank: usize,
}

impl Reporter {
    /// The liveness watch's verdict if the job has lost a rank, waiting up to `wait` for one.
    pub(super) fn lost_within(&self, wait: Duration) -> Option<LostRank> {
        let live = self.liveness.as_ref()?;
        match wait.is_zero() {
            true => live.lost(),
            false => live.wait_lost(Some(wait)),
        }
    }

    pub(super) fn report(&self, local: CommError) -> CommError {
        // A broken link may be the first sign of a loss the store is announcing right now; other failures (a
        // mismatch) are this rank's own finding and need no wait.
        let wait = match local {
            CommError::PeerLost { .. } | CommError::Timeout { .. } => VERDICT_WAIT,
            _ => Duration::ZERO,
        };
        if let Some(lost) = self.lost_within(wait) {
            let e = CommError::RankLost(lost);
            tracing::warn!(rank = self.rank, "{e} (this rank saw: {local})");
            return e;
        }
        let mine = encode_failure(self.rank, &local);
        let reported = match self.store.set_if_absent_within(&self.key, mine.as_bytes(), FAILURE_REPORT_WITHIN) {
            Ok(first) if first != mine.as_bytes() => {
                match decode_failure(&first) {
                    // This rank is alive, so a record naming it describes the effect of its own failure, not a cause.
                    Some(CommError::PeerLost { rank, .. } | CommError::Timeout { rank, .. }) if rank == self.rank => {
                        local
                    }
                    Some(root) => {
                        tracing::warn!(rank = self.rank, "saw {local}; the first failure in the ring was: {root}");
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

pub(super) struct Handoff {
    pub(super) progress: Mutex<Progress>,
    pub(super) cv: Condvar,
}

impl Handoff {
    pub(super) fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The caller's buffer as the sender thread sees it.
pub(super) struct SendPtr(*const u8);
// SAFETY: the pointer is only dereferenced while the collective that created it waits for the sender to finish,
// on ranges the receiving thread does not write at that time (see the module comment).
unsafe impl Send for SendPtr {}

pub(super) struct SendJob {
    pub(super) base: SendPtr,
    pub(super) esize: usize,
    pub(super) seg: usize,
    pub(super) header: [u8; 32],
    pub(super) steps: Vec<Step>,
    pub(super) during: &'static str,
}

pub(super) struct SendDone {
    pub(super) steps: Vec<Step>,
    /// `Err(None)`: stopped because the receiving side failed, which reports the error.
    pub(super) result: Result<(), Option<CommError>>,
}

impl Ring {
    pub(super) fn exchange<T: Pod>(
        &mut self,
        during: &'static str,
        header: Header,
        buf: &mut [T],
        reduce: fn(&mut [T], &[T]),
    ) -> Result<(), CommError> {
        let gone = || CommError::Broken("the ring's sender thread is gone".into());
        let esize = std::mem::size_of::<T>();
        let seg = (self.segment_bytes / esize).max(1);
        let Ring { links, steps, send_steps, scratch, .. } = self;
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
        let mut flight = InFlight { links, finished: false };

        let received = receive(flight.links, &header, base, buf.len(), steps, seg, scratch, reduce);
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
}

/// A collective's result from what its two halves saw: the receiving side's reported error (`Some(None)`: it failed
/// only because the sender had) and the sender's result (`Err(None)`: it stopped because it was told to).
pub(super) fn outcome(
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
pub(super) struct InFlight<'a> {
    pub(super) links: &'a mut Links,
    pub(super) finished: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.links.abort();
            let _ = self.links.done.recv();
        }
    }
}

pub(super) enum Failure {
    Recv(io::Error),
    Mismatch(String),
    #[cfg(test)]
    Severed,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn receive<T: Pod>(
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
                    let dst = unsafe { std::slice::from_raw_parts_mut(base.add(r.start) as *mut u8, r.len() * esize) };
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
pub(super) struct SenderThread {
    pub(super) next: TcpStream,
    /// A handle on the receiving connection, to unblock the receiving thread when sending fails.
    pub(super) prev: TcpStream,
    pub(super) jobs: mpsc::Receiver<SendJob>,
    pub(super) done: mpsc::Sender<SendDone>,
    pub(super) sync: Arc<Handoff>,
    pub(super) reporter: Arc<Reporter>,
    pub(super) next_rank: usize,
    pub(super) timeout_secs: u64,
}

pub(super) fn sender_main(t: SenderThread) {
    let SenderThread { mut next, prev, jobs, done, sync, reporter, next_rank, timeout_secs } = t;
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
        if done.send(SendDone { steps: job.steps, result }).is_err() {
            break;
        }
    }
}

pub(super) fn send_job(next: &mut TcpStream, job: &SendJob, sync: &Handoff) -> io::Result<()> {
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
                    return Err(io::Error::new(io::ErrorKind::Interrupted, "collective aborted"));
                }
            }
            let r = segment(&step.send, job.seg, j);
            // SAFETY: `r` lies within the caller's buffer, which outlives this job, and no thread writes it now.
            let bytes = unsafe { std::slice::from_raw_parts(job.base.0.add(r.start * job.esize), r.len() * job.esize) };
            next.write_all(bytes)?;
        }
        if t > 0 {
            prev_step_base += segment_count(&job.steps[t - 1].recv, job.seg);
        }
    }
    Ok(())
}

pub(super) fn io_error(peer: usize, during: &'static str, timeout_secs: u64, e: &io::Error) -> CommError {
    use io::ErrorKind::*;
    match e.kind() {
        WouldBlock | TimedOut => CommError::Timeout { rank: peer, during, secs: timeout_secs },
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected => {
            CommError::PeerLost { rank: peer, during, cause: "connection closed".into() }
        }
        _ => CommError::PeerLost { rank: peer, during, cause: e.to_string() },
    }
}
