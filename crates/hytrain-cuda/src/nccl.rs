//! NCCL opened at run time: which file, which version, and the unique id that lets ranks form a communicator.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::path::Path;

use crate::library::{self, Loaded, NvidiaLibrary, Origin, Search};
use crate::CudaError;

/// The oldest NCCL hytrain accepts: non-blocking communicators with `ncclCommInitRankConfig`, abort and async
/// errors as the collective timeout needs them, and bf16.
pub const MIN_NCCL: NcclVersion = NcclVersion { major: 2, minor: 18, patch: 0 };

/// Functions the NCCL backend calls; a library lacking any is refused when it loads rather than mid-job.
pub const NCCL_FUNCTIONS: [&str; 15] = [
    "ncclGetVersion",
    "ncclGetUniqueId",
    "ncclGetErrorString",
    "ncclCommInitRank",
    "ncclCommInitRankConfig",
    "ncclCommAbort",
    "ncclCommDestroy",
    "ncclCommFinalize",
    "ncclCommGetAsyncError",
    "ncclAllReduce",
    "ncclBroadcast",
    "ncclAllGather",
    "ncclReduceScatter",
    "ncclGroupStart",
    "ncclGroupEnd",
];

const NEED: &str = "hytrain needs NCCL 2.18 or newer (pip install nvidia-nccl-cu13)";

/// An NCCL release, as `ncclGetVersion` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct NcclVersion {
    /// Major version (2).
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Patch level.
    pub patch: u32,
}

impl NcclVersion {
    /// Decodes `NCCL_VERSION_CODE`: `major*10000 + minor*100 + patch` since 2.9, `major*1000 + minor*100 + patch`
    /// before.
    pub fn from_code(code: u32) -> NcclVersion {
        if code >= 10000 {
            NcclVersion { major: code / 10000, minor: code % 10000 / 100, patch: code % 100 }
        } else {
            NcclVersion { major: code / 1000, minor: code % 1000 / 100, patch: code % 100 }
        }
    }
}

impl fmt::Display for NcclVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Bytes in an `ncclUniqueId` (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = 128;

/// The token rank 0 creates and every rank passes to `ncclCommInitRank`: it holds the address rank 0's bootstrap
/// listens on, so it travels through the rendezvous store.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UniqueId([u8; UNIQUE_ID_BYTES]);

impl UniqueId {
    /// The raw bytes, as stored.
    pub fn as_bytes(&self) -> &[u8; UNIQUE_ID_BYTES] {
        &self.0
    }

    /// Takes bytes read from the store under `key`; anything but 128 bytes is an error naming the key.
    pub fn from_bytes(bytes: &[u8], key: &str) -> Result<UniqueId, CudaError> {
        let array: [u8; UNIQUE_ID_BYTES] =
            bytes.try_into().map_err(|_| CudaError::BadUniqueId { key: key.into(), len: bytes.len() })?;
        Ok(UniqueId(array))
    }
}

impl fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head: String = self.0[..8].iter().map(|b| format!("{b:02x}")).collect();
        write!(f, "UniqueId({head}…)")
    }
}

type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
type GetUniqueId = unsafe extern "C" fn(*mut [u8; UNIQUE_ID_BYTES]) -> c_int;
type GetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;

#[repr(C)]
#[derive(Clone, Copy)]
struct RawUniqueId([u8; UNIQUE_ID_BYTES]);

type CommInitRank = unsafe extern "C" fn(*mut *mut c_void, c_int, RawUniqueId, c_int) -> c_int;
type CommDestroy = unsafe extern "C" fn(*mut c_void) -> c_int;
type AllReduce =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, *mut c_void, *mut c_void) -> c_int;

/// `ncclFloat32` and `ncclSum` from nccl.h.
const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;

