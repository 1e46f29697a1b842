//! The SIMD algorithms once, over a register type: AVX2's 8-lane `__m256` and AVX-512's 16-lane
//! `__m512` each implement [`Vector`] (and [`Widen`] for every storage type), and their modules
//! instantiate these functions inside `#[target_feature]` entry points, where the `#[inline(always)]`
//! operations below compile to the ISA's instructions.
//!
//! Every function is `unsafe`: the CPU must have the features of the register type used, and the
//! pointers derived from the slices must stay inside them, as each function's loops ensure.

use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};

/// A register of f32 lanes.
pub(crate) trait Vector: Copy {
    /// f32 lanes per register.
    const LANES: usize;
    /// All lanes zero.
    unsafe fn zero() -> Self;
    /// `LANES` f32 at `p`.
    unsafe fn load(p: *const f32) -> Self;
    /// Stores the lanes at `p`.
    unsafe fn store(self, p: *mut f32);
    /// Every lane `v`.
    unsafe fn splat(v: f32) -> Self;
    /// `a · b + acc`, fused.
    unsafe fn fma(a: Self, b: Self, acc: Self) -> Self;
    /// Lane-wise `a + b`.
    unsafe fn add(a: Self, b: Self) -> Self;
    /// The sum of the lanes.
    unsafe fn sum(self) -> f32;
}

/// A storage type whose `V::LANES` consecutive elements load into a register of f32.
pub(super) trait Widen<V: Vector>: Copy {
    /// `V::LANES` elements at `p`, as f32.
    unsafe fn widen(p: *const Self) -> V;
    /// One element as f32 (the scalar tails).
    fn to_f32(self) -> f32;
}

/// Σ x·w, four registers of partial sums.
#[inline(always)]
pub(super) unsafe fn dot<V: Vector, T: Widen<V>>(x: &[f32], w: &[T]) -> f32 {
    let n = x.len().min(w.len());
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let l = V::LANES;
    let mut sum = 0.0;
    // SAFETY: every load below stays under `n` elements of both slices.
    unsafe {
        let mut acc = [V::zero(); 4];
        let mut i = 0;
        while i + 4 * l <= n {
            for (j, a) in acc.iter_mut().enumerate() {
                let o = i + l * j;
                *a = V::fma(V::load(xp.add(o)), T::widen(wp.add(o)), *a);
            }
            i += 4 * l;
        }
        while i + l <= n {
            acc[0] = V::fma(V::load(xp.add(i)), T::widen(wp.add(i)), acc[0]);
            i += l;
        }
        sum += V::add(V::add(acc[0], acc[1]), V::add(acc[2], acc[3])).sum();
        while i < n {
            sum += *xp.add(i) * (*wp.add(i)).to_f32();
            i += 1;
        }
    }
    sum
}

/// A tile of dot products: `R` activation rows against `C` weight rows, each weight loaded and
/// widened once for the `R` rows and each activation once for the `C` weight rows — `R·C` FMAs
/// per `R + C` loads, so a batch of decode rows runs at the FMA peak rather than the load ports'.
/// `R·C` accumulators plus `C + 1` loaded registers must fit the register file (AVX2: 16, so
/// 4 × 2; AVX-512: 32, so 4 × 4), or the accumulators spill. `ahead` bytes past each weight
/// row's reads are requested from memory as they go (0: none; the check outside the loop, so
/// attention's short rows pay nothing for it).
#[inline(always)]
pub(super) unsafe fn tile<V: Vector, T: Widen<V>, const R: usize, const C: usize>(
    x: [&[f32]; R],
    w: [&[T]; C],
    ahead: usize,
) -> [[f32; C]; R] {
    // SAFETY: the caller's promises.
    unsafe {
        if ahead > 0 {
            tile_ahead::<V, T, R, C, true>(x, w, ahead)
        } else {
            tile_ahead::<V, T, R, C, false>(x, w, 0)
        }
    }
}

