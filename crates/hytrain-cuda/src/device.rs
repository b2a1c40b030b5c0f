//! Running the kernels on a GPU through the driver API: the primary context, device memory, PTX modules and
//! launches. Written against cuda.h; it has not yet run on a GPU (this project's machines have none), which is what
//! `cargo xtask gpu-check` is for.

use std::ffi::{c_int, c_uint, c_void, CString};
use std::marker::PhantomData;

use crate::driver::CudaDriver;
use crate::nvrtc::Ptx;
use crate::CudaError;

type Context = *mut c_void;
type Module = *mut c_void;
type Function = *mut c_void;
type DevicePtr = u64;

type PrimaryCtxRetain = unsafe extern "C" fn(*mut Context, c_int) -> c_int;
type PrimaryCtxRelease = unsafe extern "C" fn(c_int) -> c_int;
type CtxSetCurrent = unsafe extern "C" fn(Context) -> c_int;
type CtxSynchronize = unsafe extern "C" fn() -> c_int;
type MemAlloc = unsafe extern "C" fn(*mut DevicePtr, usize) -> c_int;
type MemFree = unsafe extern "C" fn(DevicePtr) -> c_int;
type MemcpyHtoD = unsafe extern "C" fn(DevicePtr, *const c_void, usize) -> c_int;
type MemcpyDtoH = unsafe extern "C" fn(*mut c_void, DevicePtr, usize) -> c_int;
type ModuleLoadData = unsafe extern "C" fn(*mut Module, *const c_void) -> c_int;
type ModuleUnload = unsafe extern "C" fn(Module) -> c_int;
type ModuleGetFunction = unsafe extern "C" fn(*mut Function, Module, *const i8) -> c_int;
type LaunchKernel = unsafe extern "C" fn(
    Function,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    *mut c_void,
    *mut *mut c_void,
    *mut *mut c_void,
) -> c_int;

const NEED: &str = "the NVIDIA driver is too old; install a driver for CUDA 13 (580 or newer)";

struct Api {
    retain: PrimaryCtxRetain,
    release: PrimaryCtxRelease,
    set_current: CtxSetCurrent,
    synchronize: CtxSynchronize,
    alloc: MemAlloc,
    free: MemFree,
    htod: MemcpyHtoD,
    dtoh: MemcpyDtoH,
    load: ModuleLoadData,
    unload: ModuleUnload,
    function: ModuleGetFunction,
    launch: LaunchKernel,
}

/// GPU `ordinal`'s primary context (the one the CUDA runtime, and so libtorch and NCCL, use), made current on this
/// thread. Released on drop.
pub struct Gpu<'d> {
    driver: &'d CudaDriver,
    api: Api,
    ordinal: c_int,
    context: Context,
}

impl CudaDriver {
    /// Retains GPU `ordinal`'s primary context and makes it current on this thread.
    pub fn gpu(&self, ordinal: u32) -> Result<Gpu<'_>, CudaError> {
        let loaded = self.loaded();
        // SAFETY: the signatures are the driver API's, from cuda.h (the _v2 names are what cuda.h's macros call).
        let api = unsafe {
            Api {
                retain: loaded.function("cuDevicePrimaryCtxRetain", NEED)?,
                release: loaded.function("cuDevicePrimaryCtxRelease_v2", NEED)?,
                set_current: loaded.function("cuCtxSetCurrent", NEED)?,
                synchronize: loaded.function("cuCtxSynchronize", NEED)?,
                alloc: loaded.function("cuMemAlloc_v2", NEED)?,
                free: loaded.function("cuMemFree_v2", NEED)?,
                htod: loaded.function("cuMemcpyHtoD_v2", NEED)?,
                dtoh: loaded.function("cuMemcpyDtoH_v2", NEED)?,
                load: loaded.function("cuModuleLoadData", NEED)?,
                unload: loaded.function("cuModuleUnload", NEED)?,
                function: loaded.function("cuModuleGetFunction", NEED)?,
                launch: loaded.function("cuLaunchKernel", NEED)?,
            }
        };
        let device = self.device_handle(ordinal)?;
        let mut context: Context = std::ptr::null_mut();
        // SAFETY: writes one context handle.
        self.check("cuDevicePrimaryCtxRetain", unsafe { (api.retain)(&mut context, device) })?;
        let gpu = Gpu { driver: self, api, ordinal: device, context };
        gpu.make_current()?;
        Ok(gpu)
    }
}

impl Drop for Gpu<'_> {
    fn drop(&mut self) {
        // SAFETY: retained once in CudaDriver::gpu.
        unsafe { (self.api.release)(self.ordinal) };
    }
}

impl<'d> Gpu<'d> {
    fn check(&self, call: &'static str, code: c_int) -> Result<(), CudaError> {
        self.driver.check(call, code)
    }

    /// Copies `values` into fresh device memory.
    pub fn upload<T: Copy>(&self, values: &[T]) -> Result<DeviceBuffer<'_, 'd, T>, CudaError> {
        let bytes = std::mem::size_of_val(values);
        let mut ptr: DevicePtr = 0;
        // SAFETY: allocates `bytes` (at least 1, since cuMemAlloc refuses 0) and copies exactly `bytes` from `values`.
        unsafe {
            self.check("cuMemAlloc", (self.api.alloc)(&mut ptr, bytes.max(1)))?;
            let buffer = DeviceBuffer { gpu: self, ptr, len: values.len(), _type: PhantomData };
            if bytes > 0 {
                self.check("cuMemcpyHtoD", (self.api.htod)(ptr, values.as_ptr().cast(), bytes))?;
            }
            Ok(buffer)
        }
    }

