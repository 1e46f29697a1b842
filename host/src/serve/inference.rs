//! `POST /v1/chat/completions` and `POST /v1/completions`: check the request, lease the model,
//! run it in its worker, and answer with one body or a stream of server-sent events. A client
//! that goes away cancels its generation in the worker.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use serde_json::Value;
use tokio::sync::mpsc;

use super::deployment::Lease;
use super::error::ApiError;
use super::link::Link;
use super::openai::{self, Endpoint, Parsed};
use super::output::Parsing;
use super::responses::{merged_usage, Reply};
use super::{streaming, structure, App, RequestId};
use crate::protocol::TokenFrame;
use crate::supervisor::Event;
use pio_plugin_api::wire::{InferOutcome, Usage};

/// `POST /v1/chat/completions`.
pub async fn chat(
    State(app): State<Arc<App>>,
    Extension(id): Extension<RequestId>,
    link: Option<Extension<Link>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve(app, Endpoint::Chat, id, link.map(|l| l.0), body).await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(app): State<Arc<App>>,
    Extension(id): Extension<RequestId>,
    link: Option<Extension<Link>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve(app, Endpoint::Completions, id, link.map(|l| l.0), body).await
}

async fn serve(
    app: Arc<App>,
    endpoint: Endpoint,
    id: RequestId,
    link: Option<Link>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    // Recorded however the handler ends, a client gone mid-way included (while its model loads,
    // say); only served models become metric labels: clients cannot grow the label set at will.
    let mut recorded = Recorded {
        app: &app,
        model: String::new(),
        endpoint,
        status: CLIENT_GONE,
        armed: true,
    };
    let result = start(&app, endpoint, id, body, &mut recorded.model).await;
    match result {
        Ok((parsed, lease, events)) => {
            let tools = Parsing::of(
                &parsed.request,
                parsed.endpoint == Endpoint::Chat,
                &lease.deployment().info,
            );
            let tools = tools
                .with_tokens(lease.deployment().tokens.clone())
                .with_special(
                    lease.deployment().special.clone(),
                    parsed.skip_special_tokens,
                )
                .with_single_call(parsed.single_call)
                .with_calls_parsed(parsed.calls_parsed);
            if parsed.stream {
                let app = app.clone();
                let client = streaming::Client { started, link };
                streaming::stream(app, parsed, lease, events, client, tools, &mut recorded).await
            } else {
                let response = collect(&app, &parsed, events, started, tools).await;
                drop(lease);
                recorded.status = response.status().as_u16();
                response
            }
        }
        Err(e) => {
            // Server errors are logged as they become a response; a full queue here.
            if e.status.as_u16() == 429 {
                tracing::warn!(model = %recorded.model, status = e.status.as_u16(), "{}", e.message);
            }
            recorded.status = e.status.as_u16();
            e.into_response()
        }
    }
}

/// A request started: its choices' events, one receiver each (dropping one cancels that
/// choice in the worker).
type Running = (Parsed, Lease, Vec<mpsc::Receiver<Event>>);

