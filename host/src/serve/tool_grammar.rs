//! Forced tool calls as a grammar (llguidance's Lark) in the model's own tool-call markup — the
//! same markup `tool_calls` parses back — with each call's arguments held to its tool's
//! `parameters` schema. Markers that are tokens of the model (`<tool_call>`) are named as
//! tokens, so a model writes them the way it was trained to.

use pio_plugin_api::wire::guidance_schema;
use serde_json::{json, Map, Value};

use super::tool_calls::Format;

/// `s` as a Lark string literal (Lark reads JSON string syntax).
pub(super) fn literal(s: &str) -> String {
    Value::from(s).to_string()
}

/// A schema embedded as `%json { ... }`, read as schemas sent whole are ([`guidance_schema`]:
/// PIO's layout, unknown formats as annotations); `false` refuses any value, as the schema does.
fn embedded(schema: &Value) -> String {
    format!("%json {}", guidance_schema(schema))
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
            // OpenAI: a function without `parameters` takes none.
            let parameters = f.get("parameters").cloned().unwrap_or_else(
                || json!({"type": "object", "properties": {}, "additionalProperties": false}),
            );
            Some(Tool { name, parameters })
        })
        .filter(|t| only.is_none_or(|o| o == t.name))
        .collect()
}

/// `schema` with the `$ref`s at its top followed to what they name in `root` (the tool's
/// parameter schema: `#/$defs/N`, `#/definitions/N`), as pydantic's schemas refer to enums and
/// nested models.
pub(super) fn resolved<'a>(mut schema: &'a Value, root: &'a Value) -> &'a Value {
    // A bound, for references that go round in a circle.
    for _ in 0..16 {
        let target = schema
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix('#'))
            .and_then(|pointer| root.pointer(pointer));
        match target {
            Some(t) => schema = t,
            None => break,
        }
    }
    schema
}

/// A parameter's schema standing alone (each is embedded as its own `%json`), with the
/// definitions of the tool's schema it reaches through its references: only those, since every
/// parameter gets its own copy.
fn standalone(schema: &Value, root: &Value) -> Value {
    let used = reached(schema, root);
    let mut schema = schema.clone();
    if let Value::Object(map) = &mut schema {
        for key in ["$defs", "definitions"] {
            let Some(Value::Object(defs)) = root.get(key) else {
                continue;
            };
            let kept: Map<String, Value> = (defs.iter())
                .filter(|(name, _)| used.contains(&(key, name.as_str())))
                .map(|(name, def)| (name.clone(), def.clone()))
                .collect();
            if !kept.is_empty() {
                map.entry(key).or_insert(Value::Object(kept));
            }
        }
    }
    schema
}

/// The definitions (`$defs` or `definitions`, and name) `schema` reaches through `$ref`s,
/// theirs followed too.
fn reached<'a>(schema: &'a Value, root: &'a Value) -> Vec<(&'static str, &'a str)> {
    let mut found: Vec<(&'static str, &'a str)> = Vec::new();
    let mut todo = vec![schema];
    while let Some(value) = todo.pop() {
        match value {
            Value::Object(map) => {
                let target = map.get("$ref").and_then(Value::as_str).and_then(|r| {
                    ["$defs", "definitions"].into_iter().find_map(|key| {
                        let rest = r.strip_prefix("#/")?.strip_prefix(key)?.strip_prefix('/')?;
                        let name = rest.split('/').next()?;
                        let (name, def) = root
                            .get(key)?
                            .as_object()?
                            .get_key_value(&name.replace("~1", "/").replace("~0", "~"))?;
                        Some((key, name.as_str(), def))
                    })
                });
                if let Some((key, name, def)) = target {
                    if !found.contains(&(key, name)) {
                        found.push((key, name));
                        todo.push(def);
                    }
                }
                todo.extend(map.values());
            }
            Value::Array(items) => todo.extend(items),
            _ => {}
        }
    }
    found
}

/// The most bytes a forced call's grammar may take: tools whose schemas multiply past it (a
/// large definition referenced by many parameters, each embedding its own copy) are refused.
const MAX_GRAMMAR: usize = 32 << 20;

/// An error once `rules` has grown past [`MAX_GRAMMAR`].
fn within_budget(rules: &str) -> Result<(), String> {
    match rules.len() > MAX_GRAMMAR {
        true => Err(format!(
            "the tools' parameter schemas make a grammar past {MAX_GRAMMAR} bytes: send smaller schemas, or tool_choice \"auto\""
        )),
        false => Ok(()),
    }
}

