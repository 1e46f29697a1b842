//! Ready-made host-side sinks for running a plugin in-process (tests, `--in-process` debugging):
//! one that collects tokens and can be cancelled, one that ignores progress.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use abi_stable::{sabi_trait::TD_Opaque, std_types::RStr};

use crate::abi::{
    Flow, GeneratedToken, ProgressSink, ProgressSinkBox, ProgressSink_TO, TokenSink, TokenSinkBox,
    TokenSink_TO,
};

/// Collects every token into a shared list; cancelled through a shared flag.
#[derive(Debug, Clone, Default)]
pub struct CollectSink {
    tokens: Arc<Mutex<Vec<GeneratedToken>>>,
    cancelled: Arc<AtomicBool>,
    /// Cancel automatically once this many tokens arrived.
    cancel_after: Option<usize>,
}

impl CollectSink {
    /// A sink that never cancels by itself.
    pub fn new() -> Self {
        Self::default()
    }

    /// A sink that asks the plugin to stop once `n` tokens arrived.
    pub fn cancelling_after(n: usize) -> Self {
        Self {
            cancel_after: Some(n),
            ..Self::default()
        }
    }

    /// A boxed handle for [`crate::Plugin::infer`]; this value keeps seeing what it receives.
    pub fn boxed(&self) -> TokenSinkBox {
        TokenSink_TO::from_value(self.clone(), TD_Opaque)
    }

    /// Cancels the request.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    /// The tokens received so far.
    pub fn tokens(&self) -> Vec<GeneratedToken> {
        self.tokens.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Their texts, concatenated.
    pub fn text(&self) -> String {
        self.tokens().iter().map(|t| t.text.as_str()).collect()
    }
}

impl TokenSink for CollectSink {
    fn emit(&mut self, token: GeneratedToken) -> Flow {
        let count = match self.tokens.lock() {
            Ok(mut tokens) => {
                tokens.push(token);
                tokens.len()
            }
            Err(_) => return Flow::Stop,
        };
        if self.cancel_after.is_some_and(|n| count >= n) {
            self.cancel();
        }
        if self.is_cancelled() {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }
}

/// Discards loading progress.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl NoProgress {
    /// A boxed handle for [`crate::Plugin::load_model`].
    pub fn boxed() -> ProgressSinkBox {
        ProgressSink_TO::from_value(NoProgress, TD_Opaque)
    }
}

impl ProgressSink for NoProgress {
    fn report(&mut self, _stage: RStr<'_>, _done: u64, _total: u64) -> Flow {
        Flow::Continue
    }
}
