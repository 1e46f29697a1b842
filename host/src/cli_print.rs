//! How `pio run` shows a generation: streamed text or JSON lines, and a progress bar while the
//! weights load (on a terminal only).

use std::io::{IsTerminal, Write};
use std::sync::Arc;

use pio_host::protocol::TokenFrame;
use pio_host::serve::output::Parsing;
use pio_plugin_api::wire::{InferOutcome, InferRequest, ModelInfo, Prompt};
use serde_json::{json, Value};

/// How `pio run` shows its output.
#[derive(Debug, Clone, Copy)]
pub struct Shown {
    /// One JSON object per token, then a summary line.
    pub json: bool,
    /// The model's special tokens stay in the text.
    pub special: bool,
}

/// Writes tokens to stdout as they arrive.
pub struct TokenPrinter {
    json: bool,
    index: usize,
    /// For a chat in JSON: how to parse the output, the tools offered, the text so far.
    chat: Option<(Parsing, Vec<Value>, String)>,
    /// In text: the special tokens left out (`--special` keeps them), as llama.cpp's CLI does.
    text: Option<Parsing>,
    /// Text goes to a terminal, which must not take control characters from the model
    /// (escape sequences that retitle, recolour or rewrite the screen) for its own.
    terminal: bool,
}

impl TokenPrinter {
    /// Text, or one JSON object per token when `json`.
    pub fn new(json: bool) -> Self {
        Self {
            json,
            index: 0,
            chat: None,
            text: None,
            terminal: !json && std::io::stdout().is_terminal(),
        }
    }

    /// In JSON, a chat's summary line also carries the `message` as the API returns it:
    /// `content`, and `reasoning_content` and `tool_calls` when the model (`info`) marks them.
    /// In text, the model's special tokens are left out unless `special`, except the markup
    /// that shows where reasoning or a tool call starts and ends.
    pub fn parsing(mut self, request: &InferRequest, info: &ModelInfo, special: bool) -> Self {
        let chat = matches!(request.prompt, Prompt::Messages(_));
        if !self.json {
            let ids = info.special_token_ids.clone();
            let tokens = info.token_bytes.as_ref().and_then(|t| t.table().ok());
            let parsing = Parsing::of(request, chat, info)
                .with_tokens(tokens.map(Arc::new))
                .with_special(ids.map(|ids| Arc::new(ids.into_iter().collect())), !special);
            self.text = Some(parsing);
        } else if chat {
            let parsing = Parsing::of(request, true, info);
            self.chat = Some((
                parsing,
                request.tools.clone().unwrap_or_default(),
                String::new(),
            ));
        }
        self
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
            if let Some((_, _, text)) = self.chat.as_mut() {
                text.push_str(&t.text);
            }
        } else {
            let text = match &self.text {
                Some(parsing) => parsing.shown(t.clone()).text,
                None => t.text.clone(),
            };
            match self.terminal {
                true => write!(out, "{}", visible(&text))?,
                false => write!(out, "{text}")?,
            }
        }
        self.index += 1;
        out.flush()
    }

    /// The end of a successful generation.
    pub fn done(&mut self, outcome: &InferOutcome) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        if self.json {
            let mut line = json!({"finish_reason": outcome.finish_reason, "usage": outcome.usage,
                "timings": outcome.timings});
            if let Some((parsing, tools, text)) = self.chat.take() {
                let (reasoning, extracted) = parsing.split(text, &tools);
                let mut message = json!({"role": "assistant", "content": extracted.content});
                if let Some(r) = reasoning {
                    message["reasoning_content"] = json!(r);
                }
                if !extracted.calls.is_empty() {
                    message["tool_calls"] = extracted.calls.iter().map(|c| c.to_json()).collect();
                }
                line["message"] = message;
            }
            writeln!(out, "{line}")
        } else {
            writeln!(out)
        }
    }

    /// The end of a failed generation.
    pub fn failed(&mut self, error: &dyn std::fmt::Display) {
        // Not println!/eprintln!: a closed stdout or stderr must not turn a failure into a panic.
        if !self.json {
            let _ = writeln!(std::io::stdout());
        }
        let _ = writeln!(std::io::stderr(), "error: {error}");
    }
}

/// `text` with the characters a terminal would act on written out (`\x1b`, `\u{9b}`): control
/// characters, and the bidirectional overrides that reorder what is shown. Newlines, tabs and
/// carriage returns (Windows line ends) stay as they are.
fn visible(text: &str) -> std::borrow::Cow<'_, str> {
    let bidi = |c: char| matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    let acts = |c: char| (c.is_control() && !matches!(c, '\n' | '\t' | '\r')) || bidi(c);
    if !text.chars().any(acts) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            c if !acts(c) => out.push(c),
            c if (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    out.into()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_written_out_for_a_terminal() {
        assert_eq!(visible("plain 中文\n\tline\r\n"), "plain 中文\n\tline\r\n");
        // An escape sequence retitling the terminal, a bell, a DEL and a C1 CSI.
        assert_eq!(
            visible("a\u{1b}]0;owned\u{7}b\u{7f}\u{9b}2J"),
            "a\\x1b]0;owned\\x07b\\x7f\\u{9b}2J"
        );
        // A right-to-left override, which would show the text after it reversed.
        assert_eq!(visible("ab\u{202e}cd"), "ab\\u{202e}cd");
    }
}
