//! `cargo xtask gpu-check`: builds `hytrain-gpu-check` and `hytrain` here and packs them with the scripts that run
//! them, into one folder to copy to a GPU machine that has PyTorch but no Rust and no network. Before it hands the
//! pack over it rehearses the training half on this machine's CPU, with the packed binary and the bench venv's
//! torch libraries, as the GPU machine will run it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Where the packed folder goes, relative to the repository root.
pub const PACK_DIR: &str = "target/gpu-check";
/// Where the CPU rehearsal writes its findings, relative to the repository root (outside the pack).
const REHEARSAL_DIR: &str = "target/gpu-check-rehearsal";
/// The most the packed folder may weigh: what can be carried to the GPU machine.
pub const LIMIT_BYTES: u64 = 64 << 20;
/// The scripts packed beside the binaries: repository path, name in the pack.
const SCRIPTS: [(&str, &str); 3] = [
    ("crates/hytrain-cuda/gpu-check/run.sh", "run.sh"),
    (
        "crates/hytrain-cuda/gpu-check/torch_peer.py",
        "torch_peer.py",
    ),
    // torch_peer.py trains the models of the step-time benchmark's PyTorch side, which match hytrain's.
    ("benches/ddp_step.py", "ddp_step.py"),
];
const CHECK: &str = "hytrain-gpu-check";
const HYTRAIN: &str = "hytrain";
/// Libraries every glibc machine has.
const SYSTEM_LIBRARIES: [&str; 8] = [
    "libc.so.6",
    "libm.so.6",
    "libdl.so.2",
    "librt.so.1",
    "libpthread.so.0",
    "libgcc_s.so.1",
    "libstdc++.so.6",
    "ld-linux-x86-64.so.2",
];
/// Libraries pip's torch has in `torch/lib`, which run.sh puts on LD_LIBRARY_PATH.
const TORCH_LIBRARIES: [&str; 4] = [
    "libtorch.so",
    "libtorch_cpu.so",
    "libc10.so",
    "libgomp.so.1",
];

/// One file of the pack.
#[derive(Debug, Clone)]
pub struct Packed {
    /// Where it comes from.
    pub from: PathBuf,
    /// Its name in the pack.
    pub to: PathBuf,
    /// Strip its symbols (and debug line tables) on the way.
    pub strip: bool,
}

