//! The loader: a rank's samples, read ahead within a memory cap, decoded and augmented on a worker pool, delivered
//! as batches in the sampler's order.
//!
//! ```text
//! fetch thread ──shards──► dispatch thread ──samples──► decode workers ──results──► Epoch::next (reorders)
//! (reads ahead ≤ prefetch_bytes)   (keeps the samples the shuffle still needs)
//! ```
//! Every sample carries its position, and the consumer puts results back in order, so batches never depend on
//! which worker was fastest. Time the consumer spends blocked is metered ([`Loader::data_wait`]).

use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver};
use serde::{Deserialize, Serialize};

use crate::augment::Transform;
use crate::format::{Dataset, Input, OpenOptions, RawSample, Sample};
use crate::sampler::{Position, SampleRef, Sampler, SamplerConfig};
use crate::source::{ReadBudget, SharedSource};
use crate::Error;

/// Loader settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderConfig {
    /// Samples per batch (the last batch of an epoch may be smaller; it is the same size on every rank).
    pub batch_size: usize,
    /// Decode/augment threads.
    pub workers: usize,
    /// Most bytes of shards read ahead of need, shards still being fetched included (at least one shard is always
    /// allowed).
    pub prefetch_bytes: u64,
    /// Decoding to tensors: augmentation and normalization.
    pub transform: Transform,
    /// Which samples, in which order.
    pub sampler: SamplerConfig,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 64,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()).min(8),
            prefetch_bytes: 256 << 20,
            transform: Transform::default(),
            sampler: SamplerConfig::default(),
        }
    }
}

/// A batch's inputs, row-major.
#[derive(Debug, Clone, PartialEq)]
pub enum Inputs {
    /// Images (NCHW) and `.npy` tensors, as `f32`.
    Float(Vec<f32>),
    /// Token ids (`[N, context_length]`).
    Tokens(Vec<i64>),
}

impl Inputs {
    /// Values held.
    pub fn len(&self) -> usize {
        match self {
            Inputs::Float(v) => v.len(),
            Inputs::Tokens(v) => v.len(),
        }
    }
    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One batch: inputs (`f32` images or tensors, or `i64` token ids) and `i64` targets: one class label per sample,
/// or for token data the next token of every input position.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `shape.product()` values.
    pub inputs: Inputs,
    /// `[N, C, H, W]` for images, `[N, ...]` for tensors, `[N, context_length]` for tokens.
    pub shape: Vec<usize>,
    /// `target_shape.product()` values.
    pub targets: Vec<i64>,
    /// `[N]` for class labels, `[N, context_length]` for tokens.
    pub target_shape: Vec<usize>,
    /// The rank's position after this batch: save it in a checkpoint to resume right after it.
    pub position: Position,
}

impl Batch {
    /// Samples in the batch.
    pub fn len(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }
    /// True for a batch without samples (never yielded by a loader).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The batch as tch tensors `(inputs [shape], targets i64 [target_shape])` on the CPU; inputs are `f32`, or
    /// `i64` for token ids.
    #[cfg(feature = "tch")]
    pub fn to_tensors(&self) -> (tch::Tensor, tch::Tensor) {
        let dims = |shape: &[usize]| shape.iter().map(|&d| d as i64).collect::<Vec<i64>>();
        let inputs = match &self.inputs {
            Inputs::Float(v) => tch::Tensor::from_slice(v),
            Inputs::Tokens(v) => tch::Tensor::from_slice(v),
        };
        (
            inputs.view(dims(&self.shape).as_slice()),
            tch::Tensor::from_slice(&self.targets).view(dims(&self.target_shape).as_slice()),
        )
    }
}

#[derive(Debug, Default)]
struct Stats {
    wait_nanos: AtomicU64,
    skipped: AtomicU64,
}

/// A rank's data loader over one dataset.
#[derive(Debug)]
pub struct Loader {
    dataset: Arc<Dataset>,
    sampler: Sampler,
    config: LoaderConfig,
    stats: Arc<Stats>,
}

