//! Forced tool calls as a grammar (llguidance's Lark) in the model's own tool-call markup — the
//! same markup `tool_calls` parses back — with each call's arguments held to its tool's
//! `parameters` schema. Markers that are tokens of the model (`<tool_call>`) are named as
//! tokens, so a model writes them the way it was trained to.

use pio_plugin_api::wire::json_layout;
use serde_json::{json, Map, Value};

use super::tool_calls::Format;

/// `s` as a Lark string literal (Lark reads JSON string syntax).
pub(super) fn literal(s: &str) -> String {
    Value::from(s).to_string()
}

/// A schema embedded as `%json { ... }`, laid out as schemas sent whole are (`json_layout`).
fn embedded(schema: &Value) -> String {
    let mut schema = schema.clone();
    match &mut schema {
        Value::Object(map) => {
            map.entry("x-guidance").or_insert_with(json_layout);
        }
        // `true` or a missing schema: any JSON value.
        _ => schema = json!({"x-guidance": json_layout()}),
    }
    format!("%json {schema}")
}

/// One offered tool: its name and parameter schema.
struct Tool<'a> {
    name: &'a str,
    parameters: Value,
}

fn tools_of<'a>(tools: &'a [Value], only: Option<&str>) -> Vec<Tool<'a>> {
    tools
        .iter()
        .filter_map(|t| {
            let f = t.get("function")?;
            let name = f.get("name")?.as_str()?;
            let parameters = f
                .get("parameters")
                .cloned()
                .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
            Some(Tool { name, parameters })
        })
        .filter(|t| only.is_none_or(|o| o == t.name))
        .collect()
}

/// The grammar of one call (or, with `parallel`, of one or more) to `only` or any of `tools`.
pub fn lark(format: Format, tools: &[Value], only: Option<&str>, parallel: bool) -> String {
    let tools = tools_of(tools, only);
    let (separator, body) = match format {
        Format::Hermes => ("\"\\n\" ", hermes(&tools)),
        Format::Qwen3Coder => ("\"\\n\" ", qwen3_coder(&tools)),
        Format::Glm47 => ("", glm(&tools)),
    };
    let start = if parallel {
        format!("start: call ({separator}call)*\n")
    } else {
        "start: call\n".to_string()
    };
    start + &body
}

/// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.
fn hermes(tools: &[Tool<'_>]) -> String {
    let calls: Vec<Value> = tools
        .iter()
        .map(|t| {
            json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let schema = match <[Value; 1]>::try_from(calls) {
        Ok([one]) => one,
        Err(calls) => json!({"anyOf": calls}),
    };
    format!(
        "call: <tool_call> \"\\n\" {} \"\\n\" </tool_call>\n",
        embedded(&schema)
    )
}

/// A parameter's properties, in schema order, with whether each is required.
fn parameters(schema: &Value) -> Vec<(String, Value, bool)> {
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    schema
        .get("properties")
        .and_then(Value::as_object)
        .map(Map::iter)
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone(), required.contains(&k.as_str())))
        .collect()
}

/// How a bare (unquoted) parameter value is written: as JSON, unless its schema says string
/// (the parsers read it back the same way).
fn is_bare_string(schema: &Value) -> bool {
    !matches!(
        schema.get("type").and_then(Value::as_str),
        Some("integer" | "number" | "boolean" | "object" | "array" | "null")
    )
}

/// A bare string value: one of its `enum`, or text of its length bounds; then `end` (a literal
/// the text cannot contain), if given.
fn bare_string(rule: &str, schema: &Value, end: Option<&str>) -> String {
    if let Some(choices) = schema.get("enum").and_then(Value::as_array) {
        let alternatives: Vec<String> = choices
            .iter()
            .map(|c| literal(&c.as_str().map_or_else(|| c.to_string(), str::to_string)))
            .collect();
        return format!(
            "{rule}: ({}) {}\n",
            alternatives.join(" | "),
            end.unwrap_or_default()
        );
    }
    let min = schema.get("minLength").and_then(Value::as_u64).unwrap_or(0);
    let max = schema
        .get("maxLength")
        .and_then(Value::as_u64)
        .map_or(String::new(), |m| m.to_string());
    let text = format!("/(?s:.{{{min},{max}}})/");
    match end {
        Some(end) => format!("{rule}[suffix={end}]: {text}\n"),
        None => format!("{rule}: {text}\n"),
    }
}

/// `<tool_call>\n<function=NAME>\n<parameter=K>\nV\n</parameter>\n…</function>\n</tool_call>`.
fn qwen3_coder(tools: &[Tool<'_>]) -> String {
    let mut rules = String::new();
    let mut functions = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        let mut parts = vec![literal(&format!("<function={}>\n", tool.name))];
        for (j, (key, schema, required)) in parameters(&tool.parameters).into_iter().enumerate() {
            let (p, v) = (format!("p{i}_{j}"), format!("v{i}_{j}"));
            let open = literal(&format!("<parameter={key}>\n"));
            if is_bare_string(&schema) {
                rules += &format!("{p}: {open} {v} \"\\n\"\n");
                rules += &bare_string(&v, &schema, Some(&literal("\n</parameter>")));
            } else {
                rules += &format!("{p}: {open} {} \"\\n</parameter>\\n\"\n", embedded(&schema));
            }
            parts.push(if required { p } else { format!("{p}?") });
        }
        parts.push(literal("</function>"));
        rules += &format!("f{i}: {}\n", parts.join(" "));
        functions.push(format!("f{i}"));
    }
    format!(
        "call: <tool_call> \"\\n\" ({}) \"\\n\" </tool_call>\n{rules}",
        functions.join(" | ")
    )
}

/// `<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>…</tool_call>`.
fn glm(tools: &[Tool<'_>]) -> String {
    let mut rules = String::new();
    let mut functions = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        let mut parts = vec![literal(tool.name)];
        for (j, (key, schema, required)) in parameters(&tool.parameters).into_iter().enumerate() {
            let (p, v) = (format!("p{i}_{j}"), format!("v{i}_{j}"));
            let value = if is_bare_string(&schema) {
                rules += &bare_string(&v, &schema, None);
                v
            } else {
                embedded(&schema)
            };
            rules += &format!(
                "{p}: <arg_key> {} </arg_key> <arg_value> {value} </arg_value>\n",
                literal(&key)
            );
            parts.push(if required { p } else { format!("{p}?") });
        }
        rules += &format!("f{i}: {}\n", parts.join(" "));
        functions.push(format!("f{i}"));
    }
    format!(
        "call: <tool_call> ({}) </tool_call>\n{rules}",
        functions.join(" | ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Vec<Value> {
        vec![
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object",
                "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer"},
                               "note": {"type": "string", "maxLength": 20}},
                "required": ["city"]}}}),
            json!({"type": "function", "function": {"name": "ping"}}),
        ]
    }

    #[test]
    fn hermes_calls_are_one_json_object_naming_the_tool() {
        let g = lark(Format::Hermes, &tools(), None, true);
        assert!(g.starts_with("start: call (\"\\n\" call)*\n"), "{g}");
        assert!(g.contains("call: <tool_call> \"\\n\" %json {"), "{g}");
        assert!(
            g.contains(r#""anyOf":"#) && g.contains(r#"{"const":"get_weather"}"#),
            "{g}"
        );
        let one = lark(Format::Hermes, &tools(), Some("ping"), false);
        assert!(
            one.starts_with("start: call\n") && !one.contains("anyOf"),
            "{one}"
        );
        assert!(
            one.contains(r#""const":"ping""#) && !one.contains("get_weather"),
            "{one}"
        );
        assert!(one.contains(r#""x-guidance""#), "the JSON layout: {one}");
    }

    #[test]
    fn qwen3_coder_parameters_are_tags_with_bare_strings_and_json_values() {
        let g = lark(Format::Qwen3Coder, &tools(), Some("get_weather"), false);
        assert!(
            g.contains(r#"f0: "<function=get_weather>\n" p0_0 p0_1? p0_2? "</function>""#),
            "{g}"
        );
        assert!(
            g.contains(r#"v0_0: ("Paris" | "Oslo") "\n</parameter>""#),
            "{g}"
        );
        assert!(g.contains(r#"p0_1: "<parameter=days>\n" %json {"#), "{g}");
        assert!(
            g.contains(r#"v0_2[suffix="\n</parameter>"]: /(?s:.{0,20})/"#),
            "{g}"
        );
    }

    #[test]
    fn glm_arguments_sit_between_key_and_value_tokens() {
        let g = lark(Format::Glm47, &tools(), None, true);
        assert!(g.starts_with("start: call (call)*\n"), "{g}");
        assert!(
            g.contains("call: <tool_call> (f0 | f1) </tool_call>"),
            "{g}"
        );
        assert!(
            g.contains(r#"p0_0: <arg_key> "city" </arg_key> <arg_value> v0_0 </arg_value>"#),
            "{g}"
        );
        assert!(g.contains(r#"v0_0: ("Paris" | "Oslo") "#), "{g}");
        assert!(g.contains(r#"v0_2: /(?s:.{0,20})/"#), "{g}");
        assert!(g.contains(r#"f1: "ping""#), "{g}");
    }

    #[test]
    fn names_and_keys_are_quoted_not_spliced() {
        let odd = vec![
            json!({"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a\"b\n": {"type": "string"}}}}}),
        ];
        let g = lark(Format::Qwen3Coder, &odd, None, false);
        assert!(g.contains(r#""<parameter=a\"b\n>\n""#), "{g}");
    }
}
