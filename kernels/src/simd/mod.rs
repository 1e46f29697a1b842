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

    /// A tile of dot products: every activation row of `x` with every weight row of `w`.
    #[inline]
    pub(crate) fn tile<T: Copy, const R: usize, const C: usize>(
        x: [&[f32]; R],
        w: [&[T]; C],
        widen: impl Fn(T) -> f32,
    ) -> [[f32; C]; R] {
        x.map(|x| w.map(|w| dot(x, w, &widen)))
    }

    /// `out[r] = Σₜ p[r][t] · values[offsets[t]..][..d]` for each of the R output rows.
    #[inline]
    pub(crate) fn weighted_sum<T: Copy, const R: usize>(
        p: [&[f32]; R],
        values: &[T],
        offsets: &[usize],
        out: [&mut [f32]; R],
        widen: impl Fn(T) -> f32,
    ) {
        for (p, out) in p.iter().zip(out) {
            out.fill(0.0);
            for (&pt, &off) in p.iter().zip(offsets) {
                axpy(pt, &values[off..off + out.len()], out, &widen);
            }
        }
    }

    #[inline]
    pub(crate) fn axpy<T: Copy>(a: f32, w: &[T], y: &mut [f32], widen: impl Fn(T) -> f32) {
        for (y, &w) in y.iter_mut().zip(w) {
            *y += a * widen(w);
        }
    }
}

/// The widest instruction set the kernels may use: what the CPU has, capped by the environment
/// variable `PIO_KERNELS` (`portable`, `avx2` or `avx512`), so that every narrower path can be run
/// and tested on a wider machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 and FMA (and F16C for f16).
    Avx2,
    /// AVX-512F, on top of AVX2.
    Avx512,
}

impl Level {
    /// The level in use: detected once, capped by `PIO_KERNELS`.
    pub fn current() -> Self {
        static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            let cap = match std::env::var("PIO_KERNELS").as_deref() {
                Ok("portable") => Level::Portable,
                Ok("avx2") => Level::Avx2,
                _ => Level::Avx512,
            };
            Self::detected().min(cap)
        })
    }

    /// The widest level this CPU has.
    pub fn detected() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if avx2 && is_x86_feature_detected!("avx512f") {
                return Level::Avx512;
            }
            if avx2 {
                return Level::Avx2;
            }
        }
        Level::Portable
    }
}

/// Whether the AVX2 + FMA paths run (F16C included: every AVX2 CPU has it).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx2() -> bool {
    Level::current() >= Level::Avx2
}

/// Whether the F16C path for f16 weights runs.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_f16c() -> bool {
    has_avx2()
}

/// Whether the AVX-512 paths run.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx512() -> bool {
    Level::current() >= Level::Avx512
}

/// Query heads per value sum at the level in use (four output vectors per head in registers).
pub(crate) fn weighted_rows() -> usize {
    match Level::current() {
        Level::Avx512 => 4,
        _ => 2,
    }
}

