//! A streamed answer: server-sent events from a request's events, through a small buffer that
//! cuts off a client that stops reading.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use pio_plugin_api::wire::InferOutcome;
use serde_json::Value;
use tokio::sync::mpsc;

use super::deployment::Lease;
use super::error::ApiError;
use super::inference::{offered, Recorded, Timing, CLIENT_GONE};
use super::link::Link;
use super::openai::{LogprobsFormat, Parsed};
use super::output::Parsing;
use super::reasoning::Splitter;
use super::responses::Reply;
use super::tool_calls::StreamFilter;
use super::App;
use crate::protocol::TokenFrame;
use crate::supervisor::Event;

/// Who a stream answers: when they asked, and their connection where the listener tells it.
pub(super) struct Client {
    pub started: Instant,
    pub link: Option<Link>,
}

/// How long a stream's headers wait for its first event (a failure in it gets a real status).
const HEADERS_WITHIN: Duration = Duration::from_secs(1);

/// One item of the response body: an event, or the error that aborts the connection.
type Chunk = Result<SseEvent, std::io::Error>;

fn sse(value: &Value) -> Chunk {
    Ok(SseEvent::default().data(value.to_string()))
}

pub(super) async fn stream(
    app: Arc<App>,
    parsed: Parsed,
    lease: Lease,
    mut events: mpsc::Receiver<Event>,
    client: Client,
    parsing: Parsing,
    recorded: &mut Recorded<'_>,
) -> Response {
    let Client { started, link } = client;
    // A request that fails at once (a prompt too long, say) gets a real status; one whose
    // client leaves before it is recorded as gone by `recorded`. The headers go out when the
    // first event comes or after `HEADERS_WITHIN`, whichever is first: a long prefill or a wait
    // for a place in the batch must not leave a client (or a proxy's idle timeout) without an
    // answer, and keep-alive comments flow from then on.
    let first = match tokio::time::timeout(HEADERS_WITHIN, events.recv()).await {
        Ok(Some(Event::Failed(e))) => {
            let e = ApiError::of_request(e, parsed.endpoint);
            recorded.status = e.status.as_u16();
            return e.into_response();
        }
        Ok(first) => first,
        // Not yet: the pump waits for it.
        Err(_) => None,
    };
    // From here the stream's task records it.
    recorded.armed = false;
    let (tx, rx) = mpsc::channel::<Chunk>(64);
    let cut = Arc::new(AtomicBool::new(false));
    let cut_by_pump = cut.clone();
    let reads = Arc::new(Reads::new());
    let read_by_pump = reads.clone();
    tokio::spawn(async move {
        // Held until the stream ends, so a drain waits for it.
        let _lease = lease;
        let stall = app.models.config().server.stall_timeout_secs.max(1);
        let outlet = Outlet {
            tx: &tx,
            stall: Duration::from_secs(stall),
            reads: &read_by_pump,
            link: link.as_ref(),
        };
        let mut ended = pump(&app, &parsed, first, events, &outlet, started, parsing).await;
        if let Ended::Answered(_) = ended {
            if let Err(gone) = outlet.put(Ok(SseEvent::default().data("[DONE]"))).await {
                ended = gone;
            }
        }
        if ended == Ended::Stalled {
            cut_by_pump.store(true, Ordering::Release);
        }
        app.metrics
            .request(&parsed.model, parsed.endpoint.label(), ended.status());
    });
    Sse::new(body(rx, cut, reads))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// When the connection last took a chunk: what the stall timeout is measured from, so that a
/// client reading slowly but steadily (a slow link) is never taken for one that stopped.
struct Reads {
    opened: Instant,
    /// Milliseconds from `opened` to the last chunk taken.
    last_ms: AtomicU64,
}

impl Reads {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn taken(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long since the connection last took a chunk (or since the stream opened).
    fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.opened.elapsed().saturating_sub(last)
    }
}

/// The response body: the chunks sent, each noted in `reads` as the connection takes it, then,
/// if the stream was cut off, an error, so that the connection is aborted rather than ended as
/// if the answer were whole (a client that stopped reading a while must not take a truncated
/// answer for a complete one).
fn body(
    rx: mpsc::Receiver<Chunk>,
    cut: Arc<AtomicBool>,
    reads: Arc<Reads>,
) -> impl futures_util::Stream<Item = Chunk> + Send + 'static {
    use futures_util::StreamExt;
    let taken = tokio_stream::wrappers::ReceiverStream::new(rx).inspect(move |_| reads.taken());
    let end = futures_util::stream::once(async move { cut.load(Ordering::Acquire) }).filter_map(
        |cut| async move {
            cut.then(|| {
                Err(std::io::Error::other(
                    "cut off: the client stopped reading (server.stall_timeout_secs)",
                ))
            })
        },
    );
    taken.chain(end)
}

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// With an answer or an error event: its status.
    Answered(u16),
    /// The client went away.
    Left,
    /// The client stopped reading and was cut off.
    Stalled,
}

