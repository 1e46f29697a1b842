//! OpenAI request bodies: parsed with the failing field named, checked against what the model
//! can do and the server's limits, and turned into the plugin's [`InferRequest`].

use pio_plugin_api::wire::{InferRequest, Prompt};
use pio_plugin_api::Capabilities;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::ApiError;
use super::structure::{self, forced_calls, tool_choice, Structure, ToolChoice};
use crate::sampling::Range;

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
    n: Option<u32>,
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
    /// vLLM's, not supported: refused rather than ignored, as each changes the answer.
    prompt_logprobs: Option<Value>,
    use_beam_search: Option<bool>,
    best_of: Option<u32>,
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

#[derive(Debug, Deserialize)]
struct ChatFields {
    messages: Vec<Value>,
    max_completion_tokens: Option<u32>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    chat_template_kwargs: Option<Map<String, Value>>,
    /// vLLM's: whether the template opens the assistant's turn.
    add_generation_prompt: Option<bool>,
    /// vLLM's: the output continues the final (assistant) message.
    continue_final_message: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct CompletionFields {
    prompt: Value,
    logprobs: Option<u32>,
    echo: Option<bool>,
    suffix: Option<String>,
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
}

impl Parsed {
    /// The plugin request of choice `index`: a seeded request's choices take successive seeds,
    /// so they differ as vLLM's do and each is reproducible.
    pub fn choice(&self, index: usize) -> InferRequest {
        let mut request = self.request.clone();
        request.seed = (request.seed).map(|s| s.wrapping_add(index as u64));
        request
    }
}

/// The token limit of a request that names none, once its model is known: the operator's
/// `default` (the manifest's `[model.generation] max_tokens`) when there is one, rather than the
/// API's, still held to the server's limit; `min_tokens` is then checked against it.
pub fn default_limit(
    parsed: &mut Parsed,
    default: Option<u32>,
    limits: &Limits,
) -> Result<(), ApiError> {
    if parsed.max_tokens_asked {
        return Ok(());
    }
    if let Some(default) = default {
        let cap = (limits.max_tokens > 0).then_some(limits.max_tokens);
        parsed.request.max_tokens = Some(cap.map_or(default, |c| c.min(default)));
    }
    min_within_max(&parsed.request, false)
}

/// `min_tokens` no more than the limit; `asked`: the client named the limit.
fn min_within_max(request: &InferRequest, asked: bool) -> Result<(), ApiError> {
    match (request.min_tokens, request.max_tokens) {
        (Some(min), Some(max)) if min > max => {
            let why = if asked {
                ""
            } else {
                ", the default when `max_tokens` is left out"
            };
            Err(ApiError::bad_field(
                "min_tokens",
                format!("`min_tokens` ({min}) must not exceed `max_tokens` ({max}{why})"),
            ))
        }
        _ => Ok(()),
    }
}

/// What the server allows.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// The most tokens a request may ask for (0: no cap).
    pub max_tokens: u32,
    /// Image parts may name files under this directory (canonical, or as written when it
    /// cannot be opened, which each such request is then told).
    pub image_root: Option<std::path::PathBuf>,
}

