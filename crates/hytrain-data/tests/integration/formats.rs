//! Formats: every layout reads, the torchvision CIFAR pickles from Python 2 and Python 3 agree, and every kind of bad
//! data gives an error that names the shard and member (or is skipped and counted).

use crate::common;

use std::sync::Arc;

use common::{fixture, fixtures, tar};
use hytrain_data::format::{Dataset, Format, Input, OpenOptions, Sample, Split, TokenOptions};
use hytrain_data::source::SharedSource;
use hytrain_data::{pack, Error, Inputs, Loader, LoaderConfig, MemorySource, PackInput, PackOptions};

fn open(source: SharedSource, split: Split) -> Result<Dataset, Error> {
    Dataset::open(source, &OpenOptions { split, skip_bad_samples: false, ..OpenOptions::default() })
}

/// All samples of a dataset in shard order, decoded.
fn samples(ds: &Dataset) -> Vec<Sample> {
    (0..ds.shards().len())
        .flat_map(|i| {
            let label = ds.shards()[i].label();
            ds.read_shard(i).unwrap().into_iter().map(move |r| r.decode("test", &label).unwrap())
        })
        .collect()
}

fn image(s: &Sample) -> &hytrain_data::format::Image {
    match &s.input {
        Input::Image(i) => i,
        other => panic!("{} is not an image: {other:?}", s.key),
    }
}

const CIFAR_LAYOUTS: [&str; 5] = ["cifar-py2", "cifar-py3", "cifar-py3-bytes", "cifar-py3-proto5", "cifar-bin"];

#[test]
fn cifar_python2_python3_and_binary_files_decode_to_the_same_pixels_and_labels() {
    for split in [Split::Train, Split::Test] {
        let reference = samples(&open(fixture("cifar-bin"), split).unwrap());
        assert_eq!(reference.len(), if split == Split::Train { 7 } else { 3 });
        for layout in CIFAR_LAYOUTS {
            let ds = open(fixture(layout), split).unwrap();
            let expected = if layout == "cifar-bin" { Format::CifarBin } else { Format::CifarPy };
            assert_eq!(ds.format(), expected, "{layout}");
            let got = samples(&ds);
            assert_eq!(got.len(), reference.len(), "{layout} {split}");
            for (a, b) in got.iter().zip(&reference) {
                assert_eq!(image(a), image(b), "{layout} {split} {}", a.key);
                assert_eq!(a.label, b.label, "{layout} {split} {}", a.key);
            }
        }
    }
}

#[test]
fn cifar_binary_record_becomes_an_hwc_image_with_its_label() {
    let raw = std::fs::read(fixtures().join("cifar-bin/cifar-10-batches-bin/data_batch_2.bin")).unwrap();
    let ds = open(fixture("cifar-bin"), Split::Train).unwrap();
    let all = samples(&ds);
    // data_batch_2 is the second shard; its record 1 follows data_batch_1's 4 samples.
    let s = &all[4 + 1];
    assert_eq!(s.key, "data_batch_2.bin-00001");
    let rec = &raw[3073..2 * 3073];
    assert_eq!(s.label, i64::from(rec[0]));
    let img = image(s);
    assert_eq!((img.height, img.width, img.channels), (32, 32, 3));
    for (c, y, x) in [(0, 0, 0), (1, 5, 7), (2, 31, 31)] {
        assert_eq!(img.pixels[(y * 32 + x) * 3 + c], rec[1 + c * 1024 + y * 32 + x]);
    }
}

#[test]
fn cifar_class_names_come_from_batches_meta() {
    let names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];
    for layout in CIFAR_LAYOUTS {
        let ds = open(fixture(layout), Split::Train).unwrap();
        assert_eq!(ds.classes().unwrap(), names, "{layout}");
    }
}

#[test]
fn cifar_truncated_pickle_is_an_error_naming_the_batch() {
    let mut m = common::load_dir(&fixtures().join("cifar-py2"));
    let path = "cifar-10-batches-py/data_batch_2";
    let bytes = std::fs::read(fixtures().join("cifar-py2").join(path)).unwrap();
    m.insert(path, bytes[..bytes.len() / 2].to_vec());
    let e = open(Arc::new(m), Split::Train).unwrap_err().to_string();
    assert!(e.contains("data_batch_2") && e.contains("truncated pickle"), "{e}");
}

#[test]
fn cifar_binary_batch_of_a_wrong_size_is_an_error() {
    let m = MemorySource::new("mem").with("data_batch_1.bin", vec![0; 3073 * 2 + 5]);
    let e = open(Arc::new(m), Split::Train).unwrap_err().to_string();
    assert!(e.contains("data_batch_1.bin") && e.contains("not a multiple of 3073"), "{e}");
}

