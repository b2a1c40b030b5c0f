//! Which samples each rank reads in each epoch, deterministic in (seed, epoch).
//!
//! An epoch's global order is built in three steps, identical on every rank: the shard order is shuffled; the
//! shards' samples, read in that order, pass through a shuffle buffer (as WebDataset does, so a rank reads shards
//! sequentially instead of seeking everywhere); the stream is cut at `max_samples`. Rank `r` of `w` then takes the
//! contiguous block `r*n .. (r+1)*n` of that stream, where `n` is the same for every rank: the remainder is dropped
//! ([`Remainder::Drop`]) or filled by wrapping around to the stream's start ([`Remainder::Pad`], what PyTorch's
//! `DistributedSampler` does). Contiguous blocks keep each rank on roughly `1/w` of the shards.
//!
//! A stream that delivers shards in list order and not all at once (a SageMaker Pipe channel) sets
//! [`SamplerConfig::stream_window`]: shards are then shuffled only within a sliding window (a shard shuffle buffer,
//! as WebDataset's `shardshuffle`), so the `k`th shard the epoch reads is among the first `k + window` delivered,
//! and rank `r` takes every `w`th sample of the stream (positions `r`, `r + w`, ...), so every rank starts at the
//! stream's start. An epoch can then begin as soon as its first shards arrive.
//!
//! When the ranks reading an epoch change part-way (a rank is lost and the others carry on),
//! [`SamplerConfig::regroup`] says who read the epoch before and how far: what those ranks had not yet read is
//! listed in stream order (rank by rank for contiguous blocks, sample by sample for interleaved ones) and shared
//! among the new ranks the same way a whole epoch is, so every sample of the epoch is still read once.
//!
//! Randomness comes from [`Rng`], a SplitMix64 written here, so an order never changes with a dependency's version.

use serde::{Deserialize, Serialize};

use crate::Error;

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, good enough for shuffles, and fixed forever.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for a tuple of values (seed, epoch, purpose, ...): each part is mixed in, so different tuples
    /// give unrelated streams.
    pub fn derive(parts: &[u64]) -> Rng {
        let mut r = Rng(0x6a09_e667_f3bc_c908);
        for &p in parts {
            r.0 ^= p;
            r.0 = r.next_u64();
        }
        r
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), without modulo bias (Lemire's multiply-and-reject).
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// Purposes mixed into [`Rng::derive`], so the shard shuffle, the buffer and augmentation never share a stream.
pub(crate) const PURPOSE_SHARDS: u64 = 1;
pub(crate) const PURPOSE_BUFFER: u64 = 2;
pub(crate) const PURPOSE_AUGMENT: u64 = 3;

/// The stream window a SageMaker Pipe channel's training data gets unless told otherwise: an epoch starts once
/// its first 16 shards or so have arrived (4 GiB of `hytrain data pack`'s 256 MiB shards).
pub const DEFAULT_STREAM_WINDOW: usize = 16;

/// What to do with the samples left over when the dataset does not divide evenly among ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Remainder {
    /// Leave them out this epoch (a different few each epoch, since the order changes).
    Drop,
    /// Repeat samples from the start of the epoch's order, like PyTorch's `DistributedSampler`.
    #[default]
    Pad,
}

/// Sampler settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Number of ranks reading the dataset.
    pub world_size: usize,
    /// This rank, `0..world_size`.
    pub rank: usize,
    /// Shuffle shards and samples (off for evaluation: the source's order).
    pub shuffle: bool,
    /// Samples held by the shuffle buffer; larger mixes more across shards (0 or 1: no mixing within shards).
    pub shuffle_buffer: usize,
    /// Drop or pad the remainder so every rank gets the same number of samples.
    pub remainder: Remainder,
    /// Use at most this many samples of the dataset per epoch (all ranks together).
    pub max_samples: Option<usize>,
    /// Read the shards as a stream in list order: shuffle them only within a window of this many, and interleave
    /// the ranks (see the module's documentation). `None`: shuffle all shards, contiguous blocks per rank.
    #[serde(default)]
    pub stream_window: Option<usize>,
    /// An epoch whose readers changed part-way: these ranks read only what its earlier readers left.
    #[serde(default)]
    pub regroup: Option<Regroup>,
}

