//! GLM-4.7-Flash (`Glm4MoeLiteForCausalLM`), mirroring transformers' `modeling_glm4_moe_lite.py`:
//! multi-head latent attention whose cache keeps one compressed latent per token, dense SwiGLU
//! layers first, then sparse layers of sigmoid-routed experts with a shared expert, an untied head.

use candle_core::{DType, Device};
use candle_nn::{Embedding, VarBuilder};

use crate::batch::{Batch, Output};
use crate::checkpoint::Checkpoint;
use crate::generate::CausalLm;
use crate::kv_pool::{KvPool, TokenLayout};
use crate::linear::Quantization;
use crate::models::experts::Choice;
use crate::models::head::{self, load_stack, tensor_bytes, Ends, Head, Stack};
use crate::models::mlp::Mlp;
use crate::models::rotary::{Angles, Rotary};
use crate::norm::{Residual, RmsNorm};
use crate::Result;

mod attention;
mod config;
mod moe;

use attention::Attention;
pub use attention::MlaForm;
pub use config::{Config, LayerKind};

/// The transformers class this model mirrors.
const ARCHITECTURE: &str = "Glm4MoeLiteForCausalLM";

#[derive(Debug, Clone)]
enum FeedForward {
    Dense(Mlp),
    Sparse(moe::SparseMoe),
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: FeedForward,
}

impl DecoderLayer {
    fn new(
        cfg: &Config,
        kind: LayerKind,
        q: Quantization,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let mlp = match kind {
            LayerKind::Dense => FeedForward::Dense(Mlp::load(
                cfg.hidden_size,
                cfg.intermediate_size,
                q,
                vb.pp("mlp"),
            )?),
            LayerKind::Sparse => FeedForward::Sparse(moe::SparseMoe::new(cfg, q, vb.pp("mlp"))?),
        };
        let norm = |name: &str| RmsNorm::load(cfg.hidden_size, cfg.rms_norm_eps, vb.pp(name));
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::new(cfg, q, vb.pp("self_attn"))?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            mlp,
        })
    }

    fn weight_bytes(&self) -> usize {
        self.self_attn.weight_bytes()
            + match &self.mlp {
                FeedForward::Dense(m) => m.weight_bytes(),
                FeedForward::Sparse(m) => m.weight_bytes(),
            }
    }

    /// Bytes one token reads from it: the attention and the experts it is routed to.
    fn step_bytes(&self) -> usize {
        self.self_attn.weight_bytes()
            + match &self.mlp {
                FeedForward::Dense(m) => m.weight_bytes(),
                FeedForward::Sparse(m) => m.step_bytes(),
            }
    }

    /// The layer on `x`; a sparse layer also returns each row's chosen experts.
    /// The layer on the residual stream `x` (attention and the feed-forward part each add their
    /// output to it); a sparse layer's expert choices per row.
    fn forward(
        &self,
        x: &mut Residual,
        step: &Step<'_, '_>,
        layer: usize,
    ) -> Result<Option<Vec<Choice>>> {
        let attn = self.self_attn.forward(
            x.normed(&self.input_layernorm)?,
            step.angles,
            step.batch,
            step.pool,
            layer,
            step.form,
        )?;
        x.add(attn)?;
        let h = x.normed(&self.post_attention_layernorm)?;
        let (mlp, choices) = match &self.mlp {
            FeedForward::Dense(m) => (m.forward_input(h)?, None),
            FeedForward::Sparse(m) => {
                let (y, c) = m.forward(&h.tensor()?)?;
                (y, Some(c))
            }
        };
        x.add(mlp)?;
        Ok(choices)
    }
}

/// What every layer of one forward pass shares.
struct Step<'a, 'b> {
    angles: &'a Angles,
    batch: &'a Batch<'b>,
    pool: &'a KvPool,
    form: MlaForm,
}

/// Per sparse layer, per row of a batch, the chosen experts in ascending order.
pub type ExpertTrace = Vec<Vec<Vec<usize>>>;

/// The model.
#[derive(Debug, Clone)]
pub struct Glm4MoeLite {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    head: Head,
    rotary: Rotary,
    latent_dim: usize,
    context: usize,
    form: MlaForm,
    device: Device,
}

