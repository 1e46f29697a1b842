//! Choosing the next token from the model's logits: penalties, then temperature, top-k, top-p and
//! min-p, then a draw from a seeded generator — or the arg-max when greedy. Log-probabilities
//! reported to clients are those of the raw model distribution (before any of this), as
//! transformers' `output_logits` and vLLM's default report them; under a grammar too, where
//! vLLM's are the masked distribution's (its bitmask is applied to the logits first).

use llguidance::toktrie::SimpleVob;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// How to sample; `None` fields are off.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingParams {
    /// 0 or `None` with no other setting: greedy.
    pub temperature: Option<f32>,
    /// Keep the k most likely tokens.
    pub top_k: Option<u32>,
    /// Keep the smallest set whose probability reaches p.
    pub top_p: Option<f32>,
    /// Drop tokens below `min_p` times the most likely token's probability.
    pub min_p: Option<f32>,
    /// Divide positive (multiply negative) logits of tokens seen in prompt or output (1 = off).
    pub repetition_penalty: Option<f32>,
    /// Subtract from the logits of tokens generated at least once.
    pub presence_penalty: Option<f32>,
    /// Subtract, per occurrence, from the logits of generated tokens.
    pub frequency_penalty: Option<f32>,
    /// Makes sampling reproducible.
    pub seed: Option<u64>,
    /// Added to these tokens' logits before the penalties (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
}

impl SamplingParams {
    /// Whether these parameters pick the most likely token every time: also below a temperature
    /// of 1e-5 (vLLM's cut), where dividing the logits by it overflows f32 and the draw would
    /// land on an arbitrary candidate.
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_none_or(|t| t < 1e-5)
    }
}

/// A sampler for one sequence.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// `log Σ e^l` over `logits`, in f64: a token's log-probability is its logit minus this. The
/// exponentials go through the kernels (eight at a time where the CPU has AVX2): a full row of
/// a 151,936-token vocabulary for every token of a request that asks for logprobs.
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    pio_kernels::exp::sum_exp(logits, max).ln() + f64::from(max)
}

/// The `k` highest entries of `values` as (index, value), best first (ties: lower index first).
pub fn top_k(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    if k <= SMALL_K {
        return small_top_k(values, k);
    }
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    idx.select_nth_unstable_by(k - 1, |&a, &b| {
        values[b as usize]
            .total_cmp(&values[a as usize])
            .then(a.cmp(&b))
    });
    let mut top: Vec<(u32, f32)> = idx[..k].iter().map(|&i| (i, values[i as usize])).collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    top
}

/// Up to this k, [`top_k`] keeps a sorted list of the best so far: one comparison rejects almost
/// every entry, with no copy of the vocabulary.
const SMALL_K: usize = 64;

/// [`top_k`] for a small `k` (at most `values.len()`): a pass keeping the best `k` in order.
fn small_top_k(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &v) in values.iter().enumerate() {
        // Later entries lose ties, so only a strictly larger value enters a full list.
        if top.len() == k && v.total_cmp(&top[k - 1].1).is_le() {
            continue;
        }
        let at = top.partition_point(|c| c.1.total_cmp(&v).is_ge());
        top.insert(at, (i as u32, v));
        top.truncate(k);
    }
    top
}

impl Sampler {
    /// A sampler; without a seed, one is drawn from the OS.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    /// Picks the next token. `prompt` and `generated` feed the penalties.
    pub fn sample(&mut self, logits: &[f32], prompt: &[u32], generated: &[u32]) -> u32 {
        self.sample_from(logits, prompt, generated, None)
            .unwrap_or_default()
    }

