//! The shared-memory segment of one node: a file in /dev/shm created by the node's local rank 0, mapped by every
//! local rank and unlinked as soon as all of them have mapped it.
//!
//! Layout: a page of job-wide words (magic, geometry, the abort word and the first failure's message), one
//! 256-byte line per local rank (its barrier epoch, pid, progress counter and the descriptions of its last two
//! collectives), then two banks of `local_world_size` slots each. Collectives alternate banks so that a rank can
//! fill the next bank while slower ranks still read the last one.

use std::ffi::CString;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

const MAGIC: u64 = u64::from_le_bytes(*b"HYTSHM01");
const PAGE: usize = 4096;
const LINE: usize = 256;
const MESSAGE_MAX: usize = 2048;

const OFF_MAGIC: usize = 0;
const OFF_LOCAL: usize = 8;
const OFF_SLOT: usize = 16;
const OFF_NONCE: usize = 24;
const OFF_ABORT: usize = 64;
const OFF_MSG_READY: usize = 72;
const OFF_MSG_LEN: usize = 80;
const OFF_MSG: usize = 128;

const LINE_EPOCH: usize = 0;
const LINE_PID: usize = 8;
const LINE_PROGRESS: usize = 16;
const LINE_DESC: usize = 64;

/// A mapped segment. Dropping it unmaps it (and unlinks the file if this process created it and has not yet).
pub(crate) struct Segment {
    base: *mut u8,
    size: usize,
    local: usize,
    slot_bytes: usize,
    /// Set while this process created the file and has not unlinked it yet.
    path: Option<CString>,
}

// SAFETY: the mapping lives as long as the Segment; every shared word is accessed through atomics and the data
// slots only in the phases the collectives' barriers assign to one writer.
unsafe impl Send for Segment {}

fn layout(local: usize, slot_bytes: usize) -> (usize, usize) {
    let data = (PAGE + local * LINE).next_multiple_of(PAGE);
    (data, data + 2 * local * slot_bytes)
}

fn errno(what: &str, path: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what} {path}: {e}"))
}

impl Segment {
    /// Creates the file `path` (which must not exist), reserves its memory and maps it; `nonce` is written into
    /// it so that attaching ranks can check they opened the segment the store named.
    pub(crate) fn create(path: &str, local: usize, slot_bytes: usize, nonce: u64) -> io::Result<Segment> {
        let (_, size) = layout(local, slot_bytes);
        let c = CString::new(path).map_err(|_| io::Error::other("NUL in segment path"))?;
        // SAFETY: plain system calls on a path we own; every result is checked.
        unsafe {
            let fd = libc::open(
                c.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600,
            );
            if fd < 0 {
                return Err(errno("cannot create", path));
            }
            // Reserve the pages now: on a full /dev/shm a plain ftruncate succeeds and the first write to a
            // missing page kills the process with SIGBUS instead of returning an error.
            let r = libc::posix_fallocate(fd, 0, size as libc::off_t);
            if r != 0 {
                libc::close(fd);
                libc::unlink(c.as_ptr());
                return Err(io::Error::other(format!(
                    "cannot reserve {size} bytes in {path}: {} (is /dev/shm too small?)",
                    io::Error::from_raw_os_error(r)
                )));
            }
            let seg = Segment::map(fd, size, local, slot_bytes, path);
            libc::close(fd);
            let mut seg = seg.inspect_err(|_| {
                libc::unlink(c.as_ptr());
            })?;
            seg.path = Some(c);
            seg.word(OFF_LOCAL).store(local as u64, Ordering::Relaxed);
            seg.word(OFF_SLOT).store(slot_bytes as u64, Ordering::Relaxed);
            seg.word(OFF_NONCE).store(nonce, Ordering::Relaxed);
            seg.word(OFF_MAGIC).store(MAGIC, Ordering::Release);
            Ok(seg)
        }
    }