/// A set of ranks that read an epoch for a while, and how far each got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readers {
    /// Ranks reading the epoch then.
    pub world_size: usize,
    /// Samples of its share each of them consumed (the same on every rank: ranks step together).
    pub consumed: usize,
}

/// An epoch whose readers changed part-way (see the module's documentation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regroup {
    /// The epoch.
    pub epoch: u64,
    /// Each set of earlier readers in turn, from the epoch's start: the first read the whole epoch's shares, each
    /// later one the shares of what its predecessors left.
    pub before: Vec<Readers>,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            seed: 0,
            world_size: 1,
            rank: 0,
            shuffle: true,
            shuffle_buffer: 8192,
            remainder: Remainder::Pad,
            max_samples: None,
            stream_window: None,
            regroup: None,
        }
    }
}

impl SamplerConfig {
    /// The (rank, world size) the sampler splits by. Normally the job's global ones; but when the platform already
    /// gave each host its own part of the dataset
    /// ([`Source::already_sharded_by_host`](crate::source::Source::already_sharded_by_host), a `ShardedByS3Key`
    /// channel), only this node's local ranks split what the host sees, or the dataset would be split twice.
    /// Hosts may then hold different sample counts: set `max_samples` to the smallest count over hosts (an
    /// allreduce-min) so every rank takes the same number of steps.
    pub fn ranks_for(
        already_sharded_by_host: bool,
        rank: usize,
        world_size: usize,
        local_rank: usize,
        local_world_size: usize,
    ) -> (usize, usize) {
        if already_sharded_by_host {
            (local_rank, local_world_size)
        } else {
            (rank, world_size)
        }
    }
}

/// One sample a rank reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SampleRef {
    /// Index of the shard in [`crate::format::Dataset::shards`].
    pub shard: usize,
    /// Index of the sample within its shard.
    pub index: usize,
    /// Position in the epoch's global stream (unique per epoch, also for padded repeats): the augmentation seed.
    pub position: u64,
}

/// Where a rank is in its data: the epoch and the samples of it already consumed. Saved in checkpoints, so a
/// resumed job continues its epoch instead of restarting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Position {
    /// The epoch, from 0.
    pub epoch: u64,
    /// Samples of this epoch this rank has consumed.
    pub samples: u64,
}

/// A rank's sample order, per epoch.
#[derive(Debug, Clone)]
pub struct Sampler {
    shard_sizes: Vec<usize>,
    config: SamplerConfig,
    total: usize,
    per_rank: usize,
    /// This rank's share of the regrouped epoch, when there is one.
    regrouped_per_rank: Option<usize>,
}

impl Sampler {
    /// A sampler over shards of the given sizes. Fails when the rank is outside the world, or when there are too
    /// few samples for every rank to get one.
    pub fn new(shard_sizes: Vec<usize>, config: SamplerConfig) -> Result<Sampler, Error> {
        if config.world_size == 0 || config.rank >= config.world_size {
            return Err(Error::Config(format!(
                "rank {} is outside a world of {} ranks",
                config.rank, config.world_size
            )));
        }
        let all: usize = shard_sizes.iter().sum();
        let total = config.max_samples.map_or(all, |m| m.min(all));
        let per_rank = share(total, config.world_size, config.remainder);
        if per_rank == 0 {
            return Err(Error::Config(format!(
                "{total} samples cannot give each of {} ranks at least one{}",
                config.world_size,
                if total > 0 { "; use fewer ranks or --remainder pad" } else { "" }
            )));
        }
        let regrouped_per_rank = match &config.regroup {
            Some(regroup) => Some(regrouped_share(total, regroup, &config)?),
            None => None,
        };
        Ok(Sampler { shard_sizes, config, total, per_rank, regrouped_per_rank })
    }

