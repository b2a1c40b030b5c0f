//! `hytrain data pack` and `hytrain data inspect`.
//!
//! `pack` converts CIFAR-10 (python or binary), MNIST, existing tar shards or an image-folder tree into WebDataset
//! tar shards of about a target size. Output layout:
//!
//! ```text
//! OUT/train/shard-000000.tar, shard-000001.tar, ...   members 00000000.png + 00000000.cls, ... (source order)
//! OUT/test/shard-000000.tar, ...                      when the input has a test split
//! OUT/classes.json                                    ["airplane", "automobile", ...] (index = label), when known
//! OUT/index.json                                      every shard's size and sample count (format::INDEX_FILE)
//! ```
//! Pixels (CIFAR, MNIST) are written as png; png/jpeg inputs keep their original bytes. Keys are the sample's index
//! in its split, zero-padded, so shards sort and read back in the order they were written. Tar headers carry no
//! time, owner or mode of the machine, so packing the same input twice gives identical bytes.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::format::{
    decode, Dataset, Format, ImageKind, IndexEntry, OpenOptions, Payload, RawSample, ShardIndex, Split, TokenOptions,
    CLASSES_FILE, INDEX_FILE,
};
use crate::source::SharedSource;
use crate::Error;

/// What the input of `pack` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PackInput {
    /// A dataset this crate recognises (CIFAR-10 py/bin, MNIST, tar shards).
    #[default]
    Detect,
    /// A tree of images, one folder per class (`cat/001.jpg`, `dog/002.png`; classes sorted by name). Top-level
    /// `train/` and `val/` or `test/` folders, each holding class folders, become the two splits.
    ImageFolder,
}

/// Settings of `pack`.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// The input's kind.
    pub input: PackInput,
    /// Folder the shards are written to (created if missing).
    pub out_dir: PathBuf,
    /// A shard is closed once adding the next sample would pass this size (a shard holds at least one sample).
    pub target_shard_bytes: u64,
    /// Leave out bad samples (counted in the report) instead of failing.
    pub skip_bad_samples: bool,
}

/// One written shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedShard {
    /// Its path.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Samples in it.
    pub samples: usize,
}

/// What `pack` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackReport {
    /// The output folder.
    pub out_dir: PathBuf,
    /// Shards per split.
    pub splits: Vec<(Split, Vec<PackedShard>)>,
    /// Class names written to `classes.json`, when known.
    pub classes: Option<Vec<String>>,
    /// Bad samples left out (with `skip_bad_samples`).
    pub skipped: u64,
}

impl fmt::Display for PackReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "packed into {}", self.out_dir.display())?;
        for (split, shards) in &self.splits {
            let samples: usize = shards.iter().map(|s| s.samples).sum();
            let bytes: u64 = shards.iter().map(|s| s.bytes).sum();
            writeln!(f, "{split}: {samples} samples in {} shards ({})", shards.len(), human(bytes))?;
        }
        if let Some(c) = &self.classes {
            writeln!(f, "classes: {} (written to {CLASSES_FILE})", c.len())?;
        }
        if self.skipped > 0 {
            writeln!(f, "skipped bad samples: {}", self.skipped)?;
        }
        Ok(())
    }
}

/// Writes tar shards of one split, rolling over at the target size.
struct ShardWriter {
    dir: PathBuf,
    target: u64,
    current: Option<(tar::Builder<Vec<u8>>, usize)>,
    written: Vec<PackedShard>,
    next_key: u64,
}

fn member_size(len: usize) -> u64 {
    512 + (len as u64).div_ceil(512) * 512
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |io| Error::Write { path: path.to_path_buf(), io }
}

impl ShardWriter {
    fn new(dir: PathBuf, target: u64) -> Result<ShardWriter, Error> {
        fs::create_dir_all(&dir).map_err(write_err(&dir))?;
        Ok(ShardWriter { dir, target, current: None, written: Vec::new(), next_key: 0 })
    }

