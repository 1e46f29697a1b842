//! A sparse layer's routed experts: each expert runs on the tokens routed to it only — never a
//! dense pass over all experts — and its outputs, weighted, are summed into the tokens' rows in
//! the model dtype as transformers' `index_add_` does. How tokens are routed is each family's own
//! (softmax for Qwen3-MoE, sigmoid with a correction bias for GLM).

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::mlp::Mlp;
use crate::linear::Quantization;
use crate::Result;

/// Where the routing weight meets an expert's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Weighting {
    /// The weight rounded to the model dtype first (Qwen3-MoE casts its routing weights).
    ModelDtype,
    /// The product taken in f32, rounded once (GLM keeps its weights in f32).
    F32,
}

/// The chosen experts of one token: (expert, weight) pairs.
pub(crate) type Choice = Vec<(usize, f32)>;

/// A layer's routed experts.
#[derive(Debug, Clone)]
pub(crate) struct Experts {
    experts: Vec<Mlp>,
}

impl Experts {
    /// Reads `count` experts under `vb` (`0.gate_proj`, …).
    pub(crate) fn load(
        count: usize,
        hidden: usize,
        width: usize,
        q: Quantization,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        // Experts load in parallel: quantizing is the slow part of loading (candle's quantizers
        // are single-threaded), and each expert holds one full-precision tensor at a time.
        let experts = (0..count)
            .into_par_iter()
            .map(|e| Mlp::load(hidden, width, q, vb.pp(e.to_string())))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { experts })
    }

    /// How many experts there are.
    pub(crate) fn len(&self) -> usize {
        self.experts.len()
    }

    /// Bytes their weights take.
    /// Bytes one token reads: the share of `top_k` experts (all of them the same size).
    pub(crate) fn step_bytes(&self, top_k: usize) -> usize {
        self.weight_bytes() * top_k.min(self.len()) / self.len().max(1)
    }

    pub(crate) fn weight_bytes(&self) -> usize {
        self.experts.iter().map(Mlp::weight_bytes).sum()
    }

    /// `Σ weight · expert(x)` for each row of `xs` (`(tokens, hidden)`) over its `choices`.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        choices: &[Choice],
        weighting: Weighting,
    ) -> Result<Tensor> {
        let mut routed = vec![(Vec::<u32>::new(), Vec::<f32>::new()); self.experts.len()];
        for (token, choice) in choices.iter().enumerate() {
            for &(e, w) in choice {
                routed[e].0.push(token as u32);
                routed[e].1.push(w);
            }
        }
        // Every expert's tokens and weights go to the device in one copy each, and each expert
        // reads its part: on a GPU a copy from host memory waits for the device's queue, so one
        // per expert would stall the queue before every expert after the first.
        let spans: Vec<(usize, usize)> = routed
            .iter()
            .scan(0, |at, (tokens, _)| {
                let span = (*at, tokens.len());
                *at += tokens.len();
                Some(span)
            })
            .collect();
        let (tokens, weights): (Vec<u32>, Vec<f32>) = routed
            .into_iter()
            .flat_map(|(t, w)| t.into_iter().zip(w))
            .unzip();
        if tokens.is_empty() {
            return Ok(xs.zeros_like()?);
        }
        let all_tokens = Tensor::new(tokens.as_slice(), xs.device())?;
        let all_weights = Tensor::new(weights.as_slice(), xs.device())?.unsqueeze(1)?;
        let all_weights = match weighting {
            Weighting::ModelDtype => all_weights.to_dtype(xs.dtype())?,
            Weighting::F32 => all_weights,
        };
        let mut out = xs.zeros_like()?;
        // Ascending expert order, as transformers' eager loop adds them.
        for (expert, &(at, n)) in self.experts.iter().zip(&spans) {
            if n == 0 {
                continue;
            }
            let index = all_tokens.narrow(0, at, n)?;
            let weights = all_weights.narrow(0, at, n)?;
            let y = expert.forward(&xs.index_select(&index, 0)?)?;
            let y = match weighting {
                Weighting::ModelDtype => y.broadcast_mul(&weights)?,
                Weighting::F32 => y
                    .to_dtype(DType::F32)?
                    .broadcast_mul(&weights)?
                    .to_dtype(xs.dtype())?,
            };
            out = out.index_add(&index, &y, 0)?;
        }
        Ok(out)
    }
}
