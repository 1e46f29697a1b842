//! `y = x Wᵀ` with `W` in PyTorch's Linear layout (`n × k`, row-major) and f32 activations.
//!
//! Decode multiplies one (or a few) rows: the product is bound by reading the weights, so each
//! weight row is streamed once, widened in registers and dotted with every activation row, the
//! rows split over threads. Prefill multiplies hundreds of rows: the product is bound by
//! arithmetic, so it runs a packed, cache-blocked GEMM (`matrixmultiply`) on column blocks of the
//! output, one per thread, widening bf16/f16 weights block by block into a per-thread buffer —
//! or, for bf16 weights and activations on a CPU with AMX, on its tiles (`amx`).

use std::cell::RefCell;

use rayon::prelude::*;

use crate::parallel::{ranges, SharedMut};
use crate::stacked::StackedRows;
use crate::Element;

/// From this many activation rows on, the packed GEMM beats streaming f32 weights once for all
/// rows.
pub const GEMM_ROWS: usize = 32;

/// The same for weights stored narrower than f32: the GEMM would first widen every weight into
/// memory, while streaming widens in registers, so streaming wins for longer (a batch of decode
/// rows).
pub const GEMM_ROWS_NARROW: usize = 48;

/// From this many rows bf16 products take AMX tiles where the CPU has them: already twice the
/// streamed products' speed at 8 rows (a tile pads them to 32, but reads each weight once).
pub const AMX_ROWS: usize = 8;

/// Rows from which `T`'s weights go through the GEMM.
fn gemm_rows<T: Element>() -> usize {
    if T::as_f32(&[]).is_some() {
        GEMM_ROWS
    } else {
        GEMM_ROWS_NARROW
    }
}

/// How far past each weight row's reads a streamed product asks memory for lines, in bytes.
/// The hardware prefetcher alone leaves the core waiting on memory: bf16 decode from memory went
/// from a median 14.0 to 17.7 GB/s with it (the matmul bench's decode line, each distance
/// alternated with none inside one process, on the 2-vCPU AVX-512 Xeon; 1 KiB: 16.6, 2 KiB less
/// still). A product's rows lie back to back, so past a row's end this reaches the rows that
/// follow.
pub(crate) const PREFETCH: usize = 512;

/// Widened weights per GEMM block, in f32 elements (4 MiB: a block stays in the L3 cache).
const BLOCK_ELEMENTS: usize = 1 << 20;

/// `out[m × n] = x[m × k] · w[n × k]ᵀ`.
///
/// # Panics
/// When a slice's length does not match the dimensions (a caller bug, not an input error).
pub fn matmul<T: Element>(x: &[f32], w: &[T], m: usize, k: usize, n: usize, out: &mut [f32]) {
    matmul_stacked(x, std::slice::from_ref(&w), m, k, n, out);
}

/// [`matmul`] for weights stacked from `parts` (row-major, `k` wide, part 0's rows first, `n`
/// rows in all) that lie apart in memory: the same sums, bit for bit, as over the parts copied
/// together.
///
/// # Panics
/// When a slice's length does not match the dimensions (a caller bug, not an input error).
pub fn matmul_stacked<T: Element>(
    x: &[f32],
    parts: &[&[T]],
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
) {
    assert_eq!(x.len(), m * k, "activations are not {m} × {k}");
    let values: usize = parts.iter().map(|p| p.len()).sum();
    assert_eq!(values, n * k, "weights are not {n} × {k}");
    assert_eq!(out.len(), m * n, "output is not {m} × {n}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        return out.fill(0.0);
    }
    let w = StackedRows::new(parts, k);
    if m >= AMX_ROWS && on_tiles(x, w, m, out) {
        return;
    }
    if m < gemm_rows::<T>() {
        streamed(x, w, n, out);
    } else {
        blocked(x, &Stored(w), m, k, n, out);
    }
}

