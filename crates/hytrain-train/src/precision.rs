//! Mixed precision (`--precision`): autocast of the forward pass to bfloat16 or float16 with float32 master
//! weights, and for float16 the dynamic loss scaling of `torch.amp.GradScaler`.
//!
//! Parameters, gradients and optimizer state stay float32 whatever the precision: autocast casts weights and
//! activations to the lower precision only inside the ops it lists (matmuls, convolutions), and those casts are
//! differentiable, so backward delivers float32 gradients. Float16 has too few exponent bits for small gradients,
//! so the loss is multiplied by a scale before backward and the gradients divided by it after averaging; a step
//! whose gradients overflowed is skipped and the scale halved, and after `growth_interval` good steps in a row
//! the scale doubles.

use std::ffi::{c_char, c_int, c_void};
use std::marker::PhantomData;

use tch::{Device, Kind, Tensor};

use crate::shim::{handle, shim, shim_message};
use crate::{Result, TrainError};

/// The arithmetic of the forward pass (`--precision`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in float32.
    #[default]
    Fp32,
    /// Forward pass and loss under bfloat16 autocast; float32 master weights.
    Bf16,
    /// Forward pass and loss under float16 autocast with dynamic loss scaling; float32 master weights.
    Fp16,
}

impl Precision {
    /// The accepted spellings, for messages.
    pub const ALLOWED: &'static str = "fp32, bf16 or fp16";

    /// The dtype autocast runs eligible ops in, or `None` for fp32.
    pub fn autocast_kind(self) -> Option<Kind> {
        match self {
            Precision::Fp32 => None,
            Precision::Bf16 => Some(Kind::BFloat16),
            Precision::Fp16 => Some(Kind::Half),
        }
    }

    /// Autocast for this precision on `device` until the guard drops; `None` for fp32.
    pub fn autocast(self, device: Device) -> Result<Option<Autocast>> {
        self.autocast_kind().map(|kind| Autocast::enter(device, kind)).transpose()
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fp32" | "float32" => Ok(Precision::Fp32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            "fp16" | "float16" => Ok(Precision::Fp16),
            _ => Err(format!("must be {}, got '{s}'", Precision::ALLOWED)),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        })
    }
}

#[repr(C)]
#[derive(Default)]
struct AutocastState {
    enabled: c_int,
    dtype: c_int,
    cache_enabled: c_int,
}

extern "C" {
    fn hyt_autocast_enter(device: c_int, dtype: c_int, prev: *mut AutocastState, err: *mut c_char, len: usize)
        -> c_int;
    fn hyt_autocast_exit(device: c_int, prev: *const AutocastState);
    fn hyt_autocast_is_enabled(device: c_int) -> c_int;
    fn hyt_autocast_dtype(device: c_int) -> c_int;
    fn hyt_unscale_grads(
        grads: *const *mut c_void,
        n: usize,
        found_inf: *mut c_void,
        inv_scale: *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
}

/// c10::ScalarType codes of the dtypes autocast is used with here.
const SCALAR_HALF: c_int = 5;
const SCALAR_FLOAT: c_int = 6;
const SCALAR_BFLOAT16: c_int = 15;

fn device_code(device: Device) -> Result<c_int> {
    match device {
        Device::Cpu => Ok(0),
        Device::Cuda(_) => Ok(1),
        other => Err(TrainError::option("--precision", format!("autocast supports the CPU and CUDA, not {other:?}"))),
    }
}

/// Autocast on one device type for the calling thread, as `torch.autocast(device_type, dtype)` does, until
/// dropped; dropping restores the state found on entry (guards nest), also when the code inside fails or panics.
///
/// Autocast state belongs to a thread, so the guard cannot be sent to another one.
#[derive(Debug)]
pub struct Autocast {
    device: c_int,
    prev: [c_int; 3],
    _thread_bound: PhantomData<*const ()>,
}

impl Autocast {
    /// Turns autocast to `kind` (bfloat16 or float16) on for `device`'s type (the CPU or CUDA) on this thread.
    pub fn enter(device: Device, kind: Kind) -> Result<Autocast> {
        let dtype = match kind {
            Kind::BFloat16 => SCALAR_BFLOAT16,
            Kind::Half => SCALAR_HALF,
            other => return Err(TrainError::option("autocast", format!("runs in bfloat16 or float16, not {other:?}"))),
        };
        let code = device_code(device)?;
        let mut prev = AutocastState::default();
        // SAFETY: `prev` is writable and lives for the call; the shim touches only thread-local state.
        shim_message(|err, err_len| unsafe { hyt_autocast_enter(code, dtype, &mut prev, err, err_len) })
            .map_err(|why| TrainError::option("--precision", format!("libtorch refused autocast: {why}")))?;
        Ok(Autocast { device: code, prev: [prev.enabled, prev.dtype, prev.cache_enabled], _thread_bound: PhantomData })
    }

    /// The dtype autocast casts to on `device`'s type on this thread, or `None` when autocast is off there.
    pub fn current(device: Device) -> Option<Kind> {
        let code = device_code(device).ok()?;
        // SAFETY: reads thread-local flags.
        let (enabled, dtype) = unsafe { (hyt_autocast_is_enabled(code), hyt_autocast_dtype(code)) };
        if enabled == 0 {
            return None;
        }
        Some(match dtype {
            SCALAR_BFLOAT16 => Kind::BFloat16,
            SCALAR_HALF => Kind::Half,
            SCALAR_FLOAT => Kind::Float,
            _ => Kind::Double,
        })
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        let prev = AutocastState { enabled: self.prev[0], dtype: self.prev[1], cache_enabled: self.prev[2] };
        // SAFETY: `prev` is what `hyt_autocast_enter` recorded on this thread (the guard is not Send).
        unsafe { hyt_autocast_exit(self.device, &prev) };
    }
}

/// What a [`GradScaler`] carries from step to step, saved in checkpoints; the fields of
/// `torch.amp.GradScaler.state_dict()`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GradScalerState {
    /// The factor the loss is multiplied by before backward.
    pub scale: f32,
    /// The scale is multiplied by this after `growth_interval` steps in a row without inf or NaN gradients.
    pub growth_factor: f64,
    /// The scale is multiplied by this after a step with inf or NaN gradients.
    pub backoff_factor: f64,
    /// Good steps in a row before the scale grows.
    pub growth_interval: u64,
    /// Good steps in a row so far.
    pub growth_tracker: u64,
}

