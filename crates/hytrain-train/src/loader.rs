//! hytrain-data's loaders as the training loop's [`BatchSource`]s: the bridge between the data plane (folders, S3,
//! SageMaker channels) and [`Trainer::run`](crate::Trainer::run).

use std::sync::Arc;

use hytrain_data::digest::BatchHasher;
use hytrain_data::{Dataset, Loader, LoaderConfig, Position, Regroup, Remainder};

use crate::batches::{BatchError, BatchSource, Batches};

/// A [`Loader`] feeding the training loop, for training or for validation.
///
/// For training every rank reads the loader's equal share (the sampler pads or drops the remainder), deterministic
/// in `(seed, epoch)`, and a resumed epoch starts right after the batches already consumed. For validation the
/// order is the dataset's own, rank r reads the r-th contiguous part, and the padding the sampler adds so every
/// rank holds the same count is cut off again: the ranks together count each validation sample exactly once.
#[derive(Debug)]
pub struct LoaderBatches {
    loader: Loader,
    batch_size: usize,
    /// Validation: the samples of each epoch this rank yields (its part without padding). Training: `None`, the
    /// sampler's share of each epoch.
    evaluation: Option<usize>,
    /// The stream handed out so far, hashed as `hytrain data digest` hashes it ([`LoaderBatches::digesting`]).
    digest: Option<BatchHasher>,
}

impl LoaderBatches {
    /// Training batches from `loader`.
    pub fn training(loader: Loader, batch_size: usize) -> Self {
        LoaderBatches { loader, batch_size, evaluation: None, digest: None }
    }

    /// Hashes every batch handed out, as `hytrain data digest` does, until [`LoaderBatches::take_digest`]: proof of
    /// the exact stream a rank trained on.
    pub fn digesting(mut self) -> Self {
        self.digest = Some(BatchHasher::default());
        self
    }

    /// The batches handed out since digesting began or the last call, and their SHA-256 (hex); hashing starts
    /// afresh. `None` unless [`LoaderBatches::digesting`].
    pub fn take_digest(&mut self) -> Option<(u64, String)> {
        let hasher = self.digest.replace(BatchHasher::default())?;
        Some((hasher.batches(), hasher.finish()))
    }

    /// Validation batches of `dataset` for the rank and world in `config.sampler`; shuffling and augmentation are
    /// turned off and the remainder is padded (then cut), whatever `config` says.
    pub fn evaluation(dataset: Arc<Dataset>, mut config: LoaderConfig) -> Result<Self, hytrain_data::Error> {
        config.sampler.shuffle = false;
        config.sampler.remainder = Remainder::Pad;
        config.transform.augment = false;
        let batch_size = config.batch_size;
        let loader = Loader::new(dataset, config)?;
        let evaluation = Some(unpadded(&loader));
        Ok(LoaderBatches { loader, batch_size, evaluation, digest: None })
    }

    /// The same batches for rank `rank` of `world_size`, after the job's ranks changed: a training source reads
    /// whole epochs from here on (until [`BatchSource::regroup`]), a validation source its new part.
    pub fn rejoin(&mut self, rank: usize, world_size: usize) -> Result<(), hytrain_data::Error> {
        let sampler =
            hytrain_data::SamplerConfig { rank, world_size, regroup: None, ..self.loader.sampler().config().clone() };
        self.loader = self.loader.with_sampler(sampler)?;
        if self.evaluation.is_some() {
            self.evaluation = Some(unpadded(&self.loader));
        }
        Ok(())
    }

    /// The loader.
    pub fn loader(&self) -> &Loader {
        &self.loader
    }

    /// Samples this rank yields per epoch.
    pub fn samples(&self) -> usize {
        self.evaluation.unwrap_or_else(|| self.loader.samples_per_rank())
    }

    fn samples_in(&self, epoch: u64) -> usize {
        self.evaluation.unwrap_or_else(|| self.loader.sampler().samples_in_epoch(epoch))
    }
}

/// A validation loader's samples on its rank without the padding: unshuffled, rank r holds positions
/// `r*per_rank..` of the epoch, and those past the real count are padding.
fn unpadded(loader: &Loader) -> usize {
    let sampler = loader.sampler();
    let per_rank = sampler.samples_per_rank();
    let start = sampler.config().rank * per_rank;
    sampler.epoch_samples().saturating_sub(start).min(per_rank)
}

impl BatchSource for LoaderBatches {
    fn epoch(&mut self, epoch: u64, start_batch: u64) -> Result<Batches<'_>, BatchError> {
        let samples = self.samples_in(epoch);
        let skip = (start_batch as usize).saturating_mul(self.batch_size).min(samples);
        let mut left = samples - skip;
        let batches = self.loader.resume(Position { epoch, samples: skip as u64 })?;
        let mut digest = self.digest.as_mut();
        Ok(Box::new(batches.map_while(move |batch| {
            if left == 0 {
                return None;
            }
            Some(match batch {
                Err(e) => Err(BatchError::from(e)),
                Ok(batch) => {
                    if let Some(hasher) = digest.as_mut() {
                        hasher.update(&batch);
                    }
                    let (xs, ys) = batch.to_tensors();
                    let n = batch.len();
                    let take = n.min(left);
                    left -= take;
                    if take == n {
                        Ok((xs, ys))
                    } else {
                        Ok((xs.narrow(0, 0, take as i64), ys.narrow(0, 0, take as i64)))
                    }
                }
            })
        })))
    }

    fn batches_per_epoch(&self) -> u64 {
        self.samples().div_ceil(self.batch_size) as u64
    }

    fn batches_in_epoch(&self, epoch: u64) -> u64 {
        self.samples_in(epoch).div_ceil(self.batch_size) as u64
    }

    fn regroup(&mut self, regroup: Option<Regroup>) -> Result<(), BatchError> {
        if self.evaluation.is_some() {
            return Err("validation data is never regrouped".into());
        }
        let sampler = hytrain_data::SamplerConfig { regroup, ..self.loader.sampler().config().clone() };
        self.loader = self.loader.with_sampler(sampler)?;
        Ok(())
    }

    fn stream_window(&self) -> Option<usize> {
        self.loader.sampler().config().stream_window
    }
}
