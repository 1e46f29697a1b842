//! Qwen3's attention: grouped-query attention with per-head RMSNorm on queries and keys and rotary
//! positions, each sequence of a batch attending over its own blocks of the KV pool.

use crate::batch::Batch;
use crate::candle_core::{Module, Tensor};
use crate::candle_nn::VarBuilder;
use crate::kv_pool::KvPool;
use crate::linear::{Linear, Quantization};
use crate::norm::RmsNorm;
use crate::norm::{forward_all, LinearInput};
use crate::Result;

use super::Config;
use crate::models::rotary::Angles;

/// The query, key and value projections.
#[derive(Debug, Clone)]
enum Projections {
    /// One layer (see [`Linear::stacked`]): queries, then keys, then values, so the activations
    /// are read and quantized once.
    Stacked(Linear),
    /// Three layers (biases, or rows that end inside a tile).
    Separate { q: Linear, k: Linear, v: Linear },
}

#[derive(Debug, Clone)]
pub(super) struct Attention {
    qkv: Projections,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    heads: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
}

impl Attention {
    pub(super) fn weight_bytes(&self) -> usize {
        let qkv = match &self.qkv {
            Projections::Stacked(l) => l.weight_bytes(),
            Projections::Separate { q, k, v } => {
                q.weight_bytes() + k.weight_bytes() + v.weight_bytes()
            }
        };
        qkv + self.o_proj.weight_bytes()
    }

