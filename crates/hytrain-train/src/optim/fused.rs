//! The multi-tensor updates: libtorch's fused SGD and AdamW kernels (`_fused_sgd_`, `_fused_adamw_`), what
//! `torch.optim.SGD(fused=True)` and `torch.optim.AdamW(fused=True)` call. The parameters are grouped by device
//! and dtype, as torch.optim groups them, and each group is one call: on a GPU one multi-tensor kernel launch per
//! chunk of tensors instead of a few kernels per parameter, and no value read back to the host.

use std::ffi::{c_char, c_int, c_void};

use tch::{Device, Kind, Tensor};

use super::{torch, AdamState, AdamWConfig, Gradients, SgdConfig};
use crate::shim::{handle, shim};
use crate::Result;

extern "C" {
    fn hyt_fused_sgd(
        params: *const *mut c_void,
        grads: *const *mut c_void,
        momentum_buffers: *const *mut c_void,
        n: usize,
        lr: f64,
        weight_decay: f64,
        momentum: f64,
        dampening: f64,
        nesterov: c_int,
        is_first_step: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn hyt_fused_adamw(
        params: *const *mut c_void,
        grads: *const *mut c_void,
        exp_avgs: *const *mut c_void,
        exp_avg_sqs: *const *mut c_void,
        steps: *const *mut c_void,
        n: usize,
        lr: f64,
        weight_decay: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Indices of the parameters with a gradient, grouped by `key` in order of first appearance.
fn groups<K: PartialEq>(
    params: &[(String, Tensor)],
    grads: &Gradients,
    key: impl Fn(usize, &Tensor) -> K,
) -> Vec<Vec<usize>> {
    let mut out: Vec<(K, Vec<usize>)> = Vec::new();
    for (i, (_, p)) in params.iter().enumerate() {
        if !grads.of(params, i).defined() {
            continue;
        }
        let k = key(i, p);
        match out.iter_mut().find(|(g, _)| *g == k) {
            Some((_, members)) => members.push(i),
            None => out.push((k, vec![i])),
        }
    }
    out.into_iter().map(|(_, members)| members).collect()
}

/// What an error in a group's update names: its first parameter, and how many others.
fn group_name(params: &[(String, Tensor)], members: &[usize]) -> String {
    match members.len() {
        1 => params[members[0]].0.clone(),
        n => format!("{} and {} other parameters", params[members[0]].0, n - 1),
    }
}

/// One step of `torch.optim.SGD(fused=True)`. Momentum buffers start as the first step's gradients (a group of
/// parameters whose buffers exist already and one of those without are two calls).
pub(super) fn sgd_step(
    params: &[(String, Tensor)],
    grads: &Gradients,
    buffers: &mut [Option<Tensor>],
    c: SgdConfig,
    lr: f64,
) -> Result<()> {
    let momentum = c.momentum != 0.0;
    let by = |i: usize, p: &Tensor| (p.device(), p.kind(), momentum && buffers[i].is_none());
    for members in groups(params, grads, by) {
        let name = group_name(params, &members);
        let e = torch(&name);
        let is_first_step = momentum && buffers[members[0]].is_none();
        if is_first_step {
            for &i in &members {
                buffers[i] = Some(params[i].1.f_empty_like().map_err(&e)?);
            }
        }
        let grads: Vec<Tensor> = members.iter().map(|&i| grads.of(params, i)).collect();
        let ps: Vec<*mut c_void> = members.iter().map(|&i| handle(&params[i].1)).collect();
        let gs: Vec<*mut c_void> = grads.iter().map(handle).collect();
        let bs: Vec<*mut c_void> = if momentum {
            members.iter().map(|&i| buffers[i].as_ref().map_or(std::ptr::null_mut(), handle)).collect()
        } else {
            Vec::new()
        };
        let done = shim(|err, len| {
            // SAFETY: every handle is a live tensor for the call, which keeps none; `bs` holds one buffer per
            // parameter exactly when momentum is on, as the shim reads it.
            unsafe {
                hyt_fused_sgd(
                    ps.as_ptr(),
                    gs.as_ptr(),
                    bs.as_ptr(),
                    ps.len(),
                    lr,
                    c.weight_decay,
                    c.momentum,
                    c.dampening,
                    c_int::from(c.nesterov),
                    c_int::from(is_first_step),
                    err,
                    len,
                )
            }
        });
        if let Err(why) = done {
            if is_first_step {
                // Unfilled: the next step must start them again.
                members.iter().for_each(|&i| buffers[i] = None);
            }
            return Err(e(why));
        }
    }
    Ok(())
}

/// One step of `torch.optim.AdamW(fused=True)`: step counts as float32 tensors on the parameters' device (made
/// from the count kept in [`AdamState::step`] when missing, after a restore), incremented by the shim.
pub(super) fn adamw_step(
    params: &[(String, Tensor)],
    grads: &Gradients,
    state: &mut [Option<AdamState>],
    c: AdamWConfig,
    lr: f64,
) -> Result<()> {
    let (beta1, beta2) = c.betas;
    for members in groups(params, grads, |_, p: &Tensor| (p.device(), p.kind())) {
        let name = group_name(params, &members);
        let e = torch(&name);
        for &i in &members {
            let p = &params[i].1;
            let st = match &mut state[i] {
                Some(s) => s,
                slot => slot.insert(AdamState {
                    step: 0.0,
                    exp_avg: p.f_zeros_like().map_err(&e)?,
                    exp_avg_sq: p.f_zeros_like().map_err(&e)?,
                    step_count: None,
                }),
            };
            if st.step_count.is_none() {
                st.step_count = Some(Tensor::f_full([], st.step, (Kind::Float, p.device())).map_err(&e)?);
            }
        }
        let grads: Vec<Tensor> = members.iter().map(|&i| grads.of(params, i)).collect();
        let st = |i: usize| state[i].as_ref().expect("made above");
        let ps: Vec<*mut c_void> = members.iter().map(|&i| handle(&params[i].1)).collect();
        let gs: Vec<*mut c_void> = grads.iter().map(handle).collect();
        let ms: Vec<*mut c_void> = members.iter().map(|&i| handle(&st(i).exp_avg)).collect();
        let vs: Vec<*mut c_void> = members.iter().map(|&i| handle(&st(i).exp_avg_sq)).collect();
        let ss: Vec<*mut c_void> =
            members.iter().map(|&i| handle(st(i).step_count.as_ref().expect("made above"))).collect();
        shim(|err, len| {
            // SAFETY: every handle is a live tensor for the call, which keeps none.
            unsafe {
                hyt_fused_adamw(
                    ps.as_ptr(),
                    gs.as_ptr(),
                    ms.as_ptr(),
                    vs.as_ptr(),
                    ss.as_ptr(),
                    ps.len(),
                    lr,
                    c.weight_decay,
                    beta1,
                    beta2,
                    c.eps,
                    err,
                    len,
                )
            }
        })
        .map_err(&e)?;
        for &i in &members {
            state[i].as_mut().expect("made above").step += 1.0;
        }
    }
    Ok(())
}

/// Whether every parameter is on a CUDA device (where the fused kernels are the default).
pub(super) fn all_on_cuda(params: &[(String, Tensor)]) -> bool {
    !params.is_empty() && params.iter().all(|(_, p)| matches!(p.device(), Device::Cuda(_)))
}
