//! Qwen3 causal LMs, mirroring transformers' `modeling_qwen3.py` and `modeling_qwen3_moe.py`:
//! grouped-query attention with per-head RMSNorm on queries and keys, rotary positions, a SwiGLU
//! MLP or (Qwen3-MoE) a sparse mixture of SwiGLU experts, tied or untied output embedding.

use crate::batch::{Batch, Positions};
use crate::candle_core::{DType, Device, Module, Tensor};
use crate::candle_nn::{embedding, rms_norm, Embedding, RmsNorm, VarBuilder};
use crate::checkpoint::Checkpoint;
use crate::generate::CausalLm;
use crate::kv_pool::{KvPool, TokenLayout};
use crate::linear::{Linear, Quantization};
use crate::{EngineError, Result};

mod attention;
mod config;
mod moe;
mod rotary;

use attention::Attention;
pub use config::{Config, RopeParameters};
use rotary::{Angles, Rotary};

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn weight_bytes(&self) -> usize {
        self.gate_proj.weight_bytes() + self.up_proj.weight_bytes() + self.down_proj.weight_bytes()
    }

    fn sized(
        hidden: usize,
        width: usize,
        q: Quantization,
        vb: VarBuilder,
    ) -> candle_result::R<Self> {
        Ok(Self {
            gate_proj: Linear::load(hidden, width, false, q, vb.pp("gate_proj"))?,
            up_proj: Linear::load(hidden, width, false, q, vb.pp("up_proj"))?,
            down_proj: Linear::load(width, hidden, false, q, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = crate::candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        Ok(self
            .down_proj
            .forward(&(gate * self.up_proj.forward(x)?)?)?)
    }
}

/// A layer's feed-forward part: dense, or sparse experts.
#[derive(Debug, Clone)]
enum FeedForward {
    Dense(Mlp),
    Sparse(moe::SparseMoe),
}

impl FeedForward {
    fn weight_bytes(&self) -> usize {
        match self {
            Self::Dense(mlp) => mlp.weight_bytes(),
            Self::Sparse(moe) => moe.weight_bytes(),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(mlp) => mlp.forward(x),
            Self::Sparse(moe) => moe.forward(x),
        }
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: FeedForward,
}

impl DecoderLayer {
    fn new(cfg: &Config, index: usize, q: Quantization, vb: VarBuilder) -> candle_result::R<Self> {
        let mlp = if cfg.is_sparse(index) {
            FeedForward::Sparse(moe::SparseMoe::new(cfg, q, vb.pp("mlp"))?)
        } else {
            FeedForward::Dense(Mlp::sized(
                cfg.hidden_size,
                cfg.intermediate_size,
                q,
                vb.pp("mlp"),
            )?)
        };
        Ok(Self {
            input_layernorm: rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::new(cfg, q, vb.pp("self_attn"))?,
            post_attention_layernorm: rms_norm(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
            mlp,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rotary: &Angles,
        batch: &Batch<'_>,
        pool: &KvPool,
        layer: usize,
    ) -> Result<Tensor> {
        let attn = self.self_attn.forward(
            &self.input_layernorm.forward(x)?,
            rotary,
            batch,
            pool,
            layer,
        )?;
        let x = (x + attn)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + mlp)?)
    }
}

/// The model.
#[derive(Debug, Clone)]
pub struct Qwen3 {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    /// Whether `lm_head` is the embedding's own tensor (tied and not quantized).
    head_is_embedding: bool,
    rotary: Rotary,
    context: usize,
    device: Device,
}

/// candle's own error type for the constructors (the caller names the checkpoint).
mod candle_result {
    pub type R<T> = std::result::Result<T, crate::candle_core::Error>;
}

impl Qwen3 {
    /// Loads a Qwen3ForCausalLM from `checkpoint` in `dtype` on `device`, calling
    /// `progress(done, total)` as layers are read.
    pub fn load(
        checkpoint: &Checkpoint,
        dtype: DType,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        Self::load_architecture(
            checkpoint,
            "Qwen3ForCausalLM",
            dtype,
            Quantization::None,
            device,
            progress,
        )
    }

    /// Loads a checkpoint whose `architectures` must name `architecture`.
    fn load_architecture(
        checkpoint: &Checkpoint,
        architecture: &str,
        dtype: DType,
        quantization: Quantization,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let cfg: Config = checkpoint.config()?;
        cfg.validate(checkpoint, architecture)?;
        let (theta, scale) = cfg.rope(checkpoint)?;
        let vb = checkpoint.weights(dtype, device)?;
        let total = cfg.num_hidden_layers + 2;
        let mut build = || -> candle_result::R<(Embedding, Vec<DecoderLayer>, RmsNorm, Linear)> {
            let model = vb.pp("model");
            let embed_tokens =
                embedding(cfg.vocab_size, cfg.hidden_size, model.pp("embed_tokens"))?;
            progress(1, total);
            let layers = (0..cfg.num_hidden_layers)
                .map(|i| {
                    let layer =
                        DecoderLayer::new(&cfg, i, quantization, model.pp(format!("layers.{i}")));
                    progress(i + 2, total);
                    layer
                })
                .collect::<candle_result::R<Vec<_>>>()?;
            let norm = rms_norm(cfg.hidden_size, cfg.rms_norm_eps, model.pp("norm"))?;
            // Quantized models keep the head at 8 bits whatever the mode (the most sensitive
            // matrix, as llama.cpp keeps it at 6+ bits): a dense bf16 head would dominate decode
            // time (a third of the bytes read per token of a tied 0.6B model), and Q8_0 is also
            // smaller. A tied head gets its own Q8_0 copy; lookups keep the exact embedding.
            let head = match quantization {
                Quantization::None => Quantization::None,
                _ => Quantization::Q8,
            };
            let lm_head = if cfg.tie_word_embeddings {
                Linear::from_weight(embed_tokens.embeddings().clone(), None, head)?
            } else {
                Linear::load(
                    cfg.hidden_size,
                    cfg.vocab_size,
                    false,
                    head,
                    vb.pp("lm_head"),
                )?
            };
            progress(total, total);
            Ok((embed_tokens, layers, norm, lm_head))
        };
        let (embed_tokens, layers, norm, lm_head) =
            build().map_err(|e| checkpoint.weight_error(e))?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            head_is_embedding: cfg.tie_word_embeddings && !lm_head.is_quantized(),
            lm_head,
            rotary: Rotary::new(&cfg, theta, scale, dtype, device),
            context: cfg.max_position_embeddings,
            device: device.clone(),
        })
    }
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

impl Qwen3 {
    /// Bytes of weights per decoder layer (projections and experts; norms are negligible).
    pub fn layer_weight_bytes(&self) -> Vec<usize> {
        self.layers
            .iter()
            .map(|l| l.self_attn.weight_bytes() + l.mlp.weight_bytes())
            .collect()
    }

    /// Bytes of all weights: layers, embedding and (unless it is the embedding) the output head.
    pub fn weight_bytes(&self) -> usize {
        let embed = tensor_bytes(self.embed_tokens.embeddings());
        let head = if self.head_is_embedding {
            0
        } else {
            self.lm_head.weight_bytes()
        };
        self.layer_weight_bytes().iter().sum::<usize>() + embed + head
    }
}

impl Qwen3 {
    /// Checks `batch` against what a text model takes; returns every new row's position.
    fn positions(&self, batch: &Batch<'_>) -> Result<Vec<usize>> {
        let mut positions = Vec::with_capacity(batch.rows());
        for seq in &batch.seqs {
            let end = seq.start + seq.tokens.len();
            if seq.tokens.is_empty() {
                return Err(EngineError::Internal(
                    "a sequence with no new tokens in a batch".into(),
                ));
            }
            if end > self.context {
                return Err(EngineError::InvalidInput(format!(
                    "the sequence would reach {end} tokens; the context is {}",
                    self.context
                )));
            }
            if !seq.splices.is_empty() || seq.positions != &Positions::Linear {
                return Err(EngineError::Unsupported(
                    "Qwen3 is a text model: it takes token ids at 1-D positions, not embeddings or M-RoPE positions".into(),
                ));
            }
            positions.extend(seq.start..end);
        }
        Ok(positions)
    }
}

impl CausalLm for Qwen3 {
    fn kv_layout(&self) -> TokenLayout {
        let attn = self.layers.first().map(|l| &l.self_attn);
        TokenLayout::keys_values(
            self.layers.len(),
            attn.map_or(0, |a| a.kv_heads),
            attn.map_or(0, |a| a.head_dim),
        )
    }

    fn kv_dtype(&self) -> DType {
        self.embed_tokens.embeddings().dtype()
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn forward(&self, batch: &Batch<'_>, pool: &mut KvPool) -> Result<Vec<Vec<f32>>> {
        let positions = self.positions(batch)?;
        let ids: Vec<u32> = batch
            .seqs
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        // Every sequence's new rows back to back: the projections read each weight once for all.
        let ids = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let mut x = self.embed_tokens.forward(&ids)?;
        let angles = self.rotary.angles(&positions)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &angles, batch, pool, i)?;
        }
        // Only the rows whose logits are wanted go through the head.
        let mut wanted = Vec::new();
        let mut end = 0u32;
        for seq in &batch.seqs {
            end += seq.tokens.len() as u32;
            if seq.logits {
                wanted.push(end - 1);
            }
        }
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let rows = Tensor::new(wanted, &self.device)?;
        let last = x.index_select(&rows, 1)?;
        let logits = self.lm_head.forward(&self.norm.forward(&last)?)?;
        Ok(logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }

    fn context_length(&self) -> usize {
        self.context
    }
}

impl crate::runtime::LoadModel for Qwen3 {
    fn load(
        checkpoint: &Checkpoint,
        dtype: DType,
        quantization: Quantization,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        Self::load_architecture(
            checkpoint,
            "Qwen3ForCausalLM",
            dtype,
            quantization,
            device,
            progress,
        )
    }

    fn weight_bytes(&self) -> Option<u64> {
        Some(Qwen3::weight_bytes(self) as u64)
    }
}

/// Qwen3MoeForCausalLM (Qwen3-Coder-30B-A3B, Qwen3-30B-A3B): the same model with sparse layers.
#[derive(Debug, Clone)]
pub struct Qwen3Moe(Qwen3);

impl Qwen3Moe {
    /// The model underneath (for its weight accounting).
    pub fn inner(&self) -> &Qwen3 {
        &self.0
    }

    /// Loads a Qwen3MoeForCausalLM from `checkpoint`, as [`Qwen3::load`].
    pub fn load(
        checkpoint: &Checkpoint,
        dtype: DType,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        <Self as crate::runtime::LoadModel>::load(
            checkpoint,
            dtype,
            Quantization::None,
            device,
            progress,
        )
    }
}

impl CausalLm for Qwen3Moe {
    fn kv_layout(&self) -> TokenLayout {
        self.0.kv_layout()
    }

    fn kv_dtype(&self) -> DType {
        self.0.kv_dtype()
    }

    fn device(&self) -> Device {
        self.0.device()
    }

    fn forward(&self, batch: &Batch<'_>, pool: &mut KvPool) -> Result<Vec<Vec<f32>>> {
        self.0.forward(batch, pool)
    }

    fn context_length(&self) -> usize {
        self.0.context_length()
    }
}

impl crate::runtime::LoadModel for Qwen3Moe {
    fn load(
        checkpoint: &Checkpoint,
        dtype: DType,
        quantization: Quantization,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        Qwen3::load_architecture(
            checkpoint,
            "Qwen3MoeForCausalLM",
            dtype,
            quantization,
            device,
            progress,
        )
        .map(Self)
    }

    fn weight_bytes(&self) -> Option<u64> {
        Some(self.0.weight_bytes() as u64)
    }
}
