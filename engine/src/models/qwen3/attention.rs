//! Qwen3's attention: grouped-query attention with per-head RMSNorm on queries and keys and rotary
//! positions, each sequence of a batch attending over its own blocks of the KV pool.

use crate::batch::Batch;
use crate::candle_core::{Module, Tensor};
use crate::candle_nn::{rms_norm, RmsNorm, VarBuilder};
use crate::kv_pool::KvPool;
use crate::linear::{Linear, Quantization};
use crate::Result;

use super::Config;
use crate::models::rotary::Angles;

#[derive(Debug, Clone)]
pub(super) struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    heads: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
}

impl Attention {
    pub(super) fn weight_bytes(&self) -> usize {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
            .iter()
            .map(|l| l.weight_bytes())
            .sum()
    }

    pub(super) fn new(cfg: &Config, q: Quantization, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, kv, d) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let bias = cfg.attention_bias;
        Ok(Self {
            q_proj: Linear::load(cfg.hidden_size, h * d, bias, q, vb.pp("q_proj"))?,
            k_proj: Linear::load(cfg.hidden_size, kv * d, bias, q, vb.pp("k_proj"))?,
            v_proj: Linear::load(cfg.hidden_size, kv * d, bias, q, vb.pp("v_proj"))?,
            o_proj: Linear::load(h * d, cfg.hidden_size, bias, q, vb.pp("o_proj"))?,
            q_norm: rms_norm(d, cfg.rms_norm_eps, vb.pp("q_norm"))?,
            k_norm: rms_norm(d, cfg.rms_norm_eps, vb.pp("k_norm"))?,
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
        x: &Tensor,
        rotary: &Angles,
        batch: &Batch<'_>,
        pool: &KvPool,
        layer: usize,
    ) -> Result<Tensor> {
        let (_, rows, _) = x.dims3()?;
        // 1. Project into heads, position-major: (rows, heads, head_dim); per-head RMSNorm on
        //    queries and keys, then rotary positions.
        let split = |t: Tensor, heads: usize| t.reshape((1, rows, heads, self.head_dim));
        let q = split(self.q_proj.forward(x)?, self.heads)?;
        let k = split(self.k_proj.forward(x)?, self.kv_heads)?;
        let v = split(self.v_proj.forward(x)?, self.kv_heads)?;
        let q = rotary.apply(&self.q_norm.forward(&q)?)?.squeeze(0)?;
        let k = rotary.apply(&self.k_norm.forward(&k)?)?.squeeze(0)?;
        let v = v.squeeze(0)?;
        // 2. Store every sequence's keys and values, then each attends over its own positions.
        pool.write_batch(layer, 0, batch, &k)?;
        pool.write_batch(layer, 1, batch, &v)?;
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
}
