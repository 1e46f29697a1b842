//! Attention without a mask, every query over every key: an encoder's, as a vision tower's
//! patches attend within their image. It runs as prefill's does (per head, a slice of queries at
//! a time, scores on the AMX tiles where both sides are bf16 values), so no head's whole
//! `seq × len` score matrix ever exists: for a 1280 × 720 image's 3,520 patches that is 50 MB per
//! head, written and read back three times over when each step is its own tensor.

use super::{per_head, AttentionShape, CachedRow, Mask, PagedKv, Probabilities};

/// `out = softmax(q kᵀ · scale) v`, every query seeing all `len` keys and values, the
/// probabilities multiplying the values as `probabilities` says.
///
/// `q` is `[seq][heads][head_dim]`; `keys` and `values` are `[len][kv_heads][·]` rows of
/// `CachedRow::units(head_dim)` (values read their first `value_dim`); `out` is
/// `[seq][heads][value_dim]`. Query head `h` reads key/value head `h / (heads / kv_heads)`.
///
/// # Panics
/// When the slices do not match the shape or hold no keys (a caller bug, not an input error).
pub fn full_attention<T: CachedRow>(
    shape: &AttentionShape,
    q: &[f32],
    keys: &[T],
    values: &[T],
    probabilities: Probabilities,
    out: &mut [f32],
) {
    let seq = shape.queries(q.len(), out.len());
    let (kv_heads, d) = (shape.kv_heads, shape.head_dim);
    let stride = kv_heads * T::units(d);
    let len = keys.len() / stride;
    assert!(
        len > 0 && keys.len() == len * stride && values.len() == keys.len(),
        "keys and values are not the same [len][{kv_heads}][{d}] rows"
    );
    if seq == 0 {
        return;
    }
    // One block holding every position: the paged machinery reads it as laid out.
    let kv = PagedKv {
        keys,
        values,
        blocks: &[0],
        block_size: len,
    };
    per_head(shape, q, &kv, (Mask::Full { len }, probabilities), out);
}

#[cfg(test)]
mod tests {
    use super::super::tests::masked_reference;
    use super::*;
    use crate::test_data::data;
    use half::bf16;

    fn shape(heads: usize, kv_heads: usize, d: usize) -> AttentionShape {
        AttentionShape {
            heads,
            kv_heads,
            head_dim: d,
            value_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
        }
    }

    fn assert_close(out: &[f32], expected: &[f64], what: &str) {
        for (i, (a, b)) in out.iter().zip(expected).enumerate() {
            assert!((*a as f64 - b).abs() < 2e-5, "{what}: [{i}] {a} vs {b}");
        }
    }

    /// f32 rows, against the reference with every position seen; query slices and key counts
    /// that are not whole slices or tiles, more keys than queries and fewer.
    #[test]
    fn every_query_sees_every_key() {
        for (seq, len, heads, kv_heads) in
            [(1, 1, 2, 2), (5, 9, 4, 2), (70, 70, 2, 1), (130, 41, 2, 2)]
        {
            let s = shape(heads, kv_heads, 16);
            let q = data(seq * heads * 16, 1);
            let k = data(len * kv_heads * 16, 2);
            let v = data(len * kv_heads * 16, 3);
            let mut out = vec![f32::NAN; q.len()];
            full_attention(&s, &q, &k, &v, Probabilities::Exact, &mut out);
            let expected = masked_reference(&s, (&q, &k, &v), |_| len);
            assert_close(&out, &expected, &format!("seq {seq} len {len}"));
        }
    }

    /// bf16 keys and values with bf16 queries at a depth the AMX tiles take (where the CPU has
    /// them, the scores run there), and f32 queries over the same rows (the f32 GEMM).
    #[test]
    fn bf16_rows_match_the_reference_on_either_product() {
        let (seq, len, heads, d) = (100, 77, 2, 64);
        let s = shape(heads, heads, d);
        let round = |x: Vec<f32>| -> Vec<bf16> { x.into_iter().map(bf16::from_f32).collect() };
        let widen = |x: &[bf16]| -> Vec<f32> { x.iter().map(|v| v.to_f32()).collect() };
        let (k, v) = (
            round(data(len * heads * d, 5)),
            round(data(len * heads * d, 6)),
        );
        let exact_q = crate::test_data::bf16_values(seq * heads * d, 4);
        for q in [exact_q, data(seq * heads * d, 4)] {
            let mut out = vec![f32::NAN; q.len()];
            full_attention(&s, &q, &k, &v, Probabilities::Exact, &mut out);
            let expected = masked_reference(&s, (&q, &widen(&k), &widen(&v)), |_| len);
            assert_close(&out, &expected, "bf16 rows");
        }
    }