impl Loader {
    /// A loader over an opened dataset.
    pub fn new(dataset: Arc<Dataset>, config: LoaderConfig) -> Result<Loader, Error> {
        if config.batch_size == 0 {
            return Err(Error::Config("batch size must be at least 1".into()));
        }
        let sampler = Sampler::new(dataset.shard_sizes(), config.sampler.clone())?;
        Ok(Loader { dataset, sampler, config, stats: Arc::new(Stats::default()) })
    }

    /// The same loader for other readers: the ranks that read the dataset changed (a rank was lost, or the epoch was
    /// regrouped). Its statistics carry on.
    pub fn with_sampler(&self, sampler: SamplerConfig) -> Result<Loader, Error> {
        let config = LoaderConfig { sampler, ..self.config.clone() };
        let sampler = Sampler::new(self.dataset.shard_sizes(), config.sampler.clone())?;
        Ok(Loader { dataset: self.dataset.clone(), sampler, config, stats: self.stats.clone() })
    }

    /// Opens the dataset on `source` and makes a loader over it.
    pub fn open(source: SharedSource, options: &OpenOptions, config: LoaderConfig) -> Result<Loader, Error> {
        Loader::new(Arc::new(Dataset::open(source, options)?), config)
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }
    /// The sampler.
    pub fn sampler(&self) -> &Sampler {
        &self.sampler
    }
    /// Samples this rank reads per epoch (the same on every rank).
    pub fn samples_per_rank(&self) -> usize {
        self.sampler.samples_per_rank()
    }
    /// Batches per epoch (the same on every rank).
    pub fn batches_per_epoch(&self) -> usize {
        self.samples_per_rank().div_ceil(self.config.batch_size)
    }
    /// Total time callers spent waiting in [`Epoch::next`] for data, over all epochs so far.
    pub fn data_wait(&self) -> Duration {
        Duration::from_nanos(self.stats.wait_nanos.load(Ordering::Relaxed))
    }
    /// Bad samples skipped so far (with `skip_bad_samples`): those left out when the dataset was opened (once),
    /// plus each image that failed to decode, every time an epoch met it (each was replaced by the rank's previous
    /// good sample, so every rank still takes the same number of steps).
    pub fn skipped(&self) -> u64 {
        self.stats.skipped.load(Ordering::Relaxed) + self.dataset.skipped_at_open()
    }

    /// Starts an epoch from its beginning.
    pub fn epoch(&self, epoch: u64) -> Result<Epoch, Error> {
        self.resume(Position { epoch, samples: 0 })
    }

    /// Starts an epoch at a saved position (a multiple of the batch size gives the same batches as the
    /// uninterrupted run). Tells the source first ([`Source::begin_epoch`](crate::source::Source::begin_epoch):
    /// a Pipe channel opens its next FIFO).
    pub fn resume(&self, position: Position) -> Result<Epoch, Error> {
        self.dataset.source().begin_epoch(position.epoch)?;
        let refs = self.sampler.resume(position);
        let skip = position.samples.min(self.sampler.samples_in_epoch(position.epoch) as u64);
        Ok(Epoch::start(self, position.epoch, skip, refs))
    }
}

/// Counting gate that a stop can open, so no thread waits forever after the epoch is dropped.
#[derive(Debug, Default)]
struct Gate {
    state: Mutex<(u64, bool)>,
    cv: Condvar,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, bool)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Waits until `ok(level)`; false when stopped.
    fn wait_until(&self, ok: impl Fn(u64) -> bool) -> bool {
        let mut s = self.lock();
        while !s.1 && !ok(s.0) {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        !s.1
    }
    fn add(&self, n: i64) {
        let mut s = self.lock();
        s.0 = s.0.saturating_add_signed(n);
        self.cv.notify_all();
    }
    fn stop(&self) {
        self.lock().1 = true;
        self.cv.notify_all();
    }
}

struct Job {
    slot: usize,
    sample: SampleRef,
    raw: RawSample,
}

struct Item {
    inputs: Inputs,
    shape: Vec<usize>,
    /// One class label, or a token window's next ids.
    targets: Vec<i64>,
    member: String,
    shard: String,
}

