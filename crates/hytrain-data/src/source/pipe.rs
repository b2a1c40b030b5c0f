//! SageMaker Pipe mode: the channel arrives as a stream through FIFOs `<channel>_0`, `<channel>_1`, ..., one per
//! pass over the data, each to be opened in order and read once.
//!
//! With `RecordWrapperType: None` the stream is the channel's S3 objects concatenated in key order. For WebDataset
//! tar shards that is a run of tar archives, which [`Pipe`] splits back into the shards (see `tar_split`) and
//! names `pipe-000000.tar`, `pipe-000001.tar`, ... in arrival order. The shards' bytes equal the S3 objects', so a
//! loader that orders shards by their position in the list (not by name) reads the same data as from the folder or
//! the S3 prefix, provided the shard keys sort in the order S3 lists them (bytewise; zero-padded numbers do).
//! Do not set a `ShuffleConfig` on a Pipe channel: the loader shuffles, deterministically in (seed, epoch).
//!
//! A pass's shards are spooled to a temporary folder on disk (not kept in memory: a channel can be far larger than
//! RAM), because the sampler visits shards in a shuffled order while the pipe delivers them in key order. A reader
//! thread spools the pass while training runs: a shard can be read as soon as it is complete, so training starts on
//! the first shards it needs while the rest of the pass arrives. Only the first pass a process reads is waited for
//! whole, by [`Source::list`]: the sampler needs every shard's sample count before the first batch, and nothing
//! but the stream itself tells them, unless [`PipeOptions::shard_sizes`] says what the channel holds (from the
//! dataset's index, whose counts then go to the dataset): then the first pass streams too. Every pass must
//! deliver the same shards (same count, same sizes; a difference is an error naming the shard), since the epoch's
//! sample order was planned from the first pass or the index.
//! Memory use is one read buffer; disk use is one pass of data, capped by [`PipeOptions::max_spool_bytes`]. The
//! previous pass's spool is deleted when the next FIFO is opened, after its reader has drained it (SageMaker
//! opens the next FIFO only once the previous one was read to its end).

use std::fs;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::tar_split::{ShardSink, SplitError, TarSplitter};
use super::{show, Object, Source};
use crate::Error;

/// Settings for a [`Pipe`] source.
#[derive(Debug, Clone)]
pub struct PipeOptions {
    /// How long to wait for the next FIFO to appear (SageMaker creates `<channel>_<n+1>` after `_n` was read).
    pub open_timeout: Duration,
    /// How long the stream may deliver nothing (no writer yet, or a stalled one) before the read fails.
    pub stall_timeout: Duration,
    /// Where to spool an epoch's shards; the system's temporary folder when `None`. On SageMaker choose a folder
    /// on the training volume (e.g. under /opt/ml/output/intermediate or /tmp when the volume is large enough).
    pub spool_dir: Option<PathBuf>,
    /// The most bytes one epoch may spool; `None` for no limit but the disk's.
    pub max_spool_bytes: Option<u64>,
    /// The sizes of the channel's shards in delivery order, when known beforehand (from the dataset's index):
    /// [`Source::list`] then answers at once and every pass, the first included, is checked against them.
    pub shard_sizes: Option<Vec<u64>>,
}

impl Default for PipeOptions {
    fn default() -> Self {
        Self {
            open_timeout: Duration::from_secs(600),
            stall_timeout: Duration::from_secs(600),
            spool_dir: None,
            max_spool_bytes: None,
            shard_sizes: None,
        }
    }
}

/// How often a reader waiting for data checks whether its pass is still wanted.
const STOP_POLL: Duration = Duration::from_millis(100);

/// One pass over the channel (one FIFO), spooled by its reader thread.
#[derive(Debug)]
struct Pass {
    /// The FIFO, for messages.
    fifo: PathBuf,
    spool: tempfile::TempDir,
    progress: Mutex<Progress>,
    arrived: Condvar,
    /// Set when the pass is no longer wanted (the source is dropped): the reader stops.
    stop: AtomicBool,
}

/// What a pass's reader has delivered so far.
#[derive(Debug, Default)]
struct Progress {
    /// The shards complete in the spool, in arrival order.
    shards: Vec<Object>,
    /// `None` while the reader runs; then whether the whole pass arrived, or why not.
    end: Option<Result<(), String>>,
}