/// The product on AMX tiles, where the CPU has them, the weights are bf16 and so is every
/// activation (false: nothing written, the caller's GEMM runs).
fn on_tiles<T: Element>(x: &[f32], w: StackedRows<'_, T>, m: usize, out: &mut [f32]) -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        let parts: Option<Vec<&[crate::bf16]>> = w.parts().iter().map(|p| T::as_bf16(p)).collect();
        if let Some(parts) = parts {
            let (k, n) = (w.k(), w.rows());
            let w = StackedRows::new(&parts, k);
            return crate::amx::matmul(x, w, (m, k, n), out, crate::amx::Split::Pool);
        }
    }
    let _ = (x, w, m, out);
    false
}

/// Each weight row read once for every activation row, in register tiles of up to four
/// activation rows by two (AVX2) or four (AVX-512) weight rows: each weight widened once per four
/// rows, each activation loaded once per tile.
fn streamed<T: Element>(x: &[f32], w: StackedRows<'_, T>, n: usize, out: &mut [f32]) {
    let k = w.k();
    let parts = ranges(n, rayon::current_num_threads() * 4, 64, 4);
    let y = SharedMut::new(out);
    let xs: Vec<&[f32]> = x.chunks_exact(k).collect();
    parts.into_par_iter().for_each(|cols| {
        // SAFETY: this task alone writes columns `cols` of the m × n output.
        unsafe { dots(&xs, cols.clone(), |j| w.row(j), n, y, PREFETCH) };
    });
}

/// `y[r · n + j] = xs[r] · row(j)` for every activation row `r` and every `j` in `cols`, in
/// register tiles (see [`streamed`]), asking memory for `ahead` bytes past each row's reads (0:
/// none); `row(j)` may lie anywhere (attention reads keys through a block table).
///
/// # Safety
/// `y` holds `xs.len() × n` elements, `cols` lies inside `0..n`, and nothing else writes the
/// columns `cols` meanwhile.
pub(crate) unsafe fn dots<'w, T: Element>(
    xs: &[&[f32]],
    cols: std::ops::Range<usize>,
    row: impl Fn(usize) -> &'w [T],
    n: usize,
    y: SharedMut<f32>,
    ahead: usize,
) {
    let mut j = cols.start;
    while j < cols.end {
        let c = (cols.end - j).min(crate::simd::tile_cols());
        match c {
            4 => tiles::<T, 4>(
                xs,
                [row(j), row(j + 1), row(j + 2), row(j + 3)],
                j,
                n,
                y,
                ahead,
            ),
            3 => tiles::<T, 3>(xs, [row(j), row(j + 1), row(j + 2)], j, n, y, ahead),
            2 => tiles::<T, 2>(xs, [row(j), row(j + 1)], j, n, y, ahead),
            _ => tiles::<T, 1>(xs, [row(j)], j, n, y, ahead),
        }
        j += c;
    }
}

/// Every activation row against the weight rows `j..j + C`, four activation rows at a time.
fn tiles<T: Element, const C: usize>(
    xs: &[&[f32]],
    w: [&[T]; C],
    j: usize,
    n: usize,
    y: SharedMut<f32>,
    ahead: usize,
) {
    let store = |first: usize, sums: &[[f32; C]]| {
        for (r, row) in sums.iter().enumerate() {
            for (c, &v) in row.iter().enumerate() {
                // SAFETY: (first + r, j + c) is inside the m × n output, and only this task
                // writes columns j..j + C.
                unsafe { *y.at((first + r) * n + j + c) = v };
            }
        }
    };
    let mut quads = xs.chunks_exact(4);
    for (q, x) in quads.by_ref().enumerate() {
        store(4 * q, &T::tile([x[0], x[1], x[2], x[3]], w, ahead));
    }
    let done = xs.len() - quads.remainder().len();
    match quads.remainder() {
        [a, b, c] => store(done, &T::tile([*a, *b, *c], w, ahead)),
        [a, b] => store(done, &T::tile([*a, *b], w, ahead)),
        [a] => store(done, &T::tile([*a], w, ahead)),
        _ => {}
    }
}

