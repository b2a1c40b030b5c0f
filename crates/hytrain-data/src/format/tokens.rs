//! Token data for language models, in the two layouts their users already have:
//!
//! - nanoGPT's (`data/*/prepare.py`): `train.bin` and `val.bin`, the token ids as little-endian `uint16` with no
//!   header (`np.array(ids, dtype=np.uint16).tofile(path)`, read back with `np.memmap`). Ids of vocabularies past
//!   65,535 are written as `uint32`: say so with [`TokenOptions::dtype`].
//! - llm.c's and modded-nanogpt's shards (`fineweb_train_000001.bin`, `tiny_shakespeare_val.bin`): a header of 256
//!   little-endian `int32` (`[20240520, 1, n_tokens, 0, ...]` for GPT-2's `uint16` ids, `[20240801, 7, n_tokens,
//!   ...]` for LLaMA-3's `uint32` ids), then the ids. A file whose first bytes are such a header, with a count that
//!   matches its size, is read as one; any other `.bin` as a headerless nanoGPT file.
//!
//! A file whose name has a word `val`, `valid`, `validation` or `test` (split at `/`, `_`, `-` and `.`) is in the
//! test split; every other `.bin` is training data. A sample is a window of `context_length + 1` consecutive ids
//! starting at a multiple of `context_length`: its input is the first `context_length`, its targets the last
//! (the input shifted by one), as nanoGPT's and llm.c's loaders cut them. A file of `n` ids holds
//! `(n - 1) / context_length` samples; the ids after the last whole window are not trained on.
//!
//! Files are cut into slices of about [`SLICE_BYTES`], the units the sampler shuffles, each read with one ranged
//! read: a dataset of any size opens by reading one kilobyte of each file.

use super::{Dataset, Payload, RawSample, Shard, ShardKind, Split};
use crate::source::Object;
use crate::Error;

/// Bytes of an llm.c header: 256 `int32`.
const HEADER_BYTES: u64 = 1024;
/// llm.c's GPT-2 shards: magic, version, `uint16` ids.
const LLMC_GPT2: (i32, i32) = (20240520, 1);
/// llm.c's LLaMA-3 shards: magic, version, `uint32` ids.
const LLMC_LLAMA3: (i32, i32) = (20240801, 7);
/// About how many bytes of ids one shard (the sampler's unit) holds.
pub const SLICE_BYTES: usize = 1 << 20;

/// How token ids are stored in a headerless file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    /// Little-endian `uint16` (nanoGPT's, for vocabularies up to 65,536 ids).
    #[default]
    Uint16,
    /// Little-endian `uint32`.
    Uint32,
}

impl TokenDtype {
    /// Bytes per id.
    pub fn size(self) -> usize {
        match self {
            TokenDtype::Uint16 => 2,
            TokenDtype::Uint32 => 4,
        }
    }
}

impl std::str::FromStr for TokenDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uint16" | "u16" => Ok(TokenDtype::Uint16),
            "uint32" | "u32" => Ok(TokenDtype::Uint32),
            other => Err(format!("token dtype {other:?} is not one of uint16, uint32")),
        }
    }
}

impl std::fmt::Display for TokenDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenDtype::Uint16 => "uint16",
            TokenDtype::Uint32 => "uint32",
        })
    }
}

/// How to read token data (ignored by the other formats).
#[derive(Debug, Clone, Default)]
pub struct TokenOptions {
    /// Ids per sample (the model's sequence length). Token data cannot be opened without it.
    pub context_length: Option<usize>,
    /// How headerless files store their ids; llm.c headers say it themselves.
    pub dtype: TokenDtype,
    /// The model's vocabulary size: an id at or past it is an error, not a silent out-of-bounds read.
    pub vocab_size: Option<usize>,
}

fn split_of(name: &str) -> Split {
    let test = name.split(['/', '_', '-', '.']).any(|w| matches!(w, "val" | "valid" | "validation" | "test"));
    if test {
        Split::Test
    } else {
        Split::Train
    }
}

/// Where a file's ids start and how wide they are.
fn layout(ds: &Dataset, object: &Object) -> Result<(u64, TokenDtype), Error> {
    let head = ds.source.read_range(&object.name, 0, HEADER_BYTES)?;
    if head.len() as u64 == HEADER_BYTES {
        let word = |i: usize| i32::from_le_bytes(head[4 * i..4 * i + 4].try_into().unwrap());
        let dtype = match (word(0), word(1)) {
            LLMC_GPT2 => Some(TokenDtype::Uint16),
            LLMC_LLAMA3 => Some(TokenDtype::Uint32),
            _ => None,
        };
        if let Some(dtype) = dtype {
            let count = u64::try_from(word(2)).unwrap_or(u64::MAX);
            if HEADER_BYTES.checked_add(count.saturating_mul(dtype.size() as u64)) == Some(object.size) {
                return Ok((HEADER_BYTES, dtype));
            }
            return Err(Error::BadShard {
                source_desc: ds.source_desc.clone(),
                shard: object.name.clone(),
                reason: format!(
                    "has an llm.c header for {count} {dtype} tokens, but its {} bytes hold {} after the header; \
                     the file is truncated or was not written by llm.c's write_datafile",
                    object.size,
                    object.size.saturating_sub(HEADER_BYTES) as f64 / dtype.size() as f64
                ),
            });
        }
    }
    let dtype = ds.tokens.dtype;
    if !object.size.is_multiple_of(dtype.size() as u64) {
        return Err(Error::BadShard {
            source_desc: ds.source_desc.clone(),
            shard: object.name.clone(),
            reason: format!(
                "its {} bytes are not a whole number of {dtype} token ids; if the ids are uint32, pass \
                 --token-dtype uint32",
                object.size
            ),
        });
    }
    Ok((0, dtype))
}

