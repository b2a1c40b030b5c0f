//! A WebDataset tar shard parsed and every sample decoded (hytrain_data::fuzzing::webdataset_shard).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hytrain_data::fuzzing::webdataset_shard(data);
});