/// The grammar of one call (or, with `parallel`, of one or more) to `only` or any of `tools`;
/// an error, for the client, when it would be too large.
pub fn lark(
    format: Format,
    tools: &[Value],
    only: Option<&str>,
    parallel: bool,
) -> Result<String, String> {
    let tools = tools_of(tools, only);
    let (separator, body) = match format {
        Format::Hermes => ("\"\\n\" ", hermes(&tools)),
        Format::Qwen3Coder => ("\"\\n\" ", qwen3_coder(&tools)?),
        Format::Glm47 => ("", glm(&tools)?),
    };
    let start = if parallel {
        format!("start: call ({separator}call)*\n")
    } else {
        "start: call\n".to_string()
    };
    Ok(start + &body)
}

/// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`: the envelope as text laid out
/// as `json.dumps` writes it, the arguments a schema of their own (so that its `$ref`s resolve
/// against its own root).
fn hermes(tools: &[Tool<'_>]) -> String {
    let mut rules = String::new();
    let mut functions = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        let head = format!("{{\"name\": {}, \"arguments\": ", Value::from(tool.name));
        rules += &format!(
            "f{i}: {} {} \"}}\"\n",
            literal(&head),
            embedded(&an_object(&tool.parameters))
        );
        functions.push(format!("f{i}"));
    }
    format!(
        "call: <tool_call> \"\\n\" ({}) \"\\n\" </tool_call>\n{rules}",
        functions.join(" | ")
    )
}

/// `parameters` held to a JSON object, as a call's arguments always are: a schema that names no
/// type (`{}`, as clients send for a function of no arguments, or properties without `type`)
/// allowed `"arguments": null` or `5`, which no call parses from, so a forced call came back as
/// text. A schema that says what it is in other words (`$ref`, a union, an enum) is kept.
fn an_object(parameters: &Value) -> Value {
    const SAYS: [&str; 7] = ["type", "$ref", "anyOf", "oneOf", "allOf", "enum", "const"];
    match parameters {
        Value::Object(map) if !SAYS.iter().any(|k| map.contains_key(*k)) => {
            let mut map = map.clone();
            map.insert("type".into(), "object".into());
            Value::Object(map)
        }
        Value::Bool(true) | Value::Null => json!({"type": "object"}),
        other => other.clone(),
    }
}