impl Pass {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        // Every update is one push or one assignment, so a poisoned lock is still consistent.
        self.progress.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until `ready` holds or the reader has ended.
    fn wait_until(&self, ready: impl Fn(&Progress) -> bool) -> MutexGuard<'_, Progress> {
        let mut progress = self.lock();
        while progress.end.is_none() && !ready(&progress) {
            progress = self.arrived.wait(progress).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        progress
    }

    /// Waits for the whole pass: its shards, or why it did not arrive.
    fn complete(&self) -> Result<Vec<Object>, Error> {
        let progress = self.wait_until(|_| false);
        match &progress.end {
            Some(Err(reason)) => Err(Error::Path { path: self.fifo.clone(), reason: reason.clone() }),
            _ => Ok(progress.shards.clone()),
        }
    }

    fn arrive(&self, shard: Object) {
        self.lock().shards.push(shard);
        self.arrived.notify_all();
    }

    fn end(&self, end: Result<(), String>) {
        self.lock().end.get_or_insert(end);
        self.arrived.notify_all();
    }
}

/// The pass being read (or read last) and what the channel delivers.
#[derive(Debug, Default)]
struct State {
    /// The next FIFO's number.
    next_fifo: u64,
    /// The epoch the current pass was requested for; `None` when it was opened implicitly by `list` or `read`.
    epoch: Option<u64>,
    /// The current pass and its reader thread.
    pass: Option<(Arc<Pass>, JoinHandle<()>)>,
    /// What every pass must deliver: the shards of the first complete pass, or those [`PipeOptions::shard_sizes`]
    /// gives.
    shards: Option<Vec<Object>>,
}

/// A SageMaker Pipe mode channel of tar shards (`pipe:/opt/ml/input/data/training` reads `training_0`, ...).
///
/// [`Source::begin_epoch`] opens the next FIFO in order, whatever the epoch's number: a restarted SageMaker job
/// starts its FIFOs at `_0` again while a resumed run continues at a later epoch, and every pass delivers the same
/// data. `list` or `read` before any `begin_epoch` open the first FIFO, and the next `begin_epoch` adopts it.
/// [`Source::read`] of a shard that has not arrived yet waits for it (up to the stall timeout of the stream).
#[derive(Debug)]
pub struct Pipe {
    base: PathBuf,
    opts: PipeOptions,
    sharded_by_host: bool,
    state: Mutex<State>,
}

impl Pipe {
    /// The channel whose FIFOs are `<base>_0`, `<base>_1`, ... (nothing is opened yet).
    pub fn new(base: impl AsRef<Path>, opts: &PipeOptions) -> Self {
        let shards = opts
            .shard_sizes
            .as_ref()
            .map(|sizes| sizes.iter().enumerate().map(|(i, &size)| Object { name: shard_name(i), size }).collect());
        let state = State { shards, ..State::default() };
        Self { base: base.as_ref().to_path_buf(), opts: opts.clone(), sharded_by_host: false, state: Mutex::new(state) }
    }

    /// The name of the `index`th shard of a pass (`pipe-000000.tar`, ...): the channel carries no names.
    pub fn shard_name(index: usize) -> String {
        shard_name(index)
    }

    /// Marks this channel as holding only this host's part of the dataset (a `ShardedByS3Key` channel).
    pub fn with_sharded_by_host(mut self, sharded: bool) -> Self {
        self.sharded_by_host = sharded;
        self
    }