impl Clone for Item {
    fn clone(&self) -> Self {
        #[cfg(test)]
        tests::CLONES.with(|c| c.set(c.get() + 1));
        Item {
            inputs: self.inputs.clone(),
            shape: self.shape.clone(),
            targets: self.targets.clone(),
            member: self.member.clone(),
            shard: self.shard.clone(),
        }
    }
}

enum Outcome {
    Item(Item),
    /// This sample is bad; skippable.
    Bad(Error),
    /// The epoch cannot go on (a shard unreadable, a bug).
    Fatal(Error),
}

/// One epoch of batches for this rank: an iterator of `Result<Batch, Error>`. After an error it ends.
pub struct Epoch {
    epoch: u64,
    batch_size: usize,
    start: u64,
    total: usize,
    next_slot: usize,
    results: Receiver<(usize, Outcome)>,
    reorder: BTreeMap<usize, Outcome>,
    window: Arc<Gate>,
    budget: Arc<ReadBudget>,
    stats: Arc<Stats>,
    skip_bad: bool,
    last_good: Option<Item>,
    done: bool,
    source_desc: String,
}

/// A batch's samples with every skipped (bad) one replaced, keeping the count every rank agreed on: by the
/// previous good sample (earlier in the batch, else `last_good` from an earlier batch), or for the leading bad
/// samples of an epoch by the first good one after them. With `skip_bad` the batch's last sample is kept in
/// `last_good` for the next batch: one clone per batch, none per sample; without it there is nothing to replace and
/// nothing is cloned. Returns fewer samples than slots only when every one was bad.
fn settle(items: Vec<Option<Item>>, skip_bad: bool, last_good: &mut Option<Item>) -> Vec<Item> {
    if !skip_bad {
        return items.into_iter().flatten().collect();
    }
    let mut items = items;
    let mut out: Vec<Item> = Vec::with_capacity(items.len());
    for i in 0..items.len() {
        match items[i].take() {
            Some(item) => out.push(item),
            None => {
                let previous = out.last().or(last_good.as_ref());
                let fill = previous.or_else(|| items[i + 1..].iter().flatten().next()).cloned();
                out.extend(fill);
            }
        }
    }
    if let Some(last) = out.last() {
        *last_good = Some(last.clone());
    }
    out
}

impl std::fmt::Debug for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Epoch").field("epoch", &self.epoch).field("position", &self.position()).finish()
    }
}