    /// Samples every rank reads per epoch.
    pub fn samples_per_rank(&self) -> usize {
        self.per_rank
    }

    /// Samples this rank reads in `epoch`: its share of what is left in a regrouped epoch, else
    /// [`Sampler::samples_per_rank`].
    pub fn samples_in_epoch(&self, epoch: u64) -> usize {
        match (&self.config.regroup, self.regrouped_per_rank) {
            (Some(regroup), Some(n)) if regroup.epoch == epoch => n,
            _ => self.per_rank,
        }
    }

    /// Samples of the dataset used per epoch, all ranks together (before padding).
    pub fn epoch_samples(&self) -> usize {
        self.total
    }

    /// The settings.
    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// The global order of an epoch (all ranks), cut at `max_samples`: pairs (shard, index).
    fn global(&self, epoch: u64) -> Vec<(usize, usize)> {
        let seed = self.config.seed;
        let mut shards: Vec<usize> = (0..self.shard_sizes.len()).collect();
        if self.config.shuffle {
            let mut rng = Rng::derive(&[seed, epoch, PURPOSE_SHARDS]);
            match self.config.stream_window {
                Some(window) => shards = window_shuffle(shards, window, &mut rng),
                None => rng.shuffle(&mut shards),
            }
        }
        let stream = shards.iter().flat_map(|&s| (0..self.shard_sizes[s]).map(move |i| (s, i)));
        let mut out = Vec::with_capacity(self.total);
        let cap = self.config.shuffle_buffer;
        if !self.config.shuffle || cap <= 1 {
            out.extend(stream.take(self.total));
            return out;
        }
        let mut rng = Rng::derive(&[seed, epoch, PURPOSE_BUFFER]);
        let mut buffer = Vec::with_capacity(cap.min(self.total));
        for item in stream {
            if out.len() >= self.total {
                break;
            }
            if buffer.len() < cap {
                buffer.push(item);
                continue;
            }
            let j = rng.below(cap as u64) as usize;
            out.push(std::mem::replace(&mut buffer[j], item));
        }
        while out.len() < self.total && !buffer.is_empty() {
            let j = rng.below(buffer.len() as u64) as usize;
            out.push(buffer.swap_remove(j));
        }
        out
    }

    /// This rank's samples of `epoch`, in reading order.
    pub fn epoch(&self, epoch: u64) -> Vec<SampleRef> {
        let global = self.global(epoch);
        let at = |(p, position): (usize, u64)| {
            let (shard, index) = global[p % global.len()];
            SampleRef { shard, index, position }
        };
        let (rank, world) = (self.config.rank, self.config.world_size);
        let stream = self.config.stream_window.is_some();
        match &self.config.regroup {
            Some(regroup) if regroup.epoch == epoch => {
                let left = left_by(regroup, self.total, self.config.remainder, stream);
                let per_rank = self.samples_in_epoch(epoch);
                (0..per_rank)
                    .map(|i| {
                        let j = slot(rank, i, world, per_rank, stream);
                        // A repeat that pads the remainder gets a position of its own (its augmentation seed).
                        let (p, position) = left[j % left.len()];
                        at((p, if j < left.len() { position } else { repeat_position(regroup.before.len(), j) }))
                    })
                    .collect()
            }
            _ => (0..self.per_rank)
                .map(|i| {
                    let p = slot(rank, i, world, self.per_rank, stream);
                    at((p, p as u64))
                })
                .collect(),
        }
    }

    /// This rank's remaining samples after `position` (a resumed epoch continues where it stopped).
    pub fn resume(&self, position: Position) -> Vec<SampleRef> {
        let mut refs = self.epoch(position.epoch);
        let done = usize::try_from(position.samples).unwrap_or(usize::MAX).min(refs.len());
        refs.drain(..done);
        refs
    }
}

