//! hytrain: a Rust-native data-parallel training worker on libtorch that runs unchanged as a Kubeflow PyTorchJob
//! worker, a SageMaker training entrypoint, under torchrun or mpirun, or on a laptop.
//!
//! The `hytrain` binary is a thin command line over this facade. The crates behind it each have one job:
//! [`cluster`] works out where the process runs (the [`cluster::Plan`]), [`comm`] rendezvouses the ranks and runs
//! collectives, [`data`] reads datasets from folders, S3 and SageMaker channels identically, [`train`] is the
//! data-parallel training engine on libtorch.
//!
//! ```no_run
//! let plan = hytrain::cluster::detect()?;
//! let membership = hytrain::membership(&plan);
//! let options = hytrain::comm::CommOptions::default();
//! let mut collective = hytrain::comm::init(&membership, hytrain::launched_by_mpirun(&plan), &options)?;
//! let mut grads = vec![1.0f32; 1024];
//! collective.allreduce(hytrain::comm::Buffer::F32(&mut grads), hytrain::comm::ReduceOp::Avg)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub use hytrain_cluster as cluster;
pub use hytrain_comm as comm;
pub use hytrain_data as data;
pub use hytrain_train as train;

pub mod commands;
pub mod logging;
pub mod watchdog;

/// What the communication layer needs to know of a plan: who this rank is and where the rendezvous store listens
/// (rank 0's, at the master, or an external one; [`comm::CommOptions::external_store`] says which).
pub fn membership(plan: &cluster::Plan) -> comm::Membership {
    let t = &plan.topology;
    let (store_addr, store_port) = plan.rendezvous.endpoint(t);
    comm::Membership {
        rank: t.rank,
        world_size: t.world_size,
        local_rank: t.local_rank,
        local_world_size: t.local_world_size,
        master_addr: plan.address_of(store_addr),
        master_port: store_port,
    }
}

/// Whether mpirun started this process, so its ranks come from MPI rather than the rendezvous store.
pub fn launched_by_mpirun(plan: &cluster::Plan) -> bool {
    plan.launcher == cluster::Launcher::Mpirun
}
