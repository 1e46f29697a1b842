//! Causal grouped-query attention over a sequence's [`KvCache`]: the engine's fused kernel on the
//! CPU, candle's operations elsewhere.

use candle_core::{DType, Tensor};

use crate::kv_cache::KvCache;
use crate::{EngineError, Result};

/// Attention of `q` — `(seq, heads, head_dim)`, the queries at positions `start..start + seq` —
/// over the first `start + seq` cached positions; the result is `(seq, heads, head_dim)`. Query
/// head `h` reads key/value head `h / (heads / kv_heads)`.
pub fn causal(q: &Tensor, cache: &KvCache, start: usize, scale: f64) -> Result<Tensor> {
    let Some((keys, values)) = cache.buffers() else {
        return Err(EngineError::InvalidInput(
            "attention over an empty KV cache: append the new keys and values first".into(),
        ));
    };
    if let Some(out) = crate::cpu::attention(q, keys, values, start, scale as f32)? {
        return Ok(out);
    }
    with_candle(q, cache, start, scale)
}

/// The same with candle's operations: keys and values repeated per query head, an explicit mask.
fn with_candle(q: &Tensor, cache: &KvCache, start: usize, scale: f64) -> Result<Tensor> {
    let (seq, heads, _) = q.dims3()?;
    let Some((k, v)) = cache.keys_values()? else {
        return Err(EngineError::InvalidInput(
            "attention over an empty KV cache".into(),
        ));
    };
    let total = start + seq;
    let (k, v) = (k.narrow(0, 0, total)?, v.narrow(0, 0, total)?);
    // (heads, positions, head_dim), each key/value head repeated for its group of query heads.
    let heads_first = |t: &Tensor| -> Result<Tensor> {
        let (len, kv, d) = t.dims3()?;
        let groups = heads / kv;
        Ok(t.transpose(0, 1)?
            .unsqueeze(1)?
            .expand((kv, groups, len, d))?
            .reshape((kv * groups, len, d))?)
    };
    let q = q.transpose(0, 1)?.contiguous()?;
    let (k, v) = (heads_first(&k)?, heads_first(&v)?);
    let mut scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    if seq > 1 {
        let mask: Vec<f32> = (0..seq)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j > start + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (seq, total), q.device())?.to_dtype(scores.dtype())?;
        scores = scores.broadcast_add(&mask)?;
    }
    let probs =
        candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
    Ok(probs.matmul(&v.contiguous()?)?.transpose(0, 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused kernel and candle's operations agree, for a prompt and the decode steps after it.
    #[test]
    fn the_kernel_and_candle_agree() {
        let device = Device::Cpu;
        let (heads, kv_heads, d) = (6, 2, 16);
        let mut cache = KvCache::default();
        let mut start = 0;
        for seq in [12, 1, 1, 9] {
            let q = Tensor::randn(0f32, 1.0, (seq, heads, d), &device).unwrap();
            let k = Tensor::randn(0f32, 1.0, (seq, kv_heads, d), &device).unwrap();
            let v = Tensor::randn(0f32, 1.0, (seq, kv_heads, d), &device).unwrap();
            cache.append(&k, &v).unwrap();
            let fused = causal(&q, &cache, start, 0.25).unwrap();
            let reference = with_candle(&q, &cache, start, 0.25).unwrap();
            assert_eq!(fused.dims(), &[seq, heads, d]);
            let diff = (fused - reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(
                diff.to_scalar::<f32>().unwrap() < 1e-5,
                "seq {seq} at {start}"
            );
            start += seq;
        }
    }
}
