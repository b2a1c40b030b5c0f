//! Calling the C++ shim (`csrc/`): its functions take tch tensors as `torch::Tensor*` and report a failure as a
//! non-zero return with a one-line message in a caller-provided buffer (`csrc/shim_error.h`).

use std::ffi::{c_char, c_int, c_void, CStr};

use tch::{TchError, Tensor};

/// tch's `C_tensor` handle is a `torch::Tensor*`, what the shim takes.
pub(crate) fn handle(t: &Tensor) -> *mut c_void {
    t.as_ptr() as *mut c_void
}

/// Runs a shim call that reports failure as a non-zero return and a message in its error buffer.
pub(crate) fn shim(call: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), TchError> {
    shim_message(call).map_err(TchError::Torch)
}

/// [`shim`] with the shim's message as it is, for callers that word the error themselves.
pub(crate) fn shim_message(call: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), String> {
    let mut err = [0 as c_char; 512];
    if call(err.as_mut_ptr(), err.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the shim NUL-terminates what it writes into `err`, and it starts zeroed.
    Err(unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned())
}

extern "C" {
    fn hyt_set_grad(param: *mut c_void, grad: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn hyt_params_reached(
        loss: *mut c_void,
        params: *const *mut c_void,
        n: usize,
        reached: *mut u8,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Sets `reached[i]` to 1 for each parameter (`params`, tch handles) whose gradient accumulator `loss`'s autograd
/// graph reaches (`csrc/grad_hook.cpp`); the others keep their value.
pub(crate) fn params_reached(loss: &Tensor, params: &[*mut c_void], reached: &mut [u8]) -> Result<(), TchError> {
    assert_eq!(params.len(), reached.len(), "one flag per parameter");
    // SAFETY: `loss` and every handle are live tensors for the call; `reached` holds `params.len()` bytes.
    shim(|err, len| unsafe {
        hyt_params_reached(handle(loss), params.as_ptr(), params.len(), reached.as_mut_ptr(), err, len)
    })
}

/// `param.grad = grad`, sharing `grad`'s storage (`csrc/aoti.cpp`): a compiled step's gradients become the
/// parameters' without a copy.
pub(crate) fn set_grad(param: &Tensor, grad: &Tensor) -> Result<(), TchError> {
    // SAFETY: both handles are live tch tensors for the call's duration; the shim copies the `at::Tensor` handle.
    shim(|err, len| unsafe { hyt_set_grad(handle(param), handle(grad), err, len) })
}
