//! RMSNorm over rows in a model's dtype, computed as candle's (and so as the engine's fused norm
//! on quantized paths) does — each row's squares summed in order in f32, the root rounded to the
//! dtype, then each value divided by it and multiplied by the weight, each step rounded to the
//! dtype — with the per-value steps on vector registers (f32 and bf16; f16 rounds through
//! `half` value by value) and the rows split over the pool. candle's rounds each value in
//! software, a call per operation: ~6% of a bf16 prefill.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::Element;

/// A dtype the norm computes in: how an f32 result is rounded to it (returned as f32).
pub trait Rounding: Element {
    /// `v` rounded to this type, as f32.
    fn round(v: f32) -> f32;
    /// `v` (already a value of this type) stored as it.
    fn store(v: f32) -> Self;
}

impl Rounding for f32 {
    #[inline(always)]
    fn round(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    fn store(v: f32) -> Self {
        v
    }
}

impl Rounding for bf16 {
    #[inline(always)]
    fn round(v: f32) -> f32 {
        f32::from_bits(u32::from(crate::convert::bf16_bits(v)) << 16)
    }
    #[inline(always)]
    fn store(v: f32) -> Self {
        bf16::from_bits((v.to_bits() >> 16) as u16)
    }
}

impl Rounding for f16 {
    #[inline(always)]
    fn round(v: f32) -> f32 {
        f16::from_f32(v).to_f32()
    }
    #[inline(always)]
    fn store(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// `out = x / round(√(Σx²/k + eps)) · weight` for every row of `k` values of `x`, rounded as
/// above; `weight` is the norm's weight widened to f32 (exact: it is stored in `T`).
///
/// # Panics
/// When `weight` is not `k` wide (`k` = its length) or `x` and `out` are not whole rows of it.
pub fn rms_norm<T: Rounding>(x: &[T], weight: &[f32], eps: f32, out: &mut [T]) {
    let k = weight.len();
    assert!(
        k > 0 && x.len().is_multiple_of(k) && out.len() == x.len(),
        "{} values into {} are not rows of {k}",
        x.len(),
        out.len()
    );
    out.par_chunks_mut(k)
        .zip(x.par_chunks(k))
        .for_each(|(o, x)| row(x, weight, eps, o));
}

/// One row, at the widest level the CPU allows.
fn row<T: Rounding>(x: &[T], weight: &[f32], eps: f32, out: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx512() {
        // SAFETY: the level says the CPU has AVX-512F.
        return unsafe { row_avx512(x, weight, eps, out) };
    }
    normed(x, weight, eps, out)
}

/// [`normed`] on 16 values per instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_avx512<T: Rounding>(x: &[T], weight: &[f32], eps: f32, out: &mut [T]) {
    normed(x, weight, eps, out)
}

#[inline(always)]
fn normed<T: Rounding>(x: &[T], weight: &[f32], eps: f32, out: &mut [T]) {
    let mut wide = [0f32; 256];
    let mut sum2 = 0f32;
    for chunk in x.chunks(wide.len()) {
        let wide = &mut wide[..chunk.len()];
        T::widen(chunk, wide);
        sum2 = add_squares(sum2, wide);
    }
    let m = divisor(sum2, x.len(), eps, T::round);
    for ((o, x), w) in out
        .chunks_mut(wide.len())
        .zip(x.chunks(wide.len()))
        .zip(weight.chunks(wide.len()))
    {
        let wide = &mut wide[..x.len()];
        T::widen(x, wide);
        for ((o, &v), &w) in o.iter_mut().zip(wide.iter()).zip(w) {
            *o = T::store(value(v, m, w, T::round));
        }
    }
}

/// `sum2` plus the squares of `x`, in order, one value after another, as candle's row sums: the
/// same sum to the bit (this norm's and the fused one on quantized paths, `quant::rows`).
#[inline(always)]
pub(crate) fn add_squares(sum2: f32, x: &[f32]) -> f32 {
    x.iter().fold(sum2, |s, v| s + v * v)
}

/// What a row of `k` values whose squares sum to `sum2` is divided by: `round(√(sum2/k + eps))`.
#[inline(always)]
pub(crate) fn divisor(sum2: f32, k: usize, eps: f32, round: impl Fn(f32) -> f32) -> f32 {
    round((sum2 / k as f32 + eps).sqrt())
}

/// One value normalized by the divisor `m` and scaled by its weight `w`, each step rounded:
/// `round(round(v / m) · w)`.
#[inline(always)]
pub(crate) fn value(v: f32, m: f32, w: f32, round: impl Fn(f32) -> f32) -> f32 {
    round(round(v / m) * w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::data;

    /// candle's row, written out as it computes: the reference for every dtype.
    fn candle_row<T: Rounding>(x: &[T], weight: &[f32], eps: f32, to: fn(T) -> f32) -> Vec<f32> {
        let sum2: f32 = x.iter().map(|&v| to(v) * to(v)).sum();
        let m = T::round((sum2 / x.len() as f32 + eps).sqrt());
        x.iter()
            .zip(weight)
            .map(|(&v, &w)| T::round(T::round(to(v) / m) * w))
            .collect()
    }

    fn check<T: Rounding + PartialEq + std::fmt::Debug>(from: fn(f32) -> T, to: fn(T) -> f32) {
        for (rows, k) in [(1, 8), (3, 300), (40, 128), (5, 1024)] {
            let x: Vec<T> = data(rows * k, 1)
                .into_iter()
                .map(|v| from(v * 3.0))
                .collect();
            let weight: Vec<f32> = data(k, 2).into_iter().map(|v| to(from(v + 1.0))).collect();
            let mut out = vec![from(0.0); rows * k];
            rms_norm(&x, &weight, 1e-6, &mut out);
            for (r, (x, o)) in x.chunks(k).zip(out.chunks(k)).enumerate() {
                let want = candle_row(x, &weight, 1e-6, to);
                let got: Vec<f32> = o.iter().map(|&v| to(v)).collect();
                assert_eq!(got, want, "{rows} rows of {k}, row {r}");
            }
        }
    }

    #[test]
    fn rows_are_normed_as_candle_does_in_every_dtype() {
        check(bf16::from_f32, bf16::to_f32);
        check(f16::from_f32, f16::to_f32);
        check(|v| v, |v| v);
    }
}