thread_local! {
    /// Each pool thread's buffer of widened weights, kept between calls.
    static WIDENED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A weight matrix (`n × k`, one row per output) that the GEMM path reads as f32, block of rows by
/// block of rows: stored in a float type, or in a block-quantized format the caller decodes.
pub trait WeightRows: Sync {
    /// The whole matrix, when it is stored as f32 already (read in place).
    fn as_f32(&self) -> Option<&[f32]> {
        None
    }
    /// Writes rows `rows` (each `k` wide) as f32 into `out` (`rows.len() × k`).
    fn widen_rows(&self, rows: std::ops::Range<usize>, k: usize, out: &mut [f32]);
}

/// Weights in a float storage type.
struct Stored<'a, T>(StackedRows<'a, T>);

impl<T: Element> WeightRows for Stored<'_, T> {
    fn as_f32(&self) -> Option<&[f32]> {
        match self.0.parts() {
            [one] => T::as_f32(one),
            _ => None,
        }
    }

    fn widen_rows(&self, rows: std::ops::Range<usize>, k: usize, out: &mut [f32]) {
        let mut at = 0;
        for piece in self.0.pieces(rows) {
            T::widen(piece, &mut out[at..at + piece.len()]);
            at += piece.len();
        }
        debug_assert_eq!(at, out.len(), "rows of {k} values");
    }
}

/// `out[m × n] = x[m × k] · wᵀ` through the packed GEMM whatever `m`, for weights the caller
/// decodes (e.g. quantized blocks): worth it from a few dozen rows on, when decoding each weight
/// once costs less than the quantized product per row.
///
/// # Panics
/// When a slice's length does not match the dimensions (a caller bug, not an input error).
pub fn matmul_rows(x: &[f32], w: &dyn WeightRows, m: usize, k: usize, n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), m * k, "activations are not {m} × {k}");
    assert_eq!(out.len(), m * n, "output is not {m} × {n}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        return out.fill(0.0);
    }
    blocked(x, w, m, k, n, out);
}

