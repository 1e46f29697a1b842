//! OpenAI response bodies: whole completions, stream chunks, logprobs in the chat and the legacy
//! completions shapes, and `usage`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use pio_plugin_api::wire::{FinishReason, InferOutcome, StopReason, TokenTable, Usage};
use serde_json::{json, Value};

use super::openai::{Endpoint, LogprobsFormat, PromptShown};
use super::tool_calls::Call;
use crate::protocol::TokenFrame;

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// Builds the bodies of one response.
#[derive(Debug, Clone)]
pub struct Reply {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    logprobs: LogprobsFormat,
    /// Characters of completion text so far (the legacy `text_offset`).
    offset: usize,
    /// The model's token table, for logprobs' `bytes`.
    tokens: Option<Arc<TokenTable>>,
    /// Which of the request's choices (`n`) this one builds.
    index: usize,
    /// What of the prompt it shows.
    shown: PromptShown,
    /// Each prompt's text, when echoed, and the choices each prompt has (`n`).
    echoes: Arc<Vec<String>>,
    per_prompt: usize,
    /// Each prompt's scoring run, when scored apart for a stream (its opening chunk shows them).
    scores_apart: Arc<Vec<InferOutcome>>,
}

/// The API's finish reason: `tool_calls` when calls were taken out, unless the output was cut
/// by `max_tokens` — a call may be cut off with it, and `length` is how a client learns its
/// output is incomplete (OpenAI's and, for forced calls, vLLM's). A plugin's own `ToolCalls`
/// with no call taken out (`tool_choice: "none"`, a call that did not parse) is `stop`: a
/// client seeing `tool_calls` reads `message.tool_calls`, and there is none.
fn finish(reason: FinishReason, called: bool) -> &'static str {
    if called && reason != FinishReason::Length {
        return "tool_calls";
    }
    match reason {
        FinishReason::Stop | FinishReason::Cancelled | FinishReason::ToolCalls => "stop",
        FinishReason::Length => "length",
    }
}

/// vLLM's `stop_reason`: the stop string or stop token id that ended the output; `null` for the
/// end of sequence, a length, or a plugin that does not say (before plugin-api 1.12).
fn stop_reason(outcome: &InferOutcome) -> Value {
    match &outcome.stop_reason {
        Some(StopReason::Text(text)) => json!(text),
        Some(StopReason::Token(id)) => json!(id),
        None => Value::Null,
    }
}

/// The usage of a request's choices together, each given with whether it counts its prompt:
/// each prompt once (with the first of its choices), as OpenAI and vLLM do, and every choice's
/// completion.
pub fn merged_usage(each: impl IntoIterator<Item = (bool, Usage)>) -> Usage {
    let mut total = Usage::default();
    for (counts_prompt, u) in each {
        // Saturating: the counts are the plugin's, and an overflow panicked (debug) or wrapped.
        if counts_prompt {
            total.prompt_tokens = total.prompt_tokens.saturating_add(u.prompt_tokens);
            total.cached_tokens = total.cached_tokens.saturating_add(u.cached_tokens);
        }
        total.completion_tokens = total.completion_tokens.saturating_add(u.completion_tokens);
    }
    total
}

fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u64::from(u.prompt_tokens) + u64::from(u.completion_tokens),
        "prompt_tokens_details": { "cached_tokens": u.cached_tokens },
    })
}

