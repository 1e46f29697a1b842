//! Errors as OpenAI clients expect them: `{"error": {"message", "type", "param", "code"}}` with
//! the matching HTTP status, so their retry and error handling works unchanged.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::openai::Parsed;
use crate::fault::Fault;
use crate::protocol::WireError;

/// One failed API call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong and what to do about it.
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// A stable machine-readable code.
    pub code: &'static str,
    /// Seconds after which a retry may succeed (sent as `Retry-After`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code,
            retry_after: None,
        }
    }

    /// 400, naming the field at fault.
    pub fn bad_field(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_value", message)
        }
    }

    /// The same error blamed on `field`, which the client wrote for the field it names (vLLM's
    /// and OpenAI's `max_completion_tokens` for `max_tokens`).
    pub fn for_field(mut self, field: &str) -> Self {
        if let Some(param) = self.param.take() {
            self.message = self
                .message
                .replace(&format!("`{param}`"), &format!("`{field}`"));
            self.param = Some(field.to_string());
        }
        self
    }

    /// 400 with no single field to blame.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_api_key", message)
    }

    /// 403: a known key that does not open this path.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_denied", message)
    }

    /// 404 for a model or plugin nobody here serves.
    pub fn unknown_model(name: &str) -> Self {
        Self {
            param: Some("model".into()),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!("the model `{name}` does not exist here; GET /v1/models lists the models served"),
            )
        }
    }

    /// 404 for a path.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 405, naming the route's methods.
    pub fn method_not_allowed(method: &axum::http::Method, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed on {path}: see the README for the methods each route takes"),
        )
    }

    /// 408: the body did not arrive in time.
    pub fn body_timeout(secs: u64) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request body did not arrive within {secs} s (server.body_timeout_secs)"),
        )
    }

    /// 413.
    pub fn too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("the request body is larger than the server's limit of {limit} bytes (server.max_body_size)"),
        )
    }

    /// 413 or 415 or 400: a body whose content coding cannot be undone within the limit.
    pub fn undecodable(e: &super::encoding::DecodeError) -> Self {
        use super::encoding::DecodeError;
        let (status, code) = match e {
            DecodeError::Unsupported(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_content_encoding",
            ),
            DecodeError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large"),
            DecodeError::Corrupt { .. } => (StatusCode::BAD_REQUEST, "invalid_request"),
        };
        Self::new(status, code, e.to_string())
    }

    /// 429.
    pub fn queue_full(model: &str, depth: usize) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                format!("model `{model}` already has {depth} requests (or choices of them) running or waiting (server.queue_depth); retry later"),
            )
        }
    }

    /// 503: the model cannot take requests now, but may soon.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(2),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "model_unavailable",
                message,
            )
        }
    }

    /// 409: the server's own files are in a state that refuses what was asked.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 500: the plugin failed, with its reason.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "plugin_error", message)
    }

    /// The OpenAI `type` for this status.
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 404 | 405 | 408 | 413 | 415 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            _ => "server_error",
        }
    }

    /// The body: OpenAI's error object.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// How a failure's kind answers over HTTP: the one table from [`Fault`] to status, code and
/// whether a retry may help. Exhaustive, so a new kind cannot be added without deciding its status.
pub fn answer(kind: Fault) -> (StatusCode, &'static str, Option<u64>) {
    use Fault::*;
    match kind {
        InvalidInput | Constraint => (StatusCode::BAD_REQUEST, "invalid_request", None),
        // OpenAI's code, which clients act on (trim the conversation and retry).
        ContextLength => (StatusCode::BAD_REQUEST, "context_length_exceeded", None),
        Unsupported => (StatusCode::BAD_REQUEST, "unsupported", None),
        NotReady | Restarting | Quarantined | Stopped => (
            StatusCode::SERVICE_UNAVAILABLE,
            "model_unavailable",
            Some(2),
        ),
        Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout", None),
        OutOfMemory | OutOfResources => {
            (StatusCode::SERVICE_UNAVAILABLE, "out_of_resources", Some(2))
        }
        InvalidConfig | ModelFiles | Cancelled | Internal | Sandbox | Spawn | Protocol
        | Confine | Load | Construct | Initialize | WorkerDied | Unresponsive | Panicked => {
            (StatusCode::INTERNAL_SERVER_ERROR, "plugin_error", None)
        }
    }
}

impl From<WireError> for ApiError {
    /// A worker's or plugin's failure, with the status its kind deserves.
    fn from(e: WireError) -> Self {
        let (status, code, retry_after) = answer(e.kind);
        Self {
            retry_after,
            ..Self::new(status, code, e.message)
        }
    }
}