#[test]
fn mnist_reads_gzipped_and_plain_idx_files() {
    let train = open(fixture("mnist"), Split::Train).unwrap();
    assert_eq!(train.format(), Format::Mnist);
    assert_eq!(train.len(), 12);
    let test = open(fixture("mnist"), Split::Test).unwrap();
    assert_eq!(test.len(), 5);
    let raw_images = std::fs::read(fixtures().join("mnist/t10k-images-idx3-ubyte")).unwrap();
    let raw_labels = std::fs::read(fixtures().join("mnist/t10k-labels-idx1-ubyte")).unwrap();
    for (i, s) in samples(&test).iter().enumerate() {
        let img = image(s);
        assert_eq!((img.height, img.width, img.channels), (28, 28, 1));
        assert_eq!(img.pixels, raw_images[16 + i * 784..16 + (i + 1) * 784]);
        assert_eq!(s.label, i64::from(raw_labels[8 + i]));
    }
}

#[test]
fn mnist_with_fewer_labels_than_images_is_an_error() {
    let mut m = common::load_dir(&fixtures().join("mnist"));
    let mut labels = std::fs::read(fixtures().join("mnist/t10k-labels-idx1-ubyte")).unwrap();
    labels[7] = 4; // header says 4 labels, 5 follow
    m.insert("t10k-labels-idx1-ubyte", labels);
    let e = open(Arc::new(m), Split::Test).unwrap_err().to_string();
    assert!(e.contains("t10k-labels-idx1-ubyte"), "{e}");
}

#[test]
fn webdataset_shards_read_png_jpeg_npy_with_cls_and_json_labels() {
    let ds = open(fixture("wds"), Split::Train).unwrap();
    assert_eq!(ds.format(), Format::Tar);
    assert_eq!(ds.shard_sizes(), vec![4, 3]);
    let all = samples(&ds);
    let cifar = samples(&open(fixture("cifar-bin"), Split::Train).unwrap());
    for i in 0..4 {
        assert_eq!(image(&all[i]), image(&cifar[i]), "png keeps the pixels");
        assert_eq!(all[i].label, cifar[i].label);
    }
    let keys: Vec<&str> = all.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(&keys[4..], ["dir/a", "dir/b", "c"]);
    assert_eq!(all[4].label, 7, "{{\"label\": 7}}");
    assert_eq!(all[5].label, 3, "bare json int");
    assert_eq!(all[6].label, 5, "cls with newline");
    let jpeg = image(&all[4]);
    assert_eq!((jpeg.height, jpeg.width), (32, 32));
    match &all[6].input {
        Input::Tensor(t) => {
            assert_eq!(t.shape, vec![3, 32, 32]);
            assert_eq!(t.to_f32()[150], 1.5);
        }
        other => panic!("npy should be a tensor, not {other:?}"),
    }
}

fn one_shard(name: &str, bytes: Vec<u8>) -> SharedSource {
    Arc::new(MemorySource::new("mem:bad").with(name, bytes))
}

fn good_members() -> Vec<(String, Vec<u8>)> {
    (0..3).flat_map(|i| [(format!("k{i}.png"), common::png(i, 4)), (format!("k{i}.cls"), b"1".to_vec())]).collect()
}

fn build(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let refs: Vec<(&str, &[u8])> = members.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
    tar(&refs)
}

fn open_err(source: SharedSource) -> String {
    open(source, Split::Train).unwrap_err().to_string()
}

#[test]
fn truncated_tar_names_the_shard_and_the_cut_member() {
    let full = build(&good_members());
    // Cut inside the data of the second png (header of member 3 is at 512 + padded size of member 1, ...).
    let cut = full.len() / 2 + 100;
    let e = open_err(one_shard("train-0.tar", full[..cut].to_vec()));
    assert!(e.contains("mem:bad") && e.contains("train-0.tar") && e.contains("truncated"), "{e}");
    assert!(e.contains(".png") || e.contains(".cls"), "names the member: {e}");
}

#[test]
fn tar_cut_at_a_member_boundary_is_truncated_not_short() {
    let full = build(&good_members());
    // Drop the end-of-archive zero blocks: the file now ends right after the last member's data.
    let end = full.iter().rposition(|&b| b != 0).unwrap() + 1;
    let end = end.div_ceil(512) * 512;
    let e = open_err(one_shard("s.tar", full[..end].to_vec()));
    assert!(e.contains("s.tar") && e.contains("truncated") && e.contains("k2.cls"), "{e}");
}

