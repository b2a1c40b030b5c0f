//! Dataset formats: WebDataset tar shards, CIFAR-10 (torchvision pickles and binary batches), MNIST IDX and token
//! files for language models (nanoGPT's and llm.c's `.bin`), all read into one [`Sample`] shape and cut into
//! [`Shard`]s that the sampler shuffles.
//!
//! Reading is split in two so the pipeline can spread the work: [`Dataset::read_shard`] turns an object's bytes into
//! [`RawSample`]s (cheap: tar members, pickle arrays), and [`RawSample::decode`] does the costly part (png/jpeg
//! decoding) on a worker thread.

pub mod cifar;
pub mod decode;
pub mod mnist;
pub mod npy;
mod pickle;
pub mod tar;
pub mod tokens;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::source::{Object, ReadBudget, SharedSource};
use crate::Error;
pub use tokens::{TokenDtype, TokenOptions};

/// An image, row-major, channels last (HWC), 8 bits per channel; 1 channel (gray) or 3 (RGB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// 1 (gray) or 3 (RGB).
    pub channels: usize,
    /// `height * width * channels` bytes, HWC.
    pub pixels: Vec<u8>,
}

impl Image {
    /// Builds an image from planar CHW bytes (CIFAR's layout).
    pub fn from_chw(channels: usize, height: usize, width: usize, chw: &[u8]) -> Image {
        let plane = height * width;
        let mut pixels = vec![0u8; plane * channels];
        for c in 0..channels {
            for i in 0..plane {
                pixels[i * channels + c] = chw[c * plane + i];
            }
        }
        Image { height, width, channels, pixels }
    }
}

/// Element type of an `.npy` tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// `|u1`
    U8,
    /// `|i1`
    I8,
    /// `<u2`
    U16,
    /// `<i2`
    I16,
    /// `<i4`
    I32,
    /// `<i8`
    I64,
    /// `<f4`
    F32,
    /// `<f8`
    F64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::U8 | DType::I8 => 1,
            DType::U16 | DType::I16 => 2,
            DType::I32 | DType::F32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }
}

