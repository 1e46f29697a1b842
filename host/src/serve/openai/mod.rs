//! OpenAI request bodies: parsed with the failing field named, checked against what the model
//! can do and the server's limits, and turned into the plugin's [`InferRequest`].

use pio_plugin_api::wire::{InferRequest, Prompt};
use pio_plugin_api::Capabilities;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::ApiError;
use super::structure::{self, Structure};

mod endpoints;
mod limits;
mod sampling;
mod shown;

use endpoints::{chat, completion, ChatFields};
pub use limits::{default_limit, Limits, COMPLETIONS_MAX_TOKENS};
use limits::{min_within_max, token_limit};
use sampling::sampling;
pub use sampling::MAX_N;
use shown::shown;
pub use shown::PromptShown;

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
}

impl Endpoint {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Completions => "completions",
        }
    }

    /// The request field holding the prompt.
    pub fn prompt_field(self) -> &'static str {
        match self {
            Self::Chat => "messages",
            Self::Completions => "prompt",
        }
    }
}

/// A seed as clients send it, signed or not (vLLM takes -2^63 to 2^64 - 1): its 64 bits, which
/// are what reproducibility needs.
fn seed_bits<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    n.as_u64()
        .or_else(|| n.as_i64().map(|s| s as u64))
        .map(Some)
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "must be a whole number from -2^63 to 2^64 - 1, found {n}"
            ))
        })
}

/// Fields both endpoints share. Unknown fields are ignored, as OpenAI's own server does with
/// fields it does not use.
#[derive(Debug, Deserialize)]
struct Common {
    model: String,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    #[serde(default, deserialize_with = "seed_bits")]
    seed: Option<u64>,
    stop: Option<Stop>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    n: Option<i64>,
    logit_bias: Option<Map<String, Value>>,
    /// vLLM's: tokens before the end of sequence may come.
    min_tokens: Option<u32>,
    /// vLLM's: generate to `max_tokens` whatever the model says.
    ignore_eos: Option<bool>,
    /// vLLM's: the stop string found ends the output.
    include_stop_str_in_output: Option<bool>,
    /// vLLM's: special tokens are left out of the text (default true).
    skip_special_tokens: Option<bool>,
    /// vLLM's: the output ends after any of these tokens.
    stop_token_ids: Option<Vec<u32>>,
    /// vLLM's: the prompt's tokens scored, this many alternatives each.
    prompt_logprobs: Option<Value>,
    /// vLLM's, not supported: refused rather than ignored, as each changes the answer.
    use_beam_search: Option<bool>,
    best_of: Option<u32>,
    chat_template: Option<Value>,
    mm_processor_kwargs: Option<Value>,
    return_tokens_as_token_ids: Option<bool>,
    allowed_token_ids: Option<Value>,
    bad_words: Option<Value>,
    truncate_prompt_tokens: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
    continuous_usage_stats: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// How logprobs are to be reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogprobsFormat {
    /// Not asked for.
    None,
    /// Chat: `choices[].logprobs.content[]`.
    Chat,
    /// Completions: `choices[].logprobs.{tokens, token_logprobs, top_logprobs, text_offset}`.
    Legacy,
}

/// A checked request.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The model asked for.
    pub model: String,
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// Server-sent events instead of one JSON body.
    pub stream: bool,
    /// A last stream chunk carrying `usage`.
    pub include_usage: bool,
    /// How to report logprobs.
    pub logprobs: LogprobsFormat,
    /// What the plugin gets (its `constraint` is set from `structure` once the model's
    /// markup is known: [`structure::constraint`]).
    pub request: InferRequest,
    /// The output structure asked for.
    pub structure: Option<Structure>,
    /// At most one tool call is returned (`parallel_tool_calls: false`), as vLLM and OpenAI do
    /// whatever the model wrote.
    pub single_call: bool,
    /// Tool calls in the output are taken out as `tool_calls` (not with `tool_choice: "none"`,
    /// where the tools are still shown to the model, as vLLM does, and the output is all text).
    pub calls_parsed: bool,
    /// The model's special tokens are left out of the text (vLLM's `skip_special_tokens`,
    /// default true).
    pub skip_special_tokens: bool,
    /// The client named a token limit (`max_tokens` or `max_completion_tokens`).
    pub max_tokens_asked: bool,
    /// Choices to generate (`n`), each its own sequence in the batch.
    pub n: usize,
    /// What of the prompt the answer shows.
    pub shown: PromptShown,
    /// A completion's prompts after the first (`request.prompt`), each run as `n` choices of its
    /// own, numbered after the previous prompt's (vLLM's and OpenAI's order).
    pub other_prompts: Vec<Prompt>,
}

