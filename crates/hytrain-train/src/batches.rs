//! Where the training loop's batches come from: the [`BatchSource`] trait, and [`TensorBatches`], an in-memory
//! source over whole tensors (tests, demos, and small data sets that fit in memory); and [`one_ahead`] with
//! [`to_device_async`], which the loop uses to move batches to a GPU one step ahead without the host waiting.

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

    /// Batches `epoch` yields on this rank: fewer than [`BatchSource::batches_per_epoch`] in an epoch regrouped
    /// part-way ([`BatchSource::regroup`]).
    fn batches_in_epoch(&self, _epoch: u64) -> u64 {
        self.batches_per_epoch()
    }

    /// Reads only what `regroup`'s earlier readers left of its epoch (see [`hytrain_data::Regroup`]), or, with
    /// `None`, whole epochs again. Sources without a sampler cannot.
    fn regroup(&mut self, regroup: Option<hytrain_data::Regroup>) -> std::result::Result<(), BatchError> {
        match regroup {
            None => Ok(()),
            Some(r) => Err(format!("this data source cannot continue epoch {} with other ranks", r.epoch + 1).into()),
        }
    }

    /// The sampler's stream window (shards shuffled within a window, ranks interleaved), which like the seed decides
    /// which samples a rank reads; `None` for the full shuffle in contiguous blocks.
    fn stream_window(&self) -> Option<usize> {
        None
    }
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

/// `batches` with each batch moved by `to_device` one batch ahead: handing out batch k first starts moving batch
/// k + 1, so on a GPU its copy is queued before step k's work and the host never waits for one. Errors come out in
/// their place; the move of a batch that is never asked for still happens (one batch of look-ahead).
pub fn one_ahead<'a>(
    batches: Batches<'a>,
    to_device: impl FnMut(Batch) -> std::result::Result<Batch, BatchError> + 'a,
) -> Batches<'a> {
    struct Ahead<'a, F> {
        inner: Batches<'a>,
        to_device: F,
        next: Option<std::result::Result<Batch, BatchError>>,
    }
    impl<F: FnMut(Batch) -> std::result::Result<Batch, BatchError>> Ahead<'_, F> {
        fn pull(&mut self) -> Option<std::result::Result<Batch, BatchError>> {
            self.inner.next().map(|b| b.and_then(&mut self.to_device))
        }
    }
    impl<F: FnMut(Batch) -> std::result::Result<Batch, BatchError>> Iterator for Ahead<'_, F> {
        type Item = std::result::Result<Batch, BatchError>;
        fn next(&mut self) -> Option<Self::Item> {
            let current = match self.next.take() {
                Some(b) => b,
                None => self.pull()?,
            };
            // After an error the loop stops; reading on would only start work nobody takes.
            if current.is_ok() {
                self.next = self.pull();
            }
            Some(current)
        }
    }
    Box::new(Ahead { inner: batches, to_device, next: None })
}

/// Moves a host batch to `device` without the host waiting: on a GPU both tensors are copied into pinned (page-
/// locked) memory and from there with `non_blocking`, which libtorch queues on the current stream and returns at
/// once (a copy from ordinary pageable memory would block the host until the GPU has it). On the CPU it is the
/// batch itself.
pub fn to_device_async(device: tch::Device, (xs, ys): Batch) -> std::result::Result<Batch, BatchError> {
    let context = |e: tch::TchError| -> BatchError { format!("moving a batch to {device:?}: {e}").into() };
    Ok((host_to_device(&xs, device).map_err(context)?, host_to_device(&ys, device).map_err(context)?))
}

/// `t` on `device`: itself when it is there already, else copied from pinned memory with `non_blocking` (see
/// [`to_device_async`]).
pub(crate) fn host_to_device(t: &Tensor, device: tch::Device) -> std::result::Result<Tensor, tch::TchError> {
    if t.device() == device {
        return Ok(t.shallow_clone());
    }
    let pinned = if t.f_is_pinned(device)? { t.shallow_clone() } else { t.f_pin_memory(device)? };
    pinned.f_to_device_(device, pinned.kind(), true, false)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;

    fn batch(i: i64) -> Batch {
        (Tensor::from_slice(&[i as f32]), Tensor::from_slice(&[i]))
    }

    fn label(b: &Batch) -> i64 {
        b.1.int64_value(&[0])
    }

    #[test]
    fn each_batch_is_moved_before_the_one_before_it_is_handed_out() {
        let moved = Rc::new(RefCell::new(Vec::new()));
        let log = moved.clone();
        let inner: Batches<'static> = Box::new((0..4).map(|i| Ok(batch(i))));
        let mut batches = one_ahead(inner, move |b| {
            log.borrow_mut().push(label(&b));
            Ok(b)
        });
        for k in 0..4 {
            let b = batches.next().unwrap().unwrap();
            assert_eq!(label(&b), k);
            // Handing out batch k has moved k + 1 already (the last has no successor).
            assert_eq!(*moved.borrow(), (0..=(k + 1).min(3)).collect::<Vec<_>>());
        }
        assert!(batches.next().is_none());
    }

    #[test]
    fn an_error_comes_out_in_its_place_and_ends_the_look_ahead() {
        let moves = Rc::new(RefCell::new(0));
        let count = moves.clone();
        let inner: Batches<'static> = Box::new(
            vec![Ok(batch(0)), Err::<Batch, BatchError>("shard 3 is corrupt".into()), Ok(batch(2))].into_iter(),
        );
        let mut batches = one_ahead(inner, move |b| {
            *count.borrow_mut() += 1;
            Ok(b)
        });
        assert_eq!(label(&batches.next().unwrap().unwrap()), 0);
        assert_eq!(batches.next().unwrap().unwrap_err().to_string(), "shard 3 is corrupt");
        assert_eq!(*moves.borrow(), 1, "nothing is read or moved past the error");
        // A failed move is an error in the same place.
        let inner: Batches<'static> = Box::new((0..2).map(|i| Ok(batch(i))));
        let mut batches = one_ahead(inner, |b| if label(&b) == 1 { Err("no GPU memory".into()) } else { Ok(b) });
        assert!(batches.next().unwrap().is_ok());
        assert_eq!(batches.next().unwrap().unwrap_err().to_string(), "no GPU memory");
    }

    #[test]
    fn a_batch_already_on_the_cpu_is_handed_over_unchanged() {
        let (xs, ys) = batch(7);
        let ptr = xs.data_ptr();
        let (xs, ys) = to_device_async(tch::Device::Cpu, (xs, ys)).unwrap();
        assert_eq!((xs.data_ptr(), label(&(xs.shallow_clone(), ys))), (ptr, 7));
    }
}