#[test]
fn member_path_with_dotdot_is_an_error_naming_shard_and_member() {
    let mut members = good_members();
    members.insert(2, ("../evil.png".into(), common::png(9, 4)));
    members.insert(3, ("../evil.cls".into(), b"2".to_vec()));
    let e = open_err(one_shard("shard-7.tar", build(&members)));
    assert!(e.contains("shard-7.tar") && e.contains("../evil.png") && e.contains("'..'"), "{e}");
}

#[test]
fn absolute_member_path_is_an_error_naming_shard_and_member() {
    let mut members = good_members();
    members.push(("/etc/passwd.png".into(), common::png(9, 4)));
    let e = open_err(one_shard("shard-8.tar", build(&members)));
    assert!(e.contains("shard-8.tar") && e.contains("/etc/passwd.png") && e.contains("absolute"), "{e}");
}

#[test]
fn file_that_is_not_a_tar_is_an_error() {
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    for bytes in [garbage, b"just some text, not an archive\n".to_vec(), vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3]] {
        let e = open_err(one_shard("fake.tar", bytes));
        assert!(e.contains("fake.tar") && e.contains("not a tar file"), "{e}");
    }
}

#[test]
fn empty_tar_file_is_an_error() {
    let e = open_err(one_shard("zero.tar", Vec::new()));
    assert!(e.contains("zero.tar") && e.contains("empty"), "{e}");
}

#[test]
fn sample_without_label_is_an_error_naming_shard_and_member() {
    let mut members = good_members();
    members.retain(|(n, _)| n != "k1.cls");
    let e = open_err(one_shard("nolabel.tar", build(&members)));
    assert!(e.contains("nolabel.tar") && e.contains("k1.png") && e.contains("no label"), "{e}");
}

#[test]
fn non_integer_label_is_an_error_naming_the_label_member() {
    let mut members = good_members();
    members[1].1 = b"cat".to_vec();
    let e = open_err(one_shard("l.tar", build(&members)));
    assert!(e.contains("l.tar") && e.contains("k0.cls") && e.contains("not an integer"), "{e}");
}

#[test]
fn image_that_does_not_decode_is_an_error_naming_shard_and_member() {
    let mut members = good_members();
    members[2].1 = b"\x89PNG\r\n\x1a\nthis is no png".to_vec();
    let ds = open(one_shard("img.tar", build(&members)), Split::Train).unwrap();
    let raw = ds.read_shard(0).unwrap();
    let e = raw[1].decode(ds.source_desc(), "img.tar").unwrap_err().to_string();
    assert!(
        e.contains("mem:bad") && e.contains("img.tar") && e.contains("k1.png") && e.contains("does not decode"),
        "{e}"
    );
}

#[test]
fn empty_source_is_an_error_saying_so() {
    let e = open_err(Arc::new(MemorySource::new("mem:nothing")));
    assert!(e.contains("mem:nothing") && e.contains("empty"), "{e}");
}

#[test]
fn tar_with_no_samples_is_an_error() {
    let e = open_err(one_shard("none.tar", tar(&[])));
    assert!(e.contains("none.tar") && e.contains("no samples"), "{e}");
}

#[test]
fn unknown_layout_lists_what_was_found() {
    let m = MemorySource::new("mem:odd").with("notes.txt", b"x".to_vec()).with("data.csv", b"y".to_vec());
    let e = open_err(Arc::new(m));
    assert!(e.contains("mem:odd") && e.contains("notes.txt") && e.contains("expected WebDataset"), "{e}");
}

#[test]
fn compressed_archive_alone_says_to_extract_it() {
    let m = MemorySource::new("mem:dl").with("cifar-10-python.tar.gz", vec![0x1f, 0x8b, 8, 0]);
    let e = open_err(Arc::new(m));
    assert!(e.contains("cifar-10-python.tar.gz") && e.contains("extracted first"), "{e}");
}

#[test]
fn tar_splits_follow_train_and_val_folders() {
    let mut m = MemorySource::new("mem:splits");
    m.insert("train/a.tar", build(&good_members()));
    m.insert("train/b.tar", build(&good_members()));
    m.insert("val/c.tar", build(&good_members()));
    let m: SharedSource = Arc::new(m);
    let train = open(m.clone(), Split::Train).unwrap();
    assert_eq!(train.shards().iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["train/a.tar", "train/b.tar"]);
    let test = open(m, Split::Test).unwrap();
    assert_eq!(test.shards().len(), 1);
    assert_eq!(open(one_shard("only.tar", build(&good_members())), Split::Train).unwrap().len(), 3);
    let e = open(one_shard("only.tar", build(&good_members())), Split::Test).unwrap_err().to_string();
    assert!(e.contains("no test split") && e.contains("val/"), "{e}");
}