    /// Loads PTX (the driver JIT-compiles it for this GPU).
    pub fn load(&self, ptx: &Ptx) -> Result<LoadedModule<'_, 'd>, CudaError> {
        let text = CString::new(ptx.text.as_str()).map_err(|_| CudaError::Driver {
            call: "cuModuleLoadData",
            code_name: "NUL in PTX".into(),
            message: format!("the PTX of {} holds a NUL byte", ptx.program),
        })?;
        let mut module: Module = std::ptr::null_mut();
        // SAFETY: the image is NUL-terminated PTX text.
        self.check("cuModuleLoadData", unsafe { (self.api.load)(&mut module, text.as_ptr().cast()) })?;
        Ok(LoadedModule { gpu: self, module })
    }

    /// Makes this context current on the calling thread (CUDA's current context is per thread).
    pub fn make_current(&self) -> Result<(), CudaError> {
        // SAFETY: the context is retained while `self` lives.
        self.check("cuCtxSetCurrent", unsafe { (self.api.set_current)(self.context) })
    }

    /// Waits for all work on this context.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        // SAFETY: no arguments.
        self.check("cuCtxSynchronize", unsafe { (self.api.synchronize)() })
    }
}

/// A typed allocation in device memory, freed on drop.
pub struct DeviceBuffer<'g, 'd, T> {
    gpu: &'g Gpu<'d>,
    ptr: DevicePtr,
    len: usize,
    _type: PhantomData<T>,
}

impl<T: Copy + Default> DeviceBuffer<'_, '_, T> {
    /// The device address, as a kernel argument takes it.
    pub fn address(&self) -> u64 {
        self.ptr
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the buffer back to the host (after the work writing it has finished).
    pub fn download(&self) -> Result<Vec<T>, CudaError> {
        let mut out = vec![T::default(); self.len];
        let bytes = std::mem::size_of_val(out.as_slice());
        if bytes > 0 {
            // SAFETY: copies exactly the buffer's bytes into `out`, which has that size.
            self.gpu.check("cuMemcpyDtoH", unsafe { (self.gpu.api.dtoh)(out.as_mut_ptr().cast(), self.ptr, bytes) })?;
        }
        Ok(out)
    }
}

impl<T> Drop for DeviceBuffer<'_, '_, T> {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemAlloc and freed once.
        unsafe { (self.gpu.api.free)(self.ptr) };
    }
}

/// A loaded PTX module, unloaded on drop.
pub struct LoadedModule<'g, 'd> {
    gpu: &'g Gpu<'d>,
    module: Module,
}

/// One kernel argument, passed by value as `cuLaunchKernel` wants (a pointer to each value).
#[derive(Debug, Clone, Copy)]
pub enum KernelArg {
    /// A device address (`float*`, `const long long*`, ...).
    Pointer(u64),
    /// `int`.
    I32(i32),
    /// `long long`.
    I64(i64),
    /// `float`.
    F32(f32),
}

impl LoadedModule<'_, '_> {
    /// Launches kernel `name` with `grid` blocks of `block` threads on the default stream.
    pub fn launch(&self, name: &str, grid: u32, block: u32, args: &[KernelArg]) -> Result<(), CudaError> {
        let c_name = CString::new(name).map_err(|_| CudaError::Driver {
            call: "cuModuleGetFunction",
            code_name: "NUL in name".into(),
            message: format!("kernel name {name:?} holds a NUL byte"),
        })?;
        let mut function: Function = std::ptr::null_mut();
        // SAFETY: writes one function handle; the name is NUL-terminated.
        self.gpu.check("cuModuleGetFunction", unsafe {
            (self.gpu.api.function)(&mut function, self.module, c_name.as_ptr())
        })?;
        // Each argument's value must stay at a fixed address until cuLaunchKernel returns.
        let mut values: Vec<KernelArg> = args.to_vec();
        let mut pointers: Vec<*mut c_void> = values
            .iter_mut()
            .map(|arg| match arg {
                KernelArg::Pointer(v) => (v as *mut u64).cast(),
                KernelArg::I32(v) => (v as *mut i32).cast(),
                KernelArg::I64(v) => (v as *mut i64).cast(),
                KernelArg::F32(v) => (v as *mut f32).cast(),
            })
            .collect();
        // SAFETY: `pointers` holds one pointer per kernel parameter, in order, each to a value of its C type.
        self.gpu.check("cuLaunchKernel", unsafe {
            (self.gpu.api.launch)(
                function,
                grid,
                1,
                1,
                block,
                1,
                1,
                0,
                std::ptr::null_mut(),
                pointers.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }
}

impl Drop for LoadedModule<'_, '_> {
    fn drop(&mut self) {
        // SAFETY: loaded once by cuModuleLoadData.
        unsafe { (self.gpu.api.unload)(self.module) };
    }
}
