//! The tokenizer, chat template and generation defaults a GGUF file carries, as the
//! `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` a snapshot would have
//! beside its weights. Only the byte-level BPE of the Qwen families (`tokenizer.ggml.model`
//! `gpt2`, pre-tokenizer `qwen2`) is rebuilt; other vocabularies need the snapshot's own
//! `tokenizer.json` beside the file.

use serde_json::{json, Map, Value};

use super::GgufFile;
use crate::error::{EngineError, Result};

/// Qwen2/Qwen3's pre-tokenizer split, as their `tokenizer.json` writes it.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's token types (`llama_token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;
const UNUSED: i64 = 5;

/// A token type (any integer width).
fn token_type(v: &candle_core::quantized::gguf_file::Value) -> Option<i64> {
    super::integer(v).and_then(|n| i64::try_from(n).ok())
}

fn text(v: &candle_core::quantized::gguf_file::Value) -> Option<String> {
    v.to_string().ok().cloned()
}

/// The vocabulary's tokens.
fn tokens(file: &GgufFile) -> Result<Vec<String>> {
    file.array("tokenizer.ggml.tokens", text, "strings")?
        .ok_or_else(|| EngineError::BadField {
            path: file.path().to_owned(),
            field: "tokenizer.ggml.tokens".into(),
            reason: "missing: the file carries no tokenizer; put the model's tokenizer.json in a \
                     folder beside it and set the model path to the folder"
                .into(),
        })
}

/// The model's tokenizer, rebuilt from `tokenizer.ggml.*`.
pub(crate) fn tokenizer(file: &GgufFile) -> Result<tokenizers::Tokenizer> {
    let bad = |field: &str, reason: String| EngineError::BadField {
        path: file.path().to_owned(),
        field: field.into(),
        reason,
    };
    let model = file.required_string("tokenizer.ggml.model")?;
    let pre = file.string("tokenizer.ggml.pre")?.unwrap_or("default");
    if model != "gpt2" || pre != "qwen2" {
        return Err(bad(
            if model != "gpt2" {
                "tokenizer.ggml.model"
            } else {
                "tokenizer.ggml.pre"
            },
            format!(
                "`{model}`/`{pre}`: PIO rebuilds the Qwen byte-level BPE (gpt2/qwen2) only; put \
                 the model's tokenizer.json in a folder beside the file and set the model path \
                 to the folder"
            ),
        ));
    }
    let tokens = tokens(file)?;
    // Without merges BPE splits every word into characters, and without types the chat's
    // control tokens are spelled out piece by piece: both encode prompts wrongly, silently.
    let missing = |key: &str, what: &str| EngineError::BadField {
        path: file.path().to_owned(),
        field: key.into(),
        reason: format!(
            "{what}: put the model's tokenizer.json in a folder beside the file and set the \
             model path to the folder, or convert the file again with llama.cpp"
        ),
    };
    let types = file
        .array("tokenizer.ggml.token_type", token_type, "integers")?
        .ok_or_else(|| {
            missing(
                "tokenizer.ggml.token_type",
                "missing: a BPE vocabulary needs each token's type",
            )
        })?;
    if types.len() != tokens.len() {
        return Err(missing(
            "tokenizer.ggml.token_type",
            &format!("{} types for {} tokens", types.len(), tokens.len()),
        ));
    }
    let merges = file
        .array("tokenizer.ggml.merges", text, "strings")?
        .filter(|m| !m.is_empty())
        .ok_or_else(|| {
            missing(
                "tokenizer.ggml.merges",
                "missing or empty: a BPE vocabulary needs its merges",
            )
        })?;
    let (vocab, added) = vocab_and_added(&tokens, &types);
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false,
    });
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": { "type": "NFC" },
        "pre_tokenizer": { "type": "Sequence", "pretokenizers": [
            { "type": "Split", "pattern": { "Regex": QWEN2_SPLIT }, "behavior": "Isolated",
              "invert": false },
            byte_level,
        ]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    });
    spec.to_string().parse().map_err(|e| {
        bad(
            "tokenizer.ggml.tokens",
            format!("not a usable vocabulary: {e}"),
        )
    })
}

/// The BPE vocabulary (token → id) and the added tokens (control ones special), from the token
/// list and its types; rows a converter padded the embedding with are left out of both.
fn vocab_and_added(tokens: &[String], types: &[i64]) -> (Map<String, Value>, Vec<Value>) {
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        match types.get(id).copied() {
            // Rows a converter padded the embedding with: no text maps to them.
            Some(UNUSED) => continue,
            Some(kind @ (CONTROL | USER_DEFINED)) => added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": kind == CONTROL,
            })),
            _ => {}
        }
        vocab.insert(token.clone(), json!(id));
    }
    (vocab, added)
}

/// The token text of id `key`'s value, if the file names one.
fn token_at(file: &GgufFile, tokens: &[String], key: &str) -> Result<Option<String>> {
    Ok(file
        .uint(key)?
        .and_then(|id| tokens.get(id as usize).cloned()))
}

/// `tokenizer_config.json` as the file describes it: the chat template and the named tokens.
pub(crate) fn tokenizer_config(file: &GgufFile) -> Result<Value> {
    // A file with no vocabulary (its tokenizer.json beside it) still has its template.
    let tokens = match file.get("tokenizer.ggml.tokens") {
        Some(_) => tokens(file)?,
        None => Vec::new(),
    };
    let mut config = Map::new();
    if let Some(template) = file.string("tokenizer.chat_template")? {
        config.insert("chat_template".into(), json!(template));
    }
    for (name, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(token) = token_at(file, &tokens, key)? {
            config.insert(name.into(), json!(token));
        }
    }
    Ok(Value::Object(config))
}

/// Texts of tokens that end generation whatever ids the file names (llama.cpp's list, less the
/// families PIO does not serve).
const END_TEXTS: [&str; 8] = [
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<EOT>",
];

/// `generation_config.json` as the file describes it: its end-of-turn tokens and the sampling
/// defaults converters copy into `general.sampling.*`.
pub(crate) fn generation_config(file: &GgufFile) -> Result<Value> {
    let mut config = Map::new();
    let mut eos = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = file.uint(key)? {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    // A converter writes one end-of-sequence id, but a Qwen model ends a turn with <|im_end|>
    // and a text with <|endoftext|>, both in its generation_config.json: the tokens such texts
    // name end generation too, as llama.cpp finds them.
    if file.get("tokenizer.ggml.tokens").is_some() {
        for (id, token) in tokens(file)?.iter().enumerate() {
            if END_TEXTS.contains(&token.as_str()) && !eos.contains(&(id as u64)) {
                eos.push(id as u64);
            }
        }
    }
    config.insert("eos_token_id".into(), json!(eos));
    let mut sampled = false;
    for (name, key) in [
        ("temperature", "general.sampling.temp"),
        ("top_p", "general.sampling.top_p"),
        ("min_p", "general.sampling.min_p"),
        ("repetition_penalty", "general.sampling.penalty_repeat"),
    ] {
        if let Some(x) = file.float(key)? {
            config.insert(name.into(), json!(super::config::shortest_f32(x)));
            sampled = true;
        }
    }
    if let Some(k) = file.uint("general.sampling.top_k")? {
        config.insert("top_k".into(), json!(k));
        sampled = true;
    }
    if sampled {
        config.insert("do_sample".into(), json!(true));
    }
    Ok(Value::Object(config))
}