/// [`tile`], prefetching or not.
#[inline(always)]
unsafe fn tile_ahead<V: Vector, T: Widen<V>, const R: usize, const C: usize, const AHEAD: bool>(
    x: [&[f32]; R],
    w: [&[T]; C],
    ahead: usize,
) -> [[f32; C]; R] {
    let n = x
        .iter()
        .map(|r| r.len())
        .chain(w.iter().map(|r| r.len()))
        .min()
        .unwrap_or(0);
    let (xp, wp) = (x.map(<[f32]>::as_ptr), w.map(<[T]>::as_ptr));
    let l = V::LANES;
    let mut sums = [[0f32; C]; R];
    // SAFETY: every load below stays under `n` elements of every slice.
    unsafe {
        let mut acc = [[V::zero(); C]; R];
        let mut i = 0;
        while i + l <= n {
            // Loops, not closures: a closure would not inherit the caller's target features,
            // and the widening instructions would not inline.
            let mut wv = [V::zero(); C];
            for (v, &p) in wv.iter_mut().zip(&wp) {
                *v = T::widen(p.add(i));
                if AHEAD {
                    // A hint: never faults, whatever the address.
                    _mm_prefetch::<_MM_HINT_T0>(p.add(i).cast::<i8>().wrapping_add(ahead));
                }
            }
            for (a, &p) in acc.iter_mut().zip(&xp) {
                let xv = V::load(p.add(i));
                for (a, &wv) in a.iter_mut().zip(&wv) {
                    *a = V::fma(xv, wv, *a);
                }
            }
            i += l;
        }
        for ((sum, a), &p) in sums.iter_mut().zip(&acc).zip(&xp) {
            for ((s, &a), &q) in sum.iter_mut().zip(a).zip(&wp) {
                *s = a.sum();
                for t in i..n {
                    *s += *p.add(t) * (*q.add(t)).to_f32();
                }
            }
        }
    }
    sums
}

/// Attention's value sum for R query heads at once:
/// `out[r] = Σₜ p[r][t] · values[offsets[t]..][..d]`. Each value row is loaded and widened once
/// for the R heads, and the outputs stay in registers across every position (four registers of
/// each output row at a time) instead of being loaded and stored per position.
///
/// The caller keeps every `offsets[t] + out[r].len()` inside `values`.
#[inline(always)]
pub(super) unsafe fn weighted_sum<V: Vector, T: Widen<V>, const R: usize>(
    p: [&[f32]; R],
    values: &[T],
    offsets: &[usize],
    out: [&mut [f32]; R],
) {
    let d = out.iter().map(|o| o.len()).min().unwrap_or(0);
    let len = p.iter().map(|p| p.len()).fold(offsets.len(), usize::min);
    let vp = values.as_ptr();
    let op = out.map(|o| o.as_mut_ptr());
    let l = V::LANES;
    let mut base = 0;
    // SAFETY: the caller keeps every row inside `values`; outputs are written below `d`.
    unsafe {
        while base + 4 * l <= d {
            let mut acc = [[V::zero(); 4]; R];
            for (a, &o) in acc.iter_mut().zip(&op) {
                for (q, a) in a.iter_mut().enumerate() {
                    *a = V::load(o.add(base + l * q));
                }
            }
            for (t, &off) in offsets[..len].iter().enumerate() {
                let row = vp.add(off + base);
                let mut v = [V::zero(); 4];
                for (q, v) in v.iter_mut().enumerate() {
                    *v = T::widen(row.add(l * q));
                }
                for (a, p) in acc.iter_mut().zip(&p) {
                    let w = V::splat(*p.get_unchecked(t));
                    for (a, &v) in a.iter_mut().zip(&v) {
                        *a = V::fma(w, v, *a);
                    }
                }
            }
            for (a, &o) in acc.iter().zip(&op) {
                for (q, &a) in a.iter().enumerate() {
                    a.store(o.add(base + l * q));
                }
            }
            base += 4 * l;
        }
        for i in base..d {
            for (p, &o) in p.iter().zip(&op) {
                let mut sum = *o.add(i);
                for (&pt, &off) in p[..len].iter().zip(&offsets[..len]) {
                    sum += pt * (*vp.add(off + i)).to_f32();
                }
                *o.add(i) = sum;
            }
        }
    }
}

/// `y += a·w`.
#[inline(always)]
pub(super) unsafe fn axpy<V: Vector, T: Widen<V>>(a: f32, w: &[T], y: &mut [f32]) {
    let n = y.len().min(w.len());
    let (wp, yp) = (w.as_ptr(), y.as_mut_ptr());
    let l = V::LANES;
    // SAFETY: every access below stays under `n` elements of both slices.
    unsafe {
        let av = V::splat(a);
        let mut i = 0;
        while i + l <= n {
            V::fma(av, T::widen(wp.add(i)), V::load(yp.add(i))).store(yp.add(i));
            i += l;
        }
        while i < n {
            *yp.add(i) += a * (*wp.add(i)).to_f32();
            i += 1;
        }
    }
}

/// `out = w` as f32.
#[inline(always)]
pub(super) unsafe fn widen<V: Vector, T: Widen<V>>(w: &[T], out: &mut [f32]) {
    let n = out.len().min(w.len());
    let (wp, op) = (w.as_ptr(), out.as_mut_ptr());
    let l = V::LANES;
    // SAFETY: every access below stays under `n` elements of both slices.
    unsafe {
        let mut i = 0;
        while i + l <= n {
            T::widen(wp.add(i)).store(op.add(i));
            i += l;
        }
        while i < n {
            *op.add(i) = (*wp.add(i)).to_f32();
            i += 1;
        }
    }
}
