//! `hytrain data digest`: one SHA-256 per rank over the exact batch stream that rank would train on. The same
//! dataset served from a directory, S3 or a Pipe FIFO must give the same digests; users run it on both platforms.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::augment::{Normalize, Transform};
use crate::format::{Dataset, OpenOptions, Split, TokenDtype, TokenOptions};
use crate::pipeline::{Batch, Inputs, Loader, LoaderConfig};
use crate::sampler::{Regroup, Remainder, SamplerConfig};
use crate::source::SharedSource;
use crate::Error;

/// The settings of one digest (the CLI's flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DigestArgs {
    /// Ranks in the job.
    pub world_size: usize,
    /// The rank whose stream is hashed.
    pub rank: usize,
    /// Epochs hashed, from `first_epoch`.
    pub epochs: u64,
    /// The first epoch hashed (0-based).
    #[serde(default)]
    pub first_epoch: u64,
    /// Samples per batch.
    pub batch_size: usize,
    /// Seed of shuffling and augmentation.
    pub seed: u64,
    /// Random crop and flip (the reference's training transforms).
    pub augment: bool,
    /// Normalization after scaling pixels to `[0, 1]`.
    pub normalize: Normalize,
    /// Resize the shorter side to this many pixels.
    pub resize: Option<usize>,
    /// Crop to this square size (random when augmenting, center otherwise).
    pub crop: Option<usize>,
    /// Zero padding on each side before the random crop.
    pub crop_padding: usize,
    /// Train or test split.
    pub split: Split,
    /// Shuffle buffer size (samples).
    pub shuffle_buffer: usize,
    /// Drop or pad the remainder among ranks.
    pub remainder: Remainder,
    /// At most this many samples per epoch.
    pub max_samples: Option<usize>,
    /// Streaming order: shards shuffled within a window of this many, ranks interleaved (a Pipe channel's).
    pub stream_window: Option<usize>,
    /// An epoch whose readers changed part-way (a rank was lost): `world_size` ranks share what the earlier
    /// readers left of it.
    #[serde(default)]
    pub regroup: Option<Regroup>,
    /// Skip bad samples instead of failing.
    pub skip_bad_samples: bool,
    /// Decode threads (does not change the digest).
    pub workers: usize,
    /// Token data only: ids per sample.
    pub context_length: Option<usize>,
    /// Token data only: how headerless files store ids.
    pub token_dtype: TokenDtype,
}

impl Default for DigestArgs {
    fn default() -> Self {
        let sampler = SamplerConfig::default();
        DigestArgs {
            world_size: 1,
            rank: 0,
            epochs: 1,
            first_epoch: 0,
            batch_size: 64,
            seed: 0,
            augment: false,
            normalize: Normalize::Auto,
            resize: None,
            crop: None,
            crop_padding: Transform::default().crop_padding,
            split: Split::Train,
            shuffle_buffer: sampler.shuffle_buffer,
            remainder: sampler.remainder,
            max_samples: None,
            stream_window: sampler.stream_window,
            regroup: None,
            skip_bad_samples: false,
            workers: LoaderConfig::default().workers,
            context_length: None,
            token_dtype: TokenDtype::default(),
        }
    }
}

impl DigestArgs {
    /// The loader settings these arguments stand for (what training with the same flags uses).
    pub fn loader_config(&self) -> LoaderConfig {
        LoaderConfig {
            batch_size: self.batch_size,
            workers: self.workers,
            transform: Transform {
                augment: self.augment,
                normalize: self.normalize.clone(),
                resize: self.resize,
                crop: self.crop,
                crop_padding: self.crop_padding,
                ..Transform::default()
            },
            sampler: SamplerConfig {
                seed: self.seed,
                world_size: self.world_size,
                rank: self.rank,
                shuffle: true,
                shuffle_buffer: self.shuffle_buffer,
                remainder: self.remainder,
                max_samples: self.max_samples,
                stream_window: self.stream_window,
                regroup: self.regroup.clone(),
            },
            ..LoaderConfig::default()
        }
    }
}

/// Hashes a batch stream: per batch, the number of dimensions and each dimension (u64 LE), the inputs (f32 LE)
/// and the labels (i64 LE).
#[derive(Debug, Clone, Default)]
pub struct BatchHasher {
    sha: Sha256,
    batches: u64,
    samples: u64,
}

impl BatchHasher {
    /// Adds one batch.
    pub fn update(&mut self, batch: &Batch) {
        self.sha.update((batch.shape.len() as u64).to_le_bytes());
        for &d in &batch.shape {
            self.sha.update((d as u64).to_le_bytes());
        }
        let mut buf = Vec::with_capacity(batch.inputs.len() * 8);
        match &batch.inputs {
            Inputs::Float(values) => values.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes())),
            Inputs::Tokens(ids) => ids.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes())),
        }
        self.sha.update(&buf);
        for l in &batch.targets {
            self.sha.update(l.to_le_bytes());
        }
        self.batches += 1;
        self.samples += batch.len() as u64;
    }

    /// Batches hashed so far.
    pub fn batches(&self) -> u64 {
        self.batches
    }

    /// Samples hashed so far.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// The SHA-256, lowercase hex.
    pub fn finish(self) -> String {
        self.sha.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The SHA-256 (hex) of the batch stream rank `args.rank` of `args.world_size` reads in `args.epochs` epochs from
/// `args.first_epoch`.
pub fn digest(source: SharedSource, args: &DigestArgs) -> Result<String, Error> {
    let options = OpenOptions {
        split: args.split,
        skip_bad_samples: args.skip_bad_samples,
        tokens: TokenOptions { context_length: args.context_length, dtype: args.token_dtype, vocab_size: None },
    };
    let dataset = Arc::new(Dataset::open(source, &options)?);
    digest_dataset(dataset, args)
}

/// [`digest`] over an already opened dataset (one `open` for all ranks of a test).
pub fn digest_dataset(dataset: Arc<Dataset>, args: &DigestArgs) -> Result<String, Error> {
    let loader = Loader::new(dataset, args.loader_config())?;
    let mut hasher = BatchHasher::default();
    for epoch in args.first_epoch..args.first_epoch.saturating_add(args.epochs) {
        for batch in loader.epoch(epoch)? {
            hasher.update(&batch?);
        }
    }
    Ok(hasher.finish())
}