/// Each rank's share of `n` items among `world` ranks.
fn share(n: usize, world: usize, remainder: Remainder) -> usize {
    match remainder {
        Remainder::Drop => n / world,
        Remainder::Pad => n.div_ceil(world),
    }
}

/// The index in the stream of rank `rank`'s `i`th item when `world` ranks take `per_rank` each: interleaved
/// (`stream`) or in contiguous blocks. Indices past the stream's end wrap around (padding).
fn slot(rank: usize, i: usize, world: usize, per_rank: usize, stream: bool) -> usize {
    if stream {
        rank + i * world
    } else {
        rank * per_rank + i
    }
}

/// The position of a repeat that pads the share of a remainder after the `segment`th change of readers: above
/// every position of a whole epoch's stream, and different for each slot.
fn repeat_position(segment: usize, j: usize) -> u64 {
    ((segment as u64) << 48) | j as u64
}

/// What an epoch's earlier readers left, in stream order: pairs (index in the epoch's global stream, position).
/// The first readers share the whole epoch of `total` samples; each later one the previous one's leftovers.
fn left_by(regroup: &Regroup, total: usize, remainder: Remainder, stream: bool) -> Vec<(usize, u64)> {
    let mut left: Vec<(usize, u64)> = Vec::new();
    for (segment, readers) in regroup.before.iter().enumerate() {
        let n = if segment == 0 { total } else { left.len() };
        let per_rank = share(n, readers.world_size, remainder);
        let item = |r: usize, i: usize| {
            let j = slot(r, i, readers.world_size, per_rank, stream);
            match segment {
                0 => (j, j as u64),
                _ if j < left.len() => left[j],
                _ => (left[j % left.len()].0, repeat_position(segment, j)),
            }
        };
        let consumed = readers.consumed.min(per_rank);
        let next: Vec<(usize, u64)> = if stream {
            (consumed..per_rank)
                .flat_map(|i| (0..readers.world_size).map(move |r| (r, i)))
                .map(|(r, i)| item(r, i))
                .collect()
        } else {
            (0..readers.world_size)
                .flat_map(|r| (consumed..per_rank).map(move |i| (r, i)))
                .map(|(r, i)| item(r, i))
                .collect()
        };
        left = next;
    }
    left
}

/// This rank's share of what a regrouped epoch's earlier readers left, after checking that each set of readers
/// read no more than its share.
fn regrouped_share(total: usize, regroup: &Regroup, config: &SamplerConfig) -> Result<usize, Error> {
    if regroup.before.is_empty() {
        return Err(Error::Config(format!("epoch {}'s regroup names no earlier readers", regroup.epoch)));
    }
    let mut n = total;
    for (k, readers) in regroup.before.iter().enumerate() {
        if readers.world_size == 0 {
            return Err(Error::Config(format!("epoch {}'s readers {} number no ranks", regroup.epoch, k + 1)));
        }
        let per_rank = share(n, readers.world_size, config.remainder);
        if readers.consumed > per_rank {
            return Err(Error::Config(format!(
                "epoch {}'s readers {} ({} ranks) consumed {} samples each, more than their share of {per_rank}",
                regroup.epoch,
                k + 1,
                readers.world_size,
                readers.consumed
            )));
        }
        n = (per_rank - readers.consumed) * readers.world_size;
    }
    Ok(share(n, config.world_size, config.remainder))
}

