//! How the pool stores a cached row, and the two sweeps a decode part makes over its positions:
//! scores of the query heads against the key rows, then the value rows summed by probability.
//! Both go run by run of [`RUN`] positions with every key/value head of a run before the next
//! run, so a block's slots stream through the cache in order (head by head over all positions
//! would read pieces of each slot a whole slot apart, which no prefetcher follows), and each
//! run asks memory for the next one's rows as it goes.

use std::cell::RefCell;

use crate::parallel::SharedMut;
use crate::{kv_q8, Element};

/// Positions per run.
const RUN: usize = 16;

thread_local! {
    /// A run's rows widened to f32.
    static ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// How the pool stores a cached row of `d` values: as f32, bf16 or f16 elements, read in place,
/// or as the bytes of [`kv_q8`]'s Q8_0 rows.
///
/// In both sweeps query head `h` reads key/value head `h / groups`, whose row for position `i`
/// starts at `slots[i] + (h / groups) · units(d)`.
pub trait CachedRow: Copy + Send + Sync + 'static {
    /// Storage units one row of `d` values takes.
    fn units(d: usize) -> usize;
    /// `scores[h · n + i] = qs[h] · key(i)` for every query head and each of the `n` slots.
    fn score_part(
        qs: &[&[f32]],
        groups: usize,
        pool: &[Self],
        slots: &[usize],
        d: usize,
        scores: &mut [f32],
    );
    /// `outs[h] += Σᵢ probs[h][i] · value(i)`, reading the first `outs[h].len()` values of each
    /// row of `d`.
    fn sum_part(
        probs: &[&[f32]],
        groups: usize,
        pool: &[Self],
        slots: &[usize],
        d: usize,
        outs: &mut [&mut [f32]],
    );
    /// The first `out.len()` values of the row of `d` at `offset`, as f32.
    fn widen(pool: &[Self], offset: usize, d: usize, out: &mut [f32]);
    /// The row of `d` values at `offset` as stored, when the pool stores bf16 (the tile unit
    /// multiplies it as it is); `None` otherwise.
    fn bf16_row(pool: &[Self], offset: usize, d: usize) -> Option<&[half::bf16]>;
}

/// Calls `f(g, first, offsets)` for every run of `slots` and every key/value head `g`, the
/// offsets being the run's rows of head `g` in `pool`. After each head's call it asks memory for
/// that head's rows of the next run: a run's rows lie a slot apart, a stride the hardware
/// prefetchers do not follow far enough ahead, so each sweep otherwise waits on every row.
#[inline(always)]
fn runs<P>(
    slots: &[usize],
    heads: usize,
    units: usize,
    pool: &[P],
    mut f: impl FnMut(usize, usize, &[usize]),
) {
    let mut offsets = [0usize; RUN];
    let row_bytes = units * std::mem::size_of::<P>();
    for (r, run) in slots.chunks(RUN).enumerate() {
        let next = slots.get((r + 1) * RUN..).unwrap_or_default();
        let next = &next[..next.len().min(RUN)];
        for g in 0..heads {
            for (o, s) in offsets.iter_mut().zip(run) {
                *o = s + g * units;
            }
            f(g, r * RUN, &offsets[..run.len()]);
            for s in next {
                crate::simd::prefetch(pool, s + g * units, row_bytes);
            }
        }
    }
}

/// Scores of key/value head `g`'s query heads against a run's rows (`row(j)` for the run's
/// columns `first..first + len` of rows `n` wide).
#[inline(always)]
fn score_run<'r, T: Element>(
    qs: &[&[f32]],
    groups: usize,
    (g, first, len): (usize, usize, usize),
    row: impl Fn(usize) -> &'r [T],
    n: usize,
    scores: &mut [f32],
) {
    let y = SharedMut::new(&mut scores[g * groups * n..(g + 1) * groups * n]);
    // SAFETY: `y` holds this head's groups × n scores; columns first.. are this run's.
    unsafe {
        crate::matmul::dots(
            &qs[g * groups..(g + 1) * groups],
            first..first + len,
            row,
            n,
            y,
            // `runs` asks for the rows: they lie a slot apart, not back to back.
            0,
        )
    };
}

/// `outs[h] += Σᵢ probs[h][cols][i] · values[offsets[i]..]`, up to four heads per pass.
fn weighted<T: Element>(
    probs: &[&[f32]],
    cols: std::ops::Range<usize>,
    values: &[T],
    offsets: &[usize],
    outs: &mut [&mut [f32]],
) {
    let mut h = 0;
    while h < probs.len() {
        let c = (probs.len() - h).min(crate::simd::weighted_rows());
        let p = |i: usize| &probs[h + i][cols.clone()];
        match &mut outs[h..h + c] {
            [o0, o1, o2, o3] => {
                T::weighted_sum([p(0), p(1), p(2), p(3)], values, offsets, [o0, o1, o2, o3])
            }
            [o0, o1, o2] => T::weighted_sum([p(0), p(1), p(2)], values, offsets, [o0, o1, o2]),
            [o0, o1] => T::weighted_sum([p(0), p(1)], values, offsets, [o0, o1]),
            [o0] => T::weighted_sum([p(0)], values, offsets, [o0]),
            _ => {}
        }
        h += c;
    }
}

