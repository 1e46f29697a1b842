//! Qwen3-MoE's sparse block, mirroring transformers' `Qwen3MoeSparseMoeBlock`: a linear router,
//! softmax over all experts in f32, the top k kept (renormalized when `norm_topk_prob`), and each
//! expert run on the tokens routed to it only — never a dense pass over all experts.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::linear::{Linear, Quantization};
use crate::models::experts::{Choice, Experts, Weighting};

use super::Config;
use crate::Result;

/// One sparse MoE block.
#[derive(Debug, Clone)]
pub(super) struct SparseMoe {
    gate: Linear,
    experts: Experts,
    top_k: usize,
    norm_topk_prob: bool,
}

impl SparseMoe {
    pub(super) fn new(cfg: &Config, q: Quantization, vb: VarBuilder) -> candle_core::Result<Self> {
        let experts = Experts::load(
            cfg.num_experts,
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            q,
            vb.pp("experts"),
        )?;
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
        self.gate.weight_bytes() + self.experts.weight_bytes()
    }

    /// Bytes one token reads: the router and its `top_k` experts.
    pub(super) fn step_bytes(&self) -> usize {
        self.gate.weight_bytes() + self.experts.step_bytes(self.top_k)
    }

    /// Each token's chosen experts and their weights.
    fn route(&self, probs: &[Vec<f32>]) -> Vec<Choice> {
        let mut order: Vec<usize> = Vec::with_capacity(self.experts.len());
        probs
            .iter()
            .map(|row| {
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
                chosen.iter().map(|&e| (e, row[e] / sum)).collect()
            })
            .collect()
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, seq, hidden) = x.dims3()?;
        let xs = x.reshape((b * seq, hidden))?;
        let logits = self.gate.forward(&xs)?.to_dtype(DType::F32)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        let routing = (self.top_k, self.norm_topk_prob);
        if let Some(out) =
            self.experts
                .forward_routed_on_gpu(&xs, &probs, routing, Weighting::ModelDtype)?
        {
            return Ok(out.reshape((b, seq, hidden))?);
        }
        let probs = probs.to_vec2::<f32>()?;
        let out = self
            .experts
            .forward(&xs, &self.route(&probs), Weighting::ModelDtype)?;
        Ok(out.reshape((b, seq, hidden))?)
    }
}
