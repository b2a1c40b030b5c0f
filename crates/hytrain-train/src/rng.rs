//! libtorch's default random generators, saved in checkpoints and restored on resume so that dropout (in built-in,
//! TorchScript and exported models alike) draws after a resume what an uninterrupted run would have drawn.
//!
//! The state goes into [`RngState::state`](crate::RngState) as `{"torch_cpu": HEX, "torch_cuda": HEX}` (the CUDA
//! entry only when the model is on a GPU, for its device). Every rank seeds libtorch alike and draws alike, so rank
//! 0's state is every rank's.

use std::ffi::{c_char, c_int, c_void};

use tch::{Device, Tensor};

use crate::shim::{handle, shim_message};

extern "C" {
    fn hyt_rng_get_state(device: c_int, index: c_int, out: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn hyt_rng_set_state(device: c_int, index: c_int, state: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
}

/// The generators a model on `device` draws from: the CPU's always, and its CUDA device's.
fn generators(device: Device) -> Vec<(&'static str, c_int, c_int)> {
    let mut g = vec![("torch_cpu", 0, 0)];
    if let Device::Cuda(index) = device {
        g.push(("torch_cuda", 1, index as c_int));
    }
    g
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// The state of the generators a model on `device` draws from, as a checkpoint stores it.
pub(crate) fn state(device: Device) -> Result<serde_json::Value, String> {
    let mut out = serde_json::Map::new();
    for (name, kind, index) in generators(device) {
        let t = Tensor::new();
        // SAFETY: `t` is a live tch tensor the shim assigns the state to; it outlives the call.
        shim_message(|err, len| unsafe { hyt_rng_get_state(kind, index, handle(&t), err, len) })?;
        let bytes = Vec::<u8>::try_from(&t.flatten(0, -1)).map_err(|e| e.to_string())?;
        out.insert(name.into(), hex(&bytes).into());
    }
    Ok(out.into())
}

/// Restores what [`state`] returned. A checkpoint without a generator entry (written before hytrain kept them, or
/// on a CPU when the model is now on a GPU) leaves that generator as seeded; one that does not load is an error.
pub(crate) fn restore(device: Device, saved: &serde_json::Value) -> Result<(), String> {
    for (name, kind, index) in generators(device) {
        let Some(text) = saved.get(name) else {
            continue;
        };
        let bytes = text
            .as_str()
            .and_then(unhex)
            .ok_or_else(|| format!("{name} is not a hexadecimal string of whole bytes"))?;
        let t = Tensor::from_slice(&bytes);
        // SAFETY: `t` is a live tch tensor for the call's duration; the shim copies its contents.
        shim_message(|err, len| unsafe { hyt_rng_set_state(kind, index, handle(&t), err, len) })
            .map_err(|e| format!("{name} ({} bytes) does not load: {e}", bytes.len()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_state_draws_the_same_numbers_again() {
        let saved = state(Device::Cpu).unwrap();
        let a = Tensor::rand([16], (tch::Kind::Float, Device::Cpu));
        restore(Device::Cpu, &saved).unwrap();
        let b = Tensor::rand([16], (tch::Kind::Float, Device::Cpu));
        assert!(a.equal(&b));
    }

    #[test]
    fn a_state_of_the_wrong_size_or_not_hex_is_refused() {
        let e = restore(Device::Cpu, &serde_json::json!({ "torch_cpu": "00ff" })).unwrap_err();
        assert!(e.starts_with("torch_cpu (2 bytes) does not load: "), "{e}");
        let e = restore(Device::Cpu, &serde_json::json!({ "torch_cpu": "xyz" })).unwrap_err();
        assert_eq!(e, "torch_cpu is not a hexadecimal string of whole bytes");
    }
}
