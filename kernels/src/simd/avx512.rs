//! AVX-512F versions of the tile kernel: sixteen lanes, and twice the registers, so a tile of
//! four activation rows by four weight rows stays in registers. Every function here requires
//! AVX-512F: callers check [`super::has_avx512`] first (the value sums too).

use half::{bf16, f16};
use std::arch::x86_64::*;

/// Loads 16 weights at `p` as f32.
trait Load16: Copy {
    /// # Safety
    /// `p` points at 16 readable elements; the CPU has AVX-512F.
    unsafe fn load16(p: *const Self) -> __m512;
    fn to_f32(self) -> f32;
}

impl Load16 for f32 {
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        // SAFETY: the caller guarantees 16 readable f32 at `p`.
        unsafe { _mm512_loadu_ps(p) }
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Load16 for bf16 {
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        // SAFETY: the caller guarantees 16 readable bf16 (32 bytes) at `p`.
        unsafe {
            let raw = _mm256_loadu_si256(p.cast());
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))
        }
    }
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
}

impl Load16 for f16 {
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        // SAFETY: the caller guarantees 16 readable f16 (32 bytes) at `p`.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
}

/// As the AVX2 tile, sixteen lanes wide.
#[inline(always)]
unsafe fn tile_impl<T: Load16, const R: usize, const C: usize>(
    x: [&[f32]; R],
    w: [&[T]; C],
) -> [[f32; C]; R] {
    let n = x
        .iter()
        .map(|r| r.len())
        .chain(w.iter().map(|r| r.len()))
        .min()
        .unwrap_or(0);
    let (xp, wp) = (x.map(<[f32]>::as_ptr), w.map(<[T]>::as_ptr));
    let mut sums = [[0f32; C]; R];
    // SAFETY: every load below stays under `n` elements of every slice.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut i = 0;
        while i + 16 <= n {
            // Loops, not closures: closures would not inherit the target features.
            let mut wv = [_mm512_setzero_ps(); C];
            for (v, &p) in wv.iter_mut().zip(&wp) {
                *v = T::load16(p.add(i));
            }
            for (a, &p) in acc.iter_mut().zip(&xp) {
                let xv = _mm512_loadu_ps(p.add(i));
                for (a, &wv) in a.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xv, wv, *a);
                }
            }
            i += 16;
        }
        for ((sum, a), &p) in sums.iter_mut().zip(&acc).zip(&xp) {
            for ((s, &a), &q) in sum.iter_mut().zip(a).zip(&wp) {
                *s = _mm512_reduce_add_ps(a);
                for t in i..n {
                    *s += *p.add(t) * (*q.add(t)).to_f32();
                }
            }
        }
    }
    sums
}

/// As the AVX2 value sum, sixteen lanes wide (four vectors: 64 values of each output row per
/// pass).
///
/// # Safety
/// As the AVX2 one, with AVX-512F.
#[inline(always)]
unsafe fn weighted_sum_impl<T: Load16, const R: usize>(
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
        while base + 64 <= d {
            let mut acc = [[_mm512_setzero_ps(); 4]; R];
            for (t, &off) in offsets[..len].iter().enumerate() {
                let row = vp.add(off + base);
                let mut v = [_mm512_setzero_ps(); 4];
                for (q, v) in v.iter_mut().enumerate() {
                    *v = T::load16(row.add(16 * q));
                }
                for (a, p) in acc.iter_mut().zip(&p) {
                    let w = _mm512_set1_ps(*p.get_unchecked(t));
                    for (a, &v) in a.iter_mut().zip(&v) {
                        *a = _mm512_fmadd_ps(w, v, *a);
                    }
                }
            }
            for (a, &o) in acc.iter().zip(&op) {
                for (q, &a) in a.iter().enumerate() {
                    _mm512_storeu_ps(o.add(base + 16 * q), a);
                }
            }
            base += 64;
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

macro_rules! tile_entry {
    ($t:ty, $tile:ident, $wsum:ident) => {
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        pub(crate) unsafe fn $wsum<const R: usize>(
            p: [&[f32]; R],
            values: &[$t],
            offsets: &[usize],
            out: [&mut [f32]; R],
        ) {
            // SAFETY: the caller checked AVX-512F and the offsets.
            unsafe { weighted_sum_impl(p, values, offsets, out) }
        }
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        pub(crate) unsafe fn $tile<const R: usize, const C: usize>(
            x: [&[f32]; R],
            w: [&[$t]; C],
        ) -> [[f32; C]; R] {
            // SAFETY: the caller checked AVX-512F.
            unsafe { tile_impl(x, w) }
        }
    };
}

tile_entry!(f32, tile_f32, wsum_f32);
tile_entry!(bf16, tile_bf16, wsum_bf16);
tile_entry!(f16, tile_f16, wsum_f16);
