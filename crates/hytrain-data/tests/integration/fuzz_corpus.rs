//! The data fuzz targets (`webdataset_shard`, `npy`, `cifar`) without cargo-fuzz: their committed seed corpora
//! (fuzz/corpus/<target>) replayed, and random or mutated bytes through the same entry points. A panic, a hang or
//! an allocation the bytes do not justify fails the test; `cargo xtask fuzz` runs the coverage-guided search.

use hytrain_data::fuzzing;
use proptest::prelude::*;

#[path = "../../../../fuzz/seeds.rs"]
mod seeds;
use seeds::{corpus, mutate};

#[test]
fn every_webdataset_seed_parses_or_fails_cleanly_and_the_good_ones_decode() {
    let seeds = corpus("webdataset_shard");
    assert!(seeds.len() >= 10, "the seed corpus is missing");
    let decoded: Vec<(String, usize)> = seeds
        .iter()
        .map(|(p, b)| (p.file_name().unwrap().to_string_lossy().into_owned(), fuzzing::webdataset_shard(b)))
        .collect();
    // Strict and skipping parses each decode both samples of the good png shard.
    assert!(decoded.contains(&("png_cls".to_string(), 4)), "{decoded:?}");
    assert!(decoded.contains(&("npy_json".to_string(), 2)), "{decoded:?}");
}

#[test]
fn every_npy_and_cifar_seed_parses_or_fails_cleanly() {
    let npy = corpus("npy");
    let parsed = npy.iter().filter(|(_, b)| fuzzing::npy(b)).count();
    assert!(parsed >= 5 && parsed < npy.len(), "{parsed} of {} npy seeds parsed", npy.len());
    let cifar = corpus("cifar");
    let with_samples = cifar.iter().filter(|(_, b)| fuzzing::cifar(b) > 0).count();
    assert!(with_samples >= 4, "only {with_samples} CIFAR seeds held samples");
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
