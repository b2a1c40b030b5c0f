//! Where the training loop's batches come from: the [`BatchSource`] trait, and [`TensorBatches`], an in-memory
//! source over whole tensors (tests, demos, and small data sets that fit in memory).

use tch::{Kind, Tensor};

use crate::{Result, TrainError};

/// One batch: inputs `[N, ...]` and integer class labels `[N]`.
pub type Batch = (Tensor, Tensor);

/// A data source's error, whatever its crate.
pub type BatchError = Box<dyn std::error::Error + Send + Sync>;

/// The batches of one epoch, in order.
pub type Batches<'a> = Box<dyn Iterator<Item = std::result::Result<Batch, BatchError>> + 'a>;

/// The batches of one rank, epoch by epoch, as the training loop pulls them.
///
/// A training source must give every rank the same [`BatchSource::batches_per_epoch`] (ranks step together) and
/// must be deterministic in `(epoch, start_batch)`: resuming asks for the epoch again, starting after the batches
/// already consumed, and must get the batches an uninterrupted run would have. A validation source instead gives
/// the ranks disjoint samples that together cover the set exactly once; its ranks may have different batch counts.
pub trait BatchSource {
    /// The batches of `epoch` (0-based) from batch number `start_batch` on.
    fn epoch(&mut self, epoch: u64, start_batch: u64) -> std::result::Result<Batches<'_>, BatchError>;

    /// Batches one full epoch yields on this rank.
    fn batches_per_epoch(&self) -> u64;
}

/// SplitMix64: a tiny, well-mixed generator so the data order depends only on (seed, epoch), not on libtorch's
/// global generator, which other threads (ranks in tests) share.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A permutation of `0..n` determined by `seed` and `epoch` (Fisher–Yates).
pub fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<i64> {
    let mut state = seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut p: Vec<i64> = (0..n as i64).collect();
    for i in (1..n).rev() {
        let j = (splitmix(&mut state) % (i as u64 + 1)) as usize;
        p.swap(i, j);
    }
    p
}

#[derive(Debug, Clone, Copy)]
enum Order {
    /// Shuffled each epoch with this seed; every rank gets the same number of samples.
    Shuffled(u64),
    /// Rank r takes samples r, r + world, ... in order; ranks' counts differ by at most one.
    Strided,
}

/// An in-memory [`BatchSource`] over `(inputs, labels)` tensors, sharded over `world` ranks.
///
/// [`TensorBatches::training`] shuffles all samples each epoch with a seeded permutation (the same on every rank),
/// drops the last `n % world` so every rank gets `n / world`, and gives rank r every world-th sample of it, as
/// PyTorch's `DistributedSampler(drop_last=True)`. [`TensorBatches::evaluation`] gives rank r samples r, r+w, ...
/// unshuffled and without padding, so the ranks together see each sample exactly once.
#[derive(Debug)]
pub struct TensorBatches {
    inputs: Tensor,
    labels: Tensor,
    batch_size: usize,
    rank: usize,
    world: usize,
    order: Order,
}

impl TensorBatches {
    /// A training source: seeded shuffle per epoch, equal share per rank, last batch possibly smaller.
    pub fn training(
        inputs: Tensor,
        labels: Tensor,
        batch_size: usize,
        rank: usize,
        world: usize,
        seed: u64,
    ) -> Result<Self> {
        Self::new(inputs, labels, batch_size, rank, world, Order::Shuffled(seed))
    }

    /// A validation source: rank r takes samples r, r + world, ... in order, no padding.
    pub fn evaluation(inputs: Tensor, labels: Tensor, batch_size: usize, rank: usize, world: usize) -> Result<Self> {
        Self::new(inputs, labels, batch_size, rank, world, Order::Strided)
    }

    fn new(inputs: Tensor, labels: Tensor, batch_size: usize, rank: usize, world: usize, order: Order) -> Result<Self> {
        let bad = |detail: String| TrainError::option("in-memory data", detail);
        let n = inputs.size().first().copied().unwrap_or(0);
        if labels.size() != [n] {
            return Err(bad(format!("inputs {:?} and labels {:?} do not pair up", inputs.size(), labels.size())));
        }
        if batch_size == 0 || world == 0 || rank >= world {
            return Err(bad(format!("batch size {batch_size}, rank {rank} of {world} is not usable")));
        }
        if matches!(order, Order::Shuffled(_)) && (n as usize) < world {
            return Err(bad(format!("{n} training samples cannot be shared by {world} ranks")));
        }
        let labels = labels.to_kind(Kind::Int64);
        Ok(TensorBatches { inputs, labels, batch_size, rank, world, order })
    }

    /// The sample indices this rank takes in `epoch`, in order.
    pub fn indices(&self, epoch: u64) -> Vec<i64> {
        let n = self.inputs.size()[0] as usize;
        match self.order {
            Order::Shuffled(seed) => {
                let per_rank = n / self.world;
                permutation(n, seed, epoch).into_iter().skip(self.rank).step_by(self.world).take(per_rank).collect()
            }
            Order::Strided => (self.rank..n).step_by(self.world).map(|i| i as i64).collect(),
        }
    }

    fn samples(&self) -> usize {
        let n = self.inputs.size()[0] as usize;
        match self.order {
            Order::Shuffled(_) => n / self.world,
            Order::Strided => (n + self.world - 1 - self.rank) / self.world,
        }
    }
}

impl BatchSource for TensorBatches {
    fn epoch(&mut self, epoch: u64, start_batch: u64) -> std::result::Result<Batches<'_>, BatchError> {
        let indices = self.indices(epoch);
        let chunks: Vec<Vec<i64>> =
            indices.chunks(self.batch_size).skip(start_batch as usize).map(<[i64]>::to_vec).collect();
        Ok(Box::new(chunks.into_iter().map(move |idx| {
            let idx = Tensor::from_slice(&idx);
            Ok((self.inputs.f_index_select(0, &idx)?, self.labels.f_index_select(0, &idx)?))
        })))
    }

    fn batches_per_epoch(&self) -> u64 {
        self.samples().div_ceil(self.batch_size) as u64
    }
}