impl Limits {
    /// The limits `server` sets.
    pub fn of(server: &crate::config::ServerSection) -> Self {
        Self {
            max_tokens: server.max_tokens_limit,
            image_root: (server.image_root.as_ref())
                .map(|r| std::fs::canonicalize(r).unwrap_or_else(|_| r.clone())),
        }
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

/// The `model` field alone (to look the model up before the rest is checked).
pub fn model_of(body: &Value) -> Result<String, ApiError> {
    match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => Ok(m.clone()),
        Some(_) => Err(ApiError::bad_field(
            "model",
            "`model` must be a non-empty string",
        )),
        None => Err(ApiError::bad_field(
            "model",
            "`model` is required; GET /v1/models lists the models served",
        )),
    }
}

/// `v` held to `range`; out of it, a 400 naming the field.
fn check_range(range: Range, v: Option<f32>) -> Result<(), ApiError> {
    match range.problem(v) {
        Some(problem) => Err(ApiError::bad_field(range.name, problem)),
        None => Ok(()),
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
    let has = |cap: Capabilities| capabilities.contains(cap);
    endpoint_allowed(endpoint, capabilities, &c.model)?;
    let mut request = sampling(&c)?;
    let mut max_tokens = c.max_tokens;
    let mut max_field = "max_tokens";
    let mut structure = structure::requested(body)?;
    let mut calls_parsed = false;
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
        Endpoint::Completions => completion(field(body)?, &mut request)?,
    };
    if let Some(s) = &structure {
        if !has(Capabilities::STRUCTURED_OUTPUT) {
            let field = match s {
                Structure::Grammar { field, .. } => field,
                Structure::ToolCalls { .. } => "tool_choice",
            };
            return Err(unsupported(
                field,
                &format!(
                    "needs constrained output, which model `{}` does not declare",
                    c.model
                ),
            ));
        }
    }
    let needs = [
        (
            "logit_bias",
            !request.logit_bias.is_empty(),
            Capabilities::LOGIT_BIAS,
        ),
        (
            "stop_token_ids",
            !request.stop_token_ids.is_empty(),
            Capabilities::STOP_TOKEN_IDS,
        ),
    ];
    if let Some((field, ..)) = needs.iter().find(|(_, asked, cap)| *asked && !has(*cap)) {
        return Err(unsupported(
            field,
            &format!(
                "is not supported by model `{}` (its plugin does not declare plugin-api 1.9's `{field}` capability)",
                c.model
            ),
        ));
    }
    if logprobs != LogprobsFormat::None && !has(Capabilities::LOGPROBS) {
        return Err(unsupported(
            "logprobs",
            &format!("are not supported by model `{}`", c.model),
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
    let default = (endpoint == Endpoint::Completions).then_some(COMPLETIONS_MAX_TOKENS);
    request.max_tokens =
        token_limit(max_tokens, default, limits).map_err(|e| e.for_field(max_field))?;
    // Against a limit the client named; a default is only known once the model is
    // (`default_limit`).
    if max_tokens.is_some() {
        min_within_max(&request, true)?;
    }
    let stream = c.stream.unwrap_or(false);
    if c.stream_options.is_some() && !stream {
        return Err(ApiError::bad_field(
            "stream_options",
            "`stream_options` applies to streamed answers only: set `stream: true` or drop it",
        ));
    }
    Ok(Parsed {
        model: c.model,
        endpoint,
        stream,
        include_usage: c
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        logprobs,
        request,
        structure,
        single_call: endpoint == Endpoint::Chat
            && body.get("parallel_tool_calls") == Some(&Value::Bool(false)),
        calls_parsed,
        skip_special_tokens: c.skip_special_tokens.unwrap_or(true),
        max_tokens_asked: max_tokens.is_some(),
        n: c.n.map_or(1, |n| n as usize),
    })
}

/// The most choices a request may ask for (OpenAI's bound).
pub const MAX_N: u32 = 128;

/// The most `stop` strings a request may give.
const MAX_STOPS: usize = 64;
/// The longest `stop` string, in bytes.
const MAX_STOP_BYTES: usize = 1024;

/// The sampling fields both endpoints share, checked, as the start of the plugin request.
fn sampling(c: &Common) -> Result<InferRequest, ApiError> {
    use crate::sampling::*;
    check_range(TEMPERATURE, c.temperature)?;
    check_range(TOP_P, c.top_p)?;
    check_range(MIN_P, c.min_p)?;
    check_range(PRESENCE_PENALTY, c.presence_penalty)?;
    check_range(FREQUENCY_PENALTY, c.frequency_penalty)?;
    check_range(REPETITION_PENALTY, c.repetition_penalty)?;
    if c.n.is_some_and(|n| n == 0 || n > MAX_N) {
        return Err(ApiError::bad_field(
            "n",
            format!("`n` (the choices to generate) must be from 1 to {MAX_N}"),
        ));
    }
    let logit_bias = logit_bias(c.logit_bias.as_ref())?;
    unsupported_extras(c)?;
    let top_k = match c.top_k {
        None | Some(0) | Some(-1) => None,
        Some(k) if k > 0 => Some(u32::try_from(k).unwrap_or(u32::MAX)),
        Some(k) => {
            return Err(ApiError::bad_field(
                "top_k",
                format!("`top_k` must be positive (or 0 or -1 for none), found {k}"),
            ))
        }
    };
    let stop = match &c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_field(
            "stop",
            "`stop` strings must not be empty",
        ));
    }
    // Every generated token is matched against each (the cost falls on the batch the request
    // shares), so the list is bounded: OpenAI allows 4, vLLM sets no bound.
    if stop.len() > MAX_STOPS || stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::bad_field(
            "stop",
            format!(
                "`stop` takes at most {MAX_STOPS} strings of at most {MAX_STOP_BYTES} bytes each"
            ),
        ));
    }
    Ok(InferRequest {
        temperature: c.temperature,
        top_p: c.top_p,
        top_k,
        min_p: c.min_p,
        repetition_penalty: c.repetition_penalty,
        presence_penalty: c.presence_penalty,
        frequency_penalty: c.frequency_penalty,
        seed: c.seed,
        stop,
        min_tokens: c.min_tokens.filter(|&m| m > 0),
        ignore_eos: c.ignore_eos.unwrap_or(false),
        include_stop_str_in_output: c.include_stop_str_in_output.unwrap_or(false),
        logit_bias,
        stop_token_ids: c.stop_token_ids.clone().unwrap_or_default(),
        ..InferRequest::default()
    })
}

