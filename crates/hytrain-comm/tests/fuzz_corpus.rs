//! The `store_wire` fuzz target without cargo-fuzz: its committed seed corpus (fuzz/corpus/store_wire) replayed,
//! and random or mutated bytes through the same entry point. A panic, a hang or an allocation the bytes do not
//! justify fails the test; `cargo xtask fuzz store_wire` runs the coverage-guided search.

use hytrain_comm::fuzzing::store_wire;
use proptest::prelude::*;

#[path = "../../../fuzz/seeds.rs"]
mod seeds;
use seeds::{corpus, mutate};

#[test]
fn every_seed_of_the_store_wire_corpus_decodes_without_panicking() {
    let seeds = corpus("store_wire");
    assert!(seeds.len() >= 8, "the seed corpus is missing");
    let decoded: usize = seeds.iter().map(|(_, b)| store_wire(b)).sum();
    // The corpus holds well-formed request streams, not only garbage: the decoder must accept them.
    assert!(decoded >= 6, "only {decoded} requests decoded from the seeds");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_after_a_valid_greeting_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = corpus("store_wire").into_iter().find(|(p, _)| p.ends_with("hello_only")).unwrap().1;
        bytes.extend_from_slice(&tail);
        store_wire(&bytes);
    }

    #[test]
    fn seeds_with_bytes_flipped_or_cut_never_panic(pick in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(), x in any::<u8>(), cut in any::<bool>()) {
        let bytes = mutate(&corpus("store_wire"), pick, at, x, cut);
        store_wire(&bytes);
    }
}
