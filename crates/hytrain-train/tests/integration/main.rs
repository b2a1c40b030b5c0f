//! hytrain-train's integration tests, one test binary (each binary links libtorch and the S3 SDK, so one
//! link instead of thirteen): the engine over real collectives, checkpoints to folders and to a real S3 server,
//! export, exported and TorchScript models, mixed precision, parity with PyTorch.

#[path = "../common/mod.rs"]
mod common;
#[path = "../../../hytrain-data/tests/support/mod.rs"]
mod support;

mod checkpoint;
mod config;
mod ddp;
mod device_collective;
mod elastic;
mod export;
mod exported;
mod fuzz_corpus;
mod host_sync;
mod overlap;
mod parity_pytorch;
mod precision;
mod torchscript;
mod trainer;
mod zero;
