//! A streamed answer: server-sent events from a request's events, through an [`Outlet`] that
//! cuts off a client that stops reading.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{BoxStream, SelectAll};
use futures_util::StreamExt;
use pio_plugin_api::wire::{InferOutcome, Usage};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use super::deployment::Lease;
use super::error::ApiError;
use super::inference::{counted, offered, Recorded, Timing};
use super::link::Link;
use super::openai::{LogprobsFormat, Parsed};
use super::outlet::{Ended, Outlet};
use super::output::Parsing;
use super::reasoning::Splitter;
use super::responses::{merged_usage, Reply};
use super::tool_calls::StreamFilter;
use super::App;
use crate::protocol::TokenFrame;
use crate::supervisor::Event;

/// Who a stream answers.
pub(super) struct Client {
    /// When they asked.
    pub started: Instant,
    /// Their connection, where the listener tells it.
    pub link: Option<Link>,
}

/// How long a stream's headers wait for its first event (a failure in it gets a real status).
const HEADERS_WITHIN: Duration = Duration::from_secs(1);

/// A request's choices' events, each tagged with its choice; `None` once a choice's events
/// end (after its answer, or instead of one).
type Tagged = SelectAll<BoxStream<'static, (usize, Option<Event>)>>;

fn tagged(choices: Vec<mpsc::Receiver<Event>>) -> Tagged {
    futures_util::stream::select_all(choices.into_iter().enumerate().map(|(i, events)| {
        ReceiverStream::new(events)
            .map(Some)
            .chain(futures_util::stream::once(async { None }))
            .map(move |e| (i, e))
            .boxed()
    }))
}

pub(super) async fn stream(
    app: Arc<App>,
    parsed: Parsed,
    lease: Lease,
    choices: Vec<mpsc::Receiver<Event>>,
    client: Client,
    parsing: Parsing,
    recorded: &mut Recorded<'_>,
) -> Response {
    let mut events = tagged(choices);
    let Client { started, link } = client;
    // A request that fails at once (a prompt too long, say) gets a real status; one whose
    // client leaves before it is recorded as gone by `recorded`. The headers go out when the
    // first event comes or after `HEADERS_WITHIN`, whichever is first: a long prefill or a wait
    // for a place in the batch must not leave a client (or a proxy's idle timeout) without an
    // answer, and keep-alive comments flow from then on.
    let first = match tokio::time::timeout(HEADERS_WITHIN, events.next()).await {
        Ok(Some((i, Some(Event::Failed(e))))) => {
            let e = ApiError::of_choice(e, &parsed, choice_of(&parsed, i));
            recorded.status = e.status.as_u16();
            return e.into_response();
        }
        Ok(first) => first,
        // Not yet: the pump waits for it.
        Err(_) => None,
    };
    // From here the stream's task records it.
    recorded.armed = false;
    let stall = Duration::from_secs(app.models.config().server.stall_timeout_secs.max(1));
    let (outlet, body) = Outlet::open(64, stall, link);
    // In the request's span: its log lines (a failure midway) carry the request's id.
    let task = async move {
        // The lease is this task's until the stream ends, so a drain waits for it.
        let stream = Pumped {
            app: &app,
            parsed: &parsed,
            lease: &lease,
            outlet: &outlet,
            started,
        };
        let mut ended = stream.pump(first, events, parsing).await;
        if let Ended::Answered(_) = ended {
            if let Err(gone) = outlet.put(Ok(SseEvent::default().data("[DONE]"))).await {
                ended = gone;
            }
        }
        if ended == Ended::Stalled {
            outlet.cut_off();
        }
        app.metrics
            .request(&parsed.model, parsed.endpoint.label(), ended.status());
    };
    tokio::spawn(task.in_current_span());
    Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// What a stream sends for one choice, chunk by chunk: reasoning split from content, tool calls
/// held back and turned into a `tool_calls` delta, logprobs, the finish chunk.
struct Chunks<'a> {
    parsed: &'a Parsed,
    reply: Reply,
    filter: Option<StreamFilter>,
    splitter: Option<Splitter>,
    parsing: Parsing,
}

impl<'a> Chunks<'a> {
    fn new(parsed: &'a Parsed, parsing: Parsing, reply: Reply) -> Self {
        Self {
            parsed,
            reply,
            filter: parsing.tools.map(|_| StreamFilter::default()),
            splitter: parsing.reasoning.map(Splitter::new),
            parsing,
        }
    }

