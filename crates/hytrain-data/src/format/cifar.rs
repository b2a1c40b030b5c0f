//! CIFAR-10 in torchvision's "python version" (`cifar-10-batches-py/`: pickled dicts holding a numpy array of
//! 3072-byte CHW rows and a list of labels) and the "binary version" (`cifar-10-batches-bin/`: records of 1 label
//! byte + 3072 CHW pixel bytes). One batch file is one shard; `test_batch` is the test split.

use super::pickle::{self, Value};
use super::{Dataset, Image, Payload, RawSample, Shard, ShardKind, Split};
use crate::source::Object;
use crate::Error;

const SIDE: usize = 32;
const PIXELS: usize = 3 * SIDE * SIDE;
const RECORD: usize = 1 + PIXELS;

fn batch_of(name: &str, ext: &str) -> Option<(Split, u32)> {
    let stem = name.strip_suffix(ext)?;
    if stem == "test_batch" {
        return Some((Split::Test, 0));
    }
    let n = stem.strip_prefix("data_batch_")?;
    n.parse().ok().map(|n| (Split::Train, n))
}

/// The split and batch number of a python-version batch file name (`data_batch_3`, `test_batch`).
pub fn py_batch(basename: &str) -> Option<(Split, u32)> {
    batch_of(basename, "")
}

/// The split and batch number of a binary-version batch file name (`data_batch_3.bin`, `test_batch.bin`).
pub fn bin_batch(basename: &str) -> Option<(Split, u32)> {
    batch_of(basename, ".bin")
}

fn basename(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

fn chosen<'a>(ds: &Dataset, objects: &'a [Object], which: fn(&str) -> Option<(Split, u32)>) -> Vec<&'a Object> {
    let mut v: Vec<(&str, u32, &Object)> = objects
        .iter()
        .filter_map(|o| {
            let (split, n) = which(basename(&o.name))?;
            (split == ds.split).then(|| (o.name.rsplit_once('/').map_or("", |p| p.0), n, o))
        })
        .collect();
    // Numeric order, so data_batch_10 (if any) follows data_batch_9.
    v.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    v.into_iter().map(|x| x.2).collect()
}

fn missing_split(ds: &Dataset, ext: &str) -> Error {
    ds.no_split(&match ds.split {
        Split::Train => {
            format!("no data_batch_N{ext} files; copy the whole cifar-10-batches folder")
        }
        Split::Test => format!("no test_batch{ext} file; copy the whole cifar-10-batches folder"),
    })
}

/// Indexes the python-version batches of the split (parsing each pickle whose count is not known to count its
/// rows).
pub(crate) fn index_py(ds: &mut Dataset, objects: &[Object]) -> Result<(), Error> {
    let batches = chosen(ds, objects, py_batch);
    if batches.is_empty() {
        return Err(missing_split(ds, ""));
    }
    let known = ds.known_counts(objects, &batches);
    let counts =
        ds.count_samples(&batches, known, |ds, o, bytes| Ok(parse_py(bytes, &ds.source_desc, &o.name)?.len()))?;
    for (o, samples) in batches.iter().zip(counts) {
        ds.shards.push(Shard { name: o.name.clone(), bytes: o.size, samples, kind: ShardKind::Object });
    }
    let meta = objects.iter().find(|o| matches!(basename(&o.name), "batches.meta" | "meta"));
    if let Some(meta) = meta {
        let bytes = ds.source.read(&meta.name)?;
        let value = pickle::load(&bytes).map_err(|reason| Error::BadShard {
            source_desc: ds.source_desc.clone(),
            shard: meta.name.clone(),
            reason: format!("{reason}; re-copy batches.meta"),
        })?;
        let names = value.get("label_names").or_else(|| value.get("fine_label_names"));
        ds.classes = names.and_then(|n| n.items()).map(|items| items.iter().filter_map(Value::as_text).collect());
    }
    Ok(())
}

/// Indexes the binary-version batches of the split; the count comes from the size, nothing is read.
pub(crate) fn index_bin(ds: &mut Dataset, objects: &[Object]) -> Result<(), Error> {
    let batches = chosen(ds, objects, bin_batch);
    if batches.is_empty() {
        return Err(missing_split(ds, ".bin"));
    }
    for o in batches {
        if !o.size.is_multiple_of(RECORD as u64) {
            return Err(Error::BadShard {
                source_desc: ds.source_desc.clone(),
                shard: o.name.clone(),
                reason: format!(
                    "has {} bytes, not a multiple of {RECORD} (1 label byte + 3072 pixels): truncated? re-copy it",
                    o.size
                ),
            });
        }
        let samples = (o.size / RECORD as u64) as usize;
        ds.shards.push(Shard { name: o.name.clone(), bytes: o.size, samples, kind: ShardKind::Object });
    }
    if let Some(meta) = objects.iter().find(|o| basename(&o.name) == "batches.meta.txt") {
        let text = ds.source.read(&meta.name)?;
        let names =
            String::from_utf8_lossy(&text).lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
        ds.classes = Some(names);
    }
    Ok(())
}

