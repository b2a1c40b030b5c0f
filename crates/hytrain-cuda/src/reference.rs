//! CPU references of the kernels in `kernels/`: the same element walk and the same float operations in the same
//! order, so a kernel's output can be checked against them exactly (the kernels are compiled with
//! `--fmad=false`). They also serve as the CPU implementation of bucketing and the fused optimizer steps.

use std::ops::Range;

use crate::CudaError;

/// Where each tensor of a bucket lives: the prefix sums of their element counts, as the kernels take them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketLayout {
    offsets: Vec<usize>,
}

impl BucketLayout {
    /// A layout for tensors of these element counts, in bucket order.
    pub fn new(lengths: impl IntoIterator<Item = usize>) -> BucketLayout {
        let mut offsets = vec![0];
        let mut end = 0usize;
        for len in lengths {
            end += len;
            offsets.push(end);
        }
        BucketLayout { offsets }
    }

    /// The bucket's length in elements.
    pub fn len(&self) -> usize {
        *self.offsets.last().unwrap_or(&0)
    }

    /// Whether the bucket holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many tensors the bucket holds.
    pub fn tensors(&self) -> usize {
        self.offsets.len() - 1
    }

    /// The `tensors() + 1` prefix sums handed to the kernels as `offsets`.
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// The bucket elements of tensor `t`.
    pub fn range(&self, t: usize) -> Range<usize> {
        self.offsets[t]..self.offsets[t + 1]
    }

    /// The tensor holding bucket element `i`: the last `t` with `offsets[t] <= i`, found by the kernels' binary
    /// search, so empty tensors are passed over.
    pub fn tensor_of(&self, i: usize) -> usize {
        let (mut lo, mut hi) = (0usize, self.tensors().saturating_sub(1));
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if self.offsets[mid] <= i {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }

    fn check(&self, lengths: impl Iterator<Item = usize>, bucket: usize) -> Result<(), CudaError> {
        let lengths: Vec<usize> = lengths.collect();
        if lengths.len() != self.tensors() {
            return Err(CudaError::Shape(format!(
                "the bucket layout has {} tensors but {} were given",
                self.tensors(),
                lengths.len()
            )));
        }
        if let Some(t) = (0..lengths.len()).find(|&t| lengths[t] != self.range(t).len()) {
            return Err(CudaError::Shape(format!(
                "tensor {t} has {} elements but the bucket layout gives it {}",
                lengths[t],
                self.range(t).len()
            )));
        }
        if bucket != self.len() {
            return Err(CudaError::Shape(format!(
                "the bucket has {bucket} elements but its layout needs {}",
                self.len()
            )));
        }
        Ok(())
    }
}

/// `hytrain_pack_scaled`: copies every gradient into its place in `bucket`, multiplied by `scale`.
pub fn pack(layout: &BucketLayout, grads: &[&[f32]], scale: f32, bucket: &mut [f32]) -> Result<(), CudaError> {
    layout.check(grads.iter().map(|g| g.len()), bucket.len())?;
    for (i, out) in bucket.iter_mut().enumerate() {
        let t = layout.tensor_of(i);
        *out = grads[t][i - layout.offsets[t]] * scale;
    }
    Ok(())
}

/// `hytrain_unpack_scaled`: copies `bucket`, multiplied by `scale`, back into the gradients.
pub fn unpack(layout: &BucketLayout, bucket: &[f32], scale: f32, grads: &mut [&mut [f32]]) -> Result<(), CudaError> {
    layout.check(grads.iter().map(|g| g.len()), bucket.len())?;
    for (i, value) in bucket.iter().enumerate() {
        let t = layout.tensor_of(i);
        grads[t][i - layout.offsets[t]] = value * scale;
    }
    Ok(())
}

/// Hyperparameters of SGD, as torch.optim.SGD takes them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor; 0 turns momentum off.
    pub momentum: f64,
    /// Dampening of the gradient's share in the momentum.
    pub dampening: f64,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
    /// Nesterov momentum (needs momentum > 0 and dampening 0).
    pub nesterov: bool,
}