/// Seconds since the Unix epoch: OpenAI's `created`.
pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Reply {
    /// A response to a request for `model` at `endpoint`.
    pub fn new(model: &str, endpoint: Endpoint, logprobs: LogprobsFormat) -> Self {
        let created = unix_now();
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        };
        let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        Self {
            id: format!(
                "{prefix}-{created:x}{:05x}{n:x}",
                std::process::id() & 0xfffff
            ),
            created,
            model: model.to_string(),
            endpoint,
            logprobs,
            offset: 0,
            tokens: None,
            index: 0,
            shown: PromptShown::default(),
            echoes: Arc::default(),
            per_prompt: 1,
            scores_apart: Arc::default(),
        }
    }

    /// Shows what `shown` asks of the prompts, whose texts are `texts` (completions' `echo`),
    /// each run as `n` choices.
    pub fn with_prompts(mut self, shown: PromptShown, texts: Vec<String>, n: usize) -> Self {
        self.shown = shown;
        self.echoes = Arc::new(texts);
        self.per_prompt = n.max(1);
        self
    }

    /// Shows `outcomes`, each prompt's scoring run, in a stream's opening chunk.
    pub fn with_scores_apart(mut self, outcomes: Arc<Vec<InferOutcome>>) -> Self {
        self.scores_apart = outcomes;
        self
    }

    /// The same response's choice `index` (one `id` for all of a request's choices).
    pub fn for_choice(&self, index: usize) -> Self {
        Self {
            index,
            offset: 0,
            ..self.clone()
        }
    }

    /// This choice's prompt text, when the answer echoes it (completions' `echo`).
    fn echo(&self) -> Option<&str> {
        let echoed = self.shown.echo && self.endpoint == Endpoint::Completions;
        let text = self.echoes.get(self.index / self.per_prompt);
        text.filter(|_| echoed).map(String::as_str)
    }

    /// Reports logprobs' `bytes` from the model's token table.
    pub fn with_tokens(mut self, tokens: Option<Arc<TokenTable>>) -> Self {
        self.tokens = tokens;
        self
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// Logprobs of `tokens` in this endpoint's shape (advancing the text offset).
    fn logprobs_of(&mut self, tokens: &[TokenFrame]) -> Value {
        match self.logprobs {
            LogprobsFormat::None => Value::Null,
            LogprobsFormat::Chat => {
                // A token's own bytes from the model's table (a token holding part of a
                // character reports exactly that part), its string those read lossily, as
                // OpenAI's; without a table, the text the plugin sent.
                let table = self.tokens.as_deref();
                let entry = |id: u32, text: &str, lp: f32| {
                    let bytes = table.and_then(|t| t.get(id)).unwrap_or(text.as_bytes());
                    json!({"token": String::from_utf8_lossy(bytes), "logprob": lp, "bytes": bytes})
                };
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let mut e = entry(t.token_id, &t.text, t.logprob.unwrap_or(0.0));
                        e["top_logprobs"] = t
                            .top_logprobs
                            .iter()
                            .map(|(id, text, lp)| entry(*id, text, *lp))
                            .collect();
                        e
                    })
                    .collect();
                json!({"content": content, "refusal": null})
            }
            LogprobsFormat::Legacy => {
                let mut offsets = Vec::with_capacity(tokens.len());
                for t in tokens {
                    offsets.push(self.offset);
                    self.offset += t.text.chars().count();
                }
                // Each token's own string (as its alternatives are keyed, so a client can tell
                // whether it was the likeliest); the offsets follow the text as released.
                let table = self.tokens.as_deref();
                json!({
                    "tokens": tokens.iter().map(|t| own_text(t, table)).collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                    // The first echoed prompt token has no score: `null`, as OpenAI's.
                    "top_logprobs": tokens.iter().map(|t| match t.logprob {
                        None => Value::Null,
                        Some(_) => Value::Object(legacy_top(t, self.tokens.as_deref())),
                    }).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
        }
    }

    /// The whole (non-streamed) response of a request's `choices` and their `usage`. A chat's
    /// `prompt_logprobs` are the response's, as vLLM's (taken from the choices, which carry
    /// them until here).
    pub fn whole(&self, mut choices: Vec<Value>, usage: Usage) -> Value {
        let prompt = match self.endpoint {
            Endpoint::Chat => {
                let each: Vec<Value> = (choices.iter_mut())
                    .filter_map(|c| c.as_object_mut()?.remove("prompt_logprobs"))
                    .collect();
                each.into_iter().next()
            }
            Endpoint::Completions => None,
        };
        let mut body = self.envelope(false, Value::Array(choices));
        if let Some(prompt) = prompt {
            body["prompt_logprobs"] = prompt;
        }
        body["usage"] = usage_json(usage);
        body
    }

    /// This choice of a whole (non-streamed) response: `content` is the text with any
    /// `reasoning` and tool `calls` taken out.
    pub fn choice(
        &mut self,
        tokens: &[TokenFrame],
        reasoning: Option<&str>,
        content: &str,
        calls: &[Call],
        outcome: &InferOutcome,
    ) -> Value {
        let index = self.index;
        let table = self.tokens.clone();
        let echoed = (self.shown.echo_top)
            .filter(|_| self.echo().is_some() && self.logprobs == LogprobsFormat::Legacy)
            .and_then(|k| super::echo::prompt_frames(outcome, table.as_deref(), k as usize));
        let logprobs = match echoed {
            Some(mut frames) => {
                frames.extend_from_slice(tokens);
                self.logprobs_of(&frames)
            }
            None => self.logprobs_of(tokens),
        };
        let reason = finish(outcome.finish_reason, !calls.is_empty());
        let mut choice = self.choice_body(index, logprobs, reason, reasoning, content, calls);
        choice["stop_reason"] = stop_reason(outcome);
        if let Some(k) = self.shown.logprobs {
            choice["prompt_logprobs"] =
                super::echo::vllm_prompt_logprobs(outcome, table.as_deref(), k as usize);
        }
        choice
    }

    fn choice_body(
        &self,
        index: usize,
        logprobs: Value,
        reason: &str,
        reasoning: Option<&str>,
        content: &str,
        calls: &[Call],
    ) -> Value {
        match self.endpoint {
            Endpoint::Chat => {
                // `refusal` is required (nullable) in OpenAI's message schema; PIO never refuses.
                let mut message = json!({"role": "assistant", "content": content, "refusal": null});
                if let Some(reasoning) = reasoning {
                    message["reasoning_content"] = json!(reasoning);
                }
                // No answer beside calls or reasoning is `null`, as vLLM writes it (and OpenAI,
                // for calls).
                let other = !calls.is_empty() || reasoning.is_some_and(|r| !r.is_empty());
                if content.is_empty() && other {
                    message["content"] = Value::Null;
                }
                if !calls.is_empty() {
                    message["tool_calls"] = calls.iter().map(Call::to_json).collect();
                }
                json!({"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason})
            }
            Endpoint::Completions => json!({
                "index": index,
                "text": format!("{}{content}", self.echo().unwrap_or_default()),
                "logprobs": logprobs,
                "finish_reason": reason,
            }),
        }
    }

    fn chunk(
        &self,
        delta: Value,
        logprobs: Value,
        finish_reason: Option<&str>,
        include_usage: bool,
    ) -> Value {
        let index = self.index;
        let choice = match self.endpoint {
            Endpoint::Chat => {
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})
            }
            Endpoint::Completions => json!({
                "index": index,
                "text": delta.get("content").cloned().unwrap_or(json!("")),
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }),
        };
        let mut body = self.envelope(true, json!([choice]));
        if include_usage {
            body["usage"] = Value::Null;
        }
        body
    }

    /// The stream's first chunk (chat: the assistant role; completions: the echoed prompt, with
    /// its scores when they were scored apart), if it has one.
    pub fn opening_chunk(&mut self, include_usage: bool) -> Option<Value> {
        let delta = match (self.endpoint, self.echo()) {
            (Endpoint::Chat, _) => json!({"role": "assistant", "content": ""}),
            (Endpoint::Completions, Some(echo)) => json!({"content": echo}),
            (Endpoint::Completions, None) => return None,
        };
        let scored = (self.shown.echo_top)
            .zip(self.scores_apart.get(self.index / self.per_prompt))
            .and_then(|(k, outcome)| {
                super::echo::prompt_frames(outcome, self.tokens.as_deref(), k as usize)
            });
        let logprobs = match scored {
            Some(frames) => self.logprobs_of(&frames),
            None => Value::Null,
        };
        Some(self.chunk(delta, logprobs, None, include_usage))
    }

    /// A chunk carrying one token, whose text released now is `reasoning` and `content` (less
    /// than the token's own when a marker or a tool call is being held back).
    pub fn token_chunk(
        &mut self,
        token: &TokenFrame,
        reasoning: &str,
        content: &str,
        include_usage: bool,
    ) -> Value {
        let logprobs = self.logprobs_of(std::slice::from_ref(token));
        let mut delta = json!({});
        if !reasoning.is_empty() {
            delta["reasoning_content"] = json!(reasoning);
        }
        if !content.is_empty() || reasoning.is_empty() {
            delta["content"] = json!(content);
        }
        self.chunk(delta, logprobs, None, include_usage)
    }

    /// A chunk of reasoning released at the end (held back while a marker could be forming).
    pub fn reasoning_chunk(&self, text: &str, include_usage: bool) -> Value {
        self.chunk(
            json!({"reasoning_content": text}),
            Value::Null,
            None,
            include_usage,
        )
    }

    /// A chunk of text released at the end (a malformed call returned as text).
    pub fn content_chunk(&self, text: &str, include_usage: bool) -> Value {
        self.chunk(json!({"content": text}), Value::Null, None, include_usage)
    }

    /// A chunk carrying the tool calls.
    pub fn tool_calls_chunk(&self, calls: &[Call], include_usage: bool) -> Value {
        let calls: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(i, c)| c.to_delta(i))
            .collect();
        self.chunk(
            json!({"tool_calls": calls}),
            Value::Null,
            None,
            include_usage,
        )
    }

    /// The chunk with the finish reason.
    pub fn finish_chunk(&self, outcome: &InferOutcome, called: bool, include_usage: bool) -> Value {
        let reason = finish(outcome.finish_reason, called);
        let mut chunk = self.chunk(json!({}), Value::Null, Some(reason), include_usage);
        chunk["choices"][0]["stop_reason"] = stop_reason(outcome);
        chunk
    }

    /// The last chunk when `stream_options.include_usage` is set: no choices, the usage.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        let mut body = self.envelope(true, json!([]));
        body["usage"] = usage_json(usage);
        body
    }
}

