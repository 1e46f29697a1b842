//! The request body, read whole before any handler runs: within `server.max_body_size` and
//! `server.body_timeout_secs`, its content coding undone ([`super::encoding`]), and refused with
//! a lingering close when it is too large or in a coding this server does not read.
//!
//! A client that writes all of its body before it reads (Python's `requests` and `httpx` do) would
//! otherwise lose the 413: a socket closed with unread bytes in its receive queue sends a reset,
//! and the reset discards the answer waiting in the client's queue. So the refused body is read
//! and thrown away, for at most the body timeout, while the answer goes out (nginx's lingering
//! close); the answer says `Connection: close`, and the connection ends once the body does.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Version};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use super::encoding;
use super::error::ApiError;
use super::App;

/// How reading a body ended short of its bytes.
#[derive(Debug)]
enum Unread {
    /// It passed the limit; the rest of it is still to come.
    TooLarge(Body),
    /// The client broke the framing or sent less than it announced.
    Broken,
}

/// Reads the whole body before any handler runs, within `server.body_timeout_secs` and the body
/// limit: a client that announces a body and sends it slowly, or never, gets a 408 instead of
/// holding a handler forever.
pub(super) async fn read_body(
    State(app): State<Arc<App>>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let secs = app.models.config().server.body_timeout_secs.max(1);
    let linger = Duration::from_secs(secs);
    // A body announced past the limit is refused at once, not read (or waited for) first.
    let announced = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    // A client that waits for `100 Continue` has sent no body to drain; reading it would have
    // hyper invite the body the answer refuses.
    let waits = (parts.headers.get(header::EXPECT))
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let at_once = if waits { Duration::ZERO } else { linger };
    if announced.is_some_and(|n| n > app.max_body) {
        let refusal = ApiError::too_large(app.max_body);
        return refuse(refusal, parts.version, body, at_once);
    }
    let codings = match encoding::codings(&parts.headers) {
        Ok(codings) => codings,
        Err(e) => return refuse(ApiError::undecodable(&e), parts.version, body, at_once),
    };
    let limit = usize::try_from(app.max_body).unwrap_or(usize::MAX);
    let started = tokio::time::Instant::now();
    match tokio::time::timeout(linger, read_within(body, limit)).await {
        Ok(Ok(bytes)) if codings.is_empty() => {
            next.run(Request::from_parts(parts, Body::from(bytes))).await
        }
        Ok(Ok(bytes)) => {
            let mut parts = parts;
            match decode(&mut parts, bytes, codings, limit).await {
                Ok(body) => next.run(Request::from_parts(parts, body)).await,
                Err(refusal) => refusal.into_response(),
            }
        }
        Ok(Err(Unread::TooLarge(rest))) => {
            let refusal = ApiError::too_large(app.max_body);
            refuse(refusal, parts.version, rest, linger.saturating_sub(started.elapsed()))
        }
        Ok(Err(Unread::Broken)) => ApiError::bad_request(
            "the request body could not be read: the client sent less than it announced or broke the framing",
        )
        .into_response(),
        Err(_) => ApiError::body_timeout(secs).into_response(),
    }
}

/// The body `bytes` with `codings` undone, and the headers in `parts` saying so.
async fn decode(
    parts: &mut axum::http::request::Parts,
    bytes: Bytes,
    codings: Vec<encoding::Coding>,
    limit: usize,
) -> Result<Body, ApiError> {
    // Inflating megabytes is CPU work: off the threads that serve connections.
    let decoded =
        tokio::task::spawn_blocking(move || encoding::decode(bytes.into(), &codings, limit))
            .await
            .map_err(|e| ApiError::internal(format!("decoding the request body failed: {e}")))?
            .map_err(|e| ApiError::undecodable(&e))?;
    parts.headers.remove(header::CONTENT_ENCODING);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, decoded.len().into());
    Ok(Body::from(decoded))
}

/// The body's bytes, or why they are not all here: past `limit`, the body is handed back unread.
async fn read_within(mut body: Body, limit: usize) -> Result<Bytes, Unread> {
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| Unread::Broken)?;
        // Trailers carry nothing a handler reads.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.len() > limit - bytes.len() {
            return Err(Unread::TooLarge(body));
        }
        bytes.extend_from_slice(&data);
    }
    Ok(Bytes::from(bytes))
}

/// `refusal` of `request` before its body was read (no key, the wrong one, a forged origin): its
/// body read and dropped behind the answer as a refused one is (a client writing a large body
/// before it reads got a reset instead of its 401).
pub(super) fn turn_away(app: &App, refusal: ApiError, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let waits = (parts.headers.get(header::EXPECT))
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let secs = app.models.config().server.body_timeout_secs.max(1);
    let linger = if waits {
        Duration::ZERO
    } else {
        Duration::from_secs(secs)
    };
    refuse(refusal, parts.version, body, linger)
}

/// `refusal`, with the rest of the body read and dropped behind it for at most `linger` (zero:
/// not read at all).
fn refuse(refusal: ApiError, version: Version, rest: Body, linger: Duration) -> Response {
    if linger.is_zero() {
        drop(rest);
    } else {
        tokio::spawn(drain(rest, linger));
    }
    let mut response = refusal.into_response();
    // HTTP/2 refuses one stream, not the connection, and has no `Connection` header.
    if version <= Version::HTTP_11 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// How long a refused body's drain waits for its next bytes (nginx's `lingering_timeout`): a
/// client that stopped sending holds its connection no longer than this, whatever the body
/// timeout.
const LINGER_IDLE: Duration = Duration::from_secs(5);

/// Reads and drops `rest` for at most `linger`, and while its bytes keep coming (a pause of
/// [`LINGER_IDLE`] ends it); then the body is dropped, and hyper closes the connection with it.
async fn drain(mut rest: Body, linger: Duration) {
    let discard = async {
        while let Ok(Some(Ok(_))) = tokio::time::timeout(LINGER_IDLE, rest.frame()).await {}
    };
    let _ = tokio::time::timeout(linger, discard).await;
}
