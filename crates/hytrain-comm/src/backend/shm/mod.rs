//! The shared-memory transport: allreduce between the processes of one node through a segment in /dev/shm, and
//! between nodes hierarchically (reduce inside each node, a TCP ring among the nodes' local rank 0s, copy back).
//!
//! Inside a node every allreduce is cut into rounds of one slot per rank. In each round every rank copies the parts
//! of its buffer that the other ranks reduce into its own slot, then each rank sums its 1/local_world_size slice
//! across all slots (its own part straight from its buffer) and writes the result to its buffer and its slot, and
//! finally copies the other slices' results out of their owners' slots: a reduce-scatter followed by an allgather,
//! each rank moving about four times its buffer through memory. Two banks of slots alternate, so a round needs only
//! two barriers. Barriers are epoch words in the segment, waited on by spinning briefly, then sleeping on a futex
//! that the arriving rank wakes.
//!
//! A waiting rank checks, a few hundred times a second, whether a rank recorded a failure in the segment, whether
//! the rank it waits for still exists (`kill(pid, 0)`, and not a zombie), and whether the collective timeout has
//! passed without that rank making progress; each ends the wait with an error naming the rank.
//!
//! Reduce-scatter and the allgather of equal blocks (the sharded optimizer's collectives) use the same slots:
//! inside a node each rank reduces, or publishes, only its own block; across nodes the leaders' ring carries only
//! the node regions. Every rank adds a node's values in rank order, whichever rank reduces an element, and the
//! leaders' ring carries an element in the same piece and chunk in an allreduce and a reduce-scatter, so a
//! reduce-scatter leaves each block exactly the allreduce's values.
//!
//! Broadcast, allgather and barrier, which move little data in training, use the whole-job TCP [`Ring`] that
//! [`transport`](crate::transport) links first and hands to [`over_ring`]; it also carries the set-up's own exchanges.
//!
//! Files: this one (set-up and the collectives), `segment.rs` (the mapped segment, its epoch words and futex
//! waits), `reduce.rs` (the element-wise sums), `tests.rs`.

mod reduce;
mod segment;

use std::time::{Duration, Instant};

use half::bf16;

use crate::backend::failure::{decode_failure, encode_failure};
use crate::backend::ring::{add_f32, add_f64, chunk, DT_BF16 as RING_BF16, DT_F32 as RING_F32, DT_F64 as RING_F64};
use crate::rendezvous::liveness::VERDICT_WAIT;
use crate::{
    block_range, check_blocks, Buffer, Collective, CommError, CommOptions, Liveness, Membership, ReduceOp, Ring, Store,
    Transport,
};
use reduce::{sum_into, Elem};
use segment::{process_gone, wait_while, wake, Segment};

/// Shared memory the slots of one node may take in all (two banks of `local_world_size` slots).
const SEGMENT_BUDGET: usize = 32 << 20;
/// Largest slot: bigger slots mean fewer barriers but data that no longer stays in cache between the copy-in and
/// the reduction.
const MAX_SLOT: usize = 4 << 20;
const MIN_SLOT: usize = 64 << 10;
/// The leaders' ring reduces a node's sum in pieces of this many bytes and bumps its progress word after each, so
/// that the node's other ranks, waiting for the result, can tell a slow inter-node allreduce from a stuck leader.
const LEADER_PIECE: usize = 16 << 20;

const OP_ALLREDUCE: u64 = 1;
const OP_REDUCE_SCATTER: u64 = 2;
const OP_ALLGATHER_BLOCKS: u64 = 3;
const DT_F32: u64 = 1;
const DT_F64: u64 = 2;
const DT_BF16: u64 = 3;

/// The shared-memory backend (see the module docs); built by [`crate::init`] when the transport allows it.
pub(crate) struct Shm {
    rank: usize,
    world: usize,
    local_rank: usize,
    local: usize,
    nodes: usize,
    flat: Ring,
    /// The store's liveness watch (kept by the whole-job ring): it names a lost rank, also on another node.
    liveness: Option<Liveness>,
    leaders: Option<Ring>,
    seg: Segment,
    pids: Vec<u64>,
    epoch: u64,
    round: u64,
    seq: u64,
    broken: Option<String>,
    timeout: Duration,
    widened: Vec<f32>,
}

