//! What every causal LM here ends with and starts from: the checks a text-only batch must pass,
//! and the final norm and output head, run only on the rows whose logits are wanted.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};

use crate::batch::{Batch, Positions};
use crate::linear::{Linear, Quantization};
use crate::{EngineError, Result};

/// Checks `batch` against what a text model of `context` positions takes; returns every new
/// row's position. `family` names the model in the error a multimodal input gets.
pub(crate) fn text_positions(
    batch: &Batch<'_>,
    context: usize,
    family: &str,
) -> Result<Vec<usize>> {
    let mut positions = Vec::with_capacity(batch.rows());
    for seq in &batch.seqs {
        let end = seq.start + seq.tokens.len();
        if seq.tokens.is_empty() {
            return Err(EngineError::Internal(
                "a sequence with no new tokens in a batch".into(),
            ));
        }
        if end > context {
            return Err(EngineError::InvalidInput(format!(
                "the sequence would reach {end} tokens; the context is {context}"
            )));
        }
        if !seq.splices.is_empty() || seq.positions != &Positions::Linear {
            return Err(EngineError::Unsupported(format!(
                "{family} is a text model: it takes token ids at 1-D positions, not embeddings or M-RoPE positions"
            )));
        }
        positions.extend(seq.start..end);
    }
    Ok(positions)
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
    /// Reads `lm_head` under `vb` (or ties it to `embed`) behind `norm`.
    pub(crate) fn load(
        norm: RmsNorm,
        embed: &Embedding,
        tied: bool,
        quantization: Quantization,
        vb: VarBuilder,
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
            Linear::from_weight(embed.embeddings().clone(), None, head)?
        } else {
            Linear::load(hidden, vocab, false, head, vb.pp("lm_head"))?
        };
        Ok(Self {
            norm,
            is_embedding: tied && !lm_head.is_quantized(),
            lm_head: lm_head.repacked(),
        })
    }

    /// Bytes of its own weights (none when it is the embedding).
    pub(crate) fn weight_bytes(&self) -> usize {
        if self.is_embedding {
            0
        } else {
            self.lm_head.weight_bytes()
        }
    }

    /// Logits of the last new row of each sequence of `batch` that wants them, in batch order;
    /// `x` is `(1, rows, hidden)`. Only those rows go through the head.
    pub(crate) fn logits(&self, x: &Tensor, batch: &Batch<'_>) -> Result<Vec<Vec<f32>>> {
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
        let rows = Tensor::new(wanted, x.device())?;
        let last = x.index_select(&rows, 1)?;
        let logits = self.lm_head.forward(&self.norm.forward(&last)?)?;
        Ok(logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }
}

/// Bytes a tensor's elements take.
pub(crate) fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}
