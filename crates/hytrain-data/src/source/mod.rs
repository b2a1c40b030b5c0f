//! Where the bytes of a dataset come from. Every source lists named objects and reads them whole; formats and the
//! sampler above never know which source they read.
//!
//! | `--data`                     | source                                                                 |
//! |------------------------------|------------------------------------------------------------------------|
//! | `/mnt/efs/cifar10`           | [`Dir`]: EFS, FSx, a SageMaker File or FastFile channel, a local folder |
//! | `s3://bucket/prefix`         | [`S3`]: straight from S3 or an S3-compatible store (`--s3-endpoint`)    |
//! | `pipe:/opt/ml/input/data/training` | [`Pipe`]: SageMaker Pipe mode FIFOs `training_0`, `training_1`, ... |
//! | `channel:training`           | the platform's channel of that name, resolved through [`OpenOptions::channels`] |
//!
//! ```no_run
//! use hytrain_data::source::{self, OpenOptions};
//! let data = source::open("s3://my-bucket/cifar10/", &OpenOptions::default())?;
//! for object in data.list()? {
//!     let bytes = data.read(&object.name)?;
//!     assert_eq!(bytes.len() as u64, object.size);
//! }
//! # Ok::<(), hytrain_data::Error>(())
//! ```
//!
//! # The identity promise and Pipe mode
//! [`Dir`] and [`S3`] name objects by their path below the root, so the same dataset gets the same names and order
//! from both. A Pipe channel delivers the channel's S3 objects concatenated in key order and carries no names, so
//! [`Pipe`] names its tar shards `pipe-000000.tar`, `pipe-000001.tar`, ... in arrival order. The shards' bytes are
//! identical to the files; their names are not. Code that must give the same result from every source therefore
//! depends on the *position* of a shard in [`Source::list`], never on its name, and the dataset's shard names must
//! sort (bytewise) in the order S3 lists keys, which is what SageMaker delivers (zero-padded numbers do).
//!
//! A Pipe channel also delivers its shards one after another during the epoch: with the sampler's
//! [`stream_window`](crate::SamplerConfig::stream_window) set, an epoch reads them in nearly that order and starts
//! before the pass has arrived. The order is the sampler's, so the same setting gives the same batches from a folder.

mod dir;
mod pipe;
mod s3;
pub(crate) mod tar_split;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use hytrain_cluster::{Channel, InputMode, S3Distribution};

pub use dir::Dir;
pub use pipe::{Pipe, PipeOptions};
pub use s3::{S3Credentials, S3Options, S3RetryPolicy, S3};

use crate::Error;

/// One object (file, S3 key) of a source, named relative to the source's root with `/` separators.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Object {
    /// Path relative to the source root, `/`-separated (for S3 the key with the prefix removed).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

/// Largest object read whole into memory (a tar shard, a CIFAR batch, an MNIST file). Shards are usually
/// 100 MiB to 1 GiB (`hytrain data pack` writes 256 MiB ones); an object above this is not a shard, or a size a
/// listing or a file system made up, and reading it would exhaust the worker's memory.
pub const MAX_OBJECT_BYTES: u64 = 4 << 30;

/// Refuses an object whose size, as a listing, a HEAD or the file system reports it, is over [`MAX_OBJECT_BYTES`],
/// before anything is allocated for it.
pub(crate) fn check_object_size(source_desc: &str, name: &str, size: u64) -> Result<(), Error> {
    if size > MAX_OBJECT_BYTES {
        return Err(Error::BadShard {
            source_desc: source_desc.to_owned(),
            shard: name.to_owned(),
            reason: format!(
                "is {size} bytes, over the limit of {} GiB for one object read into memory; split the dataset \
                 into smaller shards (hytrain data pack writes 256 MiB ones)",
                MAX_OBJECT_BYTES >> 30
            ),
        });
    }
    Ok(())
}

/// Reads a whole file of a source after checking its size against [`MAX_OBJECT_BYTES`].
pub(crate) fn read_file(source_desc: &str, name: &str, path: &std::path::Path) -> Result<Vec<u8>, Error> {
    let read_error = |io| Error::Read { source_desc: source_desc.to_owned(), name: name.to_owned(), io };
    let size = std::fs::metadata(path).map_err(read_error)?.len();
    check_object_size(source_desc, name, size)?;
    std::fs::read(path).map_err(read_error)
}

/// Objects read ahead by [`Source::read_many`], in the order their names were given.
pub type Objects<'a> = Box<dyn Iterator<Item = Result<(String, Vec<u8>), Error>> + Send + 'a>;

