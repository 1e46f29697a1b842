//! Chat templates, rendered byte-identically to transformers' `apply_chat_template`: Jinja with
//! `trim_blocks` and `lstrip_blocks`, Python's string methods, transformers' `tojson` (Python
//! `json.dumps` spacing, no ASCII escaping, keys in insertion order) and the globals
//! `raise_exception` and `strftime_now`.

use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::{Map, Value as Json};

use crate::checkpoint::Checkpoint;
use crate::error::{EngineError, Result};

mod probes;

/// A model's chat template and the special tokens it may refer to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// The roles whose `content` sent as a list of text parts it does not write as it writes
    /// the same text sent as a string (Qwen3's own templates: every role; GLM's: `tool`): their
    /// text parts are joined into one string first.
    joins: Vec<&'static str>,
    /// Whether it leaves out a `developer` message (OpenAI's newer name for `system`), as
    /// Qwen3's do, so such messages are rendered as `system` ones.
    drops_developer: bool,
}

/// A token written in `tokenizer_config.json` as a string or as `{"content": ...}`.
pub(crate) fn token_text(value: Option<&Json>) -> Option<String> {
    match value? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    /// A template from its source.
    pub fn new(
        source: impl Into<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Self {
        let mut template = Self {
            source: source.into(),
            bos_token,
            eos_token,
            joins: Vec::new(),
            drops_developer: false,
        };
        template.joins = probes::roles_to_join(&template);
        template.drops_developer = probes::drops_developer(&template);
        template
    }

    /// The snapshot's template: `chat_template.jinja`, else `tokenizer_config.json`'s
    /// `chat_template` (a string, or a list of named templates of which `default` is used), as
    /// transformers ranks them (a repository that updated its `.jinja` may keep an old entry in
    /// the config). `None` when the model has none (a base model).
    pub fn load(checkpoint: &Checkpoint) -> Result<Option<Self>> {
        let config_path = checkpoint
            .companion("tokenizer_config.json")
            .unwrap_or_else(|| checkpoint.config_path());
        let config: Map<String, Json> = checkpoint
            .optional_json("tokenizer_config.json")?
            .unwrap_or_default();
        let jinja = checkpoint.companion("chat_template.jinja");
        let from_file = match &jinja {
            Some(file) => match std::fs::read_to_string(file) {
                Ok(s) => Some(s),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(EngineError::BadFile {
                        path: file.clone(),
                        reason: e.to_string(),
                    })
                }
            },
            None => None,
        };
        let (source, path) = match from_file {
            Some(source) => (source, jinja.unwrap_or_default()),
            None => match from_config(&config, &config_path)? {
                Some(source) => (source, config_path),
                None => return Ok(None),
            },
        };
        let template = Self::new(
            source,
            token_text(config.get("bos_token")),
            token_text(config.get("eos_token")),
        );
        // Fail at load, not at the first request.
        template.environment().map_err(|e| EngineError::BadField {
            path,
            field: "chat_template".into(),
            reason: format!("the template does not parse: {e:#}"),
        })?;
        Ok(Some(template))
    }

    /// The template's Jinja source, as the model's files give it.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn environment(&self) -> std::result::Result<Environment<'static>, Error> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // A template comes with the model's files: one that loops without end must fail, not
        // hold the worker (the probes render it at load, each request renders it again).
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_filter("tojson", tojson);
        env.add_test("iterable", is_iterable);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", self.source.clone())?;
        Ok(env)
    }

    /// Renders `messages` (OpenAI-style JSON objects) with optional `tools`, the generation
    /// prompt if asked, and `extra` variables such as `enable_thinking`.
    pub fn render(
        &self,
        messages: &[Json],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
        extra: &Map<String, Json>,
    ) -> Result<String> {
        let developer = messages.iter().any(|m| role_of(m) == Some("developer"));
        if self.joins.is_empty() && !developer {
            return self.render_as_sent(messages, tools, add_generation_prompt, extra);
        }
        let adapted: Vec<Json> = messages.iter().map(|m| self.adapted(m)).collect();
        self.render_as_sent(&adapted, tools, add_generation_prompt, extra)
    }

    /// Renders `messages` so that the output continues the final one (transformers'
    /// `continue_final_message`): without the generation prompt, cut where the final message's
    /// text (its last text part) ends. As transformers does, a tag is written after the text and
    /// the render cut at it, not the text searched for (a template may repeat or rewrite it);
    /// the text's trailing whitespace stays where the template kept the tag's.
    pub fn render_continuing(
        &self,
        messages: &[Json],
        tools: Option<&[Json]>,
        extra: &Map<String, Json>,
    ) -> Result<String> {
        const TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";
        let mut messages = messages.to_vec();
        let text = messages
            .last_mut()
            .and_then(|m| match m.get_mut("content")? {
                Json::Array(parts) => parts.iter_mut().rev().find_map(|p| p.get_mut("text")),
                text => Some(text),
            });
        match text {
            Some(Json::String(text)) => text.push_str(TAG),
            _ => {
                return Err(EngineError::InvalidInput(
                    "continue_final_message needs a final message with text to continue".into(),
                ))
            }
        }
        let rendered = self.render(&messages, tools, false, extra)?;
        let Some(at) = rendered.rfind(TAG.trim_end()) else {
            return Err(EngineError::InvalidInput(
                "continue_final_message: the chat template does not write the final message's text as sent, so it cannot be continued".into(),
            ));
        };
        let before = &rendered[..at];
        Ok(if rendered[at..].starts_with(TAG) {
            before.to_string()
        } else {
            before.trim_end().to_string()
        })
    }

    /// `message` in a form this template writes: a `developer` message as `system`, if the
    /// template would leave it out; text parts joined, for roles it writes lists of otherwise
    /// (and for `developer`, which the probes do not cover: the string is the form every
    /// template takes).
    fn adapted(&self, message: &Json) -> Json {
        let mut message = message.clone();
        if role_of(&message) == Some("developer") && self.drops_developer {
            message["role"] = Json::String("system".into());
        }
        match role_of(&message) {
            Some(role) if role == "developer" || self.joins.contains(&role) => {
                probes::with_text_joined(&message)
            }
            _ => message,
        }
    }

    /// Renders `messages` as they are.
    fn render_as_sent(
        &self,
        messages: &[Json],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
        extra: &Map<String, Json>,
    ) -> Result<String> {
        let env = self
            .environment()
            .map_err(|e| EngineError::InvalidInput(format!("chat template: {e:#}")))?;
        let mut context: Map<String, Json> = extra.clone();
        context.insert(
            "messages".into(),
            Json::Array(messages.iter().map(with_argument_objects).collect()),
        );
        context.insert(
            "tools".into(),
            tools.map_or(Json::Null, |t| Json::Array(t.to_vec())),
        );
        context.insert(
            "add_generation_prompt".into(),
            Json::Bool(add_generation_prompt),
        );
        if let Some(bos) = &self.bos_token {
            context.insert("bos_token".into(), Json::String(bos.clone()));
        }
        if let Some(eos) = &self.eos_token {
            context.insert("eos_token".into(), Json::String(eos.clone()));
        }
        let template = env
            .get_template("chat")
            .map_err(|e| EngineError::InvalidInput(format!("chat template: {e:#}")))?;
        let mut out = Capped::default();
        let rendered = template
            .render_captured_to(Value::from(minijinja::value::Serde(&context)), &mut out)
            .map(drop);
        rendered.map_err(|e| {
            EngineError::InvalidInput(match e.kind() {
                _ if out.overflowed => format!(
                    "the chat template wrote more than {TEMPLATE_OUTPUT} bytes for this chat: shorten the messages, or fix the model's chat_template"
                ),
                ErrorKind::OutOfFuel => format!(
                    "the chat template ran past {TEMPLATE_FUEL} steps for this chat (a template that loops without end?): shorten the messages, or fix the model's chat_template"
                ),
                _ => format!("cannot render the chat: {}", brief(&e)),
            })
        })?;
        String::from_utf8(out.bytes).map_err(|_| {
            EngineError::InvalidInput("the chat template wrote text that is not UTF-8".into())
        })
    }
}

