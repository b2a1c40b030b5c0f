//! `hytrain checkpoint consolidate`: one safetensors file from a checkpoint, sharded (`--shard`, one optimizer
//! file per rank) or not, for export or for tools that read PyTorch-style state: the model's tensors under their
//! names and the per-parameter optimizer state (`optimizer.fc.weight.exp_avg`).

use std::path::PathBuf;

use anyhow::Context;

use crate::data::source::S3Options;
use crate::train::checkpoint::{consolidate as write_consolidated, CheckpointStore, Consolidated};

/// Options of `hytrain checkpoint consolidate`.
#[derive(Debug, Clone)]
pub struct ConsolidateArgs {
    /// The checkpoint folder or `s3://bucket/prefix` a run wrote (`--checkpoint-dir`).
    pub checkpoint_dir: PathBuf,
    /// The step to consolidate; the newest valid checkpoint when `None`.
    pub step: Option<u64>,
    /// The safetensors file to write.
    pub out: PathBuf,
    /// How an `s3://` location is reached.
    pub s3: S3Options,
}

/// Reads the checkpoint (every shard, verified) and writes `args.out`.
pub fn consolidate(args: &ConsolidateArgs) -> anyhow::Result<Consolidated> {
    let location = args.checkpoint_dir.display();
    // Reading keeps every checkpoint: `keep` matters only to a store that writes.
    let store = CheckpointStore::at(&args.checkpoint_dir, &args.s3, usize::MAX)
        .with_context(|| format!("cannot open the checkpoints in {location}"))?;
    write_consolidated(&store, args.step, &args.out).with_context(|| {
        let which = args.step.map_or("the newest valid checkpoint".to_string(), |s| format!("checkpoint step {s}"));
        format!("cannot consolidate {which} of {location} into {}", args.out.display())
    })
}
