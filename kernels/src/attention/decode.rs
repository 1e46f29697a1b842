//! Decode: each query in turn, its positions split over threads as flash-decoding does. Every
//! task takes a part of the positions for all heads (so all threads work however few key/value
//! heads there are — MLA has one — and every row is read once) and keeps its softmax
//! unnormalized: its maximum, its sum and its weighted values per head. The parts are merged at
//! the end.

use rayon::prelude::*;

use super::{AttentionShape, CachedRow, PagedKv, SCORES};

/// Positions a task takes at least: fewer cost more in merging than they save, and each part's
/// first run of rows comes unprefetched (256 against 64 in the attention bench, alternating
/// inside one process on the 2-vCPU AVX-512 Xeon: depth 512 bf16 5.3 -> 4.6 ms per 28-layer
/// step, q8_0 5.3 -> 4.8; 2048 unchanged).
const MIN_PART: usize = 256;

/// `out` for each of the few queries in `q`, at positions `start..`.
pub(super) fn per_query<T: CachedRow>(
    shape: &AttentionShape,
    q: &[f32],
    kv: &PagedKv<'_, T>,
    start: usize,
    out: &mut [f32],
) {
    let (heads, d, vd) = (shape.heads, shape.head_dim, shape.value_dim);
    for (i, (q, out)) in q
        .chunks_exact(heads * d)
        .zip(out.chunks_exact_mut(heads * vd))
        .enumerate()
    {
        let len = start + i + 1;
        let parts = (len / MIN_PART).clamp(1, 4 * rayon::current_num_threads());
        let size = len.div_ceil(parts);
        let partials: Vec<Partial> = (0..len.div_ceil(size))
            .into_par_iter()
            .map(|p| part(shape, q, kv, p * size..((p + 1) * size).min(len)))
            .collect();
        merge(&partials, vd, out);
    }
}

/// One part's unnormalized softmax per head: `max`, `sum` of `exp(score - max)`, and `acc`,
/// the values weighted by those, `[heads][value_dim]`.
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

/// The query heads `q` (`[heads][head_dim]`) over positions `range`.
fn part<T: CachedRow>(
    shape: &AttentionShape,
    q: &[f32],
    kv: &PagedKv<'_, T>,
    range: std::ops::Range<usize>,
) -> Partial {
    let (heads, d, vd) = (shape.heads, shape.head_dim, shape.value_dim);
    let (groups, n) = (heads / shape.kv_heads, range.len());
    let stride = shape.kv_heads * T::units(d);
    let qs: Vec<&[f32]> = q.chunks_exact(d).collect();
    let slots: Vec<usize> = range.map(|t| kv.slot(t, stride)).collect();
    SCORES.with_borrow_mut(|scores| {
        scores.clear();
        scores.resize(heads * n, 0.0);
        T::score_part(&qs, groups, kv.keys, &slots, d, scores);
        let (mut max, mut sum) = (vec![0f32; heads], vec![0f32; heads]);
        for ((row, m), l) in scores.chunks_exact_mut(n).zip(&mut max).zip(&mut sum) {
            row.iter_mut().for_each(|s| *s *= shape.scale);
            *m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for s in row.iter_mut() {
                *s = (*s - *m).exp();
                *l += *s;
            }
        }
        let mut acc = vec![0f32; heads * vd];
        let probs: Vec<&[f32]> = scores.chunks_exact(n).collect();
        let mut outs: Vec<&mut [f32]> = acc.chunks_exact_mut(vd).collect();
        T::sum_part(&probs, groups, kv.values, &slots, d, &mut outs);
        drop(outs);
        Partial { max, sum, acc }
    })
}

/// `out` per head: the parts' weighted values rescaled to the overall maximum, over their
/// rescaled sums.
fn merge(parts: &[Partial], vd: usize, out: &mut [f32]) {
    for (h, out) in out.chunks_exact_mut(vd).enumerate() {
        let max = parts
            .iter()
            .map(|p| p.max[h])
            .fold(f32::NEG_INFINITY, f32::max);
        out.fill(0.0);
        let mut total = 0.0;
        for p in parts {
            let w = (p.max[h] - max).exp();
            total += w * p.sum[h];
            for (o, a) in out.iter_mut().zip(&p.acc[h * vd..(h + 1) * vd]) {
                *o += w * a;
            }
        }
        let inv = 1.0 / total;
        out.iter_mut().for_each(|o| *o *= inv);
    }
}
