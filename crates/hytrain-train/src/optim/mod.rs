//! Optimizers written on tensors so their state can be checkpointed: SGD and AdamW with exactly the update rules of
//! `torch.optim.SGD` and `torch.optim.AdamW`, in two implementations ([`Implementation`]):
//!
//! - single-tensor (the default on the CPU, torch.optim's own default there): each parameter's update is one call
//!   into the C++ shim (`csrc/optim_step.cpp`), which issues torch.optim's ATen calls in place (tch has no `add_`
//!   with alpha nor `addcmul_`/`addcdiv_` with a value, and building each scaled term as a tensor cost one
//!   temporary per term and parameter). The one intermediate torch.optim itself allocates per parameter goes into
//!   a scratch tensor reused across parameters and steps. On a GPU this is a few kernel launches per parameter.
//! - fused (the default when every parameter is on a GPU): libtorch's multi-tensor `_fused_sgd_` and
//!   `_fused_adamw_`, what `torch.optim.SGD(fused=True)` and `torch.optim.AdamW(fused=True)` run: one call per
//!   device and dtype (see `fused.rs`).

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};

use tch::{Kind, TchError, Tensor};

use crate::shim::{handle, shim};
use crate::{Result, TrainError};

mod fused;

/// How an optimizer issues its update; both follow torch.optim's update rules and agree within float rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Implementation {
    /// One shim call per parameter, the ATen calls of torch.optim's single-tensor (for-loop) path: bit for bit
    /// `torch.optim`'s default on the CPU.
    SingleTensor,
    /// libtorch's fused multi-tensor kernels, as `torch.optim`'s `fused=True`: one call per device and dtype.
    Fused,
}

impl Implementation {
    /// Fused when every parameter is on a CUDA device, else single-tensor.
    pub fn for_parameters(params: &[(String, Tensor)]) -> Self {
        if fused::all_on_cuda(params) {
            Implementation::Fused
        } else {
            Implementation::SingleTensor
        }
    }
}

/// Updates parameters from their gradients; the learning rate is passed per step so schedules stay outside.
pub trait Optimizer: Send {
    /// "sgd" or "adamw".
    fn name(&self) -> &'static str;

    /// One update of every parameter that has a gradient, with learning rate `lr`.
    fn step(&mut self, lr: f64) -> Result<()>;

    /// The names of the tensors it updates, in order (the model's parameters, or a sharded engine's shards).
    fn parameter_names(&self) -> Vec<&str>;

    /// The state as named tensors (`<param>.momentum_buffer`, `<param>.exp_avg`, `<param>.exp_avg_sq`,
    /// `<param>.step`), for checkpoints.
    fn state(&self) -> Vec<(String, Tensor)>;

    /// Restores [`Optimizer::state`] output. Names must belong to this optimizer's parameters with matching shapes.
    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()>;
}

/// `torch.optim.SGD`'s options (the learning rate is given per step).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SgdConfig {
    /// Momentum factor (0 disables the buffer).
    pub momentum: f64,
    /// Dampening of the gradient added to the momentum buffer.
    pub dampening: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig { momentum: 0.0, dampening: 0.0, nesterov: false, weight_decay: 0.0 }
    }
}

/// `torch.optim.AdamW`'s options (the learning rate is given per step).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// β1, β2.
    pub betas: (f64, f64),
    /// Added to the denominator outside the square root.
    pub eps: f64,
    /// Decoupled weight decay: each step multiplies parameters by `1 - lr * weight_decay`.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.01 }
    }
}

/// Which optimizer to build, as stored in checkpoints and configuration.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OptimizerConfig {
    /// Stochastic gradient descent.
    Sgd(SgdConfig),
    /// Adam with decoupled weight decay.
    #[serde(rename = "adamw")]
    AdamW(AdamWConfig),
}

impl OptimizerConfig {
    /// Builds the optimizer over `params` (the model's named parameters), in the implementation
    /// [`Implementation::for_parameters`] picks.
    pub fn build(&self, params: &[(String, Tensor)]) -> Result<Box<dyn Optimizer>> {
        self.build_with(params, Implementation::for_parameters(params))
    }

    /// [`OptimizerConfig::build`] in the given implementation.
    pub fn build_with(
        &self,
        params: &[(String, Tensor)],
        implementation: Implementation,
    ) -> Result<Box<dyn Optimizer>> {
        Ok(match self {
            OptimizerConfig::Sgd(c) => Box::new(Sgd::new(params, *c)?.with_implementation(implementation)),
            OptimizerConfig::AdamW(c) => Box::new(AdamW::new(params, *c)?.with_implementation(implementation)),
        })
    }

