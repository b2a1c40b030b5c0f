//! `cargo xtask gpu-check`: builds `hytrain-gpu-check` and `hytrain` here and packs them with the scripts that run
//! them, the exporter (python/hytrain_export) and the ResNet-18 example it exports, into one folder to copy to a GPU
//! machine that has PyTorch but no Rust and no network. Before it hands the pack over it rehearses the export and
//! the training half on this machine's CPU, with the packed binary, the packed exporter and the bench venv's torch,
//! as the GPU machine will run them.

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
    ("crates/hytrain-cuda/gpu-check/torch_peer.py", "torch_peer.py"),
    // torch_peer.py trains the models of the step-time benchmark's PyTorch side, which match hytrain's.
    ("benches/ddp_step.py", "ddp_step.py"),
];
/// The exporter's package, every module of it packed under the same path (run.sh puts the pack's python/ on
/// PYTHONPATH).
const EXPORTER: &str = "python/hytrain_export";
/// The model the GPU exports and trains beside PyTorch: torchvision's ResNet-18 (torchvision is on the GPU machine's
/// PyTorch image).
const EXAMPLE: &str = "python/examples/resnet18_cifar.py";
/// The message `python -m hytrain_export --device cuda` ends with where no GPU is visible (python/hytrain_export/
/// _export.py), which the rehearsal requires.
const NO_GPU_REFUSAL: &str = "--device cuda needs a GPU at export time";
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
const TORCH_LIBRARIES: [&str; 4] = ["libtorch.so", "libtorch_cpu.so", "libc10.so", "libgomp.so.1"];

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
    println!("gpu-check: {HYTRAIN} needs {} (runpath {})", linkage.needed.join(", "), linkage.runpath.join(":"));
    let mut files = vec![
        Packed { from: check, to: CHECK.into(), strip: false },
        Packed { from: hytrain, to: HYTRAIN.into(), strip: true },
    ];
    linkage.check_for_gpu_machine()?;
    files.extend(SCRIPTS.iter().map(|(from, to)| Packed { from: root.join(from), to: to.into(), strip: false }));
    files.extend(python_files(root)?);
    let dir = root.join(PACK_DIR);
    let bytes = pack(&dir, &files, LIMIT_BYTES)?;
    println!(
        "gpu-check: packed {} ({:.1} MiB of the {} MiB allowed): {}",
        dir.display(),
        mib(bytes),
        LIMIT_BYTES >> 20,
        files.iter().map(|f| f.to.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    rehearse(root, &dir)?;
    println!(
        "gpu-check: on a machine with an NVIDIA GPU and PyTorch at /opt/torch/.venv (PYTHON=... for another), run\n\
         gpu-check:   sh {PACK_DIR}/run.sh\n\
         gpu-check: results go to $OUT (or {PACK_DIR}/out): kernels.json, torch_peer.json, train_lenet.json, \
         train_resnet18.json, overlap.json, exported.json, summary.txt and the logs"
    );
    Ok(0)
}

/// The exporter's modules and the example, each packed under its repository path.
fn python_files(root: &Path) -> Result<Vec<Packed>> {
    let dir = root.join(EXPORTER);
    let mut modules: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot list {}", dir.display()))?;
    modules.retain(|path| path.extension().is_some_and(|e| e == "py"));
    modules.sort();
    if !modules.iter().any(|m| m.ends_with("__main__.py")) {
        bail!("{} has no __main__.py: it is not the exporter `python -m hytrain_export` runs", dir.display());
    }
    let mut files: Vec<Packed> = modules
        .into_iter()
        .map(|from| {
            let to = Path::new(EXPORTER).join(from.file_name().expect("a listed file has a name"));
            Packed { from, to, strip: false }
        })
        .collect();
    files.push(Packed { from: root.join(EXAMPLE), to: EXAMPLE.into(), strip: false });
    Ok(files)
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
            bail!("readelf -d {} failed: {}", file.display(), String::from_utf8_lossy(&output.stderr).trim());
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
                    linkage.runpath.extend(paths.split(':').filter(|p| !p.is_empty()).map(String::from));
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
        fs::remove_dir_all(dir).with_context(|| format!("cannot remove the old {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = (|| {
        let mut total = 0;
        for file in files {
            let target = dir.join(&file.to);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
            }
            if file.strip {
                // Line tables (the release profile keeps them for backtraces) are most of the binary's size.
                crate::run(Command::new("strip").arg("--strip-all").arg("-o").arg(&target).arg(&file.from))
                    .with_context(|| format!("cannot strip {} (is binutils installed?)", file.from.display()))?;
            } else {
                fs::copy(&file.from, &target)
                    .with_context(|| format!("cannot copy {} into {}", file.from.display(), dir.display()))?;
            }
            fs::set_permissions(&target, fs::Permissions::from_mode(0o755))?;
            total += fs::metadata(&target)?.len();
        }
        if total > limit {
            bail!("the GPU check packs {:.1} MiB, more than the {:.0} MiB a GPU machine takes", mib(total), mib(limit));
        }
        Ok(total)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(dir);
    }
    result
}

/// Runs the pack's export and training half on this machine's CPU (`GPU_CHECK_REHEARSAL=1`): the packed exporter
/// with the bench venv's torch exports the ResNet-18 example for the CPU; the packed, stripped `hytrain` with that
/// venv's pip torch libraries on LD_LIBRARY_PATH, as on the GPU machine, trains the built-in models on a dataset the
/// packed script writes beside the packed PyTorch peer, and the exported model beside PyTorch eager, whose weights
/// must agree; `--device cuda` once, which must get as far as loading that torch's libtorch_cuda.so; and the export
/// for cuda, which without a GPU must stop, saying so. A pack that fails here would fail on the GPU machine too.
fn rehearse(root: &Path, dir: &Path) -> Result<()> {
    let python = crate::venv::bench_venv(root)?;
    let out = root.join(REHEARSAL_DIR);
    if out.exists() {
        fs::remove_dir_all(&out).with_context(|| format!("cannot remove {}", out.display()))?;
    }
    println!("gpu-check: rehearsing the export and the training half on the CPU (findings in {REHEARSAL_DIR})");
    // hytrain's default rendezvous port is taken whenever a test or another rehearsal trains on this machine at the
    // same time; the GPU machine runs nothing else.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .context("cannot find a free local port for the rehearsal's rendezvous")?
        .port();
    let mut command = Command::new("sh");
    command
        .arg(dir.join("run.sh"))
        .env("GPU_CHECK_REHEARSAL", "1")
        .env("PYTHON", &python)
        .env("OUT", &out)
        .env("MASTER_PORT", port.to_string())
        .env_remove("LD_LIBRARY_PATH");
    crate::run(&mut command).context("the CPU rehearsal of the GPU check failed (its output is above)")?;
    for model in ["lenet", "resnet18"] {
        let path = out.join(format!("train_{model}.json"));
        let report: serde_json::Value = serde_json::from_str(
            &fs::read_to_string(&path).with_context(|| format!("the rehearsal wrote no {}", path.display()))?,
        )
        .with_context(|| format!("{} is not JSON", path.display()))?;
        let rate = report["hytrain"]["samples_per_sec"].as_f64().unwrap_or(0.0);
        if report["passed"] != true || rate <= 0.0 {
            bail!("the rehearsal's {} reports no hytrain training: {report}", path.display());
        }
    }
    let exported = out.join("exported.json");
    let report: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(&exported).with_context(|| format!("the rehearsal wrote no {}", exported.display()))?,
    )
    .with_context(|| format!("{} is not JSON", exported.display()))?;
    if report["passed"] != true {
        bail!(
            "the rehearsal's exported ResNet-18 trained by hytrain did not match PyTorch eager ({}): {}",
            exported.display(),
            report["problems"]
        );
    }
    let probe = out.join("cuda_probe.log");
    let log = fs::read_to_string(&probe).with_context(|| format!("the rehearsal wrote no {}", probe.display()))?;
    if !log.contains("libtorch CUDA backend loaded from") {
        bail!(
            "the packed {HYTRAIN} did not load the venv torch's libtorch_cuda.so with --device cuda; its log ({}):\n{log}",
            probe.display()
        );
    }
    let refusal = out.join("export_nogpu.log");
    let log = fs::read_to_string(&refusal).with_context(|| format!("the rehearsal wrote no {}", refusal.display()))?;
    if !log.contains(NO_GPU_REFUSAL) {
        bail!(
            "the packed exporter asked for cuda without a GPU did not refuse with \"{NO_GPU_REFUSAL}\"; its log \
             ({}):\n{log}",
            refusal.display()
        );
    }
    let summary = fs::read_to_string(out.join("summary.txt")).unwrap_or_default();
    let export_line = summary
        .lines()
        .find(|l| l.starts_with("gpu-check: export: "))
        .unwrap_or("gpu-check: export: (no line in summary.txt)");
    let weights = &report["weights"];
    println!(
        "gpu-check: rehearsal passed: the exported ResNet-18 and both built-in models trained on the CPU (the \
         exported one {:.1e} off PyTorch float32, {:.1e} allowed), --device cuda loaded libtorch_cuda.so, the \
         export for cuda without a GPU refused\n{export_line}",
        weights["hytrain_off_pytorch_float32"].as_f64().unwrap_or(f64::NAN),
        weights["allowed"].as_f64().unwrap_or(f64::NAN),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    fn scripts() -> Vec<Packed> {
        SCRIPTS.iter().map(|(from, to)| Packed { from: root().join(from), to: to.into(), strip: false }).collect()
    }

    #[test]
    fn packing_lays_out_binaries_scripts_and_the_exporter_executable_and_replaces_an_old_pack() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join(CHECK);
        fs::write(&binary, b"\x7fELF...").unwrap();
        let pack_dir = dir.path().join("pack");
        fs::create_dir(&pack_dir).unwrap();
        fs::write(pack_dir.join("stale.txt"), b"old").unwrap();
        let mut files = scripts();
        files.extend(python_files(&root()).unwrap());
        files.push(Packed { from: binary, to: CHECK.into(), strip: false });
        let bytes = pack(&pack_dir, &files, LIMIT_BYTES).unwrap();
        let mut names: Vec<String> =
            fs::read_dir(&pack_dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, ["ddp_step.py", CHECK, "python", "run.sh", "torch_peer.py"]);
        assert!(pack_dir.join(EXPORTER).join("__main__.py").is_file());
        assert!(pack_dir.join(EXAMPLE).is_file());
        let sizes: u64 = files.iter().map(|f| fs::metadata(pack_dir.join(&f.to)).unwrap().len()).sum();
        assert_eq!(bytes, sizes);
        for file in &files {
            let mode = fs::metadata(pack_dir.join(&file.to)).unwrap().permissions().mode();
            assert_eq!(mode & 0o111, 0o111, "{} is executable", file.to.display());
        }
    }

    /// `python -m hytrain_export` on the GPU machine needs every module of the package, however many it grows to.
    #[test]
    fn every_module_of_the_exporter_and_the_example_are_packed_under_their_repository_paths() {
        let packed: Vec<PathBuf> = python_files(&root()).unwrap().into_iter().map(|f| f.to).collect();
        let mut modules: Vec<PathBuf> = fs::read_dir(root().join(EXPORTER))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().ends_with(".py"))
            .map(|n| Path::new(EXPORTER).join(n))
            .collect();
        modules.sort();
        modules.push(EXAMPLE.into());
        assert_eq!(packed, modules);
        for module in ["__init__.py", "__main__.py", "_export.py"] {
            assert!(packed.contains(&Path::new(EXPORTER).join(module)), "{module}");
        }
    }

    #[test]
    fn an_exporter_folder_without_its_main_module_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(EXPORTER)).unwrap();
        fs::write(dir.path().join(EXPORTER).join("_export.py"), b"").unwrap();
        let error = format!("{:#}", python_files(dir.path()).unwrap_err());
        assert!(error.contains("has no __main__.py"), "{error}");
    }

    /// The rehearsal requires this refusal in the packed exporter's log; if the exporter words it otherwise, the
    /// rehearsal would fail for a reason that is not the pack's.
    #[test]
    fn the_refusal_the_rehearsal_requires_is_the_exporters_own() {
        let text = fs::read_to_string(root().join(EXPORTER).join("_export.py")).unwrap();
        assert!(text.contains(NO_GPU_REFUSAL));
    }

    #[test]
    fn a_stripped_binary_is_smaller_and_still_an_elf_file() {
        let dir = tempfile::tempdir().unwrap();
        let own = std::env::current_exe().unwrap();
        let pack_dir = dir.path().join("pack");
        let bytes = pack(&pack_dir, &[Packed { from: own.clone(), to: "x".into(), strip: true }], LIMIT_BYTES).unwrap();
        assert!(bytes < fs::metadata(&own).unwrap().len());
        let packed = fs::read(pack_dir.join("x")).unwrap();
        assert_eq!(&packed[..4], b"\x7fELF");
        assert!(!Linkage::read(&pack_dir.join("x")).unwrap().needed.is_empty());
    }

    #[test]
    fn a_pack_over_the_limit_is_refused_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join(CHECK);
        fs::write(&binary, vec![0u8; 2048]).unwrap();
        let pack_dir = dir.path().join("pack");
        let files = [Packed { from: binary, to: CHECK.into(), strip: false }];
        let error = format!("{:#}", pack(&pack_dir, &files, 1024).unwrap_err());
        assert!(error.contains("more than the 0 MiB a GPU machine takes"), "{error}");
        assert!(!pack_dir.exists());
    }

    #[test]
    fn a_missing_script_is_named_and_nothing_is_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let pack_dir = dir.path().join("pack");
        let files = [Packed { from: dir.path().join("run.sh"), to: "run.sh".into(), strip: false }];
        let error = format!("{:#}", pack(&pack_dir, &files, LIMIT_BYTES).unwrap_err());
        assert!(error.contains("cannot copy") && error.contains("run.sh"), "{error}");
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
            needed: vec!["libc10.so".into(), "libopenblas.so.0".into(), "libc.so.6".into()],
            runpath: vec![],
        };
        let error = linkage.check_for_gpu_machine().unwrap_err().to_string();
        assert!(error.starts_with("hytrain needs libopenblas.so.0, which neither"), "{error}");
    }

    #[test]
    fn a_binary_needing_only_glibc_and_torch_lib_passes() {
        let linkage = Linkage {
            needed: ["libstdc++.so.6", "libtorch_cpu.so", "libc10.so", "libc.so.6"].map(String::from).to_vec(),
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
            "\"$PYTHON\" -m hytrain_export",
            "--device \"$DEVICE\" --check none",
            "export_model 180 &",
            "\nwait_for_export\n",
            "\"$HYTRAIN\" train --device \"$DEVICE\" --model \"$EXPORTED_DIR\"",
            "--train-exported \"$EXPORTED_DIR\"",
            "--device cuda --out \"$WORK/nogpu\"",
        ] {
            assert!(text.contains(part), "run.sh lacks {part}");
        }
        // Both sides of the exported model's comparison run with TF32 off.
        assert_eq!(text.matches("NVIDIA_TF32_OVERRIDE=0 ").count(), 2);
    }

    /// The worst-case seconds of run.sh on the GPU machine: every step's timeout, run in order, except that the
    /// export started in the background (`export_model N &`) runs beside the steps up to `wait_for_export`, which
    /// then count as whichever is longer. Blocks that run only in the rehearsal count nothing.
    fn gpu_budget(script: &str) -> u64 {
        // `20` or `$((20 * S))` (S is 1 on the GPU machine); a variable counts where the function is called.
        let number =
            |word: Option<&str>| word.and_then(|w| w.trim_start_matches("$((").parse::<u64>().ok()).unwrap_or(0);
        let (mut total, mut background, mut beside): (u64, u64, Option<u64>) = (0, 0, None);
        let mut rehearsal_only = false;
        for raw in script.lines() {
            if raw.starts_with("if [ \"${GPU_CHECK_REHEARSAL:-0}\" = 1 ]; then") {
                rehearsal_only = true;
            }
            if rehearsal_only {
                // Its own `else` branch runs on the GPU machine (this script's sets variables only).
                rehearsal_only = raw != "fi" && raw != "else";
                continue;
            }
            let line = raw.trim();
            let mut seconds = 0;
            if let Some(rest) = line.split("timeout -k 10 ").nth(1) {
                seconds += number(rest.split_whitespace().next());
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.first().copied() {
                // train MODEL BATCH_WARMUP_STEPS HYTRAIN_TIMEOUT PEER_TIMEOUT
                Some("train") => seconds += number(words.get(3).copied()) + number(words.get(4).copied()),
                // overlap_check RUN_TIMEOUT COMPARE_TIMEOUT: two runs, then the comparison
                Some("overlap_check") => seconds += 2 * number(words.get(1).copied()) + number(words.get(2).copied()),
                // exported_check HYTRAIN_TIMEOUT PEER_TIMEOUT
                Some("exported_check") => seconds += number(words.get(1).copied()) + number(words.get(2).copied()),
                Some("export_model") if line.ends_with('&') => {
                    background = number(words.get(1).copied());
                    beside = Some(0);
                }
                Some("wait_for_export") if words.len() == 1 => {
                    total += background.max(beside.take().unwrap_or(0));
                }
                _ => {}
            }
            match beside.as_mut() {
                Some(beside) => *beside += seconds,
                None => total += seconds,
            }
        }
        total + background * u64::from(beside.is_some())
    }

    #[test]
    fn a_background_export_counts_as_the_longer_of_itself_and_the_steps_beside_it() {
        let script = "timeout -k 10 $((5 * S)) a\nexport_model 100 &\ntimeout -k 10 30 b\ntimeout -k 10 40 c\n\
                      wait_for_export\ntrain m $X 7 8\nexported_check 1 2\n\
                      if [ \"${GPU_CHECK_REHEARSAL:-0}\" = 1 ]; then\n    timeout -k 10 999 d\nfi\n";
        assert_eq!(gpu_budget(script), 5 + 100 + 7 + 8 + 1 + 2);
        let slow_steps = script.replace("export_model 100 &", "export_model 60 &");
        assert_eq!(gpu_budget(&slow_steps), 5 + 70 + 7 + 8 + 1 + 2);
    }

    /// Every step of run.sh has a timeout, and together they fit the GPU machine's 8 minutes with room for
    /// finding torch and starting the shell's own tools.
    #[test]
    fn the_run_scripts_timeouts_add_up_to_under_eight_minutes() {
        let text = fs::read_to_string(root().join(SCRIPTS[0].0)).unwrap();
        let total = gpu_budget(&text);
        assert_eq!(total, 470, "the README states the total");
    }
}
