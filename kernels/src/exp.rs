//! Exponentials over a row, for softmax: attention's scores and the logprobs' normalizer. A
//! decode step at depth takes one `exp` per cached position, head and layer, and libm's scalar
//! `expf` cost about a tenth of decode attention's time; the vector paths (AVX-512's 16 lanes,
//! AVX2's 8) evaluate them with the same range reduction and polynomial as Cephes' `expf`
//! (relative error below 2.4e-7, about 2 ulp), the portable path calls libm.

/// `row[i] = e^(row[i] − max)` for every entry; returns their sum (accumulated in f32). `max`
/// is the row's maximum, as softmax has it (a shifted entry above 88.37 gives +∞).
pub fn exp_shifted(row: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::has_avx512() {
            // SAFETY: the CPU has AVX-512F (checked above).
            return unsafe { wide::exp_shifted(row, max) };
        }
        if crate::simd::has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            return unsafe { avx2::exp_shifted(row, max) };
        }
    }
    let mut sum = 0.0;
    for x in row.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    sum
}

/// `Σ e^(values[i] − max)`, accumulated in f64 (a vocabulary's worth of terms keeps its
/// precision); `values` is left as it is, `max` is their maximum.
pub fn sum_exp(values: &[f32], max: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { avx2::sum_exp(values, max) };
    }
    values.iter().map(|&x| f64::from((x - max).exp())).sum()
}

/// `x / (1 + e^−x)` (SiLU, SwiGLU's gate) for every entry, in place, through the same
/// exponential: a prefill chunk takes one per intermediate value, layer and token.
pub fn silu(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::has_avx512() {
            // SAFETY: the CPU has AVX-512F (checked above).
            return unsafe { wide::silu(row) };
        }
        if crate::simd::has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            return unsafe { avx2::silu(row) };
        }
    }
    for x in row.iter_mut() {
        *x /= 1.0 + (-*x).exp();
    }
}

/// GELU's tanh approximation (`gelu_pytorch_tanh`, candle's `gelu`) for every entry, in place:
/// `½x(1 + tanh u)` with `u = √(2/π)(x + 0.044715x³)`, computed as `x / (1 + e^(−2u))` (the same
/// value; `½(1 + tanh u)` is the logistic of `2u`) through the same exponential. A vision tower
/// takes one per MLP value, block and patch: through libm's `tanhf`, one value at a time on one
/// thread, that was a tenth of a 1280 × 720 image's encoding.
pub fn gelu_tanh(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::has_avx512() {
            // SAFETY: the CPU has AVX-512F (checked above).
            return unsafe { wide::gelu_tanh(row) };
        }
        if crate::simd::has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            return unsafe { avx2::gelu_tanh(row) };
        }
    }
    for x in row.iter_mut() {
        *x /= 1.0 + (-2.0 * GELU_SCALE * (*x + GELU_CUBIC * *x * *x * *x)).exp();
    }
}

/// √(2/π), GELU's tanh approximation's scale.
const GELU_SCALE: f32 = 0.797_884_6;
/// The approximation's cubic coefficient.
const GELU_CUBIC: f32 = 0.044_715;

/// The exponential and the maps through it once, over a register type ([`lanes::Lanes`]), each
/// instantiated inside a `#[target_feature]` entry point (`avx2`, `wide`).
#[cfg(target_arch = "x86_64")]
mod lanes {
    use std::arch::x86_64::*;

    use crate::simd::vector::Vector;

    /// About ln of the smallest normal f32: below, the power of two below would underflow.
    const LOWEST: f32 = -87.336_55;
    /// The largest input whose `n` (127) still makes a finite power of two; above, +∞ (libm's
    /// is finite up to 88.72, but softmax never gets there: its inputs are at most 0).
    const HIGHEST: f32 = 88.376_26;