impl Ended {
    /// The status recorded (a client gone or cut off counts as [`CLIENT_GONE`]).
    fn status(self) -> u16 {
        match self {
            Self::Answered(status) => status,
            Self::Left | Self::Stalled => CLIENT_GONE,
        }
    }
}

/// The stream's way to its client: a small buffer, and a client that leaves it full while
/// taking nothing (neither a chunk from the buffer nor bytes from the socket) for `stall` is
/// cut off (dropping the events then cancels the generation in the
/// worker), so a client that stops reading never makes the daemon hold a whole generation.
struct Outlet<'a> {
    tx: &'a mpsc::Sender<Chunk>,
    stall: Duration,
    reads: &'a Reads,
    /// The connection, where the listener tells it (not in in-process tests).
    link: Option<&'a Link>,
}

impl Outlet<'_> {
    /// Sends `v`; `Err` with how the stream ends when the client is gone or stalled.
    async fn send(&self, v: &Value) -> Result<(), Ended> {
        self.put(sse(v)).await
    }

    /// Sends `chunk`, as [`Outlet::send`].
    async fn put(&self, chunk: Chunk) -> Result<(), Ended> {
        // The kernel's queue is looked at a few times within the timeout: a client that
        // acknowledged data between two looks is reading, though slower than tokens come.
        let look = (self.stall / 4).max(Duration::from_millis(10));
        let mut queued = None;
        loop {
            let left = self.stall.saturating_sub(self.reads.idle());
            if left.is_zero() {
                tracing::warn!(
                    "the client read nothing of its stream for {} s (server.stall_timeout_secs): cut off, generation stopped",
                    self.stall.as_secs()
                );
                return Err(Ended::Stalled);
            }
            match tokio::time::timeout(left.min(look), self.tx.reserve()).await {
                Ok(Ok(permit)) => {
                    permit.send(chunk);
                    return Ok(());
                }
                Ok(Err(_)) => return Err(Ended::Left),
                Err(_) => {
                    let now = self.link.and_then(Link::unacknowledged);
                    if matches!((queued, now), (Some(before), Some(now)) if now < before) {
                        self.reads.taken();
                    }
                    queued = now;
                }
            }
        }
    }
}

/// What a stream sends, chunk by chunk: reasoning split from content, tool calls held back and
/// turned into a `tool_calls` delta, logprobs, the finish and usage chunks.
struct Chunks<'a> {
    parsed: &'a Parsed,
    reply: Reply,
    filter: Option<StreamFilter>,
    splitter: Option<Splitter>,
    parsing: Parsing,
}

