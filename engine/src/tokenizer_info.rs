//! What a model tells clients about its tokenizer (vLLM's `GET /tokenizer_info`, which
//! lm-eval's remote tokenizer reads for the end-of-sequence token and the chat template).

use serde_json::{Map, Value};

use crate::chat::{token_text, ChatTemplate};
use crate::checkpoint::Checkpoint;
use crate::error::Result;

/// A field naming a path on the machine that loaded (or converted) the model: nothing a client
/// can use, and nothing to show it (`vocab_file`, `special_tokens_map_file`, `name_or_path`).
fn names_a_path(field: &str) -> bool {
    field.ends_with("_file") || field == "name_or_path"
}

/// Lists of special tokens, each written as its text or as `{"content": ...}`.
const TOKEN_LISTS: [&str; 2] = ["additional_special_tokens", "extra_special_tokens"];

/// The class transformers loads a `tokenizer.json`-only folder as, for configs that name none.
const DEFAULT_CLASS: &str = "PreTrainedTokenizerFast";

/// `checkpoint`'s tokenizer settings as vLLM reports them: `tokenizer_config.json` (a GGUF
/// file's metadata in its stead) without file paths, each special token as its text,
/// `chat_template` the one `template` renders (or none), and `tokenizer_class` always set.
pub fn tokenizer_info(
    checkpoint: &Checkpoint,
    template: Option<&ChatTemplate>,
) -> Result<Map<String, Value>> {
    let config = checkpoint
        .optional_json::<Map<String, Value>>("tokenizer_config.json")?
        .unwrap_or_default();
    Ok(cleaned(config, template.map(ChatTemplate::source)))
}

/// `config` as a client reads it (see [`tokenizer_info`]).
fn cleaned(mut config: Map<String, Value>, template: Option<&str>) -> Map<String, Value> {
    config.retain(|field, _| !names_a_path(field));
    // transformers writes special tokens as `{"content": ..., "lstrip": ...}` objects in older
    // configs; clients read `eos_token` as the token's text.
    let named: Vec<String> = (config.keys())
        .filter(|k| k.ends_with("_token") && config[k.as_str()].is_object())
        .cloned()
        .collect();
    for key in named {
        let text = token_text(config.get(&key)).map_or(Value::Null, Value::String);
        config.insert(key, text);
    }
    for list in TOKEN_LISTS {
        if let Some(Value::Array(tokens)) = config.get_mut(list) {
            for token in tokens.iter_mut().filter(|t| t.is_object()) {
                *token = token_text(Some(token)).map_or(Value::Null, Value::String);
            }
        }
    }
    // vLLM lists the added tokens' texts by id; the flags beside each are the tokenizer's.
    if let Some(Value::Object(added)) = config.get_mut("added_tokens_decoder") {
        for token in added.values_mut() {
            if let Some(text) = token.get("content").and_then(Value::as_str) {
                *token = Value::String(text.to_string());
            }
        }
    }
    match template {
        Some(source) => config.insert("chat_template".into(), source.into()),
        // A list of named templates, or a template the model does not use, is not one a client
        // could render.
        None => config.remove("chat_template"),
    };
    if !config.get("tokenizer_class").is_some_and(Value::is_string) {
        config.insert("tokenizer_class".into(), DEFAULT_CLASS.into());
    }
    config
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn paths_go_tokens_become_text_and_the_template_is_the_rendered_one() {
        let config = map(json!({
            "vocab_file": "/models/x/vocab.json",
            "merges_file": "/models/x/merges.txt",
            "special_tokens_map_file": "/home/someone/x/special_tokens_map.json",
            "name_or_path": "/models/x",
            "additional_special_tokens": [{"content": "<|im_start|>"}, "<|im_end|>"],
            "eos_token": {"content": "<|im_end|>", "lstrip": false, "__type": "AddedToken"},
            "bos_token": null,
            "pad_token": "<|endoftext|>",
            "added_tokens_decoder": {"151643": {"content": "<|endoftext|>", "special": true}},
            "chat_template": [{"name": "default", "template": "{{ x }}"}],
            "model_max_length": 131072,
        }));
        let info = cleaned(config, Some("{{ messages }}"));
        for gone in [
            "vocab_file",
            "merges_file",
            "special_tokens_map_file",
            "name_or_path",
        ] {
            assert!(!info.contains_key(gone), "{gone} kept: {info:?}");
        }
        assert_eq!(info["eos_token"], "<|im_end|>");
        assert_eq!(info["bos_token"], Value::Null);
        assert_eq!(info["pad_token"], "<|endoftext|>");
        assert_eq!(info["added_tokens_decoder"]["151643"], "<|endoftext|>");
        let listed = json!(["<|im_start|>", "<|im_end|>"]);
        assert_eq!(info["additional_special_tokens"], listed);
        assert_eq!(info["chat_template"], "{{ messages }}");
        assert_eq!(info["model_max_length"], 131072);
        assert_eq!(info["tokenizer_class"], DEFAULT_CLASS);
    }

    #[test]
    fn a_model_without_a_template_reports_none_and_its_class_is_kept() {
        let config =
            map(json!({"chat_template": "{{ unused }}", "tokenizer_class": "Qwen2Tokenizer"}));
        let info = cleaned(config, None);
        assert!(!info.contains_key("chat_template"), "{info:?}");
        assert_eq!(info["tokenizer_class"], "Qwen2Tokenizer");
    }
}
