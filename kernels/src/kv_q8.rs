//! Rows of the 8-bit KV cache: ggml's Q8_0 blocks — an f16 scale and 32 signed bytes, the scale
//! `max|x| / 127` and each value rounded to the nearest step, byte for byte what ggml's reference
//! quantizer writes — with a row of `d` values zero-padded to whole blocks. A row's leading
//! values (MLA reads the latent part of its cached rows) are its leading blocks.
//!
//! Attention widens a run of rows to f32 at a time, keys and values alike, and scores and sums
//! them with the f32 kernels (integer dot products with the query rounded to 8-bit blocks, as
//! llama.cpp scores a Q8_0 cache, were slower on rows this short: docs/decisions.md).

use half::f16;

/// Values per block.
pub const BLOCK: usize = 32;
/// Bytes per block: the f16 scale, then the values.
const BLOCK_BYTES: usize = 34;

/// Bytes a row of `d` values takes.
pub fn row_bytes(d: usize) -> usize {
    d.div_ceil(BLOCK) * BLOCK_BYTES
}

/// `x` rounded into one row (`out` is [`row_bytes`]`(x.len())` long). A block holding a NaN or
/// an infinity gets a NaN scale, so a broken activation stays visible instead of being clamped.
///
/// # Panics
/// When `out` is not one row of `x.len()` values (a caller bug).
pub fn quantize_row(x: &[f32], out: &mut [u8]) {
    assert_eq!(out.len(), row_bytes(x.len()), "a row of {} values", x.len());
    for (x, block) in x.chunks(BLOCK).zip(out.chunks_exact_mut(BLOCK_BYTES)) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let broken = x.iter().any(|v| !v.is_finite());
        // Saturated: a scale past f16's range stored as infinity read back as NaN (0 · ∞).
        let d = match broken {
            true => f32::NAN,
            false => (amax / 127.0).min(f16::MAX.to_f32()),
        };
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        block[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        let qs = &mut block[2..];
        qs.fill(0);
        for (q, &v) in qs.iter_mut().zip(x) {
            *q = (v * inv).round() as i8 as u8;
        }
    }
}

/// The first `out.len()` values of a row of `d` (`row` is the whole row).
///
/// # Panics
/// When `row` is not one row of `d` values or `out` is longer than `d` (a caller bug).
pub fn dequantize_row(row: &[u8], d: usize, out: &mut [f32]) {
    assert_eq!(row.len(), row_bytes(d), "a row of {d} values");
    let take = out.len();
    dequantize_rows(row, &[0], d, take, out);
}

/// The first `take` values of each row of `d` at `offsets` in `pool`, one after the other in
/// `out` (`offsets.len() × take`): the dispatch is paid once for a run of rows.
///
/// # Panics
/// When a row lies outside `pool`, `take > d` or `out` is not `offsets.len() × take` (a caller
/// bug).
pub fn dequantize_rows(pool: &[u8], offsets: &[usize], d: usize, take: usize, out: &mut [f32]) {
    let bytes = row_bytes(d);
    assert!(take <= d, "{take} values from a row of {d}");
    assert_eq!(
        out.len(),
        offsets.len() * take,
        "{} rows of {take}",
        offsets.len()
    );
    assert!(
        offsets.iter().all(|&o| o + bytes <= pool.len()),
        "a row lies outside the pool"
    );
    if take == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::has_avx512() {
            // SAFETY: AVX-512F was just checked; every row lies inside the pool (checked).
            return unsafe { x86::rows_avx512(pool, offsets, take, out) };
        }
        if crate::simd::has_avx2() {
            // SAFETY: AVX2 and F16C were just checked; as above.
            return unsafe { x86::rows_avx2(pool, offsets, take, out) };
        }
    }
    for (&at, out) in offsets.iter().zip(out.chunks_exact_mut(take)) {
        for (block, out) in pool[at..]
            .chunks_exact(BLOCK_BYTES)
            .zip(out.chunks_mut(BLOCK))
        {
            widen_portable(block, out);
        }
    }
}