    fn fifo_path(&self, n: u64) -> PathBuf {
        let mut name = self.base.clone().into_os_string();
        name.push(format!("_{n}"));
        PathBuf::from(name)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent (the pass is taken before the next is opened).
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The current pass, opening the first FIFO if none is open.
    fn current(&self, state: &mut State) -> Result<Arc<Pass>, Error> {
        match &state.pass {
            Some((pass, _)) => Ok(Arc::clone(pass)),
            None => self.open_next(state),
        }
    }

    /// Lets the current pass's reader drain its FIFO, then opens the next FIFO and starts its reader.
    fn open_next(&self, state: &mut State) -> Result<Arc<Pass>, Error> {
        // SageMaker creates the next FIFO only after the previous one was read to its end, and the previous
        // spool is deleted (when `previous` is dropped) before the next one fills.
        if let Some((previous, reader)) = state.pass.take() {
            // The reader catches its own panics and records them as the pass's end.
            let _ = reader.join();
            let shards = previous.complete()?;
            state.shards.get_or_insert(shards);
        }
        let n = state.next_fifo;
        state.next_fifo += 1;
        let path = self.fifo_path(n);
        let file = self.open_fifo(&path)?;
        let spool = match &self.opts.spool_dir {
            Some(dir) => tempfile::Builder::new().prefix("hytrain-pipe-").tempdir_in(dir),
            None => tempfile::Builder::new().prefix("hytrain-pipe-").tempdir(),
        }
        .map_err(|io| Error::Path {
            path: self.opts.spool_dir.clone().unwrap_or_else(std::env::temp_dir),
            reason: format!("cannot create a spool folder for the Pipe channel: {io}; set the Pipe spool folder"),
        })?;
        let pass = Arc::new(Pass {
            fifo: path.clone(),
            spool,
            progress: Mutex::default(),
            arrived: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let reader = std::thread::Builder::new()
            .name(format!("hytrain-pipe-{n}"))
            .spawn({
                let (pass, opts, expected) = (Arc::clone(&pass), self.opts.clone(), state.shards.clone());
                move || {
                    let end = catch_unwind(AssertUnwindSafe(|| read_pass(&pass, file, &opts, expected.as_deref())))
                        .unwrap_or_else(|_| Err("the Pipe reader thread panicked".to_owned()));
                    pass.end(end);
                }
            })
            .map_err(|io| Error::Path { path, reason: format!("cannot start the Pipe reader thread: {io}") })?;
        state.pass = Some((Arc::clone(&pass), reader));
        Ok(pass)
    }

    /// Waits until the FIFO exists, then opens it without blocking on a writer (the stall timeout covers that).
    fn open_fifo(&self, path: &Path) -> Result<fs::File, Error> {
        let deadline = Instant::now() + self.opts.open_timeout;
        let mut delay = Duration::from_millis(20);
        loop {
            match fs::metadata(path) {
                Ok(meta) => {
                    if !(meta.file_type().is_fifo() || meta.is_file()) {
                        return Err(Error::Path {
                            path: path.to_path_buf(),
                            reason: "is neither a FIFO nor a file; pipe: expects SageMaker Pipe mode FIFOs".to_owned(),
                        });
                    }
                    return fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(path)
                        .map_err(|io| Error::Path { path: path.to_path_buf(), reason: format!("cannot open: {io}") });
                }
                Err(io) if io.kind() == std::io::ErrorKind::NotFound => {}
                Err(io) => {
                    return Err(Error::Path { path: path.to_path_buf(), reason: format!("cannot stat: {io}") });
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Path {
                    path: path.to_path_buf(),
                    reason: format!(
                        "the SageMaker Pipe FIFO did not appear within {} s; check that the channel's \
                         TrainingInputMode is Pipe and that its name matches, or use File/FastFile mode",
                        self.opts.open_timeout.as_secs_f64()
                    ),
                });
            }
            std::thread::sleep(delay.min(deadline - now));
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }
}

/// Reads one pass from `file` into the pass's spool, shard by shard. `expected` is what the pass must deliver (the
/// first pass's shards, or those the index gave).
fn read_pass(pass: &Pass, file: fs::File, opts: &PipeOptions, expected: Option<&[Object]>) -> Result<(), String> {
    let started = Instant::now();
    let mut sink = Spool::new(pass, opts.max_spool_bytes, expected);
    let mut splitter = TarSplitter::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let got = read_with_stall_timeout(&file, &mut buf, opts.stall_timeout, &pass.stop)?;
        if got == 0 {
            break;
        }
        total += got as u64;
        splitter.push(&buf[..got], &mut sink).map_err(|e| sink.explain(e))?;
    }
    splitter.finish(&mut sink).map_err(|e| sink.explain(e))?;
    if let Some(expected) = expected.filter(|e| e.len() != sink.shards) {
        return Err(different(format!(
            "this pass delivered {} shards where {} were expected",
            sink.shards,
            expected.len()
        )));
    }
    tracing::info!(
        fifo = %pass.fifo.display(), shards = sink.shards, bytes = total,
        seconds = started.elapsed().as_secs_f64(), "read one pass of the Pipe channel"
    );
    Ok(())
}

/// The message for a pass that differs from what was expected (the first pass, or the dataset's index).
fn different(what: String) -> String {
    format!(
        "{what}; every pass of a Pipe channel must deliver the same shards, since the epoch's order was planned \
         from the first pass or the index given (do not change the channel's S3 objects while the job runs, set no \
         ShuffleConfig, and give the index of the data the channel holds)"
    )
}

/// Reads what is available, waiting up to `stall` for data. Returns 0 at the end of the stream, and an error once
/// `stop` is set.
fn read_with_stall_timeout(
    file: &fs::File,
    buf: &mut [u8],
    stall: Duration,
    stop: &AtomicBool,
) -> Result<usize, String> {
    let deadline = Instant::now() + stall;
    loop {
        match (&*file).read(buf) {
            Ok(n) if n > 0 => return Ok(n),
            Ok(_) => {
                // With O_NONBLOCK, 0 means "no writer now": the end once a writer has come and gone, but also the
                // state before the writer opens. poll() tells them apart on Linux: POLLHUP is only reported after a
                // writer has connected.
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read failed: {e}")),
        }
        if stop.load(Ordering::Relaxed) {
            return Err("the Pipe channel was closed while its pass was being read".to_owned());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no data from the Pipe FIFO for {} s (no writer, or a stalled one); SageMaker may be failing to \
                 read the channel from S3: check the job's logs",
                stall.as_secs_f64()
            ));
        }
        let mut pfd = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let wait_ms = i32::try_from(left.min(STOP_POLL).as_millis()).unwrap_or(i32::MAX).max(1);
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, wait_ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(format!("poll failed: {e}"));
            }
            continue;
        }
        if rc > 0 && pfd.revents & libc::POLLHUP != 0 && pfd.revents & libc::POLLIN == 0 {
            return Ok(0);
        }
        if rc > 0 && pfd.revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return Err("the FIFO reported an error".to_owned());
        }
        // A regular file (a captured stream) is always readable; its 0-byte read above is the end.
        if rc > 0 && pfd.revents & libc::POLLIN != 0 && file.metadata().is_ok_and(|m| m.is_file()) {
            return Ok(0);
        }
    }
}