/// Weight rows per register tile at the level in use (what fits the registers beside four
/// activation rows' accumulators: 16 ymm for AVX2, 32 zmm for AVX-512).
pub(crate) fn tile_cols() -> usize {
    match Level::current() {
        Level::Avx512 => 4,
        _ => 2,
    }
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

    /// A tile of dot products: `R` activation rows against `C` weight rows, each weight loaded
    /// and widened once for the `R` rows and each activation once for the `C` weight rows —
    /// `R·C` FMAs per `R + C` loads, so a batch of decode rows runs at the FMA peak rather than
    /// the load ports' (`R·C ≤ 12` accumulators plus the loaded vectors fit the 16 registers).
    #[inline(always)]
    unsafe fn tile_impl<T: Load8, const R: usize, const C: usize>(
        x: [&[f32]; R],
        w: [&[T]; C],
    ) -> [[f32; C]; R] {
        let n = x
            .iter()
            .map(|r| r.len())
            .chain(w.iter().map(|r| r.len()))
            .min()
            .unwrap_or(0);
        let xp = x.map(<[f32]>::as_ptr);
        let wp = w.map(<[T]>::as_ptr);
        let mut sums = [[0f32; C]; R];
        // SAFETY: every load below stays under `n` elements of every slice.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            let mut i = 0;
            while i + 8 <= n {
                // Loops, not closures: a closure would not inherit this function's target
                // features, and the widening intrinsics would not inline.
                let mut wv = [_mm256_setzero_ps(); C];
                for (v, &p) in wv.iter_mut().zip(&wp) {
                    *v = T::load8(p.add(i));
                }
                for (a, &p) in acc.iter_mut().zip(&xp) {
                    let xv = _mm256_loadu_ps(p.add(i));
                    for (a, &wv) in a.iter_mut().zip(&wv) {
                        *a = _mm256_fmadd_ps(xv, wv, *a);
                    }
                }
                i += 8;
            }
            for ((sum, a), &p) in sums.iter_mut().zip(&acc).zip(&xp) {
                for ((s, &a), &q) in sum.iter_mut().zip(a).zip(&wp) {
                    *s = hsum(a);
                    for t in i..n {
                        *s += *p.add(t) * (*q.add(t)).to_f32();
                    }
                }
            }
        }
        sums
    }

    /// Attention's value sum for R query heads at once: each value row is loaded and widened once
    /// for the R heads, and the outputs stay in registers across every position (four vectors of
    /// each output row at a time) instead of being loaded and stored per position.
    ///
    /// # Safety
    /// Every `offsets[t] + out[r].len()` is inside `values`; the CPU has this module's features.
    #[inline(always)]
    unsafe fn weighted_sum_impl<T: Load8, const R: usize>(
        p: [&[f32]; R],
        values: &[T],
        offsets: &[usize],
        out: [&mut [f32]; R],
    ) {
        let d = out.iter().map(|o| o.len()).min().unwrap_or(0);
        let len = p.iter().map(|p| p.len()).fold(offsets.len(), usize::min);
        let vp = values.as_ptr();
        let op = out.map(|o| o.as_mut_ptr());
        let mut base = 0;
        // SAFETY: the caller keeps every row inside `values`; outputs are written below `d`.
        unsafe {
            while base + 32 <= d {
                let mut acc = [[_mm256_setzero_ps(); 4]; R];
                for (t, &off) in offsets[..len].iter().enumerate() {
                    let row = vp.add(off + base);
                    let mut v = [_mm256_setzero_ps(); 4];
                    for (q, v) in v.iter_mut().enumerate() {
                        *v = T::load8(row.add(8 * q));
                    }
                    for (a, p) in acc.iter_mut().zip(&p) {
                        let w = _mm256_set1_ps(*p.get_unchecked(t));
                        for (a, &v) in a.iter_mut().zip(&v) {
                            *a = _mm256_fmadd_ps(w, v, *a);
                        }
                    }
                }
                for (a, &o) in acc.iter().zip(&op) {
                    for (q, &a) in a.iter().enumerate() {
                        _mm256_storeu_ps(o.add(base + 8 * q), a);
                    }
                }
                base += 32;
            }
            for i in base..d {
                for (p, &o) in p.iter().zip(&op) {
                    let mut sum = 0.0;
                    for (&pt, &off) in p[..len].iter().zip(&offsets[..len]) {
                        sum += pt * (*vp.add(off + i)).to_f32();
                    }
                    *o.add(i) = sum;
                }
            }
        }
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
        ($t:ty, $features:literal, $dot:ident, $tile:ident, $wsum:ident, $axpy:ident, $widen:ident) => {
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn $wsum<const R: usize>(
                p: [&[f32]; R],
                values: &[$t],
                offsets: &[usize],
                out: [&mut [f32]; R],
            ) {
                // SAFETY: the caller checked the features and the offsets.
                unsafe { weighted_sum_impl(p, values, offsets, out) }
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn $dot(x: &[f32], w: &[$t]) -> f32 {
                // SAFETY: the caller checked the features this function is compiled for.
                unsafe { dot_impl(x, w) }
            }
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn $tile<const R: usize, const C: usize>(
                x: [&[f32]; R],
                w: [&[$t]; C],
            ) -> [[f32; C]; R] {
                // SAFETY: as above.
                unsafe { tile_impl(x, w) }
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
}

/// AVX-512F versions of the tile kernel and the value sum.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