impl Parsed {
    /// What a choice's answer shows of `tokens`, the tokens it generated: none where only the
    /// prompt is echoed (`echo` with `max_tokens: 0`).
    pub fn shown_tokens<T>(&self, tokens: &mut Vec<T>) {
        if self.shown.echo_only {
            tokens.clear();
        }
    }

    /// The plugin request of choice `index`: a seeded request's choices take successive seeds,
    /// so they differ as vLLM's do and each is reproducible.
    pub fn choice(&self, index: usize) -> InferRequest {
        let mut request = self.request.clone();
        if let Some(other) = (index / self.n).checked_sub(1) {
            request.prompt = self.other_prompts[other].clone();
        }
        request.seed = (request.seed).map(|s| s.wrapping_add((index % self.n) as u64));
        // A prompt is scored once, by its first choice (the others show its scores), so the
        // others can take its blocks from the prefix cache.
        if !self.counts_prompt(index) {
            request.prompt_logprobs = None;
        }
        request
    }

    /// The prompts (a completion may send several).
    pub fn prompts(&self) -> impl Iterator<Item = &Prompt> {
        std::iter::once(&self.request.prompt).chain(&self.other_prompts)
    }

    /// The choices to run: `n` for each prompt.
    pub fn choices(&self) -> usize {
        self.n * (1 + self.other_prompts.len())
    }

    /// Whether choice `index` is the first of its prompt (whose usage counts the prompt).
    pub fn counts_prompt(&self, index: usize) -> bool {
        index.is_multiple_of(self.n)
    }
}

/// `body` read as `T`; a field that does not fit is a 400 naming its path.
pub(super) fn field<T: DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        // A field missing from the body is named by serde at the root (`.`): name the field.
        let missing = (inner.strip_prefix("missing field `"))
            .and_then(|rest| rest.split('`').next())
            .filter(|_| path == ".");
        match missing {
            Some(name) => ApiError::bad_field(name, format!("`{name}` is required")),
            None => ApiError::bad_field(path.clone(), format!("`{path}`: {}", plain(&inner))),
        }
    })
}

/// serde's message in the API's words: JSON types, not Rust's (`u32`, `untagged enum Stop`).
fn plain(inner: &str) -> String {
    const WORDS: [(&str, &str); 8] = [
        (
            "data did not match any variant of untagged enum Stop",
            "expected a string or a list of strings",
        ),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        ),
        ("expected u64", "expected a whole number from 0 to 2^64 - 1"),
        ("expected i64", "expected a whole number"),
        ("expected usize", "expected a whole number of 0 or more"),
        ("expected f32", "expected a number"),
        ("expected f64", "expected a number"),
        ("expected a sequence", "expected a list"),
    ];
    WORDS.iter().fold(inner.to_string(), |text, (rust, json)| {
        text.replace(rust, json)
    })
}

/// Parses the JSON body (syntax errors name line and column).
pub fn body_json(bytes: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    Ok(value)
}

/// The `model` field alone (to look the model up before the rest is checked); left out (or
/// `null`, as lm-eval sends it when given no name, and vLLM takes it), the only model of those
/// `served` lists (asked only then), which is then written into `body` for the parse.
pub fn model_of(
    body: &mut Value,
    served: impl FnOnce() -> Vec<String>,
) -> Result<String, ApiError> {
    match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => Ok(m.clone()),
        Some(Value::Null) | None => {
            let model = sole_model(&served())?;
            if let Some(fields) = body.as_object_mut() {
                fields.insert("model".into(), model.clone().into());
            }
            Ok(model)
        }
        Some(_) => Err(ApiError::bad_field(
            "model",
            "`model` must be a non-empty string",
        )),
    }
}

/// The model a request that names none means: the only one `served`, as vLLM and llama.cpp
/// (one model per server) take it; with several, naming one is required.
pub fn sole_model(served: &[String]) -> Result<String, ApiError> {
    match served {
        [only] => Ok(only.clone()),
        [] => Err(ApiError::bad_field(
            "model",
            "`model` is required, and no model is served here: put a plugin's manifest in the plugins folder",
        )),
        several => Err(ApiError::bad_field(
            "model",
            format!(
                "`model` is required: this server serves {} models ({}); GET /v1/models lists them",
                several.len(),
                several.join(", ")
            ),
        )),
    }
}

fn unsupported(name: &str, why: &str) -> ApiError {
    ApiError::bad_field(name, format!("`{name}` {why}"))
}

