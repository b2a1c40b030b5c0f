//! The rendezvous store's wire format as its server reads it, greeting first (hytrain_comm::fuzzing::store_wire).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hytrain_comm::fuzzing::store_wire(data);
});