#[test]
fn skip_bad_samples_leaves_out_bad_ones_and_counts_them() {
    let mut members = good_members();
    members.retain(|(n, _)| n != "k1.cls"); // k1 has no label
    members.push(("k3.png".into(), common::png(3, 4)));
    members.push(("k3.cls".into(), b"x".to_vec())); // bad label
    members.push(("../k4.png".into(), common::png(4, 4)));
    members.push(("../k4.cls".into(), b"1".to_vec()));
    let ds = Dataset::open(
        one_shard("mixed.tar", build(&members)),
        &OpenOptions { split: Split::Train, skip_bad_samples: true, ..OpenOptions::default() },
    )
    .unwrap();
    assert_eq!(ds.len(), 2, "k0 and k2 are good");
    assert_eq!(ds.skipped_at_open(), 3);
    let keys: Vec<String> = ds.read_shard(0).unwrap().into_iter().map(|r| r.key).collect();
    assert_eq!(keys, ["k0", "k2"]);
}

#[test]
fn skip_bad_samples_keeps_the_samples_before_a_truncation() {
    let full = build(&good_members());
    let cut = full.len() / 2 + 100;
    let ds = Dataset::open(
        one_shard("t.tar", full[..cut].to_vec()),
        &OpenOptions { split: Split::Train, skip_bad_samples: true, ..OpenOptions::default() },
    )
    .unwrap();
    assert!(!ds.is_empty() && ds.len() < 3, "{}", ds.len());
    assert_eq!(ds.skipped_at_open(), 1);
}

// --- token files (nanoGPT's and llm.c's .bin) ---

/// nanoGPT's layout: the ids as headerless little-endian uint16.
fn nanogpt_bin(ids: impl IntoIterator<Item = u32>) -> Vec<u8> {
    ids.into_iter().flat_map(|id| u16::try_from(id).unwrap().to_le_bytes()).collect()
}

/// llm.c's layout: 256 int32 `[magic, version, count, 0, ...]`, then the ids, `width` bytes each.
fn llmc_bin(magic: i32, version: i32, count: i32, ids: &[u32], width: usize) -> Vec<u8> {
    let mut header = [0i32; 256];
    header[..3].copy_from_slice(&[magic, version, count]);
    let mut out: Vec<u8> = header.iter().flat_map(|w| w.to_le_bytes()).collect();
    out.extend(ids.iter().flat_map(|id| id.to_le_bytes()[..width].to_vec()));
    out
}

fn token_source(files: Vec<(&str, Vec<u8>)>) -> SharedSource {
    let mut m = MemorySource::new("mem:tokens");
    for (name, bytes) in files {
        m.insert(name, bytes);
    }
    Arc::new(m)
}

fn open_tokens(
    source: SharedSource,
    split: Split,
    context_length: Option<usize>,
    vocab_size: Option<usize>,
) -> Result<Dataset, Error> {
    let tokens = TokenOptions { context_length, vocab_size, ..TokenOptions::default() };
    Dataset::open(source, &OpenOptions { split, tokens, ..OpenOptions::default() })
}

fn windows(ds: &Dataset) -> Vec<Vec<i64>> {
    samples(ds)
        .into_iter()
        .map(|s| match s.input {
            Input::Tokens(ids) => ids,
            other => panic!("{} is not a token window: {other:?}", s.key),
        })
        .collect()
}

#[test]
fn nanogpt_bins_are_cut_into_windows_and_batched_as_inputs_and_next_tokens() {
    let source = token_source(vec![("train.bin", nanogpt_bin(0..42)), ("val.bin", nanogpt_bin(100..111))]);
    let train = open_tokens(source.clone(), Split::Train, Some(8), None).unwrap();
    assert_eq!(train.format(), Format::Tokens);
    // 42 ids hold (42 - 1) / 8 = 5 windows of 9 ids, each starting where the previous one's inputs end.
    let expected: Vec<Vec<i64>> = (0..5).map(|i| (8 * i..8 * i + 9).collect()).collect();
    assert_eq!(windows(&train), expected);
    let val = open_tokens(source, Split::Test, Some(8), None).unwrap();
    assert_eq!(windows(&val), vec![(100..109).collect::<Vec<i64>>()]);

    let mut config = LoaderConfig { batch_size: 2, workers: 2, ..LoaderConfig::default() };
    config.sampler.shuffle = false;
    let loader = Loader::new(Arc::new(train), config).unwrap();
    let first = loader.epoch(0).unwrap().next().unwrap().unwrap();
    assert_eq!((first.shape.clone(), first.target_shape.clone()), (vec![2, 8], vec![2, 8]));
    let inputs: Vec<i64> = (0..16).collect();
    assert_eq!(first.inputs, Inputs::Tokens(inputs));
    assert_eq!(first.targets, (1..9).chain(9..17).collect::<Vec<i64>>());
}