/// A token's legacy `top_logprobs`: its alternatives by text, the sampled token always among
/// them (OpenAI: "up to logprobs+1 elements") under its own text as the alternatives are (from
/// `table`; the streamed text may hold a character's earlier bytes, or be left out), and where
/// two alternatives read the same (pieces of one character both read U+FFFD) the likelier one,
/// which comes first.
fn legacy_top(t: &TokenFrame, table: Option<&TokenTable>) -> serde_json::Map<String, Value> {
    let mut top = serde_json::Map::new();
    for (_, text, lp) in &t.top_logprobs {
        top.entry(text.clone()).or_insert(json!(lp));
    }
    let sampled = t.top_logprobs.iter().any(|(id, ..)| *id == t.token_id);
    if let (false, Some(lp)) = (sampled, t.logprob) {
        top.entry(own_text(t, table)).or_insert(json!(lp));
    }
    top
}

/// Token `t`'s own text, from `table` (lossily, as its alternatives read), else as streamed.
fn own_text(t: &TokenFrame, table: Option<&TokenTable>) -> String {
    super::echo::token_text(table, t.token_id).unwrap_or_else(|| t.text.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// vLLM's `stop_reason` on a whole choice and on the finishing chunk: the stop string, the
    /// stop token's id, else `null`.
    #[test]
    fn the_stop_reason_names_the_stop_that_ended_the_output() {
        let reply = Reply::new("m", Endpoint::Completions, LogprobsFormat::Legacy);
        let ended = |stop: Option<StopReason>| InferOutcome {
            finish_reason: FinishReason::Stop,
            stop_reason: stop,
            ..Default::default()
        };
        for (stop, shown) in [
            (
                Some(StopReason::Text("\nObservation:".into())),
                json!("\nObservation:"),
            ),
            (Some(StopReason::Token(151645)), json!(151645)),
            (None, Value::Null),
        ] {
            let outcome = ended(stop);
            let chunk = reply.finish_chunk(&outcome, false, false);
            assert_eq!(chunk["choices"][0]["stop_reason"], shown);
            let mut whole = reply.clone();
            let choice = whole.choice(&[], None, "", &[], &outcome);
            assert_eq!(choice["stop_reason"], shown, "{choice}");
            assert!(choice.as_object().unwrap().contains_key("stop_reason"));
        }
    }

    /// A plugin's counts near the type's end neither panic nor wrap.
    #[test]
    fn usage_counts_from_a_plugin_do_not_overflow() {
        let big = Usage {
            prompt_tokens: u32::MAX,
            completion_tokens: 1,
            ..Default::default()
        };
        assert_eq!(
            usage_json(big)["total_tokens"],
            json!(u64::from(u32::MAX) + 1)
        );
        let merged = merged_usage([(true, big), (true, big)]);
        assert_eq!(
            (merged.prompt_tokens, merged.completion_tokens),
            (u32::MAX, 2)
        );
    }

    /// `tool_calls` only where the message carries calls; cut short, `length` either way.
    #[test]
    fn the_finish_reason_says_tool_calls_only_with_calls() {
        assert_eq!(finish(FinishReason::ToolCalls, false), "stop");
        assert_eq!(finish(FinishReason::ToolCalls, true), "tool_calls");
        assert_eq!(finish(FinishReason::Stop, true), "tool_calls");
        assert_eq!(finish(FinishReason::Length, true), "length");
        assert_eq!(finish(FinishReason::Cancelled, false), "stop");
    }

    /// A legacy entry's `tokens` are each token's own string (a special token left out of the
    /// text, a byte released with the next token), as its alternatives are keyed.
    #[test]
    fn legacy_tokens_are_each_tokens_own() {
        let table = pio_plugin_api::wire::TokenBytes::encode([
            b"<s>".to_vec(),
            vec![0xC3],
            vec![0xA9, b'x'],
        ])
        .table()
        .unwrap();
        let mut reply = Reply::new("m", Endpoint::Completions, LogprobsFormat::Legacy)
            .with_tokens(Some(Arc::new(table)));
        let frame = |id: u32, text: &str| TokenFrame {
            token_id: id,
            text: text.into(),
            logprob: Some(-1.0),
            top_logprobs: vec![(id, String::new(), -1.0)],
        };
        let lp = reply.logprobs_of(&[frame(0, ""), frame(1, ""), frame(2, "éx")]);
        assert_eq!(lp["tokens"], json!(["<s>", "\u{FFFD}", "\u{FFFD}x"]));
        assert_eq!(lp["text_offset"], json!([0, 0, 0]), "the text's offsets");
    }

    /// A chat message with no answer beside its reasoning or calls has `content: null`, as
    /// vLLM writes it; an empty answer alone stays "".
    #[test]
    fn an_empty_answer_beside_reasoning_or_calls_is_null() {
        let reply = Reply::new("m", Endpoint::Chat, LogprobsFormat::None);
        let body = |reasoning: Option<&str>| {
            reply.choice_body(0, Value::Null, "length", reasoning, "", &[])["message"]["content"]
                .clone()
        };
        assert_eq!(body(Some("thinking")), Value::Null);
        assert_eq!(body(None), json!(""));
        assert_eq!(body(Some("")), json!(""));
    }

    /// The sampled token is among a legacy entry's alternatives even when it was not among the
    /// likeliest, and two alternatives reading the same keep the likelier's logprob.
    #[test]
    fn legacy_top_logprobs_hold_the_sampled_token() {
        let t = TokenFrame {
            token_id: 9,
            text: "x".into(),
            logprob: Some(-4.0),
            top_logprobs: vec![(1, "\u{FFFD}".into(), -2.5), (2, "\u{FFFD}".into(), -2.7)],
        };
        let top = legacy_top(&t, None);
        assert_eq!(top.len(), 2, "{top:?}");
        assert_eq!(top["\u{FFFD}"], json!(-2.5));
        assert_eq!(top["x"], json!(-4.0));
        let among = TokenFrame {
            token_id: 1,
            ..t.clone()
        };
        assert_eq!(
            legacy_top(&among, None).len(),
            1,
            "already there: not twice"
        );
        let table = pio_plugin_api::wire::TokenBytes::encode((0..10).map(|id| format!("t{id}")))
            .table()
            .unwrap();
        let held = TokenFrame {
            text: String::new(),
            ..t.clone()
        };
        let top = legacy_top(&held, Some(&table));
        assert_eq!(
            top["t9"],
            json!(-4.0),
            "its own text, not the streamed one: {top:?}"
        );
    }
}
