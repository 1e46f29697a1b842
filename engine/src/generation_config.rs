//! `generation_config.json`: the model's own defaults for stopping and sampling.

use pio_plugin_api::wire::{GenerationDefaults, InferRequest};
use serde::Deserialize;

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::sampling::SamplingParams;
use crate::text::TextCodec;

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

/// The end-of-sequence ids `config.json` names, at its top or in its `text_config`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ModelEos {
    #[serde(deserialize_with = "one_or_many")]
    eos_token_id: Vec<u32>,
    text_config: Option<TextEos>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TextEos {
    #[serde(deserialize_with = "one_or_many")]
    eos_token_id: Vec<u32>,
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
    /// Where it names no end of sequence (absent, as in many fine-tunes and merges), the ids
    /// come from `config.json` (its text model's, for a vision model), as transformers derives a
    /// generation config from the model's: without any, an answer ran to the end of the context.
    pub fn load(checkpoint: &Checkpoint) -> Result<Self> {
        let mut config: Self = checkpoint
            .optional_json("generation_config.json")?
            .unwrap_or_default();
        if config.eos_token_id.is_empty() {
            let model: ModelEos = checkpoint.config()?;
            config.eos_token_id = match model.eos_token_id.is_empty() {
                true => model
                    .text_config
                    .map(|t| t.eos_token_id)
                    .unwrap_or_default(),
                false => model.eos_token_id,
            };
        }
        Ok(config)
    }

    /// The tokenizer's `eos_token` (`tokenizer_config.json`) too, which vLLM always stops at
    /// beside the generation config's: a chat fine-tune keeps the base's id in `config.json`
    /// (or an older `generation_config.json`) and its chat's end in the tokenizer, and stopping
    /// at the former alone wrote made-up turns to the end of the context.
    pub fn or_tokenizer_eos(mut self, checkpoint: &Checkpoint, codec: &TextCodec) -> Result<Self> {
        let config: Option<serde_json::Map<String, serde_json::Value>> =
            checkpoint.optional_json("tokenizer_config.json")?;
        let eos = config.and_then(|c| crate::chat::token_text(c.get("eos_token")));
        let id = eos.and_then(|text| codec.token_id(&text));
        self.eos_token_id
            .extend(id.filter(|id| !self.eos_token_id.contains(id)));
        Ok(self)
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

    /// A snapshot whose generation config names no end of sequence takes config.json's (its
    /// text model's for a vision model), then the tokenizer's `eos_token`.
    #[test]
    fn the_end_of_sequence_falls_back_to_the_model_then_the_tokenizer() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let copy = |name: &str| {
            let dir = tempfile::tempdir().unwrap();
            for entry in std::fs::read_dir(fixtures.join(name)).unwrap() {
                let entry = entry.unwrap();
                std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
            }
            dir
        };
        let load = |dir: &std::path::Path| GenerationConfig::load(&Checkpoint::open(dir).unwrap());
        let qwen3 = copy("qwen3-tiny");
        std::fs::remove_file(qwen3.path().join("generation_config.json")).unwrap();
        assert_eq!(
            load(qwen3.path()).unwrap().eos_token_id,
            [2],
            "config.json's"
        );
        // Beside the tokenizer's (a chat fine-tune of a base model ends its turns there); the
        // fixture's config names <|im_end|> (2) itself, so here it names another.
        let edit_config = |edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
            let path = qwen3.path().join("config.json");
            let mut config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            edit(config.as_object_mut().unwrap());
            std::fs::write(&path, config.to_string()).unwrap();
        };
        edit_config(&|c| {
            c.insert("eos_token_id".into(), 0.into());
        });
        let checkpoint = Checkpoint::open(qwen3.path()).unwrap();
        let codec = TextCodec::load(&checkpoint).unwrap();
        let im_end = codec.token_id("<|im_end|>").unwrap();
        let both = load(qwen3.path())
            .unwrap()
            .or_tokenizer_eos(&checkpoint, &codec)
            .unwrap();
        assert_eq!(both.eos_token_id, [0, im_end]);
        // A file that names its own: the tokenizer's is added too (vLLM stops at both).
        std::fs::copy(
            fixtures.join("qwen3-tiny/generation_config.json"),
            qwen3.path().join("generation_config.json"),
        )
        .unwrap();
        let named = load(qwen3.path())
            .unwrap()
            .or_tokenizer_eos(&checkpoint, &codec)
            .unwrap();
        assert_eq!(named.eos_token_id, [2, 0]);
        std::fs::write(
            qwen3.path().join("generation_config.json"),
            r#"{"eos_token_id": 0}"#,
        )
        .unwrap();
        let older = load(qwen3.path())
            .unwrap()
            .or_tokenizer_eos(&checkpoint, &codec)
            .unwrap();
        assert_eq!(older.eos_token_id, [0, im_end]);
        std::fs::remove_file(qwen3.path().join("generation_config.json")).unwrap();
        std::fs::write(
            qwen3.path().join("generation_config.json"),
            r#"{"top_k": 3}"#,
        )
        .unwrap();
        assert_eq!(
            load(qwen3.path()).unwrap().eos_token_id,
            [0],
            "config.json's"
        );
        let vl = copy("qwen3-vl-tiny");
        std::fs::remove_file(vl.path().join("generation_config.json")).unwrap();
        assert_eq!(load(vl.path()).unwrap().eos_token_id, [2], "text_config's");
        // Neither file: the tokenizer's eos_token.
        edit_config(&|c| {
            c.remove("eos_token_id");
        });
        let checkpoint = Checkpoint::open(qwen3.path()).unwrap();
        let bare = GenerationConfig::load(&checkpoint).unwrap();
        assert!(bare.eos_token_id.is_empty());
        let codec = TextCodec::load(&checkpoint).unwrap();
        let eos = codec.token_id("<|im_end|>").unwrap();
        let found = bare.or_tokenizer_eos(&checkpoint, &codec).unwrap();
        assert_eq!(found.eos_token_id, [eos]);
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
