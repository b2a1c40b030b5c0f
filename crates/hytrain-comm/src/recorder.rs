//! The collective flight recorder: each rank keeps its last collectives (sequence number, kind, bytes, when each
//! started and ended, and how it failed) in a ring buffer, and writes them out when the job goes wrong, so that
//! after a hang or a loss the ranks' records side by side say which rank was behind and which collective every
//! rank was in ([`diagnose`], `hytrain flight-recorder`).
//!
//! [`Recorded`] wraps any [`Collective`] and records every call on it. A record costs one lock and no allocation
//! (the buffer is allocated once), so it stays on in every job. [`FlightRecorder::dump`] writes
//! `<dir>/rank-<rank>.json` (whole or not at all: written aside, then renamed) and a short account to stderr; the
//! caller decides when (hytrain dumps on a lost rank, on a failed run and on SIGTERM/SIGINT, before anything can
//! end the process, since a dump written after the abort is no dump: PyTorch's recorder loses that race,
//! pytorch/pytorch#121055).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{Buffer, Collective, CommError, Liveness, ReduceOp};

/// How many collectives each rank keeps by default: a few steps' worth of buckets, metrics and checks.
pub const DEFAULT_CAPACITY: usize = 256;

/// One collective call as a rank saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The call's number on this rank, from 0; every rank numbers the same calls the same way, since every rank
    /// must call the same collectives in the same order.
    pub seq: u64,
    /// `allreduce`, `broadcast`, `allgather`, `barrier`, `reduce_scatter` or `allgather_blocks` (borrowed while
    /// recording, so a record allocates nothing; owned when read back from a dump).
    pub kind: Cow<'static, str>,
    /// Bytes of this rank's buffer.
    pub bytes: u64,
    /// When it started, in milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// When it returned; `None` while it is still running.
    pub ended_ms: Option<u64>,
    /// Why it failed, when it did.
    pub error: Option<String>,
}

/// What a rank wrote when something went wrong: its identity, why it wrote, and its last collectives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dump {
    /// Global rank.
    pub rank: usize,
    /// Ranks in the job.
    pub world_size: usize,
    /// This rank's host name.
    pub host: String,
    /// This rank's process id.
    pub pid: u32,
    /// Why the dump was written (the error, the lost rank, the signal).
    pub reason: String,
    /// When it was written, in milliseconds since the Unix epoch.
    pub written_ms: u64,
    /// Collectives called in all, of which the last `records.len()` are kept.
    pub calls: u64,
    /// The last collectives, oldest first.
    pub records: Vec<Record>,
}

impl Dump {
    /// The newest collective that returned, successfully or not.
    pub fn last_finished(&self) -> Option<&Record> {
        self.records.iter().rev().find(|r| r.ended_ms.is_some())
    }

    /// The collective still running when the dump was written, if any.
    pub fn running(&self) -> Option<&Record> {
        self.records.last().filter(|r| r.ended_ms.is_none())
    }

    /// How far this rank got: the number of the collective it is in, or of the next one it would call, and
    /// whether it is inside it (a rank that has not entered a collective is behind one that waits in it).
    fn position(&self) -> (u64, bool) {
        self.running().map_or((self.calls, false), |r| (r.seq, true))
    }
}

#[derive(Debug)]
struct Log {
    rank: usize,
    world_size: usize,
    capacity: usize,
    calls: u64,
    records: VecDeque<Record>,
    /// Where dumps go; `None`: stderr only.
    dir: Option<PathBuf>,
    /// A dump was written: the first account of what went wrong is the one kept.
    dumped: bool,
}

