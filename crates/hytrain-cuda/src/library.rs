//! Finding and opening NVIDIA libraries at run time.
//!
//! Pip puts NCCL and NVRTC in `site-packages/nvidia/{nccl,cu13}/lib`, beside `site-packages/torch`; `cargo xtask
//! setup` unpacks the same wheels under `.libtorch/nvidia/`; clusters put them on `LD_LIBRARY_PATH` or in system
//! folders. None of these is on the dynamic loader's default path, so each library is looked for by full path in
//! an explicit, ordered list of folders, and the list is what an error shows when nothing loads.

use std::ffi::{c_void, CStr, OsStr};
use std::fmt;
use std::path::{Path, PathBuf};

use crate::CudaError;

/// One of the NVIDIA libraries hytrain opens with dlopen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NvidiaLibrary {
    /// NCCL, `libnccl.so.2` (pip: nvidia-nccl-cu13).
    Nccl,
    /// NVRTC, the run-time CUDA C++ compiler, `libnvrtc.so.13` (pip: nvidia-cuda-nvrtc).
    Nvrtc,
    /// The CUDA driver, `libcuda.so.1`, installed with the NVIDIA kernel driver, never by pip.
    Driver,
}

impl NvidiaLibrary {
    /// The file name opened (the library's soname).
    pub fn file_name(self) -> &'static str {
        match self {
            NvidiaLibrary::Nccl => "libnccl.so.2",
            NvidiaLibrary::Nvrtc => "libnvrtc.so.13",
            NvidiaLibrary::Driver => "libcuda.so.1",
        }
    }

    /// A function every version exports; its address tells which file a handle belongs to.
    pub(crate) fn probe_symbol(self) -> &'static CStr {
        match self {
            NvidiaLibrary::Nccl => c"ncclGetVersion",
            NvidiaLibrary::Nvrtc => c"nvrtcVersion",
            NvidiaLibrary::Driver => c"cuInit",
        }
    }

    fn hint(self) -> &'static str {
        match self {
            NvidiaLibrary::Nccl => {
                "install NCCL (pip install nvidia-nccl-cu13 into the Python environment that holds torch, or \
                 `cargo xtask setup`, which unpacks it under .libtorch/nvidia/nccl/lib) or add its folder to \
                 LD_LIBRARY_PATH"
            }
            NvidiaLibrary::Nvrtc => {
                "install NVRTC (pip install nvidia-cuda-nvrtc into the Python environment that holds torch, or \
                 `cargo xtask setup`, which unpacks it under .libtorch/nvidia/cu13/lib) or add its folder to \
                 LD_LIBRARY_PATH"
            }
            NvidiaLibrary::Driver => "install the NVIDIA driver",
        }
    }
}

/// Why a place is searched, as shown in logs and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The process has the library loaded already (libtorch_cuda.so pulls in NCCL); taking that copy avoids two
    /// NCCLs with separate state in one process.
    AlreadyLoaded,
    /// A folder the caller named.
    Explicit,
    /// A pip `nvidia/.../lib` folder beside libtorch, or libtorch's own `lib`.
    BesideLibtorch,
    /// A folder of `LD_LIBRARY_PATH`.
    LdLibraryPath,
    /// A usual system folder.
    System,
    /// The dynamic loader's own search for the bare file name (`ld.so.cache`, the executable's run path).
    DynamicLoader,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::AlreadyLoaded => "the libraries this process has loaded",
            Origin::Explicit => "named by the caller",
            Origin::BesideLibtorch => "beside libtorch",
            Origin::LdLibraryPath => "LD_LIBRARY_PATH",
            Origin::System => "system folder",
            Origin::DynamicLoader => "the dynamic loader's default search (ld.so.cache)",
        })
    }
}

/// Folders below a libtorch folder, and below the folder holding it (pip's site-packages), where NVIDIA's CUDA 13
/// wheels put their libraries.
const PIP_FOLDERS: [&str; 2] = ["nvidia/nccl/lib", "nvidia/cu13/lib"];

/// Usual system folders of NVIDIA libraries: the CUDA toolkit, the Kubernetes device plugin's mount, Debian/Ubuntu
/// multiarch, RHEL lib64, WSL.
const SYSTEM_FOLDERS: [&str; 7] = [
    "/usr/local/cuda/lib64",
    "/usr/local/nvidia/lib64",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/usr/local/lib",
    "/usr/lib",
    "/usr/lib/wsl/lib",
];

