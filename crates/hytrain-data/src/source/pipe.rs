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
//! An epoch's shards are spooled to a temporary folder on disk (not kept in memory: a channel can be far larger
//! than RAM), because the sampler visits shards in a shuffled order while the pipe delivers them in key order.
//! Memory use is one read buffer; disk use is one epoch of data, capped by [`PipeOptions::max_spool_bytes`]. The
//! previous epoch's spool is deleted when the next FIFO is opened.

use std::fs;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
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
}

impl Default for PipeOptions {
    fn default() -> Self {
        Self {
            open_timeout: Duration::from_secs(600),
            stall_timeout: Duration::from_secs(600),
            spool_dir: None,
            max_spool_bytes: None,
        }
    }
}

/// The shards of the epoch read last.
#[derive(Debug, Default)]
struct State {
    /// The next FIFO's number.
    next_fifo: u64,
    /// The epoch the loaded data was requested for; `None` when it was loaded implicitly by `list` or `read`.
    epoch: Option<u64>,
    /// Data of one pass is loaded.
    loaded: bool,
    spool: Option<tempfile::TempDir>,
    shards: Vec<Object>,
}

/// A SageMaker Pipe mode channel of tar shards (`pipe:/opt/ml/input/data/training` reads `training_0`, ...).
///
/// [`Source::begin_epoch`] opens the next FIFO in order, whatever the epoch's number: a restarted SageMaker job
/// starts its FIFOs at `_0` again while a resumed run continues at a later epoch, and every pass delivers the same
/// data. `list` or `read` before any `begin_epoch` read the first FIFO, and the next `begin_epoch` adopts it.
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
        Self { base: base.as_ref().to_path_buf(), opts: opts.clone(), sharded_by_host: false, state: Mutex::default() }
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

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while loading leaves `loaded` false, so the state is still consistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn ensure_loaded(&self, state: &mut State) -> Result<(), Error> {
        if !state.loaded {
            self.load_next(state)?;
        }
        Ok(())
    }

    /// Opens the next FIFO and spools its shards.
    fn load_next(&self, state: &mut State) -> Result<(), Error> {
        let n = state.next_fifo;
        state.next_fifo += 1;
        state.loaded = false;
        state.shards.clear();
        // Free the previous epoch's disk before filling the next.
        state.spool = None;
        let path = self.fifo_path(n);
        let started = Instant::now();
        let file = self.open_fifo(&path)?;
        let spool = match &self.opts.spool_dir {
            Some(dir) => tempfile::Builder::new().prefix("hytrain-pipe-").tempdir_in(dir),
            None => tempfile::Builder::new().prefix("hytrain-pipe-").tempdir(),
        }
        .map_err(|io| Error::Path {
            path: self.opts.spool_dir.clone().unwrap_or_else(std::env::temp_dir),
            reason: format!("cannot create a spool folder for the Pipe channel: {io}; set the Pipe spool folder"),
        })?;
        let mut sink = Spool::new(spool.path(), self.opts.max_spool_bytes);
        let mut splitter = TarSplitter::new();
        let fail = |reason: String| Error::Path { path: path.clone(), reason };
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let got = read_with_stall_timeout(&file, &mut buf, self.opts.stall_timeout).map_err(fail)?;
            if got == 0 {
                break;
            }
            total += got as u64;
            splitter.push(&buf[..got], &mut sink).map_err(|e| fail(sink.explain(e)))?;
        }
        splitter.finish(&mut sink).map_err(|e| fail(sink.explain(e)))?;
        tracing::info!(
            fifo = %path.display(), shards = sink.shards.len(), bytes = total,
            seconds = started.elapsed().as_secs_f64(), "read one pass of the Pipe channel"
        );
        state.shards = std::mem::take(&mut sink.shards);
        state.spool = Some(spool);
        state.loaded = true;
        Ok(())
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

/// Reads what is available, waiting up to `stall` for data. Returns 0 at the end of the stream.
fn read_with_stall_timeout(file: &fs::File, buf: &mut [u8], stall: Duration) -> Result<usize, String> {
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
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no data from the Pipe FIFO for {} s (no writer, or a stalled one); SageMaker may be failing to \
                 read the channel from S3: check the job's logs",
                stall.as_secs_f64()
            ));
        }
        let mut pfd = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let wait_ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
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

/// Writes each shard to its own file in the spool folder.
struct Spool<'a> {
    dir: &'a Path,
    limit: Option<u64>,
    written: u64,
    current: Option<(BufWriter<fs::File>, String, u64)>,
    shards: Vec<Object>,
}

impl<'a> Spool<'a> {
    fn new(dir: &'a Path, limit: Option<u64>) -> Self {
        Self { dir, limit, written: 0, current: None, shards: Vec::new() }
    }

    fn explain(&self, err: SplitError) -> String {
        match err {
            SplitError::Format(msg) => msg,
            SplitError::Sink(io) => format!(
                "cannot spool the Pipe channel to {}: {io}; point the Pipe spool folder at a larger volume",
                self.dir.display()
            ),
        }
    }
}

/// The name of the `index`th shard of a Pipe channel.
fn shard_name(index: usize) -> String {
    format!("pipe-{index:06}.tar")
}

impl ShardSink for Spool<'_> {
    fn start(&mut self, index: usize) -> std::io::Result<()> {
        let name = shard_name(index);
        let file = fs::File::create(self.dir.join(&name))?;
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
        if let Some((file, name, size)) = self.current.take() {
            file.into_inner().map_err(|e| e.into_error())?;
            self.shards.push(Object { name, size });
        }
        Ok(())
    }
}

impl Source for Pipe {
    fn describe(&self) -> String {
        format!("pipe:{}", show(&self.base))
    }

    fn list(&self) -> Result<Vec<Object>, Error> {
        let mut state = self.lock();
        self.ensure_loaded(&mut state)?;
        if state.shards.is_empty() {
            return Err(Error::Empty(format!(
                "{} (FIFO {})",
                self.describe(),
                self.fifo_path(state.next_fifo - 1).display()
            )));
        }
        Ok(state.shards.clone())
    }

    fn read(&self, name: &str) -> Result<Vec<u8>, Error> {
        let mut state = self.lock();
        self.ensure_loaded(&mut state)?;
        let read_error = |io| Error::Read { source_desc: self.describe(), name: name.to_owned(), io };
        if !state.shards.iter().any(|o| o.name == name) {
            return Err(read_error(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such shard in this pass of the Pipe channel (shards are named pipe-NNNNNN.tar)",
            )));
        }
        let spool = state.spool.as_ref().map(|s| s.path().join(name));
        drop(state);
        // Reading outside the lock lets several pipeline workers read shards at once.
        let path = spool.ok_or_else(|| read_error(std::io::ErrorKind::NotFound.into()))?;
        super::read_file(&self.describe(), name, &path)
    }

    fn begin_epoch(&self, epoch: u64) -> Result<(), Error> {
        let mut state = self.lock();
        if state.loaded && state.epoch.is_none() {
            state.epoch = Some(epoch);
            return Ok(());
        }
        if state.loaded && state.epoch == Some(epoch) {
            return Ok(());
        }
        self.load_next(&mut state)?;
        state.epoch = Some(epoch);
        Ok(())
    }

    fn already_sharded_by_host(&self) -> bool {
        self.sharded_by_host
    }
}