    pub(super) fn new(cfg: &Config, q: Quantization, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, kv, d) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let bias = cfg.attention_bias;
        let q_proj = Linear::load(cfg.hidden_size, h * d, bias, q, vb.pp("q_proj"))?;
        let k_proj = Linear::load(cfg.hidden_size, kv * d, bias, q, vb.pp("k_proj"))?;
        let v_proj = Linear::load(cfg.hidden_size, kv * d, bias, q, vb.pp("v_proj"))?;
        let stacked = match q_proj.stacked(&k_proj)? {
            Some(qk) => qk.stacked(&v_proj)?,
            None => None,
        };
        let qkv = match stacked {
            Some(all) => Projections::Stacked(all),
            None => Projections::Separate {
                q: q_proj,
                k: k_proj,
                v: v_proj,
            },
        };
        Ok(Self {
            qkv,
            o_proj: Linear::load(h * d, cfg.hidden_size, bias, q, vb.pp("o_proj"))?,
            q_norm: RmsNorm::load(d, cfg.rms_norm_eps, vb.pp("q_norm"))?,
            k_norm: RmsNorm::load(d, cfg.rms_norm_eps, vb.pp("k_norm"))?,
            heads: h,
            kv_heads: kv,
            head_dim: d,
        })
    }

    /// Attention for every sequence of `batch`; `x` holds their new rows back to back,
    /// `(1, rows, hidden)`. Each sequence's keys and values go into its blocks of `pool`'s layer
    /// `layer`, then its queries attend over its own positions only.
    pub(super) fn forward(
        &self,
        x: LinearInput<'_>,
        rotary: &Angles,
        batch: &Batch<'_>,
        pool: &KvPool,
        layer: usize,
    ) -> Result<Tensor> {
        let (_, rows, _) = x.rows().dims3()?;
        // 1. Project into heads, position-major: (rows, heads, head_dim); per-head RMSNorm on
        //    queries and keys, then rotary positions; keys and values into the pool.
        let q = match &self.qkv {
            Projections::Stacked(all) => {
                let [y] = forward_all([all], x)?;
                match self.inputs_fused(&y, rotary, batch, pool, layer)? {
                    Some(q) => q,
                    None => {
                        let (qn, kn) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
                        let (q, k, v) = (
                            y.narrow(2, 0, qn)?,
                            y.narrow(2, qn, kn)?,
                            y.narrow(2, qn + kn, kn)?,
                        );
                        self.inputs([q, k, v], rotary, batch, pool, layer)?
                    }
                }
            }
            Projections::Separate { q, k, v } => {
                let qkv = forward_all([q, k, v], x)?;
                self.inputs(qkv, rotary, batch, pool, layer)?
            }
        };
        // 2. Each sequence attends over its own positions.
        let tensors = pool.layer(layer);
        let out = crate::attention::paged_batch(
            &q,
            batch,
            &tensors[0],
            &tensors[1],
            (pool.block_size(), self.head_dim),
            1.0 / (self.head_dim as f64).sqrt(),
        )?;
        // 3. Merge heads and project out.
        Ok(self
            .o_proj
            .forward(&out.reshape((1, rows, self.heads * self.head_dim))?)?)
    }

    /// The queries, `(rows, heads, head_dim)`, normalized and rotated, with the keys (the same)
    /// and the values written into the pool: candle's operations, one by one.
    fn inputs(
        &self,
        [q, k, v]: [Tensor; 3],
        rotary: &Angles,
        batch: &Batch<'_>,
        pool: &KvPool,
        layer: usize,
    ) -> Result<Tensor> {
        let (_, rows, _) = q.dims3()?;
        // (A narrowed part of the stacked output is copied into its own tensor here.)
        let split = |t: Tensor, heads: usize| t.reshape((1, rows, heads, self.head_dim));
        let (q, k, v) = (
            split(q, self.heads)?,
            split(k, self.kv_heads)?,
            split(v, self.kv_heads)?,
        );
        let q = rotary.apply(&self.q_norm.forward(&q)?)?.squeeze(0)?;
        let k = rotary.apply(&self.k_norm.forward(&k)?)?.squeeze(0)?;
        pool.write_batch(layer, 0, batch, &k)?;
        pool.write_batch(layer, 1, batch, &v.squeeze(0)?)?;
        Ok(q)
    }

    /// [`Self::inputs`] from the stacked projection's output in one launch, on a GPU; `None` where
    /// the fused kernel does not apply.
    #[cfg(feature = "cuda")]
    fn inputs_fused(
        &self,
        qkv: &Tensor,
        rotary: &Angles,
        batch: &Batch<'_>,
        pool: &KvPool,
        layer: usize,
    ) -> Result<Option<Tensor>> {
        let Some(slots) = pool.device_slots(batch)? else {
            return Ok(None);
        };
        let [keys, values] = pool.layer(layer) else {
            return Ok(None);
        };
        if self.q_norm.eps() != self.k_norm.eps() {
            return Ok(None);
        }
        let (cos, sin) = rotary.tables();
        let inputs = crate::cuda::fused::AttentionInputs {
            q_norm: self.q_norm.weight(),
            k_norm: self.k_norm.weight(),
            eps: self.q_norm.eps(),
            slots: &slots,
            keys,
            values,
            shape: (self.heads, self.kv_heads, self.head_dim),
        };
        Ok(inputs.apply(qkv, cos, sin)?)
    }

    /// Off the GPU nothing is fused here.
    #[cfg(not(feature = "cuda"))]
    fn inputs_fused(
        &self,
        _: &Tensor,
        _: &Angles,
        _: &Batch<'_>,
        _: &KvPool,
        _: usize,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The stacked query, key and value projections of a mapped checkpoint are the file's own
    /// pages: files sorted by name keep `k_proj, o_proj, q_proj, v_proj`, so they could not be
    /// served as one tensor, and before the kernels multiplied parts they were copied together.
    #[test]
    fn queries_keys_and_values_stay_the_files_pages() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3-tiny");
        let checkpoint = crate::checkpoint::Checkpoint::open(&dir).unwrap();
        let cfg: Config = checkpoint.config().unwrap();
        let vb = checkpoint.weights(DType::F32, &Device::Cpu).unwrap();
        let layer = vb.pp("model.layers.0.self_attn");
        let attention = Attention::new(&cfg, Quantization::None, layer).unwrap();
        let Projections::Stacked(Linear::DenseStack(parts)) = &attention.qkv else {
            panic!("not one stack of the three tensors: {:?}", attention.qkv);
        };
        assert_eq!(parts.len(), 3);
        for (part, rows) in
            parts
                .iter()
                .zip([cfg.num_attention_heads, cfg.kv_heads(), cfg.kv_heads()])
        {
            assert_eq!(
                part.dims2().unwrap(),
                (rows * cfg.head_dim(), cfg.hidden_size)
            );
            assert!(
                crate::mapping::holds_mapped(part),
                "a copy, not the file's pages"
            );
        }
    }
}
