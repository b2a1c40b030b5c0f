//! The `launcher_env` fuzz target without cargo-fuzz: its committed seed corpus (fuzz/corpus/launcher_env)
//! replayed, and random or mutated inputs through the same entry point. A panic (including a detection error
//! of more than one line, or a plan that does not read back from JSON) fails the test; `cargo xtask fuzz
//! launcher_env` runs the coverage-guided search.

use hytrain_cluster::fuzzing::detect_sectioned;
use proptest::prelude::*;

#[path = "../../../../fuzz/seeds.rs"]
mod seeds;
use seeds::{corpus, mutate};

#[test]
fn every_seed_of_the_launcher_env_corpus_is_detected_or_refused_in_one_line() {
    let root = tempfile::tempdir().unwrap();
    let seeds = corpus("launcher_env");
    assert!(seeds.len() >= 10, "the seed corpus is missing");
    for (path, bytes) in &seeds {
        let result = std::panic::catch_unwind(|| detect_sectioned(bytes, root.path()));
        assert!(result.is_ok(), "{} panicked", path.display());
    }
}

#[test]
fn the_sagemaker_seed_really_reaches_the_files() {
    // The corpus is only worth replaying if its files are read: a SageMaker seed must give a SageMaker plan.
    let root = tempfile::tempdir().unwrap();
    let (_, bytes) = corpus("launcher_env").into_iter().find(|(p, _)| p.ends_with("sagemaker_files")).unwrap();
    detect_sectioned(&bytes, root.path());
    let env = hytrain_cluster::Env::from_pairs([("HYTRAIN_SM_ROOT", root.path().to_str().unwrap())]);
    let plan = hytrain_cluster::detect_from(&env).unwrap();
    assert_eq!(plan.platform, hytrain_cluster::Platform::Sagemaker);
    assert_eq!((plan.topology.rank, plan.topology.world_size), (1, 2));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_variables_and_config_files_never_panic(
        vars in proptest::collection::vec(("[A-Z_]{1,24}", ".{0,40}"), 0..8),
        file in prop::sample::select(vec!["resourceconfig.json", "hyperparameters.json", "inputdataconfig.json", "checkpointconfig.json", "token"]),
        content in ".{0,200}",
    ) {
        let root = tempfile::tempdir().unwrap();
        let mut text = String::new();
        for (k, v) in vars {
            text.push_str(&format!("{k}={}\n", v.replace('\n', " ")));
        }
        text.push_str(&format!("--- {file}\n{content}\n"));
        detect_sectioned(text.as_bytes(), root.path());
    }

    #[test]
    fn seeds_with_bytes_flipped_or_cut_never_panic(pick in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(), x in any::<u8>(), cut in any::<bool>()) {
        let root = tempfile::tempdir().unwrap();
        let bytes = mutate(&corpus("launcher_env"), pick, at, x, cut);
        detect_sectioned(&bytes, root.path());
    }
}
