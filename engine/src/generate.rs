//! The model seam and what a generation request and its results look like. Requests run in the
//! [`serving::Engine`](crate::serving::Engine), batched with whatever else is running.

use std::sync::Arc;

use candle_core::{DType, Device};

use crate::batch::{Batch, Output, Splice};
use crate::error::Result;
use crate::kv_pool::{KvPool, TokenLayout};
use crate::sampling::SamplingParams;

/// The seam between the engine and a model: one forward pass over a batch of sequences against
/// the shared KV pool, returning the logits each sequence asked for.
pub trait CausalLm: Send + Sync + 'static {
    /// What a token leaves in the KV pool per layer.
    fn kv_layout(&self) -> TokenLayout;

    /// The element type the pool stores by default (the model's dtype).
    fn kv_dtype(&self) -> DType;

    /// Where the model's tensors live (the pool goes there too).
    fn device(&self) -> Device;

    /// Runs every sequence's new inputs, writing their cache entries into `pool` through their
    /// block tables; returns the last new input's output for each sequence that wants one, in
    /// batch order.
    fn forward(&self, batch: &Batch<'_>, pool: &mut KvPool) -> Result<Vec<Output>>;

    /// The longest sequence (prompt plus output) the model supports.
    fn context_length(&self) -> usize;
}

/// What to generate.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The prompt, tokenized.
    pub prompt: Vec<u32>,
    /// Sampling.
    pub sampling: SamplingParams,
    /// The most tokens to generate.
    pub max_tokens: usize,
    /// Stop before these strings.
    pub stop: Vec<String>,
    /// End the output with the stop string found, rather than before it.
    pub include_stop: bool,
    /// End-of-sequence ids (none: the sequence runs to `max_tokens`, vLLM's `ignore_eos`).
    pub eos: Vec<u32>,
    /// Ids that end the output after them, their text kept (vLLM's `stop_token_ids`).
    pub stop_ids: Vec<u32>,
    /// Tokens generated before an end-of-sequence id (or a stop id) may be (vLLM's
    /// `min_tokens`).
    pub min_tokens: usize,
    /// Report the chosen token's logprob and this many alternatives.
    pub logprobs: Option<usize>,
    /// Score the prompt's tokens after the first, with this many alternatives each.
    pub prompt_logprobs: Option<usize>,
    /// Images (or other inputs) beside the prompt's tokens.
    pub media: Option<Arc<Media>>,
    /// The grammar the output must match (see [`crate::guide::Grammars::compile`]).
    pub constraint: Option<crate::guide::Compiled>,
}

/// What a multimodal prompt brings beside its tokens.
#[derive(Debug, Clone)]
pub struct Media {
    /// Embeddings over runs of the prompt (`at` counts from the prompt's first token).
    pub splices: Vec<Splice>,
    /// Each prompt token's (temporal, height, width) position.
    pub positions: Vec<[u32; 3]>,
    /// A generated token's position less its index in the sequence (negative where images
    /// take fewer positions than tokens), the same on all three axes.
    pub position_delta: i64,
    /// The prompt as the prefix cache sees it: each placeholder token replaced by an id derived
    /// from its image's content, so two different images never share cache entries and the
    /// same image sent twice does.
    pub cache_keys: Vec<u32>,
}

impl Media {
    /// Positions of the sequence's inputs `from..to` (prompt and generated).
    pub fn positions(&self, from: usize, to: usize) -> Vec<[u32; 3]> {
        (from..to)
            .map(|i| match self.positions.get(i) {
                Some(&p) => p,
                None => [(i as i64 + self.position_delta).max(0) as u32; 3],
            })
            .collect()
    }

    /// The parts of its splices that fall in the sequence's inputs `from..to`, counted from
    /// `from`.
    pub fn splices(&self, from: usize, to: usize) -> candle_core::Result<Vec<Splice>> {
        let mut out = Vec::new();
        for s in &self.splices {
            let (lo, hi) = (s.at.max(from), (s.at + s.len()).min(to));
            if lo < hi {
                let mut part = s.rows(lo - s.at, hi - s.at)?;
                part.at -= from;
                out.push(part);
            }
        }
        Ok(out)
    }
}

/// One generated token, as the client sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    /// The token id.
    pub token_id: u32,
    /// The text it releases (may be empty: partial character or possible stop string).
    pub text: String,
    /// Its raw-distribution log-probability, when asked.
    pub logprob: Option<f32>,
    /// The best alternatives (id, text, logprob), when asked.
    pub top: Vec<(u32, String, f32)>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// EOS or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
    /// The caller stopped it.
    Cancelled,
}

/// How a generation went.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Why it ended.
    pub finish: Finish,
    /// Tokens generated (EOS included when produced).
    pub completion_tokens: usize,
    /// Prompt tokens whose cache entries came from the prefix cache.
    pub cached_tokens: usize,
    /// Prompt processing time, milliseconds.
    pub prompt_ms: f64,
    /// Decoding time, milliseconds.
    pub decode_ms: f64,
    /// The prompt's scores, when the request asked for them (its tokens after the first).
    pub prompt_logprobs: Option<Vec<crate::scoring::PromptScore>>,
    /// The stop string or stop id that ended it, if one did.
    pub stop_reason: Option<pio_plugin_api::wire::StopReason>,
}
