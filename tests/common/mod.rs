//! Helpers for tests that run the real `hytrain` binary as separate processes with the environment a launcher
//! would give them.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of the binary cargo built for these tests.
pub fn hytrain() -> &'static str {
    env!("CARGO_BIN_EXE_hytrain")
}

/// A command for the binary with an empty environment but PATH, so nothing of the test runner's own environment
/// (a CI's RANK, say) leaks into detection. Lone local `train` runs of tests running at the same time share the
/// default MASTER_PORT: a job of one rank hosts its store on a port the system picks.
pub fn command(args: &[&str], env: &[(&str, String)]) -> Command {
    let mut c = Command::new(hytrain());
    c.args(args).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

pub use hytrain_comm::testing::free_port;

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
    assert!(out.status.success(), "hytrain failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout)))
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

/// An image-folder tree `train/CLASS/N.png`, `test/CLASS/N.png` of RGB photos of different sizes (2 classes, the
/// second brighter), as a user's folder of photos is: `hytrain data pack --image-folder` makes shards of it.
pub fn photo_folder(dir: &Path) -> std::path::PathBuf {
    use hytrain::data::format::{decode, Image};
    let sizes = [(20, 14), (9, 17), (16, 16), (31, 12), (13, 25), (18, 11)];
    let root = dir.join("photos");
    for (split, count) in [("train", 12), ("test", 4)] {
        for class in 0..2u8 {
            let folder = root.join(split).join(format!("class{class}"));
            std::fs::create_dir_all(&folder).unwrap();
            for i in 0..count {
                let (width, height) = sizes[i % sizes.len()];
                let pixels = (0..width * height * 3)
                    .map(|j| (40 + 120 * class as usize + (j * 37 + i * 11) % 60) as u8)
                    .collect();
                let image = Image { height, width, channels: 3, pixels };
                std::fs::write(folder.join(format!("{i}.png")), decode::png(&image).unwrap()).unwrap();
            }
        }
    }
    root
}

/// `hytrain data pack --image-folder` of `folder` into `dir/shards`.
pub fn pack_images(folder: &Path, dir: &Path) -> std::path::PathBuf {
    let out = dir.join("shards");
    let o = command(
        &["data", "pack", "--image-folder", "--data", folder.to_str().unwrap(), "--out", out.to_str().unwrap()],
        &[],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "packing failed: {}", String::from_utf8_lossy(&o.stderr));
    out
}

/// The handwritten digits `cargo xtask test` packs into shards (and names in HYTRAIN_DEMO_DATA): `train/` and
/// `test/`.
pub fn digits() -> PathBuf {
    let path = std::env::var_os("HYTRAIN_DEMO_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/demo/digits"));
    assert!(
        path.join("train").is_dir() && path.join("test").is_dir(),
        "{} holds no digits shards: run the tests through `cargo xtask test`, which packs them",
        path.display()
    );
    path
}
