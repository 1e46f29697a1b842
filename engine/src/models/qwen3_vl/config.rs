//! `config.json` of a Qwen3VLForConditionalGeneration checkpoint: the text model (a dense Qwen3
//! whose rotary positions are multimodal), the vision tower and the special tokens.

use serde::Deserialize;

use crate::checkpoint::Checkpoint;
use crate::models::qwen3;
use crate::{EngineError, Result};

/// The M-RoPE fields of `rope_scaling` / `rope_parameters`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
struct MropeFields {
    mrope_section: Option<Vec<usize>>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
struct TextRope {
    rope_scaling: Option<MropeFields>,
    rope_parameters: Option<MropeFields>,
}

/// `vision_config`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct VisionConfig {
    /// Transformer blocks.
    pub depth: usize,
    /// Width.
    pub hidden_size: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// MLP activation (`gelu_pytorch_tanh`).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Colour channels.
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    /// Side of a patch.
    pub patch_size: usize,
    /// Frames per patch.
    #[serde(default = "default_temporal")]
    pub temporal_patch_size: usize,
    /// Patches merged per side into one token.
    #[serde(default = "default_temporal")]
    pub spatial_merge_size: usize,
    /// Width of the merged tokens (the text model's).
    pub out_hidden_size: usize,
    /// Learned position table size (a square grid).
    pub num_position_embeddings: usize,
    /// Blocks whose outputs feed DeepStack, in order.
    #[serde(default)]
    pub deepstack_visual_indexes: Vec<usize>,
}

fn default_act() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_channels() -> usize {
    3
}
fn default_temporal() -> usize {
    2
}

#[derive(Debug, Clone, Deserialize)]
struct Raw {
    #[serde(default)]
    architectures: Vec<String>,
    text_config: serde_json::Value,
    vision_config: VisionConfig,
    image_token_id: u32,
    vision_start_token_id: u32,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
}

/// The whole config, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The text model, read as a Qwen3 config.
    pub text: qwen3::Config,
    /// Frequencies (of `head_dim / 2`) given to the temporal, height and width positions.
    pub mrope_section: [usize; 3],
    /// The vision tower.
    pub vision: VisionConfig,
    /// `<|image_pad|>`.
    pub image_token_id: u32,
    /// `<|vision_start|>`.
    pub vision_start_token_id: u32,
}

impl Config {
    /// Reads and checks `config.json`.
    pub fn load(checkpoint: &Checkpoint) -> Result<Self> {
        let raw: Raw = checkpoint.config()?;
        let path = checkpoint.config_path();
        let bad = |field: &str, reason: String| EngineError::BadField {
            path: path.clone(),
            field: field.into(),
            reason,
        };
        let parse = |what: &str, e: serde_json::Error| EngineError::BadFile {
            path: path.clone(),
            reason: format!("`{what}`: {e}"),
        };
        let mut text: qwen3::Config =
            serde_json::from_value(raw.text_config.clone()).map_err(|e| parse("text_config", e))?;
        text.architectures = raw.architectures;
        // The top-level flag is the one transformers reads for the head.
        if let Some(tied) = raw.tie_word_embeddings {
            text.tie_word_embeddings = tied;
        }
        // First: the head width below divides by the head count it checks.
        text.validate(checkpoint)?;
        let rope: TextRope =
            serde_json::from_value(raw.text_config).map_err(|e| parse("text_config", e))?;
        let mrope_section = mrope_section(rope, text.head_dim() / 2).map_err(|(f, r)| bad(f, r))?;
        raw.vision_config.check(&text).map_err(|(f, r)| bad(f, r))?;
        // Past the vocabulary, the expanded image pads would index past the embedding.
        for (field, id) in [
            ("image_token_id", raw.image_token_id),
            ("vision_start_token_id", raw.vision_start_token_id),
        ] {
            if id as usize >= text.vocab_size {
                return Err(bad(
                    field,
                    format!(
                        "expected a token id below vocab_size = {}, found {id}",
                        text.vocab_size
                    ),
                ));
            }
        }
        Ok(Self {
            text,
            mrope_section,
            vision: raw.vision_config,
            image_token_id: raw.image_token_id,
            vision_start_token_id: raw.vision_start_token_id,
        })
    }
}

/// The three M-RoPE sections (temporal, height, width), which share `half` = `head_dim / 2`
/// frequencies; or the field at fault and why.
fn mrope_section(
    rope: TextRope,
    half: usize,
) -> std::result::Result<[usize; 3], (&'static str, String)> {
    const FIELD: &str = "text_config.rope_scaling.mrope_section";
    let section = rope
        .rope_parameters
        .or(rope.rope_scaling)
        .and_then(|r| r.mrope_section)
        .ok_or((
            FIELD,
            "expected the three M-RoPE sections (e.g. [24, 20, 20])".to_string(),
        ))?;
    match section[..] {
        [t, h, w] if t + h + w == half => Ok([t, h, w]),
        _ => Err((
            FIELD,
            format!("expected three sections summing to head_dim / 2 = {half}, found {section:?}"),
        )),
    }
}

impl VisionConfig {
    /// Checks the tower against itself and the text model it feeds; or the field at fault
    /// and why.
    fn check(&self, text: &qwen3::Config) -> std::result::Result<(), (&'static str, String)> {
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err((
                "vision_config.num_heads",
                format!("must divide hidden_size = {}", self.hidden_size),
            ));
        }
        let side = (self.num_position_embeddings as f64).sqrt() as usize;
        if side * side != self.num_position_embeddings || side < 2 {
            return Err((
                "vision_config.num_position_embeddings",
                format!(
                    "expected a square grid, found {}",
                    self.num_position_embeddings
                ),
            ));
        }
        if self.out_hidden_size != text.hidden_size {
            return Err((
                "vision_config.out_hidden_size",
                format!(
                    "expected the text width {}, found {}",
                    text.hidden_size, self.out_hidden_size
                ),
            ));
        }
        if self
            .deepstack_visual_indexes
            .iter()
            .any(|&i| i >= self.depth)
            || self.deepstack_visual_indexes.len() > text.num_hidden_layers
        {
            return Err((
                "vision_config.deepstack_visual_indexes",
                format!(
                    "expected block indexes below depth = {} and no more than the text layers",
                    self.depth
                ),
            ));
        }
        if self.hidden_act != "gelu_pytorch_tanh" {
            return Err((
                "vision_config.hidden_act",
                format!(
                    "expected \"gelu_pytorch_tanh\", found \"{}\"",
                    self.hidden_act
                ),
            ));
        }
        Ok(())
    }
}