    /// Maps the segment local rank 0 created at `path` and checks it is the one with `nonce` and this geometry.
    pub(crate) fn attach(path: &str, local: usize, slot_bytes: usize, nonce: u64) -> io::Result<Segment> {
        let (_, size) = layout(local, slot_bytes);
        let c = CString::new(path).map_err(|_| io::Error::other("NUL in segment path"))?;
        // SAFETY: as in `create`.
        let seg = unsafe {
            let fd = libc::open(c.as_ptr(), libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(errno("cannot open", path));
            }
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd, &mut st) != 0 || st.st_size as usize != size {
                libc::close(fd);
                return Err(io::Error::other(format!("{path} is not the expected {size}-byte segment")));
            }
            let seg = Segment::map(fd, size, local, slot_bytes, path);
            libc::close(fd);
            seg?
        };
        let ok = seg.word(OFF_MAGIC).load(Ordering::Acquire) == MAGIC
            && seg.word(OFF_LOCAL).load(Ordering::Relaxed) == local as u64
            && seg.word(OFF_SLOT).load(Ordering::Relaxed) == slot_bytes as u64
            && seg.word(OFF_NONCE).load(Ordering::Relaxed) == nonce;
        if !ok {
            return Err(io::Error::other(format!("{path} does not hold this node's segment (wrong header)")));
        }
        Ok(seg)
    }

    /// # Safety
    /// `fd` must be an open descriptor of a file of at least `size` bytes.
    unsafe fn map(fd: i32, size: usize, local: usize, slot_bytes: usize, path: &str) -> io::Result<Segment> {
        let p = libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0);
        if p == libc::MAP_FAILED {
            return Err(errno("cannot map", path));
        }
        Ok(Segment { base: p as *mut u8, size, local, slot_bytes, path: None })
    }

    /// Removes the file name; the mapping stays valid for every process that has it.
    pub(crate) fn unlink(&mut self) {
        if let Some(c) = self.path.take() {
            // SAFETY: a path we created.
            unsafe {
                libc::unlink(c.as_ptr());
            }
        }
    }

    fn word(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset.is_multiple_of(8) && offset + 8 <= self.size);
        // SAFETY: aligned (the mapping is page-aligned), inside the mapping, and only ever accessed atomically.
        unsafe { &*(self.base.add(offset) as *const AtomicU64) }
    }

    fn line(&self, rank: usize, field: usize) -> &AtomicU64 {
        self.word(PAGE + rank * LINE + field)
    }

    /// Local rank `r`'s barrier epoch.
    pub(crate) fn epoch(&self, r: usize) -> &AtomicU64 {
        self.line(r, LINE_EPOCH)
    }

    /// Local rank `r`'s process id, for liveness checks.
    pub(crate) fn pid(&self, r: usize) -> &AtomicU64 {
        self.line(r, LINE_PID)
    }

    /// Local rank `r`'s progress counter (bumped by a leader between pieces of its inter-node allreduce).
    pub(crate) fn progress(&self, r: usize) -> &AtomicU64 {
        self.line(r, LINE_PROGRESS)
    }

    /// Word `i` (0..3) of local rank `r`'s description of its collective number `seq`.
    pub(crate) fn desc(&self, r: usize, seq: u64, i: usize) -> &AtomicU64 {
        self.line(r, LINE_DESC + ((seq % 2) as usize * 3 + i) * 8)
    }

    /// Bytes per slot.
    pub(crate) fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Start of bank `bank` (0 or 1): `local_world_size` slots of `slot_bytes`, contiguous.
    pub(crate) fn bank(&self, bank: usize) -> *mut u8 {
        let (data, _) = layout(self.local, self.slot_bytes);
        // SAFETY: inside the mapping.
        unsafe { self.base.add(data + bank * self.local * self.slot_bytes) }
    }

    /// Records the first failure of the node; returns false when another rank recorded one first.
    pub(crate) fn record_failure(&self, local_rank: usize, message: &str) -> bool {
        if self.word(OFF_ABORT).compare_exchange(0, local_rank as u64 + 1, Ordering::AcqRel, Ordering::Acquire).is_err()
        {
            return false;
        }
        let bytes = &message.as_bytes()[..message.len().min(MESSAGE_MAX)];
        // SAFETY: the message area is inside the first page and only the winner of the exchange above writes it.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(OFF_MSG), bytes.len());
        }
        self.word(OFF_MSG_LEN).store(bytes.len() as u64, Ordering::Relaxed);
        self.word(OFF_MSG_READY).store(1, Ordering::Release);
        true
    }

    /// The local rank that recorded the node's first failure, if any.
    pub(crate) fn failed_rank(&self) -> Option<usize> {
        match self.word(OFF_ABORT).load(Ordering::Acquire) {
            0 => None,
            r => Some(r as usize - 1),
        }
    }

    /// The recorded failure's message once its writer has finished it.
    pub(crate) fn failure_message(&self) -> Option<String> {
        if self.word(OFF_MSG_READY).load(Ordering::Acquire) == 0 {
            return None;
        }
        let len = (self.word(OFF_MSG_LEN).load(Ordering::Relaxed) as usize).min(MESSAGE_MAX);
        // SAFETY: written completely before MSG_READY was released.
        let bytes = unsafe { std::slice::from_raw_parts(self.base.add(OFF_MSG), len) };
        Some(String::from_utf8_lossy(bytes).into_owned())
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.unlink();
        // SAFETY: our own mapping, no longer referenced (borrows of it end with the Segment).
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.size);
        }
    }
}

