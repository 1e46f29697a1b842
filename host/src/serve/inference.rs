//! `POST /v1/chat/completions` and `POST /v1/completions`: check the request, lease the model,
//! run it in its worker, and answer with one body or a stream of server-sent events. A client
//! that goes away cancels its generation in the worker.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use serde_json::Value;
use tokio::sync::mpsc;

use super::deployment::Lease;
use super::error::ApiError;
use super::openai::{self, Endpoint, Parsed};
use super::output::Parsing;
use super::reasoning::Splitter;
use super::responses::Reply;
use super::tool_calls::{self, StreamFilter};
use super::{App, RequestId};
use crate::protocol::TokenFrame;
use crate::supervisor::Event;

/// `POST /v1/chat/completions`.
pub async fn chat(
    State(app): State<Arc<App>>,
    Extension(id): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve(app, Endpoint::Chat, id, body).await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(app): State<Arc<App>>,
    Extension(id): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve(app, Endpoint::Completions, id, body).await
}

async fn serve(
    app: Arc<App>,
    endpoint: Endpoint,
    id: RequestId,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    // Only served models become metric labels: clients cannot grow the label set at will.
    let mut label = String::new();
    let result = start(&app, endpoint, id, body, &mut label).await;
    match result {
        Ok((parsed, lease, events)) => {
            let tools = Parsing::of(
                &parsed.request,
                parsed.endpoint == Endpoint::Chat,
                &lease.deployment().info,
            );
            let tools = tools.with_tokens(lease.deployment().tokens.clone());
            if parsed.stream {
                stream(app, parsed, lease, events, started, tools).await
            } else {
                // Dropped with the handler when the client disconnects: recorded as a stream's.
                let mut outcome = Recorded {
                    app: &app,
                    model: &label,
                    endpoint,
                    status: CLIENT_GONE,
                };
                let response = collect(&app, &parsed, events, started, tools).await;
                drop(lease);
                outcome.status = response.status().as_u16();
                response
            }
        }
        Err(e) => {
            if e.status.is_server_error() || e.status.as_u16() == 429 {
                tracing::warn!(model = %label, status = e.status.as_u16(), "{}", e.message);
            }
            app.metrics
                .request(&label, endpoint.label(), e.status.as_u16());
            e.into_response()
        }
    }
}

type Running = (Parsed, Lease, mpsc::Receiver<Event>);

async fn start(
    app: &App,
    endpoint: Endpoint,
    id: RequestId,
    body: Result<Bytes, BytesRejection>,
    label: &mut String,
) -> Result<Running, ApiError> {
    let bytes = body.map_err(|r| {
        if r.status().as_u16() == 413 {
            ApiError::too_large(app.max_body)
        } else {
            ApiError::bad_request(r.body_text())
        }
    })?;
    let value = openai::body_json(&bytes)?;
    let model = openai::model_of(&value)?;
    let capabilities = app
        .models
        .capabilities(&model)
        .ok_or_else(|| ApiError::unknown_model(&model))?;
    label.clone_from(&model);
    let limits = openai::Limits::of(&app.models.config().server);
    let mut parsed = openai::parse(&value, endpoint, capabilities, &limits)?;
    parsed.request.request_id = Some(id.0);
    let lease = app.models.acquire(&model).await?;
    let events = lease
        .deployment()
        .supervised
        .infer(parsed.request.clone())
        .map_err(|e| ApiError::from(e.0))?;
    Ok((parsed, lease, events))
}

/// Latency bookkeeping of one request.
struct Timing {
    started: Instant,
    last: Option<Instant>,
}

impl Timing {
    fn token(&mut self, app: &App, model: &str) {
        let now = Instant::now();
        match self.last {
            None => app
                .metrics
                .first_token(model, (now - self.started).as_secs_f64()),
            Some(prev) => app.metrics.inter_token(model, (now - prev).as_secs_f64()),
        }
        self.last = Some(now);
    }
}