impl Default for GradScalerState {
    /// torch.amp.GradScaler's defaults: scale 2^16, growth 2, backoff 0.5, interval 2000.
    fn default() -> Self {
        GradScalerState {
            scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            growth_tracker: 0,
        }
    }
}

/// Dynamic loss scaling with `torch.amp.GradScaler`'s semantics: [`GradScaler::scale_loss`] before backward,
/// [`GradScaler::unscale`] on the averaged gradients, skip the optimizer step when it found inf or NaN, then
/// [`GradScaler::update`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GradScaler {
    state: GradScalerState,
}

impl GradScaler {
    /// A scaler with torch.amp.GradScaler's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// A scaler continuing from `state` (from a checkpoint).
    pub fn from_state(state: GradScalerState) -> Self {
        GradScaler { state }
    }

    /// The state to save.
    pub fn state(&self) -> &GradScalerState {
        &self.state
    }

    /// The current loss scale.
    pub fn scale(&self) -> f64 {
        f64::from(self.state.scale)
    }

    /// `loss` in float32 times the scale (a float16 loss times 2^16 would overflow).
    pub fn scale_loss(&self, loss: &Tensor) -> Result<Tensor> {
        loss.f_to_kind(Kind::Float)
            .and_then(|l| l.f_mul_scalar(f64::from(self.state.scale)))
            .map_err(|e| TrainError::torch("scaling the loss", e))
    }

    /// Divides `grads` (all on one device; undefined ones are passed over) by the scale in place, with
    /// GradScaler's own kernel, and tells whether any held an inf or NaN.
    pub fn unscale(&self, grads: &[Tensor]) -> Result<bool> {
        let grads: Vec<&Tensor> = grads.iter().filter(|g| g.defined()).collect();
        let Some(first) = grads.first() else {
            return Ok(false);
        };
        let torch = |e| TrainError::torch("unscaling gradients", e);
        let device = first.device();
        let found_inf = Tensor::f_zeros([1], (Kind::Float, device)).map_err(torch)?;
        // As GradScaler: the reciprocal in double, then rounded to float.
        let inv = (1.0 / f64::from(self.state.scale)) as f32;
        let inv_scale = Tensor::f_full([1], f64::from(inv), (Kind::Float, device)).map_err(torch)?;
        let ptrs: Vec<*mut c_void> = grads.iter().map(|g| handle(g)).collect();
        // SAFETY: every pointer is tch's `torch::Tensor*` of a tensor alive for the call, as are `found_inf` and
        // `inv_scale`.
        shim(|err, err_len| unsafe {
            hyt_unscale_grads(ptrs.as_ptr(), ptrs.len(), handle(&found_inf), handle(&inv_scale), err, err_len)
        })
        .map_err(torch)?;
        Ok(found_inf.f_double_value(&[0]).map_err(torch)? != 0.0)
    }