/// Packed GEMM over column blocks of the output.
fn blocked(x: &[f32], w: &dyn WeightRows, m: usize, k: usize, n: usize, out: &mut [f32]) {
    let parts = ranges(n, rayon::current_num_threads(), 16, 16);
    let y = SharedMut::new(out);
    let gemm = |b: &[f32], cols: std::ops::Range<usize>| {
        // SAFETY: `b` holds `cols.len()` rows of k weights; the output block is the columns
        // `cols` of the m × n output, which only this task writes; strides match the layouts.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                cols.len(),
                1.0,
                x.as_ptr(),
                k as isize,
                1,
                b.as_ptr(),
                1,
                k as isize,
                0.0,
                y.at(cols.start),
                n as isize,
                1,
            )
        }
    };
    parts.into_par_iter().for_each(|cols| {
        if let Some(w) = w.as_f32() {
            return gemm(&w[cols.start * k..cols.end * k], cols);
        }
        let block = (BLOCK_ELEMENTS / k).max(16);
        WIDENED.with_borrow_mut(|buf| {
            buf.resize(block.min(cols.len()) * k, 0.0);
            for start in cols.clone().step_by(block) {
                let end = (start + block).min(cols.end);
                let b = &mut buf[..(end - start) * k];
                w.widen_rows(start..end, k, b);
                gemm(b, start..end);
            }
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::data;
    use half::{bf16, f16};

    fn check<T: Element>(from: fn(f32) -> T, to: fn(T) -> f32) {
        // Both paths (m below and above GEMM_ROWS and GEMM_ROWS_NARROW), tiles with leftover
        // rows and columns, odd widths, a head-like wide output.
        for (m, k, n) in [
            (1, 64, 300),
            (3, 33, 17),
            (5, 40, 23),
            (6, 128, 96),
            (13, 72, 50),
            (20, 70, 130),
            (50, 40, 70),
            (1, 1, 1),
        ] {
            let x = data(m * k, 1);
            let w: Vec<T> = data(n * k, 2).into_iter().map(from).collect();
            let mut out = vec![f32::NAN; m * n];
            matmul(&x, &w, m, k, n, &mut out);
            for i in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|l| x[i * k + l] as f64 * to(w[j * k + l]) as f64)
                        .sum();
                    let got = out[i * n + j] as f64;
                    assert!(
                        (got - exact).abs() < 1e-4,
                        "({m}, {k}, {n}) at ({i}, {j}): {got} vs {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn f32_products_match_the_reference() {
        check::<f32>(|v| v, |v| v);
    }

    #[test]
    fn bf16_products_match_the_reference() {
        check::<bf16>(bf16::from_f32, bf16::to_f32);
    }

    /// bf16 weights with bf16 activations, as in a bf16 model: from 8 rows the product runs on
    /// AMX tiles where the CPU has them, else streamed or through the GEMM; the sums match.
    #[test]
    fn bf16_model_products_match_the_reference() {
        for (m, k, n) in [(8, 64, 40), (48, 64, 40), (100, 96, 33), (64, 40, 20)] {
            let x = crate::test_data::bf16_values(m * k, 1);
            let w: Vec<bf16> = data(n * k, 2).into_iter().map(bf16::from_f32).collect();
            let mut out = vec![f32::NAN; m * n];
            matmul(&x, &w, m, k, n, &mut out);
            for i in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|l| x[i * k + l] as f64 * w[j * k + l].to_f64())
                        .sum();
                    let got = out[i * n + j] as f64;
                    assert!((got - exact).abs() < 1e-4, "({m}, {k}, {n}) at ({i}, {j})");
                }
            }
        }
    }

    /// Weights stacked from parts lying apart give the parts-copied-together sums bit for bit,
    /// on every path (streamed, the GEMM, AMX tiles where the CPU has them: the activations are
    /// bf16 values), with parts that end inside a tile block and an empty one.
    fn stacked_check<T: Element>(from: fn(f32) -> T) {
        let (k, rows) = (64, [20, 0, 44, 36, 32]);
        let n: usize = rows.iter().sum();
        let w: Vec<T> = data(n * k, 2).into_iter().map(from).collect();
        let mut first = 0;
        let parts: Vec<Vec<T>> = rows
            .iter()
            .map(|r| {
                first += r;
                w[(first - r) * k..first * k].to_vec()
            })
            .collect();
        let parts: Vec<&[T]> = parts.iter().map(Vec::as_slice).collect();
        for m in [1, 5, 8, 33, 100] {
            let x = crate::test_data::bf16_values(m * k, 1);
            let (mut want, mut got) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            matmul(&x, &w, m, k, n, &mut want);
            matmul_stacked(&x, &parts, m, k, n, &mut got);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{m} rows");
        }
    }

    #[test]
    fn stacked_parts_give_the_copied_stacks_sums() {
        stacked_check::<f32>(|v| v);
        stacked_check::<bf16>(bf16::from_f32);
        stacked_check::<f16>(f16::from_f32);
    }

    #[test]
    fn f16_products_match_the_reference() {
        check::<f16>(f16::from_f32, f16::to_f32);
    }

    /// Rows decoded by the caller (here: stored as i8 with one scale per row).
    struct Scaled {
        q: Vec<i8>,
        scale: Vec<f32>,
    }

    impl WeightRows for Scaled {
        fn widen_rows(&self, rows: std::ops::Range<usize>, k: usize, out: &mut [f32]) {
            for (r, dst) in rows.zip(out.chunks_exact_mut(k)) {
                for (d, &q) in dst.iter_mut().zip(&self.q[r * k..(r + 1) * k]) {
                    *d = q as f32 * self.scale[r];
                }
            }
        }
    }

    #[test]
    fn caller_decoded_rows_match_the_reference() {
        let (m, k, n) = (3, 40, 50);
        let x = data(m * k, 1);
        let w = Scaled {
            q: (0..n * k).map(|i| (i % 13) as i8 - 6).collect(),
            scale: (0..n).map(|r| 0.01 * (r + 1) as f32).collect(),
        };
        let mut out = vec![f32::NAN; m * n];
        matmul_rows(&x, &w, m, k, n, &mut out);
        for i in 0..m {
            for j in 0..n {
                let exact: f32 = (0..k)
                    .map(|l| x[i * k + l] * w.q[j * k + l] as f32 * w.scale[j])
                    .sum();
                assert!((out[i * n + j] - exact).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn an_empty_inner_dimension_gives_zeros() {
        let mut out = vec![f32::NAN; 6];
        matmul::<f32>(&[], &[], 2, 0, 3, &mut out);
        assert!(out.iter().all(|&v| v == 0.0));
    }
}
