//! Helpers for tests that run the real `hytrain` binary as separate processes with the environment a launcher
//! would give them.

#![allow(dead_code)]

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of the binary cargo built for these tests.
pub fn hytrain() -> &'static str {
    env!("CARGO_BIN_EXE_hytrain")
}

/// A command for the binary with an empty environment but PATH, so nothing of the test runner's own environment
/// (a CI's RANK, say) leaks into detection.
pub fn command(args: &[&str], env: &[(&str, String)]) -> Command {
    let mut c = Command::new(hytrain());
    c.args(args).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
}

/// Waits for a child with a deadline; a child still running then is killed and the test fails, so no test hangs.
pub fn wait(mut child: Child, limit: Duration, what: &str) -> Output {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return read_output(child);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = read_output(child);
            panic!(
                "{what} still running after {limit:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_output(mut child: Child) -> Output {
    let status = child.wait().unwrap();
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    if let Some(mut s) = child.stdout.take() {
        s.read_to_end(&mut stdout).unwrap();
    }
    if let Some(mut s) = child.stderr.take() {
        s.read_to_end(&mut stderr).unwrap();
    }
    Output { status, stdout, stderr }
}

/// Runs the binary to completion (with a generous deadline) and returns its output.
pub fn run(args: &[&str], env: &[(&str, String)]) -> Output {
    let child = command(args, env).spawn().unwrap();
    wait(child, Duration::from_secs(120), &format!("hytrain {}", args.join(" ")))
}

/// Stdout of a successful run parsed as JSON; panics with stderr when the run failed.
pub fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "hytrain failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("stdout is not JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout))
    })
}

/// Writes a file, creating its folders.
pub fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Lays out a SageMaker /opt/ml tree for one host, as the platform does with no training toolkit involved.
pub fn sagemaker_tree(root: &Path, current_host: &str, hosts: &[&str], hyperparameters: &str) {
    let hosts_json = serde_json::to_string(hosts).unwrap();
    write(
        &root.join("input/config/resourceconfig.json"),
        &format!(
            r#"{{"current_host":"{current_host}","current_instance_type":"ml.c5.xlarge","current_group_name":"homogeneousCluster",
               "hosts":{hosts_json},"instance_groups":[{{"instance_group_name":"homogeneousCluster","instance_type":"ml.c5.xlarge","hosts":{hosts_json}}}],
               "network_interface_name":"eth0"}}"#
        ),
    );
    write(
        &root.join("input/config/inputdataconfig.json"),
        r#"{"training":{"TrainingInputMode":"File","S3DistributionType":"FullyReplicated","RecordWrapperType":"None"}}"#,
    );
    write(&root.join("input/config/hyperparameters.json"), hyperparameters);
    std::fs::create_dir_all(root.join("input/data/training")).unwrap();
}