impl Epoch {
    fn start(loader: &Loader, epoch: u64, start: u64, refs: Vec<SampleRef>) -> Epoch {
        let config = &loader.config;
        let dataset = loader.dataset.clone();
        let total = refs.len();
        // Decoded results waiting to be consumed: enough for the current and the next batch.
        let window_size = (2 * config.batch_size + 4 * config.workers.max(1)) as u64;
        let window = Arc::new(Gate::default());
        window.add(window_size as i64);
        let budget = Arc::new(ReadBudget::new(config.prefetch_bytes));
        let (results_tx, results) = unbounded::<(usize, Outcome)>();

        // Which samples of each shard this rank needs, and the order in which shards are first needed.
        let mut uses: HashMap<(usize, usize), usize> = HashMap::new();
        let mut order = Vec::new();
        let mut seen_shard = vec![false; dataset.shards().len()];
        for r in &refs {
            *uses.entry((r.shard, r.index)).or_default() += 1;
            if !std::mem::replace(&mut seen_shard[r.shard], true) {
                order.push(r.shard);
            }
        }
        let mut wanted: HashMap<usize, Vec<bool>> = HashMap::new();
        for &(s, i) in uses.keys() {
            wanted.entry(s).or_insert_with(|| vec![false; dataset.shards()[s].samples])[i] = true;
        }

        let (shard_tx, shard_rx) = unbounded::<(usize, u64, Result<Vec<(usize, RawSample)>, Error>)>();
        {
            let dataset = dataset.clone();
            let budget = budget.clone();
            spawn("hytrain-data-fetch", move || {
                // Each shard is held in the budget from before its read starts until the dispatcher takes it.
                for (s, read) in dataset.read_shards_within(order, budget) {
                    let size = dataset.shards()[s].bytes;
                    let keep = &wanted[&s];
                    let read = read.map(|samples| {
                        samples.into_iter().enumerate().filter(|(i, _)| keep.get(*i) == Some(&true)).collect()
                    });
                    let failed = read.is_err();
                    if shard_tx.send((s, size, read)).is_err() || failed {
                        return;
                    }
                }
            });
        }

        let (jobs_tx, jobs_rx) = bounded::<Job>(config.workers.max(1) * 2);
        {
            let window = window.clone();
            let budget = budget.clone();
            let results_tx = results_tx.clone();
            spawn("hytrain-data-dispatch", move || {
                let mut pending: HashMap<(usize, usize), (RawSample, usize)> = HashMap::new();
                for (slot, r) in refs.into_iter().enumerate() {
                    while !pending.contains_key(&(r.shard, r.index)) {
                        match shard_rx.recv() {
                            Ok((s, size, Ok(samples))) => {
                                budget.release(size);
                                for (i, raw) in samples {
                                    let n = uses[&(s, i)];
                                    pending.insert((s, i), (raw, n));
                                }
                            }
                            Ok((_, _, Err(e))) => {
                                let _ = results_tx.send((slot, Outcome::Fatal(e)));
                                return;
                            }
                            Err(_) => return,
                        }
                    }
                    if !window.wait_until(|free| free > 0) {
                        return;
                    }
                    window.add(-1);
                    let key = (r.shard, r.index);
                    let entry = pending.get_mut(&key).expect("checked above");
                    entry.1 -= 1;
                    let raw = if entry.1 == 0 { pending.remove(&key).expect("present").0 } else { entry.0.clone() };
                    if jobs_tx.send(Job { slot, sample: r, raw }).is_err() {
                        return;
                    }
                }
            });
        }

        for w in 0..config.workers.max(1) {
            let jobs_rx = jobs_rx.clone();
            let results_tx = results_tx.clone();
            let dataset = dataset.clone();
            let transform = config.transform.clone();
            let seed = config.sampler.seed;
            spawn(&format!("hytrain-data-decode-{w}"), move || {
                while let Ok(job) = jobs_rx.recv() {
                    let shard = dataset.shards()[job.sample.shard].label();
                    let member = job.raw.member.clone();
                    let outcome =
                        catch_unwind(AssertUnwindSafe(|| decode(&dataset, &shard, &job, &transform, seed, epoch)))
                            .unwrap_or_else(|_| {
                                Outcome::Fatal(Error::Pipeline(format!(
                                    "a decoder panicked on shard {shard}, member {member}"
                                )))
                            });
                    if results_tx.send((job.slot, outcome)).is_err() {
                        return;
                    }
                }
            });
        }

        Epoch {
            epoch,
            batch_size: config.batch_size,
            start,
            total,
            next_slot: 0,
            results,
            reorder: BTreeMap::new(),
            window,
            budget,
            stats: loader.stats.clone(),
            skip_bad: dataset.skip_bad_samples(),
            last_good: None,
            done: false,
            source_desc: dataset.source_desc().to_string(),
        }
    }

    /// This rank's position: the epoch and the samples of it consumed so far.
    pub fn position(&self) -> Position {
        Position { epoch: self.epoch, samples: self.start + self.next_slot as u64 }
    }

    fn next_outcome(&mut self) -> Outcome {
        loop {
            if let Some(o) = self.reorder.remove(&self.next_slot) {
                self.next_slot += 1;
                self.window.add(1);
                return o;
            }
            let waited = Instant::now();
            let got = self.results.recv();
            self.stats.wait_nanos.fetch_add(waited.elapsed().as_nanos() as u64, Ordering::Relaxed);
            match got {
                Ok((slot, o)) => {
                    self.reorder.insert(slot, o);
                }
                Err(_) => {
                    return Outcome::Fatal(Error::Pipeline(format!(
                        "the loader's threads stopped before sample {} of epoch {}",
                        self.next_slot, self.epoch
                    )))
                }
            }
        }
    }

