//! The storage types weights and caches come in, and their primitives with run-time dispatch.

use half::{bf16, f16};

use crate::simd::portable;

/// A storage type for weights and cached keys/values: f32, bf16 or f16. Products accumulate in
/// f32 whatever the storage.
pub trait Element: Copy + Send + Sync + 'static {
    /// Σ xᵢ·wᵢ over the shorter of the two slices.
    fn dot(x: &[f32], w: &[Self]) -> f32;
    /// [`dot`](Self::dot) of every activation row of `x` with every weight row of `w`, each
    /// loaded once (`R ≤ 4`, `C ≤ 3` keep the tile in registers), asking memory for `ahead`
    /// bytes past each weight row's reads as they go (0: none; the SIMD paths only).
    fn tile<const R: usize, const C: usize>(
        x: [&[f32]; R],
        w: [&[Self]; C],
        ahead: usize,
    ) -> [[f32; C]; R];
    /// `out[r] += Σₜ p[r][t] · values[offsets[t]..][..d]` (`d` = `out[r].len()`): attention's
    /// sum of value rows for R query heads, each row read once for all of them, added to what
    /// `out` holds (a decode task sums its positions run by run).
    ///
    /// # Panics
    /// When a row lies outside `values`.
    fn weighted_sum<const R: usize>(
        p: [&[f32]; R],
        values: &[Self],
        offsets: &[usize],
        out: [&mut [f32]; R],
    );
    /// `y += a·w`, elementwise.
    fn axpy(a: f32, w: &[Self], y: &mut [f32]);
    /// `out = w` as f32.
    fn widen(w: &[Self], out: &mut [f32]);
    /// The slice itself when it already holds f32 (no widening needed).
    fn as_f32(w: &[Self]) -> Option<&[f32]>;
    /// The slice itself when it holds bf16 (the tile unit multiplies it in place).
    fn as_bf16(w: &[Self]) -> Option<&[bf16]>;
    /// The portable dot product, for tests against the SIMD one.
    #[cfg(test)]
    fn portable_dot(x: &[f32], w: &[Self]) -> f32;
    /// The tile at every level this CPU has (portable first), whatever `PIO_KERNELS` says.
    #[cfg(test)]
    fn tile_each_level<const R: usize, const C: usize>(
        x: [&[f32]; R],
        w: [&[Self]; C],
    ) -> Vec<[[f32; C]; R]>;
}

macro_rules! element {
    ($t:ty, $has:ident, $to_f32:expr, $as_f32:expr, $as_bf16:expr, $dot:ident, $tile:ident, $wsum:ident, $axpy:ident, $widen:ident) => {
        impl Element for $t {
            #[inline]
            fn dot(x: &[f32], w: &[Self]) -> f32 {
                #[cfg(target_arch = "x86_64")]
                if crate::simd::$has() {
                    // SAFETY: the features were just checked.
                    return unsafe { crate::simd::avx2::$dot(x, w) };
                }
                portable::dot(x, w, $to_f32)
            }

            #[inline]
            fn tile<const R: usize, const C: usize>(
                x: [&[f32]; R],
                w: [&[Self]; C],
                ahead: usize,
            ) -> [[f32; C]; R] {
                #[cfg(target_arch = "x86_64")]
                if crate::simd::has_avx512() {
                    // SAFETY: the features were just checked.
                    return unsafe { crate::simd::avx512::$tile(x, w, ahead) };
                }
                #[cfg(target_arch = "x86_64")]
                if crate::simd::$has() {
                    // SAFETY: the features were just checked.
                    return unsafe { crate::simd::avx2::$tile(x, w, ahead) };
                }
                let _ = ahead;
                portable::tile(x, w, $to_f32)
            }

            #[inline]
            fn weighted_sum<const R: usize>(
                p: [&[f32]; R],
                values: &[Self],
                offsets: &[usize],
                out: [&mut [f32]; R],
            ) {
                let d = out.iter().map(|o| o.len()).max().unwrap_or(0);
                assert!(
                    offsets.iter().all(|&o| o + d <= values.len()),
                    "a value row lies outside the values"
                );
                #[cfg(target_arch = "x86_64")]
                if crate::simd::has_avx512() {
                    // SAFETY: the features and the offsets were just checked.
                    return unsafe { crate::simd::avx512::$wsum(p, values, offsets, out) };
                }
                #[cfg(target_arch = "x86_64")]
                if crate::simd::$has() {
                    // SAFETY: as above.
                    return unsafe { crate::simd::avx2::$wsum(p, values, offsets, out) };
                }
                portable::weighted_sum(p, values, offsets, out, $to_f32)
            }

            #[inline]
            fn axpy(a: f32, w: &[Self], y: &mut [f32]) {
                #[cfg(target_arch = "x86_64")]
                if crate::simd::$has() {
                    // SAFETY: the features were just checked.
                    return unsafe { crate::simd::avx2::$axpy(a, w, y) };
                }
                portable::axpy(a, w, y, $to_f32)
            }

            #[inline]
            fn widen(w: &[Self], out: &mut [f32]) {
                #[cfg(target_arch = "x86_64")]
                if crate::simd::$has() {
                    // SAFETY: the features were just checked.
                    return unsafe { crate::simd::avx2::$widen(w, out) };
                }
                for (o, &v) in out.iter_mut().zip(w) {
                    *o = $to_f32(v);
                }
            }

            fn as_f32(w: &[Self]) -> Option<&[f32]> {
                $as_f32(w)
            }

            fn as_bf16(w: &[Self]) -> Option<&[bf16]> {
                $as_bf16(w)
            }

            #[cfg(test)]
            fn portable_dot(x: &[f32], w: &[Self]) -> f32 {
                portable::dot(x, w, $to_f32)
            }

            #[cfg(test)]
            fn tile_each_level<const R: usize, const C: usize>(
                x: [&[f32]; R],
                w: [&[Self]; C],
            ) -> Vec<[[f32; C]; R]> {
                #[allow(unused_mut)]
                let mut all = vec![portable::tile(x, w, $to_f32)];
                #[cfg(target_arch = "x86_64")]
                {
                    use crate::matmul::PREFETCH;
                    use crate::simd::Level;
                    if Level::detected() >= Level::Avx2 {
                        // SAFETY: the CPU has the features.
                        all.push(unsafe { crate::simd::avx2::$tile(x, w, PREFETCH) });
                    }
                    if Level::detected() >= Level::Avx512 {
                        // SAFETY: as above.
                        all.push(unsafe { crate::simd::avx512::$tile(x, w, PREFETCH) });
                    }
                }
                all
            }
        }
    };
}