    /// Picks the next token among those `allowed` (all when `None`), before penalties and
    /// truncation, so top-k/p choose among allowed tokens only; `None` if nothing is allowed.
    pub fn sample_from(
        &mut self,
        logits: &[f32],
        prompt: &[u32],
        generated: &[u32],
        allowed: Option<&SimpleVob>,
    ) -> Option<u32> {
        let adjusted;
        let logits = if allowed.is_none() && !self.penalizes() {
            logits
        } else {
            let mut copy = match allowed {
                None => logits.to_vec(),
                // Copy only the allowed entries: a grammar's mask usually allows a few hundred
                // of the vocabulary's 150k tokens.
                Some(mask) => {
                    let mut kept = vec![f32::NEG_INFINITY; logits.len()];
                    mask.iter_set_entries(|id| {
                        if let Some(&l) = logits.get(id) {
                            kept[id] = l;
                        }
                    });
                    kept
                }
            };
            self.apply_penalties(&mut copy, prompt, generated);
            adjusted = copy;
            &adjusted
        };
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let temperature = self.params.temperature.unwrap_or(1.0);
        let scaled = |(i, l): (u32, f32)| (i, (l / temperature) as f64);
        // Top-k first, on the logits themselves (the ranking is the same at any temperature).
        let candidates: Vec<(u32, f64)> = match self.params.top_k.filter(|&k| k > 0) {
            Some(k) => top_k(logits, k as usize)
                .into_iter()
                .filter(|&(_, l)| l > f32::NEG_INFINITY)
                .map(scaled)
                .collect(),
            None => logits
                .iter()
                .enumerate()
                .filter(|(_, &l)| l > f32::NEG_INFINITY)
                .map(|(i, &l)| scaled((i as u32, l)))
                .collect(),
        };
        self.draw_among(candidates)
    }

    /// The most tokens this sampler ever draws among, when that is decided by top-k before
    /// anything else reads the row (sampled, with top-k, no penalty): then the row's `k` best are
    /// all it needs ([`Self::sample_top`]), which a GPU finds where the logits are.
    pub fn keeps_at_most(&self) -> Option<usize> {
        let k = self.params.top_k.filter(|&k| k > 0)?;
        (!self.params.is_greedy() && !self.penalizes()).then_some(k as usize)
    }

    /// [`Self::sample`] from a row's best entries — `(id, logit)`, best first, ties to the lower
    /// id, at least [`Self::keeps_at_most`] of them (or the whole row) — rather than the row:
    /// the same token, and the same generator state after, as the whole row gives.
    pub fn sample_top(&mut self, best: &[(u32, f32)]) -> Option<u32> {
        let k = self.keeps_at_most().unwrap_or(best.len()).min(best.len());
        let temperature = self.params.temperature.unwrap_or(1.0);
        let candidates = best[..k]
            .iter()
            .filter(|&&(_, l)| l > f32::NEG_INFINITY)
            .map(|&(i, l)| (i, (l / temperature) as f64))
            .collect();
        self.draw_among(candidates)
    }

    /// A draw among `candidates` (`(id, logit / temperature)`, top-k applied): min-p and top-p,
    /// then one number from the generator.
    fn draw_among(&mut self, mut candidates: Vec<(u32, f64)>) -> Option<u32> {
        if candidates.is_empty() {
            return None;
        }
        // Scaled logits become weights (unnormalised probabilities; the best one's is exactly 1),
        // in f32 (a draw needs no more), summed in f64.
        let max = candidates
            .iter()
            .map(|c| c.1)
            .fold(f64::NEG_INFINITY, f64::max);
        candidates
            .iter_mut()
            .for_each(|c| c.1 = ((c.1 - max) as f32).exp() as f64);
        let total: f64 = candidates.iter().map(|c| c.1).sum();
        let keep = self.truncated(&mut candidates, total);
        let kept = &candidates[..keep];
        let mass: f64 = kept.iter().map(|c| c.1).sum();
        Some(draw(kept, self.rng.random::<f64>() * mass))
    }

    /// Moves the candidates min-p and top-p keep to the front and says how many: the most likely
    /// ones, at least one (`total`: all candidates' weights). Neither ranks the vocabulary: min-p
    /// is a partition, top-p a weighted selection, both linear; the draw's order does not matter.
    /// Top-p takes its share of what min-p kept, as vLLM's v1 sampler (min-p a logits processor
    /// before top-k and top-p) renormalizes.
    fn truncated(&self, candidates: &mut [(u32, f64)], total: f64) -> usize {
        let mut keep = candidates.len();
        let mut total = total;
        if let Some(min_p) = self.params.min_p.filter(|&m| m > 0.0) {
            keep = partition(candidates, |c| c.1 >= min_p as f64);
            if keep == 0 {
                candidates.select_nth_unstable_by(0, ranked);
                keep = 1;
            }
            total = candidates[..keep].iter().map(|c| c.1).sum();
        }
        if let Some(p) = self.params.top_p.filter(|&p| p < 1.0) {
            keep = nucleus(&mut candidates[..keep], p as f64 * total);
        }
        keep
    }