/// A tensor from an `.npy` member: little-endian elements in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Element type.
    pub dtype: DType,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.product() * dtype.size()` bytes, little-endian.
    pub data: Vec<u8>,
}

impl Tensor {
    /// The elements converted to `f32` (values as stored, no scaling).
    pub fn to_f32(&self) -> Vec<f32> {
        let n = self.dtype.size();
        self.data
            .chunks_exact(n)
            .map(|b| match self.dtype {
                DType::U8 => f32::from(b[0]),
                DType::I8 => f32::from(b[0] as i8),
                DType::U16 => f32::from(u16::from_le_bytes([b[0], b[1]])),
                DType::I16 => f32::from(i16::from_le_bytes([b[0], b[1]])),
                DType::I32 => i32::from_le_bytes(b.try_into().unwrap()) as f32,
                DType::I64 => i64::from_le_bytes(b.try_into().unwrap()) as f32,
                DType::F32 => f32::from_le_bytes(b.try_into().unwrap()),
                DType::F64 => f64::from_le_bytes(b.try_into().unwrap()) as f32,
            })
            .collect()
    }
}

/// A sample's input.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A decoded image.
    Image(Image),
    /// A tensor from `.npy`.
    Tensor(Tensor),
    /// A window of `context_length + 1` token ids: the input is all but the last, the targets all but the first.
    Tokens(Vec<i64>),
}

/// One decoded training example.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's key (WebDataset key; `data_batch_1-00042` for CIFAR, `train-00042` for MNIST).
    pub key: String,
    /// Its input.
    pub input: Input,
    /// Its class index (0 for a token window, whose targets are its own ids shifted by one).
    pub label: i64,
}

/// How an image member is encoded (by file extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// `.png`
    Png,
    /// `.jpg` / `.jpeg`
    Jpeg,
}

/// A sample's input before decoding.
#[derive(Debug, Clone)]
pub enum Payload {
    /// Encoded image bytes, exactly as stored.
    Encoded(ImageKind, Vec<u8>),
    /// Raw pixels (CIFAR, MNIST): nothing left to decode.
    Pixels(Image),
    /// The bytes of an `.npy` file.
    Npy(Vec<u8>),
    /// A window of token ids (nothing left to decode).
    Tokens(Vec<i64>),
}

/// A sample as read from its shard: label known, input not decoded yet.
#[derive(Debug, Clone)]
pub struct RawSample {
    /// The sample's key.
    pub key: String,
    /// The member (path inside the tar) its input came from; for CIFAR/MNIST the key.
    pub member: String,
    /// The undecoded input.
    pub payload: Payload,
    /// Its class index (0 for a token window).
    pub label: i64,
}

impl RawSample {
    /// Bytes held in memory, for the pipeline's memory cap.
    pub fn size(&self) -> usize {
        self.key.len()
            + match &self.payload {
                Payload::Encoded(_, b) | Payload::Npy(b) => b.len(),
                Payload::Pixels(i) => i.pixels.len(),
                Payload::Tokens(ids) => ids.len() * std::mem::size_of::<i64>(),
            }
    }

    /// Decodes the input. `shard` and `source_desc` only name the place in errors.
    pub fn decode(&self, source_desc: &str, shard: &str) -> Result<Sample, Error> {
        let bad = |reason: String| Error::BadMember {
            source_desc: source_desc.to_string(),
            shard: shard.to_string(),
            member: self.member.clone(),
            reason,
        };
        let input = match &self.payload {
            Payload::Encoded(kind, bytes) => Input::Image(decode::image(bytes, *kind).map_err(|e| {
                bad(format!("image does not decode ({e}); re-encode it as png/jpeg or pass --skip-bad-samples"))
            })?),
            Payload::Pixels(img) => Input::Image(img.clone()),
            Payload::Npy(bytes) => {
                Input::Tensor(npy::parse(bytes).map_err(|e| bad(format!("{e}; or pass --skip-bad-samples")))?)
            }
            Payload::Tokens(ids) => Input::Tokens(ids.clone()),
        };
        Ok(Sample { key: self.key.clone(), input, label: self.label })
    }
}

/// The dataset layouts this crate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// WebDataset tar shards (`*.tar`).
    Tar,
    /// CIFAR-10/100 "python version" (`cifar-10-batches-py/data_batch_1`, ...): pickles.
    CifarPy,
    /// CIFAR-10 "binary version" (`cifar-10-batches-bin/data_batch_1.bin`, ...).
    CifarBin,
    /// MNIST IDX files (`train-images-idx3-ubyte[.gz]`, ...).
    Mnist,
    /// Token ids for language models: nanoGPT's `train.bin`/`val.bin` or llm.c's shards (see [`tokens`]).
    Tokens,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Tar => "webdataset tar shards",
            Format::CifarPy => "cifar-10 python (pickle) batches",
            Format::CifarBin => "cifar-10 binary batches",
            Format::Mnist => "mnist idx",
            Format::Tokens => "token ids (.bin)",
        })
    }
}

/// Which half of a dataset to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// CIFAR `data_batch_*`, MNIST `train-*`, tar shards under `train/` (or all shards if there are no split folders).
    #[default]
    Train,
    /// CIFAR `test_batch`, MNIST `t10k-*`, tar shards under `val/`, `valid/`, `validation/` or `test/`.
    Test,
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Test => "test",
        })
    }
}

/// Where a shard's samples live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ShardKind {
    /// The whole object.
    Object,
    /// Samples `start..start + samples` of an MNIST image file and its label file.
    MnistSlice { labels: String, start: usize },
    /// Windows `start..start + samples` of a token file whose ids start at byte `offset`.
    TokenSlice { start: usize, offset: u64, dtype: TokenDtype },
}

/// The unit the sampler shuffles: a tar file, a CIFAR batch file, or a slice of an MNIST file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// The object's name in the source (for MNIST slices, the image file's name).
    pub name: String,
    /// The object's size in bytes (for MNIST slices, the image file's size).
    pub bytes: u64,
    /// Number of (good) samples.
    pub samples: usize,
    pub(crate) kind: ShardKind,
}

impl Shard {
    /// A name for logs and errors (MNIST slices show their range).
    pub fn label(&self) -> String {
        match &self.kind {
            ShardKind::Object => self.name.clone(),
            ShardKind::MnistSlice { start, .. } | ShardKind::TokenSlice { start, .. } => {
                format!("{}[{}..{}]", self.name, start, start + self.samples)
            }
        }
    }
}

/// How to open a dataset.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Train or test half.
    pub split: Split,
    /// Skip (and count) bad samples instead of failing on the first one.
    pub skip_bad_samples: bool,
    /// How to cut token files into samples.
    pub tokens: TokenOptions,
}

/// A dataset on a source: its format, its shards for one split, and its class names when known.
#[derive(Debug)]
pub struct Dataset {
    source: SharedSource,
    source_desc: String,
    format: Format,
    split: Split,
    shards: Vec<Shard>,
    classes: Option<Vec<String>>,
    skip_bad_samples: bool,
    tokens: TokenOptions,
    skipped_at_open: u64,
    first_skip: Option<String>,
    /// Counts another process took, by shard name, while indexing (empty afterwards).
    given: HashMap<String, IndexEntry>,
    /// Decompressed MNIST files, so reading six slices reads and unzips each file once.
    cache: Mutex<HashMap<String, Arc<Vec<u8>>>>,
}

/// Shards read in order by [`Dataset::read_shards`]: (shard index, its samples).
pub type ShardReads<'a> = Box<dyn Iterator<Item = (usize, Result<Vec<RawSample>, Error>)> + Send + 'a>;

/// Name of the shard index `pack` writes at the output's root: `{"shards": [{"name": "train/shard-000000.tar",
/// "bytes": 123, "samples": 45}, ...]}`. When every shard of the split is listed with its current size, `open`
/// takes the sample counts from it instead of reading every shard once. Keep it out of a Pipe channel's prefix
/// (point the channel at `train/`): a Pipe stream may only hold tar shards.
pub const INDEX_FILE: &str = "index.json";

/// One entry of [`INDEX_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IndexEntry {
    /// Shard name relative to the index's folder.
    pub name: String,
    /// Shard size in bytes (an entry whose size differs from the object's is ignored).
    pub bytes: u64,
    /// Samples in the shard.
    pub samples: usize,
}

/// The content of [`INDEX_FILE`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardIndex {
    /// Every shard written.
    pub shards: Vec<IndexEntry>,
}

/// Writes `index` as the [`INDEX_FILE`] of the folder `dir`, whole or not at all: into `.index.json.partial`
/// first, created only if absent (another process writing the same folder, on a shared file system, keeps its
/// own), then renamed over. An error leaves nothing behind but another writer's file.
pub fn write_index(dir: &std::path::Path, index: &ShardIndex) -> Result<(), Error> {
    use std::io::Write;
    let partial = dir.join(format!(".{INDEX_FILE}.partial"));
    let target = dir.join(INDEX_FILE);
    let write_err = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |io| Error::Write { path, io }
    };
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).open(&partial).map_err(write_err(&partial))?;
    let text = serde_json::to_vec_pretty(index)
        .map_err(|e| Error::Write { path: partial.clone(), io: std::io::Error::other(e) })?;
    let written = file
        .write_all(&text)
        .and_then(|()| file.sync_all())
        .map_err(write_err(&partial))
        .and_then(|()| std::fs::rename(&partial, &target).map_err(write_err(&target)));
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