impl SgdConfig {
    /// The kernel's float arguments for one step; `first_step` starts the momentum buffers. Refuses the
    /// combinations torch.optim.SGD refuses.
    pub fn args(&self, first_step: bool) -> Result<SgdArgs, CudaError> {
        let finite = [self.lr, self.momentum, self.dampening, self.weight_decay].iter().all(|v| v.is_finite());
        if !finite || self.lr < 0.0 || self.momentum < 0.0 || self.weight_decay < 0.0 {
            return Err(CudaError::Shape(format!(
                "SGD needs finite lr, momentum and weight_decay >= 0 (got lr {}, momentum {}, weight_decay {})",
                self.lr, self.momentum, self.weight_decay
            )));
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(CudaError::Shape(format!(
                "Nesterov momentum needs momentum > 0 and dampening 0 (got momentum {}, dampening {})",
                self.momentum, self.dampening
            )));
        }
        Ok(SgdArgs {
            lr: self.lr as f32,
            momentum: self.momentum as f32,
            dampening: self.dampening as f32,
            weight_decay: self.weight_decay as f32,
            nesterov: self.nesterov,
            first_step,
        })
    }
}

/// The scalar arguments of `hytrain_sgd_momentum`, in its order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdArgs {
    /// Learning rate.
    pub lr: f32,
    /// Momentum factor.
    pub momentum: f32,
    /// Dampening.
    pub dampening: f32,
    /// Weight decay.
    pub weight_decay: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// The momentum buffer starts as the gradient on this step.
    pub first_step: bool,
}

/// `hytrain_sgd_momentum`: one SGD step over a flat bucket of parameters, updating `momentum_buf` in place.
pub fn sgd_momentum_step(
    args: &SgdArgs,
    params: &mut [f32],
    grads: &[f32],
    momentum_buf: &mut [f32],
) -> Result<(), CudaError> {
    same_lengths("SGD", &[("params", params.len()), ("grads", grads.len()), ("momentum_buf", momentum_buf.len())])?;
    for i in 0..params.len() {
        let p = params[i];
        let mut g = grads[i];
        if args.weight_decay != 0.0 {
            g += args.weight_decay * p;
        }
        if args.momentum != 0.0 {
            let b = if args.first_step { g } else { args.momentum * momentum_buf[i] + (1.0 - args.dampening) * g };
            momentum_buf[i] = b;
            g = if args.nesterov { g + args.momentum * b } else { b };
        }
        params[i] = p - args.lr * g;
    }
    Ok(())
}

/// Hyperparameters of AdamW, as torch.optim.AdamW takes them (amsgrad off).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the gradient's running mean.
    pub beta1: f64,
    /// Decay of the squared gradient's running mean.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// torch.optim.AdamW's defaults.
    fn default() -> AdamWConfig {
        AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

impl AdamWConfig {
    /// The kernel's float arguments for step number `step` (1 for the first step), computed in double precision
    /// as PyTorch computes them from Python floats.
    pub fn args(&self, step: u64) -> Result<AdamWArgs, CudaError> {
        if step == 0 {
            return Err(CudaError::Shape("AdamW steps are counted from 1; step 0 has no bias correction".into()));
        }
        let valid = self.lr.is_finite()
            && self.lr >= 0.0
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps.is_finite()
            && self.eps >= 0.0
            && self.weight_decay.is_finite()
            && self.weight_decay >= 0.0;
        if !valid {
            return Err(CudaError::Shape(format!(
                "AdamW needs lr >= 0, 0 <= beta1, beta2 < 1, eps >= 0 and weight_decay >= 0 (got {self:?})"
            )));
        }
        let exponent = i32::try_from(step).unwrap_or(i32::MAX);
        let bias_correction1 = 1.0 - self.beta1.powi(exponent);
        let bias_correction2 = 1.0 - self.beta2.powi(exponent);
        Ok(AdamWArgs {
            decay: (1.0 - self.lr * self.weight_decay) as f32,
            one_minus_beta1: (1.0 - self.beta1) as f32,
            beta2: self.beta2 as f32,
            one_minus_beta2: (1.0 - self.beta2) as f32,
            eps: self.eps as f32,
            step_size: (self.lr / bias_correction1) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
        })
    }
}

/// The scalar arguments of `hytrain_adamw`, in its order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWArgs {
    /// `1 - lr * weight_decay`.
    pub decay: f32,
    /// `1 - beta1`, the weight of torch.lerp.
    pub one_minus_beta1: f32,
    /// `beta2`.
    pub beta2: f32,
    /// `1 - beta2`.
    pub one_minus_beta2: f32,
    /// `eps`.
    pub eps: f32,
    /// `lr / (1 - beta1^step)`.
    pub step_size: f32,
    /// `sqrt(1 - beta2^step)`.
    pub bias_correction2_sqrt: f32,
}

