//! `POST /tokenize` and `POST /detokenize`, as vLLM serves them: a prompt's token ids exactly as
//! a generation request would run them (the chat template applied, each image's tokens counted),
//! so clients can count and budget tokens; token ids back to text; and `GET /tokenizer_info`,
//! the tokenizer's settings. Each takes `model` or, when the server serves one, none.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::{Extension, Json};
use pio_plugin_api::wire::{InferOutcome, TokenTable};
use pio_plugin_api::Capabilities;
use serde::Deserialize;
use serde_json::{json, Value};

use super::deployment::{Deployment, Lease};
use super::error::ApiError;
use super::openai::{self, Endpoint};
use super::{App, RequestId};
use crate::supervisor::Event;

/// The fields of a tokenize request beside the prompt (which is read as the generation
/// endpoints read it).
#[derive(Deserialize)]
struct Extras {
    /// Also each token's text. (vLLM's `add_special_tokens` is accepted and has no effect: the
    /// ids are always those a generation runs.)
    #[serde(default)]
    return_token_strs: Option<bool>,
}

/// `POST /tokenize`: `{model, prompt}` or `{model, messages, tools?, add_generation_prompt?,
/// continue_final_message?, chat_template_kwargs?}` → `{count, max_model_len, tokens}`.
pub async fn tokenize(
    State(app): State<Arc<App>>,
    Extension(id): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let (model, value) = model_and_body(&app, body)?;
    let capabilities = app
        .models
        .capabilities(&model)
        .ok_or_else(|| ApiError::unknown_model(&model))?;
    if !capabilities.contains(Capabilities::TOKENIZE) {
        return Err(ApiError::bad_field("model", format!(
            "model `{model}`'s plugin does not tokenize for clients (it would declare plugin-api 1.9's `tokenize` capability); `usage.prompt_tokens` of a generation counts its prompt"
        )));
    }
    let extras: Extras = openai::field(&value)?;
    if value.get("messages").is_some() && value.get("prompt").is_some() {
        return Err(ApiError::bad_field(
            "prompt",
            "send either `prompt` (raw text) or `messages` (a chat), not both",
        ));
    }
    let endpoint = if value.get("messages").is_some() {
        Endpoint::Chat
    } else {
        Endpoint::Completions
    };
    let limits = openai::Limits::of(&app.models.config().server);
    let mut parsed = openai::parse(&value, endpoint, capabilities, &limits)?;
    // One prompt, one count (vLLM's takes a string): a list's others were dropped unsaid.
    if !parsed.other_prompts.is_empty() {
        return Err(ApiError::bad_field(
            "prompt",
            "`/tokenize` takes one prompt (a string, or one list of token ids); send each prompt apart",
        ));
    }
    parsed.request.request_id = Some(id.0);
    parsed.request.tokenize_only = true;
    let lease = app.models.acquire(&model).await?;
    let mut events = lease
        .deployment()
        .supervised
        .infer(parsed.request.clone())
        .map_err(|e| ApiError::of_request(e.0, &parsed))?;
    let outcome = match events.recv().await {
        Some(Event::Done(outcome)) => *outcome,
        Some(Event::Failed(e)) => return Err(ApiError::of_request(e, &parsed)),
        // A plugin that generates instead of answering is not what it declared; dropping the
        // events stops it.
        Some(Event::Token(_)) => {
            return Err(ApiError::internal(format!(
                "model `{model}`'s plugin generated tokens for a tokenize request, which it declares it answers without generating: a bug of the plugin"
            )))
        }
        None => {
            return Err(ApiError::internal(
                "the worker ended the request without an answer",
            ))
        }
    };
    Ok(Json(answer(&lease, outcome, extras.return_token_strs)?))
}

/// The body of a tokenize answer.
fn answer(lease: &Lease, outcome: InferOutcome, strs: Option<bool>) -> Result<Value, ApiError> {
    let tokens = outcome.prompt_token_ids.ok_or_else(|| {
        ApiError::internal("the plugin answered a tokenize request without token ids")
    })?;
    let deployment = lease.deployment();
    let mut body = json!({
        "count": tokens.len(),
        "max_model_len": deployment.info.context_length,
        "tokens": tokens,
        "token_strs": Value::Null,
    });
    if strs == Some(true) {
        let table = lease.deployment().tokens.as_deref().ok_or_else(no_table)?;
        let strs: Vec<String> = (tokens.iter())
            .map(|&t| String::from_utf8_lossy(table.get(t).unwrap_or_default()).into_owned())
            .collect();
        body["token_strs"] = json!(strs);
    }
    Ok(body)
}

