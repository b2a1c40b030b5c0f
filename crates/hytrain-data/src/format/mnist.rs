//! MNIST (and Fashion-MNIST) IDX files, gzipped or not: `train-images-idx3-ubyte[.gz]` with
//! `train-labels-idx1-ubyte[.gz]`, and `t10k-*` for the test split. The files are cut into fixed slices of
//! [`SLICE`] samples so the sampler has shards to shuffle.

use std::io::Read;

use super::{Dataset, Image, Payload, RawSample, Shard, ShardKind, Split};
use crate::source::Object;
use crate::Error;

/// Samples per shard (slice of the IDX files).
pub const SLICE: usize = 10_000;

/// Whether a file holds images or labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `*-images-idx3-ubyte`
    Images,
    /// `*-labels-idx1-ubyte`
    Labels,
}

/// The split and role of an MNIST file name (`train-images-idx3-ubyte.gz`, `t10k-labels.idx1-ubyte`, ...).
pub fn role(basename: &str) -> Option<(Split, Role)> {
    let name = basename.strip_suffix(".gz").unwrap_or(basename);
    let (split, rest) = if let Some(r) = name.strip_prefix("train-") {
        (Split::Train, r)
    } else {
        (Split::Test, name.strip_prefix("t10k-")?)
    };
    match rest {
        "images-idx3-ubyte" | "images.idx3-ubyte" => Some((split, Role::Images)),
        "labels-idx1-ubyte" | "labels.idx1-ubyte" => Some((split, Role::Labels)),
        _ => None,
    }
}

fn basename(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

/// The file for (split, role), preferring an uncompressed copy (torchvision keeps both in `raw/`).
fn find(objects: &[Object], split: Split, want: Role) -> Option<&Object> {
    let mut found: Vec<&Object> = objects.iter().filter(|o| role(basename(&o.name)) == Some((split, want))).collect();
    found.sort_by_key(|o| (o.name.ends_with(".gz"), o.name.clone()));
    found.first().copied()
}

/// Largest IDX file unzipped: MNIST's largest is 47 MB, EMNIST's about 550 MB. A few KiB of gzip can claim
/// gigabytes, so the decompressed size is capped rather than trusted.
pub(crate) const MAX_IDX_BYTES: u64 = 1 << 30;

fn unzip(ds: &Dataset, name: &str, bytes: Vec<u8>) -> Result<Vec<u8>, Error> {
    if !name.ends_with(".gz") {
        return Ok(bytes);
    }
    gunzip(&bytes, MAX_IDX_BYTES).map_err(|reason| Error::BadShard {
        source_desc: ds.source_desc.clone(),
        shard: name.to_string(),
        reason,
    })
}

/// Decompresses gzip `bytes`, refusing to produce more than `limit` bytes.
fn gunzip(bytes: &[u8], limit: u64) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("is not valid gzip ({e}); re-copy it"))?;
    if out.len() as u64 > limit {
        return Err(format!(
            "unzips to more than the limit of {} MiB ({} compressed bytes); an IDX file is never that large: \
             is it a zip bomb?",
            limit >> 20,
            bytes.len()
        ));
    }
    Ok(out)
}

/// Checks an IDX header and returns its dimensions.
fn header(ds: &Dataset, name: &str, bytes: &[u8], dims: usize) -> Result<Vec<usize>, Error> {
    let bad = |reason: String| Error::BadShard { source_desc: ds.source_desc.clone(), shard: name.to_string(), reason };
    let head = 4 + 4 * dims;
    if bytes.len() < head {
        return Err(bad(format!("is too short for an IDX header ({} bytes); re-copy it", bytes.len())));
    }
    let magic = u32::from_be_bytes(bytes[..4].try_into().unwrap());
    if magic != 0x0800 | dims as u32 {
        return Err(bad(format!(
            "has magic 0x{magic:08x}, expected 0x{:08x} (unsigned bytes, {dims} dimensions); is it gzipped without .gz?",
            0x0800 | dims
        )));
    }
    let shape: Vec<usize> =
        (0..dims).map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize).collect();
    // Three u32 dimensions can multiply past usize: compare without overflowing.
    let need = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).and_then(|n| n.checked_add(head));
    if need != Some(bytes.len()) {
        let need = need.map_or_else(|| format!("more than {}", usize::MAX), |n| n.to_string());
        return Err(bad(format!(
            "has {} bytes but its header {shape:?} needs {need}: truncated? re-copy it",
            bytes.len()
        )));
    }
    Ok(shape)
}

