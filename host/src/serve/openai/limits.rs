//! How many tokens a request may generate: the client's limit, the endpoint's or the operator's
//! default, the server's cap, and `min_tokens` within them.

use pio_plugin_api::wire::InferRequest;

use super::{ApiError, Parsed};

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
pub(super) fn min_within_max(request: &InferRequest, asked: bool) -> Result<(), ApiError> {
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

/// What `/v1/completions` generates when `max_tokens` is left out: OpenAI's and vLLM's default
/// for the legacy endpoint (chats run to the end of the context, as theirs do).
pub const COMPLETIONS_MAX_TOKENS: u32 = 16;

/// The request's token limit: at least 1, at most `server.max_tokens_limit`; when not asked, the
/// endpoint's `default` (held to that limit), else the limit.
pub(super) fn token_limit(
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
