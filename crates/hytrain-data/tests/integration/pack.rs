//! `pack` writes shards that read back as the original samples; `inspect` reports what a source holds.

use crate::common;

use std::sync::Arc;

use common::{fixture, load_dir};
use hytrain_data::format::{decode, Dataset, Format, Image, ImageKind, Input, OpenOptions, Sample, Split};
use hytrain_data::source::SharedSource;
use hytrain_data::{inspect, pack, MemorySource, PackInput, PackOptions, TokenOptions};

fn samples(source: SharedSource, split: Split) -> Vec<Sample> {
    let ds = Dataset::open(source, &OpenOptions { split, skip_bad_samples: false, ..OpenOptions::default() }).unwrap();
    (0..ds.shards().len())
        .flat_map(|i| {
            let name = ds.shards()[i].label();
            ds.read_shard(i).unwrap().into_iter().map(move |r| r.decode("t", &name).unwrap())
        })
        .collect()
}

fn same_content(a: &[Sample], b: &[Sample]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.input, y.input, "{} vs {}", x.key, y.key);
        assert_eq!(x.label, y.label, "{} vs {}", x.key, y.key);
    }
}

fn options(out: &std::path::Path, target: u64) -> PackOptions {
    PackOptions {
        input: PackInput::Detect,
        out_dir: out.to_path_buf(),
        target_shard_bytes: target,
        skip_bad_samples: false,
    }
}

#[test]
fn packed_cifar_reads_back_as_the_original_samples_in_several_shards() {
    let out = tempfile::tempdir().unwrap();
    // About three samples per shard: a CIFAR png is ~3 KiB.
    let report = pack(fixture("cifar-py2"), &options(out.path(), 10_000)).unwrap();
    let packed: SharedSource = Arc::new(load_dir(out.path()));
    assert_eq!(Dataset::open(packed.clone(), &OpenOptions::default()).unwrap().format(), Format::Tar);
    for split in [Split::Train, Split::Test] {
        same_content(&samples(packed.clone(), split), &samples(fixture("cifar-py2"), split));
    }
    let train = &report.splits[0];
    assert_eq!(train.0, Split::Train);
    assert!(train.1.len() >= 2, "{report}");
    assert!(train.1.iter().all(|s| s.bytes <= 10_000 || s.samples == 1));
    let classes: Vec<String> =
        serde_json::from_slice(&std::fs::read(out.path().join("classes.json")).unwrap()).unwrap();
    assert_eq!(classes[0], "airplane");
    assert_eq!(Dataset::open(packed, &OpenOptions::default()).unwrap().classes().unwrap(), classes);
}

#[test]
fn packed_mnist_reads_back_as_the_original_samples() {
    let out = tempfile::tempdir().unwrap();
    pack(fixture("mnist"), &options(out.path(), 1 << 20)).unwrap();
    let packed: SharedSource = Arc::new(load_dir(out.path()));
    for split in [Split::Train, Split::Test] {
        same_content(&samples(packed.clone(), split), &samples(fixture("mnist"), split));
    }
}

#[test]
fn packing_twice_writes_identical_bytes() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    pack(fixture("wds"), &options(a.path(), 4096)).unwrap();
    pack(fixture("wds"), &options(b.path(), 4096)).unwrap();
    let (a, b) = (load_dir(a.path()), load_dir(b.path()));
    let names = |m: &MemorySource| {
        use hytrain_data::source::Source;
        m.list().unwrap().into_iter().map(|o| (o.name.clone(), m.read(&o.name).unwrap())).collect::<Vec<_>>()
    };
    assert_eq!(names(&a), names(&b));
    // Re-packing tar shards keeps jpeg bytes and npy tensors as they were.
    same_content(&samples(Arc::new(a), Split::Train), &samples(fixture("wds"), Split::Train));
}

#[test]
fn image_folder_packs_one_label_per_sorted_class_keeping_jpeg_bytes() {
    let img = |seed: u8| Image {
        height: 6,
        width: 5,
        channels: 3,
        pixels: (0..90).map(|i| (i as u8).wrapping_add(seed)).collect(),
    };
    let jpeg = std::fs::read(common::fixtures().join("wds/train/shard-000001.tar")).unwrap();
    // Take the jpeg member's bytes out of the fixture shard.
    let mut archive = tar::Archive::new(&jpeg[..]);
    let jpg_bytes = archive
        .entries()
        .unwrap()
        .map(Result::unwrap)
        .find(|e| e.path().unwrap().to_string_lossy() == "dir/a.jpg")
        .map(|mut e| {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut v).unwrap();
            v
        })
        .unwrap();
    let source = MemorySource::new("mem:folders")
        .with("train/dog/b.png", decode::png(&img(1)).unwrap())
        .with("train/cat/a.png", decode::png(&img(2)).unwrap())
        .with("train/cat/z.jpg", jpg_bytes.clone())
        .with("train/cat/readme.txt", b"not an image".to_vec())
        .with("val/dog/c.png", decode::png(&img(3)).unwrap());
    let out = tempfile::tempdir().unwrap();
    let report =
        pack(Arc::new(source), &PackOptions { input: PackInput::ImageFolder, ..options(out.path(), 1 << 20) }).unwrap();
    assert_eq!(report.classes.as_deref().unwrap(), ["cat", "dog"]);
    let packed: SharedSource = Arc::new(load_dir(out.path()));
    let train = samples(packed.clone(), Split::Train);
    let labels: Vec<i64> = train.iter().map(|s| s.label).collect();
    assert_eq!(labels, [0, 0, 1], "cat/a, cat/z, dog/b");
    assert_eq!(train[0].input, Input::Image(img(2)));
    assert_eq!(train[1].input, Input::Image(decode::image(&jpg_bytes, ImageKind::Jpeg).unwrap()));
    let test = samples(packed, Split::Test);
    assert_eq!(test.len(), 1);
    assert_eq!((test[0].label, &test[0].input), (1, &Input::Image(img(3))));
    let member_names: Vec<String> = {
        let bytes = std::fs::read(out.path().join("train/shard-000000.tar")).unwrap();
        let mut a = tar::Archive::new(&bytes[..]);
        a.entries().unwrap().map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned()).collect()
    };
    assert!(member_names.contains(&"00000001.jpg".to_string()), "{member_names:?}");
}