    /// Probabilities rounded to bf16 (an encoder whose reference rounds them): within the
    /// rounding's bound of the exact attention (each probability moves by at most 2⁻⁹ of itself,
    /// so an output by at most 2⁻⁹ of the largest value), over several slices of queries, key
    /// counts that are not a whole tile deep, and grouped heads, on the tiles or not. Where the
    /// tiles run, their product of a second key/value head's packed values (zeros past the
    /// keys) with rounded probabilities is the exact one.
    #[test]
    fn bf16_probabilities_stay_within_their_rounding() {
        let (seq, len, heads, kv_heads, d) = (100, 77, 4, 2, 64);
        let s = shape(heads, kv_heads, d);
        let round = |x: Vec<f32>| -> Vec<bf16> { x.into_iter().map(bf16::from_f32).collect() };
        let widen = |x: &[bf16]| -> Vec<f32> { x.iter().map(|v| v.to_f32()).collect() };
        let k = round(data(len * kv_heads * d, 8));
        let v = round(data(len * kv_heads * d, 9));
        let q = crate::test_data::bf16_values(seq * heads * d, 7);
        let (mut exact, mut rounded) = (vec![f32::NAN; q.len()], vec![f32::NAN; q.len()]);
        full_attention(&s, &q, &k, &v, Probabilities::Exact, &mut exact);
        full_attention(&s, &q, &k, &v, Probabilities::Bf16, &mut rounded);
        let expected = masked_reference(&s, (&q, &widen(&k), &widen(&v)), |_| len);
        assert_close(&exact, &expected, "exact probabilities");
        let top = widen(&v).iter().fold(0f32, |m, x| m.max(x.abs()));
        for (i, (a, b)) in rounded.iter().zip(&expected).enumerate() {
            let bound = top as f64 / 512.0 + 2e-5;
            assert!((*a as f64 - b).abs() <= bound, "[{i}] {a} vs {b}");
        }
        assert_ne!(rounded, exact, "the probabilities were not rounded");
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if crate::amx::takes(d) {
            use super::super::tiled;
            let kv = PagedKv {
                keys: &k[..],
                values: &v[..],
                blocks: &[0],
                block_size: len,
            };
            let mut buf = Vec::new();
            let packed = tiled::values_packed(&kv, (len, kv_heads * d, d, d), &mut buf)
                .expect("the tiles declined bf16 values");
            // Rows a wider output's `stride` apart from `at`, partial blocks of rows included;
            // what lies between them is left alone.
            let (rows, at, stride) = (20, 3, d + 7);
            let probs = data(rows * len, 11);
            let (mut pbuf, mut out) = (Vec::new(), vec![f32::NAN; at + rows * stride]);
            let y = crate::parallel::SharedMut::new(&mut out);
            // SAFETY: `rows` rows of `d` from `at`, `stride` apart, lie inside `out`.
            unsafe { tiled::weighted(&probs, (rows, len), &packed, &mut pbuf, y, (at, stride)) };
            for i in 0..rows {
                for x in 0..stride {
                    let got = out[at + i * stride + x] as f64;
                    if x >= d {
                        assert!(got.is_nan(), "[{i}, {x}] written: {got}");
                        continue;
                    }
                    let want: f64 = (0..len)
                        .map(|t| {
                            let p = bf16::from_f32(probs[i * len + t]).to_f64();
                            p * v[(t * kv_heads + 1) * d + x].to_f64()
                        })
                        .sum();
                    assert!((got - want).abs() < 1e-4, "[{i}, {x}] {got} vs {want}");
                }
            }
            assert!(out[..at].iter().all(|v| v.is_nan()));
        }
    }

    #[test]
    #[should_panic(expected = "keys and values are not the same")]
    fn no_keys_is_a_caller_bug() {
        let s = shape(2, 2, 16);
        let mut out = vec![0.0; 32];
        full_attention::<f32>(&s, &data(32, 1), &[], &[], Probabilities::Exact, &mut out);
    }
}