async fn start(
    app: &App,
    endpoint: Endpoint,
    id: RequestId,
    body: Result<Bytes, BytesRejection>,
    label: &mut String,
) -> Result<Running, ApiError> {
    let mut value = body_of(app, body)?;
    let model = openai::model_of(&mut value, || app.models.names())?;
    let capabilities = app
        .models
        .capabilities(&model)
        .ok_or_else(|| ApiError::unknown_model(&model))?;
    label.clone_from(&model);
    let limits = openai::Limits::of(&app.models.config().server);
    let mut parsed = openai::parse(&value, endpoint, capabilities, &limits)?;
    if let Some(api) = app.models.plugin_api(&model) {
        openai::older_plugin(&parsed.request, &model, &api)?;
    }
    parsed.request.request_id = Some(id.0);
    // Each choice takes a place of the queue: a request's `n` (or its prompts) cannot be a way
    // past it.
    let depth = app.models.config().server.queue_depth;
    let choices = parsed.choices();
    if choices > depth {
        let (field, what) = match parsed.other_prompts.len() {
            0 => ("n", format!("`n` ({choices})")),
            more => (
                "prompt",
                format!("{} prompts times `n` ({})", more + 1, parsed.n),
            ),
        };
        return Err(ApiError::bad_field(
            field,
            format!("{what} is more than this server's server.queue_depth ({depth}): each choice takes a place of the model's queue"),
        ));
    }
    let lease = app.models.acquire_places(&model, choices).await?;
    echo_readable(&parsed, lease.deployment().tokens.is_some(), &model)?;
    openai::default_limit(&mut parsed, lease.deployment().default_max_tokens, &limits)?;
    if let Some(s) = &parsed.structure {
        let info = &lease.deployment().info;
        let chat = endpoint == Endpoint::Chat;
        parsed.request.constraint = Some(structure::constraint(
            s,
            &parsed.request,
            chat,
            &model,
            info,
        )?);
    }
    // Each choice is a sequence of its own in the batch (the engine computes a prompt shared
    // by choices arriving together once; the others take its blocks from the prefix cache).
    let supervised = &lease.deployment().supervised;
    // Prompts scored apart for a stream run first, one each; the stream launches its choices
    // once they are scored (`streaming::pump`).
    let runs = match parsed.shown.scored_apart {
        true => (0..=parsed.other_prompts.len())
            .map(|p| supervised.infer(scoring_run(&parsed, p)))
            .collect::<Result<Vec<_>, _>>(),
        false => (0..choices)
            .map(|i| supervised.infer(parsed.choice(i)))
            .collect::<Result<Vec<_>, _>>(),
    };
    let runs = runs.map_err(|e| ApiError::of_request(e.0, &parsed))?;
    Ok((parsed, lease, runs))
}

/// Refuses `echo` of a token-id prompt when the model reports no token table to read it with:
/// the answer showed no prompt at all, as if it had been echoed.
fn echo_readable(parsed: &Parsed, table: bool, model: &str) -> Result<(), ApiError> {
    let ids = parsed
        .prompts()
        .any(|p| matches!(p, pio_plugin_api::wire::Prompt::Tokens(_)));
    if parsed.shown.echo && ids && !table {
        return Err(ApiError::bad_field(
            "echo",
            format!("cannot show a prompt of token ids: model `{model}` reports no token table to read them with; send the prompt as text, or leave out `echo`"),
        ));
    }
    Ok(())
}

/// The run that scores prompt `p` apart, for a stream whose first chunk shows the scores (which
/// come with the end of a run): one token long, its output unscored and unconstrained. Its
/// blocks stay in the prefix cache, so the stream's own runs do not compute the prompt again.
pub(super) fn scoring_run(parsed: &Parsed, p: usize) -> pio_plugin_api::wire::InferRequest {
    let mut request = parsed.choice(p * parsed.n);
    request.prompt_logprobs = parsed.shown.echo_top;
    request.max_tokens = Some(1);
    request.min_tokens = None;
    request.logprobs = None;
    request.constraint = None;
    request
}

/// A request's body as JSON: one too large, unreadable or not JSON is a 4xx saying so.
pub(super) fn body_of(app: &App, body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|r| {
        if r.status().as_u16() == 413 {
            ApiError::too_large(app.max_body)
        } else {
            ApiError::bad_request(r.body_text())
        }
    })?;
    openai::body_json(&bytes)
}

/// Latency and token bookkeeping of one request. Its tokens are counted from its usage when it
/// ends; one cut off before (the client gone: its future dropped) counts the tokens it received,
/// so the token counters agree with the latency histograms (its prompt's tokens, which only
/// the end reports, are not known).
pub(super) struct Timing<'a> {
    app: &'a App,
    model: &'a str,
    started: Instant,
    last: Option<Instant>,
    generated: u32,
    ended: bool,
    /// Whether its tokens feed the latency histograms: a request's first choice's do, so that
    /// the histograms count requests, whatever their `n`.
    timed: bool,
}

