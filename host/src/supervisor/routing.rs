//! Where a worker's frames go — to the request they belong to or to whoever waits for a load,
//! an unload or a pong — and, when it dies, the account of how, given to everyone still waiting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pio_plugin_api::wire::ModelInfo;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, oneshot};

use super::handle::Event;
use crate::fault::Fault;
use crate::protocol::{encode, FromWorker, ToWorker, WireError};
use crate::sandbox::cgroup::Stats;
use crate::units::ByteSize;

pub(super) type Pending = Arc<Mutex<HashMap<u64, mpsc::Sender<Event>>>>;

/// Tokens a worker may send for one request beyond those the host has taken: the most the host
/// ever buffers per request between the worker and the client's side.
pub const WINDOW: u32 = 32;

/// A running request's events. Taking tokens grants the worker more (by halves of the
/// window), so a request whose reader stops soon stops generating.
pub struct Events {
    rx: mpsc::Receiver<Event>,
    id: u64,
    outbox: mpsc::UnboundedSender<Vec<u8>>,
    taken: u32,
}

impl Events {
    pub(super) fn new(
        id: u64,
        outbox: mpsc::UnboundedSender<Vec<u8>>,
    ) -> (Self, mpsc::Sender<Event>) {
        // Room for the window and the request's last event.
        let (tx, rx) = mpsc::channel(WINDOW as usize + 1);
        let events = Self {
            rx,
            id,
            outbox,
            taken: 0,
        };
        (events, tx)
    }

    /// The next event; `None` once the worker is gone.
    pub async fn recv(&mut self) -> Option<Event> {
        let event = self.rx.recv().await?;
        if matches!(event, Event::Token(_)) {
            self.taken += 1;
            if self.taken >= WINDOW / 2 {
                let credit = ToWorker::Credit {
                    id: self.id,
                    tokens: self.taken,
                };
                if let Ok(frame) = encode(&credit) {
                    let _ = self.outbox.send(frame);
                }
                self.taken = 0;
            }
        }
        Some(event)
    }
}

pub(super) enum LoadEvent {
    Progress(String, u64, u64),
    Loaded(ModelInfo),
    Failed(WireError),
}

#[derive(Default)]
pub(super) struct Waiters {
    pub(super) start: Option<oneshot::Sender<Result<FromWorker, WireError>>>,
    pub(super) load: Option<mpsc::UnboundedSender<LoadEvent>>,
    pub(super) unload: Option<oneshot::Sender<()>>,
    pub(super) pongs: HashMap<u64, oneshot::Sender<()>>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(super) fn dispatch(frame: FromWorker, pending: &Pending, waiters: &Mutex<Waiters>) {
    let to_request = |id: u64, event: Event, last: bool| {
        let mut pending = lock(pending);
        let overrun = pending.get(&id).is_some_and(|tx| {
            matches!(tx.try_send(event), Err(mpsc::error::TrySendError::Full(_)))
        });
        if overrun {
            // Only a worker that ignores its window gets here (the plugin wrote to the socket
            // itself): the request ends, its reader seeing the stream close.
            tracing::warn!(
                request = id,
                "the worker sent past its flow-control window; request dropped"
            );
        }
        if last || overrun {
            pending.remove(&id);
        }
    };
    match frame {
        FromWorker::Token { id, token } => to_request(id, Event::Token(token), false),
        FromWorker::Done { id, outcome } => to_request(id, Event::Done(outcome), true),
        FromWorker::Failed { id, error } => to_request(id, Event::Failed(error), true),
        FromWorker::Ready { .. } => {
            if let Some(tx) = lock(waiters).start.take() {
                let _ = tx.send(Ok(frame));
            }
        }
        FromWorker::StartFailed { error } => {
            if let Some(tx) = lock(waiters).start.take() {
                let _ = tx.send(Err(error));
            }
        }
        FromWorker::Progress { stage, done, total } => {
            if let Some(tx) = &lock(waiters).load {
                let _ = tx.send(LoadEvent::Progress(stage, done, total));
            }
        }
        FromWorker::Loaded { info } => {
            if let Some(tx) = lock(waiters).load.take() {
                let _ = tx.send(LoadEvent::Loaded(info));
            }
        }
        FromWorker::LoadFailed { error } => {
            if let Some(tx) = lock(waiters).load.take() {
                let _ = tx.send(LoadEvent::Failed(error));
            }
        }
        FromWorker::Pong { nonce } => {
            if let Some(tx) = lock(waiters).pongs.remove(&nonce) {
                let _ = tx.send(());
            }
        }
        FromWorker::Unloaded => {
            if let Some(tx) = lock(waiters).unload.take() {
                let _ = tx.send(());
            }
        }
    }
}

pub(super) fn fail_all(pending: &Pending, waiters: &Mutex<Waiters>, message: &str) {
    let error = WireError {
        kind: Fault::WorkerDied,
        message: message.to_string(),
    };
    for (_, tx) in lock(pending).drain() {
        // A full channel's reader still learns of the death: the channel closes after it.
        let _ = tx.try_send(Event::Failed(error.clone()));
    }
    let mut w = lock(waiters);
    if let Some(tx) = w.start.take() {
        let _ = tx.send(Err(error.clone()));
    }
    if let Some(tx) = w.load.take() {
        let _ = tx.send(LoadEvent::Failed(error));
    }
    w.unload = None;
    w.pongs.clear();
}

/// How a worker died, from its exit status and its cgroup's counters.
pub fn death_reason(status: Option<std::process::ExitStatus>, stats: Option<&Stats>) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(stats) = stats.filter(|s| s.oom_kills > 0) {
        let limit = stats
            .memory_limit_bytes
            .map(|b| ByteSize(b).to_string())
            .unwrap_or_else(|| "its".into());
        return format!("was killed: memory limit {limit} reached");
    }
    match status {
        Some(s) if s.code() == Some(0) => "exited".into(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(sig)) => {
                let name = nix::sys::signal::Signal::try_from(sig)
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|_| format!("signal {sig}"));
                format!("was killed by {name}")
            }
            _ => "ended".into(),
        },
        None => "ended".into(),
    }
}

