//! The data fuzz targets (`webdataset_shard`, `npy`, `cifar`) without cargo-fuzz: their committed seed corpora
//! (fuzz/corpus/<target>) replayed, and random or mutated bytes through the same entry points. A panic, a hang or
//! an allocation the bytes do not justify fails the test; `cargo xtask fuzz` runs the coverage-guided search.

use std::path::PathBuf;

use hytrain_data::fuzzing;
use proptest::prelude::*;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect()
}

fn mutate(
    seeds: &[(PathBuf, Vec<u8>)],
    pick: prop::sample::Index,
    at: prop::sample::Index,
    x: u8,
    cut: bool,
) -> Vec<u8> {
    let mut bytes = seeds[pick.index(seeds.len())].1.clone();
    if bytes.is_empty() {
        return bytes;
    }
    let i = at.index(bytes.len());
    if cut {
        bytes.truncate(i)
    } else {
        bytes[i] ^= x.max(1)
    }
    bytes
}

#[test]
fn every_webdataset_seed_parses_or_fails_cleanly_and_the_good_ones_decode() {
    let seeds = corpus("webdataset_shard");
    assert!(seeds.len() >= 10, "the seed corpus is missing");
    let decoded: Vec<(String, usize)> = seeds
        .iter()
        .map(|(p, b)| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                fuzzing::webdataset_shard(b),
            )
        })
        .collect();
    // Strict and skipping parses each decode both samples of the good png shard.
    assert!(decoded.contains(&("png_cls".to_string(), 4)), "{decoded:?}");
    assert!(
        decoded.contains(&("npy_json".to_string(), 2)),
        "{decoded:?}"
    );
}

#[test]
fn every_npy_and_cifar_seed_parses_or_fails_cleanly() {
    let npy = corpus("npy");
    let parsed = npy.iter().filter(|(_, b)| fuzzing::npy(b)).count();
    assert!(
        parsed >= 5 && parsed < npy.len(),
        "{parsed} of {} npy seeds parsed",
        npy.len()
    );
    let cifar = corpus("cifar");
    let with_samples = cifar.iter().filter(|(_, b)| fuzzing::cifar(b) > 0).count();
    assert!(
        with_samples >= 4,
        "only {with_samples} CIFAR seeds held samples"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn mutated_webdataset_shards_never_panic(pick in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(), x in any::<u8>(), cut in any::<bool>()) {
        fuzzing::webdataset_shard(&mutate(&corpus("webdataset_shard"), pick, at, x, cut));
    }

    #[test]
    fn mutated_npy_and_cifar_files_never_panic(pick in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(), x in any::<u8>(), cut in any::<bool>()) {
        fuzzing::npy(&mutate(&corpus("npy"), pick, at, x, cut));
        fuzzing::cifar(&mutate(&corpus("cifar"), pick, at, x, cut));
    }

    #[test]
    fn random_bytes_never_panic_any_format_reader(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        fuzzing::webdataset_shard(&bytes);
        fuzzing::npy(&bytes);
        fuzzing::cifar(&bytes);
    }
}