/// Name of the class list `pack` writes beside tar shards: a JSON array of class names, index = label.
pub const CLASSES_FILE: &str = "classes.json";

fn basename(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

impl Dataset {
    /// Lists the source, recognises the format and indexes the split's shards (counting samples; for tar and
    /// CIFAR-python that reads every shard once, unless the source's [`INDEX_FILE`] lists it).
    pub fn open(source: SharedSource, options: &OpenOptions) -> Result<Dataset, Error> {
        Self::open_with_counts(source, options, &ShardIndex::default())
    }

    /// [`Dataset::open`] taking the sample count of every shard `counts` lists at its current size from there
    /// instead of reading the shard: the [`Dataset::counts`] of another process that opened the same source with
    /// the same options, so the processes of a host read the shards once between them. With `skip_bad_samples`
    /// the counts are of good samples, which reading the shard later skips alike; a count that is wrong all the
    /// same is found when the shard is read, as for a shard rewritten during the job.
    pub fn open_with_counts(
        source: SharedSource,
        options: &OpenOptions,
        counts: &ShardIndex,
    ) -> Result<Dataset, Error> {
        let source_desc = source.describe();
        let objects = source.list()?;
        if objects.is_empty() {
            return Err(Error::Empty(source_desc));
        }
        let format = detect(&objects)
            .ok_or_else(|| Error::UnknownFormat { source_desc: source_desc.clone(), found: summarize(&objects) })?;
        let mut ds = Dataset {
            source,
            source_desc,
            format,
            split: options.split,
            shards: Vec::new(),
            classes: None,
            skip_bad_samples: options.skip_bad_samples,
            tokens: options.tokens.clone(),
            skipped_at_open: 0,
            first_skip: None,
            given: counts.shards.iter().map(|e| (e.name.clone(), e.clone())).collect(),
            cache: Mutex::new(HashMap::new()),
        };
        match format {
            Format::Tar => tar::index(&mut ds, &objects)?,
            Format::CifarPy => cifar::index_py(&mut ds, &objects)?,
            Format::CifarBin => cifar::index_bin(&mut ds, &objects)?,
            Format::Mnist => mnist::index(&mut ds, &objects)?,
            Format::Tokens => tokens::index(&mut ds, &objects)?,
        }
        ds.given = HashMap::new();
        if ds.shards.iter().all(|s| s.samples == 0) {
            return Err(Error::BadShard {
                source_desc: ds.source_desc.clone(),
                shard: ds.shards.first().map(|s| s.name.clone()).unwrap_or_default(),
                reason: format!(
                    "the {} split has {} shard(s) but no samples; check the dataset was written completely",
                    ds.split,
                    ds.shards.len()
                ),
            });
        }
        if ds.skipped_at_open > 0 {
            tracing::warn!(
                skipped = ds.skipped_at_open,
                first = ds.first_skip.as_deref().unwrap_or(""),
                "skipped bad samples while indexing {}",
                ds.source_desc
            );
        }
        Ok(ds)
    }

    /// The recognised format.
    pub fn format(&self) -> Format {
        self.format
    }
    /// The split this dataset reads.
    pub fn split(&self) -> Split {
        self.split
    }
    /// The shards of the split, in the source's (sorted) order.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }
    /// Samples per shard, the sampler's input.
    pub fn shard_sizes(&self) -> Vec<usize> {
        self.shards.iter().map(|s| s.samples).collect()
    }
    /// Total samples in the split.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.samples).sum()
    }
    /// True when the split has no samples (never, after a successful `open`).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Class names, index = label, when the dataset names them (CIFAR `batches.meta`, `classes.json`, MNIST digits).
    pub fn classes(&self) -> Option<&[String]> {
        self.classes.as_deref()
    }
    /// The source.
    pub fn source(&self) -> &SharedSource {
        &self.source
    }
    /// The source's description, for errors.
    pub fn source_desc(&self) -> &str {
        &self.source_desc
    }
    /// Whether bad samples are skipped rather than fatal.
    pub fn skip_bad_samples(&self) -> bool {
        self.skip_bad_samples
    }
    /// Bad samples skipped while indexing (only with `skip_bad_samples`).
    pub fn skipped_at_open(&self) -> u64 {
        self.skipped_at_open
    }
    /// The sample count of each whole-object shard (tar, CIFAR batch), for [`Dataset::open_with_counts`] in
    /// another process or for [`write_index`]. Slices of MNIST and token files are left out: their counts come
    /// from sizes and headers, never from reading the data.
    pub fn counts(&self) -> ShardIndex {
        ShardIndex {
            shards: self
                .shards
                .iter()
                .filter(|s| s.kind == ShardKind::Object)
                .map(|s| IndexEntry { name: s.name.clone(), bytes: s.bytes, samples: s.samples })
                .collect(),
        }
    }

    /// Reads shard `index` into raw samples, in the shard's order. With `skip_bad_samples` bad ones are left out,
    /// exactly as at `open`, so the count matches [`Shard::samples`].
    pub fn read_shard(&self, index: usize) -> Result<Vec<RawSample>, Error> {
        let shard = self
            .shards
            .get(index)
            .ok_or_else(|| Error::Config(format!("shard {index} out of range ({} shards)", self.shards.len())))?;
        match self.format {
            Format::Mnist => return self.checked(shard, mnist::read_slice(self, shard)?),
            Format::Tokens => return self.checked(shard, tokens::read_slice(self, shard)?),
            _ => {}
        }
        let bytes = self.source.read(&shard.name)?;
        self.parse_shard(index, &bytes)
    }

    /// Reads several shards in the given order, letting the source keep reads in flight ahead of the consumer
    /// ([`Source::read_many`](crate::source::Source::read_many)).
    pub fn read_shards(&self, indices: Vec<usize>) -> ShardReads<'_> {
        self.read_shards_in(indices, None)
    }

    /// [`Dataset::read_shards`] within `budget`: each shard's [`Shard::bytes`] are held in it from before its read
    /// starts until the consumer releases them ([`Source::read_ahead`](crate::source::Source::read_ahead)).
    pub fn read_shards_within(&self, indices: Vec<usize>, budget: Arc<ReadBudget>) -> ShardReads<'_> {
        self.read_shards_in(indices, Some(budget))
    }

    fn read_shards_in(&self, indices: Vec<usize>, budget: Option<Arc<ReadBudget>>) -> ShardReads<'_> {
        let sliced = matches!(self.format, Format::Mnist | Format::Tokens);
        if sliced || indices.iter().any(|&i| i >= self.shards.len()) {
            return Box::new(indices.into_iter().map_while(move |i| {
                let bytes = self.shards.get(i).map_or(0, |s| s.bytes);
                let reserved = budget.as_ref().is_none_or(|b| b.reserve(bytes));
                reserved.then(|| (i, self.read_shard(i)))
            }));
        }
        let objects = match budget {
            Some(budget) => {
                let sized = indices.iter().map(|&i| (self.shards[i].name.clone(), self.shards[i].bytes)).collect();
                self.source.read_ahead(sized, budget)
            }
            None => {
                let names = indices.iter().map(|&i| self.shards[i].name.clone()).collect();
                self.source.read_many(names)
            }
        };
        Box::new(
            indices
                .into_iter()
                .zip(objects)
                .map(move |(i, read)| (i, read.and_then(|(_, bytes)| self.parse_shard(i, &bytes)))),
        )
    }

    /// Parses the bytes of shard `index` (not an MNIST slice).
    fn parse_shard(&self, index: usize, bytes: &[u8]) -> Result<Vec<RawSample>, Error> {
        let shard = &self.shards[index];
        let samples = match self.format {
            Format::Tar => tar::parse(bytes, &self.source_desc, &shard.name, self.skip_bad_samples)?.0,
            Format::CifarPy => cifar::parse_py(bytes, &self.source_desc, &shard.name)?,
            Format::CifarBin => cifar::parse_bin(bytes, &self.source_desc, &shard.name)?,
            Format::Mnist | Format::Tokens => {
                return Err(Error::Pipeline("a slice of a file parsed as a whole object".into()))
            }
        };
        self.checked(shard, samples)
    }

    fn checked(&self, shard: &Shard, samples: Vec<RawSample>) -> Result<Vec<RawSample>, Error> {
        if samples.len() != shard.samples {
            return Err(Error::BadShard {
                source_desc: self.source_desc.clone(),
                shard: shard.label(),
                reason: format!(
                    "holds {} samples now but {} when the dataset was opened; was it rewritten during the job?",
                    samples.len(),
                    shard.samples
                ),
            });
        }
        Ok(samples)
    }

    /// The sample count of each of `chosen` known without reading it: from the counts given to
    /// [`Dataset::open_with_counts`], else (without `skip_bad_samples`, whose counts leave out bad samples only a
    /// read finds) from the source's [`INDEX_FILE`]; an entry counts only at the object's current size.
    fn known_counts(&self, objects: &[Object], chosen: &[&Object]) -> Vec<Option<usize>> {
        let index = if self.skip_bad_samples || chosen.iter().all(|o| self.given.contains_key(&o.name)) {
            None
        } else {
            self.read_index(objects)
        };
        let from_index: HashMap<&str, &IndexEntry> =
            index.iter().flat_map(|i| &i.shards).map(|e| (e.name.as_str(), e)).collect();
        chosen
            .iter()
            .map(|o| {
                self.given
                    .get(&o.name)
                    .or_else(|| from_index.get(o.name.as_str()).copied())
                    .filter(|e| e.bytes == o.size)
                    .map(|e| e.samples)
            })
            .collect()
    }

    /// The source's [`INDEX_FILE`], when it has a readable one.
    fn read_index(&self, objects: &[Object]) -> Option<ShardIndex> {
        objects.iter().find(|o| o.name == INDEX_FILE)?;
        let bytes = self.source.read(INDEX_FILE).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(i) => Some(i),
            Err(e) => {
                tracing::warn!(
                    "{}: ignoring {INDEX_FILE} ({e}); counting samples by reading the shards",
                    self.source_desc
                );
                None
            }
        }
    }

    /// Reads the objects of `chosen` whose count is not known (`None` in `known`) and counts their samples with
    /// `count`; returns every count, in `chosen`'s order.
    fn count_samples(
        &mut self,
        chosen: &[&Object],
        known: Vec<Option<usize>>,
        mut count: impl FnMut(&mut Dataset, &Object, &[u8]) -> Result<usize, Error>,
    ) -> Result<Vec<usize>, Error> {
        let unknown: Vec<&Object> = chosen.iter().zip(&known).filter(|(_, k)| k.is_none()).map(|(o, _)| *o).collect();
        let mut counted = HashMap::new();
        if !unknown.is_empty() {
            tracing::info!(
                "{}: counted the samples of {} of {} shard(s) by reading them (no {INDEX_FILE} lists them)",
                self.source_desc,
                unknown.len(),
                chosen.len()
            );
            let names = unknown.iter().map(|o| o.name.clone()).collect();
            let source = self.source.clone();
            for (o, read) in unknown.iter().zip(source.read_many(names)) {
                let (_, bytes) = read?;
                let n = count(self, o, &bytes)?;
                counted.insert(o.name.clone(), n);
            }
        }
        Ok(chosen.iter().zip(known).map(|(o, k)| k.unwrap_or_else(|| counted[&o.name])).collect())
    }

    fn note_skip(&mut self, e: &Error) {
        self.skipped_at_open += 1;
        if self.first_skip.is_none() {
            self.first_skip = Some(e.to_string());
        }
    }

    /// Reads an object, cached for the dataset's lifetime (MNIST files are read per slice).
    fn read_cached(
        &self,
        name: &str,
        transform: impl FnOnce(Vec<u8>) -> Result<Vec<u8>, Error>,
    ) -> Result<Arc<Vec<u8>>, Error> {
        if let Some(b) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(name) {
            return Ok(b.clone());
        }
        let bytes = Arc::new(transform(self.source.read(name)?)?);
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), bytes.clone());
        Ok(bytes)
    }

    fn no_split(&self, hint: &str) -> Error {
        Error::NoSplit { source_desc: self.source_desc.clone(), split: self.split.to_string(), hint: hint.to_string() }
    }
}

