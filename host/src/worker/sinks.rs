//! Where a worker's plugin reports to: the socket's write half, shared by every thread, and the
//! per-request token sink that honours the host's cancel and its flow-control window.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use pio_plugin_api::{Flow, GeneratedToken, ProgressSink, RStr, TokenSink};

use crate::fault::Fault;
use crate::protocol::{
    write_frame, FrameError, FromWorker, TokenFrame, WireError, MAX_FRAME, MAX_TOKEN_BYTES,
};

/// The socket's write half, shared by every thread that reports.
#[derive(Clone)]
pub(super) struct Outbox(pub(super) Arc<Mutex<UnixStream>>);

impl Outbox {
    /// Sends one frame; false when the host is gone. A request's frame that cannot be sent (an
    /// answer over the frame limit: a long prompt's scores, say) fails the request instead, so
    /// that its client is told rather than left waiting for its deadline.
    pub(super) fn send(&self, message: &FromWorker) -> bool {
        let Ok(mut stream) = self.0.lock() else {
            return false;
        };
        // A frame that cannot be encoded is refused before anything is written.
        match write_frame(&mut *stream, message) {
            Ok(()) => true,
            Err(FrameError::Io(_)) => false,
            Err(e) => unsendable(message, &e)
                .is_some_and(|failed| write_frame(&mut *stream, &failed).is_ok()),
        }
    }
}

/// The failure that replaces request `message`'s frame, which `e` kept from being sent.
fn unsendable(message: &FromWorker, e: &FrameError) -> Option<FromWorker> {
    let id = match message {
        FromWorker::Done { id, .. } | FromWorker::Token { id, .. } => *id,
        _ => return None,
    };
    let why = match e {
        FrameError::TooLarge(bytes) => format!(
            "the answer takes {bytes} bytes, more than the {MAX_FRAME} a worker's frame may carry: ask for fewer logprobs alternatives or score a shorter prompt"
        ),
        other => format!("the answer could not be sent: {other}"),
    };
    Some(FromWorker::Failed {
        id,
        error: WireError::new(Fault::InvalidInput, why),
    })
}

/// The host's say over one running request: whether it is cancelled, and how many more tokens
/// it will take (`None`: no limit).
#[derive(Default)]
pub(super) struct Control {
    state: Mutex<ControlState>,
    changed: Condvar,
}

#[derive(Default)]
struct ControlState {
    cancelled: bool,
    credit: Option<u64>,
}