/// `hytrain_adamw`: one AdamW step over a flat bucket, updating both moment buffers in place.
pub fn adamw_step(
    args: &AdamWArgs,
    params: &mut [f32],
    grads: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
) -> Result<(), CudaError> {
    same_lengths(
        "AdamW",
        &[
            ("params", params.len()),
            ("grads", grads.len()),
            ("exp_avg", exp_avg.len()),
            ("exp_avg_sq", exp_avg_sq.len()),
        ],
    )?;
    for i in 0..params.len() {
        let g = grads[i];
        let p = params[i] * args.decay;
        let mut m = exp_avg[i];
        // torch.lerp's two forms, chosen by the weight as it chooses them.
        if args.one_minus_beta1.abs() < 0.5 {
            m += args.one_minus_beta1 * (g - m);
        } else {
            m = g - (g - m) * (1.0 - args.one_minus_beta1);
        }
        let v = exp_avg_sq[i] * args.beta2 + args.one_minus_beta2 * g * g;
        let denom = v.sqrt() / args.bias_correction2_sqrt + args.eps;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        params[i] = p - args.step_size * (m / denom);
    }
    Ok(())
}

fn same_lengths(what: &str, buffers: &[(&str, usize)]) -> Result<(), CudaError> {
    let (first, len) = buffers[0];
    if let Some((name, other)) = buffers.iter().find(|(_, l)| *l != len) {
        return Err(CudaError::Shape(format!(
            "{what} buffers differ in length: {first} has {len} elements, {name} has {other}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tensors(lengths: &[usize], seed: u32) -> Vec<Vec<f32>> {
        lengths
            .iter()
            .enumerate()
            .map(|(t, &len)| {
                (0..len).map(|i| ((seed as f32 + t as f32 * 31.0 + i as f32 * 0.37).sin()) * 3.0).collect()
            })
            .collect()
    }

    proptest! {
        #[test]
        fn pack_equals_concatenating_each_tensor_scaled(
            lengths in proptest::collection::vec(0usize..40, 0..12),
            scale in -4.0f32..4.0,
            seed in 0u32..1000,
        ) {
            let grads = tensors(&lengths, seed);
            let layout = BucketLayout::new(lengths.iter().copied());
            let mut bucket = vec![f32::NAN; layout.len()];
            let views: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
            pack(&layout, &views, scale, &mut bucket).unwrap();
            let mut expected = Vec::new();
            for g in &grads {
                for x in g {
                    expected.push(x * scale);
                }
            }
            prop_assert_eq!(bucket, expected);
        }

        #[test]
        fn unpack_writes_each_tensor_its_own_scaled_slice(
            lengths in proptest::collection::vec(0usize..40, 0..12),
            scale in -4.0f32..4.0,
            seed in 0u32..1000,
        ) {
            let layout = BucketLayout::new(lengths.iter().copied());
            let bucket: Vec<f32> = (0..layout.len()).map(|i| (i as f32 + seed as f32).cos()).collect();
            let mut grads: Vec<Vec<f32>> = lengths.iter().map(|&l| vec![f32::NAN; l]).collect();
            let mut views: Vec<&mut [f32]> = grads.iter_mut().map(Vec::as_mut_slice).collect();
            unpack(&layout, &bucket, scale, &mut views).unwrap();
            let mut start = 0;
            for (t, g) in grads.iter().enumerate() {
                let expected: Vec<f32> = bucket[start..start + lengths[t]].iter().map(|x| x * scale).collect();
                prop_assert_eq!(g, &expected);
                start += lengths[t];
            }
        }

        #[test]
        fn the_binary_search_finds_the_tensor_a_linear_scan_finds(
            lengths in proptest::collection::vec(0usize..6, 1..20),
        ) {
            let layout = BucketLayout::new(lengths.iter().copied());
            for i in 0..layout.len() {
                let linear = (0..layout.tensors()).find(|&t| layout.range(t).contains(&i)).unwrap();
                prop_assert_eq!(layout.tensor_of(i), linear);
            }
        }
    }

    #[test]
    fn pack_and_unpack_refuse_tensors_that_do_not_fit_the_layout() {
        let layout = BucketLayout::new([2, 3]);
        let (a, b) = ([1.0f32; 2], [1.0f32; 4]);
        let mut bucket = [0.0f32; 5];
        let error = pack(&layout, &[&a, &b], 1.0, &mut bucket).unwrap_err().to_string();
        assert_eq!(error, "tensor 1 has 4 elements but the bucket layout gives it 3");
        let error = pack(&layout, &[&a], 1.0, &mut bucket).unwrap_err().to_string();
        assert_eq!(error, "the bucket layout has 2 tensors but 1 were given");
        let short = [0.0f32; 4];
        let (mut x, mut y) = ([0.0f32; 2], [0.0f32; 3]);
        let error = unpack(&layout, &short, 1.0, &mut [&mut x, &mut y]).unwrap_err().to_string();
        assert_eq!(error, "the bucket has 4 elements but its layout needs 5");
    }

    /// torch.optim.SGD as its documentation writes it, per tensor, in double precision.
    fn sgd_per_tensor(
        cfg: &SgdConfig,
        steps: usize,
        params: &mut [Vec<f64>],
        grads_at: impl Fn(usize, usize, usize) -> f64,
    ) {
        let mut bufs: Vec<Vec<f64>> = params.iter().map(|p| vec![0.0; p.len()]).collect();
        for step in 0..steps {
            for (t, p) in params.iter_mut().enumerate() {
                for i in 0..p.len() {
                    let mut g = grads_at(step, t, i) + cfg.weight_decay * p[i];
                    if cfg.momentum != 0.0 {
                        bufs[t][i] = if step == 0 { g } else { cfg.momentum * bufs[t][i] + (1.0 - cfg.dampening) * g };
                        g = if cfg.nesterov { g + cfg.momentum * bufs[t][i] } else { bufs[t][i] };
                    }
                    p[i] -= cfg.lr * g;
                }
            }
        }
    }

    fn grad_at(step: usize, t: usize, i: usize) -> f64 {
        ((step * 7 + t * 13 + i) as f64 * 0.61).sin()
    }

    fn assert_close(flat: &[f32], per_tensor: &[Vec<f64>], tolerance: f64) {
        let expected: Vec<f64> = per_tensor.iter().flatten().copied().collect();
        assert_eq!(flat.len(), expected.len());
        for (i, (a, b)) in flat.iter().zip(&expected).enumerate() {
            let error = (*a as f64 - b).abs() / b.abs().max(1e-3);
            assert!(error < tolerance, "element {i}: flat {a} per tensor {b}");
        }
    }

    #[test]
    fn sgd_over_a_flat_bucket_matches_torch_sgd_per_tensor_for_every_variant() {
        let lengths = [3usize, 0, 17, 5];
        let start: Vec<Vec<f64>> = lengths
            .iter()
            .enumerate()
            .map(|(t, &l)| (0..l).map(|i| 1.0 + (t * 3 + i) as f64 * 0.1).collect())
            .collect();
        let variants =
            [(0.0, 0.0, 0.0, false), (0.9, 0.0, 0.0, false), (0.9, 0.1, 1e-4, false), (0.9, 0.0, 5e-4, true)];
        for (momentum, dampening, weight_decay, nesterov) in variants {
            let cfg = SgdConfig { lr: 0.05, momentum, dampening, weight_decay, nesterov };
            let layout = BucketLayout::new(lengths);
            let mut params: Vec<f32> = start.iter().flatten().map(|&x| x as f32).collect();
            let mut buf = vec![0.0f32; layout.len()];
            for step in 0..6 {
                let grads: Vec<f32> = (0..layout.len())
                    .map(|i| {
                        let t = layout.tensor_of(i);
                        grad_at(step, t, i - layout.offsets()[t]) as f32
                    })
                    .collect();
                sgd_momentum_step(&cfg.args(step == 0).unwrap(), &mut params, &grads, &mut buf).unwrap();
            }
            let mut expected = start.clone();
            sgd_per_tensor(&cfg, 6, &mut expected, grad_at);
            assert_close(&params, &expected, 1e-5);
        }
    }

    /// torch.optim.AdamW as its documentation writes it, per tensor, in double precision.
    fn adamw_per_tensor(cfg: &AdamWConfig, steps: usize, params: &mut [Vec<f64>]) {
        let mut m: Vec<Vec<f64>> = params.iter().map(|p| vec![0.0; p.len()]).collect();
        let mut v = m.clone();
        for step in 1..=steps {
            for (t, p) in params.iter_mut().enumerate() {
                for i in 0..p.len() {
                    let g = grad_at(step - 1, t, i);
                    p[i] -= cfg.lr * cfg.weight_decay * p[i];
                    m[t][i] = cfg.beta1 * m[t][i] + (1.0 - cfg.beta1) * g;
                    v[t][i] = cfg.beta2 * v[t][i] + (1.0 - cfg.beta2) * g * g;
                    let m_hat = m[t][i] / (1.0 - cfg.beta1.powi(step as i32));
                    let v_hat = v[t][i] / (1.0 - cfg.beta2.powi(step as i32));
                    p[i] -= cfg.lr * m_hat / (v_hat.sqrt() + cfg.eps);
                }
            }
        }
    }

    #[test]
    fn adamw_over_a_flat_bucket_matches_torch_adamw_per_tensor() {
        let lengths = [4usize, 9, 0, 2];
        let start: Vec<Vec<f64>> = lengths
            .iter()
            .enumerate()
            .map(|(t, &l)| (0..l).map(|i| 0.5 - (t * 5 + i) as f64 * 0.07).collect())
            .collect();
        // The defaults, and a beta1 below 0.5, which takes torch.lerp's other form.
        for cfg in
            [AdamWConfig::default(), AdamWConfig { lr: 3e-3, beta1: 0.3, beta2: 0.99, eps: 1e-6, weight_decay: 0.1 }]
        {
            let layout = BucketLayout::new(lengths);
            let mut params: Vec<f32> = start.iter().flatten().map(|&x| x as f32).collect();
            let mut exp_avg = vec![0.0f32; layout.len()];
            let mut exp_avg_sq = vec![0.0f32; layout.len()];
            for step in 1..=8u64 {
                let grads: Vec<f32> = (0..layout.len())
                    .map(|i| {
                        let t = layout.tensor_of(i);
                        grad_at(step as usize - 1, t, i - layout.offsets()[t]) as f32
                    })
                    .collect();
                adamw_step(&cfg.args(step).unwrap(), &mut params, &grads, &mut exp_avg, &mut exp_avg_sq).unwrap();
            }
            let mut expected = start.clone();
            adamw_per_tensor(&cfg, 8, &mut expected);
            assert_close(&params, &expected, 1e-5);
        }
    }

    #[test]
    fn optimizer_steps_refuse_buffers_of_different_lengths_and_bad_hyperparameters() {
        let args = AdamWConfig::default().args(1).unwrap();
        let error = adamw_step(&args, &mut [0.0; 3], &[0.0; 3], &mut [0.0; 2], &mut [0.0; 3]).unwrap_err().to_string();
        assert_eq!(error, "AdamW buffers differ in length: params has 3 elements, exp_avg has 2");
        let sgd = SgdConfig { lr: 0.1, momentum: 0.9, dampening: 0.0, weight_decay: 0.0, nesterov: false };
        let error = sgd_momentum_step(&sgd.args(true).unwrap(), &mut [0.0; 2], &[0.0; 3], &mut [0.0; 2])
            .unwrap_err()
            .to_string();
        assert_eq!(error, "SGD buffers differ in length: params has 2 elements, grads has 3");
        let nesterov = SgdConfig { nesterov: true, dampening: 0.1, ..sgd };
        assert!(nesterov
            .args(false)
            .unwrap_err()
            .to_string()
            .starts_with("Nesterov momentum needs momentum > 0 and dampening 0"));
        assert!(AdamWConfig::default().args(0).unwrap_err().to_string().contains("counted from 1"));
        let bad = AdamWConfig { beta2: 1.0, ..AdamWConfig::default() };
        assert!(bad.args(1).unwrap_err().to_string().starts_with("AdamW needs"));
        let negative = SgdConfig { lr: -1.0, ..sgd };
        assert!(negative.args(true).unwrap_err().to_string().starts_with("SGD needs"));
    }
}