/// Recognises the layout from object names; the first layout that matches wins, in the order CIFAR-python,
/// CIFAR-binary, MNIST, tar, token files (a folder with torchvision's CIFAR files and a `.tar` lying beside them is
/// CIFAR; CIFAR's own `.bin` batches are never read as tokens).
pub fn detect(objects: &[Object]) -> Option<Format> {
    let names: Vec<&str> = objects.iter().map(|o| basename(&o.name)).collect();
    if names.iter().any(|n| cifar::py_batch(n).is_some()) {
        Some(Format::CifarPy)
    } else if names.iter().any(|n| cifar::bin_batch(n).is_some()) {
        Some(Format::CifarBin)
    } else if names.iter().any(|n| mnist::role(n).is_some()) {
        Some(Format::Mnist)
    } else if objects.iter().any(|o| o.name.ends_with(".tar")) {
        Some(Format::Tar)
    } else if objects.iter().any(|o| o.name.ends_with(".bin")) {
        Some(Format::Tokens)
    } else {
        None
    }
}

fn summarize(objects: &[Object]) -> String {
    let shown: Vec<&str> = objects.iter().take(5).map(|o| o.name.as_str()).collect();
    let more = objects.len().saturating_sub(shown.len());
    let mut found = if more > 0 {
        format!("{} objects: {}, ... and {more} more", objects.len(), shown.join(", "))
    } else {
        format!("{} object(s): {}", objects.len(), shown.join(", "))
    };
    if objects.iter().any(|o| o.name.ends_with(".tar.gz") || o.name.ends_with(".tgz")) {
        found.push_str("; compressed archives (.tar.gz, .tgz) must be extracted first");
    }
    found
}
