//! `echo`: the plugin template for third-party authors. It "generates" its prompt back one
//! character per token, honouring the request's limits, stop strings and cancellation, so it
//! shows every part of the plugin contract without a model. Copy this crate to start a plugin.

#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::time::{Duration, Instant};

use pio_plugin_api::wire::{
    FinishReason, InferOutcome, InferRequest, ModelConfig, ModelInfo, Prompt, Usage,
};
use pio_plugin_api::{
    export_plugin, Capabilities, Flow, GeneratedToken, PluginError, PluginImpl, Progress, RString,
    RVec, Sink,
};

/// The echo plugin's state: its pace once "loaded", `None` before.
pub struct Echo {
    pace: Option<Pace>,
}

/// How slowly echo answers, to imitate a model.
#[derive(Debug, Clone, Copy)]
struct Pace {
    /// Before each token (`delay_ms`).
    token: Duration,
    /// Before the first token, as a long prompt's prefill would (`prefill_ms`).
    prefill: Duration,
}

/// The longest context echo accepts, in characters.
const CONTEXT_LENGTH: u32 = 4096;

impl PluginImpl for Echo {
    const NAME: &'static str = "echo";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const FAMILY: &'static str = "echo";
    // Tools: echo "calls" a tool when its prompt is a call in the hermes format, which lets
    // the host's tool-call parsing be tested without a model.
    const CAPABILITIES: Capabilities = Capabilities::TEXT
        .union(Capabilities::CHAT)
        .union(Capabilities::TOOLS)
        .union(Capabilities::LOGPROBS);

    fn new() -> Result<Self, PluginError> {
        Ok(Self { pace: None })
    }

    fn supports_config(&self, config: &ModelConfig) -> Result<(), PluginError> {
        match config.quantization.as_deref() {
            None | Some("none") => {}
            Some(other) => {
                return Err(PluginError::unsupported(format!(
                    "echo has no weights to quantize (quantization = \"{other}\"); remove the key"
                )))
            }
        }
        delay_of(config, "delay_ms")?;
        delay_of(config, "prefill_ms")?;
        for key in ["tool_call_format", "reasoning_format"] {
            format_of(config, key)?;
        }
        delay_of(config, "load_delay_ms").map(|_| ())
    }

    fn load_model(
        &mut self,
        config: ModelConfig,
        progress: &mut Progress,
    ) -> Result<ModelInfo, PluginError> {
        self.supports_config(&config)?;
        // `load_delay_ms` imitates a model whose weights take a while to load.
        let load_delay = delay_of(&config, "load_delay_ms")?;
        const STEPS: u64 = 10;
        for step in 1..=STEPS {
            std::thread::sleep(load_delay / STEPS as u32);
            if progress.report("weights", step, STEPS) == Flow::Stop {
                return Err(PluginError::cancelled("loading was cancelled"));
            }
        }
        // `load_error` imitates a model whose files prove broken only once they are read.
        if let Some(why) = config.extra.get("load_error") {
            let why = why.as_str().map_or_else(|| why.to_string(), str::to_string);
            return Err(PluginError::model_files(format!("echo: {why}")));
        }
        self.pace = Some(Pace {
            token: delay_of(&config, "delay_ms")?,
            prefill: delay_of(&config, "prefill_ms")?,
        });
        // `..default()` is a no-op for the frozen plugin-api copies, and fills newer fields.
        #[allow(unused_mut, clippy::needless_update)]
        let mut info = ModelInfo {
            context_length: Some(CONTEXT_LENGTH),
            dtype: Some("none".into()),
            device: Some("cpu".into()),
            weight_bytes: Some(0),
            ..ModelInfo::default()
        };
        // Fields newer than plugin-api 1.0 (the test fixtures compile this file against frozen
        // copies of older versions, with the `frozen-api` feature).
        // The output formats are options, so that the host's parsers of every model's markup can
        // be tested without the model: echo "writes" whatever markup its prompt holds.
        #[cfg(not(feature = "frozen-api"))]
        {
            info.tool_call_format =
                Some(format_of(&config, "tool_call_format")?.unwrap_or_else(|| "hermes".into()));
            info.reasoning_format = format_of(&config, "reasoning_format")?;
        }
        Ok(info)
    }