/// One block's first `out.len()` values.
fn widen_portable(block: &[u8], out: &mut [f32]) {
    let scale = f16::from_le_bytes([block[0], block[1]]).to_f32();
    for (o, &q) in out.iter_mut().zip(&block[2..]) {
        *o = (q as i8) as f32 * scale;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BLOCK, BLOCK_BYTES};

    /// Every row a block at a time: the scale broadcast once (`vcvtph2ps`), 16 values per step.
    #[target_feature(enable = "avx512f,avx2,f16c")]
    pub(super) unsafe fn rows_avx512(pool: &[u8], offsets: &[usize], take: usize, out: &mut [f32]) {
        let whole = take / BLOCK;
        for (&at, out) in offsets.iter().zip(out.chunks_exact_mut(take)) {
            let row = &pool[at..];
            for b in 0..whole {
                // SAFETY: block b lies inside the row (the caller checked the row's bytes) and
                // its 32 values inside `out` (b < take / 32).
                unsafe {
                    let p = row.as_ptr().add(b * BLOCK_BYTES);
                    let bits = p.cast::<i16>().read_unaligned();
                    let s = _mm512_cvtph_ps(_mm256_set1_epi16(bits));
                    let lo =
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(2).cast())));
                    let hi =
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(18).cast())));
                    let o = out.as_mut_ptr().add(b * BLOCK);
                    _mm512_storeu_ps(o, _mm512_mul_ps(lo, s));
                    _mm512_storeu_ps(o.add(16), _mm512_mul_ps(hi, s));
                }
            }
            if whole * BLOCK < take {
                let block = &row[whole * BLOCK_BYTES..(whole + 1) * BLOCK_BYTES];
                super::widen_portable(block, &mut out[whole * BLOCK..]);
            }
        }
    }

    /// The same, 8 values per step.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn rows_avx2(pool: &[u8], offsets: &[usize], take: usize, out: &mut [f32]) {
        let whole = take / BLOCK;
        for (&at, out) in offsets.iter().zip(out.chunks_exact_mut(take)) {
            let row = &pool[at..];
            for b in 0..whole {
                // SAFETY: as in `rows_avx512`.
                unsafe {
                    let p = row.as_ptr().add(b * BLOCK_BYTES);
                    let bits = p.cast::<i16>().read_unaligned();
                    let s = _mm256_cvtph_ps(_mm_set1_epi16(bits));
                    let o = out.as_mut_ptr().add(b * BLOCK);
                    for q in 0..4 {
                        let bytes = _mm_loadl_epi64(p.add(2 + 8 * q).cast());
                        let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
                        _mm256_storeu_ps(o.add(8 * q), _mm256_mul_ps(v, s));
                    }
                }
            }
            if whole * BLOCK < take {
                let block = &row[whole * BLOCK_BYTES..(whole + 1) * BLOCK_BYTES];
                super::widen_portable(block, &mut out[whole * BLOCK..]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::data;

    /// Every value comes back within half a step of its block's scale, at every width (whole
    /// blocks, a padded last block) and for every prefix length; the padding is zeros.
    #[test]
    fn rows_round_trip_within_half_a_step() {
        for d in [1, 7, 16, 32, 48, 64, 96, 128, 576] {
            let x: Vec<f32> = data(d, d as u64).iter().map(|v| v * 3.0).collect();
            let mut row = vec![0xAAu8; row_bytes(d)];
            quantize_row(&x, &mut row);
            for take in [d, d / 2, 1] {
                let mut out = vec![f32::NAN; take];
                dequantize_row(&row, d, &mut out);
                for (i, (o, v)) in out.iter().zip(&x).enumerate() {
                    let b = i / BLOCK;
                    let amax = x[b * BLOCK..((b + 1) * BLOCK).min(d)]
                        .iter()
                        .fold(0f32, |m, v| m.max(v.abs()));
                    // The step is the stored (f16) scale; rounding used the exact one.
                    let step = f16::from_f32(amax / 127.0).to_f32();
                    assert!(
                        (o - v).abs() <= step * 0.5 + amax * 2e-3,
                        "d {d} take {take} [{i}]: {o} vs {v} (step {step})"
                    );
                }
            }
            let pad = d.next_multiple_of(BLOCK) - d;
            assert!(
                row[row.len() - pad..].iter().all(|&b| b == 0),
                "d {d}: padding"
            );
        }
    }

    /// A zero row stays zero; a block with a NaN or infinity reads back as NaN.
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
        assert!(out[..32].iter().all(|v| v.is_finite()), "the clean block");
        assert!(out[32..].iter().all(|v| v.is_nan()), "the broken block");
        // Finite values past what an f16 scale reaches saturate, not read back as NaN.
        quantize_row(&[1e7; 32], &mut row[..row_bytes(32)]);
        let mut out = [0f32; 32];
        dequantize_row(&row[..row_bytes(32)], 32, &mut out);
        assert!(out.iter().all(|v| v.is_finite() && *v > 8e6), "{out:?}");
    }

    /// The SIMD paths give the portable one's values exactly: whole blocks, a padded block,
    /// prefixes that end inside a block, rows at odd offsets.
    #[test]
    fn every_path_widens_alike() {
        for (d, take) in [
            (32, 32),
            (128, 128),
            (128, 72),
            (48, 48),
            (48, 40),
            (7, 5),
            (576, 512),
        ] {
            let bytes = row_bytes(d);
            let offsets = [3, 3 + bytes, 3 + 3 * bytes];
            let mut pool = vec![0u8; 4 * bytes + 3];
            for (r, &at) in offsets.iter().enumerate() {
                let x: Vec<f32> = data(d, r as u64).iter().map(|v| v * 5.0).collect();
                quantize_row(&x, &mut pool[at..at + bytes]);
            }
            let mut want = vec![0f32; 3 * take];
            for (&at, out) in offsets.iter().zip(want.chunks_exact_mut(take)) {
                for (block, out) in pool[at..]
                    .chunks_exact(BLOCK_BYTES)
                    .zip(out.chunks_mut(BLOCK))
                {
                    widen_portable(block, out);
                }
            }
            #[cfg(target_arch = "x86_64")]
            {
                let mut got = vec![f32::NAN; 3 * take];
                if crate::simd::has_avx2() {
                    unsafe { x86::rows_avx2(&pool, &offsets, take, &mut got) };
                    assert_eq!(got, want, "avx2, d {d} take {take}");
                }
                if crate::simd::has_avx512() {
                    got.fill(f32::NAN);
                    unsafe { x86::rows_avx512(&pool, &offsets, take, &mut got) };
                    assert_eq!(got, want, "avx512, d {d} take {take}");
                }
            }
            let mut got = vec![f32::NAN; 3 * take];
            dequantize_rows(&pool, &offsets, d, take, &mut got);
            assert_eq!(got, want, "dispatched, d {d} take {take}");
        }
    }
}