impl ApiError {
    /// A plugin's failure of `parsed`: an input past the context names the endpoint's prompt
    /// field as `param`, as OpenAI does, a constraint the field it came from, and an input error
    /// the field its message starts with.
    pub fn of_request(e: WireError, parsed: &Parsed) -> Self {
        let param = match e.kind {
            Fault::ContextLength => Some(parsed.endpoint.prompt_field().to_string()),
            Fault::Constraint => parsed.structure.as_ref().map(|s| s.field().to_string()),
            Fault::InvalidInput => field_named(&e.message).map(str::to_string),
            _ => None,
        };
        let mut e = e;
        if let (Fault::Constraint, Some(field)) = (e.kind, param.as_deref()) {
            e.message = constraint_message(&e.message, field);
        }
        Self {
            param,
            ..Self::from(e)
        }
    }
}

impl ApiError {
    /// [`ApiError::of_request`] for choice `index`: in a request of several prompts, the error
    /// says which prompt it is about (`prompt[p]`), so a client that batched them knows which
    /// to fix.
    pub fn of_choice(e: WireError, parsed: &Parsed, index: usize) -> Self {
        let mut error = Self::of_request(e, parsed);
        if parsed.other_prompts.is_empty() {
            return error;
        }
        // Only an error about the prompt: one about the whole request (a `logit_bias` id, an
        // unsupported field) is every choice's, whichever failed first.
        let Some(rest) = (error.param.as_deref()).and_then(|p| p.strip_prefix("prompt")) else {
            return error;
        };
        let at = format!("prompt[{}]", index / parsed.n.max(1));
        error.param = Some(format!("{at}{rest}"));
        error.message = format!("{at}: {}", error.message);
        error
    }
}

/// The request field an input error names first (`messages[0].content[1]: …`, as the engine
/// writes them), when it is one a client sends.
fn field_named(message: &str) -> Option<&str> {
    const FIELDS: [&str; 5] = [
        "messages",
        "prompt",
        "logit_bias",
        "stop_token_ids",
        "tools",
    ];
    let (path, _) = message.split_once(": ")?;
    let root = path.split(['.', '[']).next()?;
    let plain = path
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.[]".contains(c));
    (plain && FIELDS.contains(&root)).then_some(path)
}

/// A constraint's failure as the client can act on it: a position is only meaningful in a
/// grammar the client wrote (`guided_grammar`); the others (a forced call's, `guided_choice`'s)
/// are made by the host from the client's tools or choices.
fn constraint_message(message: &str, field: &str) -> String {
    if field == "guided_grammar" {
        return message.to_string();
    }
    let (what, rest) = message.split_once(": ").unwrap_or(("", message));
    // `at LINE(COLUMN): ` exactly, not any reason that starts with "at".
    let position = |at: &str| {
        at.strip_prefix("at ")
            .is_some_and(|p| p.replace('(', "").chars().all(|c| c.is_ascii_digit()))
    };
    let rest = match rest.split_once("): ") {
        Some((at, after)) if position(at) => after,
        _ => rest,
    };
    let what = match field {
        "tools" => "a tool's `parameters` cannot be used",
        "guided_choice" => "the choices cannot be used",
        _ => what,
    };
    if what.is_empty() {
        rest.to_string()
    } else {
        format!("{what}: {rest}")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Every server error once, in the request's span: its id (which the client has, in
        // `x-request-id`) finds the line, whichever path failed.
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), "{}", self.message);
        }
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An input error's message names the field a client sent first; other words are no field.
    #[test]
    fn input_errors_name_the_field_their_message_starts_with() {
        for (message, field) in [
            (
                "messages[0].content[1]: the image is empty",
                Some("messages[0].content[1]"),
            ),
            (
                "logit_bias: token 9 is not in the vocabulary (ids 0 to 8)",
                Some("logit_bias"),
            ),
            ("cannot tokenize the prompt: bad", None),
            ("Messages: x", None),
            ("worker: x", None),
        ] {
            assert_eq!(field_named(message), field, "{message}");
        }
    }

    /// Positions are kept only in a grammar the client wrote; a forced call's failure names the
    /// tools' parameters, not a grammar.
    #[test]
    fn a_constraints_failure_speaks_of_what_the_client_wrote() {
        let engine = "the grammar cannot be used: at 3(5): failed to compile JSON schema: bogus";
        assert_eq!(
            constraint_message(engine, "tools"),
            "a tool's `parameters` cannot be used: failed to compile JSON schema: bogus"
        );
        assert_eq!(constraint_message(engine, "guided_grammar"), engine);
        assert_eq!(
            constraint_message("the regex cannot be used: unclosed group", "guided_regex"),
            "the regex cannot be used: unclosed group"
        );
        let reason = "the JSON schema cannot be used: at least one of (a, b): none given";
        assert_eq!(constraint_message(reason, "response_format"), reason);
    }
}