element!(
    f32,
    has_avx2,
    |v: f32| v,
    Some,
    |_| None,
    dot_f32,
    tile_f32,
    wsum_f32,
    axpy_f32,
    widen_f32
);
element!(
    bf16,
    has_avx2,
    bf16::to_f32,
    |_| None,
    Some,
    dot_bf16,
    tile_bf16,
    wsum_bf16,
    axpy_bf16,
    widen_bf16
);
element!(
    f16,
    has_f16c,
    f16::to_f32,
    |_| None,
    |_| None,
    dot_f16,
    tile_f16,
    wsum_f16,
    axpy_f16,
    widen_f16
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::data;

    fn check<T: Element>(from: fn(f32) -> T, to: fn(T) -> f32) {
        // Lengths around every unrolled width (32, 8) and the scalar tail.
        for n in [0, 1, 7, 8, 9, 31, 32, 33, 100, 1024, 1031] {
            let x = data(n, 1);
            let w: Vec<T> = data(n, 2).into_iter().map(from).collect();
            let exact: f64 = x
                .iter()
                .zip(&w)
                .map(|(&a, &b)| a as f64 * to(b) as f64)
                .sum();
            let tol = 1e-5 * (n as f64).max(1.0);
            assert!((T::dot(&x, &w) as f64 - exact).abs() < tol, "dot, n = {n}");
            assert!(
                (T::portable_dot(&x, &w) as f64 - exact).abs() < tol,
                "portable dot, n = {n}"
            );

            let rows = [data(n, 4), data(n, 5), x.clone(), data(n, 6)];
            let ws: Vec<Vec<T>> = (7..10)
                .map(|s| data(n, s).into_iter().map(from).collect())
                .collect();
            let levels = T::tile_each_level(
                [&rows[0], &rows[1], &rows[2], &rows[3]],
                [&ws[0], &ws[1], &ws[2]],
            );
            for (level, tile) in levels.into_iter().enumerate() {
                for (r, got) in rows.iter().zip(tile) {
                    for (wr, got) in ws.iter().zip(got) {
                        let exact: f64 = r
                            .iter()
                            .zip(wr)
                            .map(|(&a, &b)| a as f64 * to(b) as f64)
                            .sum();
                        assert!(
                            (got as f64 - exact).abs() < tol,
                            "tile at level {level}, n = {n}"
                        );
                    }
                }
            }

            // Value sums: rows scattered at odd offsets, output widths around the unrolled 32/64.
            for d in [1, 8, 31, 32, 40, 64, 100, 128] {
                if n < d {
                    continue;
                }
                let offsets: Vec<usize> = (0..5).map(|t| (t * 7) % (n - d + 1)).collect();
                let p = [data(5, 11), data(5, 12), data(5, 13)];
                // What the outputs hold beforehand is added to.
                let mut out = [data(d, 14), data(d, 15), data(d, 16)];
                let before = out.clone();
                let [o0, o1, o2] = &mut out;
                T::weighted_sum([&p[0], &p[1], &p[2]], &w, &offsets, [o0, o1, o2]);
                for ((p, out), before) in p.iter().zip(&out).zip(&before) {
                    for (i, got) in out.iter().enumerate() {
                        let exact: f64 = before[i] as f64
                            + p.iter()
                                .zip(&offsets)
                                .map(|(&p, &o)| p as f64 * to(w[o + i]) as f64)
                                .sum::<f64>();
                        assert!(
                            (*got as f64 - exact).abs() < 1e-5,
                            "weighted sum, n = {n}, d = {d}"
                        );
                    }
                }
            }

            let mut y = data(n, 3);
            let expected: Vec<f32> = y.iter().zip(&w).map(|(&y, &w)| y + 0.5 * to(w)).collect();
            T::axpy(0.5, &w, &mut y);
            for (a, b) in y.iter().zip(&expected) {
                assert!((a - b).abs() < 1e-6, "axpy, n = {n}");
            }

            let mut out = vec![0.0; n];
            T::widen(&w, &mut out);
            assert!(
                out.iter().zip(&w).all(|(&o, &w)| o == to(w)),
                "widen, n = {n}"
            );
        }
    }

    #[test]
    fn f32_primitives_match_the_reference() {
        check::<f32>(|v| v, |v| v);
    }

    #[test]
    fn bf16_primitives_match_the_reference() {
        check::<bf16>(bf16::from_f32, bf16::to_f32);
    }

    #[test]
    fn f16_primitives_match_the_reference() {
        check::<f16>(f16::from_f32, f16::to_f32);
    }
}
