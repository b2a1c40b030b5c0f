//! Test support for this crate and the crates above it (feature `testing`; never in a release build):
//!
//! - [`InProcess`]: a job of N ranks inside one process (threads sharing memory), exact and fast, for tests of
//!   training engines that need real collective semantics but no sockets.
//! - [`FailingCollective`]: wraps a real collective and fails one chosen call the way a lost or silent rank fails
//!   it, for tests of what a training step, a checkpoint or an evaluation does when a collective fails mid-way.
//! - [`free_port`] and [`on_ranks`]: the helpers every multi-rank test needs.

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use half::bf16;

use crate::{block_range, check_blocks, Buffer, Collective, CommError, Liveness, LostRank, ReduceOp};

/// A loopback port nothing listens on right now (another process may take it before the caller binds it, which
/// tests accept).
pub fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0)).and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(29500)
}

/// Runs `f(rank)` on `world` threads and returns their results in rank order; a panicking rank panics the caller.
pub fn on_ranks<T: Send>(world: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|r| {
                s.spawn({
                    let f = &f;
                    move || f(r)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
    })
}

/// Which collective a [`FailingCollective`] counts when it is told to fail the n-th call of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// [`Collective::allreduce`].
    Allreduce,
    /// [`Collective::broadcast`].
    Broadcast,
    /// [`Collective::allgather`].
    Allgather,
    /// [`Collective::barrier`].
    Barrier,
    /// [`Collective::reduce_scatter`].
    ReduceScatter,
    /// [`Collective::allgather_blocks`].
    AllgatherBlocks,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Allreduce => "allreduce",
            Op::Broadcast => "broadcast",
            Op::Allgather => "allgather",
            Op::Barrier => "barrier",
            Op::ReduceScatter => "reduce_scatter",
            Op::AllgatherBlocks => "allgather_blocks",
        }
    }
}

/// How a [`FailingCollective`] fails its chosen call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// As when the job lost `rank` (what every surviving rank's collective returns).
    RankLost {
        /// The rank reported lost.
        rank: usize,
    },
    /// As when `rank` was silent for the collective timeout.
    Timeout {
        /// The rank reported silent.
        rank: usize,
    },
}

/// A real collective whose chosen call fails with a [`Fault`] instead of running, as do all calls after it (a
/// lost rank does not come back). Give every rank of a job the same choice and the failure reaches them all at
/// the same point, as a loss does.
pub struct FailingCollective {
    inner: Box<dyn Collective>,
    fail_at: usize,
    /// `None`: `fail_at` counts every call; `Some(op)`: only calls of `op`.
    only: Option<Op>,
    counted: usize,
    failed: bool,
    calls: Arc<AtomicUsize>,
    fault: Fault,
}

impl FailingCollective {
    /// Wraps `inner`; call number `fail_at` (counting every collective call from 0) fails; `fail_at ==
    /// usize::MAX` never fails (to count the calls a run makes).
    pub fn new(inner: Box<dyn Collective>, fail_at: usize, fault: Fault) -> Self {
        FailingCollective { inner, fail_at, only: None, counted: 0, failed: false, calls: Arc::default(), fault }
    }

    /// Wraps `inner`; the `nth` call of `op` (counting from 0, other collectives not counted) fails, e.g. the
    /// third allreduce of a run whatever broadcasts and barriers came before it.
    pub fn nth(inner: Box<dyn Collective>, op: Op, nth: usize, fault: Fault) -> Self {
        FailingCollective { only: Some(op), ..FailingCollective::new(inner, nth, fault) }
    }

    /// The count of collective calls made so far (every kind, failed ones included), readable after the
    /// collective has been handed to the code under test.
    pub fn calls(&self) -> Arc<AtomicUsize> {
        self.calls.clone()
    }

