//! Decode: each query in turn, its positions split over threads as flash-decoding does. Every
//! task takes a part of the positions for all heads (so all threads work however few key/value
//! heads there are — MLA has one — and every row is read once) and keeps its softmax
//! unnormalized: its maximum, its sum and its weighted values per head. The parts are merged at
//! the end. A cache too short to give every thread a part also splits its key/value heads into
//! groups, each task reading its group's share of every slot (depth 64, 28 layers of Qwen3-0.6B's
//! bf16 cache on the 2-vCPU AVX-512 Xeon: 1.00 → 0.71 ms per step; 128: 1.95 → 1.35).

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
    let threads = rayon::current_num_threads();
    for (i, (q, out)) in q
        .chunks_exact(heads * d)
        .zip(out.chunks_exact_mut(heads * vd))
        .enumerate()
    {
        let len = start + i + 1;
        let (parts, head_groups) = split(len, shape.kv_heads, threads);
        let size = len.div_ceil(parts);
        let kv_per_group = shape.kv_heads.div_ceil(head_groups);
        let tasks: Vec<(usize, usize)> = (0..shape.kv_heads.div_ceil(kv_per_group))
            .flat_map(|g| (0..len.div_ceil(size)).map(move |p| (g, p)))
            .collect();
        let partials: Vec<Partial> = tasks
            .into_par_iter()
            .map(|(g, p)| {
                let kv_range = g * kv_per_group..((g + 1) * kv_per_group).min(shape.kv_heads);
                part(shape, q, kv, kv_range, p * size..((p + 1) * size).min(len))
            })
            .collect();
        let per_group = len.div_ceil(size);
        let q_per_group = kv_per_group * (heads / shape.kv_heads) * vd;
        for (parts, out) in partials.chunks(per_group).zip(out.chunks_mut(q_per_group)) {
            merge(parts, vd, out);
        }
    }
}

/// How a query over `len` positions is split: into position parts of at least [`MIN_PART`]
/// (at most four per thread, so a busy thread's share moves to another), and, when that leaves
/// threads idle, into groups of key/value heads too — each group reads its heads' share of
/// every slot, so a short cache still takes every thread.
fn split(len: usize, kv_heads: usize, threads: usize) -> (usize, usize) {
    let parts = (len / MIN_PART).clamp(1, 4 * threads);
    let head_groups = threads.div_ceil(parts).clamp(1, kv_heads);
    (parts, head_groups)
}

/// One part's unnormalized softmax per head: `max`, `sum` of `exp(score - max)`, and `acc`,
/// the values weighted by those, `[heads][value_dim]`.
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

/// The query heads of key/value heads `kv_range` (`q` holds all heads, `[heads][head_dim]`)
/// over positions `range`.
fn part<T: CachedRow>(
    shape: &AttentionShape,
    q: &[f32],
    kv: &PagedKv<'_, T>,
    kv_range: std::ops::Range<usize>,
    range: std::ops::Range<usize>,
) -> Partial {
    let (d, vd) = (shape.head_dim, shape.value_dim);
    let (groups, n) = (shape.heads / shape.kv_heads, range.len());
    let heads = kv_range.len() * groups;
    let stride = shape.kv_heads * T::units(d);
    let qs: Vec<&[f32]> = q
        .chunks_exact(d)
        .skip(kv_range.start * groups)
        .take(heads)
        .collect();
    // Offsets of the group's first head: the sweeps add `g · units` for its g-th head.
    let first = kv_range.start * T::units(d);
    let slots: Vec<usize> = range.map(|t| kv.slot(t, stride) + first).collect();
    SCORES.with_borrow_mut(|scores| {
        scores.clear();
        scores.resize(heads * n, 0.0);
        T::score_part(&qs, groups, kv.keys, &slots, d, scores);
        let (mut max, mut sum) = (vec![0f32; heads], vec![0f32; heads]);
        for ((row, m), l) in scores.chunks_exact_mut(n).zip(&mut max).zip(&mut sum) {
            row.iter_mut().for_each(|s| *s *= shape.scale);
            *m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            *l = crate::exp::exp_shifted(row, *m);
        }
        let mut acc = vec![0f32; heads * vd];
        let probs: Vec<&[f32]> = scores.chunks_exact(n).collect();
        let mut outs: Vec<&mut [f32]> = acc.chunks_exact_mut(vd).collect();
        T::sum_part(&probs, groups, kv.values, &slots, d, &mut outs);
        drop((outs, probs));
        crate::parallel::trim(scores);
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

#[cfg(test)]
mod tests {
    use super::{split, MIN_PART};

    #[test]
    fn idle_threads_take_groups_of_heads() {
        // A short cache: one part of positions, the heads over the threads.
        assert_eq!(split(64, 8, 2), (1, 2));
        assert_eq!(split(64, 8, 16), (1, 8), "no more groups than heads");
        assert_eq!(split(64, 1, 4), (1, 1), "MLA's single head cannot split");
        // Enough positions for every thread: no head groups.
        assert_eq!(split(2 * MIN_PART, 8, 2), (2, 1));
        assert_eq!(
            split(100 * MIN_PART, 8, 2),
            (8, 1),
            "at most four parts per thread"
        );
        // Between: three parts on eight threads, each part's heads in three groups.
        assert_eq!(split(3 * MIN_PART, 8, 8), (3, 3));
        assert_eq!(split(1, 8, 1), (1, 1));
    }
}