/// Why a model's tokens cannot be spoken of as text.
fn no_table() -> ApiError {
    ApiError::bad_field(
        "model",
        "this model's plugin reports no token table (plugin-api 1.3's `ModelInfo::token_bytes`), so its tokens cannot be turned into text here",
    )
}

#[derive(Deserialize)]
struct Detokenize {
    tokens: Vec<u32>,
}

/// `POST /detokenize`: `{model, tokens}` → `{prompt}`, the tokens' bytes read as UTF-8 (special
/// tokens included, as vLLM's does). A lookup in the host's table: a loaded model's place in its
/// queue is not taken; one not loaded is loaded first.
pub async fn detokenize(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let (model, value) = model_and_body(&app, body)?;
    let request: Detokenize = openai::field(&value)?;
    let table = with_deployment(&app, &model, |d| d.tokens.clone()).await?;
    let table = table.ok_or_else(no_table)?;
    Ok(Json(json!({"prompt": text_of(&table, &request.tokens)?})))
}

/// The query of `GET /tokenizer_info`.
#[derive(Deserialize)]
pub struct InfoQuery {
    /// The model; may be left out when the server serves one.
    model: Option<String>,
}

/// `GET /tokenizer_info[?model=NAME]`: the model's tokenizer settings as vLLM reports them
/// (`tokenizer_config.json`'s fields, `eos_token`, `chat_template`, `tokenizer_class`), which
/// lm-eval's remote tokenizer reads. A loaded model answers without taking a place of its
/// queue; one not loaded is loaded first (as a request for it would be).
pub async fn tokenizer_info(
    State(app): State<Arc<App>>,
    query: Result<Query<InfoQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| {
        ApiError::bad_field(
            "model",
            format!("the query must be `?model=NAME` at most once: {e}"),
        )
    })?;
    let model = match query.model {
        Some(m) if m.is_empty() => {
            return Err(ApiError::bad_field(
                "model",
                "`model` must be a non-empty string",
            ))
        }
        Some(m) => m,
        None => openai::sole_model(&app.models.names())?,
    };
    let info = with_deployment(&app, &model, |d| d.info.tokenizer_info.clone()).await?;
    let info = info.ok_or_else(|| {
        ApiError::bad_field("model", format!(
            "model `{model}`'s plugin reports no tokenizer settings (plugin-api 1.11's `ModelInfo::tokenizer_info`); `/tokenize` still works where it declares `tokenize`, `/detokenize` where it reports its token table (`ModelInfo::token_bytes`)"
        ))
    })?;
    Ok(Json(Value::Object(info)))
}

/// `f` of `model`'s deployment: the loaded one without taking a place of its queue, else one
/// loaded for this.
async fn with_deployment<T>(
    app: &Arc<App>,
    model: &str,
    f: impl FnOnce(&Deployment) -> T,
) -> Result<T, ApiError> {
    if let Some(deployment) = app.models.loaded(model) {
        return Ok(f(&deployment));
    }
    Ok(f(app.models.acquire(model).await?.deployment()))
}

/// The text of `tokens`, or a 400 naming the first that is not in `table`.
pub(super) fn text_of(table: &TokenTable, tokens: &[u32]) -> Result<String, ApiError> {
    let mut bytes = Vec::new();
    for (i, &t) in tokens.iter().enumerate() {
        let Some(b) = table.get(t) else {
            let at = format!("tokens[{i}]");
            return Err(ApiError::bad_field(
                at.clone(),
                format!("`{at}`: {t} is not a token id of this model's vocabulary"),
            ));
        };
        bytes.extend_from_slice(b);
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The body as JSON and the model it names.
fn model_and_body(
    app: &App,
    body: Result<Bytes, BytesRejection>,
) -> Result<(String, Value), ApiError> {
    let mut value = super::inference::body_of(app, body)?;
    Ok((openai::model_of(&mut value, || app.models.names())?, value))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use pio_plugin_api::wire::TokenBytes;

    #[test]
    fn ids_become_their_bytes_and_an_unknown_id_is_named() {
        let table = TokenBytes::encode([
            b"Hel".to_vec(),
            b"lo".to_vec(),
            vec![0xE2, 0x82],
            vec![0xAC],
        ])
        .table()
        .unwrap();
        assert_eq!(text_of(&table, &[0, 1]).unwrap(), "Hello");
        // A character split over two tokens comes back whole.
        assert_eq!(text_of(&table, &[2, 3]).unwrap(), "€");
        let e = text_of(&table, &[0, 9]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tokens[1]"));
        assert!(e.message.contains("9 is not a token id"), "{}", e.message);
    }
}