/// OpenAI's `logit_bias`: token ids (as the JSON object's keys) to a bias in [-100, 100].
fn logit_bias(bias: Option<&Map<String, Value>>) -> Result<Vec<(u32, f32)>, ApiError> {
    // Ids in order, each once ("7" and "07" are one token: the last written counts).
    let mut out = std::collections::BTreeMap::new();
    for (key, value) in bias.into_iter().flatten() {
        let at = format!("logit_bias.{key}");
        let id: u32 = key.parse().map_err(|_| {
            ApiError::bad_field(
                "logit_bias",
                format!("`logit_bias` keys are token ids (whole numbers written as strings), found \"{key}\""),
            )
        })?;
        let bias = value
            .as_f64()
            .filter(|b| (-100.0..=100.0).contains(b))
            .ok_or_else(|| {
                ApiError::bad_field(
                    "logit_bias",
                    format!("`{at}` must be a number from -100 to 100, found {value}"),
                )
            })?;
        out.insert(id, bias as f32);
    }
    Ok(out.into_iter().collect())
}

/// What `/v1/completions` generates when `max_tokens` is left out: OpenAI's and vLLM's default
/// for the legacy endpoint (chats run to the end of the context, as theirs do).
pub const COMPLETIONS_MAX_TOKENS: u32 = 16;

/// vLLM's fields this server does not implement, each of which would change the answer: a 400
/// naming it, rather than an answer the client takes for what it asked.
fn unsupported_extras(c: &Common) -> Result<(), ApiError> {
    if c.best_of.is_some_and(|b| b != 1) {
        return Err(unsupported("best_of", "must be 1"));
    }
    if c.prompt_logprobs.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(unsupported(
            "prompt_logprobs",
            "is not supported; remove it",
        ));
    }
    if c.use_beam_search == Some(true) {
        return Err(unsupported(
            "use_beam_search",
            "is not supported; remove it",
        ));
    }
    if c.stream_options
        .as_ref()
        .and_then(|o| o.continuous_usage_stats)
        == Some(true)
    {
        return Err(unsupported(
            "stream_options.continuous_usage_stats",
            "is not supported: `include_usage` gives the usage in a last chunk",
        ));
    }
    Ok(())
}

/// The request's token limit: at least 1, at most `server.max_tokens_limit`; when not asked, the
/// endpoint's `default` (held to that limit), else the limit.
fn token_limit(
    asked: Option<u32>,
    default: Option<u32>,
    limits: &Limits,
) -> Result<Option<u32>, ApiError> {
    if let Some(problem) = crate::sampling::max_tokens_problem(asked) {
        return Err(ApiError::bad_field("max_tokens", problem));
    }
    let cap = (limits.max_tokens > 0).then_some(limits.max_tokens);
    match (asked, cap) {
        (Some(m), Some(cap)) if m > cap => Err(ApiError::bad_field(
            "max_tokens",
            format!(
                "`max_tokens` is {m}; this server allows at most {cap} (server.max_tokens_limit)"
            ),
        )),
        (asked, cap) => {
            let default = default.map(|d| cap.map_or(d, |c| c.min(d)));
            Ok(asked.or(default).or(cap))
        }
    }
}

/// The chat endpoint's own fields into `request`: messages (checked, images inlined), tools and
/// their choice, template variables; returns how logprobs are reported, and the tool calls
/// `tool_choice` forces.
fn chat(
    f: ChatFields,
    request: &mut InferRequest,
    model: &str,
    capabilities: Capabilities,
    limits: &Limits,
) -> Result<(LogprobsFormat, Option<Structure>, bool), ApiError> {
    let has = |cap: Capabilities| capabilities.contains(cap);
    request.prompt = Prompt::Messages(super::messages::check(
        f.messages,
        has(Capabilities::VISION),
        limits.image_root.as_deref(),
    )?);
    // Checked with or without tools: a client's mistake should not pass only because it
    // sent no tools this time.
    let choice = tool_choice(f.tool_choice.as_ref())?;
    // "auto" written with no `tools` at all is a mistake, as vLLM and OpenAI answer it ("none"
    // needs nothing; "required" and a name are refused below, naming what is missing).
    if f.tool_choice.is_some() && choice == ToolChoice::Auto && f.tools.is_none() {
        return Err(ApiError::bad_field(
            "tool_choice",
            "`tool_choice` is only allowed with `tools`: give the tools or drop it",
        ));
    }
    let tools = f.tools.filter(|t| !t.is_empty());
    if let Some(tools) = &tools {
        check_tools(tools)?;
        if choice != ToolChoice::None && !has(Capabilities::TOOLS) {
            return Err(unsupported(
                "tools",
                &format!("are not supported by model `{model}`: it does not declare tool calling"),
            ));
        }
    }
    let forced = forced_calls(&choice, tools.as_deref(), f.parallel_tool_calls)?;
    // With `none` the tools are still shown (vLLM's default: the prompt, and so its cached
    // prefix, stays the same across an agent's turns), to a model that takes them.
    let calls_parsed = choice != ToolChoice::None;
    request.tools = tools.filter(|_| calls_parsed || has(Capabilities::TOOLS));
    request.chat_template_kwargs = f.chat_template_kwargs.unwrap_or_default();
    request.continue_final_message = f.continue_final_message.unwrap_or(false);
    request.add_generation_prompt = f.add_generation_prompt;
    if request.continue_final_message && f.add_generation_prompt == Some(true) {
        return Err(ApiError::bad_field(
            "continue_final_message",
            "`continue_final_message` continues the last message, `add_generation_prompt` opens a new one: set one of them",
        ));
    }
    let logprobs = match (f.logprobs.unwrap_or(false), f.top_logprobs) {
        (false, Some(_)) => Err(ApiError::bad_field(
            "top_logprobs",
            "`top_logprobs` needs `logprobs: true`",
        )),
        (false, None) => Ok(LogprobsFormat::None),
        (true, k) => {
            request.logprobs = Some(check_top("top_logprobs", k.unwrap_or(0), 20)?);
            Ok(LogprobsFormat::Chat)
        }
    }?;
    Ok((logprobs, forced, calls_parsed))
}

