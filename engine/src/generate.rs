//! The model seam and what a generation request and its results look like. Requests run in the
//! [`serving::Engine`](crate::serving::Engine), batched with whatever else is running.

use candle_core::{DType, Device};

use crate::batch::Batch;
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
    /// block tables; returns the last new input's logits for each sequence with `logits` set, in
    /// batch order.
    fn forward(&self, batch: &Batch<'_>, pool: &mut KvPool) -> Result<Vec<Vec<f32>>>;

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
    /// End-of-sequence ids.
    pub eos: Vec<u32>,
    /// Report the chosen token's logprob and this many alternatives.
    pub logprobs: Option<usize>,
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
}
