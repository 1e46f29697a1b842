//! GLM's sparse block, mirroring transformers' `Glm4MoeLiteMoE`: a sigmoid router in f32 whose
//! correction bias steers only which experts are chosen (group-limited top-k, `noaux_tc`), the
//! weights taken from the unbiased scores, normalized and scaled; the routed experts plus an
//! always-on shared expert.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use crate::linear::Quantization;
use crate::models::experts::{Choice, Experts, Weighting};
use crate::models::mlp::Mlp;
use crate::Result;

use super::Config;

/// How a token's experts are chosen and weighted.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Routing {
    /// Experts per token.
    pub top_k: usize,
    /// Expert groups.
    pub groups: usize,
    /// Groups a token may use.
    pub top_groups: usize,
    /// Renormalize the chosen weights.
    pub normalize: bool,
    /// Factor on the weights after normalizing.
    pub scale: f32,
}

/// The `k` highest of `values` (indices into it) that `allowed` admits, highest first; a tie goes
/// to the lower index, as torch's CPU topk does.
fn top(values: &[f32], k: usize, allowed: impl Fn(usize) -> bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).filter(|&i| allowed(i)).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

impl Routing {
    /// The chosen experts of one token from its router logits (f32) and the correction `bias`.
    pub(super) fn choose(&self, logits: &[f32], bias: &[f32]) -> Choice {
        let scores: Vec<f32> = logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
        let biased: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
        let per_group = biased.len() / self.groups;
        // A group's score is the sum of its two best biased scores.
        let group_scores: Vec<f32> = biased
            .chunks_exact(per_group)
            .map(|g| top(g, 2, |_| true).iter().map(|&i| g[i]).sum())
            .collect();
        let groups = top(&group_scores, self.top_groups, |_| true);
        let chosen = top(&biased, self.top_k, |e| groups.contains(&(e / per_group)));
        let sum: f32 = if self.normalize {
            chosen.iter().map(|&e| scores[e]).sum::<f32>() + 1e-20
        } else {
            1.0
        };
        chosen
            .into_iter()
            .map(|e| (e, scores[e] / sum * self.scale))
            .collect()
    }
}

/// One sparse block.
#[derive(Debug, Clone)]
pub(super) struct SparseMoe {
    /// The router's weight, `(experts, hidden)`, in f32 as transformers upcasts it.
    gate: Tensor,
    bias: Vec<f32>,
    routing: Routing,
    experts: Experts,
    shared: Mlp,
}

impl SparseMoe {
    pub(super) fn new(cfg: &Config, q: Quantization, vb: VarBuilder) -> candle_core::Result<Self> {
        let experts = cfg.n_routed_experts;
        let router = vb.pp("gate");
        // The router stays unquantized (its choices are what quantization must not move); the
        // bias is kept in f32 whatever the model dtype, as transformers keeps it.
        let gate = router
            .get((experts, cfg.hidden_size), "weight")?
            .to_dtype(DType::F32)?;
        let bias = router
            .get_with_hints_dtype(
                experts,
                "e_score_correction_bias",
                Default::default(),
                DType::F32,
            )?
            .to_vec1::<f32>()?;
        Ok(Self {
            gate,
            bias,
            routing: Routing {
                top_k: cfg.num_experts_per_tok,
                groups: cfg.n_group,
                top_groups: cfg.topk_group,
                normalize: cfg.norm_topk_prob,
                scale: cfg.routed_scaling_factor as f32,
            },
            experts: Experts::load(
                experts,
                cfg.hidden_size,
                cfg.moe_intermediate_size,
                q,
                vb.pp("experts"),
            )?,
            shared: Mlp::load(
                cfg.hidden_size,
                cfg.moe_intermediate_size * cfg.n_shared_experts,
                q,
                vb.pp("shared_experts"),
            )?,
        })
    }

    pub(super) fn weight_bytes(&self) -> usize {
        self.gate.elem_count() * 4 + self.experts.weight_bytes() + self.shared.weight_bytes()
    }