    fn next(&mut self, op: Op) -> Result<(), CommError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if !self.failed && self.only.is_none_or(|only| only == op) {
            self.failed = self.counted >= self.fail_at;
            self.counted += 1;
        }
        if !self.failed {
            return Ok(());
        }
        let name = op.name();
        Err(match self.fault {
            Fault::RankLost { rank } => CommError::RankLost(LostRank {
                rank,
                host: "127.0.0.1".into(),
                cause: format!("injected by FailingCollective at call {call} ({name})"),
                store: false,
            }),
            Fault::Timeout { rank } => CommError::Timeout { rank, during: name, secs: 0 },
        })
    }
}

impl Collective for FailingCollective {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn allreduce(&mut self, buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError> {
        self.next(Op::Allreduce)?;
        self.inner.allreduce(buf, op)
    }

    fn broadcast(&mut self, bytes: &mut [u8], root: usize) -> Result<(), CommError> {
        self.next(Op::Broadcast)?;
        self.inner.broadcast(bytes, root)
    }

    fn allgather(&mut self, input: &[u8], output: &mut [u8]) -> Result<(), CommError> {
        self.next(Op::Allgather)?;
        self.inner.allgather(input, output)
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.next(Op::Barrier)?;
        self.inner.barrier()
    }

    fn reduce_scatter(&mut self, buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError> {
        self.next(Op::ReduceScatter)?;
        self.inner.reduce_scatter(buf, op)
    }

    fn allgather_blocks(&mut self, buf: Buffer<'_>) -> Result<(), CommError> {
        self.next(Op::AllgatherBlocks)?;
        self.inner.allgather_blocks(buf)
    }

    fn liveness(&self) -> Option<Liveness> {
        self.inner.liveness()
    }
}

/// One rank's contribution to an [`InProcess`] collective: what it called, and its bytes.
struct Post {
    call: String,
    bytes: Vec<u8>,
}

#[derive(Default)]
struct Round {
    /// Collectives completed by every rank.
    seq: u64,
    posts: Vec<Option<Post>>,
    /// The complete round, once every rank has posted; each rank takes it once.
    ready: Option<Arc<Vec<Post>>>,
    taken: usize,
    /// Ranks whose [`InProcess`] was dropped; a collective waiting for one of them fails naming it.
    gone: Vec<usize>,
}

struct Group {
    world: usize,
    timeout: Duration,
    round: Mutex<Round>,
    cv: Condvar,
}

impl Group {
    fn lock(&self) -> MutexGuard<'_, Round> {
        self.round.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One rank of a job whose ranks are threads of one process (build them with [`InProcess::group`]): every
/// collective hands each rank's data to the others through shared memory and each rank computes its result in rank
/// order (`x0 + x1 + ...`, in the element type, bf16 in f32 rounded once; averages divide the sum as the ring
/// does), so results are exact, deterministic and equal to a sequential reference.
///
/// Checks what the real backends check: ranks calling different collectives, or the same one with different
/// sizes, fail with [`CommError::Mismatch`] naming both calls; a rank that dropped its collective is reported
/// lost ([`CommError::PeerLost`]) to the ranks waiting for it; a rank silent for the timeout is reported as
/// [`CommError::Timeout`]. After a failure every later call fails.
pub struct InProcess {
    rank: usize,
    group: Arc<Group>,
    broken: Option<String>,
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcess").field("rank", &self.rank).field("world_size", &self.group.world).finish()
    }
}

impl InProcess {
    /// The `world` ranks of one job, in rank order; hand one to each thread. A collective waits at most
    /// `timeout` for the other ranks.
    pub fn group(world: usize, timeout: Duration) -> Vec<InProcess> {
        let group = Arc::new(Group {
            world,
            timeout,
            round: Mutex::new(Round { posts: (0..world).map(|_| None).collect(), ..Round::default() }),
            cv: Condvar::new(),
        });
        (0..world).map(|rank| InProcess { rank, group: group.clone(), broken: None }).collect()
    }

    /// Posts this rank's call and bytes, waits for every rank's, and returns them all in rank order.
    fn exchange(&mut self, during: &'static str, call: String, bytes: &[u8]) -> Result<Arc<Vec<Post>>, CommError> {
        if let Some(why) = &self.broken {
            return Err(CommError::Broken(why.clone()));
        }
        let outcome = self.exchange_once(during, call, bytes);
        if let Err(e) = &outcome {
            self.broken = Some(e.to_string());
        }
        outcome
    }

    fn exchange_once(&self, during: &'static str, call: String, bytes: &[u8]) -> Result<Arc<Vec<Post>>, CommError> {
        let g = &*self.group;
        let deadline = Instant::now() + g.timeout;
        let mut round = g.lock();
        // The previous round may still be handing out its result to slower ranks.
        while round.ready.is_some() {
            round = self.wait(round, deadline, during)?;
        }
        let seq = round.seq;
        round.posts[self.rank] = Some(Post { call: call.clone(), bytes: bytes.to_vec() });
        if round.posts.iter().all(Option::is_some) {
            let posts: Vec<Post> = round.posts.iter_mut().map(|p| p.take().expect("every rank posted")).collect();
            round.ready = Some(Arc::new(posts));
            g.cv.notify_all();
        }
        while round.seq == seq && round.ready.is_none() {
            round = self.wait(round, deadline, during)?;
        }
        let all = round.ready.clone().expect("the round is complete");
        round.taken += 1;
        if round.taken == g.world {
            round.ready = None;
            round.taken = 0;
            round.seq += 1;
            g.cv.notify_all();
        }
        drop(round);
        if let Some((r, theirs)) = all.iter().enumerate().find(|(_, p)| p.call != call) {
            return Err(CommError::Mismatch(format!(
                "rank {r} called {} as collective #{seq} but rank {} called {call}; every rank must issue the \
                 same collectives in the same order with the same sizes",
                theirs.call, self.rank
            )));
        }
        Ok(all)
    }

    /// Waits for the round to move on, failing when a missing rank is gone or the deadline passed.
    fn wait<'g>(
        &self,
        round: MutexGuard<'g, Round>,
        deadline: Instant,
        during: &'static str,
    ) -> Result<MutexGuard<'g, Round>, CommError> {
        // A rank cannot be dropped between posting and taking a round's result, so a gone rank that has not posted
        // is one this round waits for.
        let waiting = round.ready.is_none();
        if let Some(&gone) = round.gone.iter().find(|q| waiting && round.posts[**q].is_none()) {
            return Err(CommError::PeerLost {
                rank: gone,
                during,
                cause: "its InProcess collective was dropped".into(),
            });
        }
        let now = Instant::now();
        if now >= deadline {
            let missing = (0..self.group.world).find(|q| waiting && round.posts[*q].is_none());
            let rank = missing.unwrap_or(self.rank);
            return Err(CommError::Timeout { rank, during, secs: self.group.timeout.as_secs() });
        }
        let (round, _) = self.group.cv.wait_timeout(round, deadline - now).unwrap_or_else(|p| p.into_inner());
        Ok(round)
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.group.lock().gone.push(self.rank);
        self.group.cv.notify_all();
    }
}

