//! Rows of the 8-bit KV cache: a row of `d` values is `d` signed bytes followed by one
//! little-endian f16 scale per group of [`GROUP`] values (one group for the whole row when `d`
//! is not a multiple of it), rounded as ggml's Q8_0 is — scale `max|x| / 127`, each value
//! rounded to the nearest step. It is Q8_0's 8.5 bits per value with the bytes of a row kept
//! together, so a row's leading values (MLA reads the latent part of its cached rows) are a
//! prefix of its bytes.
//!
//! Attention reads the rows by widening them to f32 in cache-sized runs and handing those to the
//! f32 kernels: the cache's traffic halves against bf16, the arithmetic stays as tested.

use half::f16;

/// Values per scale.
pub const GROUP: usize = 32;

/// Values sharing one scale in a row of `d`.
pub fn group(d: usize) -> usize {
    if d.is_multiple_of(GROUP) {
        GROUP
    } else {
        d.max(1)
    }
}

/// Bytes a row of `d` values takes.
pub fn row_bytes(d: usize) -> usize {
    d + 2 * d.div_ceil(group(d))
}

/// `x` rounded into one row (`out` is [`row_bytes`]`(x.len())` long). NaN and infinite values
/// give a NaN scale, so a broken activation stays visible instead of being clamped away.
///
/// # Panics
/// When `out` is not one row of `x.len()` values (a caller bug).
pub fn quantize_row(x: &[f32], out: &mut [u8]) {
    let d = x.len();
    assert_eq!(out.len(), row_bytes(d), "a row of {d} values");
    let (values, scales) = out.split_at_mut(d);
    for (x, (q, s)) in x
        .chunks(group(d))
        .zip(values.chunks_mut(group(d)).zip(scales.chunks_exact_mut(2)))
    {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let broken = x.iter().any(|v| !v.is_finite());
        let scale = if broken { f32::NAN } else { amax / 127.0 };
        let stored = f16::from_f32(scale);
        s.copy_from_slice(&stored.to_le_bytes());
        let inv = match stored.to_f32() {
            s if s > 0.0 && s.is_finite() => 1.0 / s,
            _ => 0.0,
        };
        for (q, &v) in q.iter_mut().zip(x) {
            *q = (v * inv).round().clamp(-127.0, 127.0) as i8 as u8;
        }
    }
}

/// The first `out.len()` values of a row of `d` (`row` is the whole row).
///
/// # Panics
/// When `row` is not one row of `d` values or `out` is longer than `d` (a caller bug).
pub fn dequantize_row(row: &[u8], d: usize, out: &mut [f32]) {
    assert_eq!(row.len(), row_bytes(d), "a row of {d} values");
    assert!(out.len() <= d, "{} values from a row of {d}", out.len());
    let (values, scales) = row.split_at(d);
    let g = group(d);
    for (i, out) in out.chunks_mut(g).enumerate() {
        let scale = f16::from_le_bytes([scales[2 * i], scales[2 * i + 1]]).to_f32();
        let q = &values[i * g..i * g + out.len()];
        #[cfg(target_arch = "x86_64")]
        {
            if crate::simd::has_avx512() {
                // SAFETY: AVX-512F was just checked; `q` and `out` have the same length.
                unsafe { x86::widen_avx512(q, scale, out) };
                continue;
            }
            if crate::simd::has_avx2() {
                // SAFETY: AVX2 was just checked; as above.
                unsafe { x86::widen_avx2(q, scale, out) };
                continue;
            }
        }
        widen_portable(q, scale, out);
    }
}