impl<'a> Chunks<'a> {
    fn new(parsed: &'a Parsed, parsing: Parsing) -> Self {
        let reply = Reply::new(&parsed.model, parsed.endpoint, parsed.logprobs)
            .with_tokens(parsing.tokens.clone());
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
    fn token(&mut self, t: &TokenFrame) -> Option<Value> {
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

    /// The last chunks: what was held back, the calls, the finish and the usage.
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
        if usage {
            out.push(self.reply.usage_chunk(outcome));
        }
        out
    }
}

/// Sends the stream's chunks; returns how the stream ended.
async fn pump(
    app: &App,
    parsed: &Parsed,
    mut first: Option<Event>,
    mut events: mpsc::Receiver<Event>,
    outlet: &Outlet<'_>,
    started: Instant,
    parsing: Parsing,
) -> Ended {
    let tx = outlet.tx;
    let mut chunks = Chunks::new(parsed, parsing);
    let mut timing = Timing::new(app, &parsed.model, started);
    let mut out = chunks.opening();
    loop {
        for v in out.drain(..) {
            if let Err(ended) = outlet.send(&v).await {
                return ended;
            }
        }
        let event = match first.take() {
            Some(e) => Some(e),
            None => tokio::select! {
                e = events.recv() => e,
                // The client went away: dropping `events` cancels the request in the worker.
                () = tx.closed() => return Ended::Left,
            },
        };
        let e = match event {
            Some(Event::Token(t)) => {
                timing.token();
                out.extend(chunks.token(&t));
                continue;
            }
            Some(Event::Done(outcome)) => {
                timing.ended(&outcome.usage);
                for v in &chunks.finish(&outcome) {
                    if let Err(ended) = outlet.send(v).await {
                        return ended;
                    }
                }
                return Ended::Answered(200);
            }
            Some(Event::Failed(e)) => ApiError::of_request(e, parsed.endpoint),
            None => ApiError::internal("the worker ended the request without an answer"),
        };
        tracing::warn!(model = %parsed.model, "stream failed midway: {}", e.message);
        return match outlet.send(&e.body()).await {
            Ok(()) => Ended::Answered(e.status.as_u16()),
            Err(ended) => ended,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_whose_client_stops_reading_is_cut_after_the_stall_timeout() {
        let (tx, mut rx) = mpsc::channel(2);
        let reads = Reads::new();
        let outlet = Outlet {
            tx: &tx,
            stall: Duration::from_millis(200),
            reads: &reads,
            link: None,
        };
        let chunk = serde_json::json!({"x": 1});
        // The buffer takes two chunks; the third waits for a reader that never comes.
        assert!(outlet.send(&chunk).await.is_ok());
        assert!(outlet.send(&chunk).await.is_ok());
        let started = Instant::now();
        assert_eq!(outlet.send(&chunk).await, Err(Ended::Stalled));
        assert!(started.elapsed() >= Duration::from_millis(150));
        // A reader frees room: sending works again; a client gone fails at once.
        rx.recv().await;
        reads.taken();
        assert!(outlet.send(&chunk).await.is_ok());
        drop(rx);
        assert_eq!(outlet.send(&chunk).await, Err(Ended::Left));
    }

    /// A client that reads steadily but slower than the tokens come keeps the buffer full for
    /// far longer than the stall timeout, and is not cut off: the timeout counts from its last
    /// read, not from when the buffer filled.
    #[tokio::test]
    async fn a_slow_but_steady_reader_is_not_cut_off() {
        use futures_util::StreamExt;
        let (tx, rx) = mpsc::channel(2);
        let reads = Arc::new(Reads::new());
        let stall = Duration::from_millis(300);
        let reader = tokio::spawn({
            let mut body = Box::pin(body(rx, Arc::new(AtomicBool::new(false)), reads.clone()));
            async move {
                let mut taken = 0;
                // One chunk every 100 ms: a third of the stall timeout.
                while body.next().await.is_some() {
                    taken += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                taken
            }
        });
        let outlet = Outlet {
            tx: &tx,
            stall,
            reads: &reads,
            link: None,
        };
        let started = Instant::now();
        for _ in 0..15 {
            assert_eq!(outlet.send(&serde_json::json!({"x": 1})).await, Ok(()));
        }
        // The buffer was full for over a second: four stall timeouts.
        assert!(started.elapsed() >= Duration::from_millis(1200));
        drop(tx);
        assert_eq!(reader.await.unwrap(), 15);
    }

    /// A body cut off ends in an error (the connection is aborted); a whole one ends cleanly.
    #[tokio::test]
    async fn a_cut_off_body_ends_in_an_error() {
        use futures_util::StreamExt;
        for cut in [false, true] {
            let (tx, rx) = mpsc::channel(4);
            tx.send(sse(&serde_json::json!({"x": 1}))).await.unwrap();
            drop(tx);
            let items: Vec<Chunk> =
                body(rx, Arc::new(AtomicBool::new(cut)), Arc::new(Reads::new()))
                    .collect()
                    .await;
            assert_eq!(items.len(), if cut { 2 } else { 1 });
            assert!(items[0].is_ok());
            assert_eq!(items.last().unwrap().is_err(), cut);
        }
    }
}