/// Every rank's buffer of `T` from the posts, in rank order.
fn typed<T: bytemuck::Pod>(posts: &[Post]) -> Vec<Vec<T>> {
    posts
        .iter()
        .map(|p| {
            let mut v = vec![T::zeroed(); p.bytes.len() / std::mem::size_of::<T>()];
            bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(&p.bytes);
            v
        })
        .collect()
}

/// Sums `range` of every rank's values in rank order into `out`, then divides by `div` where given, in `f32`
/// for f32 and bf16 (rounded once) and `f64` for f64.
fn reduce_into(buf: Buffer<'_>, posts: &[Post], range: std::ops::Range<usize>, div: Option<usize>) {
    match buf {
        Buffer::F32(out) => {
            let all = typed::<f32>(posts);
            for i in range {
                let s = all[1..].iter().fold(all[0][i], |acc, b| acc + b[i]);
                out[i] = div.map_or(s, |n| s / n as f32);
            }
        }
        Buffer::F64(out) => {
            let all = typed::<f64>(posts);
            for i in range {
                let s = all[1..].iter().fold(all[0][i], |acc, b| acc + b[i]);
                out[i] = div.map_or(s, |n| s / n as f64);
            }
        }
        Buffer::Bf16(out) => {
            let all = typed::<bf16>(posts);
            for i in range {
                let s = all[1..].iter().fold(all[0][i].to_f32(), |acc, b| acc + b[i].to_f32());
                out[i] = bf16::from_f32(div.map_or(s, |n| s / n as f32));
            }
        }
    }
}