/// A parameter's properties, in schema order, with whether each is required (a schema that is
/// itself a reference read where it points).
fn parameters(schema: &Value) -> Vec<(String, Value, bool)> {
    let schema = resolved(schema, schema);
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

/// Whether a parameter's value is written bare (unquoted text) in the XML-like markups: when its
/// schema (references followed) says string, or nothing of its type at all; otherwise it is
/// JSON (a union such as `anyOf` or `["integer", "null"]` included). The parsers read values
/// back by the same rule.
pub(super) fn is_bare_string(schema: &Value) -> bool {
    if schema == &Value::Bool(false) {
        // No value: the JSON grammar of `false` refuses every one.
        return false;
    }
    match schema.get("type") {
        Some(Value::String(t)) => t == "string",
        Some(Value::Array(types)) => types.len() == 1 && types[0] == "string",
        Some(_) => false,
        None => {
            let composite = ["anyOf", "oneOf", "allOf", "const", "$ref"]
                .iter()
                .any(|k| schema.get(k).is_some());
            let strings = schema
                .get("enum")
                .and_then(Value::as_array)
                .is_none_or(|e| e.iter().all(Value::is_string));
            !composite && strings
        }
    }
}

/// A bare string value: one of its `enum` (or its `const`), text its `pattern` matches, or text
/// of its length bounds; then `end` (a literal the text cannot contain), if given. A keyword the
/// markup's grammar cannot hold it to is refused (a call that ignored it would be returned as
/// valid).
fn bare_string(rule: &str, schema: &Value, end: Option<&str>) -> Result<String, String> {
    let end_literal = end.unwrap_or_default();
    let choices = match (schema.get("const"), schema.get("enum")) {
        (Some(c), _) => Some(std::slice::from_ref(c)),
        (None, Some(Value::Array(e))) => Some(e.as_slice()),
        _ => None,
    };
    if let Some(choices) = choices {
        let alternatives: Vec<String> = choices
            .iter()
            .map(|c| literal(&c.as_str().map_or_else(|| c.to_string(), str::to_string)))
            .collect();
        return Ok(format!(
            "{rule}: ({}) {end_literal}\n",
            alternatives.join(" | ")
        ));
    }
    // `format` is an annotation most validators do not assert either (JSON Schema 2020-12),
    // and tools generated from OpenAPI carry it everywhere: not held to, as vLLM does not.
    let bounded = schema.get("minLength").is_some() || schema.get("maxLength").is_some();
    let text = match schema.get("pattern") {
        Some(_) if bounded => {
            return Err("a `pattern` with `minLength`/`maxLength` cannot both be held to in this model's call markup: fold the lengths into the pattern".into())
        }
        Some(Value::String(pattern)) => format!("/{}/", whole_value(pattern)),
        Some(other) => return Err(format!("`pattern` must be a string, found {other}")),
        None => {
            let min = schema.get("minLength").and_then(Value::as_u64).unwrap_or(0);
            let max = schema
                .get("maxLength")
                .and_then(Value::as_u64)
                .map_or(String::new(), |m| m.to_string());
            format!("/(?s:.{{{min},{max}}})/")
        }
    };
    Ok(match end {
        Some(end) => format!("{rule}[suffix={end}]: {text}\n"),
        None => format!("{rule}: {text}\n"),
    })
}

/// JSON Schema's `pattern` (matched anywhere in the value unless anchored) as a regex the whole
/// value must match, written for a Lark `/…/` literal: its anchors dropped, an unanchored end
/// opened with `.*`, an unescaped `/` escaped.
fn whole_value(pattern: &str) -> String {
    let (start, rest) = match pattern.strip_prefix('^') {
        Some(rest) => ("", rest),
        None => ("(?s:.*)", pattern),
    };
    // A `$` ends the pattern only when no backslash escapes it.
    let escapes =
        (rest.strip_suffix('$')).map(|body| body.chars().rev().take_while(|&c| c == '\\').count());
    let (body, end) = match escapes {
        Some(n) if n % 2 == 0 => (&rest[..rest.len() - 1], ""),
        _ => (rest, "(?s:.*)"),
    };
    let mut out = String::from(start);
    let mut escaped = false;
    for c in body.chars() {
        if c == '/' && !escaped {
            out.push('\\');
        }
        escaped = c == '\\' && !escaped;
        out.push(c);
    }
    out + end
}

/// `e`, about parameter `key` of tool `name`, for the client.
fn parameter_error(name: &str, key: &str, e: String) -> String {
    format!("tool `{name}`, parameter `{key}`: {e}")
}

/// `<tool_call>\n<function=NAME>\n<parameter=K>\nV\n</parameter>\n…</function>\n</tool_call>`.
fn qwen3_coder(tools: &[Tool<'_>]) -> Result<String, String> {
    let mut rules = String::new();
    let mut functions = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        let mut parts = vec![literal(&format!("<function={}>\n", tool.name))];
        for (j, (key, schema, required)) in parameters(&tool.parameters).into_iter().enumerate() {
            let (p, v) = (format!("p{i}_{j}"), format!("v{i}_{j}"));
            let open = literal(&format!("<parameter={key}>\n"));
            let schema = resolved(&schema, &tool.parameters);
            if is_bare_string(schema) {
                rules += &format!("{p}: {open} {v} \"\\n\"\n");
                rules += &bare_string(&v, schema, Some(&literal("\n</parameter>")))
                    .map_err(|e| parameter_error(tool.name, &key, e))?;
            } else {
                let json = embedded(&standalone(schema, &tool.parameters));
                rules += &format!("{p}: {open} {json} \"\\n</parameter>\\n\"\n");
                within_budget(&rules)?;
            }
            parts.push(if required { p } else { format!("{p}?") });
        }
        parts.push(literal("</function>"));
        rules += &format!("f{i}: {}\n", parts.join(" "));
        functions.push(format!("f{i}"));
    }
    Ok(format!(
        "call: <tool_call> \"\\n\" ({}) \"\\n\" </tool_call>\n{rules}",
        functions.join(" | ")
    ))
}

/// `<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>…</tool_call>`.
fn glm(tools: &[Tool<'_>]) -> Result<String, String> {
    let mut rules = String::new();
    let mut functions = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        let mut parts = vec![literal(tool.name)];
        for (j, (key, schema, required)) in parameters(&tool.parameters).into_iter().enumerate() {
            let (p, v) = (format!("p{i}_{j}"), format!("v{i}_{j}"));
            let schema = resolved(&schema, &tool.parameters);
            let value = if is_bare_string(schema) {
                rules += &bare_string(&v, schema, None)
                    .map_err(|e| parameter_error(tool.name, &key, e))?;
                v
            } else {
                let json = embedded(&standalone(schema, &tool.parameters));
                within_budget(&json)?;
                json
            };
            rules += &format!(
                "{p}: <arg_key> {} </arg_key> <arg_value> {value} </arg_value>\n",
                literal(&key)
            );
            within_budget(&rules)?;
            parts.push(if required { p } else { format!("{p}?") });
        }
        rules += &format!("f{i}: {}\n", parts.join(" "));
        functions.push(format!("f{i}"));
    }
    Ok(format!(
        "call: <tool_call> ({}) </tool_call>\n{rules}",
        functions.join(" | ")
    ))
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
        let g = lark(Format::Hermes, &tools(), None, true).unwrap();
        assert!(g.starts_with("start: call (\"\\n\" call)*\n"), "{g}");
        assert!(
            g.contains("call: <tool_call> \"\\n\" (f0 | f1) \"\\n\" </tool_call>"),
            "{g}"
        );
        assert!(
            g.contains(r#"f0: "{\"name\": \"get_weather\", \"arguments\": " %json {"#),
            "{g}"
        );
        let one = lark(Format::Hermes, &tools(), Some("ping"), false).unwrap();
        assert!(one.starts_with("start: call\n"), "{one}");
        assert!(
            one.contains(r#"\"ping\""#) && !one.contains("get_weather"),
            "{one}"
        );
        assert!(one.contains(r#""x-guidance""#), "the JSON layout: {one}");
        // No parameters: none may be written.
        assert!(one.contains(r#""additionalProperties":false"#), "{one}");
    }

    /// A call's arguments are an object even where the tool's schema names no type.
    #[test]
    fn hermes_arguments_are_an_object_whatever_the_schema_leaves_out() {
        for parameters in [
            json!({}),
            json!({"properties": {"x": {"type": "integer"}}}),
            json!(true),
        ] {
            let tools = vec![
                json!({"type": "function", "function": {"name": "ping", "parameters": parameters}}),
            ];
            let g = lark(Format::Hermes, &tools, None, false).unwrap();
            assert!(g.contains(r#""type":"object""#), "{parameters}: {g}");
        }
        let referred = vec![
            json!({"type": "function", "function": {"name": "p", "parameters": {"$ref": "#/$defs/A", "$defs": {"A": {"type": "object"}}}}}),
        ];
        let g = lark(Format::Hermes, &referred, None, false).unwrap();
        // Unchanged: the reference says what it is.
        assert!(
            g.contains(
                r##"%json {"$ref":"#/$defs/A","$defs":{"A":{"type":"object"}},"x-guidance""##
            ),
            "{g}"
        );
    }

    #[test]
    fn qwen3_coder_parameters_are_tags_with_bare_strings_and_json_values() {
        let g = lark(Format::Qwen3Coder, &tools(), Some("get_weather"), false).unwrap();
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

    /// A bare string's `pattern` and `const` are held to; a keyword the markup cannot hold a
    /// bare string to is refused, naming the tool and the parameter.
    #[test]
    fn bare_strings_keep_their_pattern_or_are_refused() {
        let tool = |schema: Value| {
            vec![
                json!({"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "properties": {"s": schema}}}}),
            ]
        };
        let g = lark(
            Format::Glm47,
            &tool(json!({"type": "string", "pattern": "^a/[0-9]{2}$"})),
            None,
            false,
        )
        .unwrap();
        assert!(g.contains(r"v0_0: /a\/[0-9]{2}/"), "{g}");
        // Unanchored, the pattern may sit anywhere in the value; an escaped `/` or `$` stays so.
        assert_eq!(whole_value("[0-9]{5}"), "(?s:.*)[0-9]{5}(?s:.*)");
        assert_eq!(whole_value(r"^a\/b$"), r"a\/b");
        assert_eq!(whole_value(r"^cost\$"), r"cost\$(?s:.*)");
        let g = lark(
            Format::Qwen3Coder,
            &tool(json!({"type": "string", "const": "x"})),
            None,
            false,
        )
        .unwrap();
        assert!(g.contains(r#"v0_0: ("x") "\n</parameter>""#), "{g}");
        let schema = json!({"type": "string", "pattern": "a+", "maxLength": 3});
        let e = lark(Format::Qwen3Coder, &tool(schema), None, false).unwrap_err();
        assert!(
            e.contains("tool `f`, parameter `s`") && e.contains("fold the lengths"),
            "{e}"
        );
        // `format` is an annotation, as most validators take it: not a refusal.
        let dated = json!({"type": "string", "format": "date-time"});
        assert!(lark(Format::Qwen3Coder, &tool(dated), None, false).is_ok());
    }

    #[test]
    fn glm_arguments_sit_between_key_and_value_tokens() {
        let g = lark(Format::Glm47, &tools(), None, true).unwrap();
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

    /// pydantic's schema of `Paint(color: Color, addr: Addr, n: Optional[int])`: an enum and a
    /// nested model (with one of its own) behind `$ref`s, a union.
    fn paint() -> Vec<Value> {
        vec![
            json!({"type": "function", "function": {"name": "paint", "parameters": {
            "$defs": {
                "Color": {"enum": ["red", "blue"], "title": "Color", "type": "string"},
                "Addr": {"type": "object", "properties": {"street": {"type": "string"},
                                                          "unit": {"$ref": "#/$defs/Unit"}},
                         "required": ["street"], "additionalProperties": false},
                "Unit": {"type": "object", "properties": {"no": {"type": "integer"}}}},
            "type": "object",
            "properties": {"color": {"$ref": "#/$defs/Color"}, "addr": {"$ref": "#/$defs/Addr"},
                           "n": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                           "m": {"type": ["integer", "null"]}},
            "required": ["color", "addr", "n", "m"]}}}),
        ]
    }

    /// References resolve in every markup: hermes embeds the arguments' schema whole, with its
    /// `$defs` at its root; the XML-like markups follow a parameter's reference (an enum
    /// becomes its alternatives) and embed the others with the definitions beside them; unions
    /// are JSON, not free text.
    #[test]
    fn references_and_unions_hold_in_every_markup() {
        let g = lark(Format::Hermes, &paint(), None, false).unwrap();
        assert!(g.contains(r#"%json {"$defs":{"#), "{g}");
        for format in [Format::Qwen3Coder, Format::Glm47] {
            let g = lark(format, &paint(), None, false).unwrap();
            // In the schema's order, not the alphabet's.
            let color = g.lines().find(|l| l.starts_with("p0_0")).unwrap();
            assert!(
                color.contains("parameter=color") || color.contains(r#""color""#),
                "{g}"
            );
            assert!(g.contains(r#"v0_0: ("red" | "blue")"#), "{g}");
            let addr = g.lines().find(|l| l.starts_with("p0_1")).unwrap();
            assert!(
                addr.contains(r#""$defs":{"#) && addr.contains(r#""street""#),
                "{addr}"
            );
            // Only what a parameter reaches comes with it (each embeds its own copy): the
            // address its unit, not the colours.
            assert!(
                addr.contains(r#""Unit":{"#) && !addr.contains(r#""Color""#),
                "{addr}"
            );
            for p in ["p0_2", "p0_3"] {
                let line = g.lines().find(|l| l.starts_with(p)).unwrap();
                assert!(line.contains("%json"), "a union is JSON: {line}");
                assert!(!line.contains("$defs"), "{line}");
            }
        }
    }

    #[test]
    fn names_and_keys_are_quoted_not_spliced() {
        let odd = vec![
            json!({"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a\"b\n": {"type": "string"}}}}}),
        ];
        let g = lark(Format::Qwen3Coder, &odd, None, false).unwrap();
        assert!(g.contains(r#""<parameter=a\"b\n>\n""#), "{g}");
        // A parameter no value satisfies stays so; it does not become "any JSON".
        let never = vec![
            json!({"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": false}}}}),
        ];
        let g = lark(Format::Qwen3Coder, &never, None, false).unwrap();
        assert!(g.contains("%json false"), "{g}");
    }

    /// Many parameters each referencing one large definition: refused by size, not built to
    /// gigabytes on the request's thread.
    #[test]
    fn a_grammar_past_its_budget_is_refused() {
        let big: Map<String, Value> = (0..2000)
            .map(|i| {
                (
                    format!("field_{i}"),
                    json!({"type": "string", "description": "x".repeat(1000)}),
                )
            })
            .collect();
        let properties: Map<String, Value> = (0..400)
            .map(|i| (format!("p{i}"), json!({"$ref": "#/$defs/Big"})))
            .collect();
        let tools = vec![
            json!({"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": properties,
            "$defs": {"Big": {"type": "object", "properties": big}}}}}),
        ];
        for format in [Format::Qwen3Coder, Format::Glm47] {
            let e = lark(format, &tools, None, false).unwrap_err();
            assert!(e.contains("bytes") && e.contains("auto"), "{e}");
        }
        assert!(lark(Format::Hermes, &tools, None, false).is_ok());
    }
}