/// Indexes the split: reads both files once (kept in the dataset's cache) and cuts them into slices.
pub(crate) fn index(ds: &mut Dataset, objects: &[Object]) -> Result<(), Error> {
    let which = if ds.split == Split::Train { "train" } else { "t10k" };
    let images = find(objects, ds.split, Role::Images);
    let labels = find(objects, ds.split, Role::Labels);
    let (Some(images), Some(labels)) = (images, labels) else {
        return Err(
            ds.no_split(&format!("need both {which}-images-idx3-ubyte[.gz] and {which}-labels-idx1-ubyte[.gz]"))
        );
    };
    let (n, rows, cols) = {
        let img = ds.read_cached(&images.name, |b| unzip(ds, &images.name, b))?;
        let lab = ds.read_cached(&labels.name, |b| unzip(ds, &labels.name, b))?;
        let shape = header(ds, &images.name, &img, 3)?;
        let count = header(ds, &labels.name, &lab, 1)?[0];
        if count != shape[0] {
            return Err(Error::BadShard {
                source_desc: ds.source_desc.clone(),
                shard: labels.name.clone(),
                reason: format!("has {count} labels but {} has {} images", images.name, shape[0]),
            });
        }
        (shape[0], shape[1], shape[2])
    };
    let _ = (rows, cols);
    for start in (0..n).step_by(SLICE) {
        ds.shards.push(Shard {
            name: images.name.clone(),
            bytes: images.size,
            samples: SLICE.min(n - start),
            kind: ShardKind::MnistSlice { labels: labels.name.clone(), start },
        });
    }
    ds.classes = Some((0..10).map(|d| d.to_string()).collect());
    Ok(())
}

/// Reads one slice (from the cache after the first).
pub(crate) fn read_slice(ds: &Dataset, shard: &Shard) -> Result<Vec<RawSample>, Error> {
    let ShardKind::MnistSlice { labels, start } = &shard.kind else {
        return Err(Error::Pipeline("an MNIST shard without its slice".into()));
    };
    let img = ds.read_cached(&shard.name, |b| unzip(ds, &shard.name, b))?;
    let lab = ds.read_cached(labels, |b| unzip(ds, labels, b))?;
    let shape = header(ds, &shard.name, &img, 3)?;
    header(ds, labels, &lab, 1)?;
    let (rows, cols) = (shape[1], shape[2]);
    let which = if basename(&shard.name).starts_with("train") { "train" } else { "t10k" };
    let end = (*start + shard.samples).min(shape[0]);
    Ok((*start..end)
        .map(|i| {
            let px = 16 + i * rows * cols;
            let key = format!("{which}-{i:05}");
            RawSample {
                member: key.clone(),
                key,
                payload: Payload::Pixels(Image {
                    height: rows,
                    width: cols,
                    channels: 1,
                    pixels: img[px..px + rows * cols].to_vec(),
                }),
                label: i64::from(lab[8 + i]),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Dataset, DatasetOptions, MemorySource};
    use std::io::Write;

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn gzip_that_unzips_past_the_limit_is_refused_without_unzipping_it_all() {
        let bomb = gz(&vec![0u8; 3 << 20]);
        assert_eq!(gunzip(&bomb, 3 << 20).unwrap().len(), 3 << 20);
        let e = gunzip(&bomb, 2 << 20).unwrap_err();
        assert!(e.contains("unzips to more than the limit of 2 MiB"), "{e}");
        assert!(e.contains(&format!("({} compressed bytes)", bomb.len())), "{e}");
    }

    #[test]
    fn idx_dimensions_whose_product_overflows_are_an_error_not_a_panic() {
        let mut images = vec![0, 0, 8, 3];
        for _ in 0..3 {
            images.extend_from_slice(&u32::MAX.to_be_bytes());
        }
        let mut labels = vec![0, 0, 8, 1];
        labels.extend_from_slice(&1u32.to_be_bytes());
        labels.push(0);
        let source =
            MemorySource::new("mem").with("train-images-idx3-ubyte", images).with("train-labels-idx1-ubyte", labels);
        let e = Dataset::open(std::sync::Arc::new(source), &DatasetOptions::default()).unwrap_err().to_string();
        assert!(e.contains("train-images-idx3-ubyte") && e.contains(&format!("needs more than {}", usize::MAX)), "{e}");
    }
}
