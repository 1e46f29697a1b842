//! `generation_config.json`: the model's own defaults for stopping and sampling.

use serde::Deserialize;

use crate::checkpoint::Checkpoint;
use crate::error::Result;

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
    pub fn end_ids(&self, request: &pio_plugin_api::wire::InferRequest) -> Vec<u32> {
        if request.ignore_eos {
            Vec::new()
        } else {
            self.eos_token_id.clone()
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
}
