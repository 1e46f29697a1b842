//! `config.json` of a Glm4MoeLiteForCausalLM checkpoint (GLM-4.7-Flash), with the defaults of
//! transformers' `Glm4MoeLiteConfig`.

use serde::Deserialize;

use crate::checkpoint::Checkpoint;
use crate::models::RopeParameters;
use crate::{EngineError, Result};

/// A layer's feed-forward kind (`mlp_layer_types`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LayerKind {
    /// A SwiGLU MLP `intermediate_size` wide.
    Dense,
    /// Routed experts plus the shared expert.
    Sparse,
}

/// `config.json` of a Glm4MoeLiteForCausalLM checkpoint.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Config {
    /// The transformers classes the checkpoint is for.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Dense layers' MLP width.
    pub intermediate_size: usize,
    /// Each expert's MLP width.
    pub moe_intermediate_size: usize,
    /// Decoder layers (a next-token-prediction layer stored past them is not part of the model).
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Rank of the queries' low-rank path (`None`: one full `q_proj`).
    pub q_lora_rank: Option<usize>,
    /// Width of the compressed key/value latent, what the cache keeps per token.
    pub kv_lora_rank: usize,
    /// Per-head query/key width without rotary positions.
    pub qk_nope_head_dim: usize,
    /// Per-head query/key width with rotary positions (one rotary key shared by all heads).
    pub qk_rope_head_dim: usize,
    /// Per-head value width.
    pub v_head_dim: usize,
    /// Routed experts per sparse layer.
    #[serde(alias = "num_local_experts")]
    pub n_routed_experts: usize,
    /// Shared experts (one MLP `n_shared_experts × moe_intermediate_size` wide).
    #[serde(default = "one")]
    pub n_shared_experts: usize,
    /// Experts each token is routed to.
    pub num_experts_per_tok: usize,
    /// Expert groups for group-limited routing.
    #[serde(default = "one")]
    pub n_group: usize,
    /// Groups a token may route into.
    #[serde(default = "one")]
    pub topk_group: usize,
    /// Factor on the routing weights.
    #[serde(default = "default_scaling")]
    pub routed_scaling_factor: f64,
    /// Renormalize the chosen experts' weights to sum to 1 (before the scaling factor).
    #[serde(default = "yes")]
    pub norm_topk_prob: bool,
    /// Which layers are dense (transformers 5 writes it).
    pub mlp_layer_types: Option<Vec<LayerKind>>,
    /// The first this-many layers are dense (DeepSeek's key, what GLM-4.7-Flash's config has).
    pub first_k_dense_replace: Option<usize>,
    /// Routing method; only `noaux_tc` exists in this family.
    pub topk_method: Option<String>,
    /// Router scoring; only `sigmoid` exists in this family.
    pub scoring_func: Option<String>,
    /// Longest sequence.
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon of the layer norms (the latent norms use transformers' default, 1e-6).
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (transformers 4 layout).
    pub rope_theta: Option<f64>,
    /// RoPE scaling (transformers 4 layout).
    pub rope_scaling: Option<RopeParameters>,
    /// RoPE parameters (transformers 5 layout).
    pub rope_parameters: Option<RopeParameters>,
    /// Share of the rotary head that rotates (transformers 4 layout).
    pub partial_rotary_factor: Option<f64>,
    /// Whether the checkpoint stores rotary pairs interleaved (DeepSeek's layout).
    #[serde(default = "yes")]
    pub rope_interleave: bool,
    /// Whether `lm_head` reuses the input embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on the attention projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// MLP activation; only `silu` exists in this family.
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn default_scaling() -> f64 {
    1.8
}
fn default_positions() -> usize {
    202_752
}
fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "silu".into()
}

impl Config {
    /// Each layer's feed-forward kind: `mlp_layer_types` when given, else the first
    /// `first_k_dense_replace` (default 1) layers dense. transformers 5.23 derives only from the
    /// former (one dense layer when absent); they agree on every published GLM-4.7 config.
    pub fn layer_kinds(&self) -> Vec<LayerKind> {
        match &self.mlp_layer_types {
            Some(kinds) => kinds.clone(),
            None => {
                let dense = self.first_k_dense_replace.unwrap_or(1);
                (0..self.num_hidden_layers)
                    .map(|i| {
                        if i < dense {
                            LayerKind::Dense
                        } else {
                            LayerKind::Sparse
                        }
                    })
                    .collect()
            }
        }
    }

