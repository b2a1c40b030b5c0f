//! Pooling for the built-in models, through the shim's 2x2 max-pool kernel (`csrc/max_pool.cpp`).

use std::ffi::{c_char, c_int, c_void};

use tch::{TchError, Tensor};

use crate::shim::{handle, shim};

extern "C" {
    fn hyt_max_pool_2x2(input: *mut c_void, out: *mut *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
}

/// `max_pool2d` with a 2x2 window and stride 2 (no padding, floor mode), equal to tch's `max_pool2d([2, 2], [2, 2],
/// [0, 0], [1, 1], false)` bit for bit, gradients included. Contiguous float32 CPU inputs in training take a
/// dedicated kernel; every other input takes libtorch's generic one.
pub fn max_pool_2x2(xs: &Tensor) -> Result<Tensor, TchError> {
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: `xs` is a live tensor borrowed for the call, which keeps no reference to it.
    shim(|err, err_len| unsafe { hyt_max_pool_2x2(handle(xs), &mut out, err, err_len) })?;
    // SAFETY: on success the shim stored a new `torch::Tensor*` in `out`, whose ownership `from_ptr` takes.
    Ok(unsafe { Tensor::from_ptr(out as *mut _) })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tch::{Device, Kind, Tensor};

    use super::*;

    fn generic(xs: &Tensor) -> Tensor {
        xs.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v = Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().flatten(0, -1)).unwrap();
        v.into_iter().map(f32::to_bits).collect()
    }

    /// Output and input gradient of `pool` for `x`, with `upstream` as the output's gradient.
    fn run(pool: impl Fn(&Tensor) -> Tensor, x: &Tensor, upstream: &Tensor) -> (Vec<u32>, Vec<u32>) {
        let x = x.detach().set_requires_grad(true);
        let y = pool(&x);
        (&y * upstream).sum(Kind::Float).backward();
        (bits(&y), bits(&x.grad()))
    }

    /// Values with many ties (small integers, ReLU's zeros) and the odd NaN and infinity.
    fn plane_values(len: usize) -> impl Strategy<Value = Vec<f32>> {
        let value = prop_oneof![
            20 => (-3i32..4).prop_map(|v| v.max(0) as f32),
            4 => -3.0f32..3.0,
            1 => Just(f32::NAN),
            1 => Just(f32::INFINITY),
            1 => Just(f32::NEG_INFINITY),
        ];
        proptest::collection::vec(value, len)
    }

    fn input() -> impl Strategy<Value = (Vec<i64>, Vec<f32>)> {
        (1i64..4, 1i64..5, 2i64..12, 2i64..12).prop_flat_map(|(n, c, h, w)| {
            let len = (n * c * h * w) as usize;
            (Just(vec![n, c, h, w]), plane_values(len))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn the_kernel_equals_libtorchs_max_pool_bit_for_bit_with_gradients((shape, values) in input()) {
            let x = Tensor::from_slice(&values).view(shape.as_slice());
            let out_shape = [shape[0], shape[1], shape[2] / 2, shape[3] / 2];
            let upstream = Tensor::randn(out_shape, (Kind::Float, Device::Cpu));
            let ours = run(|x| max_pool_2x2(x).unwrap(), &x, &upstream);
            let theirs = run(generic, &x, &upstream);
            prop_assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn inputs_off_the_fast_path_pool_as_libtorch_does() {
        let x = Tensor::randn([2, 3, 8, 6], (Kind::Float, Device::Cpu));
        let upstream = Tensor::randn([2, 3, 4, 3], (Kind::Float, Device::Cpu));
        // Without grad (validation, tracing), in double, channels-last, a non-contiguous view, 3-D.
        let without_grad = tch::no_grad(|| max_pool_2x2(&x).unwrap());
        assert_eq!(bits(&without_grad), bits(&generic(&x)));
        let double = x.to_kind(Kind::Double);
        assert_eq!(
            run(|x| max_pool_2x2(x).unwrap(), &double, &upstream.to_kind(Kind::Double)),
            run(generic, &double, &upstream.to_kind(Kind::Double))
        );
        let channels_last = x.contiguous().permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
        assert!(!channels_last.is_contiguous());
        assert_eq!(
            run(|x| max_pool_2x2(x).unwrap(), &channels_last, &upstream),
            run(generic, &channels_last, &upstream)
        );
        let three_d = x.get(0);
        assert_eq!(bits(&max_pool_2x2(&three_d).unwrap()), bits(&generic(&three_d)));
    }

    #[test]
    fn an_input_too_small_to_pool_is_an_error_not_a_crash() {
        let x = Tensor::randn([1, 1, 1, 5], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let e = max_pool_2x2(&x).unwrap_err().to_string();
        assert!(e.contains("too small"), "{e}");
    }
}
