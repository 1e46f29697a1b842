//! Whole activations between f32 and a model's 16-bit dtype, split over the pool. The products
//! and attention compute in f32 while a bf16 or f16 model's tensors stay in its dtype, so each
//! linear layer widens its input and narrows its output: through candle's `to_dtype` that ran on
//! one thread, value by value, and came to about a tenth of a bf16 prefill.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::Element;

/// Values per task: large enough that splitting costs nothing next to the copy.
const CHUNK: usize = 1 << 14;

/// `x` widened to f32, split over the pool.
pub fn widened<T: Element>(x: &[T]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| T::widen(x, o));
    out
}

/// `x` rounded to bf16 (to nearest, ties to even, as `bf16::from_f32`), split over the pool.
pub fn to_bf16(x: &[f32]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| round_bf16(x, o));
    out
}

/// Each value of `x` rounded to bf16 in place and kept as f32 (the low 16 bits cleared after
/// rounding, as `bf16::from_f32(v).to_f32()`), split over the pool: a bf16 model's inputs to a
/// product, computed in f32 around it, as its bf16 products see them.
pub fn round_to_bf16_values(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK).for_each(round_bf16_values);
}

/// [`round_to_bf16_values`] on the calling thread alone (for a pool task that holds
/// thread-local buffers, which a parallel call could re-enter), compiled for the widest vectors
/// the level allows.
pub(crate) fn round_bf16_values(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::has_avx512() {
            // SAFETY: the level says the CPU has AVX-512F.
            return unsafe { round_bf16_values_avx512(x) };
        }
        if crate::simd::has_avx2() {
            // SAFETY: the level says the CPU has AVX2.
            return unsafe { round_bf16_values_avx2(x) };
        }
    }
    rounded_bf16_values(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn round_bf16_values_avx512(x: &mut [f32]) {
    rounded_bf16_values(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn round_bf16_values_avx2(x: &mut [f32]) {
    rounded_bf16_values(x)
}

#[inline(always)]
fn rounded_bf16_values(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = f32::from_bits(u32::from(bf16_bits(*v)) << 16);
    }
}

/// `x` rounded to f16 (as `f16::from_f32`; F16C's conversion where the CPU has it), split over
/// the pool.
pub fn to_f16(x: &[f32]) -> Vec<f16> {
    use half::slice::HalfFloatSliceExt;
    let mut out = vec![f16::ZERO; x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| o.convert_from_f32_slice(x));
    out
}

/// [`rounded_bf16`] compiled for the widest vectors the level allows.
pub(crate) fn round_bf16(x: &[f32], out: &mut [bf16]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::has_avx512() {
            // SAFETY: the level says the CPU has AVX-512F.
            return unsafe { round_bf16_avx512(x, out) };
        }
        if crate::simd::has_avx2() {
            // SAFETY: the level says the CPU has AVX2.
            return unsafe { round_bf16_avx2(x, out) };
        }
    }
    rounded_bf16(x, out)
}

/// [`rounded_bf16`] on 16 values per instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn round_bf16_avx512(x: &[f32], out: &mut [bf16]) {
    rounded_bf16(x, out)
}

/// [`rounded_bf16`] on 8 values per instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn round_bf16_avx2(x: &[f32], out: &mut [bf16]) {
    rounded_bf16(x, out)
}

/// `bf16::from_f32` on every value, written without branches so that it compiles to vector
/// instructions: the sign, exponent and top mantissa bits, plus one where the dropped half is
/// over a half unit or exactly half with an odd last kept bit; a NaN stays a quiet NaN.
#[inline(always)]
fn rounded_bf16(x: &[f32], out: &mut [bf16]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = bf16::from_bits(bf16_bits(v));
    }
}

/// `bf16::from_f32(v)`'s bits, without branches.
#[inline(always)]
pub(crate) fn bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    let half_unit = bits & 0x8000 != 0;
    let above_tie = bits & 0x17fff != 0;
    let rounded = (bits >> 16) + u32::from(half_unit && above_tie);
    let nan = bits & 0x7fff_ffff > 0x7f80_0000;
    (if nan { (bits >> 16) | 0x40 } else { rounded }) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Every rounding case and a million random bit patterns give `bf16::from_f32`'s bits.
    #[test]
    fn bf16_rounding_is_half_s_bit_for_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let edges = [
            0u32,
            0x8000_0000,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0xffc0_0001,
            0x7f80_0001,
            0x7f7f_ffff,
            0x0000_8000,
            0x0001_8000,
            0x0000_8001,
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_7fff,
            0x0000_0001,
            0x807f_ffff,
            0x7f7f_8000,
        ];
        let x: Vec<f32> = edges
            .into_iter()
            .chain((0..1 << 20).map(|_| rng.random::<u32>()))
            .map(f32::from_bits)
            .collect();
        let got = to_bf16(&x);
        for (v, g) in x.iter().zip(&got) {
            assert_eq!(
                g.to_bits(),
                bf16::from_f32(*v).to_bits(),
                "{:#010x}",
                v.to_bits()
            );
        }
        // Rounded in place, as f32: the same bits in the upper half, zeros below.
        let mut kept = x.clone();
        round_to_bf16_values(&mut kept);
        for ((v, g), k) in x.iter().zip(&got).zip(&kept) {
            assert_eq!(
                k.to_bits(),
                u32::from(g.to_bits()) << 16,
                "{:#010x} in place",
                v.to_bits()
            );
        }
    }

    /// Widening and f16 rounding over several chunks equal the scalar conversions.
    #[test]
    fn conversions_over_chunks_match_the_scalar_ones() {
        let x = crate::test_data::data(3 * CHUNK + 17, 9);
        let h = to_f16(&x);
        assert!(h.iter().zip(&x).all(|(h, v)| *h == f16::from_f32(*v)));
        let b: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let w = widened(&b);
        assert!(w.iter().zip(&b).all(|(w, b)| *w == b.to_f32()));
        assert!(widened(&h).iter().zip(&h).all(|(w, h)| *w == h.to_f32()));
    }
}
