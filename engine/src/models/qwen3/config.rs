//! `config.json` of a Qwen3ForCausalLM checkpoint, with transformers' defaults; accepts both the
//! transformers 4 layout (`rope_theta`, `rope_scaling`, `torch_dtype`) and the transformers 5 one
//! (`rope_parameters`, `dtype`).

use crate::checkpoint::Checkpoint;
use crate::{EngineError, Result};
use serde::Deserialize;

pub use crate::models::rotary::RopeParameters;

/// `config.json` of a Qwen3ForCausalLM or Qwen3MoeForCausalLM checkpoint, with transformers'
/// defaults (the MoE keys default to a dense model).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Config {
    /// The transformers classes the checkpoint is for.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); defaults to the query heads.
    pub num_key_value_heads: Option<usize>,
    /// Head width; defaults to hidden / heads.
    pub head_dim: Option<usize>,
    /// Longest sequence.
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (transformers 4 keeps it at the top level).
    pub rope_theta: Option<f64>,
    /// RoPE scaling (transformers 4).
    pub rope_scaling: Option<RopeParameters>,
    /// RoPE parameters (transformers 5).
    pub rope_parameters: Option<RopeParameters>,
    /// Whether `lm_head` reuses the input embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v/o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// MLP activation; only `silu` exists in Qwen3.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Experts per sparse layer (0: dense). transformers 5 writes `num_local_experts`.
    #[serde(default, alias = "num_local_experts")]
    pub num_experts: usize,
    /// Experts each token is routed to.
    #[serde(default)]
    pub num_experts_per_tok: usize,
    /// Each expert's MLP width.
    #[serde(default)]
    pub moe_intermediate_size: usize,
    /// Every this-many-th layer is sparse.
    #[serde(default = "default_sparse_step")]
    pub decoder_sparse_step: usize,
    /// Layers kept dense whatever the step says.
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
    /// Renormalize the chosen experts' weights to sum to 1.
    #[serde(default)]
    pub norm_topk_prob: bool,
    /// Sliding-window attention on the layers from `max_window_layers` on (not supported: the
    /// released checkpoints leave it off).
    #[serde(default)]
    pub use_sliding_window: bool,
    /// The window, when sliding.
    #[serde(default)]
    pub sliding_window: Option<u64>,
    /// Layers below this attend in full when sliding.
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// Each layer's attention (transformers 5): `full_attention` or `sliding_attention`.
    #[serde(default)]
    pub layer_types: Vec<String>,
}

fn default_sparse_step() -> usize {
    1
}

fn default_positions() -> usize {
    32_768
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}

impl Config {
    pub(crate) fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub(crate) fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// (theta, position scale) from whichever RoPE fields the checkpoint uses.
    pub(crate) fn rope(&self, checkpoint: &Checkpoint) -> Result<(f64, f64)> {
        let params = crate::models::rotary::rope_params(
            checkpoint,
            self.rope_parameters.as_ref(),
            self.rope_scaling.as_ref(),
        )?;
        crate::models::rotary::rope_base(checkpoint, self.rope_theta, params)
    }

    /// The sizes of the decoder stack's ends (embedding, final norm, head).
    pub(crate) fn ends(&self) -> crate::models::head::Ends {
        crate::models::head::Ends {
            vocab: self.vocab_size,
            hidden: self.hidden_size,
            layers: self.num_hidden_layers,
            eps: self.rms_norm_eps,
            tied: self.tie_word_embeddings,
        }
    }

    /// Whether layer `i` is a sparse MoE block, by transformers' rule.
    pub(crate) fn is_sparse(&self, i: usize) -> bool {
        self.num_experts > 0
            && !self.mlp_only_layers.contains(&i)
            && (i + 1).is_multiple_of(self.decoder_sparse_step.max(1))
    }

    pub(crate) fn validate(&self, checkpoint: &Checkpoint) -> Result<()> {
        let bad = |field: &str, reason: String| EngineError::BadField {
            path: checkpoint.config_path(),
            field: field.into(),
            reason,
        };
        if self.num_experts > 0 {
            if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_experts {
                return Err(bad(
                    "num_experts_per_tok",
                    format!(
                        "expected 1 to num_experts = {}, found {}",
                        self.num_experts, self.num_experts_per_tok
                    ),
                ));
            }
            if self.moe_intermediate_size == 0 {
                return Err(bad(
                    "moe_intermediate_size",
                    "expected the experts' MLP width, found 0".into(),
                ));
            }
        }
        // Run in full, a sliding layer's output would differ past the window without a word.
        // Qwen3-MoE windows every layer (its attention has no `max_window_layers` rule).
        let sliding = self.use_sliding_window
            && self.sliding_window.is_some()
            && (self.num_experts > 0
                || self.max_window_layers.unwrap_or(0) < self.num_hidden_layers);
        if let Some(kind) = (self.layer_types.iter()).find(|k| k.as_str() != "full_attention") {
            return Err(bad(
                "layer_types",
                format!("`{kind}` is not supported yet (only full_attention)"),
            ));
        }
        if sliding {
            return Err(bad(
                "use_sliding_window",
                "sliding-window attention is not supported yet: set it to false only if the model was trained without it".into(),
            ));
        }
        if self.hidden_act != "silu" {
            return Err(bad(
                "hidden_act",
                format!("expected \"silu\", found \"{}\"", self.hidden_act),
            ));
        }
        if self.num_attention_heads == 0 {
            return Err(bad(
                "num_attention_heads",
                "expected at least 1, found 0".into(),
            ));
        }
        crate::models::layers_fault(self.num_hidden_layers)
            .map_or(Ok(()), |why| Err(bad("num_hidden_layers", why)))?;
        crate::models::context_fault(self.max_position_embeddings)
            .map_or(Ok(()), |why| Err(bad("max_position_embeddings", why)))?;
        if self.kv_heads() == 0 || !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "{} must divide num_attention_heads = {}",
                    self.kv_heads(),
                    self.num_attention_heads
                ),
            ));
        }
        Ok(())
    }
}