    fn add(&mut self, ext: &str, input: &[u8], label: i64) -> Result<(), Error> {
        let key = format!("{:08}", self.next_key);
        self.next_key += 1;
        let label = label.to_string();
        let size = member_size(input.len()) + member_size(label.len());
        if let Some((builder, samples)) = &self.current {
            if *samples > 0 && builder.get_ref().len() as u64 + size + 1024 > self.target {
                self.close()?;
            }
        }
        let (builder, samples) = self.current.get_or_insert_with(|| (tar::Builder::new(Vec::new()), 0));
        for (name, data) in [(format!("{key}.{ext}"), input), (format!("{key}.cls"), label.as_bytes())] {
            let mut header = tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_uid(0);
            header.set_gid(0);
            header.set_entry_type(tar::EntryType::Regular);
            builder
                .append_data(&mut header, &name, data)
                .map_err(|io| Error::Write { path: self.dir.join(&name), io })?;
        }
        *samples += 1;
        Ok(())
    }

    fn close(&mut self) -> Result<(), Error> {
        let Some((builder, samples)) = self.current.take() else {
            return Ok(());
        };
        let path = self.dir.join(format!("shard-{:06}.tar", self.written.len()));
        let bytes = builder.into_inner().map_err(write_err(&path))?;
        write_atomically(&path, &bytes)?;
        self.written.push(PackedShard { path, bytes: bytes.len() as u64, samples });
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<PackedShard>, Error> {
        self.close()?;
        Ok(self.written)
    }
}

/// Writes to a temporary name, syncs, renames: a crash never leaves a half shard under the final name.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension("tar.partial");
    let mut f = fs::File::create(&tmp).map_err(write_err(&tmp))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(write_err(&tmp))?;
    fs::rename(&tmp, path).map_err(write_err(path))
}

fn payload_member(raw: &RawSample) -> Result<(&'static str, Vec<u8>), String> {
    Ok(match &raw.payload {
        Payload::Encoded(ImageKind::Png, b) => ("png", b.clone()),
        Payload::Encoded(ImageKind::Jpeg, b) => ("jpg", b.clone()),
        Payload::Npy(b) => ("npy", b.clone()),
        Payload::Pixels(img) => ("png", decode::png(img)?),
        Payload::Tokens(_) => return Err("token windows are not packed into tar shards".into()),
    })
}

/// Converts the dataset on `source` into tar shards under `options.out_dir`.
pub fn pack(source: SharedSource, options: &PackOptions) -> Result<PackReport, Error> {
    if options.target_shard_bytes == 0 {
        return Err(Error::Config("target shard size must be more than 0 bytes".into()));
    }
    let mut report = PackReport { out_dir: options.out_dir.clone(), splits: Vec::new(), classes: None, skipped: 0 };
    match options.input {
        PackInput::Detect => pack_dataset(source, options, &mut report)?,
        PackInput::ImageFolder => pack_image_folder(source, options, &mut report)?,
    }
    let index = ShardIndex {
        shards: report
            .splits
            .iter()
            .flat_map(|(_, shards)| shards)
            .map(|s| IndexEntry {
                name: s.path.strip_prefix(&options.out_dir).unwrap_or(&s.path).to_string_lossy().replace('\\', "/"),
                bytes: s.bytes,
                samples: s.samples,
            })
            .collect(),
    };
    let path = options.out_dir.join(INDEX_FILE);
    let json = serde_json::to_vec_pretty(&index).expect("an index serializes");
    fs::write(&path, json).map_err(write_err(&path))?;
    if let Some(classes) = &report.classes {
        let path = options.out_dir.join(CLASSES_FILE);
        let json = serde_json::to_vec(classes).expect("strings serialize");
        fs::write(&path, json).map_err(write_err(&path))?;
    }
    Ok(report)
}

