//! Grouped-query attention of new queries over a paged, position-major KV cache: causal for a
//! decoder's tokens ([`paged_attention`]), without a mask for an encoder's ([`full_attention`]).
//!
//! Keys and values are read where they lie in the pool (`[slot][kv_head][dim]`, a sequence's
//! positions mapped to slots through its block table), never repeated per query head nor
//! transposed; a sequence that grows gains blocks, and nothing is copied. A few queries (decode,
//! [`decode`]) split the positions over threads and stream each slot's heads together; many
//! queries (prefill) run per head as two GEMMs — scores, then probabilities times values — with
//! the mask applied between them, a slice of queries at a time that scores only the positions it
//! sees; the scores take the AMX tiles where both sides are bf16 values (`tiled`), and so does
//! the second product where the caller asks for bf16 probabilities without a mask.
//! How a row is stored (f32, bf16, f16 or 8-bit blocks) is [`CachedRow`]'s business.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::parallel::{trim, SharedMut};

mod cached;
mod decode;
mod full;
mod tiled;

pub use cached::CachedRow;
pub use full::full_attention;

/// From this many queries on, attention runs as GEMMs per head.
const GEMM_QUERIES: usize = 8;

/// Scores per GEMM pass at most, in f32 elements: very long contexts take fewer queries per
/// pass than [`CAUSAL_ROWS`].
const SCORE_ELEMENTS: usize = 1 << 22;

/// Queries per GEMM pass at most: each slice scores only the positions its last query sees, so
/// the masked triangle costs about `CAUSAL_ROWS / 2` columns per query instead of half of them.
const CAUSAL_ROWS: usize = 64;

/// The sizes of an attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Dimension of each query and key head.
    pub head_dim: usize,
    /// Values read per head: the first `value_dim` of each value row, laid out as the keys
    /// (`head_dim` for ordinary attention; MLA's values are the leading latent part of its keys).
    pub value_dim: usize,
    /// Factor on the scores before softmax (usually `1/√head_dim`).
    pub scale: f32,
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A prefill task's gathered head: its keys and values widened, or its keys as stored for
    /// the tiles, and its queries for them.
    static HEAD: RefCell<Head> = const { RefCell::new(Head::new()) };
}

/// The buffers one prefill head gathers into.
struct Head {
    keys: Vec<f32>,
    values: Vec<f32>,
    tile_keys: Vec<half::bf16>,
    queries: Vec<half::bf16>,
    /// [`Probabilities::Bf16`]'s values transposed before they are packed, and a slice's
    /// rounded probabilities.
    tile_values: Vec<f32>,
    probabilities: Vec<half::bf16>,
}

impl Head {
    /// Each buffer given back past its last use (see [`trim`]).
    fn trim(&mut self) {
        trim(&mut self.keys);
        trim(&mut self.values);
        trim(&mut self.tile_keys);
        trim(&mut self.queries);
        trim(&mut self.tile_values);
        trim(&mut self.probabilities);
    }

    const fn new() -> Self {
        Self {
            keys: Vec::new(),
            values: Vec::new(),
            tile_keys: Vec::new(),
            queries: Vec::new(),
            tile_values: Vec::new(),
            probabilities: Vec::new(),
        }
    }
}

/// How attention's probabilities multiply the values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probabilities {
    /// In f32, as softmax left them.
    Exact,
    /// Rounded to bf16 first, as PyTorch's bf16 attention on the CPU rounds them before its
    /// second product: with bf16 queries over bf16 keys and values, that product then takes the
    /// AMX tiles too (the f32 GEMM over the rounded values elsewhere, so the result does not
    /// depend on the CPU beyond the order of sums). For a bf16 model whose reference computes
    /// so; attention without a mask only ([`full_attention`]).
    Bf16,
}