/// An ordered list of places to look for a library. Built with [`Search::for_process`] for real use, or piece by
/// piece when a caller (or a test) wants exactly some places.
#[derive(Debug, Clone, Default)]
pub struct Search {
    folders: Vec<(PathBuf, Origin)>,
    already_loaded: bool,
    dynamic_loader: bool,
    libtorch_unknown: bool,
}

impl Search {
    /// A search of nowhere; add places with the other methods.
    pub fn new() -> Search {
        Search::default()
    }

    /// The search a hytrain process uses for `library`: a copy already loaded in the process; for NCCL and NVRTC
    /// the pip folders beside the libtorch this process loaded (or `LIBTORCH` names); `LD_LIBRARY_PATH`; the usual
    /// system folders; last, the dynamic loader's own search.
    pub fn for_process(library: NvidiaLibrary) -> Search {
        let mut search = Search::new().already_loaded(true);
        if library != NvidiaLibrary::Driver {
            let libtorch =
                loaded_libtorch().or_else(|| std::env::var_os("LIBTORCH").filter(|v| !v.is_empty()).map(PathBuf::from));
            match libtorch {
                Some(root) => search = search.beside_libtorch(&root),
                None => search.libtorch_unknown = true,
            }
        }
        if let Some(value) = std::env::var_os("LD_LIBRARY_PATH") {
            search = search.ld_library_path(&value);
        }
        search.system().dynamic_loader(true)
    }

    /// Adds one folder.
    pub fn folder(mut self, path: impl Into<PathBuf>, origin: Origin) -> Search {
        let path = path.into();
        if !self.folders.iter().any(|(p, _)| *p == path) {
            self.folders.push((path, origin));
        }
        self
    }

    /// Adds the folders where pip and `cargo xtask setup` put NVIDIA libraries relative to a libtorch folder
    /// `root` (the one holding `lib/libtorch_cpu.so`): `root/lib`, `root/nvidia/{nccl,cu13}/lib` (xtask's layout)
    /// and `root/../nvidia/{nccl,cu13}/lib` (pip's, where `root` is `site-packages/torch`).
    pub fn beside_libtorch(mut self, root: &Path) -> Search {
        self = self.folder(root.join("lib"), Origin::BesideLibtorch);
        for sub in PIP_FOLDERS {
            self = self.folder(root.join(sub), Origin::BesideLibtorch);
        }
        if let Some(parent) = root.parent() {
            for sub in PIP_FOLDERS {
                self = self.folder(parent.join(sub), Origin::BesideLibtorch);
            }
        }
        self
    }

    /// Adds the folders of an `LD_LIBRARY_PATH` value, in order; empty entries are skipped.
    pub fn ld_library_path(mut self, value: &OsStr) -> Search {
        for dir in std::env::split_paths(value) {
            if !dir.as_os_str().is_empty() {
                self = self.folder(dir, Origin::LdLibraryPath);
            }
        }
        self
    }

    /// Adds the usual system folders.
    pub fn system(mut self) -> Search {
        for dir in SYSTEM_FOLDERS {
            self = self.folder(dir, Origin::System);
        }
        self
    }

    /// Whether a copy the process has already loaded is taken first.
    pub fn already_loaded(mut self, yes: bool) -> Search {
        self.already_loaded = yes;
        self
    }

    /// Whether the dynamic loader's own search for the bare file name is tried last.
    pub fn dynamic_loader(mut self, yes: bool) -> Search {
        self.dynamic_loader = yes;
        self
    }

    /// The folders searched, in order, with why.
    pub fn folders(&self) -> &[(PathBuf, Origin)] {
        &self.folders
    }

    /// The places searched, grouped by origin, for messages.
    fn describe(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        if self.already_loaded {
            parts.push(Origin::AlreadyLoaded.to_string());
        }
        if self.libtorch_unknown {
            parts.push("no folders beside libtorch (no libtorch_cpu.so is loaded and LIBTORCH is unset)".into());
        }
        let mut i = 0;
        while i < self.folders.len() {
            let origin = self.folders[i].1;
            let mut group = Vec::new();
            while i < self.folders.len() && self.folders[i].1 == origin {
                group.push(self.folders[i].0.display().to_string());
                i += 1;
            }
            parts.push(format!("{origin}: {}", group.join(", ")));
        }
        if self.dynamic_loader {
            parts.push(Origin::DynamicLoader.to_string());
        }
        if parts.is_empty() {
            "nowhere (the search was empty)".into()
        } else {
            parts.join("; ")
        }
    }
}

/// An opened library and where it came from. The handle stays open as long as this value lives.
pub struct Loaded {
    pub(crate) library: libloading::Library,
    /// The file the handle belongs to.
    pub path: PathBuf,
    /// How it was found.
    pub origin: Origin,
}

