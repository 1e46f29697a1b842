//! The generation loop shared by every text model: prefill the prompt, then decode one token at a
//! time — sample, report logprobs, turn tokens into UTF-8-safe text, hold back what may begin a
//! stop string — until EOS, a stop string, `max_tokens`, the context's end or a cancel.

use std::time::Instant;

use crate::error::{EngineError, Result};
use crate::sampling::{log_softmax, top_k, Sampler, SamplingParams};
use crate::stop::StopMatcher;
use crate::text::{StreamDecoder, TextCodec};

/// The seam between the engine and a model: a forward pass over new tokens against the
/// sequence's cache, returning the logits of the last position.
pub trait CausalLm {
    /// Per-sequence state (the KV cache).
    type Cache;

    /// An empty cache for a new sequence.
    fn new_cache(&self) -> Self::Cache;

    /// Runs `tokens` (positions `cache`'s length onwards) and returns the last position's logits.
    fn forward(&self, tokens: &[u32], cache: &mut Self::Cache) -> Result<Vec<f32>>;

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
    /// Prompt processing time, milliseconds.
    pub prompt_ms: f64,
    /// Decoding time, milliseconds.
    pub decode_ms: f64,
}

/// Prompt tokens per forward pass while prefilling: attention's scratch is chunk × context rather
/// than prompt × prompt, so memory grows linearly with a long prompt.
pub const PREFILL_CHUNK: usize = 512;

/// Feeds `tokens` to `model` in chunks of `chunk`; returns the logits after the last one.
pub fn prefill<M: CausalLm>(
    model: &M,
    tokens: &[u32],
    cache: &mut M::Cache,
    chunk: usize,
) -> Result<Vec<f32>> {
    let mut logits = Vec::new();
    for part in tokens.chunks(chunk.max(1)) {
        logits = model.forward(part, cache)?;
    }
    Ok(logits)
}

/// Runs `request` on `model`; `emit` receives each token and returns false to stop.
pub fn generate<M: CausalLm>(
    model: &M,
    codec: &TextCodec,
    request: &Request,
    emit: &mut dyn FnMut(Emitted) -> bool,
) -> Result<Outcome> {
    let context = model.context_length();
    if request.prompt.is_empty() {
        return Err(EngineError::InvalidInput("the prompt is empty".into()));
    }
    if request.prompt.len() >= context {
        return Err(EngineError::InvalidInput(format!(
            "the prompt is {} tokens; this model's context is {context} tokens, leaving no room to generate: shorten the prompt",
            request.prompt.len()
        )));
    }
    let max_tokens = request.max_tokens.min(context - request.prompt.len());
    let mut cache = model.new_cache();
    let mut sampler = Sampler::new(request.sampling.clone());
    let mut decoder = StreamDecoder::new();
    let mut stops = StopMatcher::new(request.stop.iter().cloned());
    let mut generated: Vec<u32> = Vec::new();

    let started = Instant::now();
    let mut logits = prefill(model, &request.prompt, &mut cache, PREFILL_CHUNK)?;
    let prompt_ms = started.elapsed().as_secs_f64() * 1e3;
    let decode_start = Instant::now();
    let mut finish = Finish::Length;
    while generated.len() < max_tokens {
        let token = sampler.sample(&logits, &request.prompt, &generated);
        generated.push(token);
        let is_eos = request.eos.contains(&token);
        let last = is_eos || generated.len() == max_tokens;
        let (logprob, top) = match request.logprobs {
            Some(k) => {
                let lp = log_softmax(&logits);
                let top = top_k(&lp, k)
                    .into_iter()
                    .map(|(id, l)| (id, codec.decode(&[id]), l))
                    .collect();
                (Some(lp[token as usize]), top)
            }
            None => (None, Vec::new()),
        };
        let mut text = String::new();
        let mut stopped = false;
        if !is_eos {
            let step = stops.push(&decoder.push(codec, token));
            text = step.emit;
            stopped = step.stopped;
        }
        if last && !stopped {
            // Nothing follows: release what was held for a possible stop string or character.
            let tail = stops.push(&decoder.finish(codec));
            text.push_str(&tail.emit);
            stopped = tail.stopped;
            if !stopped {
                text.push_str(&stops.finish());
            }
        }
        let go_on = emit(Emitted {
            token_id: token,
            text,
            logprob,
            top,
        });
        if is_eos || stopped {
            finish = Finish::Stop;
            break;
        }
        if !go_on {
            finish = Finish::Cancelled;
            break;
        }
        if generated.len() == max_tokens {
            break;
        }
        logits = model.forward(&[token], &mut cache)?;
    }
    Ok(Outcome {
        finish,
        completion_tokens: generated.len(),
        prompt_ms,
        decode_ms: decode_start.elapsed().as_secs_f64() * 1e3,
    })
}