    fn infer(&self, request: InferRequest, sink: &mut Sink) -> Result<InferOutcome, PluginError> {
        let pace = self
            .pace
            .ok_or_else(|| PluginError::not_ready("echo: infer called before load_model"))?;
        let started = Instant::now();
        let text = prompt_text(&request.prompt)?;
        let prompt: Vec<char> = text.chars().collect();
        if prompt.len() > CONTEXT_LENGTH as usize {
            let message = format!(
                "prompt is {} characters; echo's context is {CONTEXT_LENGTH}",
                prompt.len()
            );
            // Its own kind since plugin-api 1.6; the older copies say invalid input.
            #[cfg(not(feature = "frozen-api"))]
            return Err(PluginError::context_length(message));
            #[cfg(feature = "frozen-api")]
            return Err(PluginError::invalid_input(message));
        }
        // Echo knows its whole output up front, so a stop string is simply cut off before it is
        // reached (or after it, when the request keeps it); a model would hold back text that
        // might begin one (see engine's StopMatcher). The earliest wins, the longest there.
        let stop_at = request
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()).map(|at| (at, s.len())))
            .min_by_key(|&(at, len)| (at, std::cmp::Reverse(len)))
            .map(|(at, len)| {
                let end = if keeps_stop(&request) { at + len } else { at };
                (text[..end].chars().count(), &text[at..at + len])
            });
        let max_tokens = request.max_tokens.unwrap_or(CONTEXT_LENGTH) as usize;
        let end = stop_at.map_or(prompt.len(), |(end, _)| end);
        let (count, finish) = if max_tokens < end {
            (max_tokens, FinishReason::Length)
        } else {
            (end, FinishReason::Stop)
        };
        prefill(pace.prefill, sink)?;
        for &ch in &prompt[..count] {
            if sink.is_cancelled() {
                return Err(PluginError::cancelled("echo: request cancelled"));
            }
            std::thread::sleep(pace.token);
            let token = GeneratedToken {
                token_id: u32::from(ch),
                text: RString::from(ch.to_string()),
                logprob: request.logprobs.map(|_| 0.0).into(),
                top_logprobs: RVec::new(),
            };
            if sink.emit(token) == Flow::Stop {
                return Err(PluginError::cancelled("echo: request cancelled"));
            }
        }
        // `..default()`: this file also builds against older plugin-api minors (compat tests),
        // whose `Usage` has fewer fields.
        #[allow(clippy::needless_update)]
        let usage = Usage {
            prompt_tokens: prompt.len() as u32,
            completion_tokens: count as u32,
            ..Usage::default()
        };
        let mut outcome = InferOutcome {
            finish_reason: finish,
            usage,
            ..Default::default()
        };
        #[cfg(not(feature = "frozen-api"))]
        if finish == FinishReason::Stop {
            outcome.stop_reason =
                stop_at.map(|(_, stop)| pio_plugin_api::wire::StopReason::Text(stop.into()));
        }
        outcome.timings.insert(
            "total_ms".into(),
            (started.elapsed().as_secs_f64() * 1e3).into(),
        );
        Ok(outcome)
    }

    fn cleanup(&mut self) -> Result<(), PluginError> {
        self.pace = None;
        Ok(())
    }
}

/// Whether the stop string found stays in the output (`include_stop_str_in_output`, a
/// plugin-api 1.6 field the older copies lack).
fn keeps_stop(request: &InferRequest) -> bool {
    #[cfg(not(feature = "frozen-api"))]
    return request.include_stop_str_in_output;
    #[cfg(feature = "frozen-api")]
    {
        let _ = request;
        false
    }
}

