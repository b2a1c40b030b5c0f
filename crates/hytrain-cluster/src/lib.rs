//! Where am I? `hytrain-cluster` turns the environment a launcher hands a worker (Kubeflow PyTorchJob v1, Kubeflow
//! Trainer v2, SageMaker with or without its training toolkit, torchrun, mpirun, or nothing) into one [`Plan`].
//!
//! This is the only crate of hytrain that reads launcher environment variables or SageMaker's /opt/ml files.
//!
//! ```no_run
//! let plan = hytrain_cluster::detect().expect("launcher environment is consistent");
//! println!("rank {} of {}", plan.topology.rank, plan.topology.world_size);
//! ```