/// Chooses the split's `*.bin` files and cuts them into slices; reads one kilobyte per file.
pub(crate) fn index(ds: &mut Dataset, objects: &[Object]) -> Result<(), Error> {
    let Some(context) = ds.tokens.context_length.filter(|&t| t > 0) else {
        return Err(Error::Config(format!(
            "{} holds token files (.bin), which need a context length: give --context-length N, or train a model \
             exported with --input-shape N --input-dtype int64",
            ds.source_desc
        )));
    };
    let chosen: Vec<&Object> =
        objects.iter().filter(|o| o.name.ends_with(".bin") && split_of(&o.name) == ds.split).collect();
    if chosen.is_empty() {
        return Err(ds.no_split(match ds.split {
            Split::Test => {
                "name the validation file val.bin (nanoGPT) or *_val_*.bin (llm.c), or give it as --validation"
            }
            Split::Train => "name the training file train.bin (nanoGPT) or *_train_*.bin (llm.c)",
        }));
    }
    for object in chosen {
        let (offset, dtype) = layout(ds, object)?;
        let tokens = (object.size - offset) as usize / dtype.size();
        let samples = tokens.saturating_sub(1) / context;
        let per_slice = (SLICE_BYTES / (context * dtype.size())).max(1);
        for start in (0..samples).step_by(per_slice) {
            ds.shards.push(Shard {
                name: object.name.clone(),
                bytes: object.size,
                samples: per_slice.min(samples - start),
                kind: ShardKind::TokenSlice { start, offset, dtype },
            });
        }
        if samples == 0 {
            tracing::warn!(
                "{}: {} holds {tokens} tokens, fewer than one window of {} (context length + 1); it is not used",
                ds.source_desc,
                object.name,
                context + 1
            );
        }
    }
    Ok(())
}

/// Reads the windows of one slice with one ranged read.
pub(crate) fn read_slice(ds: &Dataset, shard: &Shard) -> Result<Vec<RawSample>, Error> {
    let ShardKind::TokenSlice { start, offset, dtype } = shard.kind else {
        return Err(Error::Pipeline("a token shard without its slice".into()));
    };
    let context = ds.tokens.context_length.unwrap_or(0);
    let width = dtype.size();
    let ids = shard.samples * context + 1;
    let bytes = ds.source.read_range(&shard.name, offset + (start * context * width) as u64, (ids * width) as u64)?;
    if bytes.len() != ids * width {
        return Err(Error::BadShard {
            source_desc: ds.source_desc.clone(),
            shard: shard.label(),
            reason: format!(
                "gave {} bytes where {} were expected; is the file shorter than when the job opened it?",
                bytes.len(),
                ids * width
            ),
        });
    }
    let ids: Vec<i64> = match dtype {
        TokenDtype::Uint16 => bytes.chunks_exact(2).map(|b| i64::from(u16::from_le_bytes([b[0], b[1]]))).collect(),
        TokenDtype::Uint32 => {
            bytes.chunks_exact(4).map(|b| i64::from(u32::from_le_bytes(b.try_into().unwrap()))).collect()
        }
    };
    if let Some(vocab) = ds.tokens.vocab_size {
        if let Some(at) = ids.iter().position(|&id| id >= vocab as i64) {
            return Err(Error::BadShard {
                source_desc: ds.source_desc.clone(),
                shard: shard.label(),
                reason: format!(
                    "token {} of the file is id {}, outside the model's vocabulary of {vocab} ids; tokenize the data \
                     with the model's tokenizer (or give --token-dtype if the ids are not {dtype})",
                    start * context + at,
                    ids[at]
                ),
            });
        }
    }
    let file = shard.name.rsplit('/').next().unwrap_or(&shard.name);
    Ok((0..shard.samples)
        .map(|i| {
            let key = format!("{file}:{}", start + i);
            RawSample {
                member: key.clone(),
                key,
                payload: Payload::Tokens(ids[i * context..(i + 1) * context + 1].to_vec()),
                label: 0,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_words_pick_the_test_files() {
        for name in ["val.bin", "data/val.bin", "fineweb_val_000000.bin", "tiny-shakespeare-test.bin"] {
            assert_eq!(split_of(name), Split::Test, "{name}");
        }
        for name in ["train.bin", "fineweb_train_000001.bin", "interval.bin", "latest.bin"] {
            assert_eq!(split_of(name), Split::Train, "{name}");
        }
    }

    #[test]
    fn token_dtype_parses_and_refuses_others() {
        assert_eq!("uint32".parse::<TokenDtype>(), Ok(TokenDtype::Uint32));
        assert_eq!("u16".parse::<TokenDtype>(), Ok(TokenDtype::Uint16));
        assert!("int64".parse::<TokenDtype>().unwrap_err().contains("uint16, uint32"));
    }
}
