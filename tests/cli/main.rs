//! End-to-end tests of the `hytrain` binary, one test binary (each links all of hytrain, so one link instead of
//! eleven): the CLI as a user runs it, jobs shaped like each platform's (Kubeflow, torchrun, SageMaker, mpirun),
//! resuming, data commands, security of the rendezvous. The fault-injection suite (`tests/fault_injection/`) stays
//! its own binary: it prints a summary of its own and is run alone with `HYTRAIN_FAULT_CASES`.

#[path = "../common/mod.rs"]
mod common;
#[path = "../jobs/mod.rs"]
mod jobs;
#[path = "../../crates/hytrain-data/tests/support/mod.rs"]
mod support;

mod checkpoint_cli;
mod comm_transport;
mod data_cli;
mod data_index;
mod device_cli;
mod elastic;
mod explain;
mod kubeflow_manifests;
mod multiprocess;
mod platform_contract;
mod resume;
mod security;
mod standalone_store;
mod train_cli;
mod train_exported;
