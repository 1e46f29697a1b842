//! `generation_config.json`: the model's own defaults for stopping and sampling.

use pio_plugin_api::wire::{GenerationDefaults, InferRequest};
use serde::Deserialize;

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::sampling::SamplingParams;

/// The defaults a checkpoint ships (all optional).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct GenerationConfig {
    /// End-of-sequence ids: one id or a list.
    #[serde(deserialize_with = "one_or_many")]
    pub eos_token_id: Vec<u32>,
    /// Whether the model is meant to be sampled (false: greedy).
    pub do_sample: Option<bool>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Nucleus mass.
    pub top_p: Option<f32>,
    /// Top-k cut-off.
    pub top_k: Option<u32>,
    /// Min-p cut-off.
    pub min_p: Option<f32>,
    /// Repetition penalty.
    pub repetition_penalty: Option<f32>,
    /// Default generation length.
    pub max_new_tokens: Option<u32>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
        None(()),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(id) => vec![id],
        OneOrMany::Many(ids) => ids,
        OneOrMany::None(()) => Vec::new(),
    })
}

impl GenerationConfig {
    /// The ids that end `request`'s sequence: none when it asks to run to `max_tokens`
    /// (`ignore_eos`).
    pub fn end_ids(&self, request: &InferRequest) -> Vec<u32> {
        if request.ignore_eos {
            Vec::new()
        } else {
            self.eos_token_id.clone()
        }
    }

    /// `request`'s sampling: its own values first, then the manifest's `defaults`, then these.
    /// Sampled (as vLLM and the OpenAI API do) at temperature 1 when nothing sets one, unless
    /// the checkpoint says `do_sample: false` (greedy, as transformers takes it). A `top_k` of 0
    /// is no cut-off, and a request's 0 overrides the defaults' cut-off.
    pub fn sampling(&self, r: &InferRequest, d: &GenerationDefaults) -> SamplingParams {
        let sampled = self.do_sample.unwrap_or(true);
        let temperature = (r.temperature.or(d.temperature))
            .or(if sampled { self.temperature } else { Some(0.0) })
            .or(Some(1.0));
        SamplingParams {
            temperature,
            top_k: r.top_k.or(d.top_k).or(self.top_k),
            top_p: r.top_p.or(d.top_p).or(self.top_p),
            min_p: r.min_p.or(d.min_p).or(self.min_p),
            repetition_penalty: (r.repetition_penalty.or(d.repetition_penalty))
                .or(self.repetition_penalty),
            presence_penalty: r.presence_penalty,
            frequency_penalty: r.frequency_penalty,
            seed: r.seed,
            logit_bias: r.logit_bias.clone(),
        }
    }

    /// Loads the snapshot's `generation_config.json`, or the empty defaults when there is none.
    pub fn load(checkpoint: &Checkpoint) -> Result<Self> {
        Ok(checkpoint
            .optional_json("generation_config.json")?
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_is_one_id_or_a_list() {
        let one: GenerationConfig = serde_json::from_str(r#"{"eos_token_id": 7}"#).unwrap();
        assert_eq!(one.eos_token_id, [7]);
        let many: GenerationConfig =
            serde_json::from_str(r#"{"eos_token_id": [2, 0], "top_k": 20}"#).unwrap();
        assert_eq!((many.eos_token_id, many.top_k), (vec![2, 0], Some(20)));
    }

    #[test]
    fn ignore_eos_leaves_no_end_ids() {
        let config = GenerationConfig {
            eos_token_id: vec![2, 0],
            ..GenerationConfig::default()
        };
        let mut request = pio_plugin_api::wire::InferRequest::default();
        assert_eq!(config.end_ids(&request), [2, 0]);
        request.ignore_eos = true;
        assert!(config.end_ids(&request).is_empty());
    }

    /// The request, then the manifest, then the checkpoint; no temperature anywhere samples at
    /// 1 (vLLM's and OpenAI's default) unless the checkpoint says `do_sample: false`; a
    /// request's `top_k` 0 turns the checkpoint's cut-off off.
    #[test]
    fn sampling_takes_the_request_then_the_manifest_then_the_checkpoint() {
        let checkpoint = GenerationConfig {
            temperature: Some(0.7),
            top_k: Some(20),
            top_p: Some(0.8),
            ..GenerationConfig::default()
        };
        let manifest = GenerationDefaults {
            top_p: Some(0.9),
            ..GenerationDefaults::default()
        };
        let plain = InferRequest::default();
        let s = checkpoint.sampling(&plain, &manifest);
        assert_eq!(
            (s.temperature, s.top_k, s.top_p),
            (Some(0.7), Some(20), Some(0.9))
        );
        let asked = InferRequest {
            temperature: Some(0.2),
            top_k: Some(0),
            ..InferRequest::default()
        };
        let s = checkpoint.sampling(&asked, &manifest);
        assert_eq!((s.temperature, s.top_k), (Some(0.2), Some(0)));
        let bare = GenerationConfig::default();
        let s = bare.sampling(&plain, &GenerationDefaults::default());
        assert_eq!(s.temperature, Some(1.0), "nothing set: sampled at 1");
        assert!(!s.is_greedy());
        let greedy = GenerationConfig {
            do_sample: Some(false),
            ..checkpoint.clone()
        };
        let s = greedy.sampling(&plain, &manifest);
        assert!(s.is_greedy(), "do_sample: false");
        let s = greedy.sampling(&asked, &manifest);
        assert_eq!(
            s.temperature,
            Some(0.2),
            "a request's temperature still wins"
        );
    }
}