/// Builds the shared-memory backend over `flat`, the whole-job ring, when the topology allows it; otherwise (or when
/// a node cannot map its segment) returns `flat` itself, unless `opts.transport` is [`Transport::Shm`], which turns
/// those cases into errors. `slot_bytes` fixes the slot size (tests use tiny slots to cross many rounds).
pub(crate) fn over_ring(
    mut flat: Ring,
    store: &Store,
    m: &Membership,
    opts: &CommOptions,
    slot_bytes: Option<usize>,
) -> Result<Box<dyn Collective>, CommError> {
    let forced = opts.transport == Transport::Shm;
    let local = match agree_on_topology(&mut flat, m)? {
        Ok(local) => local,
        Err(why) if forced => {
            return Err(CommError::InvalidMembership(format!("the shm transport cannot be used: {why}")))
        }
        Err(why) => {
            tracing::debug!(rank = m.rank, "using the TCP ring: {why}");
            return Ok(Box::new(flat));
        }
    };
    if local == 1 {
        tracing::debug!(rank = m.rank, "one process per node: nothing to share, using the TCP ring");
        return Ok(Box::new(flat));
    }
    let slot_bytes =
        slot_bytes.unwrap_or((SEGMENT_BUDGET / (2 * local)).clamp(MIN_SLOT, MAX_SLOT)).next_multiple_of(64);
    let local_rank = m.rank % local;
    let node = m.rank / local;
    let generation = store.next_generation("shm");
    let key = format!("shm/{generation}/node/{node}");
    let mapped: Result<Segment, String> = if local_rank == 0 {
        let nonce = random_u64();
        let path = format!("/dev/shm/hytrain-{}-{node}-{nonce:016x}", sanitize(&opts.job_id));
        match Segment::create(&path, local, slot_bytes, nonce) {
            Ok(seg) => {
                store.set(&key, format!("ok {nonce} {path}").as_bytes())?;
                Ok(seg)
            }
            Err(e) => {
                store.set(&key, format!("err {e}").as_bytes())?;
                Err(e.to_string())
            }
        }
    } else {
        let published = String::from_utf8_lossy(&store.get(&key)?).into_owned();
        let mut f = published.splitn(3, ' ');
        match (f.next(), f.next(), f.next()) {
            (Some("ok"), Some(nonce), Some(path)) if path.starts_with("/dev/shm/hytrain-") => {
                match nonce.parse::<u64>() {
                    Ok(nonce) => Segment::attach(path, local, slot_bytes, nonce)
                        .map_err(|e| format!("{e} (is local rank 0 on another host?)")),
                    Err(_) => Err(format!("local rank 0 published a bad nonce: {published}")),
                }
            }
            (Some("err"), ..) => {
                Err(format!("local rank 0 could not create the segment: {}", &published[4.min(published.len())..]))
            }
            _ => Err(format!("local rank 0 published an unreadable segment name: {published}")),
        }
    };
    // Every rank learns whether every node mapped its segment before anyone commits to it.
    let mut failures = [if mapped.is_err() { 1.0f32 } else { 0.0 }];
    flat.allreduce(Buffer::F32(&mut failures), ReduceOp::Sum)?;
    let mut seg = match mapped {
        Ok(seg) if failures[0] == 0.0 => seg,
        outcome => {
            let why = match outcome {
                Err(why) => why,
                Ok(_) => {
                    format!("{} rank(s) of the job could not map their node's segment (see their logs)", failures[0])
                }
            };
            if forced {
                return Err(CommError::InvalidMembership(format!(
                    "rank {}: the shm transport cannot be used: {why}",
                    m.rank
                )));
            }
            tracing::warn!(rank = m.rank, "shared memory unavailable, using the TCP ring: {why}");
            return Ok(Box::new(flat));
        }
    };
    // Every local rank has mapped it (the vote above waited for all); the name is no longer needed.
    seg.unlink();
    seg.pid(local_rank).store(std::process::id() as u64, std::sync::atomic::Ordering::Release);
    let nodes = m.world_size / local;
    let leaders = if nodes > 1 && local_rank == 0 {
        let me = Membership {
            rank: node,
            world_size: nodes,
            local_rank: 0,
            local_world_size: 1,
            master_addr: m.master_addr.clone(),
            master_port: m.master_port,
        };
        Some(Ring::connect_group(store, &me, opts).map_err(|e| remap(e, local))?)
    } else {
        None
    };
    let liveness = flat.liveness();
    let mut shm = Shm {
        liveness,
        rank: m.rank,
        world: m.world_size,
        local_rank,
        local,
        nodes,
        flat,
        leaders,
        seg,
        pids: vec![0; local],
        epoch: 0,
        round: 0,
        seq: 0,
        broken: None,
        timeout: opts.collective_timeout,
        widened: Vec::new(),
    };
    // The pids are read after a barrier, so every local rank's is there.
    shm.barrier_local("set-up")?;
    for r in 0..local {
        shm.pids[r] = shm.seg.pid(r).load(std::sync::atomic::Ordering::Acquire);
    }
    tracing::debug!(rank = m.rank, local, nodes, slot_bytes, "shared-memory transport ready");
    Ok(Box::new(shm))
}