/// Waits `time` as a prefill would: emitting nothing, polling for a cancel meanwhile.
fn prefill(time: Duration, sink: &mut Sink) -> Result<(), PluginError> {
    let done = Instant::now() + time;
    while Instant::now() < done {
        if sink.is_cancelled() {
            return Err(PluginError::cancelled("echo: request cancelled"));
        }
        std::thread::sleep(Duration::from_millis(10).min(time));
    }
    Ok(())
}

/// A plugin-specific config key in milliseconds: `delay_ms` pauses before each token,
/// `prefill_ms` before the first one and `load_delay_ms` while loading, to imitate a slow model.
fn delay_of(config: &ModelConfig, key: &str) -> Result<Duration, PluginError> {
    match config.extra.get(key) {
        None => Ok(Duration::ZERO),
        Some(v) => v.as_u64().map(Duration::from_millis).ok_or_else(|| {
            PluginError::invalid_config(format!(
                "echo: `{key}` must be a whole number of milliseconds, found {v}"
            ))
        }),
    }
}

/// An optional string option.
fn format_of(config: &ModelConfig, key: &str) -> Result<Option<String>, PluginError> {
    match config.extra.get(key) {
        None => Ok(None),
        Some(v) => v.as_str().map(|s| Some(s.to_string())).ok_or_else(|| {
            PluginError::invalid_config(format!(
                "echo: `{key}` must be a format name such as \"glm47\", found {v}"
            ))
        }),
    }
}

/// Raw text as is; chat messages as their contents joined by newlines (a content given as parts
/// is its text parts, joined).
fn prompt_text(prompt: &Prompt) -> Result<String, PluginError> {
    match prompt {
        Prompt::Text(text) => Ok(text.clone()),
        Prompt::Messages(messages) => {
            let mut said = Vec::with_capacity(messages.len());
            for (i, m) in messages.iter().enumerate() {
                said.push(content_text(m.get("content")).ok_or_else(|| {
                    PluginError::invalid_input(format!(
                        "messages[{i}].content: expected a string or text parts (echo reads no images)"
                    ))
                })?);
            }
            Ok(said.join("\n"))
        }
        // Token ids (`TOKEN_PROMPTS`, not declared: the host never sends them); the frozen
        // 1.0 copy has no such variant.
        #[allow(unreachable_patterns)]
        _ => Err(PluginError::unsupported(
            "echo takes text or chat prompts, not token ids",
        )),
    }
}

/// A message's content as text: a string, or a list of `{"type": "text", "text": ...}` parts.
fn content_text(content: Option<&pio_plugin_api::serde_json::Value>) -> Option<String> {
    let content = content?;
    if let Some(text) = content.as_str() {
        return Some(text.to_string());
    }
    content
        .as_array()?
        .iter()
        .map(|part| match part.get("type")?.as_str()? {
            "text" => part.get("text")?.as_str(),
            _ => None,
        })
        .collect()
}

export_plugin!(Echo);

#[cfg(test)]
mod tests {
    use pio_plugin_api::serde_json;
    use pio_plugin_api::sinks::{CollectSink, NoProgress};
    use pio_plugin_api::{ErrorKind, PluginBox};

    use super::*;

    fn loaded(config: &str) -> PluginBox {
        let module = pio_plugin_api::__private::root_module::<Echo>();
        let mut plugin = (module.new())().unwrap();
        plugin
            .load_model(config.into(), NoProgress::boxed())
            .unwrap();
        plugin
    }

    fn run(
        plugin: &PluginBox,
        request: serde_json::Value,
        sink: &CollectSink,
    ) -> Result<InferOutcome, PluginError> {
        let request = request.to_string();
        plugin
            .infer(request.as_str().into(), sink.boxed())
            .into_result()
            .map(|json| serde_json::from_str(&json).unwrap())
    }

