//! Tool calls in model output, parsed into the API's `tool_calls` (as vLLM's tool parsers do):
//! each model family writes them its own way, named by the plugin in
//! `ModelInfo::tool_call_format`. A call that does not parse stays in the text, never dropped.

use std::sync::atomic::{AtomicU64, Ordering};

use super::tool_grammar;
use serde_json::{json, Map, Value};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// How a model writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen3 instruct, Hermes).
    Hermes,
    /// `<tool_call><function=NAME><parameter=P>value</parameter></function></tool_call>`
    /// (Qwen3-Coder); values are typed by the tool's JSON schema.
    Qwen3Coder,
    /// `<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>…</tool_call>` (GLM-4.5 to
    /// 4.7); a value is JSON unless the schema says string (the template writes strings bare).
    Glm47,
}

impl Format {
    /// The markup tokens the parser reads (kept in the text it parses, special or not).
    pub fn markers(self) -> &'static [&'static str] {
        match self {
            Self::Hermes | Self::Qwen3Coder => &[OPEN, CLOSE],
            Self::Glm47 => &[
                OPEN,
                CLOSE,
                "<arg_key>",
                "</arg_key>",
                "<arg_value>",
                "</arg_value>",
            ],
        }
    }

    /// The format a plugin names, if this host knows it.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "hermes" => Some(Self::Hermes),
            "qwen3_coder" => Some(Self::Qwen3Coder),
            "glm47" => Some(Self::Glm47),
            _ => None,
        }
    }
}

/// One parsed call.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// `call_...`, unique in this process.
    pub id: String,
    /// The function's name.
    pub name: String,
    /// Its arguments, as JSON text (OpenAI's shape).
    pub arguments: String,
}

impl Call {
    /// A message's `tool_calls[]` entry (OpenAI's `ChatCompletionMessageToolCall`: no index).
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        })
    }

    /// A stream delta's `tool_calls[]` entry, which clients assemble by `index`.
    pub fn to_delta(&self, index: usize) -> Value {
        let mut entry = self.to_json();
        entry["index"] = index.into();
        entry
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn call(name: &str, arguments: &Value) -> Call {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    Call {
        id: format!("call_{:08x}{n:x}", std::process::id()),
        name: name.to_string(),
        arguments: arguments.to_string(),
    }
}

/// Text with the calls taken out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Extracted {
    /// What remains as the message's content.
    pub content: String,
    /// The calls, in order.
    pub calls: Vec<Call>,
}

/// Splits `text` into content and calls; `tools` (the request's) type Qwen3-Coder's parameters.
/// What comes before the first call is content as written (as vLLM's parsers keep it, and as
/// streaming has sent it by the time the call starts); around and after calls, the content is
/// trimmed.
pub fn extract(format: Format, text: &str, tools: &[Value]) -> Extracted {
    let Some(first) = text.find(OPEN) else {
        return Extracted {
            content: text.to_string(),
            calls: Vec::new(),
        };
    };
    let (before, markup) = text.split_at(first);
    let mut out = extract_calls(format, markup, tools);
    out.content.insert_str(0, before);
    out
}

/// [`extract`] of `text` from its first call on.
fn extract_calls(format: Format, text: &str, tools: &[Value]) -> Extracted {
    let mut out = Extracted::default();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        out.content.push_str(&rest[..start]);
        let after = &rest[start + OPEN.len()..];
        let Some(end) = after.find(CLOSE) else {
            // Unterminated. A whole call whose closing tag was cut off (a client's stop string
            // `</tool_call>`, say) is still a call, as vLLM's parsers read it. Otherwise the
            // model stopped mid-call: alone, the text is the answer; after whole calls it is a
            // call cut off, whose markup is no answer (vLLM drops it too).
            if let Some(c) = parse_cut(format, after, tools) {
                out.calls.push(c);
            } else if out.calls.is_empty() {
                out.content.push_str(&rest[start..]);
            }
            rest = "";
            break;
        };
        let body = &after[..end];
        match parse_body(format, body, tools) {
            Some(c) => out.calls.push(c),
            None => out
                .content
                .push_str(&rest[start..start + OPEN.len() + end + CLOSE.len()]),
        }
        rest = &after[end + CLOSE.len()..];
    }
    out.content.push_str(rest);
    if !out.calls.is_empty() {
        out.content = out.content.trim().to_string();
    }
    out
}