    /// Builds the optimizer over `(name, tensor, gradient)` triples: each step updates `tensor` from `gradient`
    /// as it holds then, not from `tensor.grad()`. Sharded training ([`crate::ShardMode`]) steps views of a flat
    /// parameter buffer this way, with views of the reduced gradient block as their gradients.
    pub fn build_over_gradients(&self, targets: &[(String, Tensor, Tensor)]) -> Result<Box<dyn Optimizer>> {
        let params: Vec<(String, Tensor)> = targets.iter().map(|(n, t, _)| (n.clone(), t.shallow_clone())).collect();
        let grads: Vec<Tensor> = targets.iter().map(|(_, _, g)| g.shallow_clone()).collect();
        let implementation = Implementation::for_parameters(&params);
        Ok(match self {
            OptimizerConfig::Sgd(c) => {
                Box::new(Sgd::new(&params, *c)?.with_implementation(implementation).with_gradients(grads)?)
            }
            OptimizerConfig::AdamW(c) => {
                Box::new(AdamW::new(&params, *c)?.with_implementation(implementation).with_gradients(grads)?)
            }
        })
    }
}

/// Where an optimizer reads its parameters' gradients: each parameter's `.grad`, or tensors given at build time.
#[derive(Debug, Default)]
struct Gradients(Option<Vec<Tensor>>);

impl Gradients {
    /// The gradient of parameter `i` (undefined when it has none).
    fn of(&self, params: &[(String, Tensor)], i: usize) -> Tensor {
        match &self.0 {
            Some(grads) => grads[i].shallow_clone(),
            None => params[i].1.grad(),
        }
    }

    /// Explicit gradients for `params`, one per parameter, each of its parameter's shape, dtype and device.
    fn explicit(params: &[(String, Tensor)], grads: Vec<Tensor>) -> Result<Self> {
        if grads.len() != params.len() {
            return Err(TrainError::OptimizerState(format!(
                "{} gradients given for {} parameters",
                grads.len(),
                params.len()
            )));
        }
        for ((name, p), g) in params.iter().zip(&grads) {
            if g.size() != p.size() || g.kind() != p.kind() || g.device() != p.device() {
                return Err(TrainError::OptimizerState(format!(
                    "the gradient given for {name} is {:?} {:?} on {:?}, the parameter {:?} {:?} on {:?}",
                    g.size(),
                    g.kind(),
                    g.device(),
                    p.size(),
                    p.kind(),
                    p.device()
                )));
            }
        }
        Ok(Gradients(Some(grads)))
    }
}

fn shallow(params: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
}

fn check_finite(option: &str, v: f64, min: f64) -> Result<()> {
    if !v.is_finite() || v < min {
        return Err(TrainError::option(option, format!("must be a finite number >= {min}, got {v}")));
    }
    Ok(())
}

fn torch(name: &str) -> impl Fn(TchError) -> TrainError + '_ {
    move |e| TrainError::torch(format!("optimizer update of {name}"), e)
}

/// Looks up `<param>.<suffix>` entries of a saved state, refusing names of no parameter and wrong shapes.
fn index_state<'a>(
    params: &[(String, Tensor)],
    state: &'a [(String, Tensor)],
    suffixes: &[&str],
) -> Result<HashMap<(usize, usize), &'a Tensor>> {
    let by_name: HashMap<&str, usize> = params.iter().enumerate().map(|(i, (n, _))| (n.as_str(), i)).collect();
    let mut out = HashMap::new();
    for (key, t) in state {
        let found = suffixes.iter().enumerate().find_map(|(si, suffix)| {
            let param = key.strip_suffix(suffix)?.strip_suffix('.')?;
            by_name.get(param).map(|pi| (*pi, si))
        });
        let Some((pi, si)) = found else {
            return Err(TrainError::OptimizerState(format!(
                "entry {key} belongs to no parameter of this model; was the checkpoint written for another model?"
            )));
        };
        if suffixes[si] != "step" && t.size() != params[pi].1.size() {
            return Err(TrainError::OptimizerState(format!(
                "entry {key} has shape {:?}, parameter {} has {:?}",
                t.size(),
                params[pi].0,
                params[pi].1.size()
            )));
        }
        out.insert((pi, si), t);
    }
    Ok(out)
}

fn restore(t: &Tensor, like: &Tensor) -> Result<Tensor, TchError> {
    t.f_to_device(like.device())?.f_to_kind(like.kind())?.f_contiguous()?.f_detach_copy()
}