/// A plugin that declares no chat gets no messages (it would take them for a prompt it cannot
/// read), and one that declares no text completion no raw prompt.
fn endpoint_allowed(
    endpoint: Endpoint,
    capabilities: Capabilities,
    model: &str,
) -> Result<(), ApiError> {
    let (needs, field, instead) = match endpoint {
        Endpoint::Chat => (
            Capabilities::CHAT,
            "messages",
            "send a `prompt` to /v1/completions",
        ),
        Endpoint::Completions => (
            Capabilities::TEXT,
            "prompt",
            "send `messages` to /v1/chat/completions",
        ),
    };
    if capabilities.contains(needs) {
        return Ok(());
    }
    let kind = if endpoint == Endpoint::Chat {
        "chat"
    } else {
        "text completion"
    };
    Err(unsupported(
        field,
        &format!(
            "cannot be sent to model `{model}`, which declares no {kind} capability; {instead}"
        ),
    ))
}

/// Checks `body` for `endpoint` and builds the plugin request. `capabilities` are the model's.
pub fn parse(
    body: &Value,
    endpoint: Endpoint,
    capabilities: Capabilities,
    limits: &Limits,
) -> Result<Parsed, ApiError> {
    let c: Common = field(body)?;
    endpoint_allowed(endpoint, capabilities, &c.model)?;
    let mut request = sampling(&c)?;
    let mut max_tokens = c.max_tokens;
    let mut max_field = "max_tokens";
    let mut structure = structure::requested(body)?;
    let mut calls_parsed = false;
    let mut echo = false;
    let mut other_prompts = Vec::new();
    let logprobs = match endpoint {
        Endpoint::Chat => {
            let f: ChatFields = field(body)?;
            if f.max_completion_tokens.is_some() {
                max_field = "max_completion_tokens";
            }
            max_tokens = f.max_completion_tokens.or(max_tokens);
            let (logprobs, forced, parsed) = chat(f, &mut request, &c.model, capabilities, limits)?;
            calls_parsed = parsed;
            if let Some(forced) = forced {
                if let Some(Structure::Grammar { field, .. }) = &structure {
                    return Err(unsupported(
                        "tool_choice",
                        &format!("cannot force a tool call and `{field}` at once; drop one"),
                    ));
                }
                structure = Some(forced);
            }
            logprobs
        }
        Endpoint::Completions => {
            let (logprobs, asked) = completion(field(body)?, &mut request, &mut other_prompts)?;
            echo = asked;
            logprobs
        }
    };
    let mut shown = shown(&c, echo, &mut request)?;
    if shown.echo && max_tokens == Some(0) {
        if let Some(min) = request.min_tokens.filter(|&m| m > 0) {
            return Err(ApiError::bad_field(
                "min_tokens",
                format!("`min_tokens` ({min}) must not exceed `max_tokens` (0)"),
            ));
        }
        shown.echo_only = true;
        max_tokens = Some(1);
    }
    capable(
        &c.model,
        capabilities,
        &request,
        structure.as_ref(),
        logprobs,
        shown,
        &other_prompts,
    )?;
    let default = (endpoint == Endpoint::Completions).then_some(COMPLETIONS_MAX_TOKENS);
    request.max_tokens =
        token_limit(max_tokens, default, limits).map_err(|e| e.for_field(max_field))?;
    // Against a limit the client named; a default is only known once the model is
    // (`default_limit`).
    if max_tokens.is_some() {
        min_within_max(&request, true)?;
    }
    let (stream, include_usage) = streaming(&c)?;
    Ok(Parsed {
        model: c.model,
        endpoint,
        stream,
        include_usage,
        logprobs,
        request,
        structure,
        single_call: endpoint == Endpoint::Chat
            && body.get("parallel_tool_calls") == Some(&Value::Bool(false)),
        calls_parsed,
        skip_special_tokens: c.skip_special_tokens.unwrap_or(true),
        max_tokens_asked: max_tokens.is_some(),
        n: c.n.map_or(1, |n| usize::try_from(n).unwrap_or(1)),
        shown,
        other_prompts,
    })
}