/// A call whose closing tag never came: one only if it reads whole. GLM's bare name cannot
/// tell a tool without arguments from a name cut off midway (`get_wea` at `max_tokens`), so it
/// must name an offered tool.
fn parse_cut(format: Format, body: &str, tools: &[Value]) -> Option<Call> {
    if matches!(format, Format::Glm47) {
        let body = body.trim();
        let named = !body.contains('<') && parameters_of(tools, body).is_some();
        if !named && !body.ends_with("</arg_value>") {
            return None;
        }
    }
    parse_body(format, body, tools)
}

fn parse_body(format: Format, body: &str, tools: &[Value]) -> Option<Call> {
    match format {
        Format::Hermes => {
            let v: Value = serde_json::from_str(body.trim()).ok()?;
            let name = v.get("name")?.as_str()?;
            let arguments = match v.get("arguments") {
                // An object, as the next turn's check holds the call's arguments to.
                Some(Value::String(s)) => serde_json::from_str(s).ok().filter(Value::is_object)?,
                Some(a @ Value::Object(_)) => a.clone(),
                None => json!({}),
                Some(_) => return None,
            };
            Some(call(name, &arguments))
        }
        Format::Qwen3Coder => {
            let body = body.trim();
            let inner = body
                .strip_prefix("<function=")?
                .strip_suffix("</function>")?;
            let (name, params) = inner.split_once('>')?;
            let schema = parameters_of(tools, name.trim());
            let values = coder_params(params, true).or_else(|| coder_params(params, false))?;
            let arguments = (values.into_iter())
                .map(|(key, raw)| {
                    let bare = schema.is_none_or(|s| s.bare_string(key));
                    (key.to_string(), typed(raw, bare))
                })
                .collect();
            Some(call(name.trim(), &Value::Object(arguments)))
        }
        Format::Glm47 => glm_call(body, tools),
    }
}

/// Qwen3-Coder's `<parameter=K>\nV\n</parameter>…` as (key, value) pairs. `strict`: every
/// value ends at its own `</parameter>` (what the model is trained, and a forced call's grammar
/// made, to write), so a value may hold `<parameter=` or `</function>` as text (code often
/// does); one holding `<parameter=` at a line's start is read as a close left out instead. Not
/// strict: a value whose close the model left out ends where the next parameter begins, as
/// vLLM's parser reads it.
fn coder_params(mut params: &str, strict: bool) -> Option<Vec<(&str, &str)>> {
    const OPEN: &str = "<parameter=";
    const CLOSE: &str = "</parameter>";
    let mut values = Vec::new();
    while let Some(open) = params.find(OPEN) {
        // Anything else between parameters (a second `<function=`) is not one call: the text
        // stays text rather than two calls merged into one.
        if !params[..open].trim().is_empty() {
            return None;
        }
        let (key, value_and_rest) = params[open + OPEN.len()..].split_once('>')?;
        let close = value_and_rest.find(CLOSE);
        let next = value_and_rest.find(OPEN);
        let (end, rest) = match (close, next) {
            (Some(c), _) if strict => (c, c + CLOSE.len()),
            (None, _) if strict => return None,
            (Some(c), Some(n)) if n < c => (n, n),
            (Some(c), _) => (c, c + CLOSE.len()),
            (None, Some(n)) => (n, n),
            // The last one's ends with the function.
            (None, None) => (value_and_rest.len(), value_and_rest.len()),
        };
        let value = &value_and_rest[..end];
        // Strict, a parameter opening on a line of its own is one whose close was left out;
        // otherwise a second function inside one call is not one call.
        if (strict && value.contains("\n<parameter=")) || (!strict && value.contains("</function>"))
        {
            return None;
        }
        let raw = value.strip_prefix('\n').unwrap_or(value);
        values.push((key.trim(), raw.strip_suffix('\n').unwrap_or(raw)));
        params = &value_and_rest[rest..];
    }
    params.trim().is_empty().then_some(values)
}