/// Gathers every rank's (local_rank, local_world_size) and checks that the job is `nodes` blocks of
/// `local_world_size` consecutive ranks, as launchers number them (node_rank * local_world_size + local_rank).
/// Every rank sees the same data, so every rank reaches the same answer.
fn agree_on_topology(flat: &mut Ring, m: &Membership) -> Result<Result<usize, String>, CommError> {
    let mut mine = [0u8; 16];
    mine[..8].copy_from_slice(&(m.local_rank as u64).to_le_bytes());
    mine[8..].copy_from_slice(&(m.local_world_size as u64).to_le_bytes());
    let mut all = vec![0u8; 16 * m.world_size];
    flat.allgather(&mine, &mut all)?;
    let local = m.local_world_size;
    for (r, entry) in all.chunks(16).enumerate() {
        let lr = u64::from_le_bytes(entry[..8].try_into().unwrap_or_default()) as usize;
        let lws = u64::from_le_bytes(entry[8..].try_into().unwrap_or_default()) as usize;
        if lws != local {
            return Ok(Err(format!(
                "rank {r} has local_world_size {lws} but rank {} has {local}; every node must run the same \
                 number of processes",
                m.rank
            )));
        }
        if lr != r % local {
            return Ok(Err(format!(
                "rank {r} has local_rank {lr}, not {}: ranks must be numbered node_rank * local_world_size + \
                 local_rank",
                r % local
            )));
        }
    }
    if !m.world_size.is_multiple_of(local) {
        return Ok(Err(format!("world_size {} is not a multiple of local_world_size {local}", m.world_size)));
    }
    Ok(Ok(local))
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    match getrandom::getrandom(&mut b) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => fastrand::u64(..),
    }
}

/// The job id as a file-name part: letters, digits, '-' and '_' only, at most 32 characters.
fn sanitize(job_id: &str) -> String {
    job_id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).take(32).collect()
}

/// A leaders' ring numbers nodes; errors name the node's local rank 0, the job rank a user can find.
fn remap(e: CommError, local: usize) -> CommError {
    match e {
        CommError::PeerLost { rank, during, cause } => CommError::PeerLost { rank: rank * local, during, cause },
        CommError::Timeout { rank, during, secs } => CommError::Timeout { rank: rank * local, during, secs },
        CommError::Remote { rank, message } => CommError::Remote { rank: rank * local, message },
        other => other,
    }
}

fn describe(desc: [u64; 3]) -> String {
    let dtype = match desc[0] >> 8 {
        DT_F32 => "f32",
        DT_F64 => "f64",
        DT_BF16 => "bf16",
        _ => "unknown",
    };
    let op = match desc[0] & 0xff {
        OP_ALLREDUCE => "allreduce",
        OP_REDUCE_SCATTER => "reduce_scatter",
        OP_ALLGATHER_BLOCKS => "allgather_blocks",
        _ => "an unknown collective",
    };
    format!("{op} of {} {dtype} values", desc[2])
}

fn dtype_code(buf: &Buffer<'_>) -> u64 {
    match buf {
        Buffer::F32(_) => DT_F32,
        Buffer::F64(_) => DT_F64,
        Buffer::Bf16(_) => DT_BF16,
    }
}

/// Splits `c` elements into `parts` nearly equal slices; slice `i`.
fn slice(c: usize, parts: usize, i: usize) -> std::ops::Range<usize> {
    c * i / parts..c * (i + 1) / parts
}

/// How a typed buffer crosses the leaders' ring: its header type and its sum (bf16 crosses as f32).
trait RingElem: Elem {
    const RING_DTYPE: u8;
    fn add(dst: &mut [Self], src: &[Self]);
}

impl RingElem for f32 {
    const RING_DTYPE: u8 = RING_F32;
    fn add(dst: &mut [f32], src: &[f32]) {
        add_f32(dst, src)
    }
}

impl RingElem for f64 {
    const RING_DTYPE: u8 = RING_F64;
    fn add(dst: &mut [f64], src: &[f64]) {
        add_f64(dst, src)
    }
}

