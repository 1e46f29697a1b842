//! The three primitives every kernel is built from — dot product, `y += a·w` and widening to f32 —
//! for each storage type, in AVX2/FMA (x86-64, chosen at run time) and portable versions.
//!
//! Weights stay in their storage type in memory and are widened in registers: bf16 is the top
//! half of an f32 (a 16-bit shift), f16 goes through F16C.

/// Portable versions: the fallback, and the reference the SIMD versions are tested against.
pub(crate) mod portable {
    /// Σ x·w with 8 independent partial sums, so the compiler can vectorize it.
    #[inline]
    pub(crate) fn dot<T: Copy>(x: &[f32], w: &[T], widen: impl Fn(T) -> f32) -> f32 {
        let mut acc = [0f32; 8];
        let chunks = x.len() / 8;
        for c in 0..chunks {
            for (j, a) in acc.iter_mut().enumerate() {
                *a += x[c * 8 + j] * widen(w[c * 8 + j]);
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for i in chunks * 8..x.len() {
            sum += x[i] * widen(w[i]);
        }
        sum
    }

    /// Four dot products of one weight row: Σ xᵣ·w for each of the four activation rows.
    #[inline]
    pub(crate) fn dot4<T: Copy>(x: [&[f32]; 4], w: &[T], widen: impl Fn(T) -> f32) -> [f32; 4] {
        x.map(|x| dot(x, w, &widen))
    }

    #[inline]
    pub(crate) fn axpy<T: Copy>(a: f32, w: &[T], y: &mut [f32], widen: impl Fn(T) -> f32) {
        for (y, &w) in y.iter_mut().zip(w) {
            *y += a * widen(w);
        }
    }
}

/// Whether this CPU runs the AVX2 + FMA paths (checked once; the answer is cached by std).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Whether this CPU runs the F16C path for f16 weights.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_f16c() -> bool {
    has_avx2() && is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    //! Every function here requires AVX2 and FMA (and F16C for f16): callers check
    //! [`super::has_avx2`] / [`super::has_f16c`] first. Slices must have equal lengths.
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let pair = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
        _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)))
    }

    /// Loads 8 weights at `p` as f32.
    trait Load8: Copy {
        /// # Safety
        /// `p` points at 8 readable elements; the CPU has the features of this module.
        unsafe fn load8(p: *const Self) -> __m256;
        fn to_f32(self) -> f32;
    }

    impl Load8 for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            // SAFETY: the caller guarantees 8 readable f32 at `p`.
            unsafe { _mm256_loadu_ps(p) }
        }
        fn to_f32(self) -> f32 {
            self
        }
    }

    impl Load8 for bf16 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            // SAFETY: the caller guarantees 8 readable bf16 (16 bytes) at `p` and AVX2.
            unsafe {
                let raw = _mm_loadu_si128(p.cast());
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
            }
        }
        fn to_f32(self) -> f32 {
            self.to_f32()
        }
    }

    impl Load8 for f16 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            // SAFETY: the caller guarantees 8 readable f16 (16 bytes) at `p` and F16C.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
        }
        fn to_f32(self) -> f32 {
            self.to_f32()
        }
    }

    #[inline(always)]
    unsafe fn dot_impl<T: Load8>(x: &[f32], w: &[T]) -> f32 {
        let n = x.len().min(w.len());
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut sum = 0.0;
        // SAFETY: every load below stays under `n` elements of both slices.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                for (j, a) in acc.iter_mut().enumerate() {
                    let o = i + 8 * j;
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(o)), T::load8(wp.add(o)), *a);
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), T::load8(wp.add(i)), acc[0]);
                i += 8;
            }
            let total = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            sum += hsum(total);
            while i < n {
                sum += *xp.add(i) * (*wp.add(i)).to_f32();
                i += 1;
            }
        }
        sum
    }

    /// Four activation rows against one weight row: each weight is loaded and widened once for
    /// the four (a batch of decode rows reads its weights once, not once per row).
    #[inline(always)]
    unsafe fn dot4_impl<T: Load8>(x: [&[f32]; 4], w: &[T]) -> [f32; 4] {
        let n = x.iter().map(|r| r.len()).fold(w.len(), usize::min);
        let wp = w.as_ptr();
        let xp = x.map(<[f32]>::as_ptr);
        let mut sums = [0f32; 4];
        // SAFETY: every load below stays under `n` elements of every slice.
        unsafe {
            // Two accumulators per row: eight independent FMA chains.
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            let mut i = 0;
            while i + 16 <= n {
                let w0 = T::load8(wp.add(i));
                let w1 = T::load8(wp.add(i + 8));
                for (a, &p) in acc.iter_mut().zip(&xp) {
                    a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(i)), w0, a[0]);
                    a[1] = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(i + 8)), w1, a[1]);
                }
                i += 16;
            }
            while i + 8 <= n {
                let w0 = T::load8(wp.add(i));
                for (a, &p) in acc.iter_mut().zip(&xp) {
                    a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(i)), w0, a[0]);
                }
                i += 8;
            }
            for ((sum, a), &p) in sums.iter_mut().zip(&acc).zip(&xp) {
                *sum = hsum(_mm256_add_ps(a[0], a[1]));
                for t in i..n {
                    *sum += *p.add(t) * (*wp.add(t)).to_f32();
                }
            }
        }
        sums
    }

    #[inline(always)]
    unsafe fn axpy_impl<T: Load8>(a: f32, w: &[T], y: &mut [f32]) {
        let n = y.len().min(w.len());
        let (wp, yp) = (w.as_ptr(), y.as_mut_ptr());
        // SAFETY: every access below stays under `n` elements of both slices.
        unsafe {
            let av = _mm256_set1_ps(a);
            let mut i = 0;
            while i + 8 <= n {
                let acc = _mm256_fmadd_ps(av, T::load8(wp.add(i)), _mm256_loadu_ps(yp.add(i)));
                _mm256_storeu_ps(yp.add(i), acc);
                i += 8;
            }
            while i < n {
                *yp.add(i) += a * (*wp.add(i)).to_f32();
                i += 1;
            }
        }
    }

    #[inline(always)]
    unsafe fn widen_impl<T: Load8>(w: &[T], out: &mut [f32]) {
        let n = out.len().min(w.len());
        let (wp, op) = (w.as_ptr(), out.as_mut_ptr());
        // SAFETY: every access below stays under `n` elements of both slices.
        unsafe {
            let mut i = 0;
            while i + 8 <= n {
                _mm256_storeu_ps(op.add(i), T::load8(wp.add(i)));
                i += 8;
            }
            while i < n {
                *op.add(i) = (*wp.add(i)).to_f32();
                i += 1;
            }
        }
    }

    macro_rules! entry_points {
        ($t:ty, $features:literal, $dot:ident, $dot4:ident, $axpy:ident, $widen:ident) => {
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn $dot(x: &[f32], w: &[$t]) -> f32 {
                // SAFETY: the caller checked the features this function is compiled for.
                unsafe { dot_impl(x, w) }
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn $dot4(x: [&[f32]; 4], w: &[$t]) -> [f32; 4] {
                // SAFETY: as above.
                unsafe { dot4_impl(x, w) }
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn $axpy(a: f32, w: &[$t], y: &mut [f32]) {
                // SAFETY: as above.
                unsafe { axpy_impl(a, w, y) }
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn $widen(w: &[$t], out: &mut [f32]) {
                // SAFETY: as above.
                unsafe { widen_impl(w, out) }
            }
        };
    }

    entry_points!(f32, "avx2,fma", dot_f32, dot4_f32, axpy_f32, widen_f32);
    entry_points!(bf16, "avx2,fma", dot_bf16, dot4_bf16, axpy_bf16, widen_bf16);
    entry_points!(f16, "avx2,fma,f16c", dot_f16, dot4_f16, axpy_f16, widen_f16);
}
