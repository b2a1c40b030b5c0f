//! Checks the MPI backend under `mpirun`: exact allreduce sums and averages for f32, f64 and bf16 at several
//! lengths, then broadcast, allgather and barrier. Prints one line per failed check and exits 1 if any failed.
//!
//! ```text
//! cargo build -p hytrain-comm --features mpi --example mpi_allreduce
//! mpirun -n 3 --oversubscribe target/debug/examples/mpi_allreduce
//! ```

use half::bf16;
use hytrain_comm::{init, Buffer, CommOptions, Membership, ReduceOp};

/// Integer-valued inputs, so every sum below is exact in every type.
fn value(i: usize, rank: usize) -> f64 {
    ((i % 13) + rank) as f64
}

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
    let mut check = |what: String, ok: bool| {
        if !ok {
            failures.push(what);
        }
    };
    if comm.backend() != "mpi" {
        check(format!("backend is {} instead of mpi", comm.backend()), false);
    }
    let sum = |i: usize| (0..world).map(|r| value(i, r)).sum::<f64>();
    for len in [0usize, 1, 7, 1_000_003] {
        for op in [ReduceOp::Sum, ReduceOp::Avg] {
            let expect = |i: usize| {
                if op == ReduceOp::Avg {
                    sum(i) / world as f64
                } else {
                    sum(i)
                }
            };
            let mut a: Vec<f32> = (0..len).map(|i| value(i, rank) as f32).collect();
            let r = comm.allreduce(Buffer::F32(&mut a), op);
            check(
                format!("f32 {op:?} len {len}: {r:?}"),
                r.is_ok() && a.iter().enumerate().all(|(i, v)| *v == expect(i) as f32),
            );
            let mut b: Vec<f64> = (0..len).map(|i| value(i, rank)).collect();
            let r = comm.allreduce(Buffer::F64(&mut b), op);
            check(
                format!("f64 {op:?} len {len}: {r:?}"),
                r.is_ok() && b.iter().enumerate().all(|(i, v)| *v == expect(i)),
            );
            let mut c: Vec<bf16> = (0..len).map(|i| bf16::from_f64(value(i, rank))).collect();
            let r = comm.allreduce(Buffer::Bf16(&mut c), op);
            check(
                format!("bf16 {op:?} len {len}: {r:?}"),
                r.is_ok() && c.iter().enumerate().all(|(i, v)| *v == bf16::from_f64(expect(i))),
            );
        }
    }
    let root = world - 1;
    let mut bytes: Vec<u8> = (0..1000).map(|i| if rank == root { (i % 251) as u8 } else { 0 }).collect();
    let r = comm.broadcast(&mut bytes, root);
    check(format!("broadcast: {r:?}"), r.is_ok() && bytes.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
    let mine = [rank as u8; 5];
    let mut all = vec![0u8; 5 * world];
    let r = comm.allgather(&mine, &mut all);
    check(
        format!("allgather: {r:?}"),
        r.is_ok() && all.chunks(5).enumerate().all(|(q, c)| c.iter().all(|b| *b as usize == q)),
    );
    let r = comm.barrier();
    check(format!("barrier: {r:?}"), r.is_ok());

    if failures.is_empty() {
        println!("rank {rank}/{world}: all MPI checks passed");
    } else {
        for f in &failures {
            eprintln!("rank {rank}/{world}: FAILED {f}");
        }
        std::process::exit(1);
    }
}
