//! `hytrain data`: pack datasets into shards, inspect any source, and digest the exact batch stream a rank would
//! train on, so users can prove two platforms feed identical data.

use std::path::PathBuf;

use anyhow::Context;

use crate::cluster::Plan;
use crate::data::source::{self, OpenOptions, S3Options};
use crate::data::{DigestArgs, PackInput, PackOptions, Readers, Regroup, Remainder, Split};

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

/// `--regroup EPOCH:WxB[,WxB...]`: in EPOCH (from 1, as training logs count), W ranks read B batches of
/// `batch_size` each, then the next set of readers took over.
pub fn parse_regroup(text: &str, batch_size: usize) -> Result<Regroup, String> {
    let form = "expected EPOCH:WxB[,WxB...] such as 1:4x5 (in epoch 1, 4 ranks read 5 batches each)";
    let (epoch, sets) = text.split_once(':').ok_or_else(|| format!("'{text}' has no ':'; {form}"))?;
    let epoch = match epoch.trim().parse::<u64>() {
        Ok(n) if n >= 1 => n - 1,
        _ => return Err(format!("'{epoch}' is not an epoch number (from 1); {form}")),
    };
    let before = sets
        .split(',')
        .map(|set| {
            let (w, b) = set.split_once('x').ok_or_else(|| format!("'{set}' is not WxB; {form}"))?;
            let world_size: usize = w.trim().parse().map_err(|_| format!("'{w}' is not a rank count; {form}"))?;
            let batches: usize = b.trim().parse().map_err(|_| format!("'{b}' is not a batch count; {form}"))?;
            if world_size == 0 {
                return Err(format!("'{set}' names no ranks; {form}"));
            }
            Ok(Readers { world_size, consumed: batches * batch_size })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Regroup { epoch, before })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regroups_read_as_epoch_and_sets_of_readers_in_batches() {
        let r = parse_regroup("2:4x5,3x1", 16).unwrap();
        assert_eq!(r.epoch, 1, "epochs count from 1 on the command line");
        assert_eq!(r.before, vec![Readers { world_size: 4, consumed: 80 }, Readers { world_size: 3, consumed: 16 }]);
    }

    #[test]
    fn malformed_regroups_are_refused_naming_the_part_and_the_form() {
        for (text, part) in [
            ("4x5", "has no ':'"),
            ("x:4x5", "'x' is not an epoch"),
            ("0:4x5", "'0' is not an epoch number (from 1)"),
            ("1:4-5", "'4-5' is not WxB"),
            ("1:0x5", "names no ranks"),
            ("1:4xfive", "'five' is not a batch count"),
        ] {
            let e = parse_regroup(text, 8).unwrap_err();
            assert!(e.contains(part) && e.contains("EPOCH:WxB"), "{text}: {e}");
        }
    }
}