impl fmt::Debug for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loaded").field("path", &self.path).field("origin", &self.origin).finish()
    }
}

impl Loaded {
    /// A function pointer of type `F` for `symbol`, or the error naming the file and what is needed.
    ///
    /// # Safety
    /// `F` must be the function's true C signature.
    pub(crate) unsafe fn function<F: Copy>(&self, symbol: &'static str, hint: &'static str) -> Result<F, CudaError> {
        let name = format!("{symbol}\0");
        // SAFETY: the caller guarantees `F` is the symbol's true signature (this function's contract); the name is
        // NUL-terminated.
        match unsafe { self.library.get::<F>(name.as_bytes()) } {
            Ok(f) => Ok(*f),
            Err(_) => Err(CudaError::MissingSymbol { path: self.path.clone(), symbol, hint }),
        }
    }
}

/// How every NVIDIA library is opened. NODELETE: these libraries start threads of their own (ncclGetUniqueId
/// leaves NCCL's bootstrap root listening, the driver runs helper threads) that would crash into unmapped code if
/// the last handle's dlclose unloaded them, so once loaded they stay for the life of the process.
pub(crate) const LOAD_FLAGS: libc::c_int = libc::RTLD_NOW | libc::RTLD_LOCAL | libc::RTLD_NODELETE;

/// Opens `library` from the first place of `search` that has a file that loads.
pub fn open(library: NvidiaLibrary, search: &Search) -> Result<Loaded, CudaError> {
    let name = library.file_name();
    if search.already_loaded {
        if let Ok(handle) = dlopen(OsStr::new(name), LOAD_FLAGS | libc::RTLD_NOLOAD) {
            let path = file_of(&handle, library).unwrap_or_else(|| PathBuf::from(name));
            return Ok(Loaded { library: handle, path, origin: Origin::AlreadyLoaded });
        }
    }
    let mut failures = Vec::new();
    for (folder, origin) in &search.folders {
        let candidate = folder.join(name);
        if !candidate.is_file() {
            continue;
        }
        match dlopen(candidate.as_os_str(), LOAD_FLAGS) {
            Ok(handle) => {
                let path = file_of(&handle, library).unwrap_or(candidate);
                return Ok(Loaded { library: handle, path, origin: *origin });
            }
            Err(e) => failures.push(format!(
                "found {} but it did not load: {}",
                candidate.display(),
                one_line(&e.to_string())
            )),
        }
    }
    if search.dynamic_loader {
        if let Ok(handle) = dlopen(OsStr::new(name), LOAD_FLAGS) {
            let path = file_of(&handle, library).unwrap_or_else(|| PathBuf::from(name));
            return Ok(Loaded { library: handle, path, origin: Origin::DynamicLoader });
        }
    }
    let searched = search.describe();
    let failures: String = failures.iter().map(|f| format!("; {f}")).collect();
    if library == NvidiaLibrary::Driver {
        return Err(CudaError::NoDriver { searched: format!("{searched}{failures}") });
    }
    Err(CudaError::LibraryNotFound { library: name, searched, failures, hint: library.hint() })
}

fn dlopen(name: &OsStr, flags: libc::c_int) -> Result<libloading::Library, libloading::Error> {
    // SAFETY: NVIDIA's libraries run no initialisers that depend on the caller; loading one is what it is for.
    unsafe { libloading::os::unix::Library::open(Some(name), flags) }.map(Into::into)
}

