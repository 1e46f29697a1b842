//! What of the prompt an answer shows: completions' `echo` (with `logprobs`, its tokens scored)
//! and vLLM's `prompt_logprobs`, and what that asks of the plugin.

use pio_plugin_api::wire::InferRequest;
use serde_json::Value;

use super::{unsupported, ApiError, Common};

/// What of the prompt an answer shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PromptShown {
    /// Completions' `echo`: the prompt's text before the output's.
    pub echo: bool,
    /// With `echo` and `logprobs: k`, the prompt's tokens come first in the logprobs, `k`
    /// alternatives each.
    pub echo_top: Option<u32>,
    /// vLLM's `prompt_logprobs: k`: the prompt's scores in vLLM's shape, `k` alternatives each.
    pub logprobs: Option<u32>,
    /// `echo` with `max_tokens: 0` (OpenAI's old way to score a prompt, which vLLM keeps): one
    /// token is generated and left out, the answer is the prompt alone.
    pub echo_only: bool,
    /// `echo` with `logprobs` on a stream: the prompts are scored by requests of their own
    /// before the stream starts (its first chunk carries the scores), and the stream's own
    /// requests are not scored.
    pub scored_apart: bool,
}

/// The most alternatives `prompt_logprobs` takes (vLLM's default `max_logprobs`).
const MAX_PROMPT_LOGPROBS: i64 = 20;

/// vLLM's `prompt_logprobs`: `None` when absent or null, else the alternatives per token.
fn prompt_logprobs(c: &Common) -> Result<Option<u32>, ApiError> {
    let field = "prompt_logprobs";
    match c.prompt_logprobs.as_ref() {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(k @ 0..=MAX_PROMPT_LOGPROBS) => Ok(Some(k as u32)),
            Some(-1) => Err(unsupported(
                field,
                &format!("-1 (the whole vocabulary) is not supported; ask for at most {MAX_PROMPT_LOGPROBS}"),
            )),
            _ => Err(ApiError::bad_field(
                field,
                format!("`{field}` must be a whole number from 0 to {MAX_PROMPT_LOGPROBS}, found {v}"),
            )),
        },
    }
}

/// What of the prompt the request asks to see, into `request.prompt_logprobs` (the most
/// alternatives either asks for; each answer shows its own number). vLLM's `prompt_logprobs`
/// is refused on a stream, as vLLM does; `echo` with `logprobs` on one is scored apart, first.
pub(super) fn shown(
    c: &Common,
    echo: bool,
    request: &mut InferRequest,
) -> Result<PromptShown, ApiError> {
    let field = prompt_logprobs(c)?;
    let stream = c.stream == Some(true);
    if stream && field.is_some() {
        return Err(unsupported(
            "prompt_logprobs",
            "is not available with `stream: true` (as in vLLM); ask without streaming",
        ));
    }
    let echo_top = request.logprobs.filter(|_| echo);
    // Scores come with the end of a run: a stream gets them from runs of their own, before it.
    let scored_apart = stream && echo_top.is_some();
    request.prompt_logprobs = field.max(echo_top).filter(|_| !scored_apart);
    Ok(PromptShown {
        echo,
        echo_top,
        logprobs: field,
        echo_only: false,
        scored_apart,
    })
}
