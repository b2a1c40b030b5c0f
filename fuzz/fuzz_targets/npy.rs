//! An .npy member (hytrain_data::fuzzing::npy).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hytrain_data::fuzzing::npy(data);
});