impl AttentionShape {
    /// The queries in `q_len` values, checked against the shape and an output of `out_len`.
    ///
    /// # Panics
    /// When the heads do not group, a dimension is zero or the lengths do not match (a caller
    /// bug).
    fn queries(&self, q_len: usize, out_len: usize) -> usize {
        let Self {
            heads,
            kv_heads,
            head_dim: d,
            value_dim: vd,
            ..
        } = *self;
        assert!(
            kv_heads > 0 && heads.is_multiple_of(kv_heads),
            "{heads} heads over {kv_heads} kv heads"
        );
        assert!(
            d > 0 && q_len.is_multiple_of(heads * d),
            "queries are not [seq][{heads}][{d}]"
        );
        assert!(vd > 0 && vd <= d, "values of {vd} per head of {d}");
        let seq = q_len / (heads * d);
        assert_eq!(
            out_len,
            seq * heads * vd,
            "output is not [seq][{heads}][{vd}]"
        );
        seq
    }
}

/// Which positions a prefill call's queries see.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mask {
    /// Query `i` of the call sees positions `..= start + i`: a decoder's new tokens.
    Causal { start: usize },
    /// Every query sees all `len` positions: an encoder's, as a vision tower's patches.
    Full { len: usize },
}

impl Mask {
    /// Positions the keys span for `seq` queries.
    fn len(self, seq: usize) -> usize {
        match self {
            Self::Causal { start } => start + seq,
            Self::Full { len } => len,
        }
    }

    /// Positions query `i` of the call sees (the first that many).
    fn seen(self, i: usize) -> usize {
        match self {
            Self::Causal { start } => start + i + 1,
            Self::Full { len } => len,
        }
    }
}

/// Where one sequence's keys and values lie in a paged pool: position `t` is at slot
/// `blocks[t / block_size] · block_size + t % block_size`, each slot `[kv_heads][head_dim]`.
#[derive(Debug, Clone, Copy)]
pub struct PagedKv<'a, T> {
    /// The pool's keys, `[slot][kv_head][dim]`.
    pub keys: &'a [T],
    /// The pool's values, laid out as the keys.
    pub values: &'a [T],
    /// The sequence's block table.
    pub blocks: &'a [u32],
    /// Positions per block.
    pub block_size: usize,
}

impl<T> PagedKv<'_, T> {
    /// The offset of position `t`'s first key/value head.
    #[inline]
    fn slot(&self, t: usize, stride: usize) -> usize {
        let bs = self.block_size;
        (self.blocks[t / bs] as usize * bs + t % bs) * stride
    }
}

/// `out = softmax(q kᵀ · scale + causal mask) v` for `seq` queries at positions
/// `start..start + seq` of one sequence whose keys and values lie in a paged pool.
///
/// `q` is `[seq][heads][head_dim]`, `out` `[seq][heads][value_dim]`. Query head `h` reads
/// key/value head `h / (heads / kv_heads)`, as transformers' `repeat_kv` does.
///
/// # Panics
/// When the slices do not match the shape or the block table does not cover `start + seq`
/// positions inside the pool (a caller bug, not an input error).
pub fn paged_attention<T: CachedRow>(
    shape: &AttentionShape,
    q: &[f32],
    kv: &PagedKv<'_, T>,
    start: usize,
    out: &mut [f32],
) {
    let seq = shape.queries(q.len(), out.len());
    let stride = shape.kv_heads * T::units(shape.head_dim);
    let len = start + seq;
    assert!(
        kv.block_size > 0 && kv.blocks.len() * kv.block_size >= len,
        "the block table ends before position {len}"
    );
    let slots = kv.keys.len().min(kv.values.len()) / stride;
    assert!(
        kv.blocks[..len.div_ceil(kv.block_size)]
            .iter()
            .all(|&b| (b as usize + 1) * kv.block_size <= slots),
        "a block lies outside the pool"
    );
    if seq < GEMM_QUERIES {
        decode::per_query(shape, q, kv, start, out);
    } else {
        per_head(
            shape,
            q,
            kv,
            (Mask::Causal { start }, Probabilities::Exact),
            out,
        );
    }
}