/// The file a handle was opened from, found through the address of the library's probe symbol.
fn file_of(handle: &libloading::Library, library: NvidiaLibrary) -> Option<PathBuf> {
    // SAFETY: only the symbol's address is used, never called.
    let symbol = unsafe { handle.get::<*const c_void>(library.probe_symbol().to_bytes_with_nul()) }.ok()?;
    let address: *const c_void = *symbol;
    let mut info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    // SAFETY: dladdr only reads the loader's tables; `info` outlives the call.
    if unsafe { libc::dladdr(address, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dladdr returned a NUL-terminated name owned by the loader, valid while the library stays loaded.
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    use std::os::unix::ffi::OsStrExt;
    Some(PathBuf::from(OsStr::from_bytes(name.to_bytes())))
}

/// The libtorch folder (the one holding `lib/libtorch_cpu.so`) mapped into this process, if any.
pub fn loaded_libtorch() -> Option<PathBuf> {
    libtorch_from_maps(&std::fs::read_to_string("/proc/self/maps").ok()?)
}

/// The libtorch folder named by a `/proc/<pid>/maps` text.
pub fn libtorch_from_maps(maps: &str) -> Option<PathBuf> {
    maps.lines()
        // The path is the sixth field and may itself hold spaces.
        .filter_map(|line| line.splitn(6, ' ').nth(5).map(str::trim_start))
        .find(|path| path.ends_with("/libtorch_cpu.so"))
        .and_then(|path| Path::new(path).parent()?.parent().map(Path::to_path_buf))
}

pub(crate) fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pip_folders_beside_libtorch_come_in_xtask_then_pip_layout() {
        let search = Search::new().beside_libtorch(Path::new("/venv/site-packages/torch"));
        let folders: Vec<String> = search
            .folders()
            .iter()
            .map(|(p, o)| {
                assert_eq!(*o, Origin::BesideLibtorch);
                p.display().to_string()
            })
            .collect();
        assert_eq!(
            folders,
            [
                "/venv/site-packages/torch/lib",
                "/venv/site-packages/torch/nvidia/nccl/lib",
                "/venv/site-packages/torch/nvidia/cu13/lib",
                "/venv/site-packages/nvidia/nccl/lib",
                "/venv/site-packages/nvidia/cu13/lib",
            ]
        );
    }

    #[test]
    fn ld_library_path_keeps_its_order_skips_empty_entries_and_duplicates() {
        let search = Search::new().ld_library_path(OsStr::new("/a::/b:/a"));
        let folders: Vec<&Path> = search.folders().iter().map(|(p, _)| p.as_path()).collect();
        assert_eq!(folders, [Path::new("/a"), Path::new("/b")]);
    }

    #[test]
    fn a_process_searches_loaded_copies_then_libtorch_ld_library_path_system_and_the_loader_last() {
        let search = Search::for_process(NvidiaLibrary::Nccl);
        assert!(search.already_loaded && search.dynamic_loader);
        let rank = |o: &Origin| match o {
            Origin::BesideLibtorch => 0,
            Origin::LdLibraryPath => 1,
            Origin::System => 2,
            other => panic!("unexpected origin {other}"),
        };
        let ranks: Vec<u8> = search.folders().iter().map(|(_, o)| rank(o)).collect();
        assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "{:?}", search.folders());
        assert!(ranks.contains(&2));
    }

    #[test]
    fn the_driver_is_never_looked_for_beside_libtorch() {
        let search = Search::for_process(NvidiaLibrary::Driver);
        assert!(search.folders().iter().all(|(_, o)| *o != Origin::BesideLibtorch));
    }

    #[test]
    fn libtorch_is_found_from_the_mapped_libtorch_cpu() {
        let maps = "\
7f00-7f01 r--p 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6
7f02-7f03 r-xp 00000000 08:01 2 /opt/my torch/lib/libtorch_cpu.so
7f04-7f05 rw-p 00000000 00:00 0 
";
        assert_eq!(libtorch_from_maps(maps), Some(PathBuf::from("/opt/my torch")));
        assert_eq!(libtorch_from_maps("7f00-7f01 r--p 0 08:01 1 /lib/libc.so.6\n"), None);
    }

    #[test]
    fn nothing_found_lists_every_place_searched_and_what_to_install() {
        let dir = tempfile::tempdir().unwrap();
        let search =
            Search::new().beside_libtorch(&dir.path().join("torch")).ld_library_path(OsStr::new("/nonexistent/ld"));
        let error = open(NvidiaLibrary::Nccl, &search).unwrap_err().to_string();
        assert!(error.starts_with("libnccl.so.2 not found; searched beside libtorch: "), "{error}");
        assert!(error.contains(&format!("{}/nvidia/nccl/lib", dir.path().display())), "{error}");
        assert!(error.contains("LD_LIBRARY_PATH: /nonexistent/ld"), "{error}");
        assert!(error.contains("pip install nvidia-nccl-cu13"), "{error}");
        assert!(!error.contains('\n'));
    }

    #[test]
    fn a_file_that_is_not_a_library_is_reported_with_the_loader_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("libnvrtc.so.13"), b"<html>proxy error</html>").unwrap();
        let search = Search::new().folder(dir.path(), Origin::Explicit);
        let error = open(NvidiaLibrary::Nvrtc, &search).unwrap_err().to_string();
        assert!(
            error.contains(&format!("found {}/libnvrtc.so.13 but it did not load: ", dir.path().display())),
            "{error}"
        );
        assert!(error.contains("named by the caller: "), "{error}");
    }

    #[test]
    fn an_empty_search_says_so() {
        let error = open(NvidiaLibrary::Nccl, &Search::new()).unwrap_err().to_string();
        assert!(error.contains("searched nowhere (the search was empty)"), "{error}");
    }
}
