//! Qwen3-MoE's sparse block, mirroring transformers' `Qwen3MoeSparseMoeBlock`: a linear router,
//! softmax over all experts in f32, the top k kept (renormalized when `norm_topk_prob`), and each
//! expert run on the tokens routed to it only — never a dense pass over all experts.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::linear::{Linear, Quantization};

use super::{Config, Mlp};
use crate::Result;

/// One sparse MoE block.
#[derive(Debug, Clone)]
pub(super) struct SparseMoe {
    gate: Linear,
    experts: Vec<Mlp>,
    top_k: usize,
    norm_topk_prob: bool,
}

impl SparseMoe {
    pub(super) fn new(cfg: &Config, q: Quantization, vb: VarBuilder) -> candle_core::Result<Self> {
        // Experts load in parallel: quantizing is the slow part of loading (candle's quantizers
        // are single-threaded), and each expert holds one full-precision tensor at a time.
        let experts = (0..cfg.num_experts)
            .into_par_iter()
            .map(|e| {
                Mlp::sized(
                    cfg.hidden_size,
                    cfg.moe_intermediate_size,
                    q,
                    vb.pp(format!("experts.{e}")),
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            // The router stays in the model dtype: its choices are what quantization must not move.
            gate: Linear::load(
                cfg.hidden_size,
                cfg.num_experts,
                false,
                Quantization::None,
                vb.pp("gate"),
            )?,
            experts,
            top_k: cfg.num_experts_per_tok,
            norm_topk_prob: cfg.norm_topk_prob,
        })
    }

    pub(super) fn weight_bytes(&self) -> usize {
        self.gate.weight_bytes() + self.experts.iter().map(Mlp::weight_bytes).sum::<usize>()
    }

    /// For each expert, the tokens routed to it and their weights.
    fn route(&self, probs: &[Vec<f32>]) -> Vec<(Vec<u32>, Vec<f32>)> {
        let mut routed = vec![(Vec::new(), Vec::new()); self.experts.len()];
        let mut order: Vec<usize> = Vec::with_capacity(self.experts.len());
        for (token, row) in probs.iter().enumerate() {
            order.clear();
            order.extend(0..row.len());
            // Highest first; a tie goes to the lower expert index, as torch.topk does on CPU.
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let chosen = &order[..self.top_k];
            let sum: f32 = if self.norm_topk_prob {
                chosen.iter().map(|&e| row[e]).sum()
            } else {
                1.0
            };
            for &e in chosen {
                routed[e].0.push(token as u32);
                routed[e].1.push(row[e] / sum);
            }
        }
        routed
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, seq, hidden) = x.dims3()?;
        let xs = x.reshape((b * seq, hidden))?;
        let logits = self.gate.forward(&xs)?.to_dtype(DType::F32)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()?;
        let mut out = xs.zeros_like()?;
        for (expert, (tokens, weights)) in self.experts.iter().zip(self.route(&probs)) {
            if tokens.is_empty() {
                continue;
            }
            let index = Tensor::new(tokens.as_slice(), xs.device())?;
            let weights = Tensor::new(weights.as_slice(), xs.device())?
                .to_dtype(xs.dtype())?
                .unsqueeze(1)?;
            let y = expert
                .forward(&xs.index_select(&index, 0)?)?
                .broadcast_mul(&weights)?;
            out = out.index_add(&index, &y, 0)?;
        }
        Ok(out.reshape((b, seq, hidden))?)
    }
}