    /// What the exponential needs of a register beyond [`Vector`]. Every method requires the
    /// register's instruction set, as `Vector`'s do.
    pub(super) trait Lanes: Vector {
        unsafe fn sub(a: Self, b: Self) -> Self;
        unsafe fn mul(a: Self, b: Self) -> Self;
        unsafe fn div(a: Self, b: Self) -> Self;
        /// `c − a·b`, fused.
        unsafe fn fnma(a: Self, b: Self, c: Self) -> Self;
        /// Lane-wise minimum; a NaN in `b` is kept.
        unsafe fn min(a: Self, b: Self) -> Self;
        /// Lane-wise maximum; a NaN in `b` is kept.
        unsafe fn max(a: Self, b: Self) -> Self;
        /// Each lane to the nearest integer, ties to even.
        unsafe fn round(self) -> Self;
        /// `e_r · 2^n` for integer-valued `n` in [−126, 127], built in the exponent bits.
        unsafe fn scale2(e_r: Self, n: Self) -> Self;
        /// `e`, but 0 where `given` is below [`LOWEST`] and +∞ where it is above [`HIGHEST`]
        /// (a NaN passes).
        unsafe fn ends(e: Self, given: Self) -> Self;
    }

    // SAFETY (every method below): the caller has AVX2 and FMA.
    impl Lanes for __m256 {
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn div(a: Self, b: Self) -> Self {
            unsafe { _mm256_div_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn fnma(a: Self, b: Self, c: Self) -> Self {
            unsafe { _mm256_fnmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn min(a: Self, b: Self) -> Self {
            unsafe { _mm256_min_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn max(a: Self, b: Self) -> Self {
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn round(self) -> Self {
            unsafe { _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self) }
        }
        #[inline(always)]
        unsafe fn scale2(e_r: Self, n: Self) -> Self {
            unsafe {
                let biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
                _mm256_mul_ps(e_r, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased)))
            }
        }
        #[inline(always)]
        unsafe fn ends(e: Self, given: Self) -> Self {
            unsafe {
                let kept = _mm256_cmp_ps::<_CMP_NLT_UQ>(given, _mm256_set1_ps(LOWEST));
                let e = _mm256_and_ps(e, kept);
                let over = _mm256_cmp_ps::<_CMP_GT_OQ>(given, _mm256_set1_ps(HIGHEST));
                _mm256_blendv_ps(e, _mm256_set1_ps(f32::INFINITY), over)
            }
        }
    }

    // SAFETY (every method below): the caller has AVX-512F.
    impl Lanes for __m512 {
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn div(a: Self, b: Self) -> Self {
            unsafe { _mm512_div_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn fnma(a: Self, b: Self, c: Self) -> Self {
            unsafe { _mm512_fnmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn min(a: Self, b: Self) -> Self {
            unsafe { _mm512_min_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn max(a: Self, b: Self) -> Self {
            unsafe { _mm512_max_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn round(self) -> Self {
            unsafe {
                _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self)
            }
        }
        #[inline(always)]
        unsafe fn scale2(e_r: Self, n: Self) -> Self {
            unsafe {
                let biased = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
                _mm512_mul_ps(e_r, _mm512_castsi512_ps(_mm512_slli_epi32::<23>(biased)))
            }
        }
        #[inline(always)]
        unsafe fn ends(e: Self, given: Self) -> Self {
            unsafe {
                let kept = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(given, _mm512_set1_ps(LOWEST));
                let e = _mm512_maskz_mov_ps(kept, e);
                let over = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(given, _mm512_set1_ps(HIGHEST));
                _mm512_mask_blend_ps(over, e, _mm512_set1_ps(f32::INFINITY))
            }
        }
    }

    /// `e^x` in each lane: `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, with ln 2 in two parts so `r` is
    /// exact; `e^r` by Cephes' degree-6 polynomial; `2^n` built in the exponent bits. A NaN
    /// stays NaN (the clamps keep their second operand's NaN); below the range it is 0.
    #[inline(always)]
    pub(super) unsafe fn exp<V: Lanes>(given: V) -> V {
        // SAFETY: the caller's instruction set.
        unsafe {
            let x = V::min(V::splat(HIGHEST), given);
            let x = V::max(V::splat(LOWEST), x);
            let n = V::mul(x, V::splat(std::f32::consts::LOG2_E)).round();
            let r = V::fnma(n, V::splat(0.693_359_4), x);
            let r = V::fnma(n, V::splat(-2.121_944_4e-4), r);
            let mut p = V::splat(1.987_569_1e-4);
            for c in [
                1.398_199_9e-3,
                8.333_452e-3,
                4.166_579_6e-2,
                0.166_666_65,
                0.5,
            ] {
                p = V::fma(p, r, V::splat(c));
            }
            let e_r = V::add(V::fma(p, V::mul(r, r), r), V::splat(1.0));
            // n ∈ [−126, 127] after the clamps: n + 127 is a valid biased exponent.
            V::ends(V::scale2(e_r, n), given)
        }
    }

    /// [`super::exp_shifted`] a register at a time; the tail through a zero-padded register.
    #[inline(always)]
    pub(super) unsafe fn exp_shifted<V: Lanes>(row: &mut [f32], max: f32) -> f32 {
        // SAFETY: the caller's instruction set; every load and store is of a whole chunk.
        unsafe {
            let shift = V::splat(max);
            let mut acc = V::zero();
            let mut chunks = row.chunks_exact_mut(V::LANES);
            for c in &mut chunks {
                let e = exp(V::sub(V::load(c.as_ptr()), shift));
                e.store(c.as_mut_ptr());
                acc = V::add(acc, e);
            }
            let tail = chunks.into_remainder();
            let mut sum = acc.sum();
            if !tail.is_empty() {
                let e = padded(tail, |x: V| exp(V::sub(x, shift)));
                tail.copy_from_slice(&e[..tail.len()]);
                sum += e[..tail.len()].iter().sum::<f32>();
            }
            sum
        }
    }

    /// `f` on every entry of `row`, in place, a register at a time.
    #[inline(always)]
    pub(super) unsafe fn map<V: Lanes>(row: &mut [f32], f: impl Fn(V) -> V) {
        // SAFETY: the caller's instruction set; every load and store is of a whole chunk.
        unsafe {
            let mut chunks = row.chunks_exact_mut(V::LANES);
            for c in &mut chunks {
                f(V::load(c.as_ptr())).store(c.as_mut_ptr());
            }
            let tail = chunks.into_remainder();
            if !tail.is_empty() {
                let done = padded(tail, f);
                tail.copy_from_slice(&done[..tail.len()]);
            }
        }
    }

    /// `x / (1 + e^−x)`.
    #[inline(always)]
    pub(super) unsafe fn silu<V: Lanes>(x: V) -> V {
        // SAFETY: the caller's instruction set.
        unsafe { V::div(x, V::add(V::splat(1.0), exp(V::sub(V::zero(), x)))) }
    }

    /// `x / (1 + e^(−2u))`, `u = √(2/π)(x + 0.044715x³)`.
    #[inline(always)]
    pub(super) unsafe fn gelu_tanh<V: Lanes>(x: V) -> V {
        // SAFETY: the caller's instruction set.
        unsafe {
            let x3 = V::mul(V::mul(x, x), x);
            let inner = V::fma(V::splat(super::GELU_CUBIC), x3, x);
            let minus_2u = V::mul(V::splat(-2.0 * super::GELU_SCALE), inner);
            V::div(x, V::add(V::splat(1.0), exp(minus_2u)))
        }
    }

    /// `f` on a tail shorter than a register, through a zero-padded copy; only the tail's first
    /// entries mean anything.
    #[inline(always)]
    pub(super) unsafe fn padded<V: Lanes>(tail: &[f32], f: impl Fn(V) -> V) -> [f32; 16] {
        let mut buf = [0f32; 16];
        buf[..tail.len()].copy_from_slice(tail);
        // SAFETY: `buf` holds 16 floats, at least a register's worth.
        unsafe { f(V::load(buf.as_ptr())).store(buf.as_mut_ptr()) };
        buf
    }
}

/// The AVX2 instances (8 lanes), and the f64 sum of exponentials.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::lanes::{self, exp, padded};

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_shifted(row: &mut [f32], max: f32) -> f32 {
        // SAFETY: this function's features.
        unsafe { lanes::exp_shifted::<__m256>(row, max) }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn silu(row: &mut [f32]) {
        // SAFETY: this function's features.
        unsafe { lanes::map::<__m256>(row, |x| lanes::silu(x)) }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn gelu_tanh(row: &mut [f32]) {
        // SAFETY: this function's features.
        unsafe { lanes::map::<__m256>(row, |x| lanes::gelu_tanh(x)) }
    }

    /// [`super::sum_exp`] eight lanes at a time, each vector of exponentials widened to f64
    /// before it is added.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn sum_exp(values: &[f32], max: f32) -> f64 {
        let shift = _mm256_set1_ps(max);
        let (mut lo, mut hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        let chunks = values.chunks_exact(8);
        let tail = chunks.remainder();
        for c in chunks {
            // SAFETY: `c` holds 8 floats; this function's features.
            let e = unsafe { exp(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), shift)) };
            lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
            hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(e)));
        }
        let mut lanes = [0f64; 4];
        // SAFETY: `lanes` holds 4 doubles.
        unsafe { _mm256_storeu_pd(lanes.as_mut_ptr(), _mm256_add_pd(lo, hi)) };
        // SAFETY: this function's features.
        let e = unsafe { padded(tail, |x: __m256| exp(_mm256_sub_ps(x, shift))) };
        let tail_sum: f64 = e[..tail.len()].iter().map(|&e| f64::from(e)).sum();
        lanes.iter().sum::<f64>() + tail_sum
    }
}

/// The AVX-512F instances (16 lanes).
#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::__m512;

    use super::lanes;

    #[target_feature(enable = "avx512f")]
    pub(super) fn exp_shifted(row: &mut [f32], max: f32) -> f32 {
        // SAFETY: this function's features.
        unsafe { lanes::exp_shifted::<__m512>(row, max) }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn silu(row: &mut [f32]) {
        // SAFETY: this function's features.
        unsafe { lanes::map::<__m512>(row, |x| lanes::silu(x)) }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn gelu_tanh(row: &mut [f32]) {
        // SAFETY: this function's features.
        unsafe { lanes::map::<__m512>(row, |x| lanes::gelu_tanh(x)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::data;

    /// Within a relative 2.4e-7 (about 2 ulp) of f64's exponential, for every length around the
    /// vector width, at whatever level `PIO_KERNELS` leaves (CI runs each).
    #[test]
    fn exponentials_and_their_sums_are_within_two_ulp() {
        for n in [0, 1, 7, 8, 9, 31, 100, 1031] {
            // Scores spread over [−40, 40] around a maximum; and a vocabulary-like spread.
            let values: Vec<f32> = data(n, 3).iter().map(|x| 40.0 * x).collect();
            let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exact: Vec<f64> = values
                .iter()
                // The shift is rounded to f32 on every path; the exponential is what is judged.
                .map(|&x| f64::from(x - max).exp())
                .collect();
            let mut row = values.clone();
            let sum = exp_shifted(&mut row, max);
            for (i, (&got, &want)) in row.iter().zip(&exact).enumerate() {
                let err = (f64::from(got) - want).abs();
                assert!(
                    err <= 2.4e-7 * want + 1e-38,
                    "n = {n}, i = {i}: {got} vs {want}"
                );
            }
            let total: f64 = exact.iter().sum();
            assert!(
                (f64::from(sum) - total).abs() <= 1e-6 * total.max(1e-30),
                "n = {n}"
            );
            let wide = sum_exp(&values, max);
            assert!((wide - total).abs() <= 2.4e-7 * total.max(1e-30), "n = {n}");
            assert_eq!(values.len(), row.len());
        }
    }

    /// SiLU within a relative 5e-7 of f64's (the exponential's 2 ulp and one division), for
    /// every length around the vector width; its ends as libm's: `x` far above 0, −0 far below,
    /// NaN kept.
    #[test]
    fn silu_matches_f64_and_keeps_its_ends() {
        for n in [0, 1, 7, 8, 9, 31, 1031] {
            let values: Vec<f32> = data(n, 5).iter().map(|x| 20.0 * x).collect();
            let mut row = values.clone();
            silu(&mut row);
            for (i, (&got, &x)) in row.iter().zip(&values).enumerate() {
                let x = f64::from(x);
                let want = x / (1.0 + (-x).exp());
                let err = (f64::from(got) - want).abs();
                assert!(
                    err <= 5e-7 * want.abs() + 1e-38,
                    "n = {n}, i = {i}: {got} vs {want}"
                );
            }
        }
        let mut ends = [100.0, -100.0, f32::NAN, 0.0, -1e-3, 88.5, -88.5, 1.0, 2.0];
        silu(&mut ends);
        assert_eq!(ends[0], 100.0);
        assert!(ends[1] <= 0.0 && ends[1] > -1e-30, "{}", ends[1]);
        assert!(ends[2].is_nan());
        assert_eq!(ends[3], 0.0);
        assert!((ends[4] / (-1e-3 / (1.0 + 1e-3f32.exp())) - 1.0).abs() < 3e-7);
        assert_eq!(ends[5], 88.5);
        assert!(ends[6] <= 0.0 && ends[6] > -1e-30, "{}", ends[6]);
    }

    /// GELU's tanh approximation close to its f64 value, for every
    /// length around the vector width: `2u`'s few ulp in f32 become its exponential's relative
    /// error times `|2u|`, so the bound is relative and grows with `|2u|` (f32's `1 + tanh u`
    /// would lose far more where `tanh u` nears −1). Its ends: `x` far above 0, −0 far below,
    /// NaN kept.
    #[test]
    fn gelu_tanh_matches_the_f64_formula() {
        for n in [0, 1, 7, 8, 9, 31, 1031] {
            let values: Vec<f32> = data(n, 7).iter().map(|x| 8.0 * x).collect();
            let mut row = values.clone();
            gelu_tanh(&mut row);
            for (i, (&got, &x)) in row.iter().zip(&values).enumerate() {
                let x = f64::from(x);
                let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
                // ½x(1 + tanh u), written so that f64 keeps its far negative tail.
                let want = x / (1.0 + (-2.0 * u).exp());
                let err = (f64::from(got) - want).abs();
                assert!(
                    err <= 3e-7 * (1.0 + 2.0 * u.abs()) * want.abs() + 1e-38,
                    "n = {n}, i = {i}: {got} vs {want}"
                );
            }
        }
        let mut ends = [
            1e3,
            -1e3,
            f32::NAN,
            0.0,
            1e20,
            -1e20,
            f32::INFINITY,
            20.0,
            -20.0,
        ];
        gelu_tanh(&mut ends);
        assert_eq!(ends[0], 1e3);
        assert!(ends[1] <= 0.0 && ends[1] > -1e-30, "{}", ends[1]);
        assert!(ends[2].is_nan());
        assert_eq!(ends[3], 0.0);
        assert_eq!(ends[4], 1e20);
        assert!(ends[5] <= 0.0 && ends[5] > -1e-30, "{}", ends[5]);
        assert_eq!(ends[6], f32::INFINITY);
        assert_eq!(ends[7], 20.0);
        assert!(ends[8] <= 0.0 && ends[8] > -1e-30, "{}", ends[8]);
    }

    #[test]
    fn the_ends_of_the_range_and_nan() {
        let mut row = [
            0.0,
            -1.0,
            -87.0,
            -100.0,
            -f32::INFINITY,
            88.0,
            f32::NAN,
            1.0,
            2.0,
        ];
        let _ = exp_shifted(&mut row, 0.0);
        assert_eq!(row[0], 1.0);
        assert!((row[1] - (-1f32).exp()).abs() < 1e-7);
        assert!(row[2] > 0.0 && (row[2] / (-87f32).exp() - 1.0).abs() < 1e-6);
        // Underflow: 0 (libm's may be subnormal), never negative or NaN.
        assert!((0.0..=f32::MIN_POSITIVE).contains(&row[3]));
        assert_eq!(row[4], 0.0, "a masked score weighs nothing");
        assert!(row[5].is_finite() && (row[5] / 88f32.exp() - 1.0).abs() < 1e-6);
        assert!(row[6].is_nan(), "a NaN score stays visible");
        assert!((row[7] / 1f32.exp() - 1.0).abs() < 3e-7);
        assert!((row[8] / 2f32.exp() - 1.0).abs() < 3e-7);
        // The top of the range: finite up to 88.37 on every path, +∞ well past it.
        let mut top = [
            88.37,
            88.0,
            89.0,
            100.0,
            f32::INFINITY,
            0.0,
            0.0,
            0.0,
            88.37,
        ];
        let _ = exp_shifted(&mut top, 0.0);
        for i in [0, 1, 8] {
            assert!(top[i].is_finite() && top[i] > 1e38, "{i}: {}", top[i]);
        }
        assert!(top[2..5].iter().all(|&e| e == f32::INFINITY), "{top:?}");
        assert!(sum_exp(&[0.0, f32::NAN], 0.0).is_nan());
    }
}