    fn next_batch(&mut self) -> Result<Batch, Error> {
        let n = self.batch_size.min(self.total - self.next_slot);
        let mut items: Vec<Option<Item>> = Vec::with_capacity(n);
        for _ in 0..n {
            match self.next_outcome() {
                Outcome::Item(item) => items.push(Some(item)),
                Outcome::Bad(e) if self.skip_bad => {
                    let seen = self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                    if seen == 0 {
                        tracing::warn!("skipping bad sample: {e}");
                    }
                    items.push(None);
                }
                Outcome::Bad(e) | Outcome::Fatal(e) => return Err(e),
            }
        }
        let items = settle(items, self.skip_bad, &mut self.last_good);
        if items.len() < n {
            return Err(Error::Pipeline(format!(
                "every sample of the batch at {} of epoch {} was bad; the dataset is unusable",
                self.next_slot - n,
                self.epoch
            )));
        }
        let shape = items[0].shape.clone();
        let mut inputs = match items[0].inputs {
            Inputs::Float(_) => Inputs::Float(Vec::with_capacity(n * shape.iter().product::<usize>())),
            Inputs::Tokens(_) => Inputs::Tokens(Vec::with_capacity(n * shape.iter().product::<usize>())),
        };
        let target_len = items[0].targets.len();
        let mut targets = Vec::with_capacity(n * target_len);
        for item in &items {
            if item.shape != shape {
                return Err(Error::BadMember {
                    source_desc: self.source_desc.clone(),
                    shard: item.shard.clone(),
                    member: item.member.clone(),
                    reason: format!(
                        "has shape {:?} but the batch's first sample {} has {:?}; make all inputs one size when packing, or for images give --resize N and --crop N",
                        item.shape, items[0].member, shape
                    ),
                });
            }
            match (&mut inputs, &item.inputs) {
                (Inputs::Float(all), Inputs::Float(one)) => all.extend_from_slice(one),
                (Inputs::Tokens(all), Inputs::Tokens(one)) => all.extend_from_slice(one),
                _ => return Err(Error::Pipeline("a batch mixes token and float samples".into())),
            }
            targets.extend_from_slice(&item.targets);
        }
        let mut full_shape = vec![n];
        full_shape.extend_from_slice(&shape);
        let target_shape = match items[0].inputs {
            Inputs::Tokens(_) => vec![n, target_len],
            Inputs::Float(_) => vec![n],
        };
        Ok(Batch { inputs, shape: full_shape, targets, target_shape, position: Epoch::position(self) })
    }
}

impl Iterator for Epoch {
    type Item = Result<Batch, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.next_slot >= self.total {
            return None;
        }
        let batch = self.next_batch();
        if batch.is_err() {
            self.done = true;
            self.window.stop();
            self.budget.stop();
        }
        Some(batch)
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        // Threads see the closed gates or channels and return; none is joined, so a slow read cannot block here.
        self.window.stop();
        self.budget.stop();
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new().name(name.to_string()).spawn(f).expect("cannot start a data loader thread");
}

fn decode(dataset: &Dataset, shard: &str, job: &Job, transform: &Transform, seed: u64, epoch: u64) -> Outcome {
    let bad = |reason: String| {
        Outcome::Bad(Error::BadMember {
            source_desc: dataset.source_desc().to_string(),
            shard: shard.to_string(),
            member: job.raw.member.clone(),
            reason,
        })
    };
    let sample: Sample = match job.raw.decode(dataset.source_desc(), shard) {
        Ok(s) => s,
        Err(e) => return Outcome::Bad(e),
    };
    let (inputs, shape, targets) = match &sample.input {
        Input::Image(img) => match transform.apply(img, seed, epoch, job.sample.position) {
            Ok(v) => {
                let (height, width) = transform.output_size(img.height, img.width);
                (Inputs::Float(v), vec![img.channels, height, width], vec![sample.label])
            }
            Err(reason) => return bad(reason),
        },
        Input::Tensor(t) => (Inputs::Float(t.to_f32()), t.shape.clone(), vec![sample.label]),
        Input::Tokens(ids) => {
            let context = ids.len().saturating_sub(1);
            (Inputs::Tokens(ids[..context].to_vec()), vec![context], ids[1..].to_vec())
        }
    };
    Outcome::Item(Item { inputs, shape, targets, member: job.raw.member.clone(), shard: shard.to_string() })
}

