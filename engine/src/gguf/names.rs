//! transformers' tensor names and llama.cpp's (`gguf-py/gguf/tensor_mapping.py`) for the
//! families PIO reads from GGUF files.

/// Where a transformers tensor lives in a GGUF file: llama.cpp's tensor name, and for an
/// expert's projection its index in the stacked `*_exps` tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Located {
    /// llama.cpp's name.
    pub name: String,
    /// The expert, for the stacked expert tensors.
    pub expert: Option<usize>,
}

/// The llama.cpp location of transformers tensor `hf`, or `None` for a name it does not map.
pub(crate) fn locate(hf: &str) -> Option<Located> {
    let plain = |name: &str| {
        Some(Located {
            name: name.to_string(),
            expert: None,
        })
    };
    match hf {
        "model.embed_tokens.weight" => return plain("token_embd.weight"),
        "model.norm.weight" => return plain("output_norm.weight"),
        "lm_head.weight" => return plain("output.weight"),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    if let Some(expert) = module.strip_prefix("mlp.experts.") {
        let (expert, proj) = expert.split_once('.')?;
        let proj = match proj {
            "gate_proj" => "ffn_gate_exps",
            "up_proj" => "ffn_up_exps",
            "down_proj" => "ffn_down_exps",
            _ => return None,
        };
        return Some(Located {
            name: format!("blk.{layer}.{proj}.{kind}"),
            expert: Some(expert.parse().ok()?),
        });
    }
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "mlp.gate" => "ffn_gate_inp",
        _ => return None,
    };
    plain(&format!("blk.{layer}.{short}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transformers_names_map_to_llama_cpp_names() {
        let at = |hf: &str| locate(hf).map(|l| (l.name, l.expert));
        assert_eq!(
            at("model.embed_tokens.weight"),
            Some(("token_embd.weight".into(), None))
        );
        assert_eq!(
            at("model.layers.11.self_attn.o_proj.weight"),
            Some(("blk.11.attn_output.weight".into(), None))
        );
        assert_eq!(
            at("model.layers.0.self_attn.q_proj.bias"),
            Some(("blk.0.attn_q.bias".into(), None))
        );
        assert_eq!(
            at("model.layers.2.post_attention_layernorm.weight"),
            Some(("blk.2.ffn_norm.weight".into(), None))
        );
        assert_eq!(
            at("model.layers.3.mlp.experts.17.down_proj.weight"),
            Some(("blk.3.ffn_down_exps.weight".into(), Some(17)))
        );
        assert_eq!(
            at("model.layers.3.mlp.gate.weight"),
            Some(("blk.3.ffn_gate_inp.weight".into(), None))
        );
        for unknown in [
            "model.layers.x.mlp.up_proj.weight",
            "model.layers.1.mlp.experts.2.other.weight",
            "model.layers.1.self_attn.rotary.inv_freq",
            "visual.blocks.0.attn.qkv.weight",
        ] {
            assert_eq!(at(unknown), None, "{unknown}");
        }
    }
}
