//! What every causal LM here ends with and starts from: the checks a text-only batch must pass,
//! and the final norm and output head, run only on the rows whose logits are wanted.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, Embedding, VarBuilder};
use rayon::prelude::*;

use crate::batch::{Batch, Output, Positions, SeqStep, Wanted};
use crate::checkpoint::Checkpoint;
use crate::linear::{Linear, Quantization};
use crate::norm::{forward_all, LinearInput, RmsNorm};
use crate::{EngineError, Result};

/// The sizes of a decoder-only stack's two ends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ends {
    /// Vocabulary size.
    pub vocab: usize,
    /// Model width.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// The final norm's epsilon.
    pub eps: f64,
    /// Whether the head is the embedding.
    pub tied: bool,
}

/// Where a stack's body lives: `model` for a causal LM, `model.language_model` inside a
/// multimodal model.
pub(crate) const CAUSAL_LM: &str = "model";

/// A decoder-only model's weights: the embedding, its layers and the head.
pub(crate) struct Stack<L> {
    /// `model.embed_tokens`.
    pub embed_tokens: Embedding,
    /// `model.layers.{i}`.
    pub layers: Vec<L>,
    /// `model.norm` and `lm_head`.
    pub head: Head,
}

/// Reads `{body}.embed_tokens`, layers `0..ends.layers` (each made by `layer(i, its weights)`),
/// `{body}.norm` and `lm_head` from `vb`, calling `progress(done, total)` as layers are read; a
/// weights error names the checkpoint's tensor.
pub(crate) fn load_stack<L>(
    checkpoint: &Checkpoint,
    vb: &VarBuilder,
    body: &str,
    ends: Ends,
    quantization: Quantization,
    progress: &mut dyn FnMut(usize, usize),
    mut layer: impl FnMut(usize, VarBuilder) -> candle_core::Result<L>,
) -> Result<Stack<L>> {
    let total = ends.layers + 2;
    // A config that names fewer layers than the weights hold would run a truncated model
    // without a word (transformers warns of the unused weights); GLM's next-token layer, past
    // the last one, has its own `eh_proj`.
    let past = vb.pp(body).pp(format!("layers.{}", ends.layers));
    if past.contains_tensor("input_layernorm.weight") && !past.contains_tensor("eh_proj.weight") {
        return Err(EngineError::BadField {
            path: checkpoint.config_path(),
            field: "num_hidden_layers".into(),
            reason: format!(
                "is {}, but the weights hold a layer {} too: set it to the number of layers the checkpoint holds",
                ends.layers, ends.layers
            ),
        });
    }
    let mut build = || -> candle_core::Result<Stack<L>> {
        let model = vb.pp(body);
        let embed_tokens = embedding(ends.vocab, ends.hidden, model.pp("embed_tokens"))?;
        progress(1, total);
        let layers = (0..ends.layers)
            .map(|i| {
                let made = layer(i, model.pp(format!("layers.{i}")));
                progress(i + 2, total);
                made
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = RmsNorm::load(ends.hidden, ends.eps, model.pp("norm"))?;
        let head = Head::load(
            norm,
            &embed_tokens,
            ends.tied,
            quantization,
            vb.clone(),
            &model.pp("embed_tokens"),
        )?;
        progress(total, total);
        Ok(Stack {
            embed_tokens,
            layers,
            head,
        })
    };
    build().map_err(|e| checkpoint.weight_error(e))
}

/// Checks `batch` against what a text model of `context` positions takes; returns every new
/// row's position. `family` names the model in the error a multimodal input gets.
pub(crate) fn text_positions(
    batch: &Batch<'_>,
    context: usize,
    family: &str,
) -> Result<Vec<usize>> {
    let mut positions = Vec::with_capacity(batch.rows());
    for seq in &batch.seqs {
        let end = extent(seq, context)?;
        if !seq.splices.is_empty() || seq.positions != &Positions::Linear {
            return Err(EngineError::Unsupported(format!(
                "{family} is a text model: it takes token ids at 1-D positions, not embeddings or M-RoPE positions"
            )));
        }
        positions.extend(seq.start..end);
    }
    Ok(positions)
}

/// Where a sequence's new inputs end, checked: some new inputs, within the context.
pub(crate) fn extent(seq: &SeqStep<'_>, context: usize) -> Result<usize> {
    let end = seq.start + seq.tokens.len();
    if seq.tokens.is_empty() {
        return Err(EngineError::Internal(
            "a sequence with no new tokens in a batch".into(),
        ));
    }
    if end > context {
        return Err(EngineError::ContextLength(format!(
            "the sequence would reach {end} tokens; the context is {context}"
        )));
    }
    Ok(end)
}

/// Every sequence's new token ids, back to back, embedded: `(1, rows, hidden)`.
pub(crate) fn embed(embed: &Embedding, batch: &Batch<'_>, device: &Device) -> Result<Tensor> {
    let ids: Vec<u32> = batch
        .seqs
        .iter()
        .flat_map(|s| s.tokens.iter().copied())
        .collect();
    Ok(embed.forward(&Tensor::new(ids, device)?.unsqueeze(0)?)?)
}

/// The final norm and the output projection.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    norm: RmsNorm,
    lm_head: Linear,
    /// Whether `lm_head` is the embedding's own tensor (tied and not quantized).
    is_embedding: bool,
}

impl Head {
    /// Reads `lm_head` under `vb` (or ties it to `embed`, read under `embed_vb`) behind `norm`.
    pub(crate) fn load(
        norm: RmsNorm,
        embed: &Embedding,
        tied: bool,
        quantization: Quantization,
        vb: VarBuilder,
        embed_vb: &VarBuilder,
    ) -> candle_core::Result<Self> {
        // Quantized models keep the head at 8 bits whatever the mode (the most sensitive
        // matrix, as llama.cpp keeps it at 6+ bits): a dense bf16 head would dominate decode
        // time (a third of the bytes read per token of a tied 0.6B model), and Q8_0 is also
        // smaller. A tied head gets its own Q8_0 copy; lookups keep the exact embedding.
        let head = match quantization {
            Quantization::None => Quantization::None,
            _ => Quantization::Q8,
        };
        let (vocab, hidden) = embed.embeddings().dims2()?;
        let lm_head = if tied {
            // An embedding stored quantized (a GGUF's) is the head as stored, as llama.cpp uses it.
            match Linear::stored(hidden, vocab, embed_vb)? {
                Some(stored) => stored,
                None => Linear::from_weight(embed.embeddings().clone(), None, head)?,
            }
        } else {
            Linear::load(hidden, vocab, false, head, vb.pp("lm_head"))?
        };
        Ok(Self {
            norm,
            is_embedding: tied && !lm_head.is_quantized(),
            lm_head,
        })
    }

    /// Bytes one token's logits read: the head's matrix (the embedding's, when they are one).
    pub(crate) fn step_bytes(&self) -> usize {
        self.lm_head.weight_bytes()
    }

    /// Bytes of its own weights (none when it is the embedding).
    pub(crate) fn weight_bytes(&self) -> usize {
        if self.is_embedding {
            0
        } else {
            self.lm_head.weight_bytes()
        }
    }

    /// The output of the last new row of each sequence of `batch` that wants one, in batch
    /// order; `x` is `(1, rows, hidden)`. Only those rows go through the head.
    pub(crate) fn logits(&self, x: &Tensor, batch: &Batch<'_>) -> Result<Vec<Output>> {
        let _timed = crate::profile::PROFILE.scope(crate::profile::Op::Head);
        let (mut rows, mut wanted) = (Vec::new(), Vec::new());
        let mut end = 0u32;
        for seq in &batch.seqs {
            end += seq.tokens.len() as u32;
            if seq.logits != Wanted::Nothing {
                rows.push(end - 1);
                wanted.push(seq.logits);
            }
        }
        self.score(x, batch)?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let logits = self.rows_logits(x, rows)?;
        super::outputs::outputs(&logits.squeeze(0)?, &wanted)
    }

    /// `x`'s rows `rows` through the norm and the head: `(1, rows, vocab)`.
    fn rows_logits(&self, x: &Tensor, rows: Vec<u32>) -> Result<Tensor> {
        let rows = Tensor::new(rows, x.device())?;
        let picked = x.index_select(&rows, 1)?;
        let [logits] = forward_all([&self.lm_head], LinearInput::Normed(&picked, &self.norm))?;
        Ok(logits)
    }

    /// Scores the rows of `batch`'s sequences that ask for it ([`SeqStep::score`]), a few rows
    /// of logits at a time: a whole chunk's would be rows × vocabulary floats (300 MB for 512
    /// rows of Qwen3's).
    fn score(&self, x: &Tensor, batch: &Batch<'_>) -> Result<()> {
        const ROWS_AT_ONCE: usize = 32;
        let mut base = 0usize;
        for seq in &batch.seqs {
            if let Some(ask) = &seq.score {
                for (i, next) in ask.next.chunks(ROWS_AT_ONCE).enumerate() {
                    let first = base + ask.first + i * ROWS_AT_ONCE;
                    let rows = (first..first + next.len()).map(|r| r as u32).collect();
                    let logits = (self
                        .rows_logits(x, rows)?
                        .squeeze(0)?
                        .to_dtype(DType::F32)?)
                    .to_vec2::<f32>()?;
                    // Three passes over the vocabulary per row (sum, rank, best): in parallel.
                    let scored: Vec<_> = (logits.par_iter().zip(next))
                        .map(|(row, &t)| crate::scoring::score(row, t, ask.top))
                        .collect();
                    let mut into = (ask.into.lock())
                        .map_err(|_| EngineError::Internal("prompt scores poisoned".into()))?;
                    into.extend(scored);
                }
            }
            base += seq.tokens.len();
        }
        Ok(())
    }
}

/// Bytes a tensor's elements take.
pub(crate) fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}