impl<'a> Timing<'a> {
    /// A request for `model` that `started`.
    pub(super) fn new(app: &'a App, model: &'a str, started: Instant) -> Self {
        Self {
            app,
            model,
            started,
            last: None,
            generated: 0,
            ended: false,
            timed: true,
        }
    }

    /// The same, for choice `index` of a request: only the first choice's latencies count.
    pub(super) fn of_choice(self, index: usize) -> Self {
        Self {
            timed: index == 0,
            ..self
        }
    }

    /// A token arrived.
    pub(super) fn token(&mut self) {
        let now = Instant::now();
        let metrics = &self.app.metrics;
        match self.last {
            _ if !self.timed => {}
            None => metrics.first_token(self.model, (now - self.started).as_secs_f64()),
            Some(prev) => metrics.inter_token(self.model, (now - prev).as_secs_f64()),
        }
        self.last = Some(now);
        self.generated += 1;
    }

    /// The request ended with `usage`.
    pub(super) fn ended(&mut self, usage: &pio_plugin_api::wire::Usage) {
        let metrics = &self.app.metrics;
        metrics.tokens(self.model, usage.prompt_tokens, usage.completion_tokens);
        self.ended = true;
    }
}

impl Drop for Timing<'_> {
    fn drop(&mut self) {
        if !self.ended && self.generated > 0 {
            self.app.metrics.tokens(self.model, 0, self.generated);
        }
    }
}

async fn collect(
    app: &App,
    parsed: &Parsed,
    choices: Vec<mpsc::Receiver<Event>>,
    started: Instant,
    parsing: Parsing,
) -> Response {
    let reply = reply_of(parsed, &parsing);
    // The first failure answers, and drops the other choices (cancelling them).
    let each = (choices.into_iter().enumerate())
        .map(|(i, events)| collect_choice(app, parsed, events, started, &parsing, i));
    let mut done = match futures_util::future::try_join_all(each).await {
        Ok(done) => done,
        Err(e) => return e.into_response(),
    };
    // A prompt is scored once, by its first choice: the others show its scores.
    for i in 0..done.len() {
        let first = i - i % parsed.n;
        if first != i && parsed.request.prompt_logprobs.is_some() {
            done[i].1.prompt_logprobs = done[first].1.prompt_logprobs.clone();
            done[i].1.prompt_token_ids = done[first].1.prompt_token_ids.clone();
        }
    }
    let usages = (done.iter().enumerate()).map(|(i, d)| (parsed.counts_prompt(i), d.1.usage));
    let usage = merged_usage(usages);
    let choices = (done.into_iter().enumerate())
        .map(|(i, (tokens, outcome))| {
            answer(parsed, &parsing, reply.for_choice(i), tokens, &outcome)
        })
        .collect();
    Json(reply.whole(choices, usage)).into_response()
}

/// A choice's body from its `tokens` and `outcome`: reasoning and tool calls taken out of the
/// text as the request asks.
fn answer(
    parsed: &Parsed,
    parsing: &Parsing,
    mut reply: Reply,
    mut tokens: Vec<TokenFrame>,
    outcome: &InferOutcome,
) -> Value {
    parsed.shown_tokens(&mut tokens);
    let text: String = tokens.iter().map(|t| t.text.as_str()).collect();
    let (reasoning, extracted) = parsing.split(text, offered(parsed));
    reply.choice(
        &tokens,
        reasoning.as_deref(),
        &extracted.content,
        &extracted.calls,
        outcome,
    )
}