    /// Backs the scale off after a step with inf or NaN gradients, else counts the step and grows the scale
    /// after `growth_interval` of them in a row (as `torch._amp_update_scale_`, in float32).
    pub fn update(&mut self, found_inf: bool) {
        let s = &mut self.state;
        if found_inf {
            s.scale = (f64::from(s.scale) * s.backoff_factor) as f32;
            s.growth_tracker = 0;
            return;
        }
        let successful = s.growth_tracker + 1;
        if successful >= s.growth_interval {
            let grown = (f64::from(s.scale) * s.growth_factor) as f32;
            if grown.is_finite() {
                s.scale = grown;
            }
            s.growth_tracker = 0;
        } else {
            s.growth_tracker = successful;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_parses_the_allowed_values_and_names_them_when_refusing() {
        assert_eq!("bf16".parse::<Precision>(), Ok(Precision::Bf16));
        assert_eq!("FP16".parse::<Precision>(), Ok(Precision::Fp16));
        assert_eq!("fp32".parse::<Precision>(), Ok(Precision::Fp32));
        let e = "fp8".parse::<Precision>().unwrap_err();
        assert!(e.contains("fp32, bf16 or fp16") && e.contains("'fp8'"), "{e}");
    }

    #[test]
    fn an_overflow_halves_the_scale_and_resets_the_growth_count() {
        let mut s = GradScaler::new();
        s.update(false);
        s.update(false);
        assert_eq!(s.state().growth_tracker, 2);
        s.update(true);
        assert_eq!(s.scale(), 32768.0);
        assert_eq!(s.state().growth_tracker, 0);
    }

    #[test]
    fn the_scale_doubles_after_growth_interval_good_steps_in_a_row() {
        let mut s = GradScaler::new();
        for _ in 0..1999 {
            s.update(false);
        }
        assert_eq!(s.scale(), 65536.0);
        s.update(false);
        assert_eq!(s.scale(), 131072.0);
        assert_eq!(s.state().growth_tracker, 0);
    }

    #[test]
    fn the_scale_stays_finite_when_growing_would_overflow_float32() {
        let mut s =
            GradScaler::from_state(GradScalerState { scale: 2f32.powi(127), growth_interval: 1, ..Default::default() });
        s.update(false);
        assert_eq!(s.scale(), 2f64.powi(127));
    }

    #[test]
    fn unscale_divides_by_the_scale_and_reports_inf_and_nan() {
        let s = GradScaler::new();
        let g = Tensor::from_slice(&[65536.0f32, -131072.0]);
        assert!(!s.unscale(&[g.shallow_clone(), Tensor::new()]).unwrap());
        assert_eq!(Vec::<f32>::try_from(&g).unwrap(), vec![1.0, -2.0]);
        for bad in [f32::INFINITY, f32::NAN] {
            let ok = Tensor::from_slice(&[1.0f32]);
            assert!(s.unscale(&[ok, Tensor::from_slice(&[0.0f32, bad])]).unwrap(), "{bad} not found");
        }
    }

    #[test]
    fn autocast_guards_nest_and_restore_the_state_they_found() {
        std::thread::spawn(|| {
            assert_eq!(Autocast::current(Device::Cpu), None);
            {
                let _outer = Autocast::enter(Device::Cpu, Kind::BFloat16).unwrap();
                assert_eq!(Autocast::current(Device::Cpu), Some(Kind::BFloat16));
                {
                    let _inner = Autocast::enter(Device::Cpu, Kind::Half).unwrap();
                    assert_eq!(Autocast::current(Device::Cpu), Some(Kind::Half));
                }
                assert_eq!(Autocast::current(Device::Cpu), Some(Kind::BFloat16));
            }
            assert_eq!(Autocast::current(Device::Cpu), None);
            let failed = std::panic::catch_unwind(|| {
                let _guard = Autocast::enter(Device::Cpu, Kind::BFloat16).unwrap();
                panic!("inside the guard");
            });
            assert!(failed.is_err());
            assert_eq!(Autocast::current(Device::Cpu), None, "a panic inside the guard left autocast on");
            assert!(Autocast::enter(Device::Cpu, Kind::Float).is_err());
        })
        .join()
        .unwrap();
    }
}