    /// The repetition penalty in effect (1 or below 0: none).
    fn repetition_penalty(&self) -> Option<f32> {
        self.params
            .repetition_penalty
            .filter(|&r| r != 1.0 && r > 0.0)
    }

    /// Whether this sampler always takes the most likely token of the model's own logits (greedy,
    /// no penalties): then the row itself need not be read, only its arg-max.
    pub fn picks_best(&self) -> bool {
        self.params.is_greedy() && !self.penalizes()
    }

    /// Whether any penalty (or a bias) changes the logits.
    fn penalizes(&self) -> bool {
        !self.params.logit_bias.is_empty()
            || self.repetition_penalty().is_some()
            || self.params.presence_penalty.is_some_and(|p| p != 0.0)
            || self.params.frequency_penalty.is_some_and(|f| f != 0.0)
    }

    fn apply_penalties(&self, logits: &mut [f32], prompt: &[u32], generated: &[u32]) {
        // The bias first, as vLLM applies it (a logits processor, before the penalties). A
        // masked-out token stays out.
        for &(id, bias) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        if let Some(r) = self.repetition_penalty() {
            let mut seen: Vec<u32> = prompt.iter().chain(generated).copied().collect();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / r } else { *l * r };
                }
            }
        }
        let presence = self.params.presence_penalty.unwrap_or(0.0);
        let frequency = self.params.frequency_penalty.unwrap_or(0.0);
        if presence != 0.0 || frequency != 0.0 {
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &id in generated {
                *counts.entry(id).or_default() += 1;
            }
            for (id, n) in counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= presence + frequency * n as f32;
                }
            }
        }
    }
}

/// The candidate whose share of the weights `at` falls in, walking `candidates` in their order
/// (the last one if rounding leaves `at` past the end).
fn draw(candidates: &[(u32, f64)], mut at: f64) -> u32 {
    for &(id, w) in candidates {
        if at < w {
            return id;
        }
        at -= w;
    }
    candidates.last().map_or(0, |c| c.0)
}

/// Most likely first; ties: the lower token id first (a total order, so the sets below are unique).
fn ranked(a: &(u32, f64), b: &(u32, f64)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0))
}

/// Moves the items `keep` accepts to the front; returns how many there are.
fn partition(items: &mut [(u32, f64)], keep: impl Fn(&(u32, f64)) -> bool) -> usize {
    let mut front = 0;
    for i in 0..items.len() {
        if keep(&items[i]) {
            items.swap(front, i);
            front += 1;
        }
    }
    front
}

/// Moves the fewest most likely `items` whose weights reach `target` to the front and returns
/// how many (all, if they never reach it): top-p's set, as a rank-ordered walk would find it, in
/// expected linear time (a quickselect that halves by rank and keeps the half holding the
/// boundary) where sorting 150k candidates took ~7 ms a row.
fn nucleus(items: &mut [(u32, f64)], target: f64) -> usize {
    // items[..lo] are in (their weights short of `target` by `need`); items[hi..] are out.
    let (mut lo, mut hi, mut need) = (0, items.len(), target);
    while hi - lo > 1 {
        let half = (hi - lo) / 2;
        items[lo..hi].select_nth_unstable_by(half, ranked);
        let upper: f64 = items[lo..lo + half].iter().map(|c| c.1).sum();
        if upper >= need {
            hi = lo + half;
        } else {
            need -= upper;
            lo += half;
        }
    }
    hi
}