/// The items in the order a shuffle buffer of `window` items gives them: each output is a random one of the next
/// `window` not yet given, so the `k`th output is among the first `k + window` items.
fn window_shuffle(items: Vec<usize>, window: usize, rng: &mut Rng) -> Vec<usize> {
    let window = window.max(1);
    let mut out = Vec::with_capacity(items.len());
    let mut buffer = Vec::with_capacity(window.min(items.len()));
    for item in items {
        if buffer.len() < window {
            buffer.push(item);
            continue;
        }
        let j = rng.below(window as u64) as usize;
        out.push(std::mem::replace(&mut buffer[j], item));
    }
    while !buffer.is_empty() {
        let j = rng.below(buffer.len() as u64) as usize;
        out.push(buffer.swap_remove(j));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    fn config(seed: u64, world_size: usize, rank: usize, buffer: usize, remainder: Remainder) -> SamplerConfig {
        SamplerConfig {
            seed,
            world_size,
            rank,
            shuffle: true,
            shuffle_buffer: buffer,
            remainder,
            max_samples: None,
            stream_window: None,
            regroup: None,
        }
    }

    #[test]
    fn rng_is_fixed_forever() {
        // SplitMix64's published first output for state 0 (after one increment).
        let mut r = Rng(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn a_regroup_whose_readers_read_more_than_their_share_is_an_error() {
        let mut c = config(0, 2, 0, 4, Remainder::Pad);
        c.regroup = Some(Regroup { epoch: 0, before: vec![Readers { world_size: 4, consumed: 4 }] });
        // 10 samples among 4 ranks: shares of 3.
        let e = Sampler::new(vec![10], c.clone()).unwrap_err();
        assert!(e.to_string().contains("consumed 4 samples each, more than their share of 3"), "{e}");
        c.regroup = Some(Regroup { epoch: 0, before: vec![] });
        let e = Sampler::new(vec![10], c.clone()).unwrap_err();
        assert!(e.to_string().contains("names no earlier readers"), "{e}");
        c.regroup = Some(Regroup { epoch: 0, before: vec![Readers { world_size: 0, consumed: 0 }] });
        let e = Sampler::new(vec![10], c).unwrap_err();
        assert!(e.to_string().contains("number no ranks"), "{e}");
    }

    #[test]
    fn a_regrouped_epoch_continues_the_stream_where_its_readers_stopped() {
        // 12 samples, unshuffled: 4 ranks read 1 each (0, 3, 6, 9 in blocks of 3); 2 ranks share the 8 left.
        let mut c = config(0, 2, 0, 1, Remainder::Pad);
        c.shuffle = false;
        c.regroup = Some(Regroup { epoch: 0, before: vec![Readers { world_size: 4, consumed: 1 }] });
        let of = |c: &SamplerConfig| -> Vec<usize> {
            Sampler::new(vec![12], c.clone()).unwrap().epoch(0).iter().map(|r| r.index).collect()
        };
        assert_eq!(of(&c), vec![1, 2, 4, 5]);
        c.rank = 1;
        assert_eq!(of(&c), vec![7, 8, 10, 11]);
        // Interleaved: the 4 ranks read 0..4; the 2 ranks take turns from 4 on.
        c.stream_window = Some(1);
        assert_eq!(of(&c), vec![5, 7, 9, 11]);
    }

    #[test]
    fn rank_outside_world_is_an_error() {
        let e = Sampler::new(vec![10], config(0, 2, 2, 4, Remainder::Pad)).unwrap_err();
        assert!(e.to_string().contains("rank 2 is outside a world of 2"), "{e}");
        let e = Sampler::new(vec![1], config(0, 2, 0, 4, Remainder::Drop)).unwrap_err();
        assert!(e.to_string().contains("cannot give each of 2 ranks"), "{e}");
    }

    #[test]
    fn epochs_differ_and_seeds_differ() {
        let s = Sampler::new(vec![50, 50], config(1, 1, 0, 16, Remainder::Pad)).unwrap();
        assert_ne!(s.epoch(0), s.epoch(1));
        let t = Sampler::new(vec![50, 50], config(2, 1, 0, 16, Remainder::Pad)).unwrap();
        assert_ne!(s.epoch(0), t.epoch(0));
    }

    #[test]
    fn host_sharded_sources_split_among_local_ranks_only() {
        assert_eq!(SamplerConfig::ranks_for(false, 5, 8, 1, 4), (5, 8));
        assert_eq!(SamplerConfig::ranks_for(true, 5, 8, 1, 4), (1, 4));
    }

    #[test]
    fn no_shuffle_keeps_source_order() {
        let mut c = config(1, 1, 0, 16, Remainder::Pad);
        c.shuffle = false;
        let s = Sampler::new(vec![2, 3], c).unwrap();
        let pairs: Vec<_> = s.epoch(5).iter().map(|r| (r.shard, r.index)).collect();
        assert_eq!(pairs, vec![(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]);
    }

    proptest! {
        #[test]
        fn ranks_get_equal_counts_and_disjoint_samples(
            sizes in proptest::collection::vec(0usize..40, 1..8),
            world in 1usize..6,
            seed in any::<u64>(),
            epoch in 0u64..4,
            buffer in 0usize..64,
            drop in any::<bool>(),
            max in proptest::option::of(1usize..200),
            stream_window in proptest::option::of(1usize..5),
        ) {
            let total: usize = sizes.iter().sum::<usize>().min(max.unwrap_or(usize::MAX));
            let remainder = if drop { Remainder::Drop } else { Remainder::Pad };
            prop_assume!(if drop { total >= world } else { total >= 1 });
            let mut seen = HashSet::new();
            let mut counts = Vec::new();
            let mut positions = HashSet::new();
            for rank in 0..world {
                let mut c = config(seed, world, rank, buffer, remainder);
                c.max_samples = max;
                c.stream_window = stream_window;
                let s = Sampler::new(sizes.clone(), c).unwrap();
                let refs = s.epoch(epoch);
                counts.push(refs.len());
                for r in refs {
                    prop_assert!(r.index < sizes[r.shard]);
                    prop_assert!(positions.insert(r.position), "position {} twice", r.position);
                    // Padding repeats at most the samples that wrap around; all others are unique.
                    if (r.position as usize) < total {
                        prop_assert!(seen.insert((r.shard, r.index)), "sample {:?} on two ranks", (r.shard, r.index));
                    }
                }
            }
            prop_assert!(counts.iter().all(|&c| c == counts[0]));
            match remainder {
                Remainder::Drop => prop_assert_eq!(counts[0], total / world),
                Remainder::Pad => prop_assert_eq!(counts[0], total.div_ceil(world)),
            }
            if remainder == Remainder::Pad {
                prop_assert_eq!(seen.len(), total, "every sample is read once per epoch");
            }
        }

        #[test]
        fn a_regrouped_epoch_reads_every_sample_its_earlier_readers_left_once(
            sizes in proptest::collection::vec(0usize..30, 1..6),
            worlds in proptest::collection::vec(1usize..6, 2..5),
            fractions in proptest::collection::vec(0.0f64..=1.0, 4),
            seed in any::<u64>(),
            drop in any::<bool>(),
            stream in any::<bool>(),
        ) {
            let total: usize = sizes.iter().sum();
            let remainder = if drop { Remainder::Drop } else { Remainder::Pad };
            // Whole epochs need a sample for every rank of each rank count (dropping the remainder: as many).
            let most = worlds.iter().copied().max().unwrap_or(1);
            prop_assume!(if drop { total >= most } else { total >= 1 });
            let epoch = 1;
            let base = |world: usize, rank: usize, before: &[Readers]| {
                let mut c = config(seed, world, rank, 8, remainder);
                c.stream_window = stream.then_some(2);
                c.regroup = (!before.is_empty()).then(|| Regroup { epoch, before: before.to_vec() });
                Sampler::new(sizes.clone(), c).unwrap()
            };
            // Each set of readers but the last reads part of its share, then the next takes over.
            let mut before: Vec<Readers> = Vec::new();
            let mut read: Vec<SampleRef> = Vec::new();
            for (k, &world) in worlds.iter().enumerate() {
                let share = base(world, 0, &before).samples_in_epoch(epoch);
                let last = k + 1 == worlds.len();
                let consumed = if last { share } else { (share as f64 * fractions[k]) as usize };
                for rank in 0..world {
                    let s = base(world, rank, &before);
                    prop_assert_eq!(s.samples_in_epoch(epoch), share, "every rank's share is the same");
                    read.extend(s.epoch(epoch).into_iter().take(consumed));
                }
                before.push(Readers { world_size: world, consumed });
            }
            let mut positions = HashSet::new();
            let mut once = HashSet::new();
            for r in &read {
                prop_assert!(r.index < sizes[r.shard]);
                prop_assert!(positions.insert(r.position), "position {} twice", r.position);
                if (r.position as usize) < total {
                    prop_assert!(once.insert((r.shard, r.index)), "sample {:?} read twice", (r.shard, r.index));
                }
            }
            let distinct: HashSet<(usize, usize)> = read.iter().map(|r| (r.shard, r.index)).collect();
            if remainder == Remainder::Pad {
                prop_assert_eq!(distinct.len(), total, "every sample of the epoch is read");
            } else {
                prop_assert_eq!(distinct.len(), read.len(), "dropping the remainder repeats nothing");
            }
            // Other epochs are not regrouped.
            let plain = base(worlds[worlds.len() - 1], 0, &[]);
            prop_assert_eq!(base(worlds[worlds.len() - 1], 0, &before).epoch(epoch + 1), plain.epoch(epoch + 1));
        }

        #[test]
        fn a_window_shuffle_permutes_and_never_reaches_further_than_the_window(
            n in 0usize..60,
            window in 0usize..10,
            seed in any::<u64>(),
        ) {
            let out = window_shuffle((0..n).collect(), window, &mut super::Rng::derive(&[seed]));
            let mut sorted = out.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (0..n).collect::<Vec<_>>());
            for (k, &item) in out.iter().enumerate() {
                prop_assert!(item < k + window.max(1), "item {} as the {}th", item, k);
            }
        }

        #[test]
        fn with_a_stream_window_every_sample_comes_from_the_streams_first_position_plus_window_shards(
            sizes in proptest::collection::vec(1usize..8, 1..30),
            window in 1usize..6,
            world in 1usize..5,
            seed in any::<u64>(),
        ) {
            // Without sample mixing, the sample at stream position p lies in the k-th shard read with k <= p
            // (every shard holds a sample), which is among the first k + window delivered. So every rank begins
            // within the first `rank + window` shards, however large the dataset: no rank waits for the stream's
            // middle, as contiguous blocks would.
            prop_assume!(sizes.iter().sum::<usize>() >= world);
            for rank in 0..world {
                let mut c = config(seed, world, rank, 1, Remainder::Drop);
                c.stream_window = Some(window);
                for r in Sampler::new(sizes.clone(), c).unwrap().epoch(0) {
                    prop_assert_eq!(r.position as usize % world, rank);
                    prop_assert!(r.shard < r.position as usize + window, "shard {} at {}", r.shard, r.position);
                }
            }
        }

        #[test]
        fn the_same_seed_and_epoch_give_the_same_order(
            sizes in proptest::collection::vec(1usize..30, 1..6),
            seed in any::<u64>(),
            epoch in 0u64..10,
        ) {
            let a = Sampler::new(sizes.clone(), config(seed, 2, 1, 7, Remainder::Pad)).unwrap();
            let b = Sampler::new(sizes, config(seed, 2, 1, 7, Remainder::Pad)).unwrap();
            prop_assert_eq!(a.epoch(epoch), b.epoch(epoch));
        }

        #[test]
        fn resumed_epoch_equals_the_rest_of_the_uninterrupted_one(
            sizes in proptest::collection::vec(1usize..30, 1..6),
            seed in any::<u64>(),
            epoch in 0u64..10,
            consumed in 0u64..200,
        ) {
            let s = Sampler::new(sizes, config(seed, 3, 0, 11, Remainder::Pad)).unwrap();
            let full = s.epoch(epoch);
            let rest = s.resume(Position { epoch, samples: consumed });
            let skip = (consumed as usize).min(full.len());
            prop_assert_eq!(&full[skip..], &rest[..]);
        }
    }
}
