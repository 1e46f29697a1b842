//! What is taken out of a completion's text before it is returned: reasoning and tool calls, each
//! in the model's own markup (named in its `ModelInfo`). The API and `pio run --json` share it.

use std::sync::Arc;

use pio_plugin_api::wire::{InferRequest, ModelInfo, TokenTable};
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