    fn opening(&mut self) -> Vec<Value> {
        self.reply
            .opening_chunk(self.parsed.include_usage)
            .into_iter()
            .collect()
    }

    /// The chunk for token `t`, if it shows anything (text, reasoning, or logprobs asked for).
    fn token(&mut self, t: TokenFrame) -> Option<Value> {
        if self.parsed.shown.echo_only {
            return None;
        }
        let t = &self.parsing.shown(t);
        let (thought, said) = match self.splitter.as_mut() {
            Some(s) => s.push(&t.text),
            None => (String::new(), t.text.clone()),
        };
        let visible = match self.filter.as_mut() {
            Some(f) => f.push(&said),
            None => said,
        };
        let show = !thought.is_empty()
            || !visible.is_empty()
            || self.parsed.logprobs != LogprobsFormat::None;
        show.then(|| {
            let usage = self.parsed.include_usage;
            self.reply.token_chunk(t, &thought, &visible, usage)
        })
    }

    /// The last chunks: what was held back, the calls, the finish.
    fn finish(&mut self, outcome: &InferOutcome) -> Vec<Value> {
        let usage = self.parsed.include_usage;
        let mut out = Vec::new();
        let mut said = String::new();
        if let Some(mut s) = self.splitter.take() {
            let (thought, rest) = s.finish();
            if !thought.is_empty() {
                out.push(self.reply.reasoning_chunk(&thought, usage));
            }
            said = rest;
        }
        if self.filter.is_none() && !said.is_empty() {
            out.push(self.reply.content_chunk(&said, usage));
        }
        let mut called = false;
        if let (Some(mut f), Some(format)) = (self.filter.take(), self.parsing.tools) {
            let rest = f.push(&said) + &f.finish();
            let held = self.parsing.extract(format, &rest, offered(self.parsed));
            if !held.content.is_empty() {
                out.push(self.reply.content_chunk(&held.content, usage));
            }
            if !held.calls.is_empty() {
                called = true;
                out.push(self.reply.tool_calls_chunk(&held.calls, usage));
            }
        }
        out.push(self.reply.finish_chunk(outcome, called, usage));
        out
    }
}

/// The choice an event of the stream's runs is about: run `i`, or, while prompts are scored
/// apart (one run each), the first choice of prompt `i`.
fn choice_of(parsed: &Parsed, i: usize) -> usize {
    match parsed.shown.scored_apart {
        true => i * parsed.n,
        false => i,
    }
}

/// What a stream's task sends through: the request, its lease (held until the stream ends, so
/// a drain waits for it) and its client's outlet.
struct Pumped<'a> {
    app: &'a App,
    parsed: &'a Parsed,
    lease: &'a Lease,
    outlet: &'a Outlet,
    started: Instant,
}

