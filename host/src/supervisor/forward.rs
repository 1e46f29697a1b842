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

/// The most text one request may bring back: a context's worth is a few MiB; the rest is a
/// plugin that does not stop, which the daemon would otherwise hold in memory whole.
pub(super) const MAX_OUTPUT_BYTES: usize = 64 << 20;

/// What a request asked for, which its worker may not exceed: the daemon buffers a whole
/// answer (and a stream's open tool call), so a plugin ignoring `max_tokens` could fill it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Budget {
    /// Tokens, the end of sequence included (`max_tokens` + 1); `None`: no bound but the bytes.
    pub(super) tokens: Option<u64>,
    /// Alternatives per token (`logprobs`): any more are dropped.
    pub(super) alternatives: usize,
    /// Whether each token's logprob was asked for: a token sent without one would be shown
    /// as certain (chat's `logprob` is a number) or as a gap in a sum of scores.
    pub(super) scored: bool,
    /// Tokens sent so far.
    pub(super) sent: u64,
    /// Text bytes sent so far.
    pub(super) bytes: usize,
}

impl Budget {
    /// The budget of `request`.
    pub(super) fn of(request: &pio_plugin_api::wire::InferRequest) -> Self {
        Self {
            tokens: request.max_tokens.map(|m| u64::from(m) + 1),
            alternatives: request.logprobs.unwrap_or(0) as usize,
            scored: request.logprobs.is_some(),
            sent: 0,
            bytes: 0,
        }
    }

    /// Counts `token` (its alternatives cut to those asked for); why it is one too many, if so.
    pub(super) fn spend(&mut self, token: &mut crate::protocol::TokenFrame) -> Option<String> {
        token.top_logprobs.truncate(self.alternatives);
        let top: usize = token.top_logprobs.iter().map(|t| t.1.len()).sum();
        self.sent += 1;
        self.bytes = self.bytes.saturating_add(token.text.len() + top);
        if self.scored && token.logprob.is_none() {
            return Some("sent a token without the logprob asked for".into());
        }
        if self.tokens.is_some_and(|most| self.sent > most) {
            return Some(format!(
                "sent more than the {} tokens asked for (max_tokens)",
                self.tokens.unwrap_or(0) - 1
            ));
        }
        (self.bytes > MAX_OUTPUT_BYTES).then(|| {
            format!(
                "sent more than {} MiB of text for one request",
                MAX_OUTPUT_BYTES >> 20
            )
        })
    }
}

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
    pub(super) budget: Budget,
    /// The plugin sent past the budget: the request was failed and cancelled.
    pub(super) overrun: bool,
}

impl Forward {
    pub(super) async fn run(mut self, mut events: Events, tx: mpsc::Sender<Event>) {
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
                () = tx.closed() => return self.cancelled(&mut events, deadline).await,
            };
            let event = match next {
                Ok(Some(event)) => self.noted(event),
                Ok(None) => return,
                Err(_) => return self.past_deadline(&mut events, &tx).await,
            };
            let last = !matches!(event, Event::Token(_));
            let waited = tokio::time::Instant::now();
            if tx.send(event).await.is_err() || self.overrun {
                // The caller went away, or the plugin sent past what was asked: stop it,
                // still under the deadline (it may ignore the cancel as it ignored the ask).
                return self.cancelled(&mut events, deadline).await;
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
    fn noted(&mut self, event: Event) -> Event {
        match event {
            Event::Token(mut token) => match self.budget.spend(&mut token) {
                None => Event::Token(token),
                // The plugin's fault: this request ends, its worker serves on.
                Some(why) => {
                    self.overrun = true;
                    Event::Failed(WireError {
                        kind: Fault::Protocol,
                        message: format!("plugin {} {why}; the request was stopped", self.name),
                    })
                }
            },
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

    /// Cancels the request its caller left, and holds it to its deadline all the same: a
    /// plugin that ignores the cancel (stuck in a loop) kept running it for good, its worker
    /// busy and its place in flight taken. What comes meanwhile is read and dropped.
    async fn cancelled(&self, events: &mut Events, deadline: Option<tokio::time::Instant>) {
        self.worker.cancel(self.id);
        let Some(deadline) = deadline else {
            return;
        };
        let ended = ended(events);
        let limit = deadline.max(tokio::time::Instant::now()) + GRACE;
        if tokio::time::timeout_at(limit, ended).await.is_err() {
            let secs = self.timeout.unwrap_or(GRACE).as_secs_f64().ceil() as u64;
            self.worker.kill_because(format!(
                "was stopped: a request whose client left ran past its {secs} s deadline and did not end when cancelled"
            ));
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
        let ended = ended(events);
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

/// Resolves when the request ends (its last event, or its route gone), its tokens dropped.
async fn ended(events: &mut Events) {
    while let Some(event) = events.recv().await {
        if !matches!(event, Event::Token(_)) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TokenFrame;

    fn token(text: &str, alternatives: usize) -> TokenFrame {
        TokenFrame {
            token_id: 1,
            text: text.into(),
            logprob: Some(-0.5),
            top_logprobs: (0..alternatives as u32)
                .map(|i| (i, "t".into(), -1.0))
                .collect(),
        }
    }

    /// A plugin's output is held to what the request asked: `max_tokens` (and its end of
    /// sequence), the alternatives asked for, and a cap on the text the daemon buffers.
    #[test]
    fn a_request_takes_no_more_than_it_asked_for() {
        let request = pio_plugin_api::wire::InferRequest {
            max_tokens: Some(2),
            logprobs: Some(1),
            ..Default::default()
        };
        let mut budget = Budget::of(&request);
        let mut t = token("a", 50);
        assert_eq!(budget.spend(&mut t), None);
        assert_eq!(t.top_logprobs.len(), 1, "cut to the one asked for");
        assert_eq!(budget.spend(&mut token("b", 0)), None);
        assert_eq!(budget.spend(&mut token("", 0)), None, "the end of sequence");
        let e = budget.spend(&mut token("c", 0)).unwrap();
        assert!(e.contains("2 tokens") && e.contains("max_tokens"), "{e}");
        // Scores asked for: a token without one is not passed on as certain.
        let mut unscored = token("d", 0);
        unscored.logprob = None;
        let e = Budget::of(&request).spend(&mut unscored).unwrap();
        assert!(e.contains("logprob"), "{e}");
        // No max_tokens: the bytes still bound it.
        let mut open = Budget::of(&Default::default());
        let big = "x".repeat(MAX_OUTPUT_BYTES / 2);
        assert_eq!(open.spend(&mut token(&big, 0)), None);
        assert_eq!(open.spend(&mut token(&big, 0)), None);
        let e = open.spend(&mut token("x", 0)).unwrap();
        assert!(e.contains("MiB"), "{e}");
    }
}
