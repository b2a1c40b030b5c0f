//! NVRTC opened at run time: CUDA C++ source to PTX, with no GPU and no CUDA toolkit.
//!
//! NVRTC keeps its built-in headers in a second library, `libnvrtc-builtins.so.MAJOR.MINOR`, which it opens by
//! bare name on the first compilation. The pip wheel's folder is not on the loader's path, so that compilation
//! would fail with NVRTC_ERROR_BUILTIN_OPERATION_FAILURE; opening the builtins by full path first makes the
//! loader hand NVRTC that copy (it matches an already-loaded library by its soname).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::path::Path;

use crate::library::{self, Loaded, NvidiaLibrary, Origin, Search};
use crate::CudaError;

/// A GPU architecture by compute capability (`9.0` for H100/H200).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ComputeCapability {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

impl ComputeCapability {
    /// The virtual architecture NVRTC compiles PTX for, `compute_90`.
    pub fn virtual_arch(&self) -> String {
        format!("compute_{}{}", self.major, self.minor)
    }
}

impl fmt::Display for ComputeCapability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// PTX text NVRTC produced for one source file.
#[derive(Debug, Clone)]
pub struct Ptx {
    /// The source file's name.
    pub program: String,
    /// What it was compiled for.
    pub arch: ComputeCapability,
    /// The PTX assembly.
    pub text: String,
}

impl Ptx {
    /// The kernel entry points the PTX defines (`.entry NAME(`), in order.
    pub fn entry_points(&self) -> Vec<&str> {
        self.text
            .lines()
            .filter_map(|line| {
                let rest = line.trim_start();
                let rest = rest.strip_prefix(".visible ").unwrap_or(rest);
                let rest = rest.strip_prefix(".entry ")?;
                Some(rest.split(['(', ' ']).next().unwrap_or(rest))
            })
            .collect()
    }
}

type Version = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
type ErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type CreateProgram = unsafe extern "C" fn(
    *mut *mut c_void,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type CompileProgram = unsafe extern "C" fn(*mut c_void, c_int, *const *const c_char) -> c_int;
type GetSize = unsafe extern "C" fn(*mut c_void, *mut usize) -> c_int;
type GetText = unsafe extern "C" fn(*mut c_void, *mut c_char) -> c_int;
type DestroyProgram = unsafe extern "C" fn(*mut *mut c_void) -> c_int;
type NumArchs = unsafe extern "C" fn(*mut c_int) -> c_int;
type Archs = unsafe extern "C" fn(*mut c_int) -> c_int;

const NEED: &str = "hytrain needs NVRTC 12 or newer (pip install nvidia-cuda-nvrtc)";

/// An opened NVRTC.
pub struct Nvrtc {
    loaded: Loaded,
    // Held so the loader keeps the builtins mapped for NVRTC's own dlopen; never called directly.
    _builtins: Option<libloading::Library>,
    version: (u32, u32),
    error_string: ErrorString,
    create: CreateProgram,
    compile: CompileProgram,
    ptx_size: GetSize,
    ptx: GetText,
    log_size: GetSize,
    log: GetText,
    destroy: DestroyProgram,
    num_archs: NumArchs,
    archs: Archs,
}

impl fmt::Debug for Nvrtc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nvrtc")
            .field("path", &self.loaded.path)
            .field("origin", &self.loaded.origin)
            .field("version", &self.version)
            .finish()
    }
}

impl Nvrtc {
    /// Finds and opens NVRTC the way a hytrain process does ([`Search::for_process`]).
    pub fn load() -> Result<Nvrtc, CudaError> {
        Nvrtc::load_from(&Search::for_process(NvidiaLibrary::Nvrtc))
    }