/// `NAME<arg_key>K</arg_key><arg_value>V</arg_value>…`, whitespace allowed between the parts.
fn glm_call(body: &str, tools: &[Value]) -> Option<Call> {
    let (name, mut rest) = match body.find("<arg_key>") {
        Some(at) => (body[..at].trim(), &body[at..]),
        None => (body.trim(), ""),
    };
    if name.is_empty() || name.contains('<') {
        return None;
    }
    let schema = parameters_of(tools, name);
    let mut arguments = Map::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let after = rest.strip_prefix("<arg_key>")?;
        let (key, after) = after.split_once("</arg_key>")?;
        let after = after.trim_start().strip_prefix("<arg_value>")?;
        let (raw, after) = after.split_once("</arg_value>")?;
        // vLLM's GLM parser: text for a string parameter (declared so, or a string enum the
        // grammar writes bare), else JSON if it parses.
        let string = schema.is_some_and(|s| s.declares_string(key.trim()));
        let value = typed(raw, string);
        arguments.insert(key.trim().to_string(), value);
        rest = after;
    }
    Some(call(name, &Value::Object(arguments)))
}

/// Tool `name`'s parameter schema.
fn parameters_of<'a>(tools: &'a [Value], name: &str) -> Option<Parameters<'a>> {
    tools
        .iter()
        .find(|t| t["function"]["name"] == name)
        .map(|t| Parameters(&t["function"]["parameters"]))
}

/// A tool's parameter schema, read for how each parameter's value is written.
#[derive(Clone, Copy)]
struct Parameters<'a>(&'a Value);

impl Parameters<'_> {
    /// Parameter `key`'s schema, its references followed (the parameters' own too).
    fn of(&self, key: &str) -> Option<&Value> {
        let root = tool_grammar::resolved(self.0, self.0);
        let schema = root.get("properties")?.get(key)?;
        Some(tool_grammar::resolved(schema, self.0))
    }

    /// Whether `key`'s value is written as bare text (as the grammar writes it); an unknown
    /// parameter is.
    fn bare_string(&self, key: &str) -> bool {
        self.of(key).is_none_or(tool_grammar::is_bare_string)
    }

    /// Whether `key`'s schema says string: its type, or an enum of strings (what the grammar
    /// writes bare); a parameter that says nothing is not.
    fn declares_string(&self, key: &str) -> bool {
        self.of(key).is_some_and(|p| {
            (p.get("type").is_some() || p.get("enum").is_some()) && tool_grammar::is_bare_string(p)
        })
    }
}

/// A parameter's text: itself when written bare, else the JSON it holds, else a Python literal
/// (the templates write earlier calls' values with Python's `str`, so models write `True` and
/// `None` back), else the text.
fn typed(raw: &str, bare: bool) -> Value {
    if bare {
        return Value::String(raw.to_string());
    }
    let text = raw.trim();
    let python = match text {
        "True" => Some(Value::Bool(true)),
        "False" => Some(Value::Bool(false)),
        "None" => Some(Value::Null),
        _ => None,
    };
    (serde_json::from_str::<Value>(text).ok())
        .or(python)
        .unwrap_or_else(|| Value::String(raw.to_string()))
}

/// Streaming: passes text through until a call begins, then holds the rest for [`extract`].
#[derive(Debug, Default)]
pub struct StreamFilter {
    pending: String,
    holding: bool,
}

impl StreamFilter {
    /// Takes the next piece of text; returns what can be sent as content now.
    pub fn push(&mut self, text: &str) -> String {
        self.pending.push_str(text);
        if self.holding {
            return String::new();
        }
        if let Some(at) = self.pending.find(OPEN) {
            self.holding = true;
            let ready = self.pending[..at].to_string();
            self.pending.drain(..at);
            return ready;
        }
        // Keep back a tail that may be the start of the marker.
        let keep = (1..OPEN.len())
            .rev()
            .find(|&n| self.pending.ends_with(&OPEN[..n]))
            .unwrap_or(0);
        let cut = self.pending.len() - keep;
        let ready = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        ready
    }

