//! Activation rows quantized once for several tiled products that read the same input — q, k
//! and v, or gate and up, when their formats kept them from stacking into one matrix (a Q4_K_M
//! file's Q6_K value projections) — and, where an RMSNorm produces that input, normalized and
//! quantized in one pass, so the normalized rows are never written out and read back.

use rayon::prelude::*;

use super::blocks::{quantize_act256, quantize_act32, Act256, Act32, Format};
use super::{quantize_rows, tiles, PackedMatrix, PARALLEL_ROWS};

/// The activations of `m` rows of `k` values, in the blocks one family of formats reads.
#[derive(Debug, Clone)]
pub struct QuantizedRows {
    blocks: Blocks,
    k: usize,
    m: usize,
}

/// The two activation layouts: 32-value blocks (Q8_0, Q4_0), 256-value blocks (Q4_K, Q6_K).
#[derive(Debug, Clone)]
enum Blocks {
    Small(Vec<Act32>),
    Large(Vec<Act256>),
}

/// An RMSNorm's weight and epsilon, and how its element type rounds (the norm's arithmetic is
/// done as the model's dtype does it, so the fused rows equal the unfused ones exactly).
#[derive(Debug, Clone, Copy)]
pub struct RmsNormSpec<'a> {
    /// The per-column weight, widened to f32.
    pub weight: &'a [f32],
    /// Added to the mean square.
    pub eps: f32,
    /// A value rounded to the model's dtype (identity for f32).
    pub round: fn(f32) -> f32,
}

impl QuantizedRows {
    /// `x` (`m` rows of `k`) quantized for products with weights of `format`.
    ///
    /// # Panics
    /// When `k` is zero or `x` not whole rows of `k` whole blocks (a caller bug).
    pub fn new(x: &[f32], k: usize, format: Format) -> Self {
        Self::build(x, k, format, None)
    }

    /// Each row of `x` normalized by `norm` — `round(round(v / m) · w)` with
    /// `m = round(√(Σv²/k + eps))`, as candle's RMSNorm computes in the model's dtype — then
    /// quantized for `format`, one block at a time.
    ///
    /// # Panics
    /// As [`QuantizedRows::new`], and when the weight is not `k` wide.
    pub fn rms_normed(x: &[f32], k: usize, norm: &RmsNormSpec<'_>, format: Format) -> Self {
        assert_eq!(norm.weight.len(), k, "norm weight of {k}");
        Self::build(x, k, format, Some(norm))
    }

    fn build(x: &[f32], k: usize, format: Format, norm: Option<&RmsNormSpec<'_>>) -> Self {
        let block = format.block_values();
        assert!(
            k > 0 && k.is_multiple_of(block) && x.len().is_multiple_of(k),
            "{} values are not rows of {k} in blocks of {block}",
            x.len()
        );
        let m = x.len() / k;
        let blocks = match block {
            32 => Blocks::Small(quantized(x, (k, 32), norm, quantize_act32)),
            _ => Blocks::Large(quantized(x, (k, 256), norm, quantize_act256)),
        };
        Self { blocks, k, m }
    }

    /// Whether products with weights of `format`, `k` values wide, can read these rows.
    pub fn fits(&self, format: Format, k: usize) -> bool {
        let small = matches!(self.blocks, Blocks::Small(_));
        k == self.k && small == (format.block_values() == 32)
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.m
    }

    /// `out[m × n] = rows · Wᵀ` for `W` of `n × k` values in 16-row tiles.
    ///
    /// # Panics
    /// When the rows do not [`fit`](Self::fits) `w` or `out` is not `m × n` (a caller bug).
    pub fn matmul(&self, w: &PackedMatrix, out: &mut [f32]) {
        assert!(
            self.fits(w.format(), w.cols()),
            "rows of {} quantized for another format than {} × {} {}",
            self.k,
            w.rows(),
            w.cols(),
            w.format().name()
        );
        assert_eq!(
            out.len(),
            self.m * w.rows(),
            "output is not {} × {}",
            self.m,
            w.rows()
        );
        if self.m == 0 || w.rows() == 0 {
            return;
        }
        match &self.blocks {
            Blocks::Small(a) => tiles(w, &a.chunks_exact(self.k / 32).collect::<Vec<_>>(), out),
            Blocks::Large(a) => tiles(w, &a.chunks_exact(self.k / 256).collect::<Vec<_>>(), out),
        }
    }
}

/// Every row of `x` quantized by `quantize` (after `norm`, where given), in order; a prompt's
/// rows in parallel.
fn quantized<A: Send>(
    x: &[f32],
    (k, block): (usize, usize),
    norm: Option<&RmsNormSpec<'_>>,
    quantize: fn(&[f32], &mut Vec<A>),
) -> Vec<A> {
    let Some(norm) = norm else {
        let mut acts = Vec::new();
        quantize_rows(x, k, &mut acts, quantize);
        return acts;
    };
    let row = |x: &[f32]| {
        let mut out = Vec::with_capacity(k / block);
        normed_row(x, (norm, block), quantize, &mut out);
        out
    };
    // The same split as `quantize_rows`: a prompt's rows in parallel, decode's one row serial.
    if x.len() / k < PARALLEL_ROWS {
        return x.chunks_exact(k).flat_map(row).collect();
    }
    // Rayon's collect keeps the rows in order.
    x.par_chunks_exact(k).flat_map_iter(row).collect()
}

/// One row normalized a block (of `size` ≤ 256 values) at a time into a buffer on the stack, each
/// block quantized as it is done.
fn normed_row<A>(
    x: &[f32],
    (norm, size): (&RmsNormSpec<'_>, usize),
    quantize: fn(&[f32], &mut Vec<A>),
    out: &mut Vec<A>,
) {
    use crate::norm::{add_squares, divisor, value};
    let round = norm.round;
    // The unfused norm's arithmetic (`crate::norm`): the same rounding, so the same values.
    let m = divisor(add_squares(0.0, x), x.len(), norm.eps, round);
    let mut block = [0f32; 256];
    let mut one = Vec::with_capacity(1);
    for (x, w) in x.chunks_exact(size).zip(norm.weight.chunks_exact(size)) {
        for ((b, &v), &w) in block.iter_mut().zip(x).zip(w) {
            *b = value(v, m, w, round);
        }
        quantize(&block[..size], &mut one);
        out.append(&mut one);
    }
}
