//! Free disk before setup: a first `cargo xtask test` writes about 17 GB (libtorch and the wheels, the bench
//! venv's torch with its CUDA libraries, the test build). A CI run once stopped after 87 s inside pip with
//! "No space left on device"; this says so before any of it starts, and what each part needs.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::setup::{CACHE_DIR, LIBTORCH_DIR};
use crate::venv::BENCH_VENV;

const GB: u64 = 1 << 30;

/// What a part of a first run writes, measured on a fresh clone (rounded up).
struct Part {
    what: &'static str,
    bytes: u64,
    present: bool,
}

/// Prints the free space on the repository's disk and, when the parts still to be made need more, a warning that
/// names them. Only a warning: the estimate is rounded up, and a run that fits should not be refused.
pub fn check(root: &Path) {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let parts = [
        Part { what: "libtorch and its wheels", bytes: 2 * GB, present: root.join(LIBTORCH_DIR).exists() },
        Part {
            what: "the bench venv's torch and CUDA libraries",
            bytes: 6 * GB,
            present: root.join(BENCH_VENV).join("bin/python").exists(),
        },
        Part { what: "the test build", bytes: 9 * GB, present: target.join("debug").exists() },
    ];
    let Some(free) = free_bytes(root) else {
        println!("setup: could not read the free disk space (`df -Pk {}`)", root.display());
        return;
    };
    let missing: Vec<&Part> = parts.iter().filter(|p| !p.present).collect();
    let needed: u64 = missing.iter().map(|p| p.bytes).sum();
    println!("setup: {} free on the disk of {} ({CACHE_DIR}, {LIBTORCH_DIR}, target)", show(free), root.display());
    if free < needed {
        let list: Vec<String> = missing.iter().map(|p| format!("{} {}", p.what, show(p.bytes))).collect();
        println!(
            "setup: warning: what is still to be made needs about {} ({}); with less, pip or the linker stops on \
             'No space left on device': free some disk first",
            show(needed),
            list.join(", ")
        );
    }
}

fn free_bytes(path: &Path) -> Option<u64> {
    let output = Command::new("df").arg("-Pk").arg(path).output().ok()?;
    output.status.success().then(|| parse_df(&String::from_utf8_lossy(&output.stdout))).flatten()
}

/// The `Available` column (KiB) of `df -P`'s one data line, in bytes.
fn parse_df(text: &str) -> Option<u64> {
    let line = text.lines().nth(1)?;
    let available: u64 = line.split_whitespace().nth(3)?.parse().ok()?;
    Some(available * 1024)
}

fn show(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / GB as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_available_column_of_posix_df() {
        let text = "Filesystem     1024-blocks      Used Available Capacity Mounted on\n\
                    /dev/vda         264241152  89128960   6186336      94% /\n";
        assert_eq!(parse_df(text), Some(6186336 * 1024));
    }

    #[test]
    fn output_without_a_data_line_or_number_is_none() {
        assert_eq!(parse_df("Filesystem 1024-blocks Used Available Capacity Mounted on\n"), None);
        assert_eq!(parse_df("header\n/dev/vda 1 2 lots 4% /\n"), None);
    }

    #[test]
    fn df_of_this_repository_answers() {
        assert!(free_bytes(Path::new(env!("CARGO_MANIFEST_DIR"))).is_some_and(|b| b > 0));
    }
}