    /// Opens the first `libnvrtc.so.13` of `search` that loads, and the builtins library beside it.
    pub fn load_from(search: &Search) -> Result<Nvrtc, CudaError> {
        let loaded = library::open(NvidiaLibrary::Nvrtc, search)?;
        // SAFETY: the signatures are NVRTC's, from nvrtc.h.
        let nvrtc = unsafe {
            let version: Version = loaded.function("nvrtcVersion", NEED)?;
            let error_string: ErrorString = loaded.function("nvrtcGetErrorString", NEED)?;
            let (mut major, mut minor) = (0, 0);
            check(error_string, "nvrtcVersion", version(&mut major, &mut minor))?;
            let version = (major.max(0) as u32, minor.max(0) as u32);
            let builtins = open_builtins(&loaded.path, version)?;
            Nvrtc {
                version,
                error_string,
                create: loaded.function("nvrtcCreateProgram", NEED)?,
                compile: loaded.function("nvrtcCompileProgram", NEED)?,
                ptx_size: loaded.function("nvrtcGetPTXSize", NEED)?,
                ptx: loaded.function("nvrtcGetPTX", NEED)?,
                log_size: loaded.function("nvrtcGetProgramLogSize", NEED)?,
                log: loaded.function("nvrtcGetProgramLog", NEED)?,
                destroy: loaded.function("nvrtcDestroyProgram", NEED)?,
                num_archs: loaded.function("nvrtcGetNumSupportedArchs", NEED)?,
                archs: loaded.function("nvrtcGetSupportedArchs", NEED)?,
                _builtins: builtins,
                loaded,
            }
        };
        tracing::info!(
            "NVRTC {}.{} loaded from {} ({})",
            nvrtc.version.0,
            nvrtc.version.1,
            nvrtc.loaded.path.display(),
            nvrtc.loaded.origin
        );
        Ok(nvrtc)
    }

    /// The file NVRTC was loaded from.
    pub fn path(&self) -> &Path {
        &self.loaded.path
    }

    /// How the file was found.
    pub fn origin(&self) -> Origin {
        self.loaded.origin
    }

    /// NVRTC's version, `(major, minor)`; the CUDA release it belongs to.
    pub fn version(&self) -> (u32, u32) {
        self.version
    }

    /// The architectures this NVRTC can compile for, lowest first.
    pub fn supported_archs(&self) -> Result<Vec<ComputeCapability>, CudaError> {
        let mut count: c_int = 0;
        // SAFETY: writes one int, then `count` ints.
        unsafe {
            check(self.error_string, "nvrtcGetNumSupportedArchs", (self.num_archs)(&mut count))?;
            let mut archs = vec![0 as c_int; count.max(0) as usize];
            check(self.error_string, "nvrtcGetSupportedArchs", (self.archs)(archs.as_mut_ptr()))?;
            Ok(archs
                .into_iter()
                .map(|a| ComputeCapability { major: a.max(0) as u32 / 10, minor: a.max(0) as u32 % 10 })
                .collect())
        }
    }

    /// Compiles `source` (named `program` in messages) to PTX for `arch`, with `options` added after the
    /// architecture. A compile error returns NVRTC's log.
    pub fn compile(
        &self,
        program: &str,
        source: &str,
        arch: ComputeCapability,
        options: &[&str],
    ) -> Result<Ptx, CudaError> {
        let text = |s: &str, what: &str| {
            CString::new(s).map_err(|_| CudaError::Compile {
                program: program.into(),
                arch: arch.virtual_arch(),
                log: format!("the {what} holds a NUL byte"),
            })
        };
        let c_source = text(source, "source")?;
        let c_name = text(program, "program name")?;
        let mut c_options = vec![text(&format!("--gpu-architecture={}", arch.virtual_arch()), "option")?];
        for option in options {
            c_options.push(text(option, "option")?);
        }
        let option_ptrs: Vec<*const c_char> = c_options.iter().map(|o| o.as_ptr()).collect();

        let mut handle: *mut c_void = std::ptr::null_mut();
        // SAFETY: every pointer is a live NUL-terminated string; the program is destroyed by the guard below.
        unsafe {
            check(
                self.error_string,
                "nvrtcCreateProgram",
                (self.create)(&mut handle, c_source.as_ptr(), c_name.as_ptr(), 0, std::ptr::null(), std::ptr::null()),
            )?;
        }
        let program_guard = ProgramGuard { handle, destroy: self.destroy };
        // SAFETY: the handle is live; option pointers outlive the call.
        let result = unsafe { (self.compile)(program_guard.handle, option_ptrs.len() as c_int, option_ptrs.as_ptr()) };
        if result != 0 {
            let log = self.read(program_guard.handle, self.log_size, self.log, "nvrtcGetProgramLog")?;
            let log = library::one_line(&log);
            let log = if log.is_empty() {
                format!("{} (nvrtcResult {result}) with an empty log", describe(self.error_string, result))
            } else {
                log
            };
            return Err(CudaError::Compile { program: program.into(), arch: arch.virtual_arch(), log });
        }
        let text = self.read(program_guard.handle, self.ptx_size, self.ptx, "nvrtcGetPTX")?;
        Ok(Ptx { program: program.into(), arch, text })
    }