impl Glm4MoeLite {
    /// Loads a Glm4MoeLiteForCausalLM from `checkpoint` in `dtype` on `device`, its linear layers
    /// stored as `quantization` says, calling `progress(done, total)` as layers are read. Only
    /// layers `0..num_hidden_layers` are read: the next-token-prediction layer stored after them
    /// is not part of the model.
    pub fn load(
        checkpoint: &Checkpoint,
        dtype: DType,
        quantization: Quantization,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        checkpoint.expect_architecture(ARCHITECTURE)?;
        let cfg: Config = checkpoint.config()?;
        cfg.validate(checkpoint)?;
        let (theta, scale) = cfg.rope(checkpoint)?;
        let vb = checkpoint.weights(dtype, device)?;
        let kinds = cfg.layer_kinds();
        let ends = Ends {
            vocab: cfg.vocab_size,
            hidden: cfg.hidden_size,
            layers: cfg.num_hidden_layers,
            eps: cfg.rms_norm_eps,
            tied: cfg.tie_word_embeddings,
        };
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
            |i, vb| DecoderLayer::new(&cfg, kinds[i], quantization, vb),
        )?;
        Ok(Self {
            embed_tokens,
            layers,
            head,
            rotary: Rotary::new(cfg.qk_rope_head_dim, theta, scale, dtype, device),
            latent_dim: cfg.latent_dim(),
            context: cfg.max_position_embeddings,
            form: MlaForm::default(),
            device: device.clone(),
        })
    }

    /// The same model computing attention in `form` (the expanded form is for comparisons).
    pub fn with_form(mut self, form: MlaForm) -> Self {
        self.form = form;
        self
    }

    /// Bytes of weights per decoder layer.
    pub fn layer_weight_bytes(&self) -> Vec<usize> {
        self.layers.iter().map(DecoderLayer::weight_bytes).collect()
    }

    /// Bytes of all weights: layers, embedding and output head.
    pub fn weight_bytes(&self) -> usize {
        self.layer_weight_bytes().iter().sum::<usize>()
            + tensor_bytes(self.embed_tokens.embeddings())
            + self.head.weight_bytes()
    }

    /// Bytes one decode step reads from the weights: the layers' share and the output head.
    pub fn step_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(DecoderLayer::step_bytes)
            .sum::<usize>()
            + self.head.step_bytes()
    }

    /// The forward pass, also returning each sparse layer's expert choices per row.
    pub fn forward_traced(
        &self,
        batch: &Batch<'_>,
        pool: &mut KvPool,
    ) -> Result<(Vec<Output>, ExpertTrace)> {
        let mut trace = ExpertTrace::new();
        let logits = self.run(batch, pool, Some(&mut trace))?;
        Ok((logits, trace))
    }

    /// The forward pass; the expert choices go into `trace` when one is given (tests compare
    /// them with transformers'; serving does not pay for collecting them).
    fn run(
        &self,
        batch: &Batch<'_>,
        pool: &KvPool,
        mut trace: Option<&mut ExpertTrace>,
    ) -> Result<Vec<Output>> {
        let positions = head::text_positions(batch, self.context, "GLM-4.7-Flash")?;
        let mut x = Residual::new(head::embed(&self.embed_tokens, batch, &self.device)?);
        let angles = self.rotary.angles(&positions)?;
        let step = Step {
            angles: &angles,
            batch,
            pool,
            form: self.form,
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let choices = layer.forward(&mut x, &step, i)?;
            if let (Some(trace), Some(choices)) = (trace.as_deref_mut(), choices) {
                trace.push(choices.into_iter().map(experts_of).collect());
            }
        }
        self.head.logits(&x.into_rows()?, batch)
    }
}

/// A row's chosen experts, ascending (only the set enters the math).
fn experts_of(choice: Choice) -> Vec<usize> {
    let mut experts: Vec<usize> = choice.into_iter().map(|(e, _)| e).collect();
    experts.sort_unstable();
    experts
}

impl CausalLm for Glm4MoeLite {
    fn kv_layout(&self) -> TokenLayout {
        TokenLayout::latent(self.layers.len(), self.latent_dim)
    }

    fn kv_dtype(&self) -> DType {
        self.embed_tokens.embeddings().dtype()
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn forward(&self, batch: &Batch<'_>, pool: &mut KvPool) -> Result<Vec<Output>> {
        self.run(batch, pool, None)
    }

    fn context_length(&self) -> usize {
        self.context
    }
}

impl crate::runtime::LoadModel for Glm4MoeLite {
    fn load(
        checkpoint: &Checkpoint,
        dtype: DType,
        quantization: Quantization,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        Glm4MoeLite::load(checkpoint, dtype, quantization, device, progress)
    }

    fn weight_bytes(&self) -> Option<u64> {
        Some(Glm4MoeLite::weight_bytes(self) as u64)
    }

    fn vocab_size(&self) -> Option<usize> {
        Some(self.embed_tokens.embeddings().dims()[0])
    }

    fn step_bytes(&self) -> Option<u64> {
        Some(Glm4MoeLite::step_bytes(self) as u64)
    }
}