/// The bodies' builder for `parsed`: its logprobs read with the model's token table, the
/// prompt shown as it asks (an echoed prompt of token ids read from the table).
pub(super) fn reply_of(parsed: &Parsed, parsing: &Parsing) -> Reply {
    let table = parsing.tokens.as_deref();
    let texts = match parsed.shown.echo {
        true => (parsed.prompts())
            .map(|p| super::echo::prompt_text(p, table))
            .collect(),
        false => Vec::new(),
    };
    Reply::new(&parsed.model, parsed.endpoint, parsed.logprobs)
        .with_tokens(parsing.tokens.clone())
        .with_prompts(parsed.shown, texts, parsed.n)
}

/// Choice `index` of a whole answer: its tokens (as shown) and its outcome, its scores checked
/// where it was asked for them.
async fn collect_choice(
    app: &App,
    parsed: &Parsed,
    mut events: mpsc::Receiver<Event>,
    started: Instant,
    parsing: &Parsing,
    index: usize,
) -> Result<(Vec<TokenFrame>, InferOutcome), ApiError> {
    let mut tokens: Vec<TokenFrame> = Vec::new();
    let mut timing = Timing::new(app, &parsed.model, started).of_choice(index);
    while let Some(event) = events.recv().await {
        match event {
            Event::Token(t) => {
                timing.token();
                tokens.push(parsing.shown(t));
            }
            Event::Done(outcome) => {
                timing.ended(&counted(outcome.usage, parsed.counts_prompt(index)));
                if parsed.request.prompt_logprobs.is_some() && parsed.counts_prompt(index) {
                    super::echo::scores_complete(&outcome).map_err(|why| {
                        ApiError::internal(format!("model `{}`: {why}", parsed.model))
                    })?;
                }
                return Ok((tokens, *outcome));
            }
            Event::Failed(e) => return Err(ApiError::of_choice(e, parsed, index)),
        }
    }
    Err(ApiError::internal(
        "the worker ended the request without an answer",
    ))
}

/// `usage` as the metrics count it for a choice: each prompt once, with the first of its
/// choices (`counts_prompt`; the others ran the same prompt).
pub(super) fn counted(usage: Usage, counts_prompt: bool) -> Usage {
    Usage {
        prompt_tokens: if counts_prompt {
            usage.prompt_tokens
        } else {
            0
        },
        ..usage
    }
}

/// The tools the request offered.
pub(super) fn offered(parsed: &Parsed) -> &[Value] {
    parsed.request.tools.as_deref().unwrap_or_default()
}

/// The status recorded for a stream whose client disconnected or stopped reading (nginx's
/// convention).
pub(super) const CLIENT_GONE: u16 = 499;

/// Records a request's status when dropped: the answer's, or [`CLIENT_GONE`] when the client
/// left first and the handler was dropped mid-way; not once disarmed (a stream's own task
/// records it).
pub(super) struct Recorded<'a> {
    app: &'a App,
    model: String,
    endpoint: Endpoint,
    /// The status to record.
    pub(super) status: u16,
    /// Whether dropping it records.
    pub(super) armed: bool,
}

impl Drop for Recorded<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.app
                .metrics
                .request(&self.model, self.endpoint.label(), self.status);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::openai::{parse, Endpoint, Limits};
    use pio_plugin_api::Capabilities;

    /// `echo` of a token-id prompt needs the model's token table to show the prompt: without
    /// one it is refused, naming `echo` (the answer showed no prompt at all).
    #[test]
    fn an_echoed_token_prompt_needs_a_token_table() {
        let caps = Capabilities::TEXT.union(Capabilities::TOKEN_PROMPTS);
        let body = |prompt: Value| serde_json::json!({"model": "m", "prompt": prompt, "echo": true, "max_tokens": 1});
        let parsed = |prompt| {
            parse(
                &body(prompt),
                Endpoint::Completions,
                caps,
                &Limits::default(),
            )
            .unwrap()
        };
        let e = echo_readable(&parsed(serde_json::json!([0, 1])), false, "m").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("echo"), "{}", e.message);
        assert!(echo_readable(&parsed(serde_json::json!([0, 1])), true, "m").is_ok());
        assert!(echo_readable(&parsed(serde_json::json!("ab")), false, "m").is_ok());
    }
}