    fn read(&self, handle: *mut c_void, size: GetSize, get: GetText, call: &'static str) -> Result<String, CudaError> {
        let mut len = 0usize;
        // SAFETY: the handle is live; the buffer has the size NVRTC reported (which counts the NUL).
        unsafe {
            check(self.error_string, call, size(handle, &mut len))?;
            let mut buffer = vec![0u8; len.max(1)];
            check(self.error_string, call, get(handle, buffer.as_mut_ptr().cast()))?;
            let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
            buffer.truncate(end);
            Ok(String::from_utf8_lossy(&buffer).into_owned())
        }
    }
}

struct ProgramGuard {
    handle: *mut c_void,
    destroy: DestroyProgram,
}

impl Drop for ProgramGuard {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed once.
        unsafe { (self.destroy)(&mut self.handle) };
    }
}

fn describe(error_string: ErrorString, code: c_int) -> String {
    // SAFETY: returns a static string for any value.
    let text = unsafe { error_string(code) };
    if text.is_null() {
        format!("unknown NVRTC error {code}")
    } else {
        // SAFETY: non-null; NVRTC's error strings are static and NUL-terminated.
        unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned()
    }
}

fn check(error_string: ErrorString, call: &'static str, code: c_int) -> Result<(), CudaError> {
    if code == 0 {
        Ok(())
    } else {
        Err(CudaError::Nvrtc { call, code, message: describe(error_string, code) })
    }
}

/// Opens `libnvrtc-builtins.so.MAJOR.MINOR` from beside `nvrtc` by full path; when it is not there, accepts one
/// the loader already has or finds by itself (a system CUDA toolkit), and otherwise fails naming the file.
fn open_builtins(nvrtc: &Path, (major, minor): (u32, u32)) -> Result<Option<libloading::Library>, CudaError> {
    let name = format!("libnvrtc-builtins.so.{major}.{minor}");
    let beside = nvrtc.parent().map(|dir| dir.join(&name));
    if let Some(path) = beside.as_ref().filter(|p| p.is_file()) {
        // SAFETY: NVIDIA's library; loading it runs no initialisers that depend on us.
        let library = unsafe { libloading::os::unix::Library::open(Some(path), library::LOAD_FLAGS) }.map_err(|e| {
            CudaError::Nvrtc {
                call: "dlopen",
                code: -1,
                message: format!("{} did not load: {}", path.display(), library::one_line(&e.to_string())),
            }
        })?;
        return Ok(Some(library.into()));
    }
    // SAFETY: as above.
    if unsafe { libloading::os::unix::Library::open(Some(&name), library::LOAD_FLAGS) }.is_ok() {
        return Ok(None);
    }
    Err(CudaError::NvrtcBuiltinsMissing {
        nvrtc: nvrtc.to_path_buf(),
        version: format!("{major}.{minor}"),
        builtins: name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_points_are_read_from_visible_and_plain_entries() {
        let ptx = Ptx {
            program: "k.cu".into(),
            arch: ComputeCapability { major: 9, minor: 0 },
            text: ".version 9.0\n.target sm_90\n\t// .globl\thytrain_pack\n.visible .entry hytrain_pack(\n\t.param .u64 a\n)\n.entry local_one (\n"
                .into(),
        };
        assert_eq!(ptx.entry_points(), ["hytrain_pack", "local_one"]);
    }

    #[test]
    fn missing_builtins_name_the_file_and_the_wheel() {
        let dir = tempfile::tempdir().unwrap();
        let error = open_builtins(&dir.path().join("libnvrtc.so.13"), (99, 7)).unwrap_err().to_string();
        assert!(error.contains("needs libnvrtc-builtins.so.99.7 in the same folder"), "{error}");
        assert!(error.contains("nvidia-cuda-nvrtc wheel"), "{error}");
    }

    #[test]
    fn virtual_arch_names_follow_nvcc() {
        assert_eq!(ComputeCapability { major: 9, minor: 0 }.virtual_arch(), "compute_90");
        assert_eq!(ComputeCapability { major: 7, minor: 5 }.to_string(), "7.5");
    }
}
