//! How `pio run` shows a generation: streamed text or JSON lines, and a progress bar while the
//! weights load (on a terminal only).

use std::io::{IsTerminal, Write};

use pio_host::protocol::TokenFrame;
use pio_plugin_api::wire::InferOutcome;
use serde_json::json;

/// Writes tokens to stdout as they arrive.
pub struct TokenPrinter {
    json: bool,
    index: usize,
}

impl TokenPrinter {
    /// Text, or one JSON object per token when `json`.
    pub fn new(json: bool) -> Self {
        Self { json, index: 0 }
    }

    /// One token.
    pub fn token(&mut self, t: &TokenFrame) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        if self.json {
            let top: Vec<_> = t
                .top_logprobs
                .iter()
                .map(|(id, text, lp)| json!({"token_id": id, "text": text, "logprob": lp}))
                .collect();
            let line = json!({"index": self.index, "token_id": t.token_id, "text": t.text,
                "logprob": t.logprob, "top_logprobs": top});
            writeln!(out, "{line}")?;
        } else {
            write!(out, "{}", t.text)?;
        }
        self.index += 1;
        out.flush()
    }

    /// The end of a successful generation.
    pub fn done(&mut self, outcome: &InferOutcome) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        if self.json {
            let line = json!({"finish_reason": outcome.finish_reason, "usage": outcome.usage,
                "timings": outcome.timings});
            writeln!(out, "{line}")
        } else {
            writeln!(out)
        }
    }

    /// The end of a failed generation.
    pub fn failed(&mut self, error: &dyn std::fmt::Display) {
        if !self.json {
            println!();
        }
        eprintln!("error: {error}");
    }
}

/// A progress bar for model loading, shown only when stderr is a terminal.
#[derive(Clone)]
pub struct LoadProgress {
    bar: Option<indicatif::ProgressBar>,
}

impl LoadProgress {
    /// A bar for loading `name`.
    pub fn new(name: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_message(format!("loading {name}"));
            bar
        });
        Self { bar }
    }

    /// `done` of `total` units of `stage`.
    pub fn update(&self, stage: &str, done: u64, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(done);
            bar.set_prefix(stage.to_string());
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