async fn collect(
    app: &App,
    parsed: &Parsed,
    mut events: mpsc::Receiver<Event>,
    started: Instant,
    parsing: Parsing,
) -> Response {
    let mut tokens: Vec<TokenFrame> = Vec::new();
    let mut timing = Timing {
        started,
        last: None,
    };
    let mut reply = Reply::new(&parsed.model, parsed.endpoint, parsed.logprobs)
        .with_tokens(parsing.tokens.clone());
    while let Some(event) = events.recv().await {
        match event {
            Event::Token(t) => {
                timing.token(app, &parsed.model);
                tokens.push(t);
            }
            Event::Done(outcome) => {
                app.metrics.tokens(
                    &parsed.model,
                    outcome.usage.prompt_tokens,
                    outcome.usage.completion_tokens,
                );
                let text: String = tokens.iter().map(|t| t.text.as_str()).collect();
                let (reasoning, extracted) = parsing.split(text, offered(parsed));
                let body = reply.complete(
                    &tokens,
                    reasoning.as_deref(),
                    &extracted.content,
                    &extracted.calls,
                    &outcome,
                );
                return Json(body).into_response();
            }
            Event::Failed(e) => return ApiError::from(e).into_response(),
        }
    }
    ApiError::internal("the worker ended the request without an answer").into_response()
}

/// The tools the request offered.
fn offered(parsed: &Parsed) -> &[Value] {
    parsed.request.tools.as_deref().unwrap_or_default()
}

fn sse(value: &Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(value.to_string()))
}

async fn stream(
    app: Arc<App>,
    parsed: Parsed,
    lease: Lease,
    mut events: mpsc::Receiver<Event>,
    started: Instant,
    parsing: Parsing,
) -> Response {
    // A request that fails before its first token (a prompt too long, say) gets a real status.
    let first = events.recv().await;
    if let Some(Event::Failed(e)) = first {
        let e = ApiError::from(e);
        app.metrics
            .request(&parsed.model, parsed.endpoint.label(), e.status.as_u16());
        return e.into_response();
    }
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        // Held until the stream ends, so a drain waits for it.
        let _lease = lease;
        let status = pump(&app, &parsed, first, events, &tx, started, parsing).await;
        if status != CLIENT_GONE {
            let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
        }
        app.metrics
            .request(&parsed.model, parsed.endpoint.label(), status);
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The status recorded for a stream whose client disconnected or stopped reading (nginx's
/// convention).
const CLIENT_GONE: u16 = 499;

/// Records a whole (non-streamed) request's status when dropped: the answer's, or
/// [`CLIENT_GONE`] when the client left first and the handler was dropped mid-way.
struct Recorded<'a> {
    app: &'a App,
    model: &'a str,
    endpoint: Endpoint,
    status: u16,
}

impl Drop for Recorded<'_> {
    fn drop(&mut self) {
        self.app
            .metrics
            .request(self.model, self.endpoint.label(), self.status);
    }
}

/// The stream's way to its client: a small buffer, and a client that leaves it full for
/// `stall` is cut off (dropping the events then cancels the generation in the worker), so a
/// client that stops reading never makes the daemon hold a whole generation.
struct Outlet<'a> {
    tx: &'a mpsc::Sender<Result<SseEvent, Infallible>>,
    stall: std::time::Duration,
}

impl Outlet<'_> {
    /// Sends `v`; `Err` when the client is gone or stalled.
    async fn send(&self, v: &Value) -> Result<(), ()> {
        match tokio::time::timeout(self.stall, self.tx.send(sse(v))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(()),
            Err(_) => {
                tracing::warn!(
                    "the client stopped reading its stream for {} s (server.stall_timeout_secs): cut off, generation stopped",
                    self.stall.as_secs()
                );
                Err(())
            }
        }
    }
}