#[test]
fn image_folder_with_a_broken_image_names_it_or_skips_it() {
    let source: SharedSource = Arc::new(
        MemorySource::new("mem:broken")
            .with("cat/a.png", common::png(1, 4))
            .with("cat/b.png", b"\x89PNG\r\n\x1a\nbroken".to_vec()),
    );
    let out = tempfile::tempdir().unwrap();
    let opts = PackOptions { input: PackInput::ImageFolder, ..options(out.path(), 1 << 20) };
    let e = pack(source.clone(), &opts).unwrap_err().to_string();
    assert!(e.contains("cat/b.png") && e.contains("does not decode"), "{e}");
    let report = pack(source, &PackOptions { skip_bad_samples: true, ..opts }).unwrap();
    assert_eq!(report.skipped, 1);
    assert_eq!(report.splits[0].1.iter().map(|s| s.samples).sum::<usize>(), 1);
}

#[test]
fn inspect_reports_samples_classes_and_shards_of_each_split() {
    let report = inspect(fixture("cifar-bin"), &TokenOptions::default()).unwrap();
    assert_eq!(report.format, Format::CifarBin);
    assert_eq!(report.splits.len(), 2);
    assert_eq!(report.splits[0].1.iter().map(|s| s.samples).collect::<Vec<_>>(), [4, 3]);
    assert_eq!(report.splits[1].1[0].bytes, 3 * 3073);
    let text = report.to_string();
    assert!(text.contains("train: 7 samples in 2 shards"), "{text}");
    assert!(text.contains("test: 3 samples in 1 shards"), "{text}");
    assert!(text.contains("classes: 10 (airplane"), "{text}");
    let e = inspect(Arc::new(MemorySource::new("mem:void")), &TokenOptions::default()).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
}

/// A source that counts the objects read through it.
#[derive(Debug)]
struct Counting(MemorySource, std::sync::atomic::AtomicUsize);

impl hytrain_data::source::Source for Counting {
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn list(&self) -> Result<Vec<hytrain_data::source::Object>, hytrain_data::Error> {
        self.0.list()
    }
    fn read(&self, name: &str) -> Result<Vec<u8>, hytrain_data::Error> {
        if name.ends_with(".tar") {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.0.read(name)
    }
}

#[test]
fn opening_packed_shards_takes_counts_from_the_index_without_reading_shards() {
    let out = tempfile::tempdir().unwrap();
    pack(fixture("cifar-bin"), &options(out.path(), 10_000)).unwrap();
    let counting = Arc::new(Counting(load_dir(out.path()), Default::default()));
    let ds = Dataset::open(counting.clone(), &OpenOptions::default()).unwrap();
    assert_eq!(counting.1.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(ds.len(), 7);
    same_content(&samples(counting, Split::Train), &samples(fixture("cifar-bin"), Split::Train));
}

#[test]
fn a_stale_index_is_ignored_and_the_shards_are_counted() {
    let out = tempfile::tempdir().unwrap();
    pack(fixture("cifar-bin"), &options(out.path(), 10_000)).unwrap();
    let mut m = load_dir(out.path());
    // Replace the first shard by a one-sample shard: its size no longer matches the index.
    let one = common::tar(&[("x.png", &common::png(1, 32)), ("x.cls", b"3")]);
    m.insert("train/shard-000000.tar", one);
    let ds = Dataset::open(Arc::new(m), &OpenOptions::default()).unwrap();
    let all: usize = ds.shard_sizes().iter().sum();
    assert_eq!(ds.shard_sizes()[0], 1);
    assert_eq!(all, 7 - report_first_shard_samples(out.path()) + 1);
}

fn report_first_shard_samples(out: &std::path::Path) -> usize {
    let index: hytrain_data::format::ShardIndex =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    index.shards.iter().find(|e| e.name == "train/shard-000000.tar").unwrap().samples
}