/// An NCCL communicator of this rank, destroyed on drop, with a blocking f32 sum on the default stream: the
/// world-size-1 NCCL check of `hytrain-gpu-check` (packed by `cargo xtask gpu-check`) is its only user, and it
/// has not yet run on a GPU. Training does not use it: its NCCL backend is [`crate::NcclCollective`], which
/// creates its own communicator with its own stream, events and timeout. Needs a GPU, and the CUDA context of the
/// device it serves current on the thread that creates it.
pub struct Communicator<'n> {
    nccl: &'n Nccl,
    comm: *mut c_void,
    all_reduce: AllReduce,
    destroy: CommDestroy,
}

impl Nccl {
    /// Joins the communicator of `world_size` ranks named by `id` as `rank` (`ncclCommInitRank`); blocks until
    /// every rank has joined.
    pub fn communicator(&self, id: &UniqueId, world_size: usize, rank: usize) -> Result<Communicator<'_>, CudaError> {
        // SAFETY: the signatures are NCCL's, from nccl.h; their presence was checked at load.
        let (init, all_reduce, destroy) = unsafe {
            (
                self.loaded.function::<CommInitRank>("ncclCommInitRank", NEED)?,
                self.loaded.function::<AllReduce>("ncclAllReduce", NEED)?,
                self.loaded.function::<CommDestroy>("ncclCommDestroy", NEED)?,
            )
        };
        let mut comm: *mut c_void = std::ptr::null_mut();
        // SAFETY: writes one communicator handle; the id is passed by value as nccl.h declares.
        let result = unsafe { init(&mut comm, world_size as c_int, RawUniqueId(id.0), rank as c_int) };
        self.check("ncclCommInitRank", result)?;
        Ok(Communicator { nccl: self, comm, all_reduce, destroy })
    }

    fn check(&self, call: &'static str, code: c_int) -> Result<(), CudaError> {
        if code == 0 {
            return Ok(());
        }
        Err(CudaError::Nccl { call, code, message: self.error_string(code) })
    }
}

impl Communicator<'_> {
    /// Sums `count` floats at device address `send` over all ranks into `recv` (which may equal `send`), on the
    /// default stream. Returns when the work is queued.
    pub fn allreduce_sum_f32(&self, send: u64, recv: u64, count: usize) -> Result<(), CudaError> {
        // SAFETY: the addresses are device allocations of at least `count` floats, as the caller promises.
        let result = unsafe {
            (self.all_reduce)(
                send as *const c_void,
                recv as *mut c_void,
                count,
                NCCL_FLOAT32,
                NCCL_SUM,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        self.nccl.check("ncclAllReduce", result)
    }
}

impl Drop for Communicator<'_> {
    fn drop(&mut self) {
        // SAFETY: created by ncclCommInitRank and destroyed once.
        unsafe { (self.destroy)(self.comm) };
    }
}

/// An opened NCCL. Cheap to share by reference across threads; the library stays loaded while this lives.
pub struct Nccl {
    loaded: Loaded,
    version: NcclVersion,
    get_unique_id: GetUniqueId,
    get_error_string: GetErrorString,
}

impl fmt::Debug for Nccl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nccl")
            .field("path", &self.loaded.path)
            .field("origin", &self.loaded.origin)
            .field("version", &self.version)
            .finish()
    }
}

impl Nccl {
    /// Finds and opens NCCL the way a hytrain process does ([`Search::for_process`]) and logs which file and
    /// version it took.
    pub fn load() -> Result<Nccl, CudaError> {
        Nccl::load_from(&Search::for_process(NvidiaLibrary::Nccl))
    }

