//! Several real `hytrain doctor` processes on 127.0.0.1, started with the environment each launcher gives its
//! workers, rendezvous and allreduce; the results are checked against sums computed here.

use crate::common;

use std::time::{Duration, Instant};

use common::{command, free_port, sagemaker_tree, wait};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(180);

fn s(v: impl ToString) -> String {
    v.to_string()
}

/// Starts one doctor per environment (rank 0's first), waits for all, and returns rank 0's JSON report.
fn doctor_job(envs: Vec<Vec<(&'static str, String)>>) -> Value {
    let args = [
        "doctor",
        "--json",
        "--sizes",
        "64KiB",
        "--iters",
        "2",
        "--rendezvous-timeout",
        "60",
        "--collective-timeout",
        "60",
    ];
    let children: Vec<_> = envs.iter().map(|env| command(&args, env).spawn().unwrap()).collect();
    let outputs: Vec<_> =
        children.into_iter().enumerate().map(|(i, c)| wait(c, LIMIT, &format!("doctor process {i}"))).collect();
    for (i, out) in outputs.iter().enumerate() {
        assert!(out.status.success(), "process {i} failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let reports: Vec<Value> = outputs.iter().filter(|o| !o.stdout.is_empty()).map(common::json).collect();
    assert_eq!(reports.len(), 1, "exactly rank 0 prints the report");
    reports.into_iter().next().unwrap()
}

/// Checks the first and last element of every reported allreduce against the sum it must have.
fn assert_exact_sums(report: &Value, world: usize) {
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["world_size"], world);
    let checks = report["allreduce_checks"].as_array().unwrap();
    let mut lengths: Vec<u64> = checks.iter().map(|c| c["elements"].as_u64().unwrap()).collect();
    lengths.dedup();
    assert_eq!(lengths, vec![0, 1, 7, 1_000_003]);
    for c in checks {
        let len = c["elements"].as_u64().unwrap() as usize;
        let modulus = if c["dtype"] == "bf16" { 16 } else { 251 };
        let divisor = if c["op"] == "avg" { world as f64 } else { 1.0 };
        // Rank r contributes (i % modulus) + r at index i.
        let want = |i: usize| (world * (i % modulus) + world * (world - 1) / 2) as f64 / divisor;
        if len == 0 {
            assert!(c["first"].is_null(), "{c}");
            continue;
        }
        let tolerance = if c["dtype"] == "bf16" && c["op"] == "avg" { want(len - 1) / 128.0 } else { 0.0 };
        assert!((c["first"].as_f64().unwrap() - want(0)).abs() <= tolerance, "{c}");
        assert!((c["last"].as_f64().unwrap() - want(len - 1)).abs() <= tolerance, "{c}");
        assert_eq!(c["ok"], true, "{c}");
    }
    let peers: Vec<u64> = report["peers"].as_array().unwrap().iter().map(|p| p["rank"].as_u64().unwrap()).collect();
    assert_eq!(peers, (0..world as u64).collect::<Vec<_>>());
    assert_every_collective_measured(report, world);
}

/// The bandwidth table has one row per collective (allreduce, then reduce_scatter and allgather, which sharded
/// training runs) for the one size asked (64 KiB), with the block-splitting ones cut to whole blocks per rank and
/// bus bandwidth as nccl-tests define it (2(n-1)/n of algbw for allreduce, (n-1)/n for the others).
fn assert_every_collective_measured(report: &Value, world: usize) {
    let rows = report["sizes"].as_array().unwrap();
    let ops: Vec<&str> = rows.iter().map(|r| r["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["allreduce", "reduce_scatter", "allgather"], "{report}");
    for r in rows {
        let bytes = r["bytes"].as_u64().unwrap() as usize;
        let (moved, whole) = if r["op"] == "allreduce" { (2.0, 65536) } else { (1.0, 65536 / 4 / world * world * 4) };
        assert_eq!(bytes, whole, "{r}");
        let (algbw, busbw) = (r["algbw_gbps"].as_f64().unwrap(), r["busbw_gbps"].as_f64().unwrap());
        assert!(algbw > 0.0, "{r}");
        let factor = if world > 1 { moved * (world - 1) as f64 / world as f64 } else { 0.0 };
        assert!((busbw - algbw * factor).abs() <= 1e-9 * algbw.max(1.0), "{r}");
    }
}

fn kubeflow_env(rank: usize, world: usize, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("PYTHONUNBUFFERED", s(1)),
        ("MASTER_ADDR", s("127.0.0.1")),
        ("PET_MASTER_ADDR", s("127.0.0.1")),
        ("MASTER_PORT", s(port)),
        ("PET_MASTER_PORT", s(port)),
        ("WORLD_SIZE", s(world)),
        ("PET_NNODES", s(world)),
        ("RANK", s(rank)),
        ("PET_NODE_RANK", s(rank)),
        ("HOSTNAME", format!("job-{}-{}", if rank == 0 { "master" } else { "worker" }, rank.saturating_sub(1))),
    ]
}

fn kubeflow_job(world: usize) {
    let port = free_port();
    let report = doctor_job((0..world).map(|r| kubeflow_env(r, world, port)).collect());
    assert_exact_sums(&report, world);
    assert_eq!(report["peers"][1]["host"], "job-worker-0");
}

#[test]
fn kubeflow_shaped_two_pods_allreduce_exactly() {
    kubeflow_job(2);
}

#[test]
fn kubeflow_shaped_three_pods_allreduce_exactly() {
    kubeflow_job(3);
}

#[test]
fn kubeflow_shaped_four_pods_allreduce_exactly() {
    kubeflow_job(4);
}

#[test]
fn torchrun_shaped_three_workers_allreduce_exactly() {
    let port = free_port();
    let envs = (0..3)
        .map(|r| {
            vec![
                ("RANK", s(r)),
                ("LOCAL_RANK", s(r)),
                ("GROUP_RANK", s(0)),
                ("LOCAL_WORLD_SIZE", s(3)),
                ("WORLD_SIZE", s(3)),
                ("MASTER_ADDR", s("127.0.0.1")),
                ("MASTER_PORT", s(port)),
                ("TORCHELASTIC_RUN_ID", s("test")),
            ]
        })
        .collect();
    assert_exact_sums(&doctor_job(envs), 3);
}

#[test]
fn sagemaker_shaped_two_hosts_allreduce_exactly() {
    // Two /opt/ml trees as SageMaker lays them out for algo-1 and algo-2, no training toolkit. The host names are
    // mapped to loopback with HYTRAIN_HOST_ALIASES, the documented stand-in for the platform's DNS.
    let port = free_port();
    let roots: Vec<_> = ["algo-1", "algo-2"]
        .iter()
        .map(|host| {
            let dir = tempfile::tempdir().unwrap();
            sagemaker_tree(dir.path(), host, &["algo-2", "algo-1"], r#"{"epochs":"1"}"#);
            dir
        })
        .collect();
    let envs = roots
        .iter()
        .map(|dir| {
            vec![
                ("HYTRAIN_SM_ROOT", dir.path().display().to_string()),
                ("HYTRAIN_HOST_ALIASES", s("algo-1=127.0.0.1,algo-2=127.0.0.1")),
                ("MASTER_PORT", s(port)),
            ]
        })
        .collect();
    let report = doctor_job(envs);
    assert_exact_sums(&report, 2);
    assert_eq!(report["peers"][0]["host"], "algo-1");
    assert_eq!(report["peers"][1]["host"], "algo-2");
}

#[test]
fn launch_three_local_workers_doctor_exits_zero() {
    let mut c = command(
        &[
            "launch",
            "--nproc-per-node",
            "3",
            "--",
            common::hytrain(),
            "doctor",
            "--json",
            "--sizes",
            "64KiB",
            "--iters",
            "2",
        ],
        &[],
    );
    let out = wait(c.spawn().unwrap(), LIMIT, "hytrain launch");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_exact_sums(&common::json(&out), 3);
}

#[test]
fn master_that_starts_five_seconds_late_is_waited_for() {
    let port = free_port();
    let args = ["doctor", "--json", "--sizes", "64KiB", "--iters", "1", "--rendezvous-timeout", "60"];
    let workers: Vec<_> = (1..3).map(|r| command(&args, &kubeflow_env(r, 3, port)).spawn().unwrap()).collect();
    std::thread::sleep(Duration::from_secs(5));
    let master = command(&args, &kubeflow_env(0, 3, port)).spawn().unwrap();
    let report = common::json(&wait(master, LIMIT, "late master"));
    for (i, w) in workers.into_iter().enumerate() {
        let out = wait(w, LIMIT, "worker");
        assert!(out.status.success(), "worker {} failed:\n{}", i + 1, String::from_utf8_lossy(&out.stderr));
    }
    assert_exact_sums(&report, 3);
}

#[test]
fn unreachable_master_fails_within_the_timeout_naming_host_and_port() {
    let port = free_port();
    let start = Instant::now();
    let child = command(&["doctor", "--rendezvous-timeout", "3"], &kubeflow_env(1, 2, port)).spawn().unwrap();
    let out = wait(child, Duration::from_secs(60), "doctor with no master");
    let elapsed = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?} to give up");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(stderr.contains("rank 1"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn launch_stops_the_others_and_exits_with_the_failed_workers_code() {
    let start = Instant::now();
    let script = r#"if [ "$RANK" = 1 ]; then sleep 1; exit 7; fi; sleep 120"#;
    let child = command(&["launch", "--nproc-per-node", "3", "--", "sh", "-c", script], &[]).spawn().unwrap();
    let out = wait(child, Duration::from_secs(60), "launch with a failing worker");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert!(stderr.contains("rank 1"), "{stderr}");
    assert!(start.elapsed() < Duration::from_secs(30), "the other workers were not stopped");
}

#[test]
fn launch_forwards_sigterm_to_its_workers() {
    // Each worker records the SIGTERM it receives, then exits 0; the launcher reports 128+15.
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        r#"trap 'touch {}/term-$RANK; exit 0' TERM; touch {}/up-$RANK; while true; do sleep 0.1; done"#,
        dir.path().display(),
        dir.path().display()
    );
    let child = command(&["launch", "--nproc-per-node", "2", "--", "sh", "-c", &script], &[]).spawn().unwrap();
    let up = Instant::now();
    while !(dir.path().join("up-0").exists() && dir.path().join("up-1").exists()) {
        assert!(up.elapsed() < Duration::from_secs(30), "workers never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill(2) on the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = wait(child, Duration::from_secs(60), "launch after SIGTERM");
    assert_eq!(out.status.code(), Some(128 + 15), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(dir.path().join("term-0").exists() && dir.path().join("term-1").exists());
}

#[cfg(feature = "mpi")]
#[test]
fn mpirun_two_ranks_allreduce_exactly_over_mpi() {
    let out = std::process::Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-n",
            "2",
            common::hytrain(),
            "doctor",
            "--json",
            "--sizes",
            "64KiB",
            "--iters",
            "2",
        ])
        .output()
        .expect("mpirun is installed by `cargo xtask setup`");
    let report = common::json(&out);
    assert_eq!(report["backend"], "mpi");
    assert_exact_sums(&report, 2);
}
