//! A GGUF file's hyperparameters as the `config.json` of the transformers class they describe,
//! so that the models read one config type whatever the file. Keys are llama.cpp's
//! (`gguf-py/gguf/constants.py`, `{arch}.…`); what the metadata does not say is read off the
//! tensors (a tied head, attention biases, which layers are sparse).

use serde_json::{json, Map, Value};

use super::GgufFile;
use crate::error::{EngineError, Result};

/// The `config.json` of the transformers class `file`'s `general.architecture` stands for.
pub(crate) fn hf_config(file: &GgufFile) -> Result<Value> {
    let arch = file.architecture()?;
    let (class, sparse) = match arch {
        "qwen3" => ("Qwen3ForCausalLM", false),
        "qwen3moe" => ("Qwen3MoeForCausalLM", true),
        other => {
            return Err(EngineError::BadField {
                path: file.path().to_owned(),
                field: "general.architecture".into(),
                reason: format!(
                    "`{other}`: PIO reads qwen3 and qwen3moe GGUF files (Qwen3ForCausalLM, \
                     Qwen3MoeForCausalLM); serve other families from their Hugging Face snapshot"
                ),
            })
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let need = |k: &str| file.required_uint(&key(k));
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let layers = need("block_count")?;
    // Checked on the tensors before anything loops over the count (a hostile count hangs):
    // every layer's norm, stopping at the first missing, so the cost is the file's own.
    let missing = (0..layers)
        .map(|i| format!("blk.{i}.attn_norm.weight"))
        .find(|name| !file.has_tensor(name));
    if layers == 0 || missing.is_some() {
        return Err(EngineError::BadField {
            path: file.path().to_owned(),
            field: key("block_count"),
            reason: format!(
                "{layers} layers, but the file has no `{}`: expected the count of the \
                 `blk.N.` layers the file holds",
                missing.unwrap_or_else(|| "blk.0.attn_norm.weight".into())
            ),
        });
    }
    if heads == 0 {
        return Err(EngineError::BadField {
            path: file.path().to_owned(),
            field: key("attention.head_count"),
            reason: "expected at least one attention head, found 0".into(),
        });
    }
    let mut cfg = Map::new();
    cfg.insert("architectures".into(), json!([class]));
    cfg.insert("vocab_size".into(), json!(vocab_size(file)?));
    cfg.insert("hidden_size".into(), json!(hidden));
    cfg.insert("num_hidden_layers".into(), json!(layers));
    cfg.insert("num_attention_heads".into(), json!(heads));
    let kv = file.uint(&key("attention.head_count_kv"))?.unwrap_or(heads);
    cfg.insert("num_key_value_heads".into(), json!(kv));
    let head_dim = file.uint(&key("attention.key_length"))?;
    cfg.insert("head_dim".into(), json!(head_dim.unwrap_or(hidden / heads)));
    let ffn = file.uint(&key("feed_forward_length"))?.unwrap_or(0);
    cfg.insert("intermediate_size".into(), json!(ffn));
    optional_fields(file, arch, &mut cfg)?;
    cfg.insert(
        "tie_word_embeddings".into(),
        json!(!file.has_tensor("output.weight")),
    );
    cfg.insert(
        "attention_bias".into(),
        json!(file.has_tensor("blk.0.attn_q.bias")),
    );
    if sparse {
        experts(file, arch, layers, &mut cfg)?;
    }
    Ok(Value::Object(cfg))
}

/// The fields transformers defaults when the file has no key for them: context, norm epsilon,
/// rotary base and scaling.
fn optional_fields(file: &GgufFile, arch: &str, cfg: &mut Map<String, Value>) -> Result<()> {
    let key = |k: &str| format!("{arch}.{k}");
    if let Some(n) = file.uint(&key("context_length"))? {
        cfg.insert("max_position_embeddings".into(), json!(n));
    }
    if let Some(eps) = file.float(&key("attention.layer_norm_rms_epsilon"))? {
        // Written as f32: 1e-6 reads back as 9.99999997e-7; transformers' value is the decimal.
        cfg.insert("rms_norm_eps".into(), json!(shortest_f32(eps)));
    }
    if let Some(theta) = file.float(&key("rope.freq_base"))? {
        cfg.insert("rope_theta".into(), json!(theta));
    }
    if let Some(scaling) = rope_scaling(file, arch)? {
        cfg.insert("rope_scaling".into(), scaling);
    }
    Ok(())
}

/// A sparse model's experts: how many, how many a token takes, their width, and the layers
/// without a router (dense).
fn experts(file: &GgufFile, arch: &str, layers: u64, cfg: &mut Map<String, Value>) -> Result<()> {
    let need = |k: &str| file.required_uint(&format!("{arch}.{k}"));
    cfg.insert("num_experts".into(), json!(need("expert_count")?));
    cfg.insert(
        "num_experts_per_tok".into(),
        json!(need("expert_used_count")?),
    );
    let width = need("expert_feed_forward_length")?;
    cfg.insert("moe_intermediate_size".into(), json!(width));
    // llama.cpp renormalizes the chosen experts' weights for qwen3moe, as Qwen3 MoE
    // checkpoints ask (`norm_topk_prob`); the file has no key for it.
    cfg.insert("norm_topk_prob".into(), json!(true));
    let dense: Vec<u64> = (0..layers)
        .filter(|i| !file.has_tensor(&format!("blk.{i}.ffn_gate_inp.weight")))
        .collect();
    cfg.insert("mlp_only_layers".into(), json!(dense));
    Ok(())
}

/// The vocabulary's size: the embedding's rows (the token list may be shorter when a converter
/// padded the matrix, never longer).
fn vocab_size(file: &GgufFile) -> Result<usize> {
    if let Some(info) = file.content.tensor_infos.get("token_embd.weight") {
        if let Some(&rows) = info.shape.dims().first() {
            return Ok(rows);
        }
    }
    Err(EngineError::BadFile {
        path: file.path().to_owned(),
        reason: "holds no token_embd.weight tensor: not a complete model file".into(),
    })
}

/// `rope_scaling` from `{arch}.rope.scaling.*`, or `None` when the file has none.
fn rope_scaling(file: &GgufFile, arch: &str) -> Result<Option<Value>> {
    let kind = file.string(&format!("{arch}.rope.scaling.type"))?;
    let Some(kind) = kind.filter(|k| *k != "none") else {
        return Ok(None);
    };
    let mut scaling = json!({ "rope_type": kind });
    if let Some(f) = file.float(&format!("{arch}.rope.scaling.factor"))? {
        scaling["factor"] = json!(f);
    }
    if let Some(n) = file.uint(&format!("{arch}.rope.scaling.original_context_length"))? {
        scaling["original_max_position_embeddings"] = json!(n);
    }
    Ok(Some(scaling))
}

/// The shortest decimal that rounds to the same f32 as `x` (metadata floats are written as f32;
/// transformers' values are the decimals).
pub(super) fn shortest_f32(x: f64) -> f64 {
    (x as f32).to_string().parse().unwrap_or(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_f32_epsilon_reads_back_as_its_decimal() {
        assert_eq!(shortest_f32(1e-6f32 as f64), 1e-6);
        assert_eq!(shortest_f32(1e-5f32 as f64), 1e-5);
    }
}