/// The bytes a consumer lets a source read ahead of it ([`Source::read_ahead`]): an object counts from before its
/// read starts (while it is in flight) until the consumer is done with its bytes and releases it. One object may
/// always be read when nothing is held, whatever its size, so an object larger than the cap still gets read.
#[derive(Debug)]
pub struct ReadBudget {
    cap: u64,
    /// Bytes held, and whether the budget was stopped.
    state: Mutex<(u64, bool)>,
    changed: Condvar,
}

impl ReadBudget {
    /// A budget of `cap` bytes.
    pub fn new(cap: u64) -> ReadBudget {
        ReadBudget { cap, state: Mutex::new((0, false)), changed: Condvar::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, bool)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fits(&self, held: u64, bytes: u64) -> bool {
        held == 0 || held.saturating_add(bytes) <= self.cap
    }

    /// Holds `bytes` if they fit now; false if not, or if the budget was stopped.
    pub fn try_reserve(&self, bytes: u64) -> bool {
        let mut state = self.lock();
        if state.1 || !self.fits(state.0, bytes) {
            return false;
        }
        state.0 += bytes;
        true
    }

    /// Waits until `bytes` fit, then holds them; false if the budget was stopped first.
    pub fn reserve(&self, bytes: u64) -> bool {
        let mut state = self.lock();
        while !state.1 && !self.fits(state.0, bytes) {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        if state.1 {
            return false;
        }
        state.0 += bytes;
        true
    }

    /// Gives back `bytes` held for an object the consumer is done with.
    pub fn release(&self, bytes: u64) {
        let mut state = self.lock();
        state.0 = state.0.saturating_sub(bytes);
        self.changed.notify_all();
    }

    /// Ends every wait, now and later: the consumer is gone.
    pub fn stop(&self) {
        self.lock().1 = true;
        self.changed.notify_all();
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.lock().0
    }
}

/// A dataset's storage: a directory, an S3 prefix, or a SageMaker Pipe channel.
///
/// `list` returns objects sorted by name, so every source gives every rank the same order.
pub trait Source: Send + Sync + std::fmt::Debug {
    /// A short human description for logs and errors, e.g. `s3://bucket/prefix` or `/opt/ml/input/data/training`.
    /// Never contains credentials.
    fn describe(&self) -> String;
    /// All objects under the root, sorted by name.
    fn list(&self) -> Result<Vec<Object>, crate::Error>;
    /// The whole content of one object.
    fn read(&self, name: &str) -> Result<Vec<u8>, crate::Error>;

    /// `len` bytes of one object from `offset` on (fewer at the object's end).
    fn read_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, Error> {
        let whole = self.read(name)?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(whole.len());
        let end = start.saturating_add(usize::try_from(len).unwrap_or(usize::MAX)).min(whole.len());
        Ok(whole[start..end].to_vec())
    }

    /// Reads several objects, yielding them in the order of `names`. Sources where a read waits on the network
    /// ([`S3`]) keep several objects in flight ahead of the consumer; the default reads one after another.
    fn read_many(&self, names: Vec<String>) -> Objects<'_> {
        Box::new(names.into_iter().map(move |name| self.read(&name).map(|bytes| (name, bytes))))
    }

    /// [`Source::read_many`] within `budget`: each object, given with the bytes to count for it, is reserved in
    /// the budget before its read starts, and stays counted until the consumer calls [`ReadBudget::release`], so
    /// reads in flight count as well as objects waiting. Ends early once the budget is stopped. The consumer must
    /// release from another thread, or before asking for the next object, or a full budget waits for ever. The
    /// default reads one object after another; [`S3`] starts as many as fit.
    fn read_ahead(&self, objects: Vec<(String, u64)>, budget: Arc<ReadBudget>) -> Objects<'_> {
        Box::new(
            objects.into_iter().map_while(move |(name, bytes)| {
                budget.reserve(bytes).then(|| self.read(&name).map(|data| (name, data)))
            }),
        )
    }

    /// Called by the data loader before each epoch. A [`Pipe`] opens the next FIFO of its channel here (SageMaker
    /// delivers the channel once per epoch); other sources have nothing to do.
    fn begin_epoch(&self, epoch: u64) -> Result<(), Error> {
        let _ = epoch;
        Ok(())
    }