/// A rank's flight recorder; clones share it.
#[derive(Debug, Clone)]
pub struct FlightRecorder {
    log: Arc<Mutex<Log>>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl FlightRecorder {
    /// A recorder for `rank` of `world_size` keeping the last `capacity` collectives (at least one).
    pub fn new(rank: usize, world_size: usize, capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let records = VecDeque::with_capacity(capacity);
        let log = Log { rank, world_size, capacity, calls: 0, records, dir: None, dumped: false };
        FlightRecorder { log: Arc::new(Mutex::new(log)) }
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        // Every update leaves the log consistent, so a panic elsewhere while holding it changes nothing.
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job's ranks changed and this process carries on as `rank` of `world_size` (a job of a range of nodes):
    /// later dumps say so and go to that rank's file, and a later failure is dumped again, since the first dump
    /// told of the old round's.
    pub fn new_round(&self, rank: usize, world_size: usize) {
        let mut log = self.lock();
        (log.rank, log.world_size, log.dumped) = (rank, world_size, false);
    }

    /// Writes dumps to `dir` from now on (`None`: to stderr only).
    pub fn set_dump_dir(&self, dir: Option<PathBuf>) {
        self.lock().dir = dir;
    }

    /// The file this rank's dumps go to, if any.
    pub fn dump_path(&self) -> Option<PathBuf> {
        let log = self.lock();
        log.dir.as_ref().map(|d| d.join(format!("rank-{}.json", log.rank)))
    }

    /// Collectives called so far.
    pub fn calls(&self) -> u64 {
        self.lock().calls
    }

    /// Records the start of a collective; returns its number.
    fn begin(&self, kind: &'static str, bytes: usize) -> u64 {
        let mut log = self.lock();
        let seq = log.calls;
        log.calls += 1;
        if log.records.len() == log.capacity {
            log.records.pop_front();
        }
        let record = Record {
            seq,
            kind: Cow::Borrowed(kind),
            bytes: bytes as u64,
            started_ms: now_ms(),
            ended_ms: None,
            error: None,
        };
        log.records.push_back(record);
        seq
    }

    /// Records the end of collective `seq`.
    fn end(&self, seq: u64, result: &Result<(), CommError>) {
        let mut log = self.lock();
        if let Some(r) = log.records.iter_mut().rev().find(|r| r.seq == seq) {
            r.ended_ms = Some(now_ms());
            r.error = result.as_ref().err().map(ToString::to_string);
        }
    }

    /// What this rank would write now.
    pub fn snapshot(&self, reason: &str) -> Dump {
        let log = self.lock();
        Dump {
            rank: log.rank,
            world_size: log.world_size,
            host: host_name(),
            pid: std::process::id(),
            reason: reason.to_owned(),
            written_ms: now_ms(),
            calls: log.calls,
            records: log.records.iter().cloned().collect(),
        }
    }

    /// Writes the records to the dump folder (if set) and a short account to stderr, the first time it is called
    /// (later calls do nothing: what happened first is what matters). Returns the file written.
    pub fn dump(&self, reason: &str) -> Option<PathBuf> {
        if std::mem::replace(&mut self.lock().dumped, true) {
            return None;
        }
        let dump = self.snapshot(reason);
        let path = self.dump_path();
        let written = path.as_ref().map(|p| (p, write_atomically(p, &dump)));
        eprintln!("{}", account(&dump, 3));
        match written {
            Some((p, Ok(()))) => {
                eprintln!("hytrain: flight recorder of rank {} written to {}", dump.rank, p.display());
                Some(p.clone())
            }
            Some((p, Err(e))) => {
                eprintln!("hytrain: cannot write the flight recorder of rank {} to {}: {e}", dump.rank, p.display());
                None
            }
            None => None,
        }
    }
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for its length; gethostname NUL-terminates within it or truncates.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Writes `dump` as JSON beside `path`, then renames it over `path`: a reader sees the old file or the new one.
fn write_atomically(path: &Path, dump: &Dump) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let aside = path.with_extension(format!("json.{}.tmp", std::process::id()));
    let json = serde_json::to_vec_pretty(dump).map_err(std::io::Error::other)?;
    std::fs::write(&aside, json)?;
    std::fs::rename(&aside, path)
}

/// One line per record: number, kind, size, how long it took or has been running, and its error.
fn describe(record: &Record, at_ms: u64) -> String {
    let mib = record.bytes as f64 / (1 << 20) as f64;
    let head = format!("#{} {} of {mib:.2} MiB", record.seq, record.kind);
    match (record.ended_ms, &record.error) {
        (None, _) => {
            format!("{head}, running for {:.1} s", at_ms.saturating_sub(record.started_ms) as f64 / 1e3)
        }
        (Some(end), None) => format!("{head}, {} ms", end.saturating_sub(record.started_ms)),
        (Some(end), Some(e)) => format!("{head}, failed after {} ms: {e}", end.saturating_sub(record.started_ms)),
    }
}

/// A few lines for stderr: why, and the last `last` collectives.
fn account(dump: &Dump, last: usize) -> String {
    let mut out = format!(
        "hytrain: flight recorder of rank {} of {} ({}; {} collectives called): ",
        dump.rank, dump.world_size, dump.reason, dump.calls
    );
    let shown: Vec<String> = dump.records.iter().rev().take(last).rev().map(|r| describe(r, dump.written_ms)).collect();
    if shown.is_empty() {
        out.push_str("no collective called yet");
    } else {
        out.push_str(&shown.join("; "));
    }
    out
}

/// Reads every `rank-*.json` in `dir`. Fails naming the file that is not a dump.
pub fn read_dumps(dir: &Path) -> Result<Vec<Dump>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut dumps = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("rank-") && name.ends_with(".json")) {
            continue;
        }
        let path = entry.path();
        let text = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let dump: Dump = serde_json::from_slice(&text)
            .map_err(|e| format!("{} is not a hytrain flight recorder dump: {e}", path.display()))?;
        dumps.push(dump);
    }
    dumps.sort_by_key(|d| d.rank);
    Ok(dumps)
}