/// Sleeps until `word` may have changed from `seen`, a wake-up from [`wake`] or `timeout`, whichever is first.
///
/// A futex on the word's low half (little-endian hosts only, which lib.rs enforces): waiting ranks leave the CPU
/// to the rank they wait for, which matters when ranks outnumber free cores.
pub(crate) fn wait_while(word: &AtomicU64, seen: u64, timeout: std::time::Duration) {
    let ts =
        libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
    // SAFETY: the address is a live, aligned word of the shared mapping; FUTEX_WAIT only reads it. Not the
    // PRIVATE variant: the waker is another process.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr() as *const u32,
            libc::FUTEX_WAIT,
            seen as u32,
            &ts as *const libc::timespec,
        );
    }
}

/// Wakes every rank sleeping in [`wait_while`] on `word`.
pub(crate) fn wake(word: &AtomicU64) {
    // SAFETY: as in `wait_while`.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr() as *const u32, libc::FUTEX_WAKE, i32::MAX);
    }
}

/// Whether process `pid` is gone: it no longer exists, or it is a zombie its parent has not reaped yet.
pub(crate) fn process_gone(pid: u64) -> bool {
    if pid == 0 || pid > i32::MAX as u64 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid as i32, 0) };
    if r != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain spaces or parentheses.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attaching_rank_refuses_a_segment_with_another_nonce_or_geometry() {
        let path = format!("/dev/shm/hytrain-test-{}-{}", std::process::id(), fastrand::u64(..));
        let mut seg = Segment::create(&path, 2, 4096, 7).unwrap();
        assert!(Segment::attach(&path, 2, 4096, 7).is_ok());
        let e = Segment::attach(&path, 2, 4096, 8).err().unwrap().to_string();
        assert!(e.contains("wrong header"), "{e}");
        let e = Segment::attach(&path, 3, 4096, 7).err().unwrap().to_string();
        assert!(e.contains("not the expected"), "{e}");
        seg.unlink();
        assert!(!std::path::Path::new(&path).exists());
        let e = Segment::attach(&path, 2, 4096, 7).err().unwrap().to_string();
        assert!(e.contains("cannot open"), "{e}");
    }

    #[test]
    fn the_first_recorded_failure_wins() {
        let path = format!("/dev/shm/hytrain-test-{}-{}", std::process::id(), fastrand::u64(..));
        let seg = Segment::create(&path, 2, 4096, 1).unwrap();
        assert_eq!(seg.failed_rank(), None);
        assert!(seg.record_failure(1, "first"));
        assert!(!seg.record_failure(0, "second"));
        assert_eq!(seg.failed_rank(), Some(1));
        assert_eq!(seg.failure_message().as_deref(), Some("first"));
    }

    #[test]
    fn a_running_process_is_not_gone_and_a_reaped_one_is() {
        assert!(!process_gone(std::process::id() as u64));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as u64;
        child.wait().unwrap();
        assert!(process_gone(pid));
    }
}