/// Piece `p` of node `c`'s region when `len` elements are split into `nodes` regions (the ring's chunks) and each
/// region into pieces of `q`: the leaders' ring moves one piece of every region per collective, so a slow
/// inter-node step shows progress, and element `i` is summed by the same leaders in the same order whether an
/// allreduce or a reduce-scatter carries it.
fn piece(len: usize, nodes: usize, q: usize, p: usize, c: usize) -> std::ops::Range<usize> {
    let r = chunk(len, nodes, c);
    (r.start + p * q).min(r.end)..(r.start + (p + 1) * q).min(r.end)
}

impl Shm {
    fn usable(&self) -> Result<(), CommError> {
        match &self.broken {
            Some(why) => Err(CommError::Broken(why.clone())),
            None => Ok(()),
        }
    }

    /// Marks the backend unusable and tells the node's other ranks, so that they stop waiting for this one.
    fn fail(&mut self, e: CommError) -> CommError {
        if !matches!(e, CommError::Broken(_)) {
            self.seg.record_failure(self.local_rank, &encode_failure(self.rank, &e));
            self.broken = Some(e.to_string());
        }
        e
    }

    fn global(&self, local_rank: usize) -> usize {
        self.rank - self.local_rank + local_rank
    }

    /// The failure another local rank recorded, in the form it was recorded.
    fn recorded_failure(&self, by: usize) -> CommError {
        let until = Instant::now() + Duration::from_secs(1);
        loop {
            if let Some(message) = self.seg.failure_message() {
                return match decode_failure(message.as_bytes()) {
                    Some(e @ (CommError::PeerLost { .. } | CommError::Timeout { .. })) => e,
                    Some(CommError::Remote { message, .. }) | Some(CommError::Broken(message)) => {
                        CommError::Remote { rank: self.global(by), message }
                    }
                    _ => CommError::Remote { rank: self.global(by), message },
                };
            }
            if Instant::now() >= until {
                return CommError::Remote {
                    rank: self.global(by),
                    message: "it failed during a shared-memory collective (see its log)".into(),
                };
            }
            std::thread::yield_now();
        }
    }

    /// Waits until local rank `r` has reached barrier epoch `target`.
    fn wait_for(&self, r: usize, target: u64, during: &'static str) -> Result<(), CommError> {
        use std::sync::atomic::Ordering::{Acquire, Relaxed};
        let epoch = self.seg.epoch(r);
        if epoch.load(Acquire) >= target {
            return Ok(());
        }
        let mut progress = self.seg.progress(r).load(Relaxed);
        let mut deadline = Instant::now() + self.timeout;
        let mut next_liveness = Instant::now();
        let mut spins = 0u64;
        loop {
            let seen = epoch.load(Acquire);
            if seen >= target {
                return Ok(());
            }
            spins += 1;
            if spins < 256 {
                std::hint::spin_loop();
                continue;
            }
            // Epochs only grow, so a changed low half is all a sleeper needs to notice; the timeout bounds the
            // time between failure and liveness checks.
            wait_while(epoch, seen, Duration::from_millis(2));
            if let Some(by) = self.seg.failed_rank() {
                return Err(self.recorded_failure(by));
            }
            if let Some(lost) = self.liveness.as_ref().and_then(Liveness::lost) {
                return Err(CommError::RankLost(lost));
            }
            let now = Instant::now();
            let p = self.seg.progress(r).load(Relaxed);
            if p != progress {
                progress = p;
                deadline = now + self.timeout;
            }
            if now >= deadline {
                return Err(CommError::Timeout { rank: self.global(r), during, secs: self.timeout.as_secs() });
            }
            if now >= next_liveness {
                let pid = self.pids.get(r).copied().filter(|p| *p != 0);
                let pid = pid.unwrap_or_else(|| self.seg.pid(r).load(Acquire));
                if process_gone(pid) {
                    // The store's verdict, where there is one, is what every rank of the job reports.
                    if let Some(lost) = self.liveness.as_ref().and_then(|l| l.wait_lost(Some(VERDICT_WAIT))) {
                        return Err(CommError::RankLost(lost));
                    }
                    return Err(CommError::PeerLost { rank: self.global(r), during, cause: "process exited".into() });
                }
                next_liveness = now + Duration::from_millis(20);
            }
        }
    }

    /// Publishes this rank's next barrier epoch and wakes whoever sleeps on it.
    fn arrive(&mut self) {
        self.epoch += 1;
        let word = self.seg.epoch(self.local_rank);
        word.store(self.epoch, std::sync::atomic::Ordering::Release);
        wake(word);
    }

    /// Returns once every local rank has reached this barrier.
    fn barrier_local(&mut self, during: &'static str) -> Result<(), CommError> {
        self.arrive();
        for r in 0..self.local {
            if r != self.local_rank {
                self.wait_for(r, self.epoch, during)?;
            }
        }
        Ok(())
    }

