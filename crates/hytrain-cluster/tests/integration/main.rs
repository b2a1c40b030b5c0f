//! hytrain-cluster's integration tests, one test binary: detection of every launcher's and platform's environment
//! (shapes), the errors bad values give, properties over generated environments, and the fuzz corpus replayed.

#[path = "../common/mod.rs"]
mod common;

mod errors;
mod fuzz_corpus;
mod props;
mod shapes;