impl Collective for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.group.world
    }

    fn backend(&self) -> &'static str {
        "in-process"
    }

    fn allreduce(&mut self, mut buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError> {
        let call = format!("allreduce of {} {} values", buf.len(), buf.dtype());
        let all = self.exchange("allreduce", call, buf.as_bytes_mut())?;
        let div = (op == ReduceOp::Avg && self.group.world > 1).then_some(self.group.world);
        let len = buf.len();
        reduce_into(buf, &all, 0..len, div);
        Ok(())
    }

    fn broadcast(&mut self, bytes: &mut [u8], root: usize) -> Result<(), CommError> {
        if root >= self.group.world {
            return Err(CommError::InvalidArgument {
                op: "broadcast",
                detail: format!("root {root} is not a rank (world_size {})", self.group.world),
            });
        }
        let call = format!("broadcast of {} bytes from rank {root}", bytes.len());
        let all = self.exchange("broadcast", call, bytes)?;
        bytes.copy_from_slice(&all[root].bytes);
        Ok(())
    }

    fn allgather(&mut self, input: &[u8], output: &mut [u8]) -> Result<(), CommError> {
        let world = self.group.world;
        if input.len().checked_mul(world) != Some(output.len()) {
            return Err(CommError::InvalidArgument {
                op: "allgather",
                detail: format!(
                    "output has {} bytes but must hold {world} ranks x {} input bytes",
                    output.len(),
                    input.len()
                ),
            });
        }
        let all = self.exchange("allgather", format!("allgather of {} bytes per rank", input.len()), input)?;
        for (out, post) in output.chunks_exact_mut(input.len().max(1)).zip(all.iter()) {
            out.copy_from_slice(&post.bytes);
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.exchange("barrier", "barrier".into(), &[]).map(drop)
    }

    fn reduce_scatter(&mut self, mut buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError> {
        let world = self.group.world;
        check_blocks("reduce_scatter", &buf, world)?;
        let call = format!("reduce_scatter of {} {} values", buf.len(), buf.dtype());
        let all = self.exchange("reduce_scatter", call, buf.as_bytes_mut())?;
        let div = (op == ReduceOp::Avg && world > 1).then_some(world);
        let mine = block_range(buf.len(), world, self.rank);
        reduce_into(buf, &all, mine, div);
        Ok(())
    }

    fn allgather_blocks(&mut self, mut buf: Buffer<'_>) -> Result<(), CommError> {
        let world = self.group.world;
        check_blocks("allgather_blocks", &buf, world)?;
        let call = format!("allgather_blocks of {} {} values", buf.len(), buf.dtype());
        let bytes = buf.as_bytes_mut();
        let all = self.exchange("allgather_blocks", call, bytes)?;
        let block = bytes.len() / world;
        for (r, post) in all.iter().enumerate() {
            let range = r * block..(r + 1) * block;
            bytes[range.clone()].copy_from_slice(&post.bytes[range]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group_run<T: Send>(world: usize, timeout_s: u64, f: impl Fn(usize, &mut InProcess) -> T + Sync) -> Vec<T> {
        let ranks = InProcess::group(world, Duration::from_secs(timeout_s));
        std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .into_iter()
                .enumerate()
                .map(|(r, mut c)| {
                    let f = &f;
                    s.spawn(move || f(r, &mut c))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn in_process_ranks_calling_different_collectives_fail_naming_both_and_stay_failed() {
        let results = group_run(2, 30, |rank, c| {
            let mut v = vec![1.0f32; 4];
            let first = match rank {
                0 => c.reduce_scatter(Buffer::F32(&mut v), ReduceOp::Sum).unwrap_err(),
                _ => c.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).unwrap_err(),
            };
            (first.to_string(), c.barrier().unwrap_err().to_string())
        });
        for (rank, (first, again)) in results.iter().enumerate() {
            assert!(
                first.contains("reduce_scatter of 4 f32 values") && first.contains("allreduce of 4 f32 values"),
                "rank {rank}: {first}"
            );
            assert!(again.contains("unusable after an earlier failure"), "rank {rank}: {again}");
        }
    }

    #[test]
    fn an_in_process_rank_that_is_dropped_is_reported_lost_to_the_ranks_waiting_for_it() {
        let results = group_run(3, 30, |rank, c| {
            c.barrier().unwrap();
            if rank == 1 {
                return None;
            }
            let mut v = vec![1.0f64; 3];
            Some(c.allreduce(Buffer::F64(&mut v), ReduceOp::Sum).unwrap_err())
        });
        for r in [0, 2] {
            let e = results[r].as_ref().unwrap();
            assert!(matches!(e, CommError::PeerLost { rank: 1, during: "allreduce", .. }), "rank {r}: {e}");
        }
    }

    #[test]
    fn a_silent_in_process_rank_makes_the_others_time_out_naming_it() {
        let done = std::sync::Barrier::new(2);
        let results = group_run(2, 1, |rank, c| {
            if rank == 1 {
                // Alive but silent until rank 0 has given up.
                done.wait();
                return None;
            }
            let mut v = vec![bf16::ONE; 2];
            let e = c.allgather_blocks(Buffer::Bf16(&mut v)).unwrap_err();
            done.wait();
            Some(e)
        });
        let e = results[0].as_ref().unwrap();
        assert!(matches!(e, CommError::Timeout { rank: 1, during: "allgather_blocks", secs: 1 }), "{e}");
    }

    #[test]
    fn failing_collective_fails_the_chosen_allreduce_whatever_other_calls_came_before() {
        let inner = InProcess::group(1, Duration::from_secs(5)).pop().unwrap();
        let mut c = FailingCollective::nth(Box::new(inner), Op::Allreduce, 2, Fault::RankLost { rank: 1 });
        let calls = c.calls();
        let mut v = [1.0f32; 1];
        for _ in 0..2 {
            c.barrier().unwrap();
            c.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).unwrap();
            c.reduce_scatter(Buffer::F32(&mut v), ReduceOp::Sum).unwrap();
            c.allgather_blocks(Buffer::F32(&mut v)).unwrap();
        }
        c.broadcast(&mut [0u8; 2], 0).unwrap();
        let e = c.allreduce(Buffer::F32(&mut v), ReduceOp::Sum).unwrap_err();
        assert!(e.to_string().contains("injected by FailingCollective at call 9 (allreduce)"), "{e}");
        // A lost rank does not come back: every later call fails, whatever its kind.
        let later = c.reduce_scatter(Buffer::F32(&mut v), ReduceOp::Sum).unwrap_err();
        assert!(matches!(later, CommError::RankLost(ref l) if l.rank == 1), "{later}");
        let later = c.allgather_blocks(Buffer::F32(&mut v)).unwrap_err();
        assert!(later.to_string().contains("(allgather_blocks)"), "{later}");
        assert_eq!(calls.load(Ordering::SeqCst), 12);
    }

    #[test]
    fn failing_collective_counts_reduce_scatter_and_allgather_blocks_as_calls() {
        let inner = InProcess::group(1, Duration::from_secs(5)).pop().unwrap();
        let mut c = FailingCollective::new(Box::new(inner), 1, Fault::Timeout { rank: 0 });
        let mut v = [1.0f64; 1];
        c.reduce_scatter(Buffer::F64(&mut v), ReduceOp::Avg).unwrap();
        let e = c.allgather_blocks(Buffer::F64(&mut v)).unwrap_err();
        assert!(matches!(e, CommError::Timeout { rank: 0, during: "allgather_blocks", .. }), "{e}");
    }
}
