//! hytrain-data's loaders as the training loop's [`BatchSource`]s: the bridge between the data plane (folders, S3,
//! SageMaker channels) and [`Trainer::run`](crate::Trainer::run).

use std::sync::Arc;

use hytrain_data::{Dataset, Loader, LoaderConfig, Position, Remainder};

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
    /// Samples of each epoch this rank yields (for validation, its part without padding).
    samples: usize,
}

impl LoaderBatches {
    /// Training batches from `loader`.
    pub fn training(loader: Loader, batch_size: usize) -> Self {
        let samples = loader.samples_per_rank();
        LoaderBatches { loader, batch_size, samples }
    }

    /// Validation batches of `dataset` for the rank and world in `config.sampler`; shuffling and augmentation are
    /// turned off and the remainder is padded (then cut), whatever `config` says.
    pub fn evaluation(dataset: Arc<Dataset>, mut config: LoaderConfig) -> Result<Self, hytrain_data::Error> {
        config.sampler.shuffle = false;
        config.sampler.remainder = Remainder::Pad;
        config.transform.augment = false;
        let batch_size = config.batch_size;
        let loader = Loader::new(dataset, config)?;
        let sampler = loader.sampler();
        let per_rank = sampler.samples_per_rank();
        // Unshuffled, rank r holds positions r*per_rank.. of the epoch; those past the real count are padding.
        let start = sampler.config().rank * per_rank;
        let samples = sampler.epoch_samples().saturating_sub(start).min(per_rank);
        Ok(LoaderBatches { loader, batch_size, samples })
    }

    /// The loader.
    pub fn loader(&self) -> &Loader {
        &self.loader
    }

    /// Samples this rank yields per epoch.
    pub fn samples(&self) -> usize {
        self.samples
    }
}

impl BatchSource for LoaderBatches {
    fn epoch(&mut self, epoch: u64, start_batch: u64) -> Result<Batches<'_>, BatchError> {
        let skip = (start_batch as usize).saturating_mul(self.batch_size).min(self.samples);
        let mut left = self.samples - skip;
        let batches = self.loader.resume(Position { epoch, samples: skip as u64 })?;
        Ok(Box::new(batches.map_while(move |batch| {
            if left == 0 {
                return None;
            }
            Some(match batch {
                Err(e) => Err(BatchError::from(e)),
                Ok(batch) => {
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
        self.samples.div_ceil(self.batch_size) as u64
    }

    fn stream_window(&self) -> Option<usize> {
        self.loader.sampler().config().stream_window
    }
}