/// Softmax over `row`, in place, in f32.
fn softmax(row: &mut [f32]) {
    let max = row_max(row);
    let inv = 1.0 / crate::exp::exp_shifted(row, max);
    for s in row.iter_mut() {
        *s *= inv;
    }
}

/// The largest value of `row` (NaNs ignored, as `f32::max` does; −∞ when empty or all NaN),
/// over independent lanes: a fold through `f32::max` is one dependent chain that does not
/// vectorize, and took most of a long row's softmax.
fn row_max(row: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            if v > *m {
                *m = v;
            }
        }
    }
    let tail = chunks.remainder().iter().copied();
    lanes
        .into_iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, f32::max)
}

/// One head's keys or values as a contiguous f32 matrix `[len][take]`, the first `take` values
/// of each row of `d`, gathered through the block table (and widened from their storage).
fn head_matrix<'a, T: CachedRow>(
    kv: &PagedKv<'_, T>,
    pool: &[T],
    len: usize,
    stride: usize,
    offset: usize,
    (d, take): (usize, usize),
    buf: &'a mut Vec<f32>,
) -> &'a [f32] {
    buf.resize(len * take, 0.0);
    for (t, dst) in buf.chunks_exact_mut(take).enumerate() {
        T::widen(pool, kv.slot(t, stride) + offset, d, dst);
    }
    buf
}

/// Prefill's attention, each query head a pool task: `q` holds `seq` rows of `heads · d`.
fn per_head<T: CachedRow>(
    shape: &AttentionShape,
    q: &[f32],
    kv: &PagedKv<'_, T>,
    (mask, probabilities): (Mask, Probabilities),
    out: &mut [f32],
) {
    let seq = q.len() / (shape.heads * shape.head_dim);
    let y = SharedMut::new(out);
    (0..shape.heads).into_par_iter().for_each(|head| {
        HEAD.with_borrow_mut(|bufs| {
            SCORES.with_borrow_mut(|scores| {
                // SAFETY: this task alone writes head `head`'s columns of `out`.
                unsafe {
                    one_head(
                        shape,
                        (q, kv),
                        (mask, probabilities, seq),
                        head,
                        (bufs, scores),
                        y,
                    )
                }
                bufs.trim();
                trim(scores);
            })
        });
    });
}