/// The most instructions one render may take: a real template over a long chat with tools
/// takes well under a tenth of it; a runaway loop stops within about a second.
const TEMPLATE_FUEL: u64 = 10_000_000;

/// The most bytes one render may write: far past any context a model serves.
const TEMPLATE_OUTPUT: usize = 64 << 20;

/// A render's output, refusing to grow past [`TEMPLATE_OUTPUT`].
#[derive(Default)]
struct Capped {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > TEMPLATE_OUTPUT {
            self.overflowed = true;
            return Err(std::io::Error::other("the render's output is too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `tokenizer_config.json`'s `chat_template` (at `path`): a string, or the `default` of a list of
/// named templates.
fn from_config(config: &Map<String, Json>, path: &std::path::Path) -> Result<Option<String>> {
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(named)) => Ok(named
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Json::as_str)
            .map(str::to_string)),
        Some(_) => Err(EngineError::BadField {
            path: path.to_owned(),
            field: "chat_template".into(),
            reason: "expected a string or a list of {name, template}".into(),
        }),
    }
}

/// A template error and its causes on one line, without minijinja's debug dump (`{:#}` adds the
/// template's source around the line and every variable in scope: the whole conversation).
fn brief(e: &minijinja::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// A message's `role`.
fn role_of(message: &Json) -> Option<&str> {
    message.get("role").and_then(Json::as_str)
}

/// `message` with each tool call's `arguments` as a JSON object where the client sent it as the
/// JSON text OpenAI's API carries: templates iterate over the arguments (GLM's `.items()`) or
/// write them with `tojson`, as they would the dicts transformers users pass (vLLM converts the
/// same way).
fn with_argument_objects(message: &Json) -> Json {
    let mut message = message.clone();
    if let Some(Json::Array(calls)) = message.get_mut("tool_calls") {
        for call in calls {
            let slot = match call.get_mut("function") {
                Some(f) => f.get_mut("arguments"),
                None => call.get_mut("arguments"),
            };
            if let Some(arguments) = slot {
                if let Some(Ok(object @ Json::Object(_))) =
                    arguments.as_str().map(serde_json::from_str::<Json>)
                {
                    *arguments = object;
                }
            }
        }
    }
    message
}

/// How transformers' `tojson` writes JSON: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)` by default — `", "` and `": "` separators, keys in insertion
/// order, non-ASCII kept — with each keyword honoured when a template passes it.
struct JsonStyle {
    indent: Option<usize>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

/// Positional arguments are Python's order (`ensure_ascii`, then `indent`), not Jinja's own
/// filter's (`indent` first): `x|tojson(4)` asks transformers for ASCII, not an indent.
fn tojson(
    value: Value,
    ensure_ascii: Option<Value>,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, Error> {
    let ascii = kwargs
        .get::<Option<Value>>("ensure_ascii")?
        .or(ensure_ascii);
    let indent = match kwargs.get::<Option<Value>>("indent")?.or(indent) {
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v)?),
        None => None,
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(seps) if seps.len() == 2 => (seps[0].clone(), seps[1].clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        ensure_ascii: ascii.is_some_and(|v| v.is_true()),
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let json: Json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    write_python_json(&json, &style, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_string(s: &str, ascii: bool, out: &mut String) {
    let quoted = Json::String(s.to_string()).to_string();
    if !ascii {
        out.push_str(&quoted);
        return;
    }
    for c in quoted.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
}

fn write_python_json(value: &Json, style: &JsonStyle, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = style.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    match value {
        Json::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, depth + 1);
                write_python_json(item, style, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Json::Object(map) if !map.is_empty() => {
            let mut entries: Vec<(&String, &Json)> = map.iter().collect();
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, depth + 1);
                write_string(key, style.ensure_ascii, out);
                out.push_str(&style.key_sep);
                write_python_json(item, style, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        Json::String(s) => write_string(s, style.ensure_ascii, out),
        other => out.push_str(&other.to_string()),
    }
}

/// Jinja2's `is iterable`: lists, maps and strings are; `none` is not (transformers passes
/// `tools=None`, and templates test `tools is iterable` before taking its length).
fn is_iterable(value: Value) -> bool {
    use minijinja::value::ValueKind;
    matches!(
        value.kind(),
        ValueKind::Seq
            | ValueKind::Map
            | ValueKind::Iterable
            | ValueKind::String
            | ValueKind::Undefined
    )
}

fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current time in UTC (transformers takes the host's local time;
/// a worker's confined view may have no time zone, and UTC reads the same at every tier).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    strftime(&format, secs)
}

/// `format` with Python's `strftime` directives (C locale) filled in for `secs` since the epoch,
/// UTC; one it does not know is written as it stands.
fn strftime(format: &str, secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
    ];
    let name = MONTHS[(month - 1) as usize];
    // 1970-01-01 was a Thursday.
    let weekday = DAYS[(days + 4).rem_euclid(7) as usize];
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    const BEFORE: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = BEFORE[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let hour12 = match rem / 3600 % 12 {
        0 => 12,
        h => h,
    };
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('B') => out.push_str(name),
            Some('b' | 'h') => out.push_str(&name[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('I') => out.push_str(&format!("{hour12:02}")),
            Some('p') => out.push_str(if rem < 43_200 { "AM" } else { "PM" }),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests;
