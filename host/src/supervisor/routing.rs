//! Where a worker's frames go — to the request they belong to or to whoever waits for a load,
//! an unload or a pong — and, when it dies, the account of how, given to everyone still waiting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pio_plugin_api::wire::ModelInfo;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, oneshot};

use super::handle::Event;
use crate::fault::Fault;
use crate::protocol::{FromWorker, WireError};
use crate::sandbox::cgroup::Stats;
use crate::units::ByteSize;

pub(super) type Pending = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Event>>>>;

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
        if let Some(tx) = pending.get(&id) {
            let _ = tx.send(event);
        }
        if last {
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
        let _ = tx.send(Event::Failed(error.clone()));
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
