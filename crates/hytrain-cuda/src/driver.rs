//! The CUDA driver (`libcuda.so.1`) opened at run time: whether this machine can run CUDA at all, and which GPUs
//! it sees. It comes with the NVIDIA kernel driver, never with pip, so it is looked for in `LD_LIBRARY_PATH`, the
//! system folders and the loader's cache, never beside libtorch.

use std::ffi::{c_char, c_int, c_uint, CStr};
use std::fmt;
use std::path::Path;

use crate::library::{self, Loaded, NvidiaLibrary, Origin, Search};
use crate::nvrtc::ComputeCapability;
use crate::CudaError;

type Init = unsafe extern "C" fn(c_uint) -> c_int;
type GetInt = unsafe extern "C" fn(*mut c_int) -> c_int;
type ErrorText = unsafe extern "C" fn(c_int, *mut *const c_char) -> c_int;
type DeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
type DeviceAttribute = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;
type DeviceName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;

const NEED: &str = "the NVIDIA driver is too old or damaged; install a driver for CUDA 13 (580 or newer)";
const ATTRIBUTE_CC_MAJOR: c_int = 75;
const ATTRIBUTE_CC_MINOR: c_int = 76;

/// One GPU as the driver sees it (after CUDA_VISIBLE_DEVICES).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The ordinal, as in `cuda:N`.
    pub ordinal: u32,
    /// The product name (`NVIDIA H200`).
    pub name: String,
    /// Its compute capability, which kernels are compiled for.
    pub capability: ComputeCapability,
}

/// An initialised CUDA driver that sees at least one GPU.
pub struct CudaDriver {
    loaded: Loaded,
    version: i32,
    device_count: u32,
    error_name: ErrorText,
    error_string: ErrorText,
    device_get: DeviceGet,
    attribute: DeviceAttribute,
    name: DeviceName,
}

impl fmt::Debug for CudaDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaDriver")
            .field("path", &self.loaded.path)
            .field("version", &self.version)
            .field("device_count", &self.device_count)
            .finish()
    }
}

impl CudaDriver {
    /// What `--device cuda` does first: opens the driver the way a hytrain process looks for it and initialises
    /// it. Without a driver the error is [`CudaError::NoDriver`]; with one that sees no GPU, [`CudaError::NoDevice`].
    pub fn load() -> Result<CudaDriver, CudaError> {
        CudaDriver::load_from(&Search::for_process(NvidiaLibrary::Driver))
    }

    /// Like [`CudaDriver::load`], looking only where `search` says.
    pub fn load_from(search: &Search) -> Result<CudaDriver, CudaError> {
        let loaded = library::open(NvidiaLibrary::Driver, search)?;
        // SAFETY: the signatures are the driver API's, from cuda.h.
        let driver = unsafe {
            CudaDriver {
                version: 0,
                device_count: 0,
                error_name: loaded.function("cuGetErrorName", NEED)?,
                error_string: loaded.function("cuGetErrorString", NEED)?,
                device_get: loaded.function("cuDeviceGet", NEED)?,
                attribute: loaded.function("cuDeviceGetAttribute", NEED)?,
                name: loaded.function("cuDeviceGetName", NEED)?,
                loaded,
            }
        };
        // SAFETY: as above.
        let (init, driver_version, device_count) = unsafe {
            (
                driver.loaded.function::<Init>("cuInit", NEED)?,
                driver.loaded.function::<GetInt>("cuDriverGetVersion", NEED)?,
                driver.loaded.function::<GetInt>("cuDeviceGetCount", NEED)?,
            )
        };
        let mut driver = driver;
        // SAFETY: cuInit takes flags 0; the others write one int.
        unsafe {
            driver.no_device("cuInit", init(0))?;
            let mut version = 0;
            driver.no_device("cuDriverGetVersion", driver_version(&mut version))?;
            let mut count = 0;
            driver.no_device("cuDeviceGetCount", device_count(&mut count))?;
            driver.version = version;
            driver.device_count = count.max(0) as u32;
        }
        if driver.device_count == 0 {
            return Err(CudaError::NoDevice {
                path: driver.loaded.path.clone(),
                call: "cuDeviceGetCount",
                code_name: "0 devices".into(),
                message: "the driver lists no GPU".into(),
            });
        }
        tracing::info!(
            "CUDA driver {} ({}.{}) from {}: {} GPU(s)",
            driver.loaded.path.display(),
            driver.version / 1000,
            driver.version % 1000 / 10,
            driver.loaded.origin,
            driver.device_count
        );
        Ok(driver)
    }

    /// The libcuda file loaded.
    pub fn path(&self) -> &Path {
        &self.loaded.path
    }

    /// How it was found.
    pub fn origin(&self) -> Origin {
        self.loaded.origin
    }

    /// The CUDA version the driver supports, as `cuDriverGetVersion` encodes it (13000 for 13.0).
    pub fn version(&self) -> i32 {
        self.version
    }

    /// How many GPUs are visible.
    pub fn device_count(&self) -> u32 {
        self.device_count
    }

    pub(crate) fn loaded(&self) -> &Loaded {
        &self.loaded
    }

    /// The driver's handle of GPU `ordinal`.
    pub(crate) fn device_handle(&self, ordinal: u32) -> Result<c_int, CudaError> {
        let mut device = 0;
        // SAFETY: writes one device handle.
        self.check("cuDeviceGet", unsafe { (self.device_get)(&mut device, ordinal as c_int) })?;
        Ok(device)
    }

    /// Name and compute capability of GPU `ordinal`.
    pub fn device(&self, ordinal: u32) -> Result<Device, CudaError> {
        let device = self.device_handle(ordinal)?;
        let mut major = 0;
        let mut minor = 0;
        let mut name = [0 as c_char; 256];
        // SAFETY: each call writes into the buffer given, `name` with its length.
        unsafe {
            self.check("cuDeviceGetAttribute", (self.attribute)(&mut major, ATTRIBUTE_CC_MAJOR, device))?;
            self.check("cuDeviceGetAttribute", (self.attribute)(&mut minor, ATTRIBUTE_CC_MINOR, device))?;
            self.check("cuDeviceGetName", (self.name)(name.as_mut_ptr(), name.len() as c_int, device))?;
        }
        // SAFETY: cuDeviceGetName NUL-terminates within the length given.
        let name = unsafe { CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned();
        Ok(Device {
            ordinal,
            name,
            capability: ComputeCapability { major: major.max(0) as u32, minor: minor.max(0) as u32 },
        })
    }

    fn text(&self, get: ErrorText, code: c_int) -> String {
        let mut text: *const c_char = std::ptr::null();
        // SAFETY: the driver points `text` at a static string or leaves it null.
        if unsafe { get(code, &mut text) } != 0 || text.is_null() {
            return format!("CUresult {code}");
        }
        // SAFETY: checked non-null above; the driver's error strings are static and NUL-terminated.
        library::one_line(&unsafe { CStr::from_ptr(text) }.to_string_lossy())
    }

    fn no_device(&self, call: &'static str, code: c_int) -> Result<(), CudaError> {
        if code == 0 {
            return Ok(());
        }
        Err(CudaError::NoDevice {
            path: self.loaded.path.clone(),
            call,
            code_name: self.text(self.error_name, code),
            message: self.text(self.error_string, code),
        })
    }

    pub(crate) fn check(&self, call: &'static str, code: c_int) -> Result<(), CudaError> {
        if code == 0 {
            return Ok(());
        }
        Err(CudaError::Driver {
            call,
            code_name: self.text(self.error_name, code),
            message: self.text(self.error_string, code),
        })
    }
}
