//! The `train_config` fuzz target without cargo-fuzz: its committed seed corpus (fuzz/corpus/train_config)
//! replayed, and random or mutated inputs through the same entry point. A panic (an overflow, a multi-line error,
//! a negative learning-rate factor) fails the test; `cargo xtask fuzz train_config` runs the coverage-guided search.

use hytrain_train::fuzzing::config_sources;
use proptest::prelude::*;

#[path = "../../../../fuzz/seeds.rs"]
mod seeds;
use seeds::{corpus, mutate};

#[test]
fn every_seed_of_the_train_config_corpus_layers_or_fails_in_one_line() {
    let seeds = corpus("train_config");
    assert!(seeds.len() >= 10, "the seed corpus is missing");
    for (path, bytes) in &seeds {
        let result = std::panic::catch_unwind(|| config_sources(bytes));
        assert!(result.is_ok(), "{} panicked", path.display());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_keys_and_values_never_panic(
        pairs in proptest::collection::vec((prop::sample::select(vec![
            "epochs", "max-steps", "batch-size", "test_batch_size", "lr", "momentum", "weight-decay", "nesterov",
            "optimizer", "schedule", "warmup", "grad-accum", "clip-grad-norm", "bucket-mb", "seed", "log-interval",
            "checkpoint-every", "keep", "no-resume", "eval-every-epoch", "backend", "other"]),
            prop_oneof![".{0,12}", "(cosine|step|warmup|constant)(:[0-9]{1,20}(\\.[0-9])?){0,4}", "[0-9]{1,21}"]), 0..6),
    ) {
        let mut text = String::from("[cli]\n");
        for (k, v) in pairs {
            text.push_str(&format!("{k}={}\n", v.replace(['\n', '\r'], "")));
        }
        config_sources(text.as_bytes());
    }

    #[test]
    fn seeds_with_bytes_flipped_or_cut_never_panic(pick in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(), x in any::<u8>(), cut in any::<bool>()) {
        let bytes = mutate(&corpus("train_config"), pick, at, x, cut);
        config_sources(&bytes);
    }
}
