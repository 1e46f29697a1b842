//! Each endpoint's own fields: a chat's messages, tools, tool choice and template variables; a
//! completion's prompt and legacy logprobs.

use pio_plugin_api::wire::{InferRequest, Prompt};
use pio_plugin_api::Capabilities;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{unsupported, ApiError, Limits, LogprobsFormat};
use crate::serve::structure::{forced_calls, tool_choice, Structure, ToolChoice};

#[derive(Debug, Deserialize)]
pub(super) struct ChatFields {
    messages: Vec<Value>,
    pub(super) max_completion_tokens: Option<u32>,
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
    /// OpenAI's deprecated forms of `tools` and `tool_choice`: refused, naming what to send.
    functions: Option<Value>,
    function_call: Option<Value>,
    /// vLLM's chat `echo` (the last message, when the assistant's, before the output): refused.
    echo: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub(super) struct CompletionFields {
    prompt: Value,
    logprobs: Option<u32>,
    echo: Option<bool>,
    suffix: Option<String>,
}

/// The chat endpoint's own fields into `request`: messages (checked, images inlined), tools and
/// their choice, template variables; returns how logprobs are reported, and the tool calls
/// `tool_choice` forces.
pub(super) fn chat(
    f: ChatFields,
    request: &mut InferRequest,
    model: &str,
    capabilities: Capabilities,
    limits: &Limits,
) -> Result<(LogprobsFormat, Option<Structure>, bool), ApiError> {
    let has = |cap: Capabilities| capabilities.contains(cap);
    let deprecated = [
        ("functions", &f.functions, "tools"),
        ("function_call", &f.function_call, "tool_choice"),
    ];
    if f.echo == Some(true) {
        return Err(unsupported(
            "echo",
            "is not supported on chats (vLLM's puts the last message, when the assistant's, before the output): the client has that message; with /v1/completions, `echo` repeats a prompt",
        ));
    }
    for (field, given, instead) in deprecated {
        if given.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(unsupported(
                field,
                &format!("is OpenAI's deprecated form of `{instead}`, which this server takes instead: send `{instead}` (each function as `{{\"type\": \"function\", \"function\": {{...}}}}`)"),
            ));
        }
    }
    request.prompt = Prompt::Messages(crate::serve::messages::check(
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

/// The completions endpoint's own fields into `request` (its first prompt; the others into
/// `others`); returns how logprobs are reported and whether the prompt is echoed.
pub(super) fn completion(
    f: CompletionFields,
    request: &mut InferRequest,
    others: &mut Vec<Prompt>,
) -> Result<(LogprobsFormat, bool), ApiError> {
    let mut prompts = completion_prompts(&f.prompt)?.into_iter();
    request.prompt = prompts.next().unwrap_or_default();
    others.extend(prompts);
    if f.suffix.is_some_and(|s| !s.is_empty()) {
        return Err(unsupported("suffix", "is not supported"));
    }
    let logprobs = match f.logprobs {
        None => LogprobsFormat::None,
        Some(k) => {
            request.logprobs = Some(check_top("logprobs", k, 5)?);
            LogprobsFormat::Legacy
        }
    };
    Ok((logprobs, f.echo == Some(true)))
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

/// The prompts: a string, token ids (`[1, 2]`), or a list of strings or of token-id lists
/// (several prompts, each run as its own choices).
fn completion_prompts(prompt: &Value) -> Result<Vec<Prompt>, ApiError> {
    match prompt {
        Value::Array(items) if !items.is_empty() && items.iter().all(|i| !i.is_number()) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(Prompt::Text(s.clone())),
                Value::Array(ids) => token_ids(ids, &format!("prompt[{i}]")),
                _ => Err(ApiError::bad_field(
                    format!("prompt[{i}]"),
                    format!("`prompt[{i}]` must be a string or a list of token ids"),
                )),
            })
            .collect(),
        Value::String(s) => Ok(vec![Prompt::Text(s.clone())]),
        Value::Array(ids) => Ok(vec![token_ids(ids, "prompt")?]),
        _ => Err(ApiError::bad_field(
            "prompt",
            "`prompt` must be a string, a list of token ids, or a list of either (several prompts)",
        )),
    }
}

/// One prompt of token ids, `at` naming it in errors.
fn token_ids(ids: &[Value], at: &str) -> Result<Prompt, ApiError> {
    if ids.is_empty() {
        return Err(ApiError::bad_field(
            at,
            format!("`{at}` must not be empty: give a string or token ids"),
        ));
    }
    ids.iter()
        .enumerate()
        .map(|(i, v)| {
            (v.as_u64().and_then(|t| u32::try_from(t).ok())).ok_or_else(|| {
                ApiError::bad_field(
                    format!("{at}[{i}]"),
                    format!("`{at}[{i}]` must be a token id (a whole number from 0), found {v}"),
                )
            })
        })
        .collect::<Result<Vec<u32>, _>>()
        .map(Prompt::Tokens)
}