/// Sends the stream's chunks; returns the status to record.
async fn pump(
    app: &App,
    parsed: &Parsed,
    mut first: Option<Event>,
    mut events: mpsc::Receiver<Event>,
    tx: &mpsc::Sender<Result<SseEvent, Infallible>>,
    started: Instant,
    parsing: Parsing,
) -> u16 {
    let outlet = Outlet {
        tx,
        stall: std::time::Duration::from_secs(app.models.config().server.stall_timeout_secs.max(1)),
    };
    let tools = parsing.tools;
    let mut filter = tools.map(|_| StreamFilter::default());
    let mut splitter = parsing.reasoning.map(Splitter::new);
    let model = parsed.model.as_str();
    let usage = parsed.include_usage;
    let mut reply =
        Reply::new(model, parsed.endpoint, parsed.logprobs).with_tokens(parsing.tokens.clone());
    let mut timing = Timing {
        started,
        last: None,
    };
    let mut out: Vec<Value> = reply.opening_chunk(usage).into_iter().collect();
    loop {
        for v in out.drain(..) {
            if outlet.send(&v).await.is_err() {
                return CLIENT_GONE;
            }
        }
        let event = match first.take() {
            Some(e) => Some(e),
            None => tokio::select! {
                e = events.recv() => e,
                // The client went away: dropping `events` cancels the request in the worker.
                () = tx.closed() => return CLIENT_GONE,
            },
        };
        match event {
            Some(Event::Token(t)) => {
                timing.token(app, model);
                let (thought, said) = match splitter.as_mut() {
                    Some(s) => s.push(&t.text),
                    None => (String::new(), t.text.clone()),
                };
                let visible = match filter.as_mut() {
                    Some(f) => f.push(&said),
                    None => said,
                };
                if !thought.is_empty()
                    || !visible.is_empty()
                    || parsed.logprobs != super::openai::LogprobsFormat::None
                {
                    out.push(reply.token_chunk(&t, &thought, &visible, usage));
                }
            }
            Some(Event::Done(outcome)) => {
                app.metrics.tokens(
                    model,
                    outcome.usage.prompt_tokens,
                    outcome.usage.completion_tokens,
                );
                let mut called = false;
                let mut said = String::new();
                if let Some(mut s) = splitter.take() {
                    let (thought, rest) = s.finish();
                    if !thought.is_empty() {
                        out.push(reply.reasoning_chunk(&thought, usage));
                    }
                    said = rest;
                }
                if filter.is_none() && !said.is_empty() {
                    out.push(reply.content_chunk(&said, usage));
                }
                if let (Some(mut f), Some(format)) = (filter.take(), tools) {
                    let rest = f.push(&said) + &f.finish();
                    let held = tool_calls::extract(format, &rest, offered(parsed));
                    if !held.content.is_empty() {
                        out.push(reply.content_chunk(&held.content, usage));
                    }
                    if !held.calls.is_empty() {
                        called = true;
                        out.push(reply.tool_calls_chunk(&held.calls, usage));
                    }
                }
                out.push(reply.finish_chunk(&outcome, called, usage));
                if usage {
                    out.push(reply.usage_chunk(&outcome));
                }
                for v in &out {
                    if outlet.send(v).await.is_err() {
                        return CLIENT_GONE;
                    }
                }
                return 200;
            }
            Some(Event::Failed(e)) => {
                let e = ApiError::from(e);
                tracing::warn!(model = %model, "stream failed midway: {}", e.message);
                let _ = tx.send(sse(&e.body())).await;
                return e.status.as_u16();
            }
            None => {
                let e = ApiError::internal("the worker ended the request without an answer");
                let _ = tx.send(sse(&e.body())).await;
                return 500;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_whose_client_stops_reading_is_cut_after_the_stall_timeout() {
        let (tx, mut rx) = mpsc::channel(2);
        let outlet = Outlet {
            tx: &tx,
            stall: std::time::Duration::from_millis(200),
        };
        let chunk = serde_json::json!({"x": 1});
        // The buffer takes two chunks; the third waits for a reader that never comes.
        assert!(outlet.send(&chunk).await.is_ok());
        assert!(outlet.send(&chunk).await.is_ok());
        let started = Instant::now();
        assert!(outlet.send(&chunk).await.is_err());
        assert!(started.elapsed() >= std::time::Duration::from_millis(200));
        // A reader frees room: sending works again; a client gone fails at once.
        rx.recv().await;
        assert!(outlet.send(&chunk).await.is_ok());
        drop(rx);
        assert!(outlet.send(&chunk).await.is_err());
    }
}