/// Writes each shard to its own file in the pass's spool folder, and announces it once complete.
struct Spool<'a> {
    pass: &'a Pass,
    limit: Option<u64>,
    /// The shards this pass must deliver (the first pass's, or the index's).
    expected: Option<&'a [Object]>,
    written: u64,
    current: Option<(BufWriter<fs::File>, String, u64)>,
    /// Shards complete.
    shards: usize,
    /// How this pass differs from the first, once it does.
    mismatch: Option<String>,
}

impl<'a> Spool<'a> {
    fn new(pass: &'a Pass, limit: Option<u64>, expected: Option<&'a [Object]>) -> Self {
        Self { pass, limit, expected, written: 0, current: None, shards: 0, mismatch: None }
    }

    fn explain(&mut self, err: SplitError) -> String {
        if let Some(mismatch) = self.mismatch.take() {
            return mismatch;
        }
        match err {
            SplitError::Format(msg) => msg,
            SplitError::Sink(io) => format!(
                "cannot spool the Pipe channel to {}: {io}; point the Pipe spool folder at a larger volume",
                self.pass.spool.path().display()
            ),
        }
    }

    /// Records how this pass differs from the first and fails the sink.
    fn differs(&mut self, what: String) -> std::io::Error {
        self.mismatch = Some(different(what));
        std::io::Error::other("this pass differs from the first")
    }
}

/// The name of the `index`th shard of a Pipe channel.
fn shard_name(index: usize) -> String {
    format!("pipe-{index:06}.tar")
}