/// Each tool is `{"type": "function", "function": {"name": …, "parameters": {…}?}}`, with a
/// name the model can write and distinct from the others'.
fn check_tools(tools: &[Value]) -> Result<(), ApiError> {
    let mut names = std::collections::HashSet::new();
    for (i, tool) in tools.iter().enumerate() {
        let at = format!("tools[{i}]");
        if tool.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::bad_field(
                format!("{at}.type"),
                format!("`{at}` must be an object with `\"type\": \"function\"`"),
            ));
        }
        let function = tool.get("function").filter(|f| f.is_object());
        let name = function.and_then(|f| f.get("name")).and_then(Value::as_str);
        let valid = name.is_some_and(crate::names::is_plain);
        let Some(name) = name.filter(|_| valid) else {
            return Err(ApiError::bad_field(
                format!("{at}.function.name"),
                format!("`{at}.function.name` must be 1 to 64 letters, digits, `_`, `-` or `.`"),
            ));
        };
        if !names.insert(name) {
            return Err(ApiError::bad_field(
                format!("{at}.function.name"),
                format!("`{at}.function.name`: another tool is already named `{name}`"),
            ));
        }
        let parameters = function.and_then(|f| f.get("parameters"));
        if parameters.is_some_and(|p| !p.is_object()) {
            return Err(ApiError::bad_field(
                format!("{at}.function.parameters"),
                format!("`{at}.function.parameters` must be a JSON Schema object"),
            ));
        }
    }
    Ok(())
}

/// The completions endpoint's own fields into `request`; returns how logprobs are reported.
fn completion(f: CompletionFields, request: &mut InferRequest) -> Result<LogprobsFormat, ApiError> {
    request.prompt = Prompt::Text(completion_prompt(&f.prompt)?);
    if f.echo == Some(true) {
        return Err(unsupported(
            "echo",
            "is not supported; the prompt is known to the client",
        ));
    }
    if f.suffix.is_some_and(|s| !s.is_empty()) {
        return Err(unsupported("suffix", "is not supported"));
    }
    Ok(match f.logprobs {
        None => LogprobsFormat::None,
        Some(k) => {
            request.logprobs = Some(check_top("logprobs", k, 5)?);
            LogprobsFormat::Legacy
        }
    })
}

fn check_top(name: &str, k: u32, max: u32) -> Result<u32, ApiError> {
    if k > max {
        return Err(ApiError::bad_field(
            name,
            format!("`{name}` must be at most {max}, found {k}"),
        ));
    }
    Ok(k)
}

fn completion_prompt(prompt: &Value) -> Result<String, ApiError> {
    match prompt {
        Value::String(s) => Ok(s.clone()),
        Value::Array(items) if items.len() == 1 && items[0].is_string() => {
            Ok(items[0].as_str().unwrap_or_default().to_string())
        }
        Value::Array(items) if items.iter().all(Value::is_string) => Err(unsupported(
            "prompt",
            "must be one string: several prompts per request are not supported",
        )),
        Value::Array(items) if items.iter().all(|i| i.is_number() || i.is_array()) => Err(
            unsupported("prompt", "must be a string: token arrays are not supported"),
        ),
        _ => Err(ApiError::bad_field("prompt", "`prompt` must be a string")),
    }
}

#[cfg(test)]
#[path = "openai_tests.rs"]
mod tests;