    /// Bytes one token reads: the router, its `top_k` routed experts and the shared one.
    pub(super) fn step_bytes(&self) -> usize {
        self.gate.elem_count() * 4
            + self.experts.step_bytes(self.routing.top_k)
            + self.shared.weight_bytes()
    }

    /// The block on `x` (`(1, rows, hidden)`); also returns each row's chosen experts.
    pub(super) fn forward(&self, x: &Tensor) -> Result<(Tensor, Vec<Choice>)> {
        let (b, seq, hidden) = x.dims3()?;
        let xs = x.reshape((b * seq, hidden))?;
        let logits = xs
            .to_dtype(DType::F32)?
            .matmul(&self.gate.t()?)?
            .to_vec2::<f32>()?;
        let choices: Vec<Choice> = logits
            .iter()
            .map(|row| self.routing.choose(row, &self.bias))
            .collect();
        let routed = self.experts.forward(&xs, &choices, Weighting::F32)?;
        let out = (routed + self.shared.forward(&xs)?)?;
        Ok((out.reshape((b, seq, hidden))?, choices))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(top_k: usize, groups: usize, top_groups: usize) -> Routing {
        Routing {
            top_k,
            groups,
            top_groups,
            normalize: true,
            scale: 2.0,
        }
    }

    fn logit(p: f32) -> f32 {
        (p / (1.0 - p)).ln()
    }

    #[test]
    fn the_bias_picks_the_experts_and_the_unbiased_scores_weigh_them() {
        let logits: Vec<f32> = [0.9, 0.8, 0.1, 0.2].iter().map(|&p| logit(p)).collect();
        // Expert 2's bias lifts it over expert 1 for the choice only.
        let choice = routing(2, 1, 1).choose(&logits, &[0.0, 0.0, 0.75, 0.0]);
        let experts: Vec<usize> = choice.iter().map(|c| c.0).collect();
        assert_eq!(experts, vec![0, 2]);
        let (w0, w2) = (choice[0].1, choice[1].1);
        assert!((w0 - 0.9 / 1.0 * 2.0).abs() < 1e-5, "{w0}");
        assert!((w2 - 0.1 / 1.0 * 2.0).abs() < 1e-5, "{w2}");
    }

    #[test]
    fn only_the_best_groups_are_open() {
        // Groups of 2: {0,1} sums 1.0, {2,3} sums 1.3, {4,5} sums 1.2. Expert 0 alone is the best
        // expert, but its group loses with one group open.
        let logits: Vec<f32> = [0.95, 0.05, 0.65, 0.65, 0.6, 0.6]
            .iter()
            .map(|&p| logit(p))
            .collect();
        let zero = [0.0; 6];
        let one_group: Vec<usize> = routing(2, 3, 1)
            .choose(&logits, &zero)
            .iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(one_group, vec![2, 3]);
        let two_groups: Vec<usize> = routing(3, 3, 2)
            .choose(&logits, &zero)
            .iter()
            .map(|c| c.0)
            .collect();
        // Groups {2,3} and {4,5} win; a tie goes to the lower index.
        assert_eq!(two_groups, vec![2, 3, 4]);
        let ungrouped: Vec<usize> = routing(2, 1, 1)
            .choose(&logits, &zero)
            .iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(ungrouped, vec![0, 2]);
    }

    #[test]
    fn weights_sum_to_the_scaling_factor_when_normalized() {
        let logits = [0.3, -1.0, 2.0, 0.5, -0.2, 1.1, 0.0, 0.7];
        let choice = routing(4, 2, 2).choose(&logits, &[0.0; 8]);
        let sum: f32 = choice.iter().map(|c| c.1).sum();
        assert!((sum - 2.0).abs() < 1e-5, "{sum}");
        let mut raw = routing(4, 2, 2);
        raw.normalize = false;
        let choice = raw.choose(&logits, &[0.0; 8]);
        let expected: f32 = [2.0f32, 1.1, 0.7, 0.5]
            .iter()
            .map(|l| 2.0 / (1.0 + (-l).exp()))
            .sum();
        let sum: f32 = choice.iter().map(|c| c.1).sum();
        assert!((sum - expected).abs() < 1e-5, "{sum} vs {expected}");
    }
}