fn pack_dataset(source: SharedSource, options: &PackOptions, report: &mut PackReport) -> Result<(), Error> {
    if crate::format::detect(&source.list()?) == Some(Format::Tokens) {
        return Err(Error::Config(format!(
            "{} holds token files (.bin): hytrain trains on them as they are (give --context-length), there is \
             nothing to pack",
            source.describe()
        )));
    }
    for split in [Split::Train, Split::Test] {
        let open = OpenOptions { split, skip_bad_samples: options.skip_bad_samples, ..OpenOptions::default() };
        let dataset = match Dataset::open(source.clone(), &open) {
            Ok(d) => d,
            Err(Error::NoSplit { .. }) if split == Split::Test => continue,
            Err(e) => return Err(e),
        };
        report.skipped += dataset.skipped_at_open();
        if report.classes.is_none() {
            report.classes = dataset.classes().map(<[String]>::to_vec);
        }
        let mut writer = ShardWriter::new(options.out_dir.join(split.to_string()), options.target_shard_bytes)?;
        let shard_ids = (0..dataset.shards().len()).collect();
        for (index, read) in dataset.read_shards(shard_ids) {
            let shard = dataset.shards()[index].label();
            for raw in read? {
                // Tar inputs are checked here, as a reader would decode them; pixels need no check.
                let checked = match &raw.payload {
                    Payload::Pixels(_) => Ok(()),
                    _ => raw.decode(dataset.source_desc(), &shard).map(|_| ()),
                };
                let member = checked.and_then(|()| {
                    payload_member(&raw).map_err(|reason| Error::BadMember {
                        source_desc: dataset.source_desc().to_string(),
                        shard: shard.clone(),
                        member: raw.member.clone(),
                        reason,
                    })
                });
                match member {
                    Ok((ext, bytes)) => writer.add(ext, &bytes, raw.label)?,
                    Err(_) if options.skip_bad_samples => report.skipped += 1,
                    Err(e) => return Err(e),
                }
            }
        }
        report.splits.push((split, writer.finish()?));
    }
    Ok(())
}

fn image_kind(name: &str) -> Option<ImageKind> {
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".png") {
        Some(ImageKind::Png)
    } else if lower.ends_with(".jpg") || lower.ends_with(".jpeg") {
        Some(ImageKind::Jpeg)
    } else {
        None
    }
}

fn pack_image_folder(source: SharedSource, options: &PackOptions, report: &mut PackReport) -> Result<(), Error> {
    let desc = source.describe();
    let objects = source.list()?;
    if objects.is_empty() {
        return Err(Error::Empty(desc));
    }
    let split_dir = |first: &str| match first {
        "train" | "training" => Some(Split::Train),
        "val" | "valid" | "validation" | "test" | "testing" => Some(Split::Test),
        _ => None,
    };
    // (split, class, object name) of every image; with split folders, classes sit one level down.
    let nested = objects.iter().any(|o| o.name.split('/').next().and_then(split_dir).is_some());
    let mut images: Vec<(Split, String, String)> = Vec::new();
    for o in &objects {
        if image_kind(&o.name).is_none() {
            continue;
        }
        let parts: Vec<&str> = o.name.split('/').collect();
        let (split, class) = match (nested, parts.len()) {
            (false, n) if n >= 2 => (Split::Train, parts[0]),
            (true, n) if n >= 3 => match split_dir(parts[0]) {
                Some(s) => (s, parts[1]),
                None => continue,
            },
            _ => continue,
        };
        images.push((split, class.to_string(), o.name.clone()));
    }
    let mut classes: Vec<String> = images.iter().filter(|i| i.0 == Split::Train).map(|i| i.1.clone()).collect();
    classes.sort();
    classes.dedup();
    if classes.is_empty() {
        return Err(Error::UnknownFormat {
            source_desc: desc,
            found: "no images in class folders (expected CLASS/IMAGE.png|jpg, or train/CLASS/IMAGE.jpg)".into(),
        });
    }
    for split in [Split::Train, Split::Test] {
        let mut chosen: Vec<&(Split, String, String)> = images.iter().filter(|i| i.0 == split).collect();
        if chosen.is_empty() {
            continue;
        }
        // Class, then file name: labels are the sorted class index, and the order does not depend on the source.
        chosen.sort_by(|a, b| (&a.1, &a.2).cmp(&(&b.1, &b.2)));
        let mut writer = ShardWriter::new(options.out_dir.join(split.to_string()), options.target_shard_bytes)?;
        let names = chosen.iter().map(|i| i.2.clone()).collect();
        for (item, read) in chosen.iter().zip(source.read_many(names)) {
            let (_, bytes) = read?;
            let bad = |reason: String| Error::BadMember {
                source_desc: desc.clone(),
                shard: item.1.clone(),
                member: item.2.clone(),
                reason,
            };
            let Some(label) = classes.iter().position(|c| *c == item.1) else {
                return Err(bad(format!("class folder {} of the {split} split has no training folder", item.1)));
            };
            let kind = image_kind(&item.2).expect("filtered above");
            match decode::image(&bytes, kind) {
                Ok(_) => {
                    let ext = if kind == ImageKind::Png { "png" } else { "jpg" };
                    writer.add(ext, &bytes, label as i64)?;
                }
                Err(_) if options.skip_bad_samples => report.skipped += 1,
                Err(e) => return Err(bad(format!("image does not decode ({e}); fix it or pass --skip-bad-samples"))),
            }
        }
        report.splits.push((split, writer.finish()?));
    }
    report.classes = Some(classes);
    Ok(())
}

