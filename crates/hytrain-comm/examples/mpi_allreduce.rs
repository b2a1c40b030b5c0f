//! Checks the MPI backend under `mpirun` with the conformance cases (tests/conformance/cases.rs): allreduce,
//! reduce_scatter, allgather_blocks, broadcast, allgather and barrier against a sequential reference. Prints one
//! line per failed case and exits 1 if any failed.
//!
//! ```text
//! cargo build -p hytrain-comm --features mpi --example mpi_allreduce
//! mpirun -n 3 --oversubscribe target/debug/examples/mpi_allreduce
//! ```

use hytrain_comm::{init, CommOptions, Membership};

#[path = "../tests/conformance/cases.rs"]
mod cases;
use cases::Order;

fn main() {
    // The example plays the launcher's part (hytrain-cluster in the real binary) and reads mpirun's variables.
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    let (Some(rank), Some(world)) = (env("OMPI_COMM_WORLD_RANK"), env("OMPI_COMM_WORLD_SIZE")) else {
        eprintln!("run me under mpirun: OMPI_COMM_WORLD_RANK / OMPI_COMM_WORLD_SIZE are not set");
        std::process::exit(2);
    };
    let me = Membership {
        rank,
        world_size: world,
        local_rank: env("OMPI_COMM_WORLD_LOCAL_RANK").unwrap_or(rank),
        local_world_size: env("OMPI_COMM_WORLD_LOCAL_SIZE").unwrap_or(world),
        master_addr: "unused-under-mpi".into(),
        master_port: 1,
    };
    let mut comm = match init(&me, true, &CommOptions::default()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rank {rank}: {e}");
            std::process::exit(1);
        }
    };
    let mut failures = Vec::new();
    if comm.backend() != "mpi" {
        failures.push(format!("backend is {} instead of mpi", comm.backend()));
    }
    failures.extend(cases::run(comm.as_mut(), Order::Library, cases::FULL));

    if failures.is_empty() {
        println!("rank {rank}/{world}: all MPI checks passed");
    } else {
        for f in &failures {
            eprintln!("rank {rank}/{world}: FAILED {f}");
        }
        std::process::exit(1);
    }
}