    /// True when the platform already split the dataset between hosts (a SageMaker channel with
    /// `S3DistributionType: ShardedByS3Key`): each host sees different objects, so the sampler must split what this
    /// source lists among this node's local ranks only (`local_rank` of `local_world_size`), not among all ranks,
    /// or most of the data would never be read.
    fn already_sharded_by_host(&self) -> bool {
        false
    }
}

/// A shared handle to any source.
pub type SharedSource = Arc<dyn Source>;

/// Settings for [`open`]: one value for every kind of source, so a command line can fill it once.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// For `s3://` sources.
    pub s3: S3Options,
    /// For Pipe channels.
    pub pipe: PipeOptions,
    /// The job's channels by name, for `channel:<name>`: the plan's `paths.channels` as hytrain-cluster found them.
    pub channels: BTreeMap<String, Channel>,
}

/// Opens the source that `spec` names: `s3://bucket/prefix`, `pipe:/path/base` (FIFOs `/path/base_<epoch>`),
/// `channel:<name>` (one of [`OpenOptions::channels`]), `file:///path` or a plain path (a folder, or one file).
pub fn open(spec: &str, opts: &OpenOptions) -> Result<SharedSource, Error> {
    if spec.starts_with("s3://") {
        return Ok(Arc::new(S3::new(spec, &opts.s3)?));
    }
    if let Some(base) = spec.strip_prefix("pipe:") {
        if base.is_empty() {
            return Err(Error::Spec {
                spec: spec.to_owned(),
                reason: "give the FIFOs' stem, e.g. pipe:/opt/ml/input/data/training".to_owned(),
            });
        }
        return Ok(Arc::new(Pipe::new(base, &opts.pipe)));
    }
    if let Some(name) = spec.strip_prefix("channel:") {
        let Some(channel) = opts.channels.get(name) else {
            let known: Vec<&str> = opts.channels.keys().map(String::as_str).collect();
            let reason = if known.is_empty() {
                "this job has no input channels (channel:NAME works on SageMaker, where inputdataconfig.json lists \
                 them); pass a folder or s3:// URL instead"
                    .to_owned()
            } else {
                format!("no such channel; this job's channels are: {}", known.join(", "))
            };
            return Err(Error::Spec { spec: spec.to_owned(), reason });
        };
        return open_channel(channel, opts);
    }
    let path = spec.strip_prefix("file://").unwrap_or(spec);
    if path.is_empty() {
        return Err(Error::Spec {
            spec: spec.to_owned(),
            reason: "empty; give a folder, s3://bucket/prefix, pipe:/path or channel:NAME".to_owned(),
        });
    }
    if let Some((scheme, _)) = path.split_once("://") {
        return Err(Error::Spec {
            spec: spec.to_owned(),
            reason: format!("unsupported scheme {scheme}://; hytrain reads folders, s3://, pipe: and channel:"),
        });
    }
    Ok(Arc::new(Dir::new(path)?))
}

/// Opens a platform channel (hytrain-cluster's [`Channel`], as the plan lists them): a File or FastFile channel is
/// a folder ([`Dir`]), a Pipe channel is a series of FIFOs ([`Pipe`]). A `ShardedByS3Key` channel reports
/// [`Source::already_sharded_by_host`].
pub fn open_channel(channel: &Channel, opts: &OpenOptions) -> Result<SharedSource, Error> {
    let sharded = channel.s3_distribution == S3Distribution::ShardedByS3Key;
    Ok(match channel.input_mode {
        InputMode::File | InputMode::FastFile => Arc::new(Dir::new(&channel.path)?.with_sharded_by_host(sharded)),
        InputMode::Pipe => Arc::new(Pipe::new(&channel.path, &opts.pipe).with_sharded_by_host(sharded)),
    })
}

/// Checks an object name from a caller before it is joined to a local root: relative, `/`-separated, no `..`.
fn check_name(source_desc: &str, name: &str) -> Result<(), Error> {
    let bad = name.is_empty()
        || name.starts_with('/')
        || name.contains('\\')
        || name.contains('\0')
        || name.split('/').any(|part| part.is_empty() || part == "." || part == "..");
    if bad {
        return Err(Error::Read {
            source_desc: source_desc.to_owned(),
            name: name.to_owned(),
            io: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not an object name of this source (names are relative, `/`-separated, without `.` or `..`)",
            ),
        });
    }
    Ok(())
}