/// The ranks' dumps side by side: where each rank was, which ranks left none, and which rank was behind.
pub fn diagnose(dumps: &[Dump]) -> String {
    let Some(world) = dumps.iter().map(|d| d.world_size).max() else {
        return "no flight recorder dumps".into();
    };
    let mut lines = Vec::new();
    for rank in 0..world {
        let Some(d) = dumps.iter().find(|d| d.rank == rank) else {
            lines.push(format!("rank {rank}: no dump (killed, frozen, or stopped before it could write one)"));
            continue;
        };
        let at = match (d.running(), d.last_finished()) {
            (Some(r), _) => format!("in {}", describe(r, d.written_ms)),
            (None, Some(r)) => format!(
                "in no collective; the last, {}, ended {:.1} s before the dump",
                describe(r, d.written_ms),
                d.written_ms.saturating_sub(r.ended_ms.unwrap_or(d.written_ms)) as f64 / 1e3
            ),
            (None, None) => "had called no collective".into(),
        };
        lines.push(format!("rank {rank} on {} ({}): {at}", d.host, d.reason));
    }
    lines.push(verdict(dumps, world));
    lines.join("\n")
}

/// Who to look at: the rank the job's liveness watch declared lost, when a dump was written for that; else a rank
/// that left no dump (the others' positions then only show whom they were waiting for: in a ring, a rank waiting
/// on the silent one can sit one collective behind another that got its data); else the ranks whose position is
/// lowest, when not everyone is at the same place; else whether the ranks disagree on what the same collective is.
fn verdict(dumps: &[Dump], world: usize) -> String {
    let missing: Vec<usize> = (0..world).filter(|r| !dumps.iter().any(|d| d.rank == *r)).collect();
    // The rank most dumps name: a rank woken after it was declared lost may blame a survivor that stopped after it.
    let named: Vec<(usize, &String)> =
        dumps.iter().filter_map(|d| lost_rank(&d.reason).map(|r| (r, &d.reason))).collect();
    let votes = |rank: usize| named.iter().filter(|(r, _)| *r == rank).count();
    if let Some(&(lost, reason)) = named.iter().max_by_key(|(r, _)| (votes(*r), std::cmp::Reverse(*r))) {
        return format!(
            "the job lost rank {lost} ({reason}); the others' positions show where they were waiting for it{}",
            if missing.is_empty() { String::new() } else { format!("; no dump from rank {}", join(&missing)) }
        );
    }
    if !missing.is_empty() {
        return format!(
            "{} no dump: killed, frozen or cut off before it could write one, it is the one to look at (its log, its \
             node, its exit code); the others were waiting for it",
            subject(&missing, "left", "left")
        );
    }
    let lowest = dumps.iter().map(Dump::position).min().unwrap_or((0, false));
    let highest = dumps.iter().map(Dump::position).max().unwrap_or((0, false));
    let ranks_at =
        |at: (u64, bool)| -> Vec<usize> { dumps.iter().filter(|d| d.position() == at).map(|d| d.rank).collect() };
    if lowest < highest {
        let (behind, ahead) = (ranks_at(lowest), ranks_at(highest));
        let where_behind = match lowest {
            (seq, true) => format!("{} in collective #{seq}", subject(&behind, "is", "are")),
            (seq, false) => format!("{} not called collective #{seq}", subject(&behind, "has", "have")),
        };
        let where_ahead = match highest {
            (seq, true) => format!("{} in #{seq}", subject(&ahead, "waits", "wait")),
            // Not inside one: its last collective, #seq - 1, returned (or failed).
            (seq, false) => format!("{} past #{}", subject(&ahead, "is", "are"), seq.saturating_sub(1)),
        };
        return format!("behind: {where_behind}, while {where_ahead}");
    }
    let at = match lowest {
        (seq, true) => format!("in collective #{seq}"),
        (0, false) => "before its first collective".to_owned(),
        (seq, false) => format!("past collective #{}", seq - 1),
    };
    let lowest = lowest.0;
    let kinds: Vec<(usize, &str)> =
        dumps.iter().filter_map(|d| d.running().map(|r| (d.rank, r.kind.as_ref()))).collect();
    if kinds.windows(2).any(|w| w[0].1 != w[1].1) {
        let each: Vec<String> = kinds.iter().map(|(r, k)| format!("rank {r} {k}")).collect();
        return format!("the ranks disagree on collective #{lowest}: {}", each.join(", "));
    }
    format!("no rank is behind: every rank is {at}")
}

