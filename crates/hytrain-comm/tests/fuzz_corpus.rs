//! The `store_wire` fuzz target without cargo-fuzz: its committed seed corpus (fuzz/corpus/store_wire) replayed,
//! and random or mutated bytes through the same entry point. A panic, a hang or an allocation the bytes do not
//! justify fails the test; `cargo xtask fuzz store_wire` runs the coverage-guided search.

use std::path::PathBuf;

use hytrain_comm::fuzzing::store_wire;
use proptest::prelude::*;

fn corpus() -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/store_wire");
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

#[test]
fn every_seed_of_the_store_wire_corpus_decodes_without_panicking() {
    let seeds = corpus();
    assert!(seeds.len() >= 8, "the seed corpus is missing");
    let decoded: usize = seeds.iter().map(|(_, b)| store_wire(b)).sum();
    // The corpus holds well-formed request streams, not only garbage: the decoder must accept them.
    assert!(
        decoded >= 6,
        "only {decoded} requests decoded from the seeds"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_after_a_valid_greeting_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = corpus().into_iter().find(|(p, _)| p.ends_with("hello_only")).unwrap().1;
        bytes.extend_from_slice(&tail);
        store_wire(&bytes);
    }

    #[test]
    fn seeds_with_bytes_flipped_or_cut_never_panic(pick in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(), x in any::<u8>(), cut in any::<bool>()) {
        let seeds = corpus();
        let mut bytes = seeds[pick.index(seeds.len())].1.clone();
        let i = at.index(bytes.len());
        if cut { bytes.truncate(i) } else { bytes[i] ^= x }
        store_wire(&bytes);
    }
}
