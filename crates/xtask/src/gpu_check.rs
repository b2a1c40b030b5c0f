//! `cargo xtask gpu-check`: builds `hytrain-gpu-check` here and packs it with the scripts that run it, into one
//! folder to copy to a GPU machine that has PyTorch but no Rust and no network.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Where the packed folder goes, relative to the repository root.
pub const PACK_DIR: &str = "target/gpu-check";
/// The most the packed folder may weigh: what can be carried to the GPU machine.
pub const LIMIT_BYTES: u64 = 64 << 20;
/// The scripts packed beside the binary, relative to the repository root.
const SCRIPTS: [&str; 2] = [
    "crates/hytrain-cuda/gpu-check/run.sh",
    "crates/hytrain-cuda/gpu-check/torch_peer.py",
];
const BINARY: &str = "hytrain-gpu-check";

/// Builds the check in release mode and packs it; prints how to run it.
pub fn gpu_check(root: &Path) -> Result<u8> {
    println!("gpu-check: building {BINARY} (release)");
    let binary = build(root)?;
    let dir = root.join(PACK_DIR);
    let scripts: Vec<PathBuf> = SCRIPTS.iter().map(|s| root.join(s)).collect();
    let bytes = pack(&dir, &binary, &scripts, LIMIT_BYTES)?;
    println!(
        "gpu-check: packed {} ({:.1} MiB): {BINARY}, run.sh, torch_peer.py\n\
         gpu-check: on a machine with an NVIDIA GPU and PyTorch at /opt/torch/.venv (PYTHON=... for another), run\n\
         gpu-check:   sh {PACK_DIR}/run.sh\n\
         gpu-check: results go to $OUT (or {PACK_DIR}/out): kernels.json, torch_peer.json",
        dir.display(),
        bytes as f64 / (1 << 20) as f64
    );
    Ok(0)
}

fn build(root: &Path) -> Result<PathBuf> {
    let mut command = crate::cargo(root);
    command
        .args(["build", "--release", "-p", "hytrain-cuda", "--bin", BINARY])
        .arg("--message-format=json-render-diagnostics")
        .stderr(std::process::Stdio::inherit());
    let output = command.output().context("cannot run cargo")?;
    if !output.status.success() {
        bail!("`cargo build --release -p hytrain-cuda --bin {BINARY}` failed (errors above)");
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == BINARY)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo built no `{BINARY}` executable"))
}

/// Replaces `dir` with the binary and the scripts (all executable), and returns the bytes packed; more than
/// `limit` bytes is an error, and then nothing is left behind.
pub fn pack(dir: &Path, binary: &Path, scripts: &[PathBuf], limit: u64) -> Result<u64> {
    if dir.exists() {
        fs::remove_dir_all(dir)
            .with_context(|| format!("cannot remove the old {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut total = 0;
    let files = std::iter::once(binary).chain(scripts.iter().map(PathBuf::as_path));
    for file in files {
        let name = file
            .file_name()
            .with_context(|| format!("{} has no file name", file.display()))?;
        let target = dir.join(name);
        total += fs::copy(file, &target)
            .with_context(|| format!("cannot copy {} into {}", file.display(), dir.display()))?;
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755))?;
    }
    if total > limit {
        fs::remove_dir_all(dir)?;
        bail!(
            "the GPU check packs {:.1} MiB, more than the {:.0} MiB a GPU machine takes",
            total as f64 / (1 << 20) as f64,
            limit as f64 / (1 << 20) as f64
        );
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_puts_the_binary_and_scripts_side_by_side_executable_and_replaces_an_old_pack() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join(BINARY);
        fs::write(&binary, b"\x7fELF...").unwrap();
        let pack_dir = dir.path().join("pack");
        fs::create_dir(&pack_dir).unwrap();
        fs::write(pack_dir.join("stale.txt"), b"old").unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let scripts: Vec<PathBuf> = SCRIPTS.iter().map(|s| root.join(s)).collect();
        let bytes = pack(&pack_dir, &binary, &scripts, LIMIT_BYTES).unwrap();
        let mut names: Vec<String> = fs::read_dir(&pack_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [BINARY, "run.sh", "torch_peer.py"]);
        let sizes: u64 = names
            .iter()
            .map(|n| fs::metadata(pack_dir.join(n)).unwrap().len())
            .sum();
        assert_eq!(bytes, sizes);
        for name in &names {
            let mode = fs::metadata(pack_dir.join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o111, 0o111, "{name} is executable");
        }
    }

    #[test]
    fn a_pack_over_the_limit_is_refused_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join(BINARY);
        fs::write(&binary, vec![0u8; 2048]).unwrap();
        let pack_dir = dir.path().join("pack");
        let error = format!("{:#}", pack(&pack_dir, &binary, &[], 1024).unwrap_err());
        assert!(
            error.contains("more than the 0 MiB a GPU machine takes"),
            "{error}"
        );
        assert!(!pack_dir.exists());
    }

    #[test]
    fn a_missing_script_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join(BINARY);
        fs::write(&binary, b"x").unwrap();
        let error = format!(
            "{:#}",
            pack(
                &dir.path().join("pack"),
                &binary,
                &[dir.path().join("run.sh")],
                LIMIT_BYTES
            )
            .unwrap_err()
        );
        assert!(
            error.contains("cannot copy") && error.contains("run.sh"),
            "{error}"
        );
    }

    /// The script runs under POSIX sh on the GPU machine; a syntax error there would waste the machine's time.
    #[test]
    fn the_run_script_is_valid_sh_and_runs_both_halves() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../crates/hytrain-cuda/gpu-check/run.sh");
        let status = std::process::Command::new("sh")
            .arg("-n")
            .arg(&script)
            .status()
            .unwrap();
        assert!(status.success());
        let text = fs::read_to_string(&script).unwrap();
        assert!(text.contains("hytrain-gpu-check\" --json"), "{text}");
        assert!(text.contains("torch_peer.py\" --dump"), "{text}");
    }
}
