//! Element-wise reductions over several ranks' slices, written as plain loops over fixed-size blocks so that the
//! compiler vectorizes them (checked by `cargo bench --bench allreduce`, which reports the shared-memory busbw).

use bytemuck::Pod;
use half::bf16;

/// Elements per block: the accumulator stays in L1 while every source slice is added into it.
const BLOCK: usize = 1024;

/// An element type the shared-memory allreduce can sum: summed in `Acc`, rounded to `Self` once.
pub(crate) trait Elem: Pod + Send + Sync {
    /// The accumulator type.
    type Acc: Copy + Default + std::ops::Add<Output = Self::Acc> + std::ops::Div<Output = Self::Acc>;
    /// Converts to the accumulator.
    fn widen(self) -> Self::Acc;
    /// Rounds the accumulator back.
    fn narrow(a: Self::Acc) -> Self;
    /// `n` as an accumulator value, to divide by for an average.
    fn count(n: usize) -> Self::Acc;
}

impl Elem for f32 {
    type Acc = f32;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow(a: f32) -> f32 {
        a
    }
    fn count(n: usize) -> f32 {
        n as f32
    }
}

impl Elem for f64 {
    type Acc = f64;
    #[inline(always)]
    fn widen(self) -> f64 {
        self
    }
    #[inline(always)]
    fn narrow(a: f64) -> f64 {
        a
    }
    fn count(n: usize) -> f64 {
        n as f64
    }
}

impl Elem for bf16 {
    type Acc = f32;
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    /// Round to nearest even, as `half::bf16::from_f32`, but branch-free enough to vectorize.
    #[inline(always)]
    fn narrow(a: f32) -> bf16 {
        let b = a.to_bits();
        let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
        let nan = ((b >> 16) | 0x40) as u16;
        bf16::from_bits(if a.is_nan() { nan } else { rounded })
    }
    fn count(n: usize) -> f32 {
        n as f32
    }
}

/// `inout[i]` becomes the sum over the node's ranks of their values, added in rank order: `others[..at]` (ranks
/// below this one), then `inout` (this rank's), then `others[at..]`, so whichever rank reduces an element, and in
/// whichever collective, it gets the same bits. Divided by `avg_over` when given; the result is also written to
/// `copy` when given. Every slice has `inout`'s length.
pub(crate) fn sum_into<T: Elem>(
    inout: &mut [T],
    others: &[&[T]],
    at: usize,
    mut copy: Option<&mut [T]>,
    avg_over: Option<usize>,
) {
    let n = inout.len();
    debug_assert!(others.iter().all(|o| o.len() == n) && at <= others.len());
    let div = avg_over.map(T::count);
    let mut acc = [T::Acc::default(); BLOCK];
    let mut start = 0;
    while start < n {
        let len = BLOCK.min(n - start);
        let acc = &mut acc[..len];
        let block = &mut inout[start..start + len];
        let (below, above) = others.split_at(at);
        let mut sources = below.iter().map(|o| &o[start..start + len]);
        match sources.next() {
            Some(first) => {
                for (a, x) in acc.iter_mut().zip(first) {
                    *a = x.widen();
                }
                for o in sources {
                    for (a, x) in acc.iter_mut().zip(o) {
                        *a = *a + x.widen();
                    }
                }
                for (a, m) in acc.iter_mut().zip(block.iter()) {
                    *a = *a + m.widen();
                }
            }
            None => {
                for (a, m) in acc.iter_mut().zip(block.iter()) {
                    *a = m.widen();
                }
            }
        }
        for o in above {
            for (a, x) in acc.iter_mut().zip(&o[start..start + len]) {
                *a = *a + x.widen();
            }
        }
        if let Some(d) = div {
            for a in acc.iter_mut() {
                *a = *a / d;
            }
        }
        for (o, a) in block.iter_mut().zip(acc.iter()) {
            *o = T::narrow(*a);
        }
        if let Some(c) = copy.as_deref_mut() {
            c[start..start + len].copy_from_slice(block);
        }
        start += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn bf16_rounding_matches_the_half_crate(bits in any::<u32>()) {
            let x = f32::from_bits(bits);
            let ours = <bf16 as Elem>::narrow(x);
            let theirs = bf16::from_f32(x);
            if x.is_nan() {
                prop_assert!(ours.is_nan());
            } else {
                prop_assert_eq!(ours.to_bits(), theirs.to_bits());
            }
            prop_assert_eq!(<bf16 as Elem>::widen(theirs).to_bits(), theirs.to_f32().to_bits());
        }
    }

    #[test]
    fn sums_and_averages_span_block_boundaries() {
        let n = BLOCK * 2 + 3;
        let a: Vec<f64> = (0..n).map(|i| i as f64).collect();
        let b: Vec<f64> = (0..n).map(|i| 2.0 * i as f64).collect();
        let c: Vec<f64> = (0..n).map(|_| 3.0).collect();
        let mut out = a.clone();
        let mut copy = vec![0.0; n];
        sum_into(&mut out, &[&b, &c], 0, Some(&mut copy), Some(3));
        for (i, v) in out.iter().enumerate() {
            assert_eq!(*v, (3.0 * i as f64 + 3.0) / 3.0);
        }
        assert_eq!(out, copy);
    }

    proptest! {
        #[test]
        fn every_rank_adds_in_rank_order_whichever_owns_the_element(
            values in proptest::collection::vec(proptest::collection::vec(-1e6f32..1e6, 5), 1..6),
        ) {
            // Sums of arbitrary floats are not associative, so only one order gives the reference's bits.
            let reference: Vec<f32> = (0..5).map(|i| values[1..].iter().fold(values[0][i], |a, v| a + v[i])).collect();
            for at in 0..values.len() {
                let mut mine = values[at].clone();
                let others: Vec<&[f32]> =
                    values.iter().enumerate().filter(|(r, _)| *r != at).map(|(_, v)| v.as_slice()).collect();
                sum_into(&mut mine, &others, at, None, None);
                prop_assert_eq!(&mine, &reference);
            }
        }
    }
}