/// Builds the check and `hytrain` in release mode, packs them, rehearses the training half on the CPU and prints
/// how to run it.
pub fn gpu_check(root: &Path) -> Result<u8> {
    println!("gpu-check: building {CHECK} and {HYTRAIN} (release)");
    let (check, hytrain) = build(root)?;
    let linkage = Linkage::read(&hytrain)?;
    println!(
        "gpu-check: {HYTRAIN} needs {} (runpath {})",
        linkage.needed.join(", "),
        linkage.runpath.join(":")
    );
    let mut files = vec![
        Packed {
            from: check,
            to: CHECK.into(),
            strip: false,
        },
        Packed {
            from: hytrain,
            to: HYTRAIN.into(),
            strip: true,
        },
    ];
    linkage.check_for_gpu_machine()?;
    files.extend(SCRIPTS.iter().map(|(from, to)| Packed {
        from: root.join(from),
        to: to.into(),
        strip: false,
    }));
    let dir = root.join(PACK_DIR);
    let bytes = pack(&dir, &files, LIMIT_BYTES)?;
    println!(
        "gpu-check: packed {} ({:.1} MiB of the {} MiB allowed): {}",
        dir.display(),
        mib(bytes),
        LIMIT_BYTES >> 20,
        files
            .iter()
            .map(|f| f.to.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    rehearse(root, &dir)?;
    println!(
        "gpu-check: on a machine with an NVIDIA GPU and PyTorch at /opt/torch/.venv (PYTHON=... for another), run\n\
         gpu-check:   sh {PACK_DIR}/run.sh\n\
         gpu-check: results go to $OUT (or {PACK_DIR}/out): kernels.json, torch_peer.json, train_lenet.json, \
         train_resnet18.json, overlap.json, summary.txt and the logs"
    );
    Ok(0)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// The release `hytrain-gpu-check` and `hytrain` executables.
fn build(root: &Path) -> Result<(PathBuf, PathBuf)> {
    let mut command = crate::cargo(root);
    command
        .args(["build", "--release", "-p", "hytrain", "--bin", HYTRAIN])
        .args(["-p", "hytrain-cuda", "--bin", CHECK])
        .arg("--message-format=json-render-diagnostics")
        .stderr(std::process::Stdio::inherit());
    let output = command.output().context("cannot run cargo")?;
    if !output.status.success() {
        bail!("`cargo build --release` of {HYTRAIN} and {CHECK} failed (errors above)");
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let executable = |name: &str| {
        stdout
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .with_context(|| format!("cargo built no `{name}` executable"))
    };
    Ok((executable(CHECK)?, executable(HYTRAIN)?))
}

/// What an ELF file needs from the dynamic loader, as `readelf -d` shows it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Linkage {
    /// DT_NEEDED, in order.
    pub needed: Vec<String>,
    /// DT_RUNPATH (or DT_RPATH) folders, in order.
    pub runpath: Vec<String>,
}

impl Linkage {
    /// Runs `readelf -d` on `file`.
    pub fn read(file: &Path) -> Result<Linkage> {
        let output = Command::new("readelf")
            .arg("-d")
            .arg(file)
            .output()
            .context("cannot run readelf: install binutils (apt-get install binutils)")?;
        if !output.status.success() {
            bail!(
                "readelf -d {} failed: {}",
                file.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(Linkage::parse(&String::from_utf8_lossy(&output.stdout)))
    }

    /// Reads `readelf -d`'s output.
    pub fn parse(text: &str) -> Linkage {
        let bracketed = |line: &str| {
            let start = line.find('[')? + 1;
            let end = line.rfind(']')?;
            (start <= end).then(|| line[start..end].to_string())
        };
        let mut linkage = Linkage::default();
        for line in text.lines() {
            if line.contains("(NEEDED)") {
                linkage.needed.extend(bracketed(line));
            } else if line.contains("(RUNPATH)") || line.contains("(RPATH)") {
                if let Some(paths) = bracketed(line) {
                    linkage
                        .runpath
                        .extend(paths.split(':').filter(|p| !p.is_empty()).map(String::from));
                }
            }
        }
        linkage
    }

    /// Whether the GPU machine can satisfy every library this binary needs: glibc's, and those pip's torch has in
    /// `torch/lib` (run.sh puts that folder on LD_LIBRARY_PATH; the runpath names a folder of this machine). A
    /// binary needing anything else could not start there: that is an error naming it.
    pub fn check_for_gpu_machine(&self) -> Result<()> {
        let foreign: Vec<&str> = self
            .needed
            .iter()
            .map(String::as_str)
            .filter(|n| !SYSTEM_LIBRARIES.contains(n) && !TORCH_LIBRARIES.contains(n))
            .collect();
        if !foreign.is_empty() {
            bail!(
                "{HYTRAIN} needs {}, which neither glibc nor pip's torch/lib provides on the GPU machine; build \
                 against a libtorch whose libraries are all in torch/lib (`cargo xtask setup`'s .libtorch)",
                foreign.join(", ")
            );
        }
        Ok(())
    }
}

/// Replaces `dir` with `files` (all executable) and returns the bytes packed; more than `limit` bytes is an error,
/// and then nothing is left behind.
pub fn pack(dir: &Path, files: &[Packed], limit: u64) -> Result<u64> {
    if dir.exists() {
        fs::remove_dir_all(dir)
            .with_context(|| format!("cannot remove the old {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = (|| {
        let mut total = 0;
        for file in files {
            let target = dir.join(&file.to);
            if file.strip {
                // Line tables (the release profile keeps them for backtraces) are most of the binary's size.
                crate::run(
                    Command::new("strip")
                        .arg("--strip-all")
                        .arg("-o")
                        .arg(&target)
                        .arg(&file.from),
                )
                .with_context(|| {
                    format!(
                        "cannot strip {} (is binutils installed?)",
                        file.from.display()
                    )
                })?;
            } else {
                fs::copy(&file.from, &target).with_context(|| {
                    format!("cannot copy {} into {}", file.from.display(), dir.display())
                })?;
            }
            fs::set_permissions(&target, fs::Permissions::from_mode(0o755))?;
            total += fs::metadata(&target)?.len();
        }
        if total > limit {
            bail!(
                "the GPU check packs {:.1} MiB, more than the {:.0} MiB a GPU machine takes",
                mib(total),
                mib(limit)
            );
        }
        Ok(total)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(dir);
    }
    result
}

/// Runs the pack's training half on this machine's CPU (`GPU_CHECK_REHEARSAL=1`): the packed, stripped `hytrain`
/// with the bench venv's pip torch libraries on LD_LIBRARY_PATH, as on the GPU machine, on a dataset the packed
/// script writes, beside the packed PyTorch peer; and `--device cuda` once, which must get as far as loading that
/// torch's libtorch_cuda.so. A pack that fails here would fail on the GPU machine too.
fn rehearse(root: &Path, dir: &Path) -> Result<()> {
    let python = crate::venv::bench_venv(root)?;
    let out = root.join(REHEARSAL_DIR);
    if out.exists() {
        fs::remove_dir_all(&out).with_context(|| format!("cannot remove {}", out.display()))?;
    }
    println!("gpu-check: rehearsing the training half on the CPU (findings in {REHEARSAL_DIR})");
    let mut command = Command::new("sh");
    command
        .arg(dir.join("run.sh"))
        .env("GPU_CHECK_REHEARSAL", "1")
        .env("PYTHON", &python)
        .env("OUT", &out)
        .env_remove("LD_LIBRARY_PATH");
    crate::run(&mut command)
        .context("the CPU rehearsal of the GPU check failed (its output is above)")?;
    for model in ["lenet", "resnet18"] {
        let path = out.join(format!("train_{model}.json"));
        let report: serde_json::Value = serde_json::from_str(
            &fs::read_to_string(&path)
                .with_context(|| format!("the rehearsal wrote no {}", path.display()))?,
        )
        .with_context(|| format!("{} is not JSON", path.display()))?;
        let rate = report["hytrain"]["samples_per_sec"].as_f64().unwrap_or(0.0);
        if report["passed"] != true || rate <= 0.0 {
            bail!(
                "the rehearsal's {} reports no hytrain training: {report}",
                path.display()
            );
        }
    }
    let probe = out.join("cuda_probe.log");
    let log = fs::read_to_string(&probe)
        .with_context(|| format!("the rehearsal wrote no {}", probe.display()))?;
    if !log.contains("libtorch CUDA backend loaded from") {
        bail!(
            "the packed {HYTRAIN} did not load the venv torch's libtorch_cuda.so with --device cuda; its log ({}):\n{log}",
            probe.display()
        );
    }
    println!("gpu-check: rehearsal passed: both models trained on the CPU, --device cuda loaded libtorch_cuda.so");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    fn scripts() -> Vec<Packed> {
        SCRIPTS
            .iter()
            .map(|(from, to)| Packed {
                from: root().join(from),
                to: to.into(),
                strip: false,
            })
            .collect()
    }

    #[test]
    fn packing_lays_out_binaries_and_scripts_executable_and_replaces_an_old_pack() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join(CHECK);
        fs::write(&binary, b"\x7fELF...").unwrap();
        let pack_dir = dir.path().join("pack");
        fs::create_dir(&pack_dir).unwrap();
        fs::write(pack_dir.join("stale.txt"), b"old").unwrap();
        let mut files = scripts();
        files.push(Packed {
            from: binary,
            to: CHECK.into(),
            strip: false,
        });
        let bytes = pack(&pack_dir, &files, LIMIT_BYTES).unwrap();
        let mut names: Vec<String> = fs::read_dir(&pack_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["ddp_step.py", CHECK, "run.sh", "torch_peer.py"]);
        let sizes: u64 = files
            .iter()
            .map(|f| fs::metadata(pack_dir.join(&f.to)).unwrap().len())
            .sum();
        assert_eq!(bytes, sizes);
        for file in &files {
            let mode = fs::metadata(pack_dir.join(&file.to))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o111, 0o111, "{} is executable", file.to.display());
        }
    }

    #[test]
    fn a_stripped_binary_is_smaller_and_still_an_elf_file() {
        let dir = tempfile::tempdir().unwrap();
        let own = std::env::current_exe().unwrap();
        let pack_dir = dir.path().join("pack");
        let bytes = pack(
            &pack_dir,
            &[Packed {
                from: own.clone(),
                to: "x".into(),
                strip: true,
            }],
            LIMIT_BYTES,
        )
        .unwrap();
        assert!(bytes < fs::metadata(&own).unwrap().len());
        let packed = fs::read(pack_dir.join("x")).unwrap();
        assert_eq!(&packed[..4], b"\x7fELF");
        assert!(!Linkage::read(&pack_dir.join("x"))
            .unwrap()
            .needed
            .is_empty());
    }

    #[test]
    fn a_pack_over_the_limit_is_refused_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join(CHECK);
        fs::write(&binary, vec![0u8; 2048]).unwrap();
        let pack_dir = dir.path().join("pack");
        let files = [Packed {
            from: binary,
            to: CHECK.into(),
            strip: false,
        }];
        let error = format!("{:#}", pack(&pack_dir, &files, 1024).unwrap_err());
        assert!(
            error.contains("more than the 0 MiB a GPU machine takes"),
            "{error}"
        );
        assert!(!pack_dir.exists());
    }

    #[test]
    fn a_missing_script_is_named_and_nothing_is_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let pack_dir = dir.path().join("pack");
        let files = [Packed {
            from: dir.path().join("run.sh"),
            to: "run.sh".into(),
            strip: false,
        }];
        let error = format!("{:#}", pack(&pack_dir, &files, LIMIT_BYTES).unwrap_err());
        assert!(
            error.contains("cannot copy") && error.contains("run.sh"),
            "{error}"
        );
        assert!(!pack_dir.exists());
    }

    #[test]
    fn readelf_output_gives_needed_libraries_and_runpath() {
        let text = "
Dynamic section at offset 0x1 contains 3 entries:
  Tag        Type                         Name/Value
 0x0000000000000001 (NEEDED)             Shared library: [libtorch_cpu.so]
 0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]
 0x000000000000001d (RUNPATH)            Library runpath: [/a/lib:$ORIGIN]
";
        let linkage = Linkage::parse(text);
        assert_eq!(linkage.needed, ["libtorch_cpu.so", "libc.so.6"]);
        assert_eq!(linkage.runpath, ["/a/lib", "$ORIGIN"]);
    }

    #[test]
    fn a_library_the_gpu_machine_lacks_is_refused_by_name() {
        let linkage = Linkage {
            needed: vec![
                "libc10.so".into(),
                "libopenblas.so.0".into(),
                "libc.so.6".into(),
            ],
            runpath: vec![],
        };
        let error = linkage.check_for_gpu_machine().unwrap_err().to_string();
        assert!(
            error.starts_with("hytrain needs libopenblas.so.0, which neither"),
            "{error}"
        );
    }

    #[test]
    fn a_binary_needing_only_glibc_and_torch_lib_passes() {
        let linkage = Linkage {
            needed: [
                "libstdc++.so.6",
                "libtorch_cpu.so",
                "libc10.so",
                "libc.so.6",
            ]
            .map(String::from)
            .to_vec(),
            runpath: vec!["/work/main/.libtorch/lib".into()],
        };
        linkage.check_for_gpu_machine().unwrap();
    }

    /// The script runs under POSIX sh on the GPU machine; a syntax error there would waste the machine's time.
    #[test]
    fn the_run_script_is_valid_sh_and_runs_every_part() {
        let script = root().join(SCRIPTS[0].0);
        let status = Command::new("sh").arg("-n").arg(&script).status().unwrap();
        assert!(status.success());
        let text = fs::read_to_string(&script).unwrap();
        for part in [
            "hytrain-gpu-check\" --json",
            "torch_peer.py\" --dump",
            "torch_peer.py\" --write-cifar",
            "\"$HYTRAIN\" train --device \"$DEVICE\"",
            "torch_peer.py\" --train",
            "torch_peer.py\" --compare-weights",
            "--overlap \"$overlap\"",
        ] {
            assert!(text.contains(part), "run.sh lacks {part}");
        }
    }

    /// Every step of run.sh has a timeout, and together they fit the GPU machine's 8 minutes with room for
    /// starting Python and the binaries.
    #[test]
    fn the_run_scripts_timeouts_add_up_to_under_eight_minutes() {
        let text = fs::read_to_string(root().join(SCRIPTS[0].0)).unwrap();
        let mut total = 0;
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.split("timeout -k 10 ").nth(1) {
                let seconds = rest.split_whitespace().next().unwrap();
                total += seconds.parse::<u64>().unwrap_or(0);
            }
            if let Some(rest) = line.strip_prefix("train ") {
                // train MODEL BATCH WARMUP STEPS HYTRAIN_TIMEOUT PEER_TIMEOUT
                let words: Vec<&str> = rest.split_whitespace().collect();
                total += words[2].parse::<u64>().unwrap() + words[3].parse::<u64>().unwrap();
            }
            if let Some(rest) = line.strip_prefix("overlap_check ") {
                // overlap_check RUN_TIMEOUT COMPARE_TIMEOUT: two runs, then the comparison
                let words: Vec<u64> = rest.split_whitespace().map(|w| w.parse().unwrap()).collect();
                total += 2 * words[0] + words[1];
            }
        }
        assert!(total > 0 && total <= 450, "timeouts add up to {total} s");
    }
}
