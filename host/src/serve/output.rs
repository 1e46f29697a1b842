//! What is taken out of a completion's text before it is returned: reasoning and tool calls, each
//! in the model's own markup (named in its `ModelInfo`). The API and `pio run --json` share it.

use std::collections::HashSet;
use std::sync::Arc;

use pio_plugin_api::wire::{InferRequest, ModelInfo, TokenTable};

use crate::protocol::TokenFrame;
use serde_json::Value;

use super::{reasoning, tool_calls};

/// How one request's output is parsed and reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsing {
    /// The tool-call format, when the request offers tools.
    pub tools: Option<tool_calls::Format>,
    /// Whether the output starts inside the reasoning, for a chat with a reasoning model.
    pub reasoning: Option<bool>,
    /// The model's token table, for logprobs' `bytes`.
    pub tokens: Option<Arc<TokenTable>>,
    /// Only the first tool call counts (`parallel_tool_calls: false`).
    pub single_call: bool,
    /// The model's special tokens, to leave out of the text (`None`: all are shown).
    pub special: Option<Arc<HashSet<u32>>>,
}

impl Parsing {
    /// The parsing `request` gets from a model described by `info`; `chat`: the request is a
    /// chat (completions return the raw text, as vLLM does: only chats have a reasoning field).
    pub fn of(request: &InferRequest, chat: bool, info: &ModelInfo) -> Self {
        let tools = request
            .tools
            .as_ref()
            .and(info.tool_call_format.as_deref())
            .and_then(tool_calls::Format::from_name);
        let reasoning = chat
            .then_some(info.reasoning_format.as_deref())
            .flatten()
            .and_then(reasoning::Format::from_name)
            .map(|_| reasoning::starts_thinking(request));
        Self {
            tools,
            reasoning,
            tokens: None,
            single_call: false,
            special: None,
        }
    }

    /// Takes no tool calls out of the output unless `parsed` (`tool_choice: "none"`).
    pub fn with_calls_parsed(self, parsed: bool) -> Self {
        Self {
            tools: self.tools.filter(|_| parsed),
            ..self
        }
    }

    /// Keeps only the first tool call of an output when `single`.
    pub fn with_single_call(self, single: bool) -> Self {
        Self {
            single_call: single,
            ..self
        }
    }

    /// The calls to the `offered` tools in `text` (the first alone, if only one counts) and
    /// the content around them.
    pub fn extract(
        &self,
        format: tool_calls::Format,
        text: &str,
        offered: &[Value],
    ) -> tool_calls::Extracted {
        let mut extracted = tool_calls::extract(format, text, offered);
        if self.single_call {
            extracted.calls.truncate(1);
        }
        extracted
    }

    /// Leaves the `special` tokens out of the text when `skip` (vLLM's `skip_special_tokens`).
    pub fn with_special(self, special: Option<Arc<HashSet<u32>>>, skip: bool) -> Self {
        Self {
            special: special.filter(|_| skip),
            ..self
        }
    }

    /// `token` as the client sees it: a special token's text left out, unless it is markup
    /// this request's parsers read (`<think>` while reasoning is split off, `<tool_call>` while
    /// calls are taken out), which they remove themselves.
    pub fn shown(&self, mut token: TokenFrame) -> TokenFrame {
        let Some(special) = &self.special else {
            return token;
        };
        if !special.contains(&token.token_id) {
            return token;
        }
        // The token's own text, after any bytes of a character left unfinished before it (which
        // the decoder releases with it, and which stay). A frame without it (the end of
        // sequence, a stop id: the engine never writes their text) holds only such bytes.
        let own = (self.tokens.as_deref())
            .and_then(|t| t.get(token.token_id))
            .map(|b| {
                std::str::from_utf8(b)
                    .ok()
                    .filter(|own| token.text.ends_with(own))
            });
        match own {
            Some(Some(own)) if !self.parses(own) => {
                token.text.truncate(token.text.len() - own.len());
            }
            Some(_) => {}
            // No table: the frame's text is taken for the token's own.
            None if !self.parses(&token.text) => token.text.clear(),
            None => {}
        }
        token
    }

    /// Whether `text` is markup one of this request's parsers reads.
    fn parses(&self, text: &str) -> bool {
        let tools = self.tools.map_or(&[][..], tool_calls::Format::markers);
        let thinking = if self.reasoning.is_some() {
            &reasoning::MARKERS[..]
        } else {
            &[]
        };
        tools.iter().chain(thinking).any(|m| *m == text)
    }

    /// Reports logprobs' `bytes` from `tokens`.
    pub fn with_tokens(self, tokens: Option<Arc<TokenTable>>) -> Self {
        Self { tokens, ..self }
    }

