//! The AVX2/FMA instances of the algorithms in [`super::vector`]: 8-lane `__m256`. Every function
//! here requires AVX2 and FMA (and F16C for f16): callers check [`super::has_avx2`] /
//! [`super::has_f16c`] first.

use half::{bf16, f16};
use std::arch::x86_64::*;

use super::vector::{self, Vector, Widen};

// SAFETY (every method below): the caller has AVX2/FMA/F16C and hands pointers to 8 readable
// (or writable) elements, as the `Vector` and `Widen` contracts say.
impl Vector for __m256 {
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: see above.
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: see above.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: see above.
        unsafe { _mm256_storeu_ps(p, self) }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        // SAFETY: see above.
        unsafe { _mm256_set1_ps(v) }
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, acc: Self) -> Self {
        // SAFETY: see above.
        unsafe { _mm256_fmadd_ps(a, b, acc) }
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        // SAFETY: see above.
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        // SAFETY: see above.
        unsafe {
            let pair = _mm_add_ps(_mm256_castps256_ps128(self), _mm256_extractf128_ps(self, 1));
            let pair = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
            _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)))
        }
    }
}

impl Widen<__m256> for f32 {
    #[inline(always)]
    unsafe fn widen(p: *const Self) -> __m256 {
        // SAFETY: see above.
        unsafe { _mm256_loadu_ps(p) }
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Widen<__m256> for bf16 {
    #[inline(always)]
    unsafe fn widen(p: *const Self) -> __m256 {
        // SAFETY: see above (16 bytes); bf16 is the top half of an f32.
        unsafe {
            let raw = _mm_loadu_si128(p.cast());
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
        }
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

impl Widen<__m256> for f16 {
    #[inline(always)]
    unsafe fn widen(p: *const Self) -> __m256 {
        // SAFETY: see above (16 bytes, F16C).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

macro_rules! entry_points {
    ($t:ty, $features:literal, $dot:ident, $tile:ident, $wsum:ident, $axpy:ident, $widen:ident) => {
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $dot(x: &[f32], w: &[$t]) -> f32 {
            // SAFETY: the caller checked the features this function is compiled for.
            unsafe { vector::dot::<__m256, _>(x, w) }
        }
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $tile<const R: usize, const C: usize>(
            x: [&[f32]; R],
            w: [&[$t]; C],
            ahead: usize,
        ) -> [[f32; C]; R] {
            // SAFETY: as above.
            unsafe { vector::tile::<__m256, _, R, C>(x, w, ahead) }
        }
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $wsum<const R: usize>(
            p: [&[f32]; R],
            values: &[$t],
            offsets: &[usize],
            out: [&mut [f32]; R],
        ) {
            // SAFETY: the caller checked the features and the offsets.
            unsafe { vector::weighted_sum::<__m256, _, R>(p, values, offsets, out) }
        }
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $axpy(a: f32, w: &[$t], y: &mut [f32]) {
            // SAFETY: as above.
            unsafe { vector::axpy::<__m256, _>(a, w, y) }
        }
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $widen(w: &[$t], out: &mut [f32]) {
            // SAFETY: as above.
            unsafe { vector::widen::<__m256, _>(w, out) }
        }
    };
}

entry_points!(f32, "avx2,fma", dot_f32, tile_f32, wsum_f32, axpy_f32, widen_f32);
entry_points!(bf16, "avx2,fma", dot_bf16, tile_bf16, wsum_bf16, axpy_bf16, widen_bf16);
entry_points!(
    f16,
    "avx2,fma,f16c",
    dot_f16,
    tile_f16,
    wsum_f16,
    axpy_f16,
    widen_f16
);