    /// Query/key width per head.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Values one token caches per layer: the latent and the rotary key.
    pub fn latent_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// (theta, position scale) from whichever RoPE fields the checkpoint uses.
    pub(crate) fn rope(&self, checkpoint: &Checkpoint) -> Result<(f64, f64)> {
        let params = crate::models::rotary::rope_params(
            checkpoint,
            self.rope_parameters.as_ref(),
            self.rope_scaling.as_ref(),
        )?;
        let partial = self
            .partial_rotary_factor
            .or(params.and_then(|p| p.partial_rotary_factor))
            .unwrap_or(1.0);
        if partial != 1.0 {
            return Err(self.bad(
                checkpoint,
                "partial_rotary_factor",
                format!("expected 1.0 (MLA rotates its whole rotary slice), found {partial}"),
            ));
        }
        crate::models::rotary::rope_base(checkpoint, self.rope_theta, params)
    }

    fn bad(&self, checkpoint: &Checkpoint, field: &str, reason: String) -> EngineError {
        EngineError::BadField {
            path: checkpoint.config_path(),
            field: field.into(),
            reason,
        }
    }

    /// What is wrong with the grouped top-k routing's numbers, if anything: the field and why.
    fn routing_fault(&self) -> Option<(&'static str, String)> {
        let (experts, groups) = (self.n_routed_experts, self.n_group);
        if groups == 0 || !experts.is_multiple_of(groups) || experts / groups < 2 {
            return Some((
                "n_group",
                format!("expected a divisor of n_routed_experts = {experts} leaving at least 2 experts per group, found {groups}"),
            ));
        }
        if self.topk_group == 0 || self.topk_group > groups {
            return Some((
                "topk_group",
                format!(
                    "expected 1 to n_group = {groups}, found {}",
                    self.topk_group
                ),
            ));
        }
        let reachable = self.topk_group * experts / groups;
        if self.num_experts_per_tok == 0 || self.num_experts_per_tok > reachable {
            return Some((
                "num_experts_per_tok",
                format!(
                    "expected 1 to {reachable} (the experts of topk_group groups), found {}",
                    self.num_experts_per_tok
                ),
            ));
        }
        None
    }