fn key(shard: &str, i: usize) -> String {
    format!("{}-{i:05}", basename(shard))
}

/// Reads one python-version batch: `{'data': uint8 array (N, 3072), 'labels': [N ints], ...}`, from a Python 2
/// cPickle or any Python 3 re-pickle (protocol 2-5).
pub fn parse_py(bytes: &[u8], source_desc: &str, shard: &str) -> Result<Vec<RawSample>, Error> {
    let bad = |reason: String| Error::BadShard {
        source_desc: source_desc.to_string(),
        shard: shard.to_string(),
        reason: format!("{reason}; is this a CIFAR python batch? re-copy it from the original archive"),
    };
    let value = pickle::load(bytes).map_err(bad)?;
    let data = value.get("data").ok_or_else(|| bad("the pickle has no 'data' entry".into()))?;
    let Value::Array(array) = data else {
        return Err(bad("'data' is not a numpy array".into()));
    };
    let array = array.borrow();
    if !matches!(array.dtype.as_str(), "u1" | "|u1" | "<u1" | "uint8") {
        return Err(bad(format!("'data' has dtype {}, expected uint8", array.dtype)));
    }
    let rows = match array.shape.as_slice() {
        [n, p] if *p == PIXELS => *n,
        [n, 3, 32, 32] => *n,
        s => return Err(bad(format!("'data' has shape {s:?}, expected (N, 3072)"))),
    };
    // The shape comes from the file: a hostile one must not overflow the size it implies.
    let need = rows.checked_mul(PIXELS);
    if need != Some(array.data.len()) {
        return Err(bad(format!(
            "'data' holds {} bytes, its shape needs {}",
            array.data.len(),
            need.map_or_else(|| format!("more than {}", usize::MAX), |n| n.to_string())
        )));
    }
    let labels_value = value
        .get("labels")
        .or_else(|| value.get("fine_labels"))
        .ok_or_else(|| bad("the pickle has no 'labels' entry".into()))?;
    let labels: Vec<i64> = match &labels_value {
        Value::Array(a) => {
            let a = a.borrow();
            let width = match a.dtype.trim_start_matches(['<', '|', '=']) {
                "u1" | "i1" => 1,
                "i2" => 2,
                "i4" => 4,
                "i8" => 8,
                d => return Err(bad(format!("'labels' has dtype {d}, expected an integer type"))),
            };
            a.data
                .chunks_exact(width)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b[..width].copy_from_slice(c);
                    i64::from_le_bytes(b)
                })
                .collect()
        }
        other => other
            .items()
            .ok_or_else(|| bad("'labels' is not a list".into()))?
            .iter()
            .map(|v| match v {
                Value::Int(n) => Ok(*n),
                _ => Err(bad("'labels' holds something that is not an integer".into())),
            })
            .collect::<Result<_, _>>()?,
    };
    if labels.len() != rows {
        return Err(bad(format!("{} labels for {rows} images", labels.len())));
    }
    Ok(labels
        .iter()
        .enumerate()
        .map(|(i, &label)| {
            let key = key(shard, i);
            let image = Image::from_chw(3, SIDE, SIDE, &array.data[i * PIXELS..(i + 1) * PIXELS]);
            RawSample { member: key.clone(), key, payload: Payload::Pixels(image), label }
        })
        .collect())
}

/// Reads one binary-version batch.
pub fn parse_bin(bytes: &[u8], source_desc: &str, shard: &str) -> Result<Vec<RawSample>, Error> {
    if !bytes.len().is_multiple_of(RECORD) {
        return Err(Error::BadShard {
            source_desc: source_desc.to_string(),
            shard: shard.to_string(),
            reason: format!("has {} bytes, not a multiple of {RECORD}: truncated? re-copy it", bytes.len()),
        });
    }
    Ok(bytes
        .chunks_exact(RECORD)
        .enumerate()
        .map(|(i, rec)| {
            let key = key(shard, i);
            let image = Image::from_chw(3, SIDE, SIDE, &rec[1..]);
            RawSample { member: key.clone(), key, payload: Payload::Pixels(image), label: i64::from(rec[0]) }
        })
        .collect())
}
