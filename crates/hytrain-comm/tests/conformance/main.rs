//! One conformance suite for every [`Collective`] backend: the cases of `cases.rs` (allreduce, reduce_scatter,
//! allgather_blocks, broadcast from every root, allgather, barrier, the refusal of unpadded lengths) against a
//! sequential reference, at 1 to 4 ranks where the backend allows:
//!
//! - the TCP ring (ranks as threads, real loopback sockets), world size 1 through `init`;
//! - shared memory inside a node and hierarchically across simulated nodes (threads here; real processes in
//!   `shm_processes`);
//! - [`InProcess`], and the trait's default `reduce_scatter` and `allgather_blocks` over it;
//! - MPI under a real `mpirun` (`mpi`, with `--features mpi`).

mod cases;
mod mpi;
mod shm_processes;

use std::time::Duration;

use hytrain_comm::testing::{free_port, on_ranks, InProcess};
use hytrain_comm::{init, Buffer, Collective, CommError, CommOptions, Membership, ReduceOp, Transport};

use cases::Order;

/// Every rank's failures, asserted empty.
fn assert_all_pass(what: &str, failures: Vec<Vec<String>>) {
    for (rank, bad) in failures.iter().enumerate() {
        assert!(bad.is_empty(), "{what}, rank {rank}: {bad:?}");
    }
}

/// `world` threads laid out as nodes of `local` ranks, each with the backend `transport` gives it.
fn on_backend(world: usize, local: usize, transport: Transport, expect: &str, order: Order) -> Vec<Vec<String>> {
    let port = free_port();
    let opts = CommOptions {
        rendezvous_timeout: Duration::from_secs(60),
        collective_timeout: Duration::from_secs(60),
        job_id: format!("conformance-{port}"),
        transport,
        ..CommOptions::default()
    };
    on_ranks(world, |rank| {
        let m = Membership {
            rank,
            world_size: world,
            local_rank: rank % local,
            local_world_size: local,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        };
        let mut c = init(&m, false, &opts).expect("init");
        assert_eq!(c.backend(), expect);
        cases::run(c.as_mut(), order, cases::FULL)
    })
}

#[test]
fn one_rank_through_init_passes_every_case() {
    assert_all_pass("world size 1", on_backend(1, 1, Transport::Auto, "ring", Order::SameAsAllreduce));
}

#[test]
fn the_tcp_ring_passes_every_case_at_two_three_and_four_ranks() {
    for world in [2, 3, 4] {
        let failures = on_backend(world, 1, Transport::Ring, "ring", Order::SameAsAllreduce);
        assert_all_pass(&format!("ring of {world}"), failures);
    }
}

#[test]
fn shared_memory_passes_every_case_inside_one_node_of_two_three_and_four_ranks() {
    for world in [2, 3, 4] {
        let failures = on_backend(world, world, Transport::Shm, "shm", Order::SameAsAllreduce);
        assert_all_pass(&format!("shm, one node of {world}"), failures);
    }
}

#[test]
fn shared_memory_passes_every_case_across_two_and_three_nodes_of_two_ranks() {
    for world in [4, 6] {
        let failures = on_backend(world, 2, Transport::Shm, "shm", Order::SameAsAllreduce);
        assert_all_pass(&format!("shm, {} nodes of 2", world / 2), failures);
    }
}

#[test]
fn the_in_process_collective_passes_every_case_at_one_to_four_ranks() {
    for world in 1..=4 {
        let ranks = InProcess::group(world, Duration::from_secs(60));
        let failures = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .into_iter()
                .map(|mut c| s.spawn(move || cases::run(&mut c, Order::SameAsAllreduce, cases::FULL)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_all_pass(&format!("in-process of {world}"), failures);
    }
}

/// Implements only what `Collective` requires, so `reduce_scatter` and `allgather_blocks` are the trait's
/// defaults (allreduce, broadcasts), as for a test double or a single-process collective.
struct Defaults(InProcess);

impl Collective for Defaults {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn backend(&self) -> &'static str {
        "defaults"
    }
    fn allreduce(&mut self, buf: Buffer<'_>, op: ReduceOp) -> Result<(), CommError> {
        self.0.allreduce(buf, op)
    }
    fn broadcast(&mut self, bytes: &mut [u8], root: usize) -> Result<(), CommError> {
        self.0.broadcast(bytes, root)
    }
    fn allgather(&mut self, input: &[u8], output: &mut [u8]) -> Result<(), CommError> {
        self.0.allgather(input, output)
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        self.0.barrier()
    }
}

#[test]
fn the_trait_defaults_for_reduce_scatter_and_allgather_blocks_pass_every_case() {
    for world in [1, 3] {
        let ranks = InProcess::group(world, Duration::from_secs(60));
        let failures = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .into_iter()
                .map(|c| s.spawn(move || cases::run(&mut Defaults(c), Order::SameAsAllreduce, cases::FULL)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_all_pass(&format!("trait defaults over in-process of {world}"), failures);
    }
}
