//! The request `pio run` sends: its flags as the API request they amount to, checked by the
//! daemon's own parser.

use std::path::PathBuf;

use anyhow::{bail, Context};
use pio_host::serve::openai::{self, Endpoint, Limits, Parsed};
use pio_host::serve::structure;
use pio_plugin_api::wire::{InferRequest, ModelInfo};
use pio_plugin_api::Capabilities;

use super::RunArgs;

/// A JSON array given inline or as a file (inline JSON of another shape is refused as such,
/// not looked for as a file).
fn json_array(flag: &str, value: &str, what: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let text = if value.trim_start().starts_with(['[', '{']) {
        value.to_string()
    } else {
        std::fs::read_to_string(value)
            .with_context(|| format!("cannot read the {flag} file {value}"))?
    };
    serde_json::from_str(&text).with_context(|| format!("{flag} must be a JSON array of {what}"))
}

/// The request `pio run` sends, built as the API request its flags amount to and checked by
/// the daemon's own parser: the CLI refuses what the API refuses, in the same words. A prompt
/// with no images is a completion (no chat template); messages, or images, make a chat, whose
/// image parts may name any file the user can read.
pub(super) fn request(
    args: &RunArgs,
    capabilities: Capabilities,
    config: &pio_host::config::Config,
    default_max_tokens: Option<u32>,
) -> anyhow::Result<Parsed> {
    use serde_json::json;
    let mut body = json!({
        "model": args.name,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "repetition_penalty": args.repetition_penalty,
        "stop": args.stop,
    });
    let endpoint = match messages(args, &mut body)? {
        Some(messages) => {
            body["messages"] = json!(messages);
            chat_fields(args, &mut body)?;
            Endpoint::Chat
        }
        None => {
            body["logprobs"] = json!(args.logprobs);
            Endpoint::Completions
        }
    };
    structure_fields(args, &mut body)?;
    // Null fields are flags not given.
    if let Some(fields) = body.as_object_mut() {
        fields.retain(|_, v| !v.is_null());
    }
    let limits = Limits {
        max_tokens: config.server.max_tokens_limit,
        image_root: Some(PathBuf::from("/")),
    };
    let mut parsed = openai::parse(&body, endpoint, capabilities, &limits)
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    // Without the flag: the manifest's `[model.generation] max_tokens`, as the daemon sends it;
    // else a prompt typed here runs to the context's end, as llama.cpp's CLI does (the API's 16
    // tokens for a completion are OpenAI's clients' expectation, not a terminal user's). Both
    // held to `server.max_tokens_limit`.
    if args.max_tokens.is_none() {
        let cap = (limits.max_tokens > 0).then_some(limits.max_tokens);
        parsed.request.max_tokens = match default_max_tokens {
            Some(default) => Some(cap.map_or(default, |c| c.min(default))),
            None => cap,
        };
    }
    Ok(parsed)
}

/// A number that JSON can carry: NaN and infinity would reach the request as `null`, the
/// model's default, as if the flag were not given.
pub(super) fn finite(text: &str) -> Result<f32, String> {
    match text.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(_) => Err("must be a finite number".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The chat messages the flags amount to, or `None` for a completion (the prompt then goes into
/// `body`): a prompt with images becomes one user message with image parts.
fn messages(
    args: &RunArgs,
    body: &mut serde_json::Value,
) -> anyhow::Result<Option<Vec<serde_json::Value>>> {
    use serde_json::json;
    Ok(match (&args.prompt, &args.messages) {
        (Some(text), _) if !args.images.is_empty() => {
            let mut content = Vec::new();
            for image in &args.images {
                // Named here, as given: the request's check would speak of an image root
                // the user never set.
                let file = std::fs::canonicalize(image)
                    .with_context(|| format!("--image {}", image.display()))?;
                let url = file.display().to_string();
                content.push(json!({"type": "image_url", "image_url": {"url": url}}));
            }
            content.push(json!({"type": "text", "text": text}));
            Some(vec![json!({"role": "user", "content": content})])
        }
        (Some(text), _) => {
            body["prompt"] = json!(text);
            None
        }
        (None, Some(m)) => Some(json_array(
            "--messages",
            m,
            "{\"role\", \"content\"} objects",
        )?),
        (None, None) => bail!("give --prompt TEXT or --messages FILE_OR_JSON"),
    })
}

/// The flags only a chat takes: logprobs in its shape, tools, template arguments.
fn chat_fields(args: &RunArgs, body: &mut serde_json::Value) -> anyhow::Result<()> {
    use serde_json::json;
    if let Some(k) = args.logprobs {
        body["logprobs"] = json!(true);
        body["top_logprobs"] = json!(k);
    }
    if let Some(t) = &args.tools {
        body["tools"] = json!(json_array(
            "--tools",
            t,
            "{\"type\": \"function\", \"function\": {...}} objects",
        )?);
    }
    if let Some(k) = &args.chat_template_kwargs {
        body["chat_template_kwargs"] = serde_json::from_str(k).context(
            "--chat-template-kwargs must be a JSON object, e.g. '{\"enable_thinking\": false}'",
        )?;
    }
    Ok(())
}

/// The output structure flags: a JSON schema or a grammar, read from their files.
fn structure_fields(args: &RunArgs, body: &mut serde_json::Value) -> anyhow::Result<()> {
    use serde_json::json;
    if let Some(path) = &args.json_schema {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --json-schema {}", path.display()))?;
        let schema: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("--json-schema {}: not JSON", path.display()))?;
        body["response_format"] = json!({"type": "json_schema",
            "json_schema": {"name": "output", "schema": schema, "strict": true}});
    }
    if let Some(path) = &args.grammar {
        body["guided_grammar"] = json!(std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --grammar {}", path.display()))?);
    }
    Ok(())
}

/// The plugin request, with the grammar its output structure takes for the loaded model.
pub(super) fn constrained(parsed: &Parsed, info: &ModelInfo) -> anyhow::Result<InferRequest> {
    let mut request = parsed.request.clone();
    if let Some(s) = &parsed.structure {
        let chat = parsed.endpoint == Endpoint::Chat;
        let c = structure::constraint(s, &request, chat, &parsed.model, info)
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        request.constraint = Some(c);
    }
    Ok(request)
}
