//! One request's way from its worker to its caller, under the supervisor's request deadline.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::handle::{Event, Worker};
use super::routing::{lock, Events};
use super::supervised::{err, Shared, NOT_RESTARTED};
use crate::fault::Fault;
use crate::protocol::WireError;

/// How long a request cancelled at its deadline has to end before its worker is replaced (at
/// most the deadline itself).
const GRACE: Duration = Duration::from_secs(5);

/// Carries one request's events from its worker to its caller: under the request deadline
/// (past it, the request is cancelled, and the worker replaced only if the request does not end
/// within [`GRACE`]: a plugin stuck in a loop never sees a cancel, while a batching engine's
/// other requests must not fail with a late one), cancelling in the worker when the caller goes
/// away, keeping the engine's newest figures.
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
            let next = async {
                match deadline {
                    Some(d) => tokio::time::timeout_at(d, events.recv()).await,
                    None => Ok(events.recv().await),
                }
            };
            // A caller gone while nothing comes (a long prefill, a wait for a place in the
            // batch) stops the request at once, not at its next token or its deadline.
            let next = tokio::select! {
                next = next => next,
                () = tx.closed() => {
                    self.worker.cancel(self.id);
                    return;
                }
            };
            let event = match next {
                Ok(Some(event)) => self.noted(event),
                Ok(None) => return,
                Err(_) => return self.past_deadline(&mut events, &tx).await,
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
            // Stopped on purpose (unloaded, replaced, the daemon shutting down): no restart
            // follows, and another replica or a retry may serve it.
            Event::Failed(e)
                if e.kind == Fault::WorkerDied && lock(&self.shared).stopped() =>
            {
                Event::Failed(WireError {
                    kind: Fault::Stopped,
                    message: format!(
                        "model {} was stopped (unloaded, replaced, or the daemon is shutting down) before the request ended",
                        self.name
                    ),
                })
            }
            Event::Failed(e) if e.kind == Fault::WorkerDied => Event::Failed(WireError {
                message: format!("{}; {}", e.message, self.after_death("restarting")),
                ..e
            }),
            Event::Failed(e) if e.kind == Fault::Panicked => Event::Failed(WireError {
                message: format!(
                    "{}; {}",
                    e.message,
                    self.after_death("its worker is being restarted")
                ),
                ..e
            }),
            Event::Done(outcome) => {
                if let Some(figures) = outcome.engine {
                    lock(&self.shared).keep_newest(&self.worker, figures);
                }
                Event::Done(outcome)
            }
            other => other,
        }
    }

    /// What follows a worker's death: `restart` in words, or none while the plugin drains.
    fn after_death<'a>(&self, restart: &'a str) -> &'a str {
        if lock(&self.shared).draining() {
            NOT_RESTARTED
        } else {
            restart
        }
    }

    async fn past_deadline(&self, events: &mut Events, tx: &mpsc::Sender<Event>) {
        let timeout = self.timeout.unwrap_or(GRACE);
        let secs = timeout.as_secs_f64().ceil() as u64;
        let message = format!(
            "request to {} ran past its {secs} s deadline (supervisor.request_timeout_secs) and was cancelled",
            self.name
        );
        self.worker.cancel(self.id);
        let ended = async {
            while let Some(event) = events.recv().await {
                if !matches!(event, Event::Token(_)) {
                    return;
                }
            }
        };
        // The grace runs while the caller is told: a stalled client must not delay it.
        let told = tx.send(Event::Failed(err(Fault::Timeout, message).0));
        let (_, ended) = tokio::join!(told, tokio::time::timeout(GRACE.min(timeout), ended));
        if ended.is_err() {
            self.worker.kill_because(format!(
                "was stopped: a request ran past its {secs} s deadline and did not end when cancelled"
            ));
        }
    }
}
