//! A stream's way to its client: a small buffer between the task that writes a stream's
//! chunks and the response body the connection reads, which cuts off a client that stops
//! reading (so that it never makes the daemon hold a whole generation) and aborts the
//! connection when it does (so that the client cannot take a truncated answer for a whole one).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::sse::Event as SseEvent;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::inference::CLIENT_GONE;
use super::link::Link;

/// One item of the response body: an event, or the error that aborts the connection.
pub(super) type Chunk = Result<SseEvent, std::io::Error>;

/// `value` as an event.
pub(super) fn sse(value: &Value) -> Chunk {
    Ok(SseEvent::default().data(value.to_string()))
}

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    /// With an answer or an error event: its status.
    Answered(u16),
    /// The client went away.
    Left,
    /// The client stopped reading and was cut off.
    Stalled,
}

impl Ended {
    /// The status recorded (a client gone or cut off counts as [`CLIENT_GONE`]).
    pub(super) fn status(self) -> u16 {
        match self {
            Self::Answered(status) => status,
            Self::Left | Self::Stalled => CLIENT_GONE,
        }
    }
}

/// When the client last read: the body took a chunk, or the kernel saw bytes acknowledged.
/// What the stall timeout counts from.
struct Reads {
    opened: Instant,
    /// Milliseconds from `opened` to the last read.
    last_ms: AtomicU64,
}

impl Reads {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn read(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long since the last read (or since the stream opened).
    fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.opened.elapsed().saturating_sub(last)
    }
}

/// The writing end of a stream's buffer. A client that leaves the buffer full while reading
/// nothing (neither a chunk from the buffer nor bytes from its socket) for `stall` is cut off.
pub(super) struct Outlet {
    tx: mpsc::Sender<Chunk>,
    stall: Duration,
    reads: Arc<Reads>,
    /// The connection, where the listener tells it (HTTP/1: a connection is one stream's).
    link: Option<Link>,
    cut: Arc<AtomicBool>,
}

impl Outlet {
    /// A buffer of `capacity` chunks: its writing end, and the response body that reads it.
    pub(super) fn open(
        capacity: usize,
        stall: Duration,
        link: Option<Link>,
    ) -> (
        Self,
        impl futures_util::Stream<Item = Chunk> + Send + 'static,
    ) {
        let (tx, rx) = mpsc::channel(capacity);
        let (reads, cut) = (Arc::new(Reads::new()), Arc::new(AtomicBool::new(false)));
        let body = body(rx, cut.clone(), reads.clone());
        let outlet = Self {
            tx,
            stall,
            reads,
            link,
            cut,
        };
        (outlet, body)
    }

    /// Sends `v`; `Err` with how the stream ends when the client is gone or stalled.
    pub(super) async fn send(&self, v: &Value) -> Result<(), Ended> {
        self.put(sse(v)).await
    }

    /// Sends `chunk`, as [`Outlet::send`].
    pub(super) async fn put(&self, chunk: Chunk) -> Result<(), Ended> {
        match self.tx.try_reserve() {
            Ok(permit) => {
                permit.send(chunk);
                return Ok(());
            }
            Err(TrySendError::Closed(())) => return Err(Ended::Left),
            Err(TrySendError::Full(())) => {}
        }
        // Full: the stall counts from now or the client's last read, whichever is later (a
        // stream quiet for long, a long prefill say, has nothing for the client to read). The
        // kernel is asked a few times within it: a client that acknowledged bytes between two
        // looks is reading, though slower than tokens come.
        let full_since = Instant::now();
        let look = (self.stall / 4).max(Duration::from_millis(10));
        let mut acked = self.link.as_ref().and_then(Link::acknowledged);
        loop {
            let idle = self.reads.idle().min(full_since.elapsed());
            let left = self.stall.saturating_sub(idle);
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
                    let now = self.link.as_ref().and_then(Link::acknowledged);
                    if matches!((acked, now), (Some(before), Some(now)) if now > before) {
                        self.reads.read();
                    }
                    acked = now;
                }
            }
        }
    }

    /// Completes when the client has gone (the body was dropped).
    pub(super) async fn closed(&self) {
        self.tx.closed().await;
    }

    /// Ends the body with an error after what was sent: the connection is aborted.
    pub(super) fn cut_off(&self) {
        self.cut.store(true, Ordering::Release);
    }
}

/// The response body: the chunks sent, each noted in `reads` as the connection takes it, then,
/// if the stream was cut off, an error.
fn body(
    rx: mpsc::Receiver<Chunk>,
    cut: Arc<AtomicBool>,
    reads: Arc<Reads>,
) -> impl futures_util::Stream<Item = Chunk> + Send + 'static {
    use futures_util::StreamExt;
    let taken = tokio_stream::wrappers::ReceiverStream::new(rx).inspect(move |_| reads.read());
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

#[cfg(test)]
#[path = "outlet_tests.rs"]
mod tests;