/// What the request asks of the model that it must declare: constrained output, a logit bias,
/// stop ids, logprobs; and what structured output cannot go with.
fn capable(
    model: &str,
    capabilities: Capabilities,
    request: &InferRequest,
    structure: Option<&Structure>,
    logprobs: LogprobsFormat,
    shown: PromptShown,
    other_prompts: &[Prompt],
) -> Result<(), ApiError> {
    if let Some(s) = structure {
        if !capabilities.contains(Capabilities::STRUCTURED_OUTPUT) {
            let field = match s {
                Structure::Grammar { field, .. } => field,
                Structure::ToolCalls { .. } => "tool_choice",
            };
            return Err(unsupported(
                field,
                &format!(
                    "needs constrained output, which model `{}` does not declare",
                    model
                ),
            ));
        }
    }
    let scores_field = if shown.logprobs.is_some() {
        "prompt_logprobs"
    } else {
        "echo"
    };
    // (field, asked, capability, its name, the plugin-api that brought it)
    let needs = [
        (
            "logit_bias",
            !request.logit_bias.is_empty(),
            Capabilities::LOGIT_BIAS,
            "logit_bias",
            "1.9",
        ),
        (
            "stop_token_ids",
            !request.stop_token_ids.is_empty(),
            Capabilities::STOP_TOKEN_IDS,
            "stop_token_ids",
            "1.9",
        ),
        (
            scores_field,
            request.prompt_logprobs.is_some() || shown.scored_apart,
            Capabilities::PROMPT_LOGPROBS,
            "prompt_logprobs",
            "1.10",
        ),
        (
            "prompt",
            (std::iter::once(&request.prompt).chain(other_prompts))
                .any(|p| matches!(p, Prompt::Tokens(_))),
            Capabilities::TOKEN_PROMPTS,
            "token_prompts",
            "1.10",
        ),
    ];
    if let Some((field, _, _, name, version)) = needs
        .iter()
        .find(|(_, asked, cap, ..)| *asked && !capabilities.contains(*cap))
    {
        return Err(unsupported(
            field,
            &format!(
                "is not supported by model `{model}` (its plugin does not declare plugin-api {version}'s `{name}` capability)"
            ),
        ));
    }
    if logprobs != LogprobsFormat::None && !capabilities.contains(Capabilities::LOGPROBS) {
        return Err(unsupported(
            "logprobs",
            &format!("are not supported by model `{}`", model),
        ));
    }
    if structure.is_some() {
        let field = if request.ignore_eos {
            Some("ignore_eos")
        } else {
            request.min_tokens.map(|_| "min_tokens")
        };
        if let Some(field) = field {
            return Err(unsupported(
                field,
                "cannot be used with structured output, which ends where its grammar does; drop one",
            ));
        }
    }
    Ok(())
}

/// Refuses (400, naming the field) what `request` asks that a plugin built against plugin-api
/// `api` (older than 1.6) would drop without a word: its `InferRequest` has no such field, so
/// the client would get an answer that ignores it. Capabilities cover the later additions.
pub fn older_plugin(request: &InferRequest, model: &str, api: &str) -> Result<(), ApiError> {
    let mut parts = api.split('.').map(|p| p.parse::<u32>().ok());
    let (Some(Some(major)), Some(Some(minor))) = (parts.next(), parts.next()) else {
        return Ok(());
    };
    if (major, minor) >= (1, 6) {
        return Ok(());
    }
    let asked = [
        ("min_tokens", request.min_tokens.is_some_and(|m| m > 0)),
        ("ignore_eos", request.ignore_eos),
        (
            "include_stop_str_in_output",
            request.include_stop_str_in_output,
        ),
        (
            "add_generation_prompt",
            request.add_generation_prompt == Some(false),
        ),
        ("continue_final_message", request.continue_final_message),
    ];
    match asked.iter().find(|(_, asked)| *asked) {
        Some((field, _)) => Err(unsupported(
            field,
            &format!("is not supported by model `{model}`: its plugin was built against plugin-api {api}, and the field came with 1.6 (an older plugin would ignore it)"),
        )),
        None => Ok(()),
    }
}

/// `stream`, and `stream_options.include_usage`, which only a stream may carry.
fn streaming(c: &Common) -> Result<(bool, bool), ApiError> {
    let stream = c.stream.unwrap_or(false);
    // An empty object asks nothing (vLLM takes it; some client libraries always send one).
    let asked = (c.stream_options.as_ref())
        .is_some_and(|o| o.include_usage.is_some() || o.continuous_usage_stats.is_some());
    if asked && !stream {
        return Err(ApiError::bad_field(
            "stream_options",
            "`stream_options` applies to streamed answers only: set `stream: true` or drop it",
        ));
    }
    let usage = c.stream_options.as_ref().and_then(|o| o.include_usage);
    Ok((stream, usage.unwrap_or(false)))
}

#[cfg(test)]
mod tests;