    /// The text held back, to be run through [`extract`] at the end.
    pub fn finish(self) -> String {
        self.pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather_tool() -> Vec<Value> {
        vec![
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"}},
            }}}),
        ]
    }

    #[test]
    fn hermes_calls_are_extracted_and_the_rest_is_content() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        let e = extract(Format::Hermes, text, &[]);
        // The text before the first call as written (streaming has sent it so).
        assert_eq!(e.content, "Let me check.\n");
        assert_eq!(e.calls.len(), 2);
        // Text after a call is content too, trimmed; joined to what came before as streaming
        // joins it.
        let around = "before <tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call> after";
        let joined = extract(Format::Hermes, around, &[]);
        assert_eq!(
            (joined.content.as_str(), joined.calls.len()),
            ("before after", 1)
        );
        let mut filter = StreamFilter::default();
        let mut streamed: String = (around.split_inclusive(' '))
            .map(|p| filter.push(p))
            .collect();
        streamed.push_str(&extract(Format::Hermes, &filter.finish(), &[]).content);
        assert_eq!(streamed, joined.content);
        assert_eq!(
            (e.calls[0].name.as_str(), e.calls[0].arguments.as_str()),
            ("get_weather", "{\"city\":\"Paris\"}")
        );
        assert_eq!(e.calls[1].arguments, "{}");
        assert_ne!(e.calls[0].id, e.calls[1].id);
    }

    #[test]
    fn malformed_calls_stay_in_the_text() {
        for text in [
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {oops}}\n</tool_call>",
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {",
            "<tool_call>{\"arguments\": {}}</tool_call>",
        ] {
            let e = extract(Format::Hermes, text, &[]);
            assert_eq!((e.content.as_str(), e.calls.len()), (text, 0), "{text}");
        }
    }

    /// A call cut off (by `max_tokens`) after whole ones is dropped, not left in the content.
    #[test]
    fn a_call_cut_off_after_whole_ones_is_dropped() {
        let text = "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"arguments\": {\"city\": \"Pa";
        let e = extract(Format::Hermes, text, &[]);
        assert_eq!((e.content.as_str(), e.calls.len()), ("", 1));
    }

    /// A whole call whose closing tag was cut off (a stop string `</tool_call>`) is a call, in
    /// every format, as vLLM's parsers read it; a call cut inside stays text when alone.
    #[test]
    fn a_whole_call_without_its_closing_tag_is_a_call() {
        for (format, text) in [
            (
                Format::Hermes,
                "Sure.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n",
            ),
            (
                Format::Qwen3Coder,
                "Sure.\n<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n",
            ),
            (
                Format::Glm47,
                "Sure.\n<tool_call>f<arg_key>a</arg_key><arg_value>1</arg_value>",
            ),
        ] {
            let e = extract(format, text, &[]);
            assert_eq!(
                (e.content.as_str(), e.calls.len()),
                ("Sure.\n", 1),
                "{format:?}"
            );
            assert_eq!(e.calls[0].name, "f");
        }
        let cut = "<tool_call>\n{\"name\": \"f\", \"argu";
        let e = extract(Format::Hermes, cut, &[]);
        assert_eq!((e.content.as_str(), e.calls.len()), (cut, 0));
    }

    /// GLM's bare name cut off by `max_tokens` is no call (a made-up function's); a cut-off
    /// call naming an offered tool, or whose arguments ended, is.
    #[test]
    fn a_glm_name_cut_midway_is_no_call() {
        let tools =
            [json!({"type": "function", "function": {"name": "get_time", "parameters": {}}})];
        let cut = "Sure.<tool_call>get_wea";
        let e = extract(Format::Glm47, cut, &tools);
        assert_eq!((e.content.as_str(), e.calls.len()), (cut, 0));
        let e = extract(Format::Glm47, "Sure.<tool_call>get_time", &tools);
        assert_eq!((e.calls.len(), e.calls[0].name.as_str()), (1, "get_time"));
    }

    /// Qwen3-Coder values are read up to their own close: code holding `<parameter=` or
    /// `</function>` stays in its value; a close left out is still read as vLLM reads it.
    #[test]
    fn qwen3_coder_values_may_hold_the_markup() {
        let call = |params: &str| {
            let text = format!("<tool_call>\n<function=run>\n{params}</function>\n</tool_call>");
            let e = extract(Format::Qwen3Coder, &text, &[]);
            assert_eq!(e.calls.len(), 1, "{params}: {:?}", e.content);
            serde_json::from_str::<Value>(&e.calls[0].arguments).unwrap()
        };
        let code = "x = \"<parameter=y>\"\nend = \"</function>\"";
        let args = call(&format!("<parameter=code>\n{code}\n</parameter>\n"));
        assert_eq!(args, json!({"code": code}));
        let args = call("<parameter=a>\n1\n<parameter=b>\n2\n</parameter>\n");
        assert_eq!(args, json!({"a": "1", "b": "2"}));
    }

    /// Hermes arguments that are JSON but not an object are no call: the next turn would be
    /// refused for carrying them.
    #[test]
    fn hermes_arguments_must_be_an_object() {
        let text = "<tool_call>\n{\"name\": \"f\", \"arguments\": \"[1]\"}\n</tool_call>";
        let e = extract(Format::Hermes, text, &[]);
        assert_eq!(e.calls.len(), 0);
    }

    #[test]
    fn qwen3_coder_parameters_are_typed_by_the_schema() {
        let text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n</function>\n</tool_call>";
        let e = extract(Format::Qwen3Coder, text, &weather_tool());
        assert_eq!(e.content, "");
        let args: Value = serde_json::from_str(&e.calls[0].arguments).unwrap();
        assert_eq!(args, json!({"city": "New York", "days": 3, "metric": true}));
        // Without a schema, values are strings; broken markup stays text.
        let e = extract(Format::Qwen3Coder, text, &[]);
        let args: Value = serde_json::from_str(&e.calls[0].arguments).unwrap();
        assert_eq!(args["days"], "3");
        // The last parameter's close left out: the value ends with the function, as vLLM reads it.
        let unclosed = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>";
        let e = extract(Format::Qwen3Coder, unclosed, &[]);
        let args: Value = serde_json::from_str(&e.calls[0].arguments).unwrap();
        assert_eq!(args, json!({"city": "Paris"}));
        let broken = "<tool_call>\n<function=get_weather>\n<parameter=city\nParis\n</function>\n</tool_call>";
        assert_eq!(extract(Format::Qwen3Coder, broken, &[]).calls.len(), 0);
    }

    /// What models write back after templates showed them Python's `str` of earlier values, and
    /// a `</parameter>` left out, read as vLLM's parser reads them; two functions in one call
    /// stay text instead of merging.
    #[test]
    fn qwen3_coder_reads_python_literals_and_a_missing_close() {
        let args = |text: &str| -> Value {
            let e = extract(Format::Qwen3Coder, text, &weather_tool());
            serde_json::from_str(&e.calls[0].arguments).unwrap()
        };
        let t = "<tool_call>\n<function=get_weather>\n<parameter=metric>\nFalse\n</parameter>\n<parameter=days>\nNone\n</parameter>\n</function>\n</tool_call>";
        assert_eq!(args(t), json!({"metric": false, "days": null}));
        let t = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>";
        assert_eq!(args(t), json!({"city": "Paris", "days": 3}));
        // A string parameter keeps the text as written.
        let t = "<tool_call>\n<function=get_weather>\n<parameter=city>\nTrue\n</parameter>\n</function>\n</tool_call>";
        assert_eq!(args(t), json!({"city": "True"}));
        let two = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>";
        assert_eq!(
            extract(Format::Qwen3Coder, two, &weather_tool())
                .calls
                .len(),
            0
        );
        // The same with the first value's close left out: still not one call.
        let two = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>";
        assert_eq!(
            extract(Format::Qwen3Coder, two, &weather_tool())
                .calls
                .len(),
            0
        );
    }

    /// Values are read back as the grammar writes them: through a `$ref` to a string enum as
    /// text, a union as JSON.
    #[test]
    fn parameters_behind_references_and_unions_are_read_as_written() {
        let tools = vec![
            json!({"type": "function", "function": {"name": "paint", "parameters": {
            "$defs": {"Color": {"enum": ["red", "7"], "type": "string"}},
            "type": "object",
            "properties": {"color": {"$ref": "#/$defs/Color"},
                           "n": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                           "m": {"type": ["integer", "null"]}}}}}),
        ];
        let text = "<tool_call>\n<function=paint>\n<parameter=color>\n7\n</parameter>\n<parameter=n>\n5\n</parameter>\n<parameter=m>\nnull\n</parameter>\n</function>\n</tool_call>";
        let e = extract(Format::Qwen3Coder, text, &tools);
        let args: Value = serde_json::from_str(&e.calls[0].arguments).unwrap();
        assert_eq!(args, json!({"color": "7", "n": 5, "m": null}));
        let text = "<tool_call>paint<arg_key>color</arg_key><arg_value>7</arg_value><arg_key>n</arg_key><arg_value>5</arg_value></tool_call>";
        let e = extract(Format::Glm47, text, &tools);
        let args: Value = serde_json::from_str(&e.calls[0].arguments).unwrap();
        assert_eq!(args, json!({"color": "7", "n": 5}));
        // A string enum without a type is written bare, so it is read back as text.
        let untyped = vec![
            json!({"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"c": {"enum": ["1", "2"]}}}}}),
        ];
        let text = "<tool_call>f<arg_key>c</arg_key><arg_value>1</arg_value></tool_call>";
        let e = extract(Format::Glm47, text, &untyped);
        assert_eq!(e.calls[0].arguments, "{\"c\":\"1\"}");
    }

    #[test]
    fn glm_arguments_stay_json_and_strings_stay_strings() {
        let text = "I'll check.<tool_call>get_weather<arg_key>city</arg_key><arg_value>12</arg_value>\n<arg_key>days</arg_key><arg_value>3</arg_value><arg_key>extra</arg_key><arg_value>{\"a\": [1, true]}</arg_value><arg_key>note</arg_key><arg_value>not json</arg_value></tool_call><tool_call>\nget_time\n</tool_call>";
        let e = extract(Format::Glm47, text, &weather_tool());
        assert_eq!(e.content, "I'll check.");
        assert_eq!(e.calls.len(), 2);
        let args: Value = serde_json::from_str(&e.calls[0].arguments).unwrap();
        // `city` is a string by the schema, even though it reads as a number.
        assert_eq!(
            args,
            json!({"city": "12", "days": 3, "extra": {"a": [1, true]}, "note": "not json"})
        );
        assert_eq!(
            (e.calls[1].name.as_str(), e.calls[1].arguments.as_str()),
            ("get_time", "{}")
        );
    }

    #[test]
    fn malformed_glm_calls_stay_in_the_text() {
        for text in [
            "<tool_call>f<arg_key>a</arg_key>1</tool_call>",
            "<tool_call>f<arg_key>a</arg_key><arg_value>1</tool_call>",
            "<tool_call><arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",
            "<tool_call>f<arg_key>a</arg_key><arg_value>1</arg_value> junk</tool_call>",
        ] {
            let e = extract(Format::Glm47, text, &[]);
            assert_eq!((e.content.as_str(), e.calls.len()), (text, 0), "{text}");
        }
    }

    #[test]
    fn the_stream_filter_holds_back_only_what_may_be_a_call() {
        let mut f = StreamFilter::default();
        let mut sent = String::new();
        for piece in [
            "Sure",
            ". <to",
            "ol",
            "_call>",
            "{\"name\"",
            ": \"f\"}",
            "</tool_call>",
        ] {
            sent.push_str(&f.push(piece));
        }
        assert_eq!(sent, "Sure. ");
        assert_eq!(f.finish(), "<tool_call>{\"name\": \"f\"}</tool_call>");
        let mut f = StreamFilter::default();
        assert_eq!(f.push("a <to"), "a ");
        assert_eq!(f.push("y>"), "<toy>");
        assert_eq!(f.finish(), "");
    }
}