/// `path` as text for messages and descriptions.
fn show(path: &Path) -> String {
    path.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(path: impl Into<std::path::PathBuf>, input_mode: InputMode, s3_distribution: S3Distribution) -> Channel {
        Channel { path: path.into(), input_mode, s3_distribution, content_type: None, record_wrapper_type: None }
    }

    #[test]
    fn a_read_budget_holds_what_fits_and_always_one_object() {
        let budget = ReadBudget::new(100);
        assert!(budget.try_reserve(150), "one object larger than the cap, with nothing held");
        assert!(!budget.try_reserve(1));
        budget.release(150);
        assert!(budget.try_reserve(60) && budget.try_reserve(40) && !budget.try_reserve(1));
        assert_eq!(budget.held(), 100);
    }

    #[test]
    fn a_stopped_read_budget_ends_the_wait_and_the_default_read_ahead() {
        let source = crate::MemorySource::new("mem").with("a", vec![1; 10]).with("b", vec![2; 10]);
        let budget = Arc::new(ReadBudget::new(10));
        let mut reads = source.read_ahead(vec![("a".into(), 10), ("b".into(), 10)], budget.clone());
        assert_eq!(reads.next().unwrap().unwrap().1, vec![1; 10]);
        // "a" is still held: reading "b" waits until the consumer releases it, or stops.
        std::thread::scope(|s| {
            s.spawn(|| budget.stop());
            assert!(reads.next().is_none());
        });
        assert!(!budget.try_reserve(0) && !budget.reserve(0));
    }

    #[test]
    fn unknown_channel_error_lists_the_jobs_channels() {
        let mut opts = OpenOptions::default();
        opts.channels
            .insert("training".into(), channel("/nonexistent", InputMode::File, S3Distribution::FullyReplicated));
        let err = open("channel:validation", &opts).unwrap_err().to_string();
        assert!(err.contains("channel:validation") && err.contains("training"), "{err}");
        let err = open("channel:training", &OpenOptions::default()).unwrap_err().to_string();
        assert!(err.contains("no input channels"), "{err}");
    }

    #[test]
    fn unsupported_scheme_and_empty_spec_are_rejected_with_the_value() {
        let err = open("gs://bucket/x", &OpenOptions::default()).unwrap_err().to_string();
        assert!(err.contains("gs://bucket/x") && err.contains("unsupported scheme"), "{err}");
        assert!(open("", &OpenOptions::default()).unwrap_err().to_string().contains("empty"));
        assert!(open("pipe:", &OpenOptions::default()).unwrap_err().to_string().contains("FIFOs' stem"));
    }

    #[test]
    fn sharded_by_s3_key_channel_reports_host_sharding() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.tar"), b"x").unwrap();
        let mut channel = channel(dir.path(), InputMode::FastFile, S3Distribution::ShardedByS3Key);
        assert!(open_channel(&channel, &OpenOptions::default()).unwrap().already_sharded_by_host());
        channel.s3_distribution = S3Distribution::FullyReplicated;
        assert!(!open_channel(&channel, &OpenOptions::default()).unwrap().already_sharded_by_host());
        channel.input_mode = InputMode::Pipe;
        channel.s3_distribution = S3Distribution::ShardedByS3Key;
        assert!(open_channel(&channel, &OpenOptions::default()).unwrap().already_sharded_by_host());
    }

    #[test]
    fn names_that_escape_the_root_are_refused() {
        for bad in ["../x", "/etc/passwd", "a/../../b", "", "a//b", "./a"] {
            assert!(check_name("d", bad).is_err(), "{bad}");
        }
        assert!(check_name("d", "train/shard-000.tar").is_ok());
    }

    #[test]
    fn an_object_over_the_size_limit_is_refused_naming_it_its_size_and_the_limit() {
        assert!(check_object_size("s3://b/ds", "train/shard-0.tar", MAX_OBJECT_BYTES).is_ok());
        let e = check_object_size("s3://b/ds", "train/shard-0.tar", MAX_OBJECT_BYTES + 1).unwrap_err().to_string();
        assert!(e.contains("s3://b/ds") && e.contains("train/shard-0.tar"), "{e}");
        assert!(e.contains(&format!("is {} bytes, over the limit of 4 GiB", MAX_OBJECT_BYTES + 1)), "{e}");
    }

    #[test]
    fn a_sparse_file_over_the_size_limit_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.tar");
        // Sparse: takes no disk, but reports a size past the limit, as a file system or listing could.
        std::fs::File::create(&path).unwrap().set_len(MAX_OBJECT_BYTES + 512).unwrap();
        let e = read_file("/data", "huge.tar", &path).unwrap_err().to_string();
        assert!(e.contains("over the limit of 4 GiB"), "{e}");
    }
}
