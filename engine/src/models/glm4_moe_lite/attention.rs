//! Multi-head latent attention (MLA), as transformers' `Glm4MoeLiteAttention` computes it, over a
//! cache that keeps per token only the normalized latent and the rotary key
//! (`kv_lora_rank + qk_rope_head_dim` values) instead of every head's keys and values.
//!
//! Two forms compute the same attention. *Absorbed* (what the engine runs): the key
//! up-projection is folded into the queries (`q_abs = W_UKᵀ q_nope`, per head) and the value
//! up-projection applied after attending over the latents, so attention is one shared
//! `latent ⊕ rotary` key for all heads, read straight from the pool. *Expanded* (transformers'
//! form, kept for the test that shows both agree): every cached latent goes through `kv_b_proj`
//! into full keys and values on every step.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::batch::Batch;
use crate::kv_pool::KvPool;
use crate::linear::{Linear, Quantization};
use crate::models::rotary::Angles;
use crate::norm::{forward_all, LinearInput, RmsNorm};
use crate::Result;

use super::Config;

/// The epsilon of the latent norms: transformers builds them without one, so its default.
const LATENT_EPS: f64 = 1e-6;

/// Which way attention runs (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MlaForm {
    /// Up-projections folded into the query and output sides; attention over the latents.
    #[default]
    Absorbed,
    /// Latents expanded into full keys and values every step, as transformers does.
    Expanded,
}

/// How queries are made: a low-rank path through a norm, or one projection.
#[derive(Debug, Clone)]
enum QueryProj {
    LowRank { a: Linear, norm: RmsNorm, b: Linear },
    Full(Linear),
}

/// The row order that turns each head's interleaved rotary pairs `(x0, x1), (x2, x3), …` into
/// halves `[x0, x2, …, x1, x3, …]`, so the half rotation computes the interleaved one exactly.
fn deinterleave(rows: usize, head: usize, rope: usize) -> Vec<u32> {
    (0..rows)
        .map(|r| {
            let (h, i) = (r / head, r % head);
            let nope = head - rope;
            if i < nope {
                r as u32
            } else {
                let j = i - nope;
                let from = if j < rope / 2 {
                    2 * j
                } else {
                    2 * (j - rope / 2) + 1
                };
                (h * head + nope + from) as u32
            }
        })
        .collect()
}

/// Reads `weight` under `vb`, `out × input`, its rows reordered by [`deinterleave`].
fn permuted(
    vb: &VarBuilder,
    out: usize,
    input: usize,
    head: usize,
    rope: usize,
    q: Quantization,
) -> candle_core::Result<Linear> {
    let w = vb.get((out, input), "weight")?;
    let order = Tensor::new(deinterleave(out, head, rope), w.device())?;
    Linear::from_weight(w.index_select(&order, 0)?, None, q)
}

#[derive(Debug, Clone)]
pub(super) struct Attention {
    q: QueryProj,
    /// `kv_a_proj_with_mqa`: the latent, then the rotary key (rows de-interleaved).
    kv_a: Linear,
    kv_norm: RmsNorm,
    /// `kv_b_proj`'s key half per head, `(heads, nope, rank)`: folds into the queries.
    w_uk: Tensor,
    /// `kv_b_proj`'s value half per head, transposed, `(heads, rank, v)`: applied to the
    /// attended latents.
    w_uv: Tensor,
    o_proj: Linear,
    heads: usize,
    nope: usize,
    rope: usize,
    v_dim: usize,
    rank: usize,
    scale: f64,
}