    #[test]
    fn echoes_text_one_character_per_token() {
        let plugin = loaded("{}");
        let sink = CollectSink::new();
        let out = run(
            &plugin,
            serde_json::json!({"prompt": {"text": "héllo"}}),
            &sink,
        )
        .unwrap();
        assert_eq!(sink.text(), "héllo");
        assert_eq!(sink.tokens()[1].token_id, u32::from('é'));
        assert_eq!(out.finish_reason, FinishReason::Stop);
        #[allow(clippy::needless_update)]
        let expected = Usage {
            prompt_tokens: 5,
            completion_tokens: 5,
            ..Usage::default()
        };
        assert_eq!(out.usage, expected);
    }

    #[test]
    fn honours_max_tokens_and_stop_strings() {
        let plugin = loaded("{}");
        let sink = CollectSink::new();
        let out = run(
            &plugin,
            serde_json::json!({"prompt": {"text": "abcdef"}, "max_tokens": 3}),
            &sink,
        )
        .unwrap();
        assert_eq!(
            (sink.text().as_str(), out.finish_reason),
            ("abc", FinishReason::Length)
        );

        let sink = CollectSink::new();
        let out = run(
            &plugin,
            serde_json::json!({"prompt": {"text": "say STOP now"}, "stop": ["STOP"]}),
            &sink,
        )
        .unwrap();
        // The stop string spans four tokens; none of it is emitted.
        assert_eq!(
            (sink.text().as_str(), out.finish_reason),
            ("say ", FinishReason::Stop)
        );

        // Unless the request keeps it (vLLM's include_stop_str_in_output).
        #[cfg(not(feature = "frozen-api"))]
        {
            let sink = CollectSink::new();
            let body = serde_json::json!({"prompt": {"text": "say STOP now"}, "stop": ["ST", "STOP"],
                "include_stop_str_in_output": true});
            let out = run(&plugin, body, &sink).unwrap();
            assert_eq!(
                (sink.text().as_str(), out.finish_reason),
                ("say STOP", FinishReason::Stop)
            );
        }
    }

    #[test]
    fn chat_messages_echo_their_contents() {
        let plugin = loaded("{}");
        let sink = CollectSink::new();
        let messages = serde_json::json!([{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]);
        run(
            &plugin,
            serde_json::json!({"prompt": {"messages": messages}}),
            &sink,
        )
        .unwrap();
        assert_eq!(sink.text(), "a\nb");
        let sink = CollectSink::new();
        let parts =
            serde_json::json!([{"type": "text", "text": "c"}, {"type": "text", "text": "d"}]);
        let messages = serde_json::json!([{"role": "user", "content": parts}]);
        run(
            &plugin,
            serde_json::json!({"prompt": {"messages": messages}}),
            &sink,
        )
        .unwrap();
        assert_eq!(sink.text(), "cd", "text parts are read");
        let e = run(
            &plugin,
            serde_json::json!({"prompt": {"messages": [{"role": "user"}]}}),
            &sink,
        )
        .unwrap_err();
        assert!(e.message.contains("messages[0].content"), "{e}");
    }

    #[test]
    fn stops_when_the_host_cancels() {
        let plugin = loaded("{}");
        let sink = CollectSink::cancelling_after(2);
        let e = run(
            &plugin,
            serde_json::json!({"prompt": {"text": "abcdef"}}),
            &sink,
        )
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::CANCELLED);
        assert_eq!(sink.text(), "ab");
    }

    #[test]
    fn refuses_bad_config_and_early_infer() {
        let module = pio_plugin_api::__private::root_module::<Echo>();
        let mut plugin = (module.new())().unwrap();
        let e = run(
            &plugin,
            serde_json::json!({"prompt": {"text": "x"}}),
            &CollectSink::new(),
        )
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::NOT_READY);
        let e = plugin
            .load_model(r#"{"delay_ms": "slow"}"#.into(), NoProgress::boxed())
            .unwrap_err();
        assert!(e.message.contains("delay_ms"), "{e}");
        let e = plugin
            .supports_config(r#"{"quantization": "q4"}"#.into())
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::UNSUPPORTED);
    }
}