    /// Opens the first `libnccl.so.2` of `search` that loads, and checks that it is new enough and has every
    /// function the backend calls. Needs no GPU.
    pub fn load_from(search: &Search) -> Result<Nccl, CudaError> {
        let loaded = library::open(NvidiaLibrary::Nccl, search)?;
        // SAFETY: the signatures are NCCL's, from nccl.h.
        let (get_version, get_unique_id, get_error_string) = unsafe {
            (
                loaded.function::<GetVersion>("ncclGetVersion", NEED)?,
                loaded.function::<GetUniqueId>("ncclGetUniqueId", NEED)?,
                loaded.function::<GetErrorString>("ncclGetErrorString", NEED)?,
            )
        };
        let mut code: c_int = 0;
        // SAFETY: ncclGetVersion writes one int.
        let result = unsafe { get_version(&mut code) };
        if result != 0 {
            return Err(CudaError::Nccl {
                call: "ncclGetVersion",
                code: result,
                message: error_string(get_error_string, result),
            });
        }
        let version = NcclVersion::from_code(code.max(0) as u32);
        if version < MIN_NCCL {
            return Err(CudaError::NcclTooOld {
                found: version.to_string(),
                path: loaded.path.clone(),
                needed: MIN_NCCL.to_string(),
            });
        }
        for symbol in NCCL_FUNCTIONS {
            // SAFETY: only presence is checked; nothing is called through this type.
            unsafe { loaded.function::<*const ()>(symbol, NEED)? };
        }
        tracing::info!(
            path = %loaded.path.display(),
            origin = %loaded.origin,
            "NCCL {version} loaded from {} ({})",
            loaded.path.display(),
            loaded.origin
        );
        Ok(Nccl { loaded, version, get_unique_id, get_error_string })
    }

    pub(crate) fn loaded(&self) -> &Loaded {
        &self.loaded
    }

    /// The file NCCL was loaded from.
    pub fn path(&self) -> &Path {
        &self.loaded.path
    }

    /// How the file was found.
    pub fn origin(&self) -> Origin {
        self.loaded.origin
    }

    /// The version the library reports.
    pub fn version(&self) -> NcclVersion {
        self.version
    }

    /// A fresh unique id (`ncclGetUniqueId`). Only rank 0 calls this; it needs no GPU, but it opens the bootstrap
    /// socket the other ranks will connect to, on the interface NCCL_SOCKET_IFNAME names.
    pub fn unique_id(&self) -> Result<UniqueId, CudaError> {
        let mut id = [0u8; UNIQUE_ID_BYTES];
        // SAFETY: ncclGetUniqueId writes exactly NCCL_UNIQUE_ID_BYTES.
        let result = unsafe { (self.get_unique_id)(&mut id) };
        if result != 0 {
            return Err(CudaError::Nccl {
                call: "ncclGetUniqueId",
                code: result,
                message: error_string(self.get_error_string, result),
            });
        }
        Ok(UniqueId(id))
    }

    /// NCCL's text for an `ncclResult_t`.
    pub fn error_string(&self, code: i32) -> String {
        error_string(self.get_error_string, code)
    }
}

fn error_string(get: GetErrorString, code: c_int) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any value.
    let text = unsafe { get(code) };
    if text.is_null() {
        return format!("unknown NCCL error {code}");
    }
    // SAFETY: checked non-null above; NCCL's error strings are static and NUL-terminated.
    library::one_line(&unsafe { CStr::from_ptr(text) }.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_codes_decode_in_both_schemes() {
        assert_eq!(NcclVersion::from_code(22809).to_string(), "2.28.9");
        assert_eq!(NcclVersion::from_code(21803).to_string(), "2.18.3");
        assert_eq!(NcclVersion::from_code(2804).to_string(), "2.8.4");
        assert!(NcclVersion::from_code(21799) < MIN_NCCL);
        assert!(NcclVersion::from_code(21800) >= MIN_NCCL);
    }

    #[test]
    fn a_unique_id_of_the_wrong_length_names_the_key() {
        let error = UniqueId::from_bytes(&[0; 64], "nccl/0/id").unwrap_err().to_string();
        assert!(error.starts_with("the NCCL unique id under key 'nccl/0/id' is 64 bytes, not 128"), "{error}");
        let id = UniqueId::from_bytes(&[7; 128], "k").unwrap();
        assert_eq!(id.as_bytes(), &[7; 128]);
    }
}
