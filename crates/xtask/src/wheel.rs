//! Which members of which wheel make up the CPU libtorch folder, and taking them out of a wheel whose hash checked.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component as PathPart, Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// The libtorch version tch 0.24 expects (torch-sys compares it with `build-version`).
pub const TORCH_VERSION: &str = "2.11.0";

/// Members of a wheel copied into the libtorch folder: `from` is a wheel path, a whole folder when it ends in `/`;
/// `to` is where it lands, relative to the libtorch folder.
#[derive(Debug, Clone, Copy)]
pub struct Take {
    /// Path inside the wheel (`torch/lib/libc10.so`, or a folder `torch/include/`).
    pub from: &'static str,
    /// Path inside the libtorch folder (`lib/libc10.so`, or a folder `include/`).
    pub to: &'static str,
}

/// One pinned wheel of `libtorch-requirements.txt` and what is taken from it.
#[derive(Debug, Clone, Copy)]
pub struct Component {
    /// The requirement's name as pinned in `libtorch-requirements.txt`.
    pub requirement: &'static str,
    /// Roughly how much pip downloads, for the progress line.
    pub download_mb: u32,
    /// The members taken; everything else in the wheel is left out.
    pub takes: &'static [Take],
}

const fn take(from: &'static str, to: &'static str) -> Take {
    Take { from, to }
}

/// The CPU libtorch: the torch wheel without its CUDA libraries (libtorch_cuda*, libc10_cuda), without
/// libtorch_python, and without its libtorch.so, which needs libtorch_cuda.so (setup builds a small one instead).
/// libtorch_cpu.so itself needs libcudart.so.13 and libcupti.so.13, hence the two nvidia wheels.
///
/// The GPU libraries hytrain-cuda opens at run time come along, unpacked under `<libtorch>/nvidia/` where it looks
/// (the same relative folders as pip's, so one search serves both): NCCL (`nvidia-nccl-cu13`) and NVRTC with its
/// builtins (`nvidia-cuda-nvrtc`), at the versions torch 2.11.0 itself pins. Neither needs a GPU to load: the tests
/// read NCCL's version and create its unique id, and compile every kernel of `kernels/` to PTX.
/// Bump [`LAYOUT`] with any change here so existing folders are rebuilt.
pub const COMPONENTS: &[Component] = &[
    Component {
        requirement: "torch",
        download_mb: 531,
        takes: &[
            take("torch/include/", "include/"),
            take("torch/share/", "share/"),
            take("torch/lib/libc10.so", "lib/libc10.so"),
            take("torch/lib/libtorch_cpu.so", "lib/libtorch_cpu.so"),
            take("torch/lib/libgomp.so.1", "lib/libgomp.so.1"),
            take("torch/lib/libshm.so", "lib/libshm.so"),
            take("torch/lib/libtorch_global_deps.so", "lib/libtorch_global_deps.so"),
        ],
    },
    Component {
        requirement: "nvidia-cuda-runtime",
        download_mb: 3,
        takes: &[take("nvidia/cu13/lib/libcudart.so.13", "lib/libcudart.so.13")],
    },
    Component {
        requirement: "nvidia-cuda-cupti",
        download_mb: 11,
        takes: &[take("nvidia/cu13/lib/libcupti.so.13", "lib/libcupti.so.13")],
    },
    Component {
        requirement: "nvidia-nccl-cu13",
        download_mb: 197,
        takes: &[take("nvidia/nccl/lib/libnccl.so.2", "nvidia/nccl/lib/libnccl.so.2")],
    },
    Component {
        requirement: "nvidia-cuda-nvrtc",
        download_mb: 91,
        // Not the wheel's `.alt` variants (another 110 MB), which hytrain never opens.
        takes: &[
            take("nvidia/cu13/lib/libnvrtc.so.13", "nvidia/cu13/lib/libnvrtc.so.13"),
            take("nvidia/cu13/lib/libnvrtc-builtins.so.13.0", "nvidia/cu13/lib/libnvrtc-builtins.so.13.0"),
        ],
    },
];

/// Version of the folder's make-up; part of the set-up stamp, so changing [`COMPONENTS`] or the shim rebuilds it.
pub const LAYOUT: u32 = 2;

