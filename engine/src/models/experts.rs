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
    /// On a GPU, where the experts' weights lie, for the grouped kernels (`None` inside: they do
    /// not apply); found at the first forward pass.
    #[cfg(feature = "cuda")]
    on_gpu: std::sync::OnceLock<Option<crate::cuda::experts::ExpertWeights>>,
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
        Ok(Self {
            experts,
            #[cfg(feature = "cuda")]
            on_gpu: std::sync::OnceLock::new(),
        })
    }

    /// How many experts there are.
    pub(crate) fn len(&self) -> usize {
        self.experts.len()
    }

    /// Bytes one token reads: the share of `top_k` experts (all of them the same size).
    pub(crate) fn step_bytes(&self, top_k: usize) -> usize {
        self.weight_bytes() * top_k.min(self.len()) / self.len().max(1)
    }

    /// Bytes their weights take.
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
        #[cfg(feature = "cuda")]
        if let Some(out) = self.forward_on_gpu(xs, choices, weighting)? {
            return Ok(out);
        }
        let mut routed = vec![(Vec::<u32>::new(), Vec::<f32>::new()); self.experts.len()];
        for (token, choice) in choices.iter().enumerate() {
            for &(e, w) in choice {
                let experts = routed.len();
                let (tokens, weights) = routed.get_mut(e).ok_or_else(|| {
                    crate::EngineError::Internal(format!(
                        "the router chose expert {e} of {experts}"
                    ))
                })?;
                tokens.push(token as u32);
                weights.push(w);
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

#[cfg(feature = "cuda")]
impl Experts {
    /// [`Self::forward`] in three launches on a GPU (`cuda/experts.cu`), where
    /// [`Self::gpu_weights`] finds the experts' weights.
    fn forward_on_gpu(
        &self,
        xs: &Tensor,
        choices: &[Choice],
        weighting: Weighting,
    ) -> Result<Option<Tensor>> {
        let Some(weights) = self.gpu_weights(xs)? else {
            return Ok(None);
        };
        let (words, groups, pairs) = routing_words(choices, self.experts.len())?;
        let weight_in_dtype = weighting == Weighting::ModelDtype;
        crate::cuda::experts::forward(xs, weights, words, (groups, pairs), weight_in_dtype)
    }

    /// [`Self::forward`] for rows each routed to its `k` most probable experts of `probs`
    /// (`(tokens, experts)` f32; weights renormalized over the k when `normalize`), on a GPU with
    /// the choice made there too: nothing copied to the host and back. `None` where it does not
    /// apply (the caller then routes on the host).
    pub(crate) fn forward_routed_on_gpu(
        &self,
        xs: &Tensor,
        probs: &Tensor,
        (k, normalize): (usize, bool),
        weighting: Weighting,
    ) -> Result<Option<Tensor>> {
        let Some(weights) = self.gpu_weights(xs)? else {
            return Ok(None);
        };
        let weight_in_dtype = weighting == Weighting::ModelDtype;
        crate::cuda::experts::forward_routed(xs, weights, probs, (k, normalize), weight_in_dtype)
    }

    /// Where the experts' weights lie for the GPU's kernels, when they take `xs`: on a GPU, the
    /// engine's kernels on, the experts plain values (quantized ones take candle's path).
    fn gpu_weights(&self, xs: &Tensor) -> Result<Option<&crate::cuda::experts::ExpertWeights>> {
        if !xs.device().is_cuda() || !crate::cuda::KERNELS.on() {
            return Ok(None);
        }
        let found = match self.on_gpu.get() {
            Some(found) => found,
            None => {
                let dense: Option<Vec<_>> = self.experts.iter().map(Mlp::dense_weights).collect();
                let found = match dense {
                    Some(dense) => crate::cuda::experts::ExpertWeights::new(&dense)?,
                    None => None,
                };
                self.on_gpu.get_or_init(|| found)
            }
        };
        Ok(found.as_ref())
    }
}

#[cfg(not(feature = "cuda"))]
impl Experts {
    /// Without the `cuda` feature the router's choice is always the host's.
    pub(crate) fn forward_routed_on_gpu(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: (usize, bool),
        _: Weighting,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// The step's routing as the GPU's expert kernels read it (`cuda/experts.cu`), for `choices`
/// (each token's (expert, weight) pairs) over `experts` experts: the active experts ascending,
/// where each one's pairs start, each pair's token (grouped by expert, tokens ascending within),
/// where each token's pairs start, each token's pairs in ascending expert order, each pair's
/// weight as f32 bits; and the counts of active experts and pairs.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn routing_words(
    choices: &[Choice],
    experts: usize,
) -> Result<(Vec<u32>, usize, usize)> {
    let mut by_expert = vec![Vec::<(u32, f32)>::new(); experts];
    for (token, choice) in choices.iter().enumerate() {
        for &(e, w) in choice {
            let Some(pairs) = by_expert.get_mut(e) else {
                return Err(crate::EngineError::Internal(format!(
                    "token {token} routed to expert {e} of {experts}"
                )));
            };
            pairs.push((token as u32, w));
        }
    }
    let active: Vec<usize> = (0..experts).filter(|&e| !by_expert[e].is_empty()).collect();
    let (groups, pairs) = (active.len(), choices.iter().map(Vec::len).sum::<usize>());
    let mut words: Vec<u32> = active.iter().map(|&e| e as u32).collect();
    let mut start = 0u32;
    words.push(0);
    for &e in &active {
        start += by_expert[e].len() as u32;
        words.push(start);
    }
    // Pair p is the p-th in expert order; each token's pairs in expert order follow from it.
    let mut per_token = vec![Vec::<u32>::new(); choices.len()];
    let mut weights = Vec::with_capacity(pairs);
    for (p, &(token, w)) in active.iter().flat_map(|&e| &by_expert[e]).enumerate() {
        words.push(token);
        per_token[token as usize].push(p as u32);
        weights.push(w.to_bits());
    }
    let mut start = 0u32;
    words.push(0);
    for pairs in &per_token {
        start += pairs.len() as u32;
        words.push(start);
    }
    words.extend(per_token.into_iter().flatten());
    words.extend(weights);
    Ok((words, groups, pairs))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Experts 4, 1 and 3 active over three tokens: the tables the kernels walk, in the orders
    /// the sums need (a token's experts ascending, whatever order the router listed them in).
    #[test]
    fn routing_words_group_pairs_by_expert_and_list_each_tokens_pairs_in_expert_order() {
        let choices: Vec<Choice> = vec![
            vec![(4, 0.5), (1, 0.25)],
            vec![(3, 1.0)],
            vec![(1, 0.75), (4, 0.125)],
        ];
        let (words, groups, pairs) = routing_words(&choices, 6).unwrap();
        assert_eq!((groups, pairs), (3, 5));
        let bits = |w: f32| w.to_bits();
        // Pairs by expert: 1 ← tokens 0, 2 (pairs 0, 1); 3 ← token 1 (pair 2); 4 ← tokens 0, 2
        // (pairs 3, 4).
        let mut want = vec![1, 3, 4, 0, 2, 3, 5, 0, 2, 1, 0, 2];
        want.extend([0, 2, 3, 5]); // each token's pairs start
        want.extend([0, 3, 2, 1, 4]); // token 0: experts 1, 4; token 1: 3; token 2: 1, 4
        want.extend([0.25, 0.75, 1.0, 0.5, 0.125].map(bits));
        assert_eq!(words, want);
        assert!(
            routing_words(&[vec![(6, 1.0)]], 6).is_err(),
            "expert past the layer"
        );
        let (none, groups, pairs) = routing_words(&[vec![], vec![]], 4).unwrap();
        assert_eq!((groups, pairs), (0, 0));
        assert_eq!(none, [0, 0, 0, 0]);
    }
}