impl<T: Element> CachedRow for T {
    fn units(d: usize) -> usize {
        d
    }

    fn score_part(
        qs: &[&[f32]],
        groups: usize,
        pool: &[T],
        slots: &[usize],
        d: usize,
        scores: &mut [f32],
    ) {
        let n = slots.len();
        assert!(
            scores.len() >= qs.len() * n,
            "scores for {} heads",
            qs.len()
        );
        runs(slots, qs.len() / groups, d, pool, |g, first, offsets| {
            let row = |j: usize| &pool[offsets[j - first]..offsets[j - first] + d];
            score_run(qs, groups, (g, first, offsets.len()), row, n, scores);
        });
    }

    fn sum_part(
        probs: &[&[f32]],
        groups: usize,
        pool: &[T],
        slots: &[usize],
        d: usize,
        outs: &mut [&mut [f32]],
    ) {
        runs(slots, probs.len() / groups, d, pool, |g, first, offsets| {
            let heads = g * groups..(g + 1) * groups;
            let cols = first..first + offsets.len();
            weighted(&probs[heads.clone()], cols, pool, offsets, &mut outs[heads]);
        });
    }

    fn widen(pool: &[T], offset: usize, _d: usize, out: &mut [f32]) {
        T::widen(&pool[offset..offset + out.len()], out);
    }

    fn bf16_row(pool: &[T], offset: usize, d: usize) -> Option<&[half::bf16]> {
        T::as_bf16(&pool[offset..offset + d])
    }
}

/// [`runs`] over 8-bit rows of `d` values, each run's rows widened first: `f(g, first, rows,
/// local)` gets head `g`'s rows as f32, the first `take` values of each, at offsets `local`.
fn widened_runs(
    pool: &[u8],
    slots: &[usize],
    heads: usize,
    d: usize,
    take: usize,
    mut f: impl FnMut(usize, usize, &[f32], &[usize]),
) {
    let local: [usize; RUN] = std::array::from_fn(|i| i * take);
    ROWS.with_borrow_mut(|rows| {
        runs(
            slots,
            heads,
            kv_q8::row_bytes(d),
            pool,
            |g, first, offsets| {
                rows.resize(offsets.len() * take, 0.0);
                kv_q8::dequantize_rows(pool, offsets, d, take, rows);
                f(g, first, &rows[..], &local[..offsets.len()]);
            },
        );
    });
}

impl CachedRow for u8 {
    fn units(d: usize) -> usize {
        kv_q8::row_bytes(d)
    }

    /// Each run's key rows widened to f32, then scored as f32 rows are: the f32 tiles take a
    /// run's scores faster than integer dot products over rows this short (136 bytes), whose
    /// fixed costs per row (block scales, a reduction per head) outweighed their narrower
    /// arithmetic; and the queries keep their precision.
    fn score_part(
        qs: &[&[f32]],
        groups: usize,
        pool: &[u8],
        slots: &[usize],
        d: usize,
        scores: &mut [f32],
    ) {
        let n = slots.len();
        assert!(
            scores.len() >= qs.len() * n,
            "scores for {} heads",
            qs.len()
        );
        widened_runs(
            pool,
            slots,
            qs.len() / groups,
            d,
            d,
            |g, first, rows, local| {
                let row = |j: usize| &rows[local[j - first]..local[j - first] + d];
                score_run(qs, groups, (g, first, local.len()), row, n, scores);
            },
        );
    }

    /// Each run's value rows widened to f32, then summed as f32 rows are.
    fn sum_part(
        probs: &[&[f32]],
        groups: usize,
        pool: &[u8],
        slots: &[usize],
        d: usize,
        outs: &mut [&mut [f32]],
    ) {
        let vd = outs.first().map_or(0, |o| o.len());
        widened_runs(
            pool,
            slots,
            probs.len() / groups,
            d,
            vd,
            |g, first, rows, local| {
                let heads = g * groups..(g + 1) * groups;
                let cols = first..first + local.len();
                weighted(&probs[heads.clone()], cols, rows, local, &mut outs[heads]);
            },
        );
    }

    fn widen(pool: &[u8], offset: usize, d: usize, out: &mut [f32]) {
        kv_q8::dequantize_row(&pool[offset..offset + kv_q8::row_bytes(d)], d, out);
    }

    fn bf16_row(_: &[u8], _: usize, _: usize) -> Option<&[half::bf16]> {
        None
    }
}