impl Attention {
    pub(super) fn new(cfg: &Config, q: Quantization, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, nope, rope, v) = (
            cfg.num_attention_heads,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
        );
        let (hidden, rank, qk) = (cfg.hidden_size, cfg.kv_lora_rank, cfg.qk_head_dim());
        if cfg.attention_bias {
            candle_core::bail!("attention_bias: biased MLA projections are not supported");
        }
        let q_proj = match cfg.q_lora_rank {
            Some(q_rank) => QueryProj::LowRank {
                a: Linear::load(hidden, q_rank, false, q, vb.pp("q_a_proj"))?,
                norm: RmsNorm::load(q_rank, LATENT_EPS, vb.pp("q_a_layernorm"))?,
                b: permuted(&vb.pp("q_b_proj"), h * qk, q_rank, qk, rope, q)?,
            },
            None => QueryProj::Full(permuted(&vb.pp("q_proj"), h * qk, hidden, qk, rope, q)?),
        };
        // One "head" of rank + rope rows whose last `rope` rows are the rotary key.
        let kv_a = permuted(
            &vb.pp("kv_a_proj_with_mqa"),
            rank + rope,
            hidden,
            rank + rope,
            rope,
            q,
        )?;
        // Kept dense: the absorbed form multiplies by its per-head halves directly.
        let kv_b = vb.pp("kv_b_proj").get((h * (nope + v), rank), "weight")?;
        let per_head = kv_b.reshape((h, nope + v, rank))?;
        Ok(Self {
            q: q_proj,
            kv_a,
            kv_norm: RmsNorm::load(rank, LATENT_EPS, vb.pp("kv_a_layernorm"))?,
            w_uk: per_head.narrow(1, 0, nope)?.contiguous()?,
            w_uv: per_head.narrow(1, nope, v)?.transpose(1, 2)?.contiguous()?,
            o_proj: Linear::load(h * v, hidden, false, q, vb.pp("o_proj"))?,
            heads: h,
            nope,
            rope,
            v_dim: v,
            rank,
            scale: 1.0 / (qk as f64).sqrt(),
        })
    }

    pub(super) fn weight_bytes(&self) -> usize {
        let q = match &self.q {
            QueryProj::LowRank { a, b, .. } => a.weight_bytes() + b.weight_bytes(),
            QueryProj::Full(l) => l.weight_bytes(),
        };
        let dense = [&self.w_uk, &self.w_uv]
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum::<usize>();
        q + self.kv_a.weight_bytes() + dense + self.o_proj.weight_bytes()
    }

    /// Attention for every sequence of `batch`; `x` holds their new rows back to back,
    /// `(1, rows, hidden)`. Each new token's latent and rotary key go into its sequence's blocks
    /// of `pool`'s layer `layer`; its queries attend over its own positions only.
    pub(super) fn forward(
        &self,
        x: LinearInput<'_>,
        rotary: &Angles,
        batch: &Batch<'_>,
        pool: &KvPool,
        layer: usize,
        form: MlaForm,
    ) -> Result<Tensor> {
        let (_, rows, _) = x.rows().dims3()?;
        let (h, nope, rope) = (self.heads, self.nope, self.rope);
        // 1. Queries, position-major (rows, heads, nope + rope), their rotary part rotated; the
        //    query and latent projections read the same input, quantized once.
        let (q, ckv) = match &self.q {
            QueryProj::LowRank { a, norm, b } => {
                let [qa, ckv] = forward_all([a, &self.kv_a], x)?;
                let [q] = forward_all([b], LinearInput::Normed(&qa, norm))?;
                (q, ckv)
            }
            QueryProj::Full(l) => {
                let [q, ckv] = forward_all([l, &self.kv_a], x)?;
                (q, ckv)
            }
        };
        let q = q.reshape((1, rows, h, nope + rope))?;
        let q_nope = q.narrow(3, 0, nope)?.squeeze(0)?;
        let q_rot = rotary.apply(&q.narrow(3, nope, rope)?)?.squeeze(0)?;
        // 2. What the cache keeps: the normalized latent and the rotated key, (rows, 1, rank + rope).
        let latent = self.kv_norm.forward(&ckv.narrow(2, 0, self.rank)?)?;
        let k_rot = rotary.apply(&ckv.narrow(2, self.rank, rope)?.unsqueeze(2)?)?;
        let cached = Tensor::cat(&[latent.unsqueeze(2)?, k_rot], 3)?.squeeze(0)?;
        pool.write_batch(layer, 0, batch, &cached)?;
        // 3. Attention, (rows, heads, v).
        let out = match form {
            MlaForm::Absorbed => self.absorbed(&q_nope, &q_rot, batch, pool, layer)?,
            MlaForm::Expanded => self.expanded(&q_nope, &q_rot, batch, pool, layer)?,
        };
        Ok(self
            .o_proj
            .forward(&out.reshape((1, rows, h * self.v_dim))?)?)
    }

    /// Queries `[W_UKᵀ q_nope | q_rot]` attend over `[latent | k_rot]` with the latents as
    /// values; `W_UV` lifts the result into each head's value space.
    fn absorbed(
        &self,
        q_nope: &Tensor,
        q_rot: &Tensor,
        batch: &Batch<'_>,
        pool: &KvPool,
        layer: usize,
    ) -> Result<Tensor> {
        // (heads, rows, nope) × (heads, nope, rank) → (rows, heads, rank).
        let q_abs = q_nope
            .transpose(0, 1)?
            .contiguous()?
            .matmul(&self.w_uk)?
            .transpose(0, 1)?;
        let query = Tensor::cat(&[q_abs, q_rot.clone()], 2)?.contiguous()?;
        let latents = &pool.layer(layer)[0];
        let attended = crate::attention::paged_batch(
            &query,
            batch,
            latents,
            latents,
            (pool.block_size(), self.rank),
            self.scale,
        )?;
        // (heads, rows, rank) × (heads, rank, v) → (rows, heads, v).
        Ok(attended
            .transpose(0, 1)?
            .contiguous()?
            .matmul(&self.w_uv)?
            .transpose(0, 1)?)
    }

    /// transformers' form: each sequence's cached latents expanded through `kv_b_proj` (its two
    /// halves, as the absorbed form keeps them) into full keys and values, then eager causal
    /// attention.
    fn expanded(
        &self,
        q_nope: &Tensor,
        q_rot: &Tensor,
        batch: &Batch<'_>,
        pool: &KvPool,
        layer: usize,
    ) -> Result<Tensor> {
        let h = self.heads;
        let query = Tensor::cat(&[q_nope, q_rot], 2)?;
        let latents = &pool.layer(layer)[0];
        let bs = pool.block_size();
        let mut outs = Vec::with_capacity(batch.seqs.len());
        let mut row = 0;
        for seq in &batch.seqs {
            let n = seq.tokens.len();
            let len = seq.start + n;
            let slots: Vec<u32> = (0..len)
                .map(|t| seq.blocks[t / bs] * bs as u32 + (t % bs) as u32)
                .collect();
            let rows = latents.index_select(&Tensor::new(slots, q_nope.device())?, 0)?;
            let cached = crate::kv_pool::values(&rows, self.rank + self.rope)?
                .squeeze(1)?
                .to_dtype(q_nope.dtype())?;
            // Every latent through kv_b_proj's halves: (heads, len, nope) keys, (heads, len, v)
            // values.
            let latent = cached
                .narrow(1, 0, self.rank)?
                .unsqueeze(0)?
                .broadcast_as((h, len, self.rank))?
                .contiguous()?;
            let k_nope = latent.matmul(&self.w_uk.transpose(1, 2)?.contiguous()?)?;
            let vals = latent.matmul(&self.w_uv)?;
            let k_rot = cached
                .narrow(1, self.rank, self.rope)?
                .unsqueeze(0)?
                .broadcast_as((h, len, self.rope))?;
            let k = Tensor::cat(&[k_nope, k_rot.contiguous()?], 2)?;
            // (heads, n, len) scores, the causal mask, softmax in f32.
            let q = query.narrow(0, row, n)?.transpose(0, 1)?.contiguous()?;
            let mut scores = (q.matmul(&k.t()?)? * self.scale)?.to_dtype(DType::F32)?;
            let mask: Vec<f32> = (0..n)
                .flat_map(|i| {
                    (0..len).map(move |j| {
                        if j > seq.start + i {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            scores = scores.broadcast_add(&Tensor::from_vec(mask, (n, len), q.device())?)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(vals.dtype())?;
            outs.push(probs.matmul(&vals)?.transpose(0, 1)?);
            row += n;
        }
        Ok(Tensor::cat(&outs, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::deinterleave;

    #[test]
    fn rotary_rows_are_deinterleaved_per_head_and_the_rest_kept() {
        // Two heads of 2 plain + 4 rotary rows.
        let order = deinterleave(12, 6, 4);
        assert_eq!(order, vec![0, 1, 2, 4, 3, 5, 6, 7, 8, 10, 9, 11]);
    }
}