fn widen_portable(q: &[u8], scale: f32, out: &mut [f32]) {
    for (o, &q) in out.iter_mut().zip(q) {
        *o = (q as i8) as f32 * scale;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `out = q · scale`, 16 values per step.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn widen_avx512(q: &[u8], scale: f32, out: &mut [f32]) {
        let n = out.len().min(q.len());
        let s = _mm512_set1_ps(scale);
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 ≤ n, inside both slices.
            let bytes = unsafe { _mm_loadu_si128(q.as_ptr().add(i).cast()) };
            let v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_mul_ps(v, s)) };
            i += 16;
        }
        super::widen_portable(&q[i..n], scale, &mut out[i..n]);
    }

    /// `out = q · scale`, 8 values per step.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn widen_avx2(q: &[u8], scale: f32, out: &mut [f32]) {
        let n = out.len().min(q.len());
        let s = _mm256_set1_ps(scale);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 ≤ n, inside both slices.
            let bytes = unsafe { _mm_loadl_epi64(q.as_ptr().add(i).cast()) };
            let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(v, s)) };
            i += 8;
        }
        super::widen_portable(&q[i..n], scale, &mut out[i..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::data;

    /// Every value comes back within half a step of its group's scale, at every width (whole
    /// groups, a single odd group) and for every prefix length; the stored rounding is ggml's.
    #[test]
    fn rows_round_trip_within_half_a_step() {
        for d in [1, 7, 16, 32, 48, 64, 96, 128, 576] {
            let x: Vec<f32> = data(d, d as u64).iter().map(|v| v * 3.0).collect();
            let mut row = vec![0u8; row_bytes(d)];
            quantize_row(&x, &mut row);
            for take in [d, d / 2, 1] {
                let mut out = vec![f32::NAN; take];
                dequantize_row(&row, d, &mut out);
                for (i, (o, v)) in out.iter().zip(&x).enumerate() {
                    let g = i / group(d);
                    let amax = x[g * group(d)..((g + 1) * group(d)).min(d)]
                        .iter()
                        .fold(0f32, |m, v| m.max(v.abs()));
                    let step = f16::from_f32(amax / 127.0).to_f32();
                    assert!(
                        (o - v).abs() <= step * 0.5 + 1e-6,
                        "d {d} take {take} [{i}]: {o} vs {v} (step {step})"
                    );
                }
            }
            // The largest value of each group lands on ±127 steps, as in Q8_0.
            let extreme =
                x.iter()
                    .take(group(d))
                    .fold(0f32, |m, v| if v.abs() > m.abs() { *v } else { m });
            let at = x
                .iter()
                .position(|v| *v == extreme)
                .expect("the extreme is a value");
            assert_eq!((row[at] as i8).unsigned_abs(), 127, "d {d}");
        }
    }

    /// A zero row stays zero; a row with a NaN or infinity reads back as NaN.
    #[test]
    fn zero_and_broken_rows() {
        let mut row = vec![0xAAu8; row_bytes(32)];
        quantize_row(&[0.0; 32], &mut row);
        let mut out = [1f32; 32];
        dequantize_row(&row, 32, &mut out);
        assert!(out.iter().all(|v| *v == 0.0));
        let mut x = data(64, 9);
        x[40] = f32::INFINITY;
        let mut row = vec![0u8; row_bytes(64)];
        quantize_row(&x, &mut row);
        let mut out = [0f32; 64];
        dequantize_row(&row, 64, &mut out);
        assert!(out[..32].iter().all(|v| v.is_finite()), "the clean group");
        assert!(out[32..].iter().all(|v| v.is_nan()), "the broken group");
    }

    /// The SIMD widenings give the portable one's values exactly.
    #[test]
    fn every_path_widens_alike() {
        let q: Vec<u8> = (0..=255u8).chain(0..37).collect();
        let mut want = vec![0f32; q.len()];
        widen_portable(&q, 0.37, &mut want);
        #[cfg(target_arch = "x86_64")]
        {
            let mut got = vec![0f32; q.len()];
            if crate::simd::has_avx2() {
                unsafe { x86::widen_avx2(&q, 0.37, &mut got) };
                assert_eq!(got, want, "avx2");
            }
            if crate::simd::has_avx512() {
                unsafe { x86::widen_avx512(&q, 0.37, &mut got) };
                assert_eq!(got, want, "avx512");
            }
        }
    }
}