/// Forwards the worker's stdout and stderr to ours, each line prefixed with the plugin's name.
pub(super) fn forward_output(
    name: &str,
    stdout: Option<tokio::process::ChildStdout>,
    stderr: Option<tokio::process::ChildStderr>,
) {
    fn pump<R: tokio::io::AsyncRead + Unpin + Send + 'static>(prefix: String, r: R) {
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::info!(target: "pio::worker", plugin = %prefix, "{line}");
            }
        });
    }
    if let Some(out) = stdout {
        pump(name.to_string(), out);
    }
    if let Some(err) = stderr {
        pump(name.to_string(), err);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{read_frame, TokenFrame};

    fn token(id: u64) -> FromWorker {
        FromWorker::Token {
            id,
            token: TokenFrame {
                token_id: 1,
                text: "a".into(),
                ..TokenFrame::default()
            },
        }
    }

    #[tokio::test]
    async fn taking_tokens_grants_credit_by_halves_of_the_window() {
        let (outbox, mut frames) = mpsc::unbounded_channel();
        let (mut events, tx) = Events::new(7, outbox);
        let pending: Pending = Arc::new(Mutex::new(HashMap::from([(7, tx)])));
        let waiters = Mutex::new(Waiters::default());
        for _ in 0..WINDOW {
            dispatch(token(7), &pending, &waiters);
        }
        for _ in 0..WINDOW / 2 - 1 {
            events.recv().await.unwrap();
        }
        assert!(frames.try_recv().is_err(), "no credit before half a window");
        events.recv().await.unwrap();
        let frame = frames.try_recv().expect("a credit frame");
        match read_frame::<ToWorker>(&mut frame.as_slice()).unwrap() {
            Some(ToWorker::Credit { id: 7, tokens }) => assert_eq!(tokens, WINDOW / 2),
            other => panic!("expected a credit, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_worker_that_overruns_its_window_loses_the_request() {
        let (outbox, _frames) = mpsc::unbounded_channel();
        let (mut events, tx) = Events::new(3, outbox);
        let pending: Pending = Arc::new(Mutex::new(HashMap::from([(3, tx)])));
        let waiters = Mutex::new(Waiters::default());
        for _ in 0..WINDOW + 5 {
            dispatch(token(3), &pending, &waiters);
        }
        assert!(lock(&pending).is_empty(), "the request was dropped");
        let mut received = 0;
        while events.recv().await.is_some() {
            received += 1;
        }
        assert_eq!(
            received,
            WINDOW as usize + 1,
            "what fit was delivered, then the end"
        );
    }
}
