//! The CUDA C sources of `kernels/`, built into the binary, and their compilation to PTX with NVRTC.

use crate::nvrtc::{ComputeCapability, Nvrtc, Ptx};
use crate::CudaError;

/// One `.cu` file of `kernels/` and the kernels it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelFile {
    /// The file name, also the NVRTC program name (`bucket.cu`).
    pub name: &'static str,
    /// Its text.
    pub source: &'static str,
    /// Its `extern "C" __global__` functions, the names a module load looks up.
    pub entry_points: &'static [&'static str],
}

/// Every kernel file hytrain compiles.
pub const KERNEL_FILES: [KernelFile; 2] = [
    KernelFile {
        name: "bucket.cu",
        source: include_str!("../../../kernels/bucket.cu"),
        entry_points: &["hytrain_pack_scaled", "hytrain_unpack_scaled"],
    },
    KernelFile {
        name: "optim.cu",
        source: include_str!("../../../kernels/optim.cu"),
        entry_points: &["hytrain_sgd_momentum", "hytrain_adamw"],
    },
];

/// NVRTC options besides the architecture. No FMA contraction: the CPU references in [`crate::reference`] round
/// after every multiply and add, and a GPU result is only comparable to them exactly when the GPU does too (the
/// kernels are memory-bound, so the fused form would not be faster anyway).
pub const COMPILE_OPTIONS: [&str; 2] = ["--fmad=false", "--std=c++17"];

/// Compiles every kernel file for `arch`, in [`KERNEL_FILES`] order.
pub fn compile_all(nvrtc: &Nvrtc, arch: ComputeCapability) -> Result<Vec<Ptx>, CudaError> {
    KERNEL_FILES.iter().map(|file| nvrtc.compile(file.name, file.source, arch, &COMPILE_OPTIONS)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names after `extern "C" __global__ void` in a source, as a reader of the file sees them.
    fn declared_kernels(source: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut rest = source;
        while let Some(at) = rest.find("extern \"C\" __global__ void ") {
            rest = &rest[at + "extern \"C\" __global__ void ".len()..];
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            names.push(name);
        }
        names
    }

    #[test]
    fn the_table_lists_every_kernel_each_source_declares() {
        for file in KERNEL_FILES {
            assert_eq!(declared_kernels(file.source), file.entry_points, "{}", file.name);
        }
    }
}
