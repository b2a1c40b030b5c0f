//! The shared-memory transport between real processes: each test re-runs this test binary once per rank (the
//! child runs the same test with HYTRAIN_SHM_TEST_RANK set and acts as that rank), so ranks share nothing but the
//! rendezvous store and the /dev/shm segment. The children run the conformance cases.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hytrain_comm::testing::free_port;
use hytrain_comm::{init, Buffer, Collective, CommOptions, Membership, ReduceOp, Transport};

use crate::cases::{self, Order};

/// This process's rank when it is a child, with the job's world size, local_world_size and port.
fn child() -> Option<(usize, usize, usize, u16)> {
    let v = std::env::var("HYTRAIN_SHM_TEST_RANK").ok()?;
    let f: Vec<usize> = v.split(',').map(|x| x.parse().unwrap()).collect();
    Some((f[0], f[1], f[2], f[3] as u16))
}

fn connect(rank: usize, world: usize, local: usize, port: u16, collective_s: u64) -> Box<dyn Collective> {
    let m = Membership {
        rank,
        world_size: world,
        local_rank: rank % local,
        local_world_size: local,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    };
    let o = CommOptions {
        rendezvous_timeout: Duration::from_secs(60),
        collective_timeout: Duration::from_secs(collective_s),
        job_id: format!("shm-processes-{port}"),
        transport: Transport::Shm,
        ..CommOptions::default()
    };
    init(&m, false, &o).expect("init")
}

/// Starts `world` children running `test`; their stdout is piped.
fn spawn(test: &str, world: usize, local: usize) -> Vec<Child> {
    let port = free_port();
    (0..world)
        .map(|rank| {
            Command::new(std::env::current_exe().unwrap())
                .args([test, "--exact", "--nocapture", "--test-threads=1"])
                .env("HYTRAIN_SHM_TEST_RANK", format!("{rank},{world},{local},{port}"))
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// What a child printed after `RESULT ` on each line, once it exited.
fn results(children: Vec<Child>) -> Vec<Vec<String>> {
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            String::from_utf8_lossy(&out.stdout)
                .lines()
                // libtest's own "test NAME ... " may precede a line on the same line.
                .filter_map(|l| l.find("RESULT ").map(|at| l[at + 7..].to_string()))
                .collect()
        })
        .collect()
}

/// Child side of the exactness tests: prints the backend and every failing case.
fn exact_child(rank: usize, world: usize, local: usize, port: u16) {
    let mut c = connect(rank, world, local, port, 60);
    println!("RESULT backend {}", c.backend());
    for failure in cases::run(c.as_mut(), Order::SameAsAllreduce, cases::FULL) {
        println!("RESULT wrong {failure}");
    }
    println!("RESULT done");
}

fn check_exact(test: &str, world: usize, local: usize) {
    let per_rank = results(spawn(test, world, local));
    for (rank, lines) in per_rank.iter().enumerate() {
        assert_eq!(lines, &["backend shm".to_string(), "done".to_string()], "world {world} local {local} rank {rank}");
    }
}

#[test]
fn two_three_and_four_processes_pass_every_case() {
    const NAME: &str = "shm_processes::two_three_and_four_processes_pass_every_case";
    if let Some((rank, world, local, port)) = child() {
        return exact_child(rank, world, local, port);
    }
    for world in [2, 3, 4] {
        check_exact(NAME, world, world);
    }
}

#[test]
fn two_nodes_of_two_processes_pass_every_case_hierarchically() {
    const NAME: &str = "shm_processes::two_nodes_of_two_processes_pass_every_case_hierarchically";
    if let Some((rank, world, local, port)) = child() {
        return exact_child(rank, world, local, port);
    }
    check_exact(NAME, 4, 2);
}

#[test]
fn a_process_killed_mid_allreduce_makes_the_others_fail_naming_it_within_the_deadline() {
    const NAME: &str =
        "shm_processes::a_process_killed_mid_allreduce_makes_the_others_fail_naming_it_within_the_deadline";
    if let Some((rank, world, local, port)) = child() {
        // A collective timeout far beyond the test's bound: the failure must be noticed from the dead process,
        // not from silence.
        let mut c = connect(rank, world, local, port, 120);
        let mut v = vec![1.0f32; 4 << 20];
        for i in 0.. {
            if let Err(e) = c.allreduce(Buffer::F32(&mut v), ReduceOp::Sum) {
                println!("RESULT {e}");
                return;
            }
            if rank == 1 && i == 3 {
                println!("RESULT looping");
            }
        }
        return;
    }
    let mut children = spawn(NAME, 3, 3);
    let mut victim = children.remove(1);
    let mut lines = BufReader::new(victim.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap().contains("RESULT looping")), "rank 1 ended before its allreduces got going");
    let killed = Instant::now();
    victim.kill().unwrap();
    victim.wait().unwrap();
    let survivors = results(children);
    assert!(killed.elapsed() < Duration::from_secs(30), "took {:?}", killed.elapsed());
    for (i, lines) in survivors.iter().enumerate() {
        assert_eq!(lines.len(), 1, "survivor {i}: {lines:?}");
        // The store's liveness verdict ("lost rank 1 on HOST: ...") when it comes within a few seconds, else the
        // shared-memory wait's own finding ("lost rank 1 (process exited during allreduce)"), possibly as a local
        // peer recorded it first in the segment ("rank 0 failed first: lost rank 1 ...").
        assert!(
            lines[0].starts_with("lost rank 1 ") || lines[0].contains(" failed first: lost rank 1 "),
            "survivor {i}: {}",
            lines[0]
        );
    }
}