    /// Checks what the model needs to be well formed.
    pub(crate) fn validate(&self, checkpoint: &Checkpoint) -> Result<()> {
        let bad = |field: &str, reason: String| self.bad(checkpoint, field, reason);
        crate::models::layers_fault(self.num_hidden_layers)
            .map_or(Ok(()), |why| Err(bad("num_hidden_layers", why)))?;
        crate::models::context_fault(self.max_position_embeddings)
            .map_or(Ok(()), |why| Err(bad("max_position_embeddings", why)))?;
        for (field, value, expected) in [
            ("hidden_act", Some(&self.hidden_act), "silu"),
            ("topk_method", self.topk_method.as_ref(), "noaux_tc"),
            ("scoring_func", self.scoring_func.as_ref(), "sigmoid"),
        ] {
            if let Some(v) = value.filter(|v| *v != expected) {
                return Err(bad(
                    field,
                    format!("expected \"{expected}\", found \"{v}\""),
                ));
            }
        }
        if self.attention_bias {
            return Err(bad(
                "attention_bias",
                "expected false: biased MLA projections are not supported (GLM checkpoints have none)".into(),
            ));
        }
        if !self.rope_interleave {
            return Err(bad(
                "rope_interleave",
                "expected true (DeepSeek's interleaved rotary layout, what GLM checkpoints store)"
                    .into(),
            ));
        }
        if let Some((field, reason)) = self.routing_fault() {
            return Err(bad(field, reason));
        }
        if self.layer_kinds().len() != self.num_hidden_layers {
            return Err(bad(
                "mlp_layer_types",
                format!(
                    "expected one entry per layer ({}), found {}",
                    self.num_hidden_layers,
                    self.layer_kinds().len()
                ),
            ));
        }
        if self.num_attention_heads == 0
            || self.kv_lora_rank == 0
            || !self.qk_rope_head_dim.is_multiple_of(2)
        {
            return Err(bad(
                "qk_rope_head_dim",
                format!(
                    "expected heads, a latent and an even rotary width, found {} heads, kv_lora_rank {}, qk_rope_head_dim {}",
                    self.num_attention_heads, self.kv_lora_rank, self.qk_rope_head_dim
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture() -> (Checkpoint, serde_json::Value) {
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/glm4-moe-lite-tiny");
        let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        (
            Checkpoint::open(&dir).unwrap(),
            serde_json::from_str(&text).unwrap(),
        )
    }

    fn with(edit: impl FnOnce(&mut serde_json::Value)) -> (Checkpoint, Config) {
        let (checkpoint, mut json) = fixture();
        edit(&mut json);
        (checkpoint, serde_json::from_value(json).unwrap())
    }

    #[test]
    fn dense_layers_come_from_mlp_layer_types_else_first_k_dense_replace() {
        let (_, cfg) = with(|_| {});
        assert_eq!(
            cfg.layer_kinds(),
            [LayerKind::Dense, LayerKind::Sparse, LayerKind::Sparse]
        );
        let (_, cfg) = with(|j| j["first_k_dense_replace"] = 2.into());
        assert_eq!(
            cfg.layer_kinds(),
            [LayerKind::Dense, LayerKind::Dense, LayerKind::Sparse]
        );
        let (_, cfg) =
            with(|j| j["mlp_layer_types"] = serde_json::json!(["sparse", "dense", "sparse"]));
        assert_eq!(
            cfg.layer_kinds(),
            [LayerKind::Sparse, LayerKind::Dense, LayerKind::Sparse]
        );
    }

    #[test]
    fn impossible_routing_and_layouts_are_refused_naming_the_field() {
        type Edit = fn(&mut serde_json::Value);
        let cases: [(&str, Edit); 6] = [
            ("n_group", |j| j["n_group"] = 3.into()),
            ("topk_group", |j| j["topk_group"] = 2.into()),
            ("num_experts_per_tok", |j| {
                j["num_experts_per_tok"] = 17.into()
            }),
            ("mlp_layer_types", |j| {
                j["mlp_layer_types"] = serde_json::json!(["dense"])
            }),
            ("topk_method", |j| j["topk_method"] = "greedy".into()),
            ("attention_bias", |j| j["attention_bias"] = true.into()),
        ];
        for (field, edit) in cases {
            let (checkpoint, cfg) = with(edit);
            let e = cfg.validate(&checkpoint).unwrap_err().to_string();
            assert!(
                e.contains("config.json") && e.contains(&format!("`{field}`")),
                "{field}: {e}"
            );
        }
        let (checkpoint, cfg) = with(|_| {});
        cfg.validate(&checkpoint).unwrap();
        let (checkpoint, cfg) = with(|j| j["partial_rotary_factor"] = 0.5.into());
        let e = cfg.rope(&checkpoint).unwrap_err().to_string();
        assert!(e.contains("partial_rotary_factor"), "{e}");
        // A layer count in the trillions was a table of that many entries before any weight.
        for layers in [0u64, 1 << 40] {
            let (checkpoint, cfg) = with(|j| j["num_hidden_layers"] = layers.into());
            let e = cfg.validate(&checkpoint).unwrap_err().to_string();
            assert!(
                e.contains("`num_hidden_layers`") && e.contains("1024"),
                "{layers}: {e}"
            );
        }
        for context in [0u64, 1 << 40] {
            let (checkpoint, cfg) = with(|j| j["max_position_embeddings"] = context.into());
            let e = cfg.validate(&checkpoint).unwrap_err().to_string();
            assert!(e.contains("`max_position_embeddings`"), "{context}: {e}");
        }
        // A base or scale that would make every angle NaN.
        for theta in [0.0, -10000.0] {
            let (checkpoint, cfg) = with(|j| j["rope_theta"] = theta.into());
            let e = cfg.rope(&checkpoint).unwrap_err().to_string();
            assert!(e.contains("`rope_theta`") && e.contains("positive"), "{e}");
        }
        let (checkpoint, cfg) = with(|j| {
            let linear = serde_json::json!({"rope_type": "linear", "factor": 0.0});
            j["rope_scaling"] = linear.clone();
            j["rope_parameters"] = linear;
        });
        let e = cfg.rope(&checkpoint).unwrap_err().to_string();
        assert!(e.contains("`rope_scaling.factor`"), "{e}");
    }
}