#[test]
fn llm_c_shards_are_read_after_their_header_in_either_width() {
    let gpt2: Vec<u32> = (0..21).map(|i| 50_000 + i).collect();
    let llama: Vec<u32> = (0..21).map(|i| 128_000 + i).collect();
    let source = token_source(vec![
        ("fineweb_train_000001.bin", llmc_bin(20240520, 1, 21, &gpt2, 2)),
        ("fineweb_train_000002.bin", llmc_bin(20240801, 7, 21, &llama, 4)),
    ]);
    let ds = open_tokens(source, Split::Train, Some(10), None).unwrap();
    let got = windows(&ds);
    assert_eq!(got.len(), 4, "each shard holds (21 - 1) / 10 = 2 windows");
    assert_eq!(got[1], (50_010..50_021).collect::<Vec<i64>>());
    assert_eq!(got[2], (128_000..128_011).collect::<Vec<i64>>());
}

#[test]
fn a_large_token_file_is_cut_into_slices_whose_windows_join_up() {
    // 64 uint16 ids per window: a slice of 1 MiB holds 8192 windows; 9000 windows need two slices.
    let ids = 9000 * 64 + 1;
    let source = token_source(vec![("train.bin", nanogpt_bin((0..ids).map(|i| i % 65_000)))]);
    let ds = open_tokens(source, Split::Train, Some(64), None).unwrap();
    assert_eq!(ds.shard_sizes(), vec![8192, 808]);
    let second = ds.read_shard(1).unwrap();
    let label = ds.shards()[1].label();
    assert_eq!(label, "train.bin[8192..9000]");
    let Input::Tokens(first_window) = second[0].decode("test", &label).unwrap().input else { panic!("not tokens") };
    assert_eq!(first_window, (8192 * 64..8192 * 64 + 65).map(|i| i % 65_000).collect::<Vec<i64>>());
}

#[test]
fn token_files_without_a_context_length_are_refused_saying_how_to_give_one() {
    let e = open_tokens(token_source(vec![("train.bin", nanogpt_bin(0..42))]), Split::Train, None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--context-length") && e.contains("mem:tokens"), "{e}");
}

#[test]
fn a_token_file_that_is_not_whole_ids_or_a_truncated_llm_c_shard_is_refused() {
    let mut odd = nanogpt_bin(0..42);
    odd.push(7);
    let e = open_tokens(token_source(vec![("train.bin", odd)]), Split::Train, Some(8), None).unwrap_err().to_string();
    assert!(e.contains("train.bin") && e.contains("--token-dtype uint32"), "{e}");

    let short = llmc_bin(20240520, 1, 100, &(0..21).collect::<Vec<u32>>(), 2);
    let e = open_tokens(token_source(vec![("shard_train_000.bin", short)]), Split::Train, Some(8), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("llm.c header for 100 uint16 tokens") && e.contains("truncated"), "{e}");
}

#[test]
fn a_token_id_outside_the_models_vocabulary_is_an_error_naming_it() {
    let mut ids: Vec<u32> = (0..42).map(|i| i % 10).collect();
    ids[19] = 12;
    let ds = open_tokens(token_source(vec![("train.bin", nanogpt_bin(ids))]), Split::Train, Some(8), Some(10)).unwrap();
    let e = ds.read_shard(0).unwrap_err().to_string();
    assert!(e.contains("token 19 of the file is id 12") && e.contains("vocabulary of 10 ids"), "{e}");
}

#[test]
fn token_data_without_a_validation_file_says_how_to_name_one() {
    let e = open_tokens(token_source(vec![("train.bin", nanogpt_bin(0..42))]), Split::Test, Some(8), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("val.bin"), "{e}");
}

#[test]
fn token_data_is_not_packed_into_tar_shards() {
    let out = tempfile::tempdir().unwrap();
    let options = PackOptions {
        input: PackInput::Detect,
        out_dir: out.path().to_path_buf(),
        target_shard_bytes: 1 << 20,
        skip_bad_samples: false,
    };
    let e = pack(token_source(vec![("train.bin", nanogpt_bin(0..42))]), &options).unwrap_err().to_string();
    assert!(e.contains("nothing to pack") && e.contains("--context-length"), "{e}");
}