/// One shard, as `inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardReport {
    /// Shard name (MNIST slices show their range).
    pub name: String,
    /// Object size in bytes.
    pub bytes: u64,
    /// Samples.
    pub samples: usize,
}

/// What `inspect` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InspectReport {
    /// The source's description.
    pub source: String,
    /// The recognised format.
    pub format: Format,
    /// Shards per split present.
    pub splits: Vec<(Split, Vec<ShardReport>)>,
    /// Class names, when the dataset names them.
    pub classes: Option<Vec<String>>,
}

/// Opens every split of the dataset on `source` and reports samples, classes and shard sizes.
pub fn inspect(source: SharedSource, tokens: &TokenOptions) -> Result<InspectReport, Error> {
    let mut report = None::<InspectReport>;
    for split in [Split::Train, Split::Test] {
        let dataset = match Dataset::open(
            source.clone(),
            &OpenOptions { split, skip_bad_samples: false, tokens: tokens.clone() },
        ) {
            Ok(d) => Arc::new(d),
            Err(Error::NoSplit { .. }) => continue,
            Err(e) => return Err(e),
        };
        let r = report.get_or_insert_with(|| InspectReport {
            source: dataset.source_desc().to_string(),
            format: dataset.format(),
            splits: Vec::new(),
            classes: dataset.classes().map(<[String]>::to_vec),
        });
        let shards = dataset
            .shards()
            .iter()
            .map(|s| ShardReport { name: s.label(), bytes: s.bytes, samples: s.samples })
            .collect();
        r.splits.push((split, shards));
    }
    report.ok_or_else(|| Error::NoSplit {
        source_desc: source.describe(),
        split: "train or test".into(),
        hint: "the dataset has neither split".into(),
    })
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 20;
        writeln!(f, "source:  {}", self.source)?;
        writeln!(f, "format:  {}", self.format)?;
        match &self.classes {
            Some(c) => {
                let head: Vec<&str> = c.iter().take(10).map(String::as_str).collect();
                let more = if c.len() > head.len() { ", ..." } else { "" };
                writeln!(f, "classes: {} ({}{more})", c.len(), head.join(", "))?;
            }
            None if self.format == Format::Tokens => writeln!(f, "targets: each input position's next token id")?,
            None => writeln!(f, "classes: not named (labels are class indices)")?,
        }
        for (split, shards) in &self.splits {
            let samples: usize = shards.iter().map(|s| s.samples).sum();
            let bytes: u64 = shards.iter().map(|s| s.bytes).sum();
            let min = shards.iter().map(|s| s.samples).min().unwrap_or(0);
            let max = shards.iter().map(|s| s.samples).max().unwrap_or(0);
            writeln!(
                f,
                "{split}: {samples} samples in {} shards ({}), {min}..{max} samples per shard",
                shards.len(),
                human(bytes)
            )?;
            let width = shards.iter().take(SHOWN).map(|s| s.name.len()).max().unwrap_or(0);
            for s in shards.iter().take(SHOWN) {
                writeln!(f, "  {:width$}  {:>10}  {:>7} samples", s.name, human(s.bytes), s.samples)?;
            }
            if shards.len() > SHOWN {
                writeln!(f, "  ... and {} more shards", shards.len() - SHOWN)?;
            }
        }
        Ok(())
    }
}