    /// Publishes this collective's description and checks every local rank called the same one.
    fn check_call(&mut self, during: &'static str, desc: [u64; 3]) -> Result<(), CommError> {
        use std::sync::atomic::Ordering::Relaxed;
        for (i, w) in desc.iter().enumerate() {
            self.seg.desc(self.local_rank, self.seq, i).store(*w, Relaxed);
        }
        self.barrier_local(during)?;
        for r in 0..self.local {
            let theirs = [0, 1, 2].map(|i| self.seg.desc(r, self.seq, i).load(Relaxed));
            if theirs != desc {
                return Err(CommError::Mismatch(format!(
                    "rank {} called {} as collective #{} but this rank called {} as collective #{}; every rank \
                     must issue the same collectives in the same order with the same sizes",
                    self.global(r),
                    describe(theirs),
                    theirs[1],
                    describe(desc),
                    desc[1]
                )));
            }
        }
        Ok(())
    }

    fn slot<T: Elem>(&self, bank: usize, r: usize, len: usize) -> *mut T {
        debug_assert!(len * std::mem::size_of::<T>() <= self.seg.slot_bytes());
        // SAFETY: inside bank `bank`, which holds `local` slots.
        unsafe { self.seg.bank(bank).add(r * self.seg.slot_bytes()) as *mut T }
    }

    /// Sums `buf` over the node's ranks; every rank (or, with `leader_only`, only local rank 0) ends with the
    /// node's sum, divided by `avg_over` when given.
    fn reduce_node<T: Elem>(
        &mut self,
        buf: &mut [T],
        leader_only: bool,
        avg_over: Option<usize>,
    ) -> Result<(), CommError> {
        let cap = self.seg.slot_bytes() / std::mem::size_of::<T>();
        let (me, local) = (self.local_rank, self.local);
        let mut others: Vec<&[T]> = Vec::with_capacity(local - 1);
        let mut off = 0;
        while off < buf.len() {
            let c = cap.min(buf.len() - off);
            let bank = (self.round % 2) as usize;
            self.round += 1;
            let chunk = &mut buf[off..off + c];
            let mine = self.slot::<T>(bank, me, c);
            // SAFETY: `c` elements fit in a slot (`cap`), and in this phase (up to the barrier) only this rank
            // touches its own slot: the barriers give each slot range one writer per phase (module docs).
            let my_slot = unsafe { std::slice::from_raw_parts_mut(mine, c) };
            for j in (0..local).filter(|j| *j != me) {
                let s = slice(c, local, j);
                my_slot[s.clone()].copy_from_slice(&chunk[s]);
            }
            self.barrier_local("allreduce")?;
            let s = slice(c, local, me);
            others.clear();
            for j in (0..local).filter(|j| *j != me) {
                // SAFETY: after the barrier rank j's slot is written and no longer changes in this phase; `s` lies
                // inside the `c` elements it wrote, so this range is only read (by the rank that owns `s`).
                others.push(unsafe { std::slice::from_raw_parts(self.slot::<T>(bank, j, c).add(s.start), s.len()) });
            }
            // SAFETY: this rank is the one writer of range `s` of every slot in this phase, and only `s` of its own
            // slot is written through this slice (the other ranks read their own ranges of it, disjoint from `s`).
            let my_slot = unsafe { std::slice::from_raw_parts_mut(mine, c) };
            sum_into(&mut chunk[s.clone()], &others, me, Some(&mut my_slot[s.clone()]), avg_over);
            others.clear();
            self.barrier_local("allreduce")?;
            if !leader_only || me == 0 {
                for j in (0..local).filter(|j| *j != me) {
                    let s = slice(c, local, j);
                    // SAFETY: after the second barrier rank j's range `s` holds its reduced values and nobody
                    // writes the bank until the next round (which alternates banks).
                    let theirs =
                        unsafe { std::slice::from_raw_parts(self.slot::<T>(bank, j, c).add(s.start), s.len()) };
                    chunk[s].copy_from_slice(theirs);
                }
            }
            off += c;
        }
        Ok(())
    }

