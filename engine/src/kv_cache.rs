//! One layer's keys and values for one sequence, position-major — `(capacity, kv_heads,
//! head_dim)` — written in place as tokens arrive. Appending copies only the new positions; the
//! buffer grows by half its size when full (one copy per growth, not per token), and attention
//! reads it where it lies.

use candle_core::Tensor;

use crate::Result;

/// Positions a cache holds before its first growth.
const FIRST_CAPACITY: usize = 256;

/// Keys and values of one attention layer.
#[derive(Debug, Default)]
pub struct KvCache {
    buffers: Option<(Tensor, Tensor)>,
    len: usize,
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `k` and `v`, each `(seq, kv_heads, head_dim)`.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let seq = k.dim(0)?;
        let needed = self.len + seq;
        let capacity = self
            .buffers
            .as_ref()
            .map_or(0, |(b, _)| b.dim(0).unwrap_or(0));
        if needed > capacity {
            let grown = needed
                .max(capacity + capacity / 2)
                .next_multiple_of(FIRST_CAPACITY);
            let (_, kv_heads, head_dim) = k.dims3()?;
            let alloc = |like: &Tensor| {
                Tensor::zeros((grown, kv_heads, head_dim), like.dtype(), like.device())
            };
            let (nk, nv) = (alloc(k)?, alloc(v)?);
            if let Some((ok, ov)) = &self.buffers {
                nk.slice_set(&ok.narrow(0, 0, self.len)?, 0, 0)?;
                nv.slice_set(&ov.narrow(0, 0, self.len)?, 0, 0)?;
            }
            self.buffers = Some((nk, nv));
        }
        if let Some((bk, bv)) = &self.buffers {
            bk.slice_set(&k.contiguous()?, 0, self.len)?;
            bv.slice_set(&v.contiguous()?, 0, self.len)?;
        }
        self.len = needed;
        Ok(())
    }

    /// The whole key and value buffers (only the first [`len`](Self::len) positions are
    /// meaningful), for kernels that read in place.
    pub fn buffers(&self) -> Option<(&Tensor, &Tensor)> {
        self.buffers.as_ref().map(|(k, v)| (k, v))
    }

    /// The cached keys and values, `(len, kv_heads, head_dim)` each.
    pub fn keys_values(&self) -> Result<Option<(Tensor, Tensor)>> {
        match &self.buffers {
            Some((k, v)) => Ok(Some((k.narrow(0, 0, self.len)?, v.narrow(0, 0, self.len)?))),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn appends_survive_growth_in_order() {
        let device = Device::Cpu;
        let mut cache = KvCache::default();
        let mut all = Vec::new();
        // 300 positions in uneven steps: crosses the first capacity and a growth.
        for (step, seq) in [1usize, 200, 1, 98].into_iter().enumerate() {
            let k = Tensor::rand(0f32, 1.0, (seq, 2, 4), &device).unwrap();
            let v = (k.clone() * (step as f64 + 2.0)).unwrap();
            cache.append(&k, &v).unwrap();
            all.push(k);
        }
        assert_eq!(cache.len(), 300);
        let expected = Tensor::cat(&all, 0).unwrap();
        let (k, _) = cache.keys_values().unwrap().unwrap();
        let diff = (k - &expected).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(
            diff.to_dtype(DType::F32)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let (bk, _) = cache.buffers().unwrap();
        assert!(bk.dim(0).unwrap() >= 300);
    }
}