impl Pumped<'_> {
    /// [`pump`] of the stream, its prompts first scored apart where the request asks
    /// ([`PromptShown::scored_apart`]): `events` are then the scoring runs', and the choices
    /// start once every prompt is scored.
    async fn pump(
        &self,
        first: Option<(usize, Option<Event>)>,
        mut events: Tagged,
        parsing: Parsing,
    ) -> Ended {
        let parsed = self.parsed;
        let mut reply = super::inference::reply_of(parsed, &parsing);
        let mut first = first;
        if parsed.shown.scored_apart {
            let outcomes = match self.scored(first.take(), &mut events).await {
                Ok(outcomes) => outcomes,
                Err(e) => return self.failed(e).await,
            };
            reply = reply.with_scores_apart(Arc::new(outcomes));
            let supervised = &self.lease.deployment().supervised;
            let runs = (0..parsed.choices())
                .map(|i| supervised.infer(parsed.choice(i)))
                .collect::<Result<Vec<_>, _>>();
            events = match runs {
                Ok(runs) => tagged(runs),
                Err(e) => return self.failed(Ok(ApiError::of_request(e.0, parsed))).await,
            };
        }
        pump(
            self.app,
            parsed,
            first,
            events,
            self.outlet,
            self.started,
            (reply, parsing),
        )
        .await
    }

    /// Each prompt's scoring run's outcome, in prompt order; `Err(Ok(e))` when a run failed,
    /// `Err(Err(ended))` when the client left.
    async fn scored(
        &self,
        mut first: Option<(usize, Option<Event>)>,
        events: &mut Tagged,
    ) -> Result<Vec<InferOutcome>, Result<ApiError, Ended>> {
        let parsed = self.parsed;
        let mut outcomes: Vec<Option<InferOutcome>> = vec![None; parsed.other_prompts.len() + 1];
        while outcomes.iter().any(Option::is_none) {
            let event = match first.take() {
                Some(e) => Some(e),
                None => tokio::select! {
                    e = events.next() => e,
                    () = self.outlet.closed() => return Err(Err(Ended::Left)),
                },
            };
            match event {
                Some((_, Some(Event::Token(_)))) => {}
                Some((p, Some(Event::Done(outcome)))) => {
                    super::echo::scores_complete(&outcome).map_err(|why| {
                        Ok(ApiError::internal(format!(
                            "model `{}`: {why}",
                            parsed.model
                        )))
                    })?;
                    outcomes[p] = Some(*outcome);
                }
                Some((p, Some(Event::Failed(e)))) => {
                    return Err(Ok(ApiError::of_choice(e, parsed, choice_of(parsed, p))))
                }
                Some((p, None)) if outcomes[p].is_some() => {}
                Some((_, None)) | None => {
                    return Err(Ok(ApiError::internal(
                        "the worker ended a scoring run without an answer",
                    )))
                }
            }
        }
        Ok(outcomes.into_iter().flatten().collect())
    }

    /// Sends `e` as the stream's last event (a failure past its headers), or says the client left.
    async fn failed(&self, e: Result<ApiError, Ended>) -> Ended {
        let e = match e {
            Ok(e) => e,
            Err(ended) => return ended,
        };
        tracing::warn!(model = %self.parsed.model, "stream failed midway: {}", e.message);
        match self.outlet.send(&e.body()).await {
            Ok(()) => Ended::Answered(e.status.as_u16()),
            Err(ended) => ended,
        }
    }
}

/// Sends the stream's chunks, every choice's as its tokens come, and the usage of all once the
/// last has finished; returns how the stream ended.
async fn pump(
    app: &App,
    parsed: &Parsed,
    mut first: Option<(usize, Option<Event>)>,
    mut events: Tagged,
    outlet: &Outlet,
    started: Instant,
    (reply, parsing): (Reply, Parsing),
) -> Ended {
    let choices = parsed.choices();
    let mut chunks: Vec<Chunks> = (0..choices)
        .map(|i| Chunks::new(parsed, parsing.clone(), reply.for_choice(i)))
        .collect();
    let mut timings: Vec<Timing> = (0..choices)
        .map(|i| Timing::new(app, &parsed.model, started).of_choice(i))
        .collect();
    let mut usages: Vec<Option<Usage>> = vec![None; choices];
    let mut out: Vec<Value> = chunks.iter_mut().flat_map(Chunks::opening).collect();
    loop {
        for v in out.drain(..) {
            if let Err(ended) = outlet.send(&v).await {
                return ended;
            }
        }
        if usages.iter().all(Option::is_some) {
            if parsed.include_usage {
                let each = (usages.iter().enumerate())
                    .filter_map(|(i, u)| Some((parsed.counts_prompt(i), (*u)?)));
                let usage = merged_usage(each);
                if let Err(ended) = outlet.send(&reply.usage_chunk(usage)).await {
                    return ended;
                }
            }
            return Ended::Answered(200);
        }
        let event = match first.take() {
            Some(e) => Some(e),
            None => tokio::select! {
                e = events.next() => e,
                // The client went away: dropping `events` cancels the request in the worker.
                () = outlet.closed() => return Ended::Left,
            },
        };
        let e = match event {
            Some((i, Some(Event::Token(t)))) => {
                timings[i].token();
                out.extend(chunks[i].token(t));
                continue;
            }
            Some((i, Some(Event::Done(outcome)))) => {
                timings[i].ended(&counted(outcome.usage, parsed.counts_prompt(i)));
                out.extend(chunks[i].finish(&outcome));
                usages[i] = Some(outcome.usage);
                continue;
            }
            // A choice's events end after its answer.
            Some((i, None)) if usages[i].is_some() => continue,
            Some((i, Some(Event::Failed(e)))) => ApiError::of_choice(e, parsed, i),
            Some((_, None)) | None => {
                ApiError::internal("the worker ended the request without an answer")
            }
        };
        tracing::warn!(model = %parsed.model, "stream failed midway: {}", e.message);
        return match outlet.send(&e.body()).await {
            Ok(()) => Ended::Answered(e.status.as_u16()),
            Err(ended) => ended,
        };
    }
}
