//! Chat templates, rendered byte-identically to transformers' `apply_chat_template`: Jinja with
//! `trim_blocks` and `lstrip_blocks`, Python's string methods, transformers' `tojson` (Python
//! `json.dumps` spacing, no ASCII escaping, keys in insertion order) and the globals
//! `raise_exception` and `strftime_now`.

use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::{Map, Value as Json};

use crate::checkpoint::Checkpoint;
use crate::error::{EngineError, Result};

/// A model's chat template and the special tokens it may refer to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// A token written in `tokenizer_config.json` as a string or as `{"content": ...}`.
fn token_text(value: Option<&Json>) -> Option<String> {
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
        Self {
            source: source.into(),
            bos_token,
            eos_token,
        }
    }

    /// The snapshot's template: `tokenizer_config.json`'s `chat_template` (a string, or a list of
    /// named templates of which `default` is used), else `chat_template.jinja`. `None` when the
    /// model has none (a base model).
    pub fn load(checkpoint: &Checkpoint) -> Result<Option<Self>> {
        let path = checkpoint.path("tokenizer_config.json");
        let config: Map<String, Json> = checkpoint
            .optional_json("tokenizer_config.json")?
            .unwrap_or_default();
        let from_config = match config.get("chat_template") {
            None | Some(Json::Null) => None,
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Json::as_str)
                .map(str::to_string),
            Some(_) => {
                return Err(EngineError::BadField {
                    path,
                    field: "chat_template".into(),
                    reason: "expected a string or a list of {name, template}".into(),
                })
            }
        };
        let source = match from_config {
            Some(s) => s,
            None => {
                let file = checkpoint.path("chat_template.jinja");
                match std::fs::read_to_string(&file) {
                    Ok(s) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => {
                        return Err(EngineError::BadFile {
                            path: file,
                            reason: e.to_string(),
                        })
                    }
                }
            }
        };
        let template = Self::new(
            source,
            token_text(config.get("bos_token")),
            token_text(config.get("eos_token")),
        );
        // Fail at load, not at the first request.
        template.environment().map_err(|e| EngineError::BadField {
            path: checkpoint.path("tokenizer_config.json"),
            field: "chat_template".into(),
            reason: format!("the template does not parse: {e:#}"),
        })?;
        Ok(Some(template))
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
        env.add_filter("tojson", tojson);
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
        let env = self
            .environment()
            .map_err(|e| EngineError::InvalidInput(format!("chat template: {e:#}")))?;
        let mut context: Map<String, Json> = extra.clone();
        context.insert("messages".into(), Json::Array(messages.to_vec()));
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
        template
            .render(Value::from(minijinja::value::Serde(&context)))
            .map_err(|e| EngineError::InvalidInput(format!("cannot render the chat: {e:#}")))
    }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False)` — `", "` and `": "` separators,
/// keys in insertion order — or indented when `indent` is given.
fn tojson(value: Value, indent: Option<usize>) -> std::result::Result<Value, Error> {
    let json: Json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    write_python_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_python_json(value: &Json, indent: Option<usize>, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match value {
        Json::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Json::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&Json::String(key.clone()).to_string());
                out.push_str(": ");
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current UTC time; supports the directives chat templates use.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
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
    let name = MONTHS[(month - 1) as usize];
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
            Some('b') => out.push_str(&name[..3]),
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
mod tests {
    use super::*;

    #[test]
    fn tojson_spaces_like_python_and_keeps_unicode_and_order() {
        let v: Json = serde_json::from_str(
            r#"{"name": "f", "arguments": {"city": "Zürich", "n": [1, 2.5]}}"#,
        )
        .unwrap();
        let out = tojson(Value::from(minijinja::value::Serde(&v)), None).unwrap();
        assert_eq!(
            out.to_string(),
            r#"{"name": "f", "arguments": {"city": "Zürich", "n": [1, 2.5]}}"#
        );
        let out = tojson(Value::from(minijinja::value::Serde(&v)), Some(2)).unwrap();
        assert!(out
            .to_string()
            .starts_with("{\n  \"name\": \"f\",\n  \"arguments\": {\n    \"city\""));
    }

    #[test]
    fn raise_exception_fails_the_render_with_its_message() {
        let t = ChatTemplate::new("{{ raise_exception('no system messages') }}", None, None);
        let e = t.render(&[], None, false, &Map::new()).unwrap_err();
        assert!(e.to_string().contains("no system messages"), "{e}");
    }

    #[test]
    fn strftime_now_formats_dates() {
        let s = strftime_now("%d %b %Y".into());
        assert_eq!(s.len(), 11, "{s}");
    }
}