extern "C" {
    fn hyt_sgd_step(
        param: *mut c_void,
        grad: *mut c_void,
        momentum_buffer: *mut c_void,
        buffer_is_new: c_int,
        scratch: *mut c_void,
        lr: f64,
        weight_decay: f64,
        momentum: f64,
        dampening: f64,
        nesterov: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn hyt_adamw_step(
        param: *mut c_void,
        grad: *mut c_void,
        exp_avg: *mut c_void,
        exp_avg_sq: *mut c_void,
        scratch: *mut c_void,
        lr: f64,
        weight_decay: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        step_size: f64,
        bias_correction2_sqrt: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Storage for the one intermediate tensor of a parameter's update, one per dtype and device, reused by every
/// parameter: the shim resizes it in place, which reallocates only while it grows to the largest parameter.
#[derive(Debug, Default)]
struct Scratch(Vec<Tensor>);

impl Scratch {
    fn like(&mut self, param: &Tensor) -> Result<&Tensor, TchError> {
        let (kind, device) = (param.f_kind()?, param.device());
        let i = match self.0.iter().position(|s| s.kind() == kind && s.device() == device) {
            Some(i) => i,
            None => {
                self.0.push(Tensor::f_empty([0], (kind, device))?);
                self.0.len() - 1
            }
        };
        Ok(&self.0[i])
    }
}

/// `torch.optim.SGD`: momentum buffer starts as the first gradient, then `buf = momentum*buf + (1-dampening)*g`.
#[derive(Debug)]
pub struct Sgd {
    params: Vec<(String, Tensor)>,
    config: SgdConfig,
    momentum_buffers: Vec<Option<Tensor>>,
    grads: Gradients,
    scratch: Scratch,
    implementation: Implementation,
}

impl Sgd {
    /// SGD over `params`, in the implementation [`Implementation::for_parameters`] picks.
    pub fn new(params: &[(String, Tensor)], config: SgdConfig) -> Result<Self> {
        check_finite("momentum", config.momentum, 0.0)?;
        check_finite("dampening", config.dampening, 0.0)?;
        check_finite("weight_decay", config.weight_decay, 0.0)?;
        if config.nesterov && (config.momentum <= 0.0 || config.dampening != 0.0) {
            return Err(TrainError::option("nesterov", "needs momentum > 0 and dampening 0 (as in PyTorch)"));
        }
        Ok(Sgd {
            params: shallow(params),
            config,
            momentum_buffers: (0..params.len()).map(|_| None).collect(),
            grads: Gradients::default(),
            scratch: Scratch::default(),
            implementation: Implementation::for_parameters(params),
        })
    }

    /// The same optimizer updating through `implementation` (its state carries over).
    pub fn with_implementation(mut self, implementation: Implementation) -> Self {
        self.implementation = implementation;
        self
    }

    /// The implementation in use.
    pub fn implementation(&self) -> Implementation {
        self.implementation
    }

    /// The same optimizer reading each parameter's gradient from `grads` (one per parameter, in order, each of
    /// its parameter's shape, dtype and device) instead of its `.grad`.
    pub fn with_gradients(mut self, grads: Vec<Tensor>) -> Result<Self> {
        self.grads = Gradients::explicit(&self.params, grads)?;
        Ok(self)
    }
}

impl Optimizer for Sgd {
    fn name(&self) -> &'static str {
        "sgd"
    }

    fn parameter_names(&self) -> Vec<&str> {
        self.params.iter().map(|(n, _)| n.as_str()).collect()
    }

    fn step(&mut self, lr: f64) -> Result<()> {
        let c = self.config;
        if self.implementation == Implementation::Fused {
            return fused::sgd_step(&self.params, &self.grads, &mut self.momentum_buffers, c, lr);
        }
        for (i, ((name, param), buf)) in self.params.iter().zip(self.momentum_buffers.iter_mut()).enumerate() {
            let grad = self.grads.of(&self.params, i);
            if !grad.defined() {
                continue;
            }
            let e = torch(name);
            let scratch = if c.weight_decay != 0.0 || c.nesterov {
                handle(self.scratch.like(param).map_err(&e)?)
            } else {
                std::ptr::null_mut()
            };
            let buffer_is_new = c.momentum != 0.0 && buf.is_none();
            if buffer_is_new {
                // Filled by the shim with this step's gradient, as torch.optim's first step clones it.
                *buf = Some(param.f_empty_like().map_err(&e)?);
            }
            let buffer = buf.as_ref().map_or(std::ptr::null_mut(), handle);
            let done = shim(|err, err_len| {
                // SAFETY: every handle is a live tensor borrowed for the call, which keeps none of them; the
                // buffer and scratch are null exactly when the shim does not use them (no momentum; neither
                // weight decay nor Nesterov).
                unsafe {
                    hyt_sgd_step(
                        handle(param),
                        handle(&grad),
                        buffer,
                        c_int::from(buffer_is_new),
                        scratch,
                        lr,
                        c.weight_decay,
                        c.momentum,
                        c.dampening,
                        c_int::from(c.nesterov),
                        err,
                        err_len,
                    )
                }
            });
            if let Err(why) = done {
                if buffer_is_new {
                    // Unfilled: the next step must start it again.
                    *buf = None;
                }
                return Err(e(why));
            }
        }
        Ok(())
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .zip(&self.momentum_buffers)
            .filter_map(|((n, _), b)| b.as_ref().map(|b| (format!("{n}.momentum_buffer"), b.shallow_clone())))
            .collect()
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let index = index_state(&self.params, state, &["momentum_buffer"])?;
        let mut buffers: Vec<Option<Tensor>> = (0..self.params.len()).map(|_| None).collect();
        for ((pi, _), t) in index {
            buffers[pi] = Some(restore(t, &self.params[pi].1).map_err(torch(&self.params[pi].0))?);
        }
        self.momentum_buffers = buffers;
        Ok(())
    }
}

#[derive(Debug)]
struct AdamState {
    step: f64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// `step` as the fused kernel reads it: float32 on the parameter's device (`None` until a fused step needs it).
    step_count: Option<Tensor>,
}

/// `torch.optim.AdamW`: decoupled weight decay, bias-corrected moments, `eps` added after the square root.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<(String, Tensor)>,
    config: AdamWConfig,
    state: Vec<Option<AdamState>>,
    grads: Gradients,
    scratch: Scratch,
    implementation: Implementation,
}

impl AdamW {
    /// AdamW over `params`, in the implementation [`Implementation::for_parameters`] picks.
    pub fn new(params: &[(String, Tensor)], config: AdamWConfig) -> Result<Self> {
        let (b1, b2) = config.betas;
        if !(0.0..1.0).contains(&b1) || !(0.0..1.0).contains(&b2) {
            return Err(TrainError::option("betas", format!("each beta must be in [0, 1), got ({b1}, {b2})")));
        }
        check_finite("eps", config.eps, 0.0)?;
        check_finite("weight_decay", config.weight_decay, 0.0)?;
        Ok(AdamW {
            params: shallow(params),
            config,
            state: (0..params.len()).map(|_| None).collect(),
            grads: Gradients::default(),
            scratch: Scratch::default(),
            implementation: Implementation::for_parameters(params),
        })
    }

    /// The same optimizer updating through `implementation` (its state carries over).
    pub fn with_implementation(mut self, implementation: Implementation) -> Self {
        self.implementation = implementation;
        self
    }

    /// The implementation in use.
    pub fn implementation(&self) -> Implementation {
        self.implementation
    }

    /// The same optimizer reading each parameter's gradient from `grads` (one per parameter, in order, each of
    /// its parameter's shape, dtype and device) instead of its `.grad`.
    pub fn with_gradients(mut self, grads: Vec<Tensor>) -> Result<Self> {
        self.grads = Gradients::explicit(&self.params, grads)?;
        Ok(self)
    }
}

impl Optimizer for AdamW {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn parameter_names(&self) -> Vec<&str> {
        self.params.iter().map(|(n, _)| n.as_str()).collect()
    }

    fn step(&mut self, lr: f64) -> Result<()> {
        let c = self.config;
        if self.implementation == Implementation::Fused {
            return fused::adamw_step(&self.params, &self.grads, &mut self.state, c, lr);
        }
        let (beta1, beta2) = c.betas;
        for (i, ((name, param), slot)) in self.params.iter().zip(self.state.iter_mut()).enumerate() {
            let grad = self.grads.of(&self.params, i);
            if !grad.defined() {
                continue;
            }
            let e = torch(name);
            let st = match slot {
                Some(s) => s,
                None => slot.insert(AdamState {
                    step: 0.0,
                    exp_avg: param.f_zeros_like().map_err(&e)?,
                    exp_avg_sq: param.f_zeros_like().map_err(&e)?,
                    step_count: None,
                }),
            };
            st.step += 1.0;
            st.step_count = None;
            // In double, as torch.optim computes them in Python (`bias_correction2 ** 0.5`, not sqrt).
            let bias_correction1 = 1.0 - beta1.powf(st.step);
            let bias_correction2 = 1.0 - beta2.powf(st.step);
            let step_size = lr / bias_correction1;
            let bias_correction2_sqrt = bias_correction2.powf(0.5);
            let scratch = handle(self.scratch.like(param).map_err(&e)?);
            shim(|err, err_len| {
                // SAFETY: every handle is a live tensor borrowed for the call, which keeps none of them.
                unsafe {
                    hyt_adamw_step(
                        handle(param),
                        handle(&grad),
                        handle(&st.exp_avg),
                        handle(&st.exp_avg_sq),
                        scratch,
                        lr,
                        c.weight_decay,
                        beta1,
                        beta2,
                        c.eps,
                        step_size,
                        bias_correction2_sqrt,
                        err,
                        err_len,
                    )
                }
            })
            .map_err(&e)?;
        }
        Ok(())
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for ((n, _), s) in self.params.iter().zip(&self.state) {
            if let Some(s) = s {
                out.push((format!("{n}.step"), Tensor::from(s.step)));
                out.push((format!("{n}.exp_avg"), s.exp_avg.shallow_clone()));
                out.push((format!("{n}.exp_avg_sq"), s.exp_avg_sq.shallow_clone()));
            }
        }
        out
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let index = index_state(&self.params, state, &["step", "exp_avg", "exp_avg_sq"])?;
        let mut restored = Vec::with_capacity(self.params.len());
        for (pi, (name, param)) in self.params.iter().enumerate() {
            let parts = (index.get(&(pi, 0)), index.get(&(pi, 1)), index.get(&(pi, 2)));
            restored.push(match parts {
                (None, None, None) => None,
                (Some(step), Some(m), Some(v)) => {
                    let step = step.f_to_kind(Kind::Double).and_then(|s| s.f_double_value(&[])).map_err(torch(name))?;
                    Some(AdamState {
                        step,
                        exp_avg: restore(m, param).map_err(torch(name))?,
                        exp_avg_sq: restore(v, param).map_err(torch(name))?,
                        step_count: None,
                    })
                }
                _ => {
                    return Err(TrainError::OptimizerState(format!(
                        "parameter {name} has only part of its AdamW state (needs step, exp_avg and exp_avg_sq)"
                    )))
                }
            });
        }
        self.state = restored;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// A parameter with value `p` whose gradient is set to `g` by backpropagating `sum(p * g)`.
    fn param(p: &[f32]) -> Vec<(String, Tensor)> {
        vec![("w".to_string(), Tensor::from_slice(p).set_requires_grad(true))]
    }

    fn set_grad(params: &[(String, Tensor)], g: &[f32]) {
        let mut p = params[0].1.shallow_clone();
        p.zero_grad();
        (&params[0].1 * Tensor::from_slice(g)).sum(Kind::Float).backward();
    }

    fn values(params: &[(String, Tensor)]) -> Vec<f64> {
        Vec::<f64>::try_from(params[0].1.to_kind(Kind::Double)).unwrap()
    }

    fn assert_close(got: &[f64], want: &[f64]) {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn plain_sgd_subtracts_lr_times_gradient() {
        let p = param(&[1.0, -2.0]);
        let mut sgd = Sgd::new(&p, SgdConfig::default()).unwrap();
        set_grad(&p, &[0.5, 0.25]);
        sgd.step(0.1).unwrap();
        assert_close(&values(&p), &[0.95, -2.025]);
        assert!(sgd.state().is_empty(), "no momentum, no state");
    }

    #[test]
    fn sgd_momentum_buffer_starts_as_the_first_gradient() {
        let p = param(&[1.0]);
        let mut sgd = Sgd::new(&p, SgdConfig { momentum: 0.9, ..Default::default() }).unwrap();
        set_grad(&p, &[0.5]);
        sgd.step(0.1).unwrap();
        // buf = 0.5, p = 1 - 0.1 * 0.5
        assert_close(&values(&p), &[0.95]);
        set_grad(&p, &[0.2]);
        sgd.step(0.1).unwrap();
        // buf = 0.9 * 0.5 + 0.2 = 0.65, p = 0.95 - 0.065
        assert_close(&values(&p), &[0.885]);
        let state = sgd.state();
        assert_eq!(state[0].0, "w.momentum_buffer");
        assert_close(&Vec::<f64>::try_from(state[0].1.to_kind(Kind::Double)).unwrap(), &[0.65]);
    }

    #[test]
    fn sgd_dampening_applies_from_the_second_step() {
        let p = param(&[0.0]);
        let mut sgd = Sgd::new(&p, SgdConfig { momentum: 0.5, dampening: 0.5, ..Default::default() }).unwrap();
        set_grad(&p, &[1.0]);
        sgd.step(1.0).unwrap();
        // buf = 1 (no dampening on the first step), p = -1
        assert_close(&values(&p), &[-1.0]);
        set_grad(&p, &[1.0]);
        sgd.step(1.0).unwrap();
        // buf = 0.5 * 1 + 0.5 * 1 = 1, p = -2
        assert_close(&values(&p), &[-2.0]);
    }

    #[test]
    fn sgd_nesterov_and_weight_decay_follow_pytorch() {
        let p = param(&[2.0]);
        let cfg = SgdConfig { momentum: 0.9, nesterov: true, weight_decay: 0.1, ..Default::default() };
        let mut sgd = Sgd::new(&p, cfg).unwrap();
        set_grad(&p, &[1.0]);
        sgd.step(0.1).unwrap();
        // d = 1 + 0.1 * 2 = 1.2; buf = 1.2; d = 1.2 + 0.9 * 1.2 = 2.28; p = 2 - 0.228
        assert_close(&values(&p), &[1.772]);
        set_grad(&p, &[1.0]);
        sgd.step(0.1).unwrap();
        // d = 1 + 0.1772 = 1.1772; buf = 0.9 * 1.2 + 1.1772 = 2.2572; d = 1.1772 + 0.9 * 2.2572 = 3.20868
        assert_close(&values(&p), &[1.772 - 0.320868]);
    }

    #[test]
    fn adamw_matches_hand_computed_steps() {
        let p = param(&[1.0]);
        let cfg = AdamWConfig { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.1 };
        let mut adam = AdamW::new(&p, cfg).unwrap();
        let (lr, b1, b2, eps) = (0.01f64, 0.9f64, 0.999f64, 1e-8f64);
        let (mut w, mut m, mut v) = (1.0f64, 0.0f64, 0.0f64);
        for (t, g) in [0.5f64, -0.3, 0.8].into_iter().enumerate() {
            set_grad(&p, &[g as f32]);
            adam.step(lr).unwrap();
            let t = (t + 1) as i32;
            w *= 1.0 - lr * 0.1;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let denom = (v.sqrt() / (1.0 - b2.powi(t)).sqrt()) + eps;
            w -= lr / (1.0 - b1.powi(t)) * m / denom;
            assert_close(&values(&p), &[w]);
        }
        // First step moves by about lr whatever the gradient's scale: Adam's signature.
        let q = param(&[0.0]);
        let mut fresh = AdamW::new(&q, AdamWConfig { weight_decay: 0.0, ..Default::default() }).unwrap();
        set_grad(&q, &[1e-3]);
        fresh.step(0.01).unwrap();
        assert_close(&values(&q), &[-0.01 * 1e-3 / (1e-3 + 1e-8)]);
    }

    extern "C" {
        fn hyt_cpu_allocations_on_this_thread() -> u64;
    }

    fn cpu_allocations() -> u64 {
        // SAFETY: no arguments; the shim only reads a thread-local counter (installing it on the first call).
        unsafe { hyt_cpu_allocations_on_this_thread() }
    }

    #[test]
    fn steps_after_the_first_allocate_no_tensor_memory() {
        let configs = [
            OptimizerConfig::Sgd(SgdConfig::default()),
            OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, dampening: 0.1, weight_decay: 1e-4, ..Default::default() }),
            OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, nesterov: true, weight_decay: 1e-4, ..Default::default() }),
            OptimizerConfig::AdamW(AdamWConfig::default()),
        ];
        for cfg in configs {
            // The larger parameter comes second, so the scratch has to grow once during the first step.
            let params: Vec<(String, Tensor)> = [300i64, 1000]
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    (format!("p{i}"), Tensor::randn([n], (Kind::Float, Device::Cpu)).set_requires_grad(true))
                })
                .collect();
            let loss: Tensor = params.iter().map(|(_, p)| (p * p).sum(Kind::Float)).sum();
            loss.backward();
            let mut opt = cfg.build(&params).unwrap();
            opt.step(0.1).unwrap();
            let storage = |opt: &dyn Optimizer| -> Vec<usize> {
                // AdamW's step counts are made by `state()` itself, from a number.
                let state = opt.state().into_iter().filter(|(n, _)| !n.ends_with(".step")).map(|(_, t)| t);
                params.iter().map(|(_, p)| p.shallow_clone()).chain(state).map(|t| t.data_ptr() as usize).collect()
            };
            let before = storage(opt.as_ref());
            let start = cpu_allocations();
            for _ in 0..3 {
                opt.step(0.1).unwrap();
            }
            assert_eq!(cpu_allocations() - start, 0, "{cfg:?}: steps after the first allocated tensors");
            assert_eq!(storage(opt.as_ref()), before, "{cfg:?}: parameters and state were updated in place");
            // The counter does see a tensor the size of a parameter being made.
            let counted = cpu_allocations();
            let _copy = params[1].1.detach().copy();
            assert_eq!(cpu_allocations() - counted, 1);
        }
    }

    #[test]
    fn a_failing_update_is_an_error_naming_the_parameter() {
        for cfg in [
            OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, ..Default::default() }),
            OptimizerConfig::AdamW(AdamWConfig::default()),
        ] {
            let p = param(&[1.0, 2.0]);
            let mut opt = cfg.build(&p).unwrap();
            set_grad(&p, &[0.5, 0.5]);
            opt.step(0.1).unwrap();
            // The parameter changes shape behind the optimizer's back: its state and gradient no longer fit.
            let mut w = p[0].1.shallow_clone();
            w.set_data(&Tensor::zeros([3], (Kind::Float, Device::Cpu)));
            let e = opt.step(0.1).unwrap_err().to_string();
            assert!(e.starts_with("optimizer update of w: ") && e.contains("size"), "{cfg:?}: {e}");
            assert!(!e.contains("frame #"), "{cfg:?}: no C++ backtrace in {e}");
        }
    }

    #[test]
    fn parameters_without_gradient_are_left_alone() {
        let p = param(&[3.0]);
        let mut adam = AdamW::new(&p, AdamWConfig::default()).unwrap();
        adam.step(0.1).unwrap();
        assert_close(&values(&p), &[3.0]);
        assert!(adam.state().is_empty());
    }

    /// Values spread over [-1, 1] without drawing from libtorch's generator (other tests on parallel threads rely
    /// on it), different for each `salt`.
    fn spread(shape: &[i64], kind: Kind, salt: f64) -> Tensor {
        let n: i64 = shape.iter().product();
        (Tensor::arange(n, (Kind::Double, Device::Cpu)) * 1.7 + salt).sin().to_kind(kind).reshape(shape)
    }

    /// Parameters of two shapes in float32 and one in float64 (two fused groups), one without a gradient.
    fn mixed_params() -> Vec<(String, Tensor)> {
        let make = |shape: &[i64], kind| spread(shape, kind, 0.3).set_requires_grad(true);
        vec![
            ("a".to_string(), make(&[7, 5], Kind::Float)),
            ("b".to_string(), make(&[13], Kind::Float)),
            ("c".to_string(), make(&[3, 3], Kind::Double)),
            ("unused".to_string(), make(&[4], Kind::Float)),
        ]
    }

    fn copies(params: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
        params.iter().map(|(n, t)| (n.clone(), t.detach().copy().set_requires_grad(true))).collect()
    }

    /// Gives every parameter but the last the gradient `g`, the same values in both copies.
    fn give_gradients(params: &[(String, Tensor)], g: &[Tensor]) {
        for ((_, p), g) in params.iter().zip(g) {
            crate::shim::set_grad(p, &g.copy()).unwrap();
        }
    }

    #[test]
    fn fused_updates_equal_single_tensor_updates_within_rounding() {
        let configs = [
            OptimizerConfig::Sgd(SgdConfig::default()),
            OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, dampening: 0.3, weight_decay: 1e-2, nesterov: false }),
            OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, nesterov: true, weight_decay: 1e-2, ..Default::default() }),
            OptimizerConfig::AdamW(AdamWConfig { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.01 }),
        ];
        for cfg in configs {
            let single = mixed_params();
            let fused = copies(&single);
            let mut a = cfg.build_with(&single, Implementation::SingleTensor).unwrap();
            let mut b = cfg.build_with(&fused, Implementation::Fused).unwrap();
            let before = copies(&single);
            for step in 0..5 {
                let g: Vec<Tensor> = single[..3]
                    .iter()
                    .map(|(_, p)| spread(&p.size(), p.kind(), f64::from(step)) * 10f64.powi(step % 3 - 1))
                    .collect();
                give_gradients(&single, &g);
                give_gradients(&fused, &g);
                a.step(0.05).unwrap();
                b.step(0.05).unwrap();
            }
            for (((name, x), (_, y)), (_, x0)) in single.iter().zip(&fused).zip(&before) {
                let moved = (x - x0).abs().max().double_value(&[]);
                let diff = (x - y).abs().max().double_value(&[]) / x.abs().max().double_value(&[]);
                if name == "unused" {
                    assert_eq!(moved, 0.0, "{cfg:?}: a parameter without gradient moved");
                    assert!(x.equal(y));
                } else {
                    assert!(moved > 1e-3, "{cfg:?}: {name} barely moved");
                    assert!(diff <= 1e-6, "{cfg:?}: {name} differs by {diff:e} (relative)");
                }
            }
            // The checkpointed state agrees too (step counts, moments, momentum buffers).
            for ((n, x), (m, y)) in a.state().iter().zip(b.state().iter()) {
                assert_eq!(n, m);
                let scale = x.abs().max().double_value(&[]).max(1e-12);
                assert!((x - y).abs().max().double_value(&[]) / scale <= 1e-6, "{cfg:?}: state {n} differs");
            }
        }
    }

    #[test]
    fn explicit_gradients_update_exactly_as_the_parameters_own() {
        let configs = [
            OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, nesterov: true, weight_decay: 1e-2, ..Default::default() }),
            OptimizerConfig::AdamW(AdamWConfig::default()),
        ];
        for cfg in configs {
            for implementation in [Implementation::SingleTensor, Implementation::Fused] {
                let own = mixed_params();
                let mut by_grad = cfg.build_with(&own, implementation).unwrap();
                // The explicit targets are plain tensors (no autograd) with gradients kept beside them.
                let targets: Vec<(String, Tensor, Tensor)> =
                    own.iter().map(|(n, p)| (n.clone(), p.detach().copy(), p.detach().zeros_like())).collect();
                let mut explicit = match implementation {
                    Implementation::SingleTensor => cfg.build_over_gradients(&targets).unwrap(),
                    Implementation::Fused => {
                        let params: Vec<(String, Tensor)> =
                            targets.iter().map(|(n, t, _)| (n.clone(), t.shallow_clone())).collect();
                        let grads = targets.iter().map(|(_, _, g)| g.shallow_clone()).collect();
                        match cfg {
                            OptimizerConfig::Sgd(c) => Box::new(
                                Sgd::new(&params, c)
                                    .unwrap()
                                    .with_implementation(implementation)
                                    .with_gradients(grads)
                                    .unwrap(),
                            ) as Box<dyn Optimizer>,
                            OptimizerConfig::AdamW(c) => Box::new(
                                AdamW::new(&params, c)
                                    .unwrap()
                                    .with_implementation(implementation)
                                    .with_gradients(grads)
                                    .unwrap(),
                            ),
                        }
                    }
                };
                for step in 0..4 {
                    let g: Vec<Tensor> =
                        own.iter().map(|(_, p)| spread(&p.size(), p.kind(), f64::from(step) + 0.5)).collect();
                    give_gradients(&own, &g);
                    for ((_, _, grad), g) in targets.iter().zip(&g) {
                        grad.shallow_clone().copy_(g);
                    }
                    by_grad.step(0.05).unwrap();
                    explicit.step(0.05).unwrap();
                }
                for ((name, p), (_, t, _)) in own.iter().zip(&targets) {
                    assert!(p.detach().equal(t), "{cfg:?} {implementation:?}: {name} differs");
                }
                assert_eq!(explicit.parameter_names(), vec!["a", "b", "c", "unused"]);
            }
        }
        let p = param(&[1.0, 2.0]);
        let e = Sgd::new(&p, SgdConfig::default())
            .unwrap()
            .with_gradients(vec![Tensor::zeros([3], (Kind::Float, Device::Cpu))]);
        assert!(e.unwrap_err().to_string().contains("the gradient given for w is [3]"));
    }

    #[test]
    fn parameters_on_the_cpu_update_single_tensor_by_default() {
        let params = param(&[1.0]);
        assert_eq!(Implementation::for_parameters(&params), Implementation::SingleTensor);
        assert_eq!(Sgd::new(&params, SgdConfig::default()).unwrap().implementation(), Implementation::SingleTensor);
        assert_eq!(AdamW::new(&params, AdamWConfig::default()).unwrap().implementation(), Implementation::SingleTensor);
    }

    fn continue_after_restore(cfg: OptimizerConfig, implementation: Implementation) {
        let a = param(&[1.0, 2.0]);
        let b = param(&[1.0, 2.0]);
        let mut first = cfg.build_with(&a, implementation).unwrap();
        let mut second = cfg.build_with(&b, implementation).unwrap();
        for g in [[0.5, -1.0], [0.25, 0.75]] {
            set_grad(&a, &g);
            first.step(0.1).unwrap();
            set_grad(&b, &g);
            second.step(0.1).unwrap();
        }
        // A third optimizer takes over `b` from saved state: it must continue exactly as `first`.
        let saved: Vec<(String, Tensor)> = second.state().iter().map(|(n, t)| (n.clone(), t.copy())).collect();
        let mut restored = cfg.build_with(&b, implementation).unwrap();
        restored.load_state(&saved).unwrap();
        set_grad(&a, &[1.0, 1.0]);
        first.step(0.1).unwrap();
        set_grad(&b, &[1.0, 1.0]);
        restored.step(0.1).unwrap();
        assert_eq!(values(&a), values(&b), "{cfg:?}");
    }

    #[test]
    fn state_round_trip_continues_the_same_trajectory() {
        for implementation in [Implementation::SingleTensor, Implementation::Fused] {
            continue_after_restore(
                OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, ..Default::default() }),
                implementation,
            );
            continue_after_restore(OptimizerConfig::AdamW(AdamWConfig::default()), implementation);
        }
    }

    #[test]
    fn state_for_another_model_is_refused() {
        let p = param(&[1.0, 2.0]);
        let mut sgd = Sgd::new(&p, SgdConfig { momentum: 0.9, ..Default::default() }).unwrap();
        let foreign = vec![("fc9.weight.momentum_buffer".to_string(), Tensor::zeros([2], (Kind::Float, Device::Cpu)))];
        let e = sgd.load_state(&foreign).unwrap_err().to_string();
        assert!(e.contains("fc9.weight.momentum_buffer belongs to no parameter"), "{e}");
        let wrong = vec![("w.momentum_buffer".to_string(), Tensor::zeros([3], (Kind::Float, Device::Cpu)))];
        let e = sgd.load_state(&wrong).unwrap_err().to_string();
        assert!(e.contains("shape [3]") && e.contains("[2]"), "{e}");
        let mut adam = AdamW::new(&p, AdamWConfig::default()).unwrap();
        let partial = vec![("w.exp_avg".to_string(), Tensor::zeros([2], (Kind::Float, Device::Cpu)))];
        let e = adam.load_state(&partial).unwrap_err().to_string();
        assert!(e.contains("only part of its AdamW state"), "{e}");
    }

    #[test]
    fn bad_hyperparameters_are_refused() {
        let p = param(&[1.0]);
        assert!(Sgd::new(&p, SgdConfig { momentum: -0.1, ..Default::default() }).is_err());
        let e = Sgd::new(&p, SgdConfig { nesterov: true, ..Default::default() }).unwrap_err().to_string();
        assert!(e.starts_with("invalid nesterov"), "{e}");
        let e = AdamW::new(&p, AdamWConfig { betas: (1.0, 0.999), ..Default::default() }).unwrap_err().to_string();
        assert!(e.starts_with("invalid betas"), "{e}");
    }

    #[test]
    fn optimizer_config_round_trips_through_json() {
        let c = OptimizerConfig::AdamW(AdamWConfig::default());
        let j = serde_json::to_string(&c).unwrap();
        assert!(j.contains("\"kind\":\"adamw\""), "{j}");
        assert_eq!(serde_json::from_str::<OptimizerConfig>(&j).unwrap(), c);
    }
}