/// The position of the shard named `name` (the inverse of [`shard_name`]).
fn shard_index(name: &str) -> Option<usize> {
    let index = name.strip_prefix("pipe-")?.strip_suffix(".tar")?.parse().ok()?;
    (shard_name(index) == name).then_some(index)
}

impl ShardSink for Spool<'_> {
    fn start(&mut self, index: usize) -> std::io::Result<()> {
        if let Some(expected) = self.expected.filter(|e| index >= e.len()) {
            return Err(
                self.differs(format!("this pass delivers more than the first pass's {} shards", expected.len()))
            );
        }
        let name = shard_name(index);
        let file = fs::File::create(self.pass.spool.path().join(&name))?;
        self.current = Some((BufWriter::with_capacity(1 << 20, file), name, 0));
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.written += bytes.len() as u64;
        if let Some(limit) = self.limit.filter(|&limit| self.written > limit) {
            return Err(std::io::Error::other(format!(
                "one pass of the channel exceeds the spool limit of {limit} bytes"
            )));
        }
        let (file, _, size) = self.current.as_mut().ok_or_else(|| std::io::Error::other("no shard open"))?;
        *size += bytes.len() as u64;
        file.write_all(bytes)
    }

    fn end(&mut self) -> std::io::Result<()> {
        let Some((file, name, size)) = self.current.take() else {
            return Ok(());
        };
        file.into_inner().map_err(|e| e.into_error())?;
        let first = self.expected.and_then(|e| e.get(self.shards)).map(|o| o.size);
        if let Some(first) = first.filter(|&first| first != size) {
            let index = self.shards;
            return Err(self.differs(format!("shard {index} is {size} bytes in this pass where {first} were expected")));
        }
        self.shards += 1;
        self.pass.arrive(Object { name, size });
        Ok(())
    }
}

impl Source for Pipe {
    fn describe(&self) -> String {
        format!("pipe:{}", show(&self.base))
    }

    fn list(&self) -> Result<Vec<Object>, Error> {
        let known = self.lock().shards.clone();
        let (shards, fifo) = match known {
            Some(shards) => (shards, None),
            None => {
                // The first pass is waited for whole: nothing else tells how many samples the epoch has.
                let pass = self.current(&mut self.lock())?;
                let shards = pass.complete()?;
                (self.lock().shards.get_or_insert(shards).clone(), Some(pass.fifo.clone()))
            }
        };
        if shards.is_empty() {
            let from = fifo.map_or_else(|| "its shard sizes given".to_owned(), |f| format!("FIFO {}", f.display()));
            return Err(Error::Empty(format!("{} ({from})", self.describe())));
        }
        Ok(shards)
    }

    fn read(&self, name: &str) -> Result<Vec<u8>, Error> {
        let pass = self.current(&mut self.lock())?;
        let read_error = |io| Error::Read { source_desc: self.describe(), name: name.to_owned(), io };
        let not_found = || {
            read_error(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such shard in this pass of the Pipe channel (shards are named pipe-NNNNNN.tar)",
            ))
        };
        let index = shard_index(name).ok_or_else(not_found)?;
        // Training may ask for a shard before the pass brings it: wait (the reader's stall timeout bounds this).
        let progress = pass.wait_until(|p| p.shards.len() > index);
        if progress.shards.len() <= index {
            return match &progress.end {
                Some(Err(reason)) => Err(Error::Path { path: pass.fifo.clone(), reason: reason.clone() }),
                _ => Err(not_found()),
            };
        }
        drop(progress);
        // Reading outside the locks lets several pipeline workers read shards at once.
        super::read_file(&self.describe(), name, &pass.spool.path().join(name))
    }

    fn begin_epoch(&self, epoch: u64) -> Result<(), Error> {
        let mut state = self.lock();
        if state.pass.is_some() && (state.epoch.is_none() || state.epoch == Some(epoch)) {
            state.epoch = Some(epoch);
            return Ok(());
        }
        self.open_next(&mut state)?;
        state.epoch = Some(epoch);
        Ok(())
    }

    fn already_sharded_by_host(&self) -> bool {
        self.sharded_by_host
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((pass, reader)) = state.pass.take() {
            pass.stop.store(true, Ordering::Relaxed);
            let _ = reader.join();
        }
    }
}
