//! The sampling fields both endpoints share — ranges, stops, seeds, `n`, `logit_bias`,
//! `stop_token_ids` — checked and turned into the start of the plugin request; and vLLM's fields
//! that are refused by name.

use pio_plugin_api::wire::InferRequest;
use serde_json::{Map, Value};

use super::{unsupported, ApiError, Common, Stop};
use crate::sampling::Range;

/// `v` held to `range`; out of it, a 400 naming the field.
fn check_range(range: Range, v: Option<f32>) -> Result<(), ApiError> {
    match range.problem(v) {
        Some(problem) => Err(ApiError::bad_field(range.name, problem)),
        None => Ok(()),
    }
}

/// The most choices a request may ask for (OpenAI's bound).
pub const MAX_N: u32 = 128;

/// The most `stop` strings a request may give.
const MAX_STOPS: usize = 64;
/// The longest `stop` string, in bytes.
const MAX_STOP_BYTES: usize = 1024;

/// The sampling fields both endpoints share, checked, as the start of the plugin request.
pub(super) fn sampling(c: &Common) -> Result<InferRequest, ApiError> {
    use crate::sampling::*;
    check_range(TEMPERATURE, c.temperature)?;
    check_range(TOP_P, c.top_p)?;
    check_range(MIN_P, c.min_p)?;
    check_range(PRESENCE_PENALTY, c.presence_penalty)?;
    check_range(FREQUENCY_PENALTY, c.frequency_penalty)?;
    check_range(REPETITION_PENALTY, c.repetition_penalty)?;
    if c.n.is_some_and(|n| !(1..=i64::from(MAX_N)).contains(&n)) {
        return Err(ApiError::bad_field(
            "n",
            format!("`n` (the choices to generate) must be from 1 to {MAX_N}"),
        ));
    }
    let logit_bias = logit_bias(c.logit_bias.as_ref())?;
    unsupported_extras(c)?;
    let top_k = match c.top_k {
        None => None,
        // No cut-off, over the model's default one too (vLLM's -1).
        Some(0) | Some(-1) => Some(0),
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
        stop_token_ids: stop_token_ids(c.stop_token_ids.as_deref())?,
        ..InferRequest::default()
    })
}

/// The most `stop_token_ids` a request may give (each generated token is looked up in them).
const MAX_STOP_IDS: usize = 1024;

/// vLLM's `stop_token_ids`, each once, in order.
fn stop_token_ids(ids: Option<&[u32]>) -> Result<Vec<u32>, ApiError> {
    let mut ids = ids.unwrap_or_default().to_vec();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() > MAX_STOP_IDS {
        return Err(ApiError::bad_field(
            "stop_token_ids",
            format!("`stop_token_ids` takes at most {MAX_STOP_IDS} distinct ids"),
        ));
    }
    Ok(ids)
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

/// vLLM's fields this server does not implement, each of which would change the answer: a 400
/// naming it, rather than an answer the client takes for what it asked.
fn unsupported_extras(c: &Common) -> Result<(), ApiError> {
    let given = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
    let set = |v: &Option<Value>| {
        given(v)
            && v.as_ref()
                .and_then(Value::as_object)
                .is_none_or(|o| !o.is_empty())
    };
    let listed = |v: &Option<Value>| {
        given(v)
            && v.as_ref()
                .and_then(Value::as_array)
                .is_none_or(|a| !a.is_empty())
    };
    let continuous = c
        .stream_options
        .as_ref()
        .and_then(|o| o.continuous_usage_stats);
    let refused = [
        (c.best_of.is_some_and(|b| b != 1), "best_of", "must be 1"),
        (c.use_beam_search == Some(true), "use_beam_search", "is not supported; remove it"),
        // vLLM refuses a client's template unless its operator trusts them; here the model's
        // own (the checkpoint's, or the manifest's) is the only one.
        (
            given(&c.chat_template),
            "chat_template",
            "is not supported: the model's own template is used (an operator can set another in the checkpoint's chat_template.jinja or tokenizer_config.json); remove it",
        ),
        (
            set(&c.mm_processor_kwargs),
            "mm_processor_kwargs",
            "is not supported: images are processed as the checkpoint's preprocessor_config.json says; remove it",
        ),
        (
            c.return_tokens_as_token_ids == Some(true),
            "return_tokens_as_token_ids",
            "is not supported: logprobs name tokens by their text (and, in chats, their bytes)",
        ),
        (
            continuous == Some(true),
            "stream_options.continuous_usage_stats",
            "is not supported: `include_usage` gives the usage in a last chunk",
        ),
        (
            listed(&c.allowed_token_ids),
            "allowed_token_ids",
            "is not supported: use `logit_bias` (-100 bans a token) or a guided `choice`/`regex`",
        ),
        (
            listed(&c.bad_words),
            "bad_words",
            "is not supported: use `logit_bias` with -100 for the words' tokens",
        ),
        (
            given(&c.truncate_prompt_tokens),
            "truncate_prompt_tokens",
            "is not supported: the whole prompt is read; shorten it (a prompt past the context is refused with context_length_exceeded)",
        ),
    ];
    match refused.into_iter().find(|(asked, ..)| *asked) {
        Some((_, field, why)) => Err(unsupported(field, why)),
        None => Ok(()),
    }
}
