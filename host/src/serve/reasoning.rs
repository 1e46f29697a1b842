//! Reasoning in model output, split from the answer into the API's `reasoning_content` (as vLLM's
//! reasoning parsers and DeepSeek's API return it): each model family marks it its own way, named
//! by the plugin in `ModelInfo::reasoning_format`. Nothing is dropped: every byte of the output
//! lands in the reasoning or the content, except the markers themselves.

const OPEN: &str = "<think>";
/// The marker that ends the reasoning block.
pub const CLOSE: &str = "</think>";
/// The markup the reasoning parser reads.
pub const MARKERS: [&str; 2] = [OPEN, CLOSE];

/// How a model marks its reasoning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `<think>…</think>` before the answer, the chat template opening the block at the end of
    /// the prompt when thinking is on (GLM-4.5/4.6/4.7: vLLM's `glm45`).
    Think,
}

impl Format {
    /// The format a plugin names, if this host knows it.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "glm45" => Some(Self::Think),
            _ => None,
        }
    }
}

/// Whether a chat request's output starts inside the reasoning block: only when the template
/// opens the assistant's turn (a continued final message goes on with its text, which the
/// templates write after the reasoning), and thinking is on unless `chat_template_kwargs` turn
/// `enable_thinking` off (the templates' shared switch).
pub fn starts_thinking(request: &pio_plugin_api::wire::InferRequest) -> bool {
    let opens_a_turn =
        !request.continue_final_message && request.add_generation_prompt != Some(false);
    let switch = request.chat_template_kwargs.get("enable_thinking");
    opens_a_turn && !switch.is_some_and(falsy)
}

/// Jinja's falsiness, which the templates test the switch with (`not enable_thinking`): a
/// client's `null`, `0` or `""` turns thinking off as `false` does.
fn falsy(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// A completion split in two.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Split {
    /// The reasoning, when there was any.
    pub reasoning: Option<String>,
    /// The answer.
    pub content: String,
}

/// Splits a whole completion. `thinking`: the prompt left the model inside the reasoning block.
pub fn split(text: &str, thinking: bool) -> Split {
    let mut s = Splitter::new(thinking);
    let (mut reasoning, mut content) = s.push(text);
    let (r, c) = s.finish();
    reasoning.push_str(&r);
    content.push_str(&c);
    Split {
        reasoning: (!reasoning.is_empty()).then_some(reasoning),
        content,
    }
}

/// Splits a completion as it streams: each piece of text goes to the reasoning or the content as
/// soon as no marker can still be forming at its end. The whitespace around the reasoning, and
/// before the answer that follows it, is left out (the templates write `<think>\n…\n</think>\n\n`),
/// streamed or not alike.
#[derive(Debug, Clone)]
pub struct Splitter {
    thinking: bool,
    /// Text that may be the start of a marker.
    held: String,
    /// Whether any content was released yet (a `<think>` is a marker only before the answer).
    answered: bool,
    /// Whitespace at the end of the reasoning so far: released only if more reasoning follows.
    reasoning_space: String,
    /// Whether any reasoning was released (whitespace before it is left out).
    reasoned: bool,
    /// A reasoning block closed and no answer came yet: whitespace is left out.
    after_block: bool,
}

impl Splitter {
    /// A splitter whose text starts inside the reasoning block when `thinking`.
    pub fn new(thinking: bool) -> Self {
        Self {
            thinking,
            held: String::new(),
            answered: false,
            reasoning_space: String::new(),
            reasoned: false,
            after_block: false,
        }
    }

    /// Feeds `text`; returns the (reasoning, content) it releases.
    pub fn push(&mut self, text: &str) -> (String, String) {
        let (reasoning, content) = self.split_off(text);
        self.trimmed(reasoning, content)
    }

    /// Releases what was held at the end of the output.
    pub fn finish(&mut self) -> (String, String) {
        let rest = std::mem::take(&mut self.held);
        if self.thinking {
            self.trimmed(rest, String::new())
        } else {
            self.trimmed(String::new(), rest)
        }
    }

    /// The released pieces without the whitespace around the reasoning and before the answer.
    fn trimmed(&mut self, reasoning: String, content: String) -> (String, String) {
        let reasoning = if self.reasoned {
            reasoning.as_str()
        } else {
            reasoning.trim_start()
        };
        let mut shown = String::new();
        if !reasoning.is_empty() {
            let all = std::mem::take(&mut self.reasoning_space) + reasoning;
            let kept = all.trim_end();
            self.reasoned |= !kept.is_empty();
            shown = kept.to_string();
            self.reasoning_space = all[kept.len()..].to_string();
        }
        let content = if self.after_block {
            let rest = content.trim_start();
            self.after_block = rest.is_empty();
            rest.to_string()
        } else {
            content
        };
        (shown, content)
    }

    /// The (reasoning, content) `text` releases, as the model wrote them.
    fn split_off(&mut self, text: &str) -> (String, String) {
        self.held.push_str(text);
        let (mut reasoning, mut content) = (String::new(), String::new());
        loop {
            let marker = if self.thinking { CLOSE } else { OPEN };
            if !self.thinking && self.answered {
                // Past the reasoning: everything is the answer.
                content.push_str(&std::mem::take(&mut self.held));
                return (reasoning, content);
            }
            match self.held.find(marker) {
                Some(at) => {
                    let before: String = self.held.drain(..at + marker.len()).collect();
                    let before = &before[..at];
                    if self.thinking {
                        reasoning.push_str(before);
                    } else {
                        // Text before an opening marker is the answer, which ends the chance
                        // of reasoning; the marker itself then stays text.
                        if !before.trim().is_empty() {
                            content.push_str(before);
                            content.push_str(marker);
                            self.answered = true;
                            continue;
                        }
                    }
                    self.thinking = !self.thinking;
                    if !self.thinking {
                        // One closing marker ends the reasoning for good.
                        self.answered = true;
                        self.after_block = true;
                    }
                }
                None => {
                    let keep = partial_suffix(&self.held, marker);
                    let ready: String = self.held.drain(..self.held.len() - keep).collect();
                    if self.thinking {
                        reasoning.push_str(&ready);
                    } else if !ready.trim().is_empty() || self.answered {
                        self.answered = true;
                        content.push_str(&ready);
                    } else {
                        // Leading whitespace before a possible `<think>`: hold it.
                        self.held.insert_str(0, &ready);
                    }
                    return (reasoning, content);
                }
            }
        }
    }
}

