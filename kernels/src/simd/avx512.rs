//! The AVX-512F instances of the tile kernel and the value sum in [`super::vector`]: 16-lane
//! `__m512`, and twice AVX2's registers, so a tile of four activation rows by four weight rows
//! stays in registers. Every function here requires AVX-512F: callers check
//! [`super::has_avx512`] first.

use half::{bf16, f16};
use std::arch::x86_64::*;

use super::vector::{self, Vector, Widen};

// SAFETY (every method below): the caller has AVX-512F and hands pointers to 16 readable (or
// writable) elements, as the `Vector` and `Widen` contracts say.
impl Vector for __m512 {
    const LANES: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: see above.
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: see above.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: see above.
        unsafe { _mm512_storeu_ps(p, self) }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        // SAFETY: see above.
        unsafe { _mm512_set1_ps(v) }
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, acc: Self) -> Self {
        // SAFETY: see above.
        unsafe { _mm512_fmadd_ps(a, b, acc) }
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        // SAFETY: see above.
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        // SAFETY: see above.
        unsafe { _mm512_reduce_add_ps(self) }
    }
}

impl Widen<__m512> for f32 {
    #[inline(always)]
    unsafe fn widen(p: *const Self) -> __m512 {
        // SAFETY: see above.
        unsafe { _mm512_loadu_ps(p) }
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Widen<__m512> for bf16 {
    #[inline(always)]
    unsafe fn widen(p: *const Self) -> __m512 {
        // SAFETY: see above (32 bytes); bf16 is the top half of an f32.
        unsafe {
            let raw = _mm256_loadu_si256(p.cast());
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))
        }
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

impl Widen<__m512> for f16 {
    #[inline(always)]
    unsafe fn widen(p: *const Self) -> __m512 {
        // SAFETY: see above (32 bytes).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

macro_rules! entry_points {
    ($t:ty, $tile:ident, $wsum:ident) => {
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        pub(crate) unsafe fn $tile<const R: usize, const C: usize>(
            x: [&[f32]; R],
            w: [&[$t]; C],
            ahead: usize,
        ) -> [[f32; C]; R] {
            // SAFETY: the caller checked AVX-512F.
            unsafe { vector::tile::<__m512, _, R, C>(x, w, ahead) }
        }
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        pub(crate) unsafe fn $wsum<const R: usize>(
            p: [&[f32]; R],
            values: &[$t],
            offsets: &[usize],
            out: [&mut [f32]; R],
        ) {
            // SAFETY: the caller checked AVX-512F and the offsets.
            unsafe { vector::weighted_sum::<__m512, _, R>(p, values, offsets, out) }
        }
    };
}

entry_points!(f32, tile_f32, wsum_f32);
entry_points!(bf16, tile_bf16, wsum_bf16);
entry_points!(f16, tile_f16, wsum_f16);