    /// Splits a whole completion into reasoning, and content with the calls to the `offered`
    /// tools taken out.
    pub fn split(
        &self,
        text: String,
        offered: &[Value],
    ) -> (Option<String>, tool_calls::Extracted) {
        let (reasoning, content) = match self.reasoning {
            Some(thinking) => {
                let s = reasoning::split(&text, thinking);
                (s.reasoning, s.content)
            }
            None => (None, text),
        };
        let extracted = match self.tools {
            Some(format) => self.extract(format, &content, offered),
            None => tool_calls::Extracted {
                content,
                calls: Vec::new(),
            },
        };
        (reasoning, extracted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pio_plugin_api::wire::TokenBytes;
    use serde_json::json;

    fn glm() -> ModelInfo {
        ModelInfo {
            tool_call_format: Some("glm47".into()),
            reasoning_format: Some("glm45".into()),
            ..ModelInfo::default()
        }
    }

    #[test]
    fn reasoning_then_a_call_come_apart() {
        let tools = vec![json!({"type": "function", "function": {"name": "f", "parameters": {}}})];
        let request = InferRequest {
            tools: Some(tools.clone()),
            ..InferRequest::default()
        };
        let p = Parsing::of(&request, true, &glm());
        assert_eq!(p.reasoning, Some(true));
        let (r, e) = p.split(
            "Need f.</think>Calling.<tool_call>f<arg_key>x</arg_key><arg_value>1</arg_value></tool_call>".into(),
            &tools,
        );
        assert_eq!(r.as_deref(), Some("Need f."));
        assert_eq!(e.content, "Calling.");
        assert_eq!(e.calls[0].arguments, "{\"x\":1}");
    }

    #[test]
    fn completions_and_plain_models_keep_the_raw_text() {
        let request = InferRequest::default();
        assert_eq!(Parsing::of(&request, false, &glm()).reasoning, None);
        assert_eq!(
            Parsing::of(&request, true, &glm()).tools,
            None,
            "no tools offered"
        );
        let plain = Parsing::of(&request, true, &ModelInfo::default());
        let (r, e) = plain.split("a</think>b".into(), &[]);
        assert_eq!((r, e.content.as_str()), (None, "a</think>b"));
    }

    /// vLLM's `skip_special_tokens`: a special token's text is left out (the bytes of a character
    /// it came with stay), unless the request's parsers read it or the client asks for it.
    #[test]
    fn special_tokens_leave_the_text_unless_parsed_or_asked_for() {
        let frame = |id: u32, text: &str| TokenFrame {
            token_id: id,
            text: text.into(),
            logprob: Some(-0.5),
            top_logprobs: Vec::new(),
        };
        let special = Some(Arc::new(HashSet::from([7, 8, 9])));
        let table = TokenBytes::encode((0..10).map(|id| match id {
            7 => "<|endoftext|>".to_string(),
            8 => "<think>".into(),
            9 => "<tool_call>".into(),
            _ => format!("w{id}"),
        }))
        .table()
        .unwrap();
        let plain = Parsing::of(&InferRequest::default(), false, &glm())
            .with_tokens(Some(Arc::new(table)))
            .with_special(special.clone(), true);
        let shown = |p: &Parsing, id, text| p.shown(frame(id, text)).text;
        assert_eq!(shown(&plain, 7, "<|endoftext|>"), "");
        assert_eq!(
            shown(&plain, 7, "é<|endoftext|>"),
            "é",
            "a held character stays"
        );
        assert_eq!(
            shown(&plain, 7, "é"),
            "é",
            "an end of sequence, whose text the engine never writes, keeps the held bytes"
        );
        assert_eq!(shown(&plain, 3, "w3"), "w3", "ordinary tokens stay");
        assert_eq!(
            shown(&plain, 8, "<think>"),
            "",
            "a completion parses no reasoning"
        );
        assert_eq!(plain.shown(frame(7, "<|endoftext|>")).logprob, Some(-0.5));
        let tools = vec![json!({"type": "function", "function": {"name": "f", "parameters": {}}})];
        let request = InferRequest {
            tools: Some(tools),
            ..InferRequest::default()
        };
        let chat = Parsing::of(&request, true, &glm()).with_special(special.clone(), true);
        assert_eq!(
            shown(&chat, 8, "<think>"),
            "<think>",
            "the reasoning parser reads it"
        );
        assert_eq!(shown(&chat, 9, "<tool_call>"), "<tool_call>");
        let p = Parsing::of(&request, true, &glm())
            .with_tokens(plain.tokens.clone())
            .with_special(special.clone(), true);
        assert_eq!(
            shown(&p, 8, "\u{FFFD}<think>"),
            "\u{FFFD}<think>",
            "after a held byte too"
        );
        assert_eq!(shown(&chat, 7, "<|endoftext|>"), "");
        let kept = Parsing::of(&request, true, &glm()).with_special(special, false);
        assert_eq!(shown(&kept, 7, "<|endoftext|>"), "<|endoftext|>");
    }

    /// `parallel_tool_calls: false`: the first of the calls the model wrote, alone.
    #[test]
    fn a_single_call_keeps_the_first() {
        let tools = vec![json!({"type": "function", "function": {"name": "f", "parameters": {}}})];
        let request = InferRequest {
            tools: Some(tools.clone()),
            ..InferRequest::default()
        };
        let text = "</think><tool_call>f<arg_key>x</arg_key><arg_value>1</arg_value></tool_call><tool_call>f<arg_key>x</arg_key><arg_value>2</arg_value></tool_call>";
        let both = Parsing::of(&request, true, &glm());
        assert_eq!(both.split(text.into(), &tools).1.calls.len(), 2);
        let one = both.with_single_call(true);
        let calls = one.split(text.into(), &tools).1.calls;
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].arguments, "{\"x\":1}");
    }
}