/// The length of the longest end of `text` that starts `marker` (a marker split across pieces).
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reasoning_ends_at_the_closing_marker() {
        let s = split("Let me think.\nOK.</think>\nThe answer is 4.", true);
        assert_eq!(s.reasoning.as_deref(), Some("Let me think.\nOK."));
        assert_eq!(s.content, "The answer is 4.");
    }

    #[test]
    fn without_thinking_everything_is_the_answer() {
        let s = split("The answer is 4.", false);
        assert_eq!(s.reasoning, None);
        assert_eq!(s.content, "The answer is 4.");
        // A model that opens a block itself still has it split out.
        let s = split("<think>hmm</think>4", false);
        assert_eq!(s.reasoning.as_deref(), Some("hmm"));
        assert_eq!(s.content, "4");
        // A marker after the answer began is text.
        let s = split("Use <think> tags.", false);
        assert_eq!(
            (s.reasoning, s.content.as_str()),
            (None, "Use <think> tags.")
        );
    }

    #[test]
    fn output_cut_off_while_thinking_is_all_reasoning() {
        let s = split("Still thinking about", true);
        assert_eq!(s.reasoning.as_deref(), Some("Still thinking about"));
        assert_eq!(s.content, "");
    }

    #[test]
    fn a_second_closing_marker_is_part_of_the_answer() {
        let s = split("a</think>b</think>c", true);
        assert_eq!(s.reasoning.as_deref(), Some("a"));
        assert_eq!(s.content, "b</think>c");
    }

    #[test]
    fn streamed_pieces_split_a_marker_anywhere_and_lose_nothing() {
        let text = "Plan: add.\n</think>\n\nIt is 4 <b>.";
        for cut in 1..text.len() {
            if !text.is_char_boundary(cut) {
                continue;
            }
            let mut s = Splitter::new(true);
            let (mut r, mut c) = (String::new(), String::new());
            for piece in [&text[..cut], &text[cut..]] {
                let (a, b) = s.push(piece);
                r.push_str(&a);
                c.push_str(&b);
            }
            let (a, b) = s.finish();
            r.push_str(&a);
            c.push_str(&b);
            // The whitespace around the reasoning is left out, streamed as whole.
            assert_eq!(r, "Plan: add.", "cut at {cut}");
            assert_eq!(c, "It is 4 <b>.", "cut at {cut}");
            let whole = split(text, true);
            assert_eq!(
                (whole.reasoning.as_deref(), whole.content.as_str()),
                (Some(r.as_str()), c.as_str())
            );
        }
    }

    /// Streamed a character at a time, the pieces join to what the whole answer's split gives:
    /// whitespace inside the reasoning kept, around it and before the answer left out.
    #[test]
    fn streamed_and_whole_agree_on_whitespace() {
        for (text, thinking) in [
            ("\n  a \n\n b \n</think>\n ans \n", true),
            ("<think>\n x\n</think>\n\n y", false),
            ("\n</think>\n\nonly the answer", true),
            ("  plain answer  ", false),
        ] {
            let mut s = Splitter::new(thinking);
            let (mut r, mut c) = (String::new(), String::new());
            for ch in text.chars() {
                let (a, b) = s.push(&ch.to_string());
                r.push_str(&a);
                c.push_str(&b);
            }
            let (a, b) = s.finish();
            r.push_str(&a);
            c.push_str(&b);
            let whole = split(text, thinking);
            assert_eq!(whole.reasoning.clone().unwrap_or_default(), r, "{text:?}");
            assert_eq!(whole.content, c, "{text:?}");
        }
        let s = split("\n  a \n\n b \n</think>\n ans \n", true);
        assert_eq!(
            (s.reasoning.as_deref(), s.content.as_str()),
            (Some("a \n\n b"), "ans \n")
        );
    }

    #[test]
    fn thinking_follows_the_template_switch_and_the_turn() {
        use pio_plugin_api::wire::InferRequest;
        let mut r = InferRequest::default();
        assert!(starts_thinking(&r));
        r.chat_template_kwargs
            .insert("enable_thinking".into(), false.into());
        assert!(!starts_thinking(&r));
        // The template's `not enable_thinking` is Jinja's: these close the block too.
        for off in [serde_json::Value::Null, 0.into(), "".into()] {
            r.chat_template_kwargs
                .insert("enable_thinking".into(), off.clone());
            assert!(!starts_thinking(&r), "{off}");
        }
        r.chat_template_kwargs
            .insert("enable_thinking".into(), "yes".into());
        assert!(starts_thinking(&r));
        r.chat_template_kwargs
            .insert("enable_thinking".into(), true.into());
        assert!(starts_thinking(&r));
        // No turn opened, or the final message continued: the output is that message's text.
        let continued = InferRequest {
            continue_final_message: true,
            add_generation_prompt: Some(false),
            ..r.clone()
        };
        assert!(!starts_thinking(&continued));
        let closed = InferRequest {
            add_generation_prompt: Some(false),
            ..r
        };
        assert!(!starts_thinking(&closed));
    }
}
