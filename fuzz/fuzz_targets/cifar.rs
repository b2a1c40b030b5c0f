//! A CIFAR-10 batch as a pickle and in the binary layout (hytrain_data::fuzzing::cifar).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hytrain_data::fuzzing::cifar(data);
});
