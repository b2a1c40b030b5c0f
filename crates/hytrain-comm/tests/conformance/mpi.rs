//! The MPI backend under a real `mpirun` (only with `--features mpi`).
//!
//! Needs Open MPI: `apt-get install -y libopenmpi-dev openmpi-bin libclang-dev` (`cargo xtask setup` does it) so
//! that the crate builds and `mpirun` is on PATH. The test runs the `mpi_allreduce` example, which `cargo test`
//! builds beside the test binary, with 1 to 4 processes; the example runs the conformance cases (`cases.rs`) and
//! exits non-zero on any failure. Open MPI refuses to run as root unless OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM) are
//! set; the test sets them for its child only.
#![cfg(feature = "mpi")]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn example() -> PathBuf {
    // target/<profile>/deps/mpi-<hash> -> target/<profile>/examples/mpi_allreduce
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().and_then(|d| d.parent()).unwrap().join("examples").join("mpi_allreduce");
    assert!(
        path.exists(),
        "{} is missing; run the tests with `cargo test -p hytrain-comm --features mpi`",
        path.display()
    );
    path
}

fn run_under_mpirun(n: usize) {
    let mut child = Command::new("mpirun")
        .args(["-n", &n.to_string(), "--oversubscribe"])
        .arg(example())
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start mpirun ({e}); install openmpi-bin (cargo xtask setup)"));
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mpirun -n {n} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for rank in 0..n {
        assert!(stdout.contains(&format!("rank {rank}/{n}: all MPI checks passed")), "{stdout}");
    }
}

#[test]
fn the_mpi_backend_passes_every_case_with_one_and_two_processes() {
    run_under_mpirun(1);
    run_under_mpirun(2);
}

#[test]
fn the_mpi_backend_passes_every_case_with_three_and_four_processes() {
    run_under_mpirun(3);
    run_under_mpirun(4);
}
