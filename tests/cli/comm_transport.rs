//! The transport knob of the binary (HYTRAIN_COMM_TRANSPORT / --comm-transport) with real launched workers.

use crate::common;

use std::time::Duration;

use common::{command, wait};

const LIMIT: Duration = Duration::from_secs(120);

fn launched_doctor_backend(transport: Option<&str>) -> String {
    let env: Vec<(&str, String)> = transport.map(|t| ("HYTRAIN_COMM_TRANSPORT", t.to_string())).into_iter().collect();
    let mut c = command(
        &[
            "launch",
            "--nproc-per-node",
            "2",
            "--",
            common::hytrain(),
            "doctor",
            "--json",
            "--sizes",
            "1MiB",
            "--iters",
            "2",
        ],
        &env,
    );
    let out = wait(c.spawn().unwrap(), LIMIT, "hytrain launch");
    let report = common::json(&out);
    // The doctor checked exact sums and a broadcast through the chosen backend.
    assert_eq!(report["ok"], true, "{report}");
    report["backend"].as_str().unwrap_or_default().to_string()
}

#[test]
fn two_local_workers_reduce_through_shared_memory_unless_the_ring_is_asked_for() {
    assert_eq!(launched_doctor_backend(None), "shm");
    assert_eq!(launched_doctor_backend(Some("ring")), "ring");
    assert_eq!(launched_doctor_backend(Some("shm")), "shm");
}

#[test]
fn an_unknown_transport_is_refused_naming_the_choices() {
    let out = common::run(&["doctor"], &[("HYTRAIN_COMM_TRANSPORT", "nccl".into())]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown transport 'nccl'; use auto, ring or shm"), "{stderr}");
}