#[cfg(all(test, feature = "tch"))]
mod tch_tests {
    use super::*;

    #[test]
    fn batch_becomes_tensors_of_its_shape_and_values() {
        let batch = Batch {
            inputs: Inputs::Float((0..2 * 3 * 2 * 2).map(|i| i as f32).collect()),
            shape: vec![2, 3, 2, 2],
            targets: vec![4, 7],
            target_shape: vec![2],
            position: Position::default(),
        };
        let (x, y) = batch.to_tensors();
        assert_eq!(x.size(), vec![2, 3, 2, 2]);
        assert_eq!(x.kind(), tch::Kind::Float);
        assert_eq!(x.double_value(&[1, 2, 1, 0]), f64::from(12 + 8 + 2));
        assert_eq!(y.kind(), tch::Kind::Int64);
        assert_eq!(Vec::<i64>::try_from(&y).unwrap(), vec![4, 7]);
    }

    #[test]
    fn a_token_batch_becomes_int64_inputs_and_targets_of_its_shapes() {
        let batch = Batch {
            inputs: Inputs::Tokens(vec![1, 2, 3, 4, 5, 6]),
            shape: vec![2, 3],
            targets: vec![2, 3, 9, 5, 6, 8],
            target_shape: vec![2, 3],
            position: Position::default(),
        };
        let (x, y) = batch.to_tensors();
        assert_eq!((x.size(), x.kind()), (vec![2, 3], tch::Kind::Int64));
        assert_eq!((y.size(), y.kind()), (vec![2, 3], tch::Kind::Int64));
        assert_eq!(x.int64_value(&[1, 0]), 4);
        assert_eq!(y.int64_value(&[0, 2]), 9);
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    thread_local! {
        /// Samples cloned on this thread.
        pub(super) static CLONES: Cell<usize> = const { Cell::new(0) };
    }

    fn item(id: i64) -> Item {
        Item {
            inputs: Inputs::Float(vec![id as f32; 4]),
            shape: vec![4],
            targets: vec![id],
            member: format!("{id}.png"),
            shard: "shard-0.tar".into(),
        }
    }

    fn ids(items: &[Item]) -> Vec<i64> {
        items.iter().map(|i| i.targets[0]).collect()
    }

    fn clones() -> usize {
        CLONES.with(Cell::get)
    }

    #[test]
    fn without_skip_bad_samples_a_batch_clones_no_sample() {
        let mut last_good = None;
        let before = clones();
        let batch = settle((0..64).map(|i| Some(item(i))).collect(), false, &mut last_good);
        assert_eq!(ids(&batch), (0..64).collect::<Vec<_>>());
        assert_eq!(clones() - before, 0);
        assert!(last_good.is_none());
    }

    #[test]
    fn with_skip_bad_samples_a_batch_clones_one_sample_to_carry_over() {
        let mut last_good = None;
        let before = clones();
        settle((0..64).map(|i| Some(item(i))).collect(), true, &mut last_good);
        assert_eq!(clones() - before, 1);
        assert_eq!(last_good.map(|i| i.targets[0]), Some(63));
    }

    #[test]
    fn bad_samples_repeat_the_previous_good_one_or_the_next_at_the_start_of_an_epoch() {
        let mut last_good = None;
        // Leading bad samples of the epoch take the first good one; later ones the previous good one.
        let batch = settle(vec![None, None, Some(item(5)), None, Some(item(6))], true, &mut last_good);
        assert_eq!(ids(&batch), vec![5, 5, 5, 5, 6]);
        // The next batch starts bad: the previous batch's last sample fills in.
        let batch = settle(vec![None, Some(item(7))], true, &mut last_good);
        assert_eq!(ids(&batch), vec![6, 7]);
        // A batch of bad samples only, with nothing before it in the epoch, comes back short.
        assert!(settle(vec![None, None], true, &mut None).is_empty());
    }
}
