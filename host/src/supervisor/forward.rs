//! One request's way from its worker to its caller, under the supervisor's request deadline.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::handle::{Event, Worker};
use super::routing::{lock, Events};
use super::supervised::{err, Shared};
use crate::fault::Fault;
use crate::protocol::WireError;

/// Carries one request's events from its worker to its caller: under the request deadline
/// (past it, the worker is replaced: a plugin stuck in a loop never sees a cancel), cancelling
/// in the worker when the caller goes away, keeping the engine's newest figures.
pub(super) struct Forward {
    pub(super) name: String,
    pub(super) timeout: Option<Duration>,
    pub(super) shared: Arc<Mutex<Shared>>,
    pub(super) worker: Arc<Worker>,
    pub(super) id: u64,
}

impl Forward {
    pub(super) async fn run(self, mut events: Events, tx: mpsc::Sender<Event>) {
        let mut deadline = self.timeout.map(|t| tokio::time::Instant::now() + t);
        loop {
            let next = match deadline {
                Some(d) => tokio::time::timeout_at(d, events.recv()).await,
                None => Ok(events.recv().await),
            };
            let event = match next {
                Ok(Some(event)) => self.noted(event),
                Ok(None) => return,
                Err(_) => return self.past_deadline(&tx).await,
            };
            let last = !matches!(event, Event::Token(_));
            let waited = tokio::time::Instant::now();
            if tx.send(event).await.is_err() {
                // The caller went away: stop generating.
                self.worker.cancel(self.id);
                return;
            }
            // Time spent waiting for a slow reader is not the plugin's: the deadline (which
            // replaces the worker) moves by as much.
            if let Some(d) = deadline.as_mut() {
                *d += waited.elapsed();
            }
            if last {
                return;
            }
        }
    }

    /// `event`, with a worker's death marked as a restart and the engine's figures kept. A
    /// plugin that panicked has its worker stopped by the traffic task (`Routes::dispatch`) and
    /// replaced, as after a crash; requests running beside this one fail as they would then.
    fn noted(&self, event: Event) -> Event {
        match event {
            Event::Failed(e) if e.kind == Fault::WorkerDied => Event::Failed(WireError {
                message: format!("{}; restarting", e.message),
                ..e
            }),
            Event::Failed(e) if e.kind == Fault::Panicked => Event::Failed(WireError {
                message: format!("{}; its worker is being restarted", e.message),
                ..e
            }),
            Event::Done(outcome) => {
                if let Some(figures) = outcome.engine {
                    lock(&self.shared).keep_newest(figures);
                }
                Event::Done(outcome)
            }
            other => other,
        }
    }

    async fn past_deadline(&self, tx: &mpsc::Sender<Event>) {
        let secs = self.timeout.map_or(0, |t| t.as_secs_f64().ceil() as u64);
        self.worker.kill_because(format!(
            "was stopped: a request ran past its {secs} s deadline"
        ));
        let message = format!(
            "request to {} ran past its {secs} s deadline; its worker is being restarted",
            self.name
        );
        let _ = tx.send(Event::Failed(err(Fault::Timeout, message).0)).await;
    }
}