    /// Copies local rank 0's `buf` to the node's other ranks through both banks.
    fn broadcast_node<T: Elem>(&mut self, buf: &mut [T]) -> Result<(), CommError> {
        let cap = self.seg.slot_bytes() * self.local / std::mem::size_of::<T>();
        let mut off = 0;
        while off < buf.len() {
            let c = cap.min(buf.len() - off);
            let bank = (self.round % 2) as usize;
            self.round += 1;
            let region = self.slot::<T>(bank, 0, 0);
            if self.local_rank == 0 {
                // This bank was last read two rounds ago; every reader has finished with it once it has entered
                // the previous round's barrier.
                for r in 1..self.local {
                    self.wait_for(r, self.epoch, "allreduce")?;
                }
                // SAFETY: a bank holds `local` contiguous slots, so `cap` elements, and no reader reads it now.
                unsafe { std::slice::from_raw_parts_mut(region, c) }.copy_from_slice(&buf[off..off + c]);
            }
            self.arrive();
            if self.local_rank != 0 {
                self.wait_for(0, self.epoch, "allreduce")?;
                // SAFETY: the leader wrote this bank before entering the barrier just passed and does not write
                // it again before this rank enters the next one.
                buf[off..off + c].copy_from_slice(unsafe { std::slice::from_raw_parts(region, c) });
            }
            off += c;
        }
        // The readers must be done with both banks before anyone reuses them.
        self.barrier_local("allreduce")
    }