/// The rank a "lost rank N on HOST: ..." reason (the liveness verdict, as [`crate::LostRank`] says it) names.
fn lost_rank(reason: &str) -> Option<usize> {
    let rest = &reason[reason.find("lost rank ")? + "lost rank ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// "rank 1 has" or "ranks 0, 2 have".
fn subject(ranks: &[usize], one: &str, several: &str) -> String {
    match ranks {
        [r] => format!("rank {r} {one}"),
        _ => format!("ranks {} {several}", join(ranks)),
    }
}

fn join(ranks: &[usize]) -> String {
    ranks.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// A collective that records every call in a [`FlightRecorder`].
pub struct Recorded {
    inner: Box<dyn Collective>,
    recorder: FlightRecorder,
}

impl Recorded {
    /// Records every call on `inner` in `recorder`.
    pub fn new(inner: Box<dyn Collective>, recorder: FlightRecorder) -> Self {
        Recorded { inner, recorder }
    }

    fn record(
        &mut self,
        kind: &'static str,
        bytes: usize,
        call: impl FnOnce(&mut dyn Collective) -> Result<(), CommError>,
    ) -> Result<(), CommError> {
        let seq = self.recorder.begin(kind, bytes);
        let result = call(self.inner.as_mut());
        self.recorder.end(seq, &result);
        result
    }
}

impl Collective for Recorded {
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
        self.record("allreduce", buf.bytes(), |c| c.allreduce(buf, op))
    }

    fn broadcast(&mut self, bytes: &mut [u8], root: usize) -> Result<(), CommError> {
        self.record("broadcast", bytes.len(), |c| c.broadcast(bytes, root))
    }

    fn allgather(&mut self, input: &[u8], output: &mut [u8]) -> Result<(), CommError> {
        self.record("allgather", input.len(), |c| c.allgather(input, output))
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.record("barrier", 0, |c| c.barrier())
    }

    fn liveness(&self) -> Option<Liveness> {
        self.inner.liveness()
    }

    fn reduce_scatter(&mut self, buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError> {
        self.record("reduce_scatter", buf.bytes(), |c| c.reduce_scatter(buf, op))
    }

    fn allgather_blocks(&mut self, buf: Buffer<'_>) -> Result<(), CommError> {
        self.record("allgather_blocks", buf.bytes(), |c| c.allgather_blocks(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FailingCollective, Fault, InProcess};

    fn alone() -> Box<dyn Collective> {
        Box::new(InProcess::group(1, std::time::Duration::from_secs(5)).pop().unwrap())
    }

    fn dump(rank: usize, world: usize, records: &[(u64, &'static str, bool)], calls: u64) -> Dump {
        Dump {
            rank,
            world_size: world,
            host: format!("node-{rank}"),
            pid: 1,
            reason: "test".into(),
            written_ms: 10_000,
            calls,
            records: records
                .iter()
                .map(|&(seq, kind, ended)| Record {
                    seq,
                    kind: kind.into(),
                    bytes: 4 << 20,
                    started_ms: 1_000,
                    ended_ms: ended.then_some(1_500),
                    error: None,
                })
                .collect(),
        }
    }

    #[test]
    fn records_every_call_keeps_the_last_n_and_marks_failures() {
        let recorder = FlightRecorder::new(0, 1, 3);
        let mut c = Recorded::new(alone(), recorder.clone());
        let mut xs = vec![1.0f32; 8];
        c.allreduce(Buffer::F32(&mut xs), ReduceOp::Sum).unwrap();
        c.broadcast(&mut [0u8; 5], 0).unwrap();
        c.barrier().unwrap();
        c.reduce_scatter(Buffer::F32(&mut xs), ReduceOp::Avg).unwrap();
        let d = recorder.snapshot("now");
        assert_eq!(d.calls, 4);
        let kinds: Vec<(u64, &str, u64)> = d.records.iter().map(|r| (r.seq, r.kind.as_ref(), r.bytes)).collect();
        assert_eq!(kinds, [(1, "broadcast", 5), (2, "barrier", 0), (3, "reduce_scatter", 32)], "the last three");
        assert!(d.records.iter().all(|r| r.ended_ms.is_some() && r.error.is_none()));

        let recorder = FlightRecorder::new(0, 1, 8);
        let failing = FailingCollective::new(alone(), 0, Fault::RankLost { rank: 1 });
        let mut c = Recorded::new(Box::new(failing), recorder.clone());
        assert!(c.allreduce(Buffer::F32(&mut xs), ReduceOp::Sum).is_err());
        let d = recorder.snapshot("failed");
        assert!(d.records[0].error.as_deref().is_some_and(|e| e.contains("rank 1")), "{d:?}");
        assert_eq!(d.running(), None);
    }

    #[test]
    fn a_dump_round_trips_and_replaces_the_previous_one_whole() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(FlightRecorder::new(2, 4, 4).dump("no folder"), None, "without a folder only stderr gets it");
        let recorder = FlightRecorder::new(2, 4, 4);
        recorder.set_dump_dir(Some(dir.path().join("flight-recorder")));
        let mut c = Recorded::new(alone(), recorder.clone());
        c.barrier().unwrap();
        c.barrier().unwrap();
        let first = recorder.dump("first").unwrap();
        assert_eq!(first.file_name().unwrap(), "rank-2.json");
        c.barrier().unwrap();
        assert_eq!(recorder.dump("second"), None, "only the first dump is written");
        let read = read_dumps(first.parent().unwrap()).unwrap();
        assert_eq!(read.len(), 1, "no temporary file is left beside it");
        assert_eq!((read[0].rank, read[0].world_size, read[0].calls), (2, 4, 2));
        assert_eq!(read[0].reason, "first");
        std::fs::write(first.parent().unwrap().join("rank-3.json"), "{").unwrap();
        let e = read_dumps(first.parent().unwrap()).unwrap_err();
        assert!(e.contains("rank-3.json") && e.contains("not a hytrain flight recorder dump"), "{e}");
    }

    #[test]
    fn after_a_new_round_a_failure_is_dumped_again_as_the_new_rank() {
        let dir = tempfile::tempdir().unwrap();
        let recorder = FlightRecorder::new(2, 4, 4);
        recorder.set_dump_dir(Some(dir.path().to_path_buf()));
        Recorded::new(alone(), recorder.clone()).barrier().unwrap();
        assert_eq!(recorder.dump("lost rank 3").unwrap().file_name().unwrap(), "rank-2.json");
        recorder.new_round(0, 3);
        let second = recorder.dump("lost rank 1").expect("the new round's first failure is dumped");
        assert_eq!(second.file_name().unwrap(), "rank-0.json");
        let read = read_dumps(dir.path()).unwrap();
        let mut seen: Vec<(usize, usize, String)> =
            read.iter().map(|d| (d.rank, d.world_size, d.reason.clone())).collect();
        seen.sort();
        assert_eq!(seen, [(0, 3, "lost rank 1".to_string()), (2, 4, "lost rank 3".to_string())]);
    }

    #[test]
    fn the_rank_that_is_behind_is_named() {
        // Ranks 0 and 2 wait in allreduce #41; rank 1 finished #40 and never called #41.
        let dumps = [
            dump(0, 3, &[(40, "allreduce", true), (41, "allreduce", false)], 42),
            dump(1, 3, &[(39, "allreduce", true), (40, "allreduce", true)], 41),
            dump(2, 3, &[(40, "allreduce", true), (41, "allreduce", false)], 42),
        ];
        let text = diagnose(&dumps);
        assert!(text.contains("behind: rank 1 has not called collective #41, while ranks 0, 2 wait in #41"), "{text}");
        assert!(text.contains("rank 0 on node-0 (test): in #41 allreduce of 4.00 MiB, running for 9.0 s"), "{text}");
        assert!(text.contains("rank 1 on node-1 (test): in no collective"), "{text}");
        // A rank still in an older collective is behind one further on.
        let dumps = [dump(0, 2, &[(5, "allreduce", false)], 6), dump(1, 2, &[(9, "barrier", false)], 10)];
        assert!(diagnose(&dumps).contains("behind: rank 0 is in collective #5, while rank 1 waits in #9"));
        // Ranks whose collective #20 failed (the loss) are past it; the stopped rank never called it.
        let dumps = [
            dump(0, 3, &[(20, "allreduce", true)], 21),
            dump(1, 3, &[(19, "allreduce", true)], 20),
            dump(2, 3, &[(20, "allreduce", true)], 21),
        ];
        let text = diagnose(&dumps);
        assert!(text.contains("behind: rank 1 has not called collective #20, while ranks 0, 2 are past #20"), "{text}");
    }

    #[test]
    fn missing_dumps_and_disagreeing_collectives_are_named() {
        let dumps = [dump(0, 3, &[(7, "allreduce", false)], 8), dump(2, 3, &[(7, "allreduce", false)], 8)];
        let text = diagnose(&dumps);
        assert!(text.contains("rank 1: no dump"), "{text}");
        assert!(text.contains("rank 1 left no dump: killed, frozen or cut off"), "{text}");
        // Waiting on the silent rank 1, rank 2 may sit a collective behind rank 0: rank 1 is still the one named.
        let dumps = [dump(0, 3, &[(20, "allreduce", false)], 21), dump(2, 3, &[(19, "allreduce", false)], 20)];
        let text = diagnose(&dumps);
        assert!(text.contains("rank 1 left no dump") && !text.contains("behind"), "{text}");
        // A rank the liveness watch declared lost is named whatever the positions say.
        let mut dumps = dumps.to_vec();
        dumps[0].reason = "lost rank 1 on 10.0.0.7: no heartbeat for 30 s, the peer timeout".into();
        let text = diagnose(&dumps);
        assert!(
            text.ends_with(
                "the job lost rank 1 (lost rank 1 on 10.0.0.7: no heartbeat for 30 s, the peer \
             timeout); the others' positions show where they were waiting for it; no dump from rank 1"
            ),
            "{text}"
        );
        assert_eq!(lost_rank("failed: collective allreduce: lost rank 12 on h: gone"), Some(12));
        // Stopped, then woken before its SIGKILL, rank 0 blames rank 2, which stopped because of it; the others
        // name rank 0.
        let mut dumps = [dump(0, 3, &[], 8), dump(1, 3, &[], 8), dump(2, 3, &[], 8)];
        dumps[0].reason = "lost rank 2 on h: it stopped on an error of its own".into();
        dumps[1].reason = "lost rank 0 on h: the store sent nothing for 5 s".into();
        dumps[2].reason = dumps[1].reason.clone();
        assert!(diagnose(&dumps).contains("the job lost rank 0 (lost rank 0 on h"), "{}", diagnose(&dumps));
        assert_eq!(lost_rank("SIGTERM received"), None);
        let dumps = [dump(0, 2, &[(7, "allreduce", false)], 8), dump(1, 2, &[(7, "broadcast", false)], 8)];
        assert!(diagnose(&dumps).contains("disagree on collective #7: rank 0 allreduce, rank 1 broadcast"));
        let dumps = [dump(0, 2, &[(7, "barrier", false)], 8), dump(1, 2, &[(7, "barrier", false)], 8)];
        assert!(diagnose(&dumps).contains("no rank is behind: every rank is in collective #7"));
        assert_eq!(diagnose(&[]), "no flight recorder dumps");
    }
}
