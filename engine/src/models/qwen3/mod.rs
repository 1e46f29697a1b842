//! Qwen3 causal LMs, mirroring transformers' `modeling_qwen3.py` and `modeling_qwen3_moe.py`:
//! grouped-query attention with per-head RMSNorm on queries and keys, rotary positions, a SwiGLU
//! MLP or (Qwen3-MoE) a sparse mixture of SwiGLU experts, tied or untied output embedding.

use crate::batch::{Batch, Output};
use crate::candle_core::{DType, Device, Tensor};
use crate::candle_nn::{Embedding, VarBuilder};
use crate::checkpoint::Checkpoint;
use crate::generate::CausalLm;
use crate::kv_pool::{KvPool, TokenLayout};
use crate::linear::Quantization;
use crate::models::head::{self, load_stack, tensor_bytes, Head, Stack};
use crate::models::mlp::Mlp;
use crate::models::rotary::{Angles, Rotary};
use crate::norm::{LinearInput, Residual, RmsNorm};
use crate::Result;

mod attention;
mod config;
mod moe;

use attention::Attention;
pub use config::{Config, RopeParameters};

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

    fn step_bytes(&self) -> usize {
        match self {
            Self::Dense(mlp) => mlp.weight_bytes(),
            Self::Sparse(moe) => moe.step_bytes(),
        }
    }

    fn forward(&self, x: LinearInput<'_>) -> Result<Tensor> {
        match self {
            Self::Dense(mlp) => mlp.forward_input(x),
            Self::Sparse(moe) => moe.forward(&x.tensor()?),
        }
    }
}

/// One decoder layer (Qwen3-VL's text model reuses it).
#[derive(Debug, Clone)]
pub(crate) struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: FeedForward,
}

impl DecoderLayer {
    pub(crate) fn new(
        cfg: &Config,
        index: usize,
        q: Quantization,
        vb: VarBuilder,
    ) -> candle_result::R<Self> {
        let mlp = if cfg.is_sparse(index) {
            FeedForward::Sparse(moe::SparseMoe::new(cfg, q, vb.pp("mlp"))?)
        } else {
            FeedForward::Dense(Mlp::load(
                cfg.hidden_size,
                cfg.intermediate_size,
                q,
                vb.pp("mlp"),
            )?)
        };
        Ok(Self {
            input_layernorm: RmsNorm::load(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("input_layernorm"),
            )?,
            self_attn: Attention::new(cfg, q, vb.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::load(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
            mlp,
        })
    }

    /// The layer on the residual stream `x`: attention and the feed-forward part each add
    /// their output to it.
    pub(crate) fn forward(
        &self,
        x: &mut Residual,
        rotary: &Angles,
        batch: &Batch<'_>,
        pool: &KvPool,
        layer: usize,
    ) -> Result<()> {
        // Each norm's output goes straight into the projections that read it (fused with their
        // activation quantization where the weights are tiled, with the residual add on a GPU).
        let normed = x.normed(&self.input_layernorm)?;
        let attn = self.self_attn.forward(normed, rotary, batch, pool, layer)?;
        x.add(attn)?;
        let mlp = self
            .mlp
            .forward(x.normed(&self.post_attention_layernorm)?)?;
        Ok(x.add(mlp)?)
    }
}

/// The model.
#[derive(Debug, Clone)]
pub struct Qwen3 {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    head: Head,
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
        checkpoint.expect_architecture(architecture)?;
        let cfg: Config = checkpoint.config()?;
        cfg.validate(checkpoint)?;
        let (theta, scale) = cfg.rope(checkpoint)?;
        let vb = checkpoint.weights(dtype, device)?;
        let ends = cfg.ends();
        let Stack {
            embed_tokens,
            layers,
            head,
        } = load_stack(
            checkpoint,
            &vb,
            head::CAUSAL_LM,
            ends,
            quantization,
            progress,
            |i, vb| DecoderLayer::new(&cfg, i, quantization, vb),
        )?;
        Ok(Self {
            embed_tokens,
            layers,
            head,
            rotary: Rotary::new(cfg.head_dim(), theta, scale, dtype, device),
            context: cfg.max_position_embeddings,
            device: device.clone(),
        })
    }
}

impl DecoderLayer {
    /// Bytes of its projections and experts.
    pub(crate) fn weight_bytes(&self) -> usize {
        self.self_attn.weight_bytes() + self.mlp.weight_bytes()
    }

    /// Bytes one token reads from it: the projections and the experts it is routed to.
    pub(crate) fn step_bytes(&self) -> usize {
        self.self_attn.weight_bytes() + self.mlp.step_bytes()
    }

    /// (kv heads, head width).
    pub(crate) fn kv_shape(&self) -> (usize, usize) {
        (self.self_attn.kv_heads, self.self_attn.head_dim)
    }
}

impl Qwen3 {
    /// Bytes of weights per decoder layer (projections and experts; norms are negligible).
    pub fn layer_weight_bytes(&self) -> Vec<usize> {
        self.layers.iter().map(DecoderLayer::weight_bytes).collect()
    }

    /// Bytes of all weights: layers, embedding and (unless it is the embedding) the output head.
    pub fn weight_bytes(&self) -> usize {
        let embed = tensor_bytes(self.embed_tokens.embeddings());
        self.layer_weight_bytes().iter().sum::<usize>() + embed + self.head.weight_bytes()
    }

    /// Bytes one decode step reads from the weights: every layer's projections and routed
    /// experts, and the output head (the embedding gives one row).
    pub fn step_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(DecoderLayer::step_bytes)
            .sum::<usize>()
            + self.head.step_bytes()
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

    fn forward(&self, batch: &Batch<'_>, pool: &mut KvPool) -> Result<Vec<Output>> {
        let positions = head::text_positions(batch, self.context, "Qwen3")?;
        // Every sequence's new rows back to back: the projections read each weight once for all.
        let mut x = Residual::new(head::embed(&self.embed_tokens, batch, &self.device)?);
        let angles = self.rotary.angles(&positions)?;
        for (i, layer) in self.layers.iter().enumerate() {
            layer.forward(&mut x, &angles, batch, pool, i)?;
        }
        self.head.logits(&x.into_rows()?, batch)
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

    fn vocab_size(&self) -> Option<usize> {
        Some(self.embed_tokens.embeddings().dims()[0])
    }

    fn step_bytes(&self) -> Option<u64> {
        Some(Qwen3::step_bytes(self) as u64)
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

    fn forward(&self, batch: &Batch<'_>, pool: &mut KvPool) -> Result<Vec<Output>> {
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

    fn vocab_size(&self) -> Option<usize> {
        Some(self.0.embed_tokens.embeddings().dims()[0])
    }

    fn step_bytes(&self) -> Option<u64> {
        Some(self.0.step_bytes() as u64)
    }
}