    /// Sums this node's region pieces across the nodes' leaders (see [`piece`]): every region on every leader, or
    /// with `scatter_only` only this node's region on its leader. Nothing on ranks that are not leaders.
    fn leaders_sum<T: RingElem>(&mut self, buf: &mut [T], scatter_only: bool) -> Result<(), CommError> {
        let Some(ring) = self.leaders.as_mut() else {
            return Ok(());
        };
        let (len, nodes) = (buf.len(), self.nodes);
        let q = (LEADER_PIECE / std::mem::size_of::<T>() / nodes).max(1);
        for p in 0..chunk(len, nodes, 0).len().div_ceil(q) {
            ring.sum_chunks(buf, T::RING_DTYPE, T::add, scatter_only, p as u64, |c| piece(len, nodes, q, p, c))
                .map_err(|e| remap(e, self.local))?;
            self.seg.progress(0).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    fn allreduce_typed<T: RingElem>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<(), CommError> {
        let avg = (op == ReduceOp::Avg).then_some(self.world);
        if self.nodes == 1 {
            return self.reduce_node(buf, false, avg);
        }
        self.reduce_node(buf, true, None)?;
        if self.leaders.is_some() {
            self.leaders_sum(buf, false)?;
            if let Some(n) = avg {
                let d = T::count(n);
                for x in buf.iter_mut() {
                    *x = T::narrow(x.widen() / d);
                }
            }
        }
        self.broadcast_node(buf)
    }

    /// Reduce-scatter across nodes: the node's sum on its leader, the leaders' reduce-scatter of the node regions,
    /// then the node's region from its leader to the node's ranks (each needs only its block of it).
    fn reduce_scatter_nodes<T: RingElem>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<(), CommError> {
        self.reduce_node(buf, true, None)?;
        let region = chunk(buf.len(), self.nodes, self.rank / self.local);
        if self.leaders.is_some() {
            self.leaders_sum(buf, true)?;
            if op == ReduceOp::Avg {
                let d = T::count(self.world);
                for x in buf[region.clone()].iter_mut() {
                    *x = T::narrow(x.widen() / d);
                }
            }
        }
        self.broadcast_node(&mut buf[region])
    }

    /// Reduce-scatter inside the node: in each round every rank copies a piece of each other rank's block into
    /// its slot, then sums its own block's piece from everyone's slots, in rank order as `reduce_node` does. The
    /// slots alternate between two banks, so one barrier per round suffices: a bank is written again only after
    /// every rank has passed the next round's barrier, which it enters after reading. Blocks outside this rank's
    /// keep its input.
    fn reduce_scatter_node<T: Elem>(&mut self, buf: &mut [T], avg_over: Option<usize>) -> Result<(), CommError> {
        let cap = self.seg.slot_bytes() / std::mem::size_of::<T>();
        let (me, local) = (self.local_rank, self.local);
        let q = cap / local;
        if q == 0 {
            // A slot too small to hold one element per rank (only tests choose such slots): reduce everything.
            return self.reduce_node(buf, false, avg_over);
        }
        let b = buf.len() / local;
        let mut others: Vec<&[T]> = Vec::with_capacity(local - 1);
        for k in 0..b.div_ceil(q) {
            let part = k * q..((k + 1) * q).min(b);
            let bank = (self.round % 2) as usize;
            self.round += 1;
            // SAFETY: `local * q <= cap` elements fit in a slot, and the barriers give each slot range one writer per
            // phase (see above): before the barrier only this rank touches its own slot.
            let my_slot = unsafe { std::slice::from_raw_parts_mut(self.slot::<T>(bank, me, cap), cap) };
            for j in (0..local).filter(|j| *j != me) {
                my_slot[j * q..j * q + part.len()].copy_from_slice(&buf[j * b + part.start..j * b + part.end]);
            }
            self.barrier_local("reduce_scatter")?;
            others.clear();
            for j in (0..local).filter(|j| *j != me) {
                // SAFETY: rank `j` wrote this piece of its slot before the barrier just passed and writes that bank
                // again only after this rank has entered the next barrier.
                let theirs =
                    unsafe { std::slice::from_raw_parts(self.slot::<T>(bank, j, cap).add(me * q), part.len()) };
                others.push(theirs);
            }
            sum_into(&mut buf[me * b + part.start..me * b + part.end], &others, me, None, avg_over);
            others.clear();
        }
        Ok(())
    }

    /// Allgather inside the node: in each round every rank copies a piece of its own block into its slot and,
    /// after one barrier, the others' pieces out of theirs (two banks, as in `reduce_scatter_node`).
    fn allgather_node<T: Elem>(&mut self, buf: &mut [T]) -> Result<(), CommError> {
        let cap = self.seg.slot_bytes() / std::mem::size_of::<T>();
        let (me, local) = (self.local_rank, self.local);
        let b = buf.len() / local;
        for k in 0..b.div_ceil(cap) {
            let part = k * cap..((k + 1) * cap).min(b);
            let bank = (self.round % 2) as usize;
            self.round += 1;
            // SAFETY: `part.len() <= cap` elements fit in a slot; this rank's slot is written only by it, before the
            // barrier, and read by the others only after it.
            let my_slot = unsafe { std::slice::from_raw_parts_mut(self.slot::<T>(bank, me, part.len()), part.len()) };
            my_slot.copy_from_slice(&buf[me * b + part.start..me * b + part.end]);
            self.barrier_local("allgather_blocks")?;
            for j in (0..local).filter(|j| *j != me) {
                // SAFETY: as above; rank `j` wrote this slot before the barrier just passed.
                let theirs = unsafe { std::slice::from_raw_parts(self.slot::<T>(bank, j, part.len()), part.len()) };
                buf[j * b + part.start..j * b + part.end].copy_from_slice(theirs);
            }
        }
        Ok(())
    }

    /// Allgather across nodes: the node's region gathered inside the node, the leaders' allgather of the regions
    /// (in pieces, see [`piece`]), then the whole buffer from the leader to the node's ranks.
    fn allgather_nodes<T: Elem>(&mut self, buf: &mut [T], dtype: u8) -> Result<(), CommError> {
        let (len, nodes) = (buf.len(), self.nodes);
        let region = chunk(len, nodes, self.rank / self.local);
        self.allgather_node(&mut buf[region])?;
        if let Some(ring) = self.leaders.as_mut() {
            let q = (LEADER_PIECE / std::mem::size_of::<T>() / nodes).max(1);
            for p in 0..chunk(len, nodes, 0).len().div_ceil(q) {
                ring.gather_chunks(buf, dtype, p as u64, |c| piece(len, nodes, q, p, c))
                    .map_err(|e| remap(e, self.local))?;
                self.seg.progress(0).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        self.broadcast_node(buf)
    }

    /// Publishes the call and checks every local rank made the same one; counts it either way.
    fn begin(&mut self, during: &'static str, op: u64, buf: &Buffer<'_>) -> Result<(), CommError> {
        let seq = self.seq;
        let checked = self.check_call(during, [op | (dtype_code(buf) << 8), seq, buf.len() as u64]);
        self.seq += 1;
        checked
    }

    fn allreduce_any(&mut self, buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError> {
        self.begin("allreduce", OP_ALLREDUCE, &buf)?;
        match buf {
            Buffer::F32(b) => self.allreduce_typed(b, op),
            Buffer::F64(b) => self.allreduce_typed(b, op),
            Buffer::Bf16(b) if self.nodes == 1 => {
                let avg = (op == ReduceOp::Avg).then_some(self.world);
                self.reduce_node(b, false, avg)
            }
            Buffer::Bf16(b) => {
                // Partial sums cross nodes as f32 so the only rounding to bf16 is the final one, as in the ring.
                let mut wide = std::mem::take(&mut self.widened);
                wide.clear();
                wide.extend(b.iter().map(|x| x.to_f32()));
                let result = self.allreduce_typed(&mut wide, ReduceOp::Sum);
                if result.is_ok() {
                    let n = if op == ReduceOp::Avg { self.world as f32 } else { 1.0 };
                    for (d, s) in b.iter_mut().zip(&wide) {
                        *d = bf16::from_f32(*s / n);
                    }
                }
                self.widened = wide;
                result
            }
        }
    }

    fn reduce_scatter_any(&mut self, buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError> {
        self.begin("reduce_scatter", OP_REDUCE_SCATTER, &buf)?;
        let avg = (op == ReduceOp::Avg).then_some(self.world);
        let mine = block_range(buf.len(), self.world, self.rank);
        match buf {
            Buffer::F32(b) if self.nodes == 1 => self.reduce_scatter_node(b, avg),
            Buffer::F64(b) if self.nodes == 1 => self.reduce_scatter_node(b, avg),
            Buffer::Bf16(b) if self.nodes == 1 => self.reduce_scatter_node(b, avg),
            Buffer::F32(b) => self.reduce_scatter_nodes(b, op),
            Buffer::F64(b) => self.reduce_scatter_nodes(b, op),
            Buffer::Bf16(b) => {
                // As in allreduce: f32 across nodes, one rounding of this rank's block at the end.
                let mut wide = std::mem::take(&mut self.widened);
                wide.clear();
                wide.extend(b.iter().map(|x| x.to_f32()));
                let result = self.reduce_scatter_nodes(&mut wide, ReduceOp::Sum);
                if result.is_ok() {
                    let n = if op == ReduceOp::Avg { self.world as f32 } else { 1.0 };
                    for (d, s) in b[mine.clone()].iter_mut().zip(&wide[mine]) {
                        *d = bf16::from_f32(*s / n);
                    }
                }
                self.widened = wide;
                result
            }
        }
    }

    fn allgather_blocks_any(&mut self, buf: Buffer<'_>) -> Result<(), CommError> {
        self.begin("allgather_blocks", OP_ALLGATHER_BLOCKS, &buf)?;
        match buf {
            Buffer::F32(b) if self.nodes == 1 => self.allgather_node(b),
            Buffer::F64(b) if self.nodes == 1 => self.allgather_node(b),
            Buffer::Bf16(b) if self.nodes == 1 => self.allgather_node(b),
            Buffer::F32(b) => self.allgather_nodes(b, RING_F32),
            Buffer::F64(b) => self.allgather_nodes(b, RING_F64),
            Buffer::Bf16(b) => self.allgather_nodes(b, RING_BF16),
        }
    }
}

impl Collective for Shm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn backend(&self) -> &'static str {
        "shm"
    }

    fn allreduce(&mut self, buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError> {
        self.usable()?;
        self.allreduce_any(buf, op).map_err(|e| self.fail(e))
    }

    /// Inside a node, each rank reduces its own block across the node's slots (`local_world_size` rounds of one
    /// barrier per slot of data), summing in rank order as the shared-memory allreduce does, so its block holds the
    /// allreduce's bits. Across nodes: the node's sum on its leader, the leaders' ring reduce-scatter of the node
    /// regions (half the inter-node data of an allreduce), the region back to the node's ranks. Outside this
    /// rank's block `buf` holds its input (one node) or the node's partial sums.
    fn reduce_scatter(&mut self, buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError> {
        check_blocks("reduce_scatter", &buf, self.world)?;
        self.usable()?;
        self.reduce_scatter_any(buf, op).map_err(|e| self.fail(e))
    }

    /// Inside a node, each rank publishes its block through its slot and copies the others' out; across nodes,
    /// the node's region is gathered inside the node, the leaders' ring gathers the regions, and the whole
    /// buffer goes from the leader to the node's ranks.
    fn allgather_blocks(&mut self, buf: Buffer<'_>) -> Result<(), CommError> {
        check_blocks("allgather_blocks", &buf, self.world)?;
        self.usable()?;
        self.allgather_blocks_any(buf).map_err(|e| self.fail(e))
    }

    fn broadcast(&mut self, bytes: &mut [u8], root: usize) -> Result<(), CommError> {
        self.usable()?;
        let r = self.flat.broadcast(bytes, root);
        r.map_err(|e| match e {
            e @ CommError::InvalidArgument { .. } => e,
            e => self.fail(e),
        })
    }

    fn allgather(&mut self, input: &[u8], output: &mut [u8]) -> Result<(), CommError> {
        self.usable()?;
        let r = self.flat.allgather(input, output);
        r.map_err(|e| match e {
            e @ CommError::InvalidArgument { .. } => e,
            e => self.fail(e),
        })
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.usable()?;
        let r = self.flat.barrier();
        r.map_err(|e| self.fail(e))
    }

    fn liveness(&self) -> Option<Liveness> {
        self.liveness.clone()
    }
}

#[cfg(test)]
mod tests;
