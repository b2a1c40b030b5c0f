//! `hytrain data`: pack datasets into shards, inspect any source, and digest the exact batch stream a rank would
//! train on, so users can prove two platforms feed identical data.

use std::path::PathBuf;

use anyhow::Context;

use crate::cluster::Plan;
use crate::data::source::{self, OpenOptions, S3Options};
use crate::data::{DigestArgs, PackInput, PackOptions, Remainder, Split};

/// How to reach a source: the job's channels (for `channel:NAME`) and the S3 settings.
pub fn open_options(plan: &Plan, s3_endpoint: Option<String>, s3_region: Option<String>) -> OpenOptions {
    OpenOptions {
        s3: S3Options { endpoint: s3_endpoint, region: s3_region, ..S3Options::default() },
        channels: plan.paths.channels.clone(),
        ..OpenOptions::default()
    }
}

/// Options of `hytrain data digest`.
#[derive(Debug, Clone)]
pub struct DigestRequest {
    /// The source spec (folder, s3://, pipe:, channel:).
    pub data: String,
    /// Ranks to digest; `None`: every rank of the world.
    pub rank: Option<usize>,
    /// Everything else that shapes the stream.
    pub args: DigestArgs,
}

/// One SHA-256 per requested rank, as `rank R: HEX` lines.
pub fn digest(options: &OpenOptions, request: &DigestRequest) -> anyhow::Result<Vec<(usize, String)>> {
    let world = request.args.world_size;
    if world == 0 {
        anyhow::bail!("--world-size must be at least 1");
    }
    let ranks: Vec<usize> = match request.rank {
        Some(r) if r >= world => anyhow::bail!("--rank {r} is not below --world-size {world}"),
        Some(r) => vec![r],
        None => (0..world).collect(),
    };
    let mut out = Vec::with_capacity(ranks.len());
    for rank in ranks {
        // A Pipe source is read once per epoch; every rank's digest needs its own pass.
        let src = source::open(&request.data, options).with_context(|| format!("cannot open {}", request.data))?;
        let args = DigestArgs { rank, ..request.args.clone() };
        out.push((rank, crate::data::digest(src, &args)?));
    }
    Ok(out)
}

/// Parses `train` / `test`.
pub fn parse_split(text: &str) -> Result<Split, String> {
    match text {
        "train" => Ok(Split::Train),
        "test" | "val" | "validation" => Ok(Split::Test),
        _ => Err(format!("'{text}' is not a split; use train or test")),
    }
}

/// The remainder policy from `--drop-last`.
pub fn remainder(drop_last: bool) -> Remainder {
    if drop_last {
        Remainder::Drop
    } else {
        Remainder::Pad
    }
}

/// `--stream-window`: `off`, or the number of shards the shard shuffle may reach ahead of the stream (at least 1).
pub fn parse_stream_window(text: &str) -> Result<Option<usize>, String> {
    match text.trim() {
        "off" | "none" => Ok(None),
        n => match n.parse::<usize>() {
            Ok(window) if window >= 1 => Ok(Some(window)),
            _ => Err(format!("'{text}' is not a stream window; give a number of shards (at least 1) or off")),
        },
    }
}

/// Options of `hytrain data pack`.
pub fn pack_options(out: PathBuf, image_folder: bool, shard_bytes: usize, skip_bad_samples: bool) -> PackOptions {
    PackOptions {
        input: if image_folder { PackInput::ImageFolder } else { PackInput::Detect },
        out_dir: out,
        target_shard_bytes: shard_bytes as u64,
        skip_bad_samples,
    }
}