/// The index of the largest value, the first among equals, NaN passed over; `None` when no
/// value is above -inf (no token can be had).
pub(crate) fn argmax(values: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in values.iter().enumerate() {
        if v > best.map_or(f32::NEG_INFINITY, |b| b.1) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[], &[]), 1);
    }

    /// NaN (an overflowed dtype, broken weights) is never the best token, and a row with nothing
    /// finite gives none, biased or not.
    #[test]
    fn greedy_passes_over_nan_and_finds_nothing_in_a_row_without_a_number() {
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0]), Some(2));
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), None);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NAN]), None);
        assert_eq!(argmax(&[]), None);
        let mut biased = Sampler::new(params(|p| p.logit_bias = vec![(0, 1.0)]));
        assert_eq!(
            biased.sample_from(&[f32::NAN, 1.0, 2.0], &[], &[], None),
            Some(2)
        );
    }

    /// A temperature too small to divide by is greedy (vLLM's cut at 1e-5): the division
    /// overflowed to infinities and the draw fell on the last candidate.
    #[test]
    fn a_vanishing_temperature_is_greedy() {
        for seed in 0..10 {
            let mut s = Sampler::new(params(|p| {
                p.temperature = Some(1e-38);
                p.seed = Some(seed);
            }));
            assert_eq!(s.sample(&[30.0, 0.0, 10.0], &[], &[]), 0);
            let mut top = Sampler::new(params(|p| {
                p.temperature = Some(1e-38);
                p.top_k = Some(2);
                p.seed = Some(seed);
            }));
            assert_eq!(top.sample(&[30.0, 0.0, 10.0], &[], &[]), 0);
        }
        assert!(!params(|p| p.temperature = Some(1e-4)).is_greedy());
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(params(|p| {
                p.temperature = Some(1.0);
                p.seed = Some(seed);
            }));
            (0..20)
                .map(|_| s.sample(&logits, &[], &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.0, 2.0, 1.0];
        for p in [
            params(|p| p.top_k = Some(1)),
            params(|p| p.top_p = Some(0.01)),
        ] {
            let mut s = Sampler::new(SamplingParams {
                temperature: Some(1.0),
                seed: Some(1),
                ..p
            });
            assert!((0..50).all(|_| s.sample(&logits, &[], &[]) == 1));
        }
    }

    /// Top-p's set as a walk down the full ranking finds it.
    fn nucleus_by_sorting(items: &[(u32, f64)], target: f64) -> Vec<u32> {
        let mut sorted = items.to_vec();
        sorted.sort_by(ranked);
        let mut mass = 0.0;
        let end = sorted
            .iter()
            .position(|c| {
                mass += c.1;
                mass >= target
            })
            .map_or(sorted.len(), |i| i + 1);
        let mut ids: Vec<u32> = sorted[..end].iter().map(|c| c.0).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn small_and_large_top_k_agree_with_a_full_sort() {
        let values: Vec<f32> = (0..500)
            .map(|i| ((i * 37 % 101) as f32 * 0.25).sin())
            .collect();
        let mut sorted: Vec<(u32, f32)> = (0..500u32).map(|i| (i, values[i as usize])).collect();
        sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        for k in [1, 2, 20, SMALL_K, SMALL_K + 1, 499, 500, 900] {
            assert_eq!(top_k(&values, k), sorted[..k.min(500)], "k = {k}");
            assert_eq!(
                small_top_k(&values, k.min(500)),
                sorted[..k.min(500)],
                "k = {k}"
            );
        }
    }

    #[test]
    fn the_nucleus_is_the_set_a_full_ranking_gives() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        for case in 0..300 {
            let n = 1 + case % 97;
            // Ties included: every third case draws weights from a handful of values.
            let items: Vec<(u32, f64)> = (0..n as u32)
                .map(|id| {
                    let w = next();
                    (
                        id,
                        if case % 3 == 0 {
                            (w * 4.0).floor() / 4.0
                        } else {
                            w * w
                        },
                    )
                })
                .collect();
            let total: f64 = items.iter().map(|c| c.1).sum();
            for p in [0.0, 0.1, 0.5, 0.8, 0.95, 0.999] {
                let mut got = items.clone();
                let keep = nucleus(&mut got, p * total);
                let mut ids: Vec<u32> = got[..keep].iter().map(|c| c.0).collect();
                ids.sort_unstable();
                assert_eq!(
                    ids,
                    nucleus_by_sorting(&items, p * total),
                    "case {case}, p {p}"
                );
            }
        }
    }

    #[test]
    fn draws_follow_the_truncated_distribution() {
        // Probabilities 8:4:2:1:1 (of 16). top-p 0.7 keeps the first two (12/16 >= 0.7);
        // min-p 0.2 keeps those at 8 × 0.2 = 1.6 or more: the first three.
        let logits: Vec<f32> = [8.0f32, 4.0, 2.0, 1.0, 1.0]
            .iter()
            .map(|w| w.ln())
            .collect();
        let freq = |p: SamplingParams| {
            let mut s = Sampler::new(SamplingParams {
                temperature: Some(1.0),
                seed: Some(3),
                ..p
            });
            let mut counts = [0u32; 5];
            for _ in 0..20_000 {
                counts[s.sample(&logits, &[], &[]) as usize] += 1;
            }
            counts.map(|c| c as f64 / 20_000.0)
        };
        let close = |got: [f64; 5], want: [f64; 5]| {
            got.iter().zip(want).all(|(g, w)| (g - w).abs() < 0.015)
        };
        let all = freq(SamplingParams::default());
        assert!(close(all, [0.5, 0.25, 0.125, 0.0625, 0.0625]), "{all:?}");
        let top_p = freq(params(|p| p.top_p = Some(0.7)));
        assert!(
            close(top_p, [2.0 / 3.0, 1.0 / 3.0, 0.0, 0.0, 0.0]),
            "{top_p:?}"
        );
        let min_p = freq(params(|p| p.min_p = Some(0.2)));
        assert!(
            close(min_p, [8.0 / 14.0, 4.0 / 14.0, 2.0 / 14.0, 0.0, 0.0]),
            "{min_p:?}"
        );
        let top_k = freq(params(|p| p.top_k = Some(3)));
        assert!(
            close(top_k, [8.0 / 14.0, 4.0 / 14.0, 2.0 / 14.0, 0.0, 0.0]),
            "{top_k:?}"
        );
        // Both: the smaller set wins.
        let both = freq(params(|p| {
            p.min_p = Some(0.2);
            p.top_p = Some(0.7);
        }));
        assert!(
            close(both, [2.0 / 3.0, 1.0 / 3.0, 0.0, 0.0, 0.0]),
            "{both:?}"
        );
        // Top-p of what min-p kept (8:4:2, 14): 0.8 × 14 = 11.2 takes the first two. Of the
        // whole row's 16 it was 12.8, three.
        let renormalized = freq(params(|p| {
            p.min_p = Some(0.2);
            p.top_p = Some(0.8);
        }));
        assert!(
            close(renormalized, [2.0 / 3.0, 1.0 / 3.0, 0.0, 0.0, 0.0]),
            "{renormalized:?}"
        );
    }

    /// A sampler handed only the row's best entries (as a GPU's top-k gives them) draws what it
    /// draws from the whole row, token for token, over many steps of one seeded generator: with
    /// ties in the row, -inf entries, exactly k candidates and more than k.
    #[test]
    fn sampling_from_the_best_entries_draws_what_the_whole_row_draws() {
        let mut row: Vec<f32> = (0..3000)
            .map(|i| ((i * 7919) % 1000) as f32 / 97.0)
            .collect();
        row[17] = row[2017];
        row[5] = f32::NEG_INFINITY;
        for (k, top_p, min_p, more) in [
            (1, None, None, 0),
            (5, Some(0.9), None, 3),
            (20, Some(0.8), Some(0.05), 44),
            (64, None, Some(0.01), 0),
            (40, Some(0.95), None, 24),
        ] {
            let sampling = SamplingParams {
                temperature: Some(0.7),
                top_k: Some(k),
                top_p,
                min_p,
                seed: Some(k as u64),
                ..SamplingParams::default()
            };
            let (mut whole, mut best) = (
                Sampler::new(sampling.clone()),
                Sampler::new(sampling.clone()),
            );
            assert_eq!(best.keeps_at_most(), Some(k as usize));
            let entries = top_k(&row, k as usize + more);
            for step in 0..200 {
                let a = whole.sample(&row, &[], &[]);
                let b = best.sample_top(&entries).unwrap();
                assert_eq!(a, b, "k {k}, step {step}");
            }
        }
        // Penalties read the whole row; an unbounded sampler needs it; greedy takes the arg-max.
        for p in [
            params(|p| {
                p.temperature = Some(1.0);
                p.top_k = Some(20);
                p.repetition_penalty = Some(1.2);
            }),
            params(|p| p.temperature = Some(1.0)),
            params(|p| p.top_k = Some(20)),
        ] {
            assert_eq!(Sampler::new(p.clone()).keeps_at_most(), None, "{p:?}");
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // p(1) is e^4 times p(0): min_p = 0.5 keeps only token 1.
        let mut s = Sampler::new(params(|p| {
            p.temperature = Some(1.0);
            p.min_p = Some(0.5);
            p.seed = Some(3);
        }));
        assert!((0..50).all(|_| s.sample(&[0.0, 4.0], &[], &[]) == 1));
    }

    /// A bias moves greedy and sampled choices alike: -100 bans the best token, +100 raises
    /// an unlikely one to the top.
    #[test]
    fn logit_bias_bans_and_lifts_tokens() {
        let logits = [0.0, 5.0, 1.0, 2.0];
        let biased = |bias: Vec<(u32, f32)>, temperature: f32| {
            let mut s = Sampler::new(params(|p| {
                p.logit_bias = bias.clone();
                p.temperature = Some(temperature);
                p.seed = Some(1);
            }));
            s.sample(&logits, &[], &[])
        };
        assert_eq!(biased(vec![], 0.0), 1);
        assert_eq!(biased(vec![(1, -100.0)], 0.0), 3);
        assert_eq!(biased(vec![(0, 100.0)], 0.0), 0);
        for seed_run in 0..20 {
            let mut s = Sampler::new(params(|p| {
                p.logit_bias = vec![(1, -100.0), (3, -100.0), (2, -100.0)];
                p.temperature = Some(1.0);
                p.seed = Some(seed_run);
            }));
            assert_eq!(s.sample(&logits, &[], &[]), 0, "the only token left");
        }
        // An id past the vocabulary is ignored here (the runtime refuses it first).
        assert_eq!(biased(vec![(99, 100.0)], 0.0), 1);
    }

    #[test]
    fn penalties_push_seen_tokens_down() {
        let mut s = Sampler::new(params(|p| p.repetition_penalty = Some(4.0)));
        assert_eq!(s.sample(&[2.0, 1.0], &[0], &[]), 1);
        let mut s = Sampler::new(params(|p| p.frequency_penalty = Some(0.6)));
        assert_eq!(s.sample(&[2.0, 1.0], &[], &[0, 0]), 1);
        let mut s = Sampler::new(params(|p| p.presence_penalty = Some(0.5)));
        assert_eq!(s.sample(&[2.0, 1.0], &[], &[0]), 0, "1.5 still beats 1.0");
    }

    #[test]
    fn log_sum_exp_normalizes_and_top_k_orders() {
        // A vocabulary-sized row, its log-probabilities against f64 throughout.
        let logits: Vec<f32> = (0..151_936)
            .map(|i| ((i as f32) * 0.618).sin() * 12.0)
            .collect();
        let lse = log_sum_exp(&logits);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let exact = logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln()
            + max;
        assert!((lse - exact).abs() < 1e-6, "{lse} vs {exact}");
        let total: f64 = logits.iter().map(|&l| (l as f64 - lse).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert_eq!(
            top_k(&[1.0, 2.0, 3.0], 2)
                .iter()
                .map(|t| t.0)
                .collect::<Vec<_>>(),
            [2, 1]
        );
    }

    #[test]
    fn a_mask_limits_every_sampler_to_the_allowed_tokens() {
        let logits: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
        let mut allowed = SimpleVob::alloc(60); // shorter than the logits: padded ids are out
        for id in [3, 17, 41] {
            allowed.allow_token(id);
        }
        let mut greedy = Sampler::new(SamplingParams::default());
        let best = [3u32, 17, 41]
            .into_iter()
            .max_by(|a, b| logits[*a as usize].total_cmp(&logits[*b as usize]))
            .unwrap();
        assert_eq!(
            greedy.sample_from(&logits, &[], &[], Some(&allowed)),
            Some(best)
        );
        let mut hot = Sampler::new(params(|p| {
            p.temperature = Some(5.0);
            p.top_k = Some(50);
            p.top_p = Some(0.99);
            p.repetition_penalty = Some(1.3);
            p.presence_penalty = Some(0.5);
            p.seed = Some(3);
        }));
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..300 {
            let t = hot
                .sample_from(&logits, &[3], &[17], Some(&allowed))
                .unwrap();
            seen.insert(t);
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), [3, 17, 41]);
        let none = SimpleVob::alloc(64);
        assert_eq!(greedy.sample_from(&logits, &[], &[], Some(&none)), None);
        assert_eq!(hot.sample_from(&logits, &[], &[], Some(&none)), None);
    }
}