/// Where a wheel member lands inside the libtorch folder, or `None` when it is not taken. Members that would
/// escape their folder (`..`, absolute paths) are never taken.
pub fn destination(takes: &[Take], member: &str) -> Option<PathBuf> {
    if member.ends_with('/') {
        return None;
    }
    takes.iter().find_map(|t| {
        let rest = match t.from.strip_suffix('/') {
            Some(folder) => member.strip_prefix(folder)?.strip_prefix('/')?,
            None if member == t.from => "",
            None => return None,
        };
        if rest.is_empty() {
            return Some(PathBuf::from(t.to));
        }
        let rest = Path::new(rest);
        if !rest.components().all(|p| matches!(p, PathPart::Normal(_))) {
            return None;
        }
        Some(Path::new(t.to).join(rest))
    })
}

/// The lowercase hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Copies the members `takes` names from the wheel at `wheel` into `root`, keeping their permission bits, and
/// returns how many files it wrote. Fails when a take matches nothing, since that means the pin and the table
/// disagree and the folder would be incomplete.
pub fn extract(wheel: &Path, takes: &[Take], root: &Path) -> Result<usize> {
    let file = File::open(wheel).with_context(|| format!("cannot open {}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file))
        .with_context(|| format!("{} is not a readable wheel (zip)", wheel.display()))?;
    let mut used = vec![false; takes.len()];
    let mut written = 0;
    for index in 0..archive.len() {
        let name = match archive.name_for_index(index) {
            Some(Ok(name)) => name.to_string(),
            _ => continue,
        };
        let Some(relative) = destination(takes, &name) else {
            continue;
        };
        if let Some(i) = takes.iter().position(|t| destination(std::slice::from_ref(t), &name).is_some()) {
            used[i] = true;
        }
        let mut member =
            archive.by_index(index).with_context(|| format!("cannot read {name} in {}", wheel.display()))?;
        let mode = member.unix_mode().unwrap_or(0o644);
        if mode & 0o170000 == 0o120000 {
            bail!("{name} in {} is a symbolic link; the wheel is not what the pin describes", wheel.display());
        }
        let path = root.join(&relative);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let mut out = BufWriter::new(File::create(&path).with_context(|| format!("cannot create {}", path.display()))?);
        io::copy(&mut member, &mut out).with_context(|| format!("cannot unpack {name} from {}", wheel.display()))?;
        out.into_inner().map_err(|e| e.into_error())?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o777))?;
        written += 1;
    }
    if let Some(missing) = takes.iter().zip(&used).find(|(_, used)| !**used) {
        bail!(
            "{} has no {}; the pin in crates/xtask/libtorch-requirements.txt and COMPONENTS in \
             crates/xtask/src/wheel.rs disagree",
            wheel.display(),
            missing.0.from
        );
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use zip::write::SimpleFileOptions;

    fn torch_takes() -> &'static [Take] {
        COMPONENTS.iter().find(|c| c.requirement == "torch").unwrap().takes
    }

    #[test]
    fn torch_headers_cmake_files_and_cpu_libraries_are_taken() {
        let takes = torch_takes();
        let taken = |m: &str| destination(takes, m).map(|p| p.to_string_lossy().into_owned());
        assert_eq!(taken("torch/include/ATen/ATen.h").as_deref(), Some("include/ATen/ATen.h"));
        assert_eq!(
            taken("torch/share/cmake/Torch/TorchConfig.cmake").as_deref(),
            Some("share/cmake/Torch/TorchConfig.cmake")
        );
        for lib in ["libc10.so", "libtorch_cpu.so", "libgomp.so.1", "libshm.so", "libtorch_global_deps.so"] {
            assert_eq!(taken(&format!("torch/lib/{lib}")), Some(format!("lib/{lib}")));
        }
    }

    #[test]
    fn cuda_python_and_wheel_libtorch_libraries_are_left_out() {
        let takes = torch_takes();
        for member in [
            "torch/lib/libtorch.so",
            "torch/lib/libtorch_cuda.so",
            "torch/lib/libtorch_cuda_linalg.so",
            "torch/lib/libc10_cuda.so",
            "torch/lib/libtorch_python.so",
            "torch/lib/libcaffe2_nvrtc.so",
            "torch/_C.cpython-311-x86_64-linux-gnu.so",
            "torch/include",
            "torch/include/",
            "torch/includes/x.h",
            "torch-2.11.0.dist-info/METADATA",
        ] {
            assert_eq!(destination(takes, member), None, "{member} must not be taken");
        }
    }

    #[test]
    fn gpu_libraries_land_where_hytrain_cuda_looks_beside_libtorch() {
        let takes = |requirement: &str| COMPONENTS.iter().find(|c| c.requirement == requirement).unwrap().takes;
        let taken = |requirement: &str, member: &str| {
            destination(takes(requirement), member).map(|p| p.to_string_lossy().into_owned())
        };
        assert_eq!(
            taken("nvidia-nccl-cu13", "nvidia/nccl/lib/libnccl.so.2").as_deref(),
            Some("nvidia/nccl/lib/libnccl.so.2")
        );
        for lib in ["libnvrtc.so.13", "libnvrtc-builtins.so.13.0"] {
            assert_eq!(
                taken("nvidia-cuda-nvrtc", &format!("nvidia/cu13/lib/{lib}")),
                Some(format!("nvidia/cu13/lib/{lib}"))
            );
        }
        assert_eq!(taken("nvidia-cuda-nvrtc", "nvidia/cu13/lib/libnvrtc.alt.so.13"), None);
        assert_eq!(taken("nvidia-nccl-cu13", "nvidia/nccl/include/nccl.h"), None);
    }

    #[test]
    fn members_escaping_their_folder_are_never_taken() {
        let takes = torch_takes();
        assert_eq!(destination(takes, "torch/include/../../../etc/passwd"), None);
        assert_eq!(destination(takes, "torch/include/./x.h"), None);
    }

    fn write_wheel(path: &Path, members: &[(&str, &[u8], u32)]) {
        let mut zip = zip::ZipWriter::new(File::create(path).unwrap());
        for (name, data, mode) in members {
            let options = SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated)
                .unix_permissions(*mode);
            zip.start_file(*name, options).unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap();
    }

    #[test]
    fn extraction_writes_only_taken_members_with_their_modes() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("torch-2.11.0-cp311-cp311-manylinux_2_28_x86_64.whl");
        write_wheel(
            &wheel,
            &[
                ("torch/include/c10/core/Device.h", b"#pragma once\n", 0o644),
                ("torch/share/cmake/Torch/TorchConfig.cmake", b"set()\n", 0o644),
                ("torch/lib/libc10.so", b"c10", 0o755),
                ("torch/lib/libtorch_cpu.so", b"cpu", 0o755),
                ("torch/lib/libgomp.so.1", b"gomp", 0o755),
                ("torch/lib/libshm.so", b"shm", 0o755),
                ("torch/lib/libtorch_global_deps.so", b"deps", 0o755),
                ("torch/lib/libtorch.so", b"needs cuda", 0o755),
                ("torch/lib/libtorch_cuda.so", b"cuda", 0o755),
            ],
        );
        let root = dir.path().join("libtorch");
        assert_eq!(extract(&wheel, torch_takes(), &root).unwrap(), 7);
        assert_eq!(fs::read(root.join("lib/libtorch_cpu.so")).unwrap(), b"cpu");
        assert_eq!(fs::read(root.join("include/c10/core/Device.h")).unwrap(), b"#pragma once\n");
        assert_eq!(fs::metadata(root.join("lib/libc10.so")).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(
            fs::metadata(root.join("share/cmake/Torch/TorchConfig.cmake")).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert!(!root.join("lib/libtorch.so").exists());
        assert!(!root.join("lib/libtorch_cuda.so").exists());
    }

    #[test]
    fn a_wheel_lacking_a_taken_library_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("w.whl");
        write_wheel(&wheel, &[("nvidia/cu13/lib/libcudart.so.12", b"old", 0o644)]);
        let takes = COMPONENTS.iter().find(|c| c.requirement == "nvidia-cuda-runtime").unwrap().takes;
        let error = format!("{:#}", extract(&wheel, takes, &dir.path().join("out")).unwrap_err());
        assert!(error.contains("has no nvidia/cu13/lib/libcudart.so.13"), "{error}");
    }

    #[test]
    fn a_file_that_is_not_a_zip_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("w.whl");
        fs::write(&wheel, b"<html>proxy error</html>").unwrap();
        let error = format!("{:#}", extract(&wheel, torch_takes(), dir.path()).unwrap_err());
        assert!(error.contains("is not a readable wheel"), "{error}");
    }

    #[test]
    fn sha256_of_a_file_matches_the_known_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        fs::write(&path, b"abc").unwrap();
        assert_eq!(sha256_file(&path).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
