//! A run's configuration layered from flags, HYTRAIN_*/SM_HP_* variables and hyperparameters (hytrain_train::fuzzing::config_sources).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hytrain_train::fuzzing::config_sources(data);
});