/// One query head of [`per_head`]: its key/value head gathered into `bufs`, then the queries
/// a slice of rows at a time (scores `q·Kᵀ`, masked softmax, times `V`), written to columns
/// `head·vd..` of every row of the output `y`. The scores take the tiles where they can
/// ([`tiled`]), else the f32 GEMM; so does the second product under [`Probabilities::Bf16`].
///
/// # Safety
/// `y` points at the `(seq, heads, value_dim)` output, and no other task writes this head's
/// columns.
unsafe fn one_head<T: CachedRow>(
    shape: &AttentionShape,
    (q, kv): (&[f32], &PagedKv<'_, T>),
    (mask, probabilities, seq): (Mask, Probabilities, usize),
    head: usize,
    (bufs, scores): (&mut Head, &mut Vec<f32>),
    y: SharedMut<f32>,
) {
    let (heads, kv_heads, d, vd) = (shape.heads, shape.kv_heads, shape.head_dim, shape.value_dim);
    let len = mask.len(seq);
    let query = |i: usize| &q[(i * heads + head) * d..][..d];
    let offset = (head / (heads / kv_heads)) * T::units(d);
    let stride = kv_heads * T::units(d);
    let exact = || (0..seq).all(|i| tiled::exact(query(i)));
    let tile_keys = tiled::keys(kv, (len, stride, offset, d), exact, &mut bufs.tile_keys);
    let keys = match tile_keys {
        Some(_) => &[][..],
        None => head_matrix(kv, kv.keys, len, stride, offset, (d, d), &mut bufs.keys),
    };
    debug_assert!(
        probabilities == Probabilities::Exact || matches!(mask, Mask::Full { .. }),
        "bf16 probabilities under a causal mask"
    );
    let tile_values = match probabilities {
        Probabilities::Bf16 if tile_keys.is_some() => {
            let at = (len, stride, offset, vd);
            tiled::values_packed(kv, at, &mut bufs.tile_values)
        }
        _ => None,
    };
    // The packed values replace the f32 ones: a head packs them or gathers these, not both.
    let values = match tile_values {
        Some(_) => &[][..],
        None => head_matrix(
            kv,
            kv.values,
            len,
            stride,
            offset,
            (d, vd),
            &mut bufs.values,
        ),
    };
    let slice = (SCORE_ELEMENTS / len).clamp(1, seq).min(CAUSAL_ROWS);
    for first in (0..seq).step_by(slice) {
        let rows = slice.min(seq - first);
        // Only positions up to the slice's last query are visible to it.
        let cols = mask.seen(first + rows - 1);
        scores.resize(rows * cols, 0.0);
        let shape_here = (rows, d, cols);
        let on_tiles = tile_keys.is_some();
        match &tile_keys {
            Some(k) => tiled::scores(
                |i| query(first + i),
                shape_here,
                k,
                &mut bufs.queries,
                scores,
            ),
            // SAFETY: the views stay inside q, keys and the scores buffer.
            None => unsafe { score_gemm(shape, (q, head, first), keys, shape_here, scores) },
        }
        for (i, row) in scores.chunks_exact_mut(cols).enumerate() {
            let visible = mask.seen(first + i);
            if on_tiles {
                row[..visible].iter_mut().for_each(|s| *s *= shape.scale);
            }
            softmax(&mut row[..visible]);
            row[visible..].fill(0.0);
        }
        let out = (first * heads + head) * vd;
        // The packed values span every position, as every slice without a mask sees them.
        assert!(
            tile_values.is_none() || cols == len,
            "packed values under a mask"
        );
        let tiles = (tile_values.as_ref()).map(|v| (v, &mut bufs.probabilities));
        if tiles.is_none() && probabilities == Probabilities::Bf16 {
            // On this thread: this task holds the thread-local buffers.
            crate::convert::round_bf16_values(scores);
        }
        // SAFETY: the caller has this head's columns of `y` to itself.
        unsafe {
            weigh(
                scores,
                values,
                tiles,
                (rows, cols, vd),
                y,
                (out, heads * vd),
            )
        };
    }
}

/// `y[rows × vd] = P · V` for a slice's probabilities `probs` (`rows × cols`) and values
/// (`[cols][vd]` f32), written from `y`'s offset `at` with rows `row_stride` apart: on the tiles
/// with the probabilities rounded to bf16 where `tiles` holds the values packed for them (all
/// `cols`) and buffers, the f32 GEMM otherwise.
///
/// # Safety
/// `y`'s `rows` rows of `vd` from `at` lie inside it, and nothing else writes them meanwhile.
unsafe fn weigh(
    probs: &[f32],
    values: &[f32],
    tiles: Option<(&tiled::PackedValues, &mut Vec<half::bf16>)>,
    (rows, cols, vd): (usize, usize, usize),
    y: SharedMut<f32>,
    (at, row_stride): (usize, usize),
) {
    if let Some((packed, pbuf)) = tiles {
        // SAFETY: the caller's promise.
        unsafe { tiled::weighted(probs, (rows, cols), packed, pbuf, y, (at, row_stride)) };
        return;
    }
    // SAFETY: the views stay inside probs and values; the caller's promise for `y`.
    unsafe {
        matrixmultiply::sgemm(
            rows,
            cols,
            vd,
            1.0,
            probs.as_ptr(),
            cols as isize,
            1,
            values.as_ptr(),
            vd as isize,
            1,
            0.0,
            y.at(at),
            row_stride as isize,
            1,
        );
    }
}

/// `scores[rows × cols] = scale · Q Kᵀ` on the f32 GEMM, for the `rows` queries of head `head`
/// from `first` (rows `heads · d` apart in `q`) and the first `cols` of `keys` (`[·][d]`).
///
/// # Safety
/// The queries, the keys' first `cols` rows and `rows × cols` scores lie inside the slices.
unsafe fn score_gemm(
    shape: &AttentionShape,
    (q, head, first): (&[f32], usize, usize),
    keys: &[f32],
    (rows, d, cols): (usize, usize, usize),
    scores: &mut [f32],
) {
    let qp = q[(first * shape.heads + head) * d..].as_ptr();
    // SAFETY: the caller's promise.
    unsafe {
        matrixmultiply::sgemm(
            rows,
            d,
            cols,
            shape.scale,
            qp,
            (shape.heads * d) as isize,
            1,
            keys.as_ptr(),
            1,
            d as isize,
            0.0,
            scores.as_mut_ptr(),
            cols as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::data;
    use crate::{kv_q8, Element};
    use half::bf16;

    /// `out = softmax(q kᵀ · scale + causal mask) v` for `seq` queries at positions
    /// `start..start + seq`, over a contiguous cache: `k` and `v` are `[len][kv_heads][head_dim]` with
    /// `len ≥ start + seq` (a paged cache of one block).
    ///
    /// # Panics
    /// As [`paged_attention`].
    fn causal_attention<T: Element>(
        shape: &AttentionShape,
        q: &[f32],
        k: &[T],
        v: &[T],
        start: usize,
        out: &mut [f32],
    ) {
        let len = (k.len() / (shape.kv_heads * shape.head_dim).max(1)).max(1);
        let kv = PagedKv {
            keys: k,
            values: v,
            blocks: &[0],
            block_size: len,
        };
        paged_attention(shape, q, &kv, start, out);
    }

    /// The lanes' maximum is the fold's, NaNs ignored, for lengths around the lane count.
    #[test]
    fn row_max_is_the_largest_value() {
        for n in [0, 1, 15, 16, 17, 40, 1000] {
            let mut row = data(n, 9);
            if n > 3 {
                // The largest in a middle lane chunk where there is one, NaN beside it, and
                // the second largest in the tail.
                row[n / 2] = f32::NAN;
                row[20.min(n - 2)] = 7.5;
                row[n - 1] = 6.0;
            }
            let want = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(row_max(&row), want, "{n}");
        }
        assert!(row_max(&[f32::NAN; 20]) == f32::NEG_INFINITY);
    }

    /// Grouped-query attention's shape: values as wide as keys.
    fn gqa(heads: usize, kv_heads: usize, d: usize, scale: f32) -> AttentionShape {
        AttentionShape {
            heads,
            kv_heads,
            head_dim: d,
            value_dim: d,
            scale,
        }
    }

    /// Causal attention written out in f64, the way transformers' eager path computes it.
    fn reference(s: &AttentionShape, q: &[f32], k: &[f32], v: &[f32], start: usize) -> Vec<f64> {
        masked_reference(s, (q, k, v), |i| start + i + 1)
    }

    /// Attention in f64 where query `i` sees the first `seen(i)` positions.
    pub(super) fn masked_reference(
        s: &AttentionShape,
        (q, k, v): (&[f32], &[f32], &[f32]),
        seen: impl Fn(usize) -> usize,
    ) -> Vec<f64> {
        let (h, kvh, d, vd) = (s.heads, s.kv_heads, s.head_dim, s.value_dim);
        let seq = q.len() / (h * d);
        let mut out = vec![0.0; seq * h * vd];
        for i in 0..seq {
            for head in 0..h {
                let g = head / (h / kvh);
                let scores: Vec<f64> = (0..seen(i))
                    .map(|t| {
                        (0..d)
                            .map(|x| {
                                q[(i * h + head) * d + x] as f64 * k[(t * kvh + g) * d + x] as f64
                            })
                            .sum::<f64>()
                            * s.scale as f64
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let exp: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = exp.iter().sum();
                for (t, p) in exp.iter().enumerate() {
                    for x in 0..vd {
                        out[(i * h + head) * vd + x] += p / sum * v[(t * kvh + g) * d + x] as f64;
                    }
                }
            }
        }
        out
    }

    fn check(seq: usize, start: usize, heads: usize, kv_heads: usize, extra: usize) {
        let d = 16;
        let shape = gqa(heads, kv_heads, d, 0.25);
        let len = start + seq + extra;
        let q = data(seq * heads * d, 1);
        let k = data(len * kv_heads * d, 2);
        let v = data(len * kv_heads * d, 3);
        let expected = reference(&shape, &q, &k, &v, start);
        let mut out = vec![f32::NAN; q.len()];
        causal_attention(&shape, &q, &k, &v, start, &mut out);
        for (i, (a, b)) in out.iter().zip(&expected).enumerate() {
            assert!(
                (*a as f64 - b).abs() < 1e-5,
                "seq {seq} start {start}: [{i}] {a} vs {b}"
            );
        }
        // bf16 storage: the same computation on the rounded keys and values.
        let round = |x: &[f32]| -> Vec<bf16> { x.iter().map(|&v| bf16::from_f32(v)).collect() };
        let (kb, vb) = (round(&k), round(&v));
        let widen = |x: &[bf16]| -> Vec<f32> { x.iter().map(|v| v.to_f32()).collect() };
        let expected = reference(&shape, &q, &widen(&kb), &widen(&vb), start);
        causal_attention(&shape, &q, &kb, &vb, start, &mut out);
        for (a, b) in out.iter().zip(&expected) {
            assert!(
                (*a as f64 - b).abs() < 1e-5,
                "bf16, seq {seq} start {start}"
            );
        }
    }

    /// The same sequence scattered over a pool in shuffled blocks gives the contiguous result.
    fn check_paged(seq: usize, start: usize, block_size: usize) {
        let (heads, kv_heads, d) = (4, 2, 8);
        let shape = gqa(heads, kv_heads, d, 0.3);
        let len = start + seq;
        let stride = kv_heads * d;
        let q = data(seq * heads * d, 4);
        let k = data(len * stride, 5);
        let v = data(len * stride, 6);
        let mut contiguous = vec![0.0; q.len()];
        causal_attention(&shape, &q, &k, &v, start, &mut contiguous);
        // Blocks in reverse order, with a spare block between each: slot order differs from
        // position order, and unused slots hold garbage that must never be read.
        let blocks: Vec<u32> = (0..len.div_ceil(block_size))
            .rev()
            .map(|b| 2 * b as u32 + 1)
            .collect();
        let pool_slots = (2 * blocks.len() + 1) * block_size;
        let (mut kp, mut vp) = (
            vec![f32::NAN; pool_slots * stride],
            vec![f32::NAN; pool_slots * stride],
        );
        for t in 0..len {
            let slot = blocks[t / block_size] as usize * block_size + t % block_size;
            kp[slot * stride..(slot + 1) * stride]
                .copy_from_slice(&k[t * stride..(t + 1) * stride]);
            vp[slot * stride..(slot + 1) * stride]
                .copy_from_slice(&v[t * stride..(t + 1) * stride]);
        }
        let kv = PagedKv {
            keys: &kp,
            values: &vp,
            blocks: &blocks,
            block_size,
        };
        let mut paged = vec![0.0; q.len()];
        paged_attention(&shape, &q, &kv, start, &mut paged);
        assert_eq!(
            paged, contiguous,
            "seq {seq} start {start} block {block_size}"
        );
    }

    #[test]
    fn paged_attention_reads_through_the_block_table() {
        check_paged(1, 0, 4);
        check_paged(1, 37, 16);
        check_paged(20, 0, 4);
        check_paged(17, 23, 16);
    }

    #[test]
    fn decode_queries_match_the_reference() {
        // Pools of several widths: a short cache splits its key/value heads into groups (as
        // many as idle threads, the last one smaller when they do not divide), a long one its
        // positions, and both at once between.
        for threads in [1, 2, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a pool");
            pool.install(|| {
                check(1, 0, 4, 2, 0);
                check(1, 37, 4, 2, 5);
                check(3, 10, 6, 3, 0);
                check(1, 40, 16, 8, 0);
                // Positions split over several parts (and their merge), one part shorter.
                check(1, 800, 4, 2, 0);
                check(2, 555, 4, 1, 3);
                check(1, 700, 16, 8, 0);
            });
        }
    }

    #[test]
    fn prefill_queries_match_the_reference() {
        check(20, 0, 4, 2, 0);
        check(33, 12, 4, 1, 7);
        check(9, 0, 2, 2, 0);
        // Several slices of queries, the last one short, each scoring only what it sees.
        check(2 * CAUSAL_ROWS + 22, 5, 2, 1, 3);
    }

    /// A bf16 model's prefill: bf16 queries over a bf16 pool, heads a whole number of tile rows
    /// deep, so the scores take the AMX tiles where the CPU has them (the f32 GEMM elsewhere),
    /// over several slices of queries after cached positions; and f32 queries over the same
    /// pool, which the tiles decline.
    #[test]
    fn bf16_queries_over_a_bf16_pool_match_the_reference() {
        let (heads, kv_heads, d) = (4, 2, 64);
        let shape = gqa(heads, kv_heads, d, 0.125);
        let (seq, start) = (CAUSAL_ROWS + 30, 9);
        let len = start + seq;
        let round = |x: Vec<f32>| -> Vec<bf16> { x.into_iter().map(bf16::from_f32).collect() };
        let (k, v) = (
            round(data(len * kv_heads * d, 2)),
            round(data(len * kv_heads * d, 3)),
        );
        let widen = |x: &[bf16]| -> Vec<f32> { x.iter().map(|v| v.to_f32()).collect() };
        let exact = crate::test_data::bf16_values(seq * heads * d, 1);
        for q in [exact.clone(), data(seq * heads * d, 1)] {
            let expected = reference(&shape, &q, &widen(&k), &widen(&v), start);
            let mut out = vec![f32::NAN; q.len()];
            causal_attention(&shape, &q, &k, &v, start, &mut out);
            for (i, (a, b)) in out.iter().zip(&expected).enumerate() {
                assert!((*a as f64 - b).abs() < 1e-5, "[{i}] {a} vs {b}");
            }
        }
        // Where the tiles run, the bf16 queries took them: the second key/value head gathered
        // as stored, and a slice's scores computed on them.
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if crate::amx::takes(d) {
            let kv = PagedKv {
                keys: &k[..],
                values: &v[..],
                blocks: &[0],
                block_size: len,
            };
            let mut buf = Vec::new();
            let keys = tiled::keys(&kv, (len, kv_heads * d, d, d), || true, &mut buf)
                .expect("the tiles declined bf16 keys");
            let want: Vec<bf16> = k.chunks(d).skip(1).step_by(2).flatten().copied().collect();
            assert_eq!(buf, want, "the second head's keys, as stored");
            assert_eq!(keys.rows(), len);
            // Fewer keys than packed (a causal slice's), blocks of both partial.
            let (rows, cols) = (20, 40);
            let (mut qbuf, mut scores) = (Vec::new(), vec![f32::NAN; rows * cols]);
            let query = |i: usize| &exact[i * d..(i + 1) * d];
            tiled::scores(query, (rows, d, cols), &keys, &mut qbuf, &mut scores);
            let dot = |i: usize, j: usize| -> f32 {
                let key = &want[j * d..(j + 1) * d];
                query(i).iter().zip(key).map(|(q, k)| q * k.to_f32()).sum()
            };
            for (n, s) in scores.iter().enumerate() {
                let (i, j) = (n / cols, n % cols);
                assert!(
                    (s - dot(i, j)).abs() < 1e-4,
                    "[{i},{j}] {s} vs {}",
                    dot(i, j)
                );
            }
        } else {
            eprintln!("no AMX at this level: the tiles' own checks skipped");
        }
    }

    /// MLA's absorbed form: one key head shared by every query head, the values the keys' leading
    /// part (the same slice of the pool), decode and prefill, over several threads' worth of heads.
    #[test]
    fn values_narrower_than_keys_from_the_same_rows() {
        let (heads, d, vd) = (6, 24, 16);
        let shape = AttentionShape {
            heads,
            kv_heads: 1,
            head_dim: d,
            value_dim: vd,
            scale: 0.2,
        };
        for (seq, start) in [(1, 0), (1, 29), (2, 7), (12, 0), (10, 9)] {
            let len = start + seq;
            let q = data(seq * heads * d, 7);
            let kv = data(len * d, 8);
            let expected = reference(&shape, &q, &kv, &kv, start);
            let mut out = vec![f32::NAN; seq * heads * vd];
            causal_attention(&shape, &q, &kv, &kv, start, &mut out);
            for (i, (a, b)) in out.iter().zip(&expected).enumerate() {
                assert!(
                    (*a as f64 - b).abs() < 1e-5,
                    "seq {seq} start {start}: [{i}] {a} vs {b}"
                );
            }
        }
    }

    /// 8-bit rows: the kernel's result is attention over the rows' own (rounded) values, for
    /// decode and prefill, across several widening runs, through a scattered block table, at
    /// row widths of whole groups and of one odd group, and with values narrower than keys (MLA).
    #[test]
    fn eight_bit_rows_read_as_their_values() {
        let cases = [
            // (heads, kv_heads, d, vd, seq, start)
            (4, 2, 32, 32, 1, 150),
            (4, 2, 32, 32, 1, 800),
            (4, 2, 64, 64, 3, 70),
            (4, 1, 48, 48, 20, 0),
            (4, 2, 32, 32, 12, 140),
            (6, 1, 48, 32, 1, 99),
            (6, 1, 96, 64, 10, 60),
        ];
        for (heads, kv_heads, d, vd, seq, start) in cases {
            let shape = AttentionShape {
                heads,
                kv_heads,
                head_dim: d,
                value_dim: vd,
                scale: 0.25,
            };
            let (len, bs, row): (usize, usize, usize) = (start + seq, 16, kv_q8::row_bytes(d));
            let blocks: Vec<u32> = (0..len.div_ceil(bs) as u32).rev().collect();
            let slots = blocks.len() * bs;
            let q = data(seq * heads * d, 11);
            let pool = |seed| {
                let x: Vec<f32> = data(slots * kv_heads * d, seed);
                let mut bytes = vec![0u8; slots * kv_heads * row];
                let mut read = vec![0f32; len * kv_heads * d];
                for (i, (x, b)) in x.chunks(d).zip(bytes.chunks_mut(row)).enumerate() {
                    kv_q8::quantize_row(x, b);
                    let (slot, head) = (i / kv_heads, i % kv_heads);
                    let t = blocks
                        .iter()
                        .position(|&b| b as usize == slot / bs)
                        .expect("every block is in the table")
                        * bs
                        + slot % bs;
                    if t < len {
                        let at = (t * kv_heads + head) * d;
                        kv_q8::dequantize_row(b, d, &mut read[at..at + d]);
                    }
                }
                (bytes, read)
            };
            let ((kb, k), (vb, v)) = (pool(12), pool(13));
            // Decode and prefill both score the f32 queries against the keys as stored.
            let expected = reference(&shape, &q, &k, &v, start);
            let kv = PagedKv {
                keys: &kb[..],
                values: &vb[..],
                blocks: &blocks,
                block_size: bs,
            };
            let mut out = vec![f32::NAN; seq * heads * vd];
            paged_attention(&shape, &q, &kv, start, &mut out);
            for (i, (a, b)) in out.iter().zip(&expected).enumerate() {
                assert!(
                    (*a as f64 - b).abs() < 1e-5,
                    "{heads}/{kv_heads} heads of {d} ({vd}), seq {seq} start {start}: [{i}] {a} vs {b}"
                );
            }
        }
    }
}