impl Control {
    /// A request the host lets send `window` tokens before it grants more.
    pub(super) fn with_window(window: Option<u32>) -> Self {
        Self {
            state: Mutex::new(ControlState {
                cancelled: false,
                credit: window.map(u64::from),
            }),
            changed: Condvar::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The host cancelled the request.
    pub(super) fn cancel(&self) {
        self.state().cancelled = true;
        self.changed.notify_all();
    }

    /// The host took `tokens` more.
    pub(super) fn grant(&self, tokens: u32) {
        let mut state = self.state();
        if let Some(credit) = state.credit.as_mut() {
            *credit += u64::from(tokens);
        }
        drop(state);
        self.changed.notify_all();
    }

    fn is_cancelled(&self) -> bool {
        self.state().cancelled
    }

    /// Waits until one more token may be sent; false when the request is cancelled instead.
    fn take_one(&self) -> bool {
        let mut state = self.state();
        loop {
            if state.cancelled {
                return false;
            }
            match state.credit.as_mut() {
                None => return true,
                Some(c) if *c > 0 => {
                    *c -= 1;
                    return true;
                }
                Some(_) => {}
            }
            // The timeout only guards against a lost wake-up; grants and cancels notify.
            state = match self.changed.wait_timeout(state, Duration::from_secs(1)) {
                Ok((s, _)) => s,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

/// A request's tokens, to the host as frames.
pub(super) struct WireSink {
    pub(super) id: u64,
    pub(super) outbox: Outbox,
    pub(super) control: Arc<Control>,
}

impl WireSink {
    fn send(&mut self, token: TokenFrame) -> Flow {
        // Blocks while the host's window is full: the plugin's generation waits for its reader.
        if !self.control.take_one() {
            return Flow::Stop;
        }
        // A token past the protocol's size fails its request alone, and the plugin is told to
        // stop (sent, the daemon would replace the worker and every request in it; told to go
        // on, the plugin waited for credit for good once the request had ended).
        let bytes = token.text_bytes();
        if bytes > MAX_TOKEN_BYTES {
            let why = format!(
                "the plugin emitted a token of {bytes} bytes of text, more than the {MAX_TOKEN_BYTES} one may hold: a bug of the plugin"
            );
            let failed = FromWorker::Failed {
                id: self.id,
                error: WireError::new(Fault::Internal, why),
            };
            self.outbox.send(&failed);
            self.control.cancel();
            return Flow::Stop;
        }
        let frame = FromWorker::Token { id: self.id, token };
        if !self.outbox.send(&frame) || self.is_cancelled() {
            return Flow::Stop;
        }
        Flow::Continue
    }
}

impl TokenSink for WireSink {
    fn emit(&mut self, token: GeneratedToken) -> Flow {
        self.send(TokenFrame::from(token))
    }

    fn is_cancelled(&self) -> bool {
        self.control.is_cancelled()
    }
}

/// Model-loading progress, to the host as frames.
pub(super) struct WireProgress(pub(super) Outbox);

impl ProgressSink for WireProgress {
    fn report(&mut self, stage: RStr<'_>, done: u64, total: u64) -> Flow {
        let frame = FromWorker::Progress {
            stage: stage.to_string(),
            done,
            total,
        };
        if self.0.send(&frame) {
            Flow::Continue
        } else {
            Flow::Stop
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token past the protocol's size fails its request alone and stops the plugin: the
    /// worker sends the failure, not the token, and later emits stop at once.
    #[test]
    fn an_oversized_token_fails_its_request_and_stops_the_plugin() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let control = Arc::new(Control::with_window(Some(32)));
        let mut sink = WireSink {
            id: 7,
            outbox: Outbox(Arc::new(Mutex::new(ours))),
            control: control.clone(),
        };
        let big = TokenFrame {
            text: "x".repeat(MAX_TOKEN_BYTES + 1),
            ..TokenFrame::default()
        };
        assert!(matches!(sink.send(big), Flow::Stop));
        assert!(sink.is_cancelled());
        assert!(matches!(sink.send(TokenFrame::default()), Flow::Stop));
        let mut theirs = theirs;
        match crate::protocol::read_frame::<FromWorker>(&mut theirs).unwrap() {
            Some(FromWorker::Failed { id: 7, error }) => {
                assert!(error.message.contains("bytes of text"), "{}", error.message)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_window_admits_that_many_tokens_then_waits_for_a_grant() {
        let control = Arc::new(Control::with_window(Some(2)));
        assert!(control.take_one() && control.take_one());
        let waiter = {
            let control = control.clone();
            std::thread::spawn(move || control.take_one())
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiter.is_finished(), "the third token waits for credit");
        control.grant(1);
        assert!(waiter.join().unwrap());
    }

    #[test]
    fn a_cancel_releases_a_sink_waiting_for_credit() {
        let control = Arc::new(Control::with_window(Some(0)));
        let waiter = {
            let control = control.clone();
            std::thread::spawn(move || control.take_one())
        };
        std::thread::sleep(Duration::from_millis(50));
        control.cancel();
        assert!(!waiter.join().unwrap());
    }

    #[test]
    fn an_answer_over_the_frame_limit_fails_its_request_instead() {
        let (host, worker) = UnixStream::pair().unwrap();
        let outbox = Outbox(Arc::new(Mutex::new(worker)));
        let mut outcome = pio_plugin_api::wire::InferOutcome::default();
        let score = pio_plugin_api::wire::PromptLogprob {
            top: vec![(1, -1.5); 20],
            ..Default::default()
        };
        outcome.prompt_logprobs = Some(vec![score; 100_000]);
        // Read beside the send: a frame sent whole would otherwise fill the socket and block.
        let reader = std::thread::spawn(move || {
            let mut host = host;
            crate::protocol::read_frame::<FromWorker>(&mut host)
        });
        assert!(outbox.send(&FromWorker::Done { id: 7, outcome }));
        match reader.join().unwrap().unwrap().unwrap() {
            FromWorker::Failed { id, error } => {
                assert_eq!((id, error.kind), (7, Fault::InvalidInput));
                assert!(
                    error.message.contains("fewer logprobs"),
                    "{}",
                    error.message
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn without_a_window_tokens_flow_freely() {
        let control = Control::with_window(None);
        assert!((0..1000).all(|_| control.take_one()));
    }
}
