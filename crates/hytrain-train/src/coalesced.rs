//! Operations over many tensors at once, issued without reading anything back to the host: rank 0's buffers
//! broadcast through a device collective, one call per dtype, and gradient clipping by the global norm with
//! libtorch's multi-tensor kernels (`csrc/step_sync.cpp`).

use std::ffi::{c_char, c_int, c_void};

use hytrain_cuda::{CudaError, DType, DeviceCollective, DeviceSlice};
use tch::{Kind, TchError, Tensor};

use crate::shim::{handle, shim};

extern "C" {
    fn hyt_clip_grad_norm(
        grads: *const *mut c_void,
        n: usize,
        max_norm: f64,
        total_out: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Multiplies `grads` (undefined ones skipped) by `min(1, max_norm / (norm + 1e-6))`, where `norm` is their global
/// L2 norm, as `torch.nn.utils.clip_grad_norm_(foreach=True)`; returns that norm, 0-dim on the first gradient's
/// device (0 without gradients).
pub(crate) fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Result<Tensor, TchError> {
    let handles: Vec<*mut c_void> = grads.iter().map(handle).collect();
    let total = Tensor::f_zeros([], (Kind::Float, tch::Device::Cpu))?;
    // SAFETY: every handle is a live tch tensor for the call; the shim replaces the tensor behind `total`'s
    // handle, which `total` owns as before.
    shim(|err, len| unsafe {
        hyt_clip_grad_norm(handles.as_ptr(), handles.len(), max_norm, handle(&total), err, len)
    })?;
    Ok(total)
}

/// How a buffer dtype travels through a collective that knows only floating-point types: a broadcast copies bits,
/// so 64-bit and 32-bit integers go as float64 and float32 of the same width.
fn carrier(kind: Kind) -> Option<(Kind, DType)> {
    Some(match kind {
        Kind::Float => (Kind::Float, DType::F32),
        Kind::Double => (Kind::Double, DType::F64),
        Kind::Half => (Kind::Half, DType::F16),
        Kind::BFloat16 => (Kind::BFloat16, DType::Bf16),
        Kind::Int64 => (Kind::Double, DType::F64),
        Kind::Int => (Kind::Float, DType::F32),
        _ => return None,
    })
}

/// Copies rank 0's `tensors` into every rank's through `comm`: per dtype, in order of first appearance, the
/// tensors are concatenated into one flat tensor on their device, broadcast with one call and copied back on the
/// other ranks. Nothing waits on the host beyond what the collective itself does.
pub(crate) fn broadcast(comm: &mut dyn DeviceCollective, tensors: &[(String, Tensor)]) -> Result<(), CudaError> {
    let torch = |name: &str, e: TchError| CudaError::Shape(format!("tensor {name}: {e}"));
    let mut kinds: Vec<Kind> = Vec::new();
    for (_, t) in tensors {
        if !kinds.contains(&t.kind()) {
            kinds.push(t.kind());
        }
    }
    for kind in kinds {
        let group: Vec<&(String, Tensor)> = tensors.iter().filter(|(_, t)| t.kind() == kind).collect();
        let Some((as_kind, dtype)) = carrier(kind) else {
            return Err(CudaError::Shape(format!(
                "buffer {} has dtype {kind:?}, which a device broadcast cannot carry (floating point, int32 and \
                 int64 only)",
                group[0].0
            )));
        };
        let flats: Vec<Tensor> = group
            .iter()
            .map(|(n, t)| t.f_detach().and_then(|t| t.f_reshape([-1])).map_err(|e| torch(n, e)))
            .collect::<Result<_, _>>()?;
        let flat = Tensor::f_cat(&flats, 0).map_err(|e| torch(&group[0].0, e))?;
        let numel = flat.numel();
        if numel == 0 {
            continue;
        }
        let carried = flat.f_view_dtype(as_kind).map_err(|e| torch(&group[0].0, e))?;
        // SAFETY: `carried` is a contiguous tensor of `numel` elements of `dtype`'s width on the collective's
        // device (or host memory when the collective says it takes that), alive until after the call returns.
        let slice = unsafe { DeviceSlice::from_raw(carried.data_ptr() as u64, dtype, numel) };
        comm.broadcast(slice, 0)?;
        if comm.rank() != 0 {
            let mut offset = 0;
            for (name, t) in group {
                let n = t.numel() as i64;
                let src = flat.f_narrow(0, offset, n).and_then(|s| s.f_view(t.size().as_slice()));
                let mut dst = t.shallow_clone();
                tch::no_grad(|| src.and_then(|s| dst.f_copy_(&s))).map_err(|e| torch(name, e))?;
                offset += n;
            }
        }
    }
    Ok(())
}
