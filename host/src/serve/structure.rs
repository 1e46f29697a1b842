//! Structured output a client asks for — OpenAI's `response_format`, vLLM's `guided_*` fields,
//! a forced tool call — checked, then turned into the grammar the worker enforces token by
//! token (`InferRequest::constraint`).

use pio_plugin_api::wire::{Constraint, Grammar, InferRequest, ModelInfo};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::output::Parsing;
use super::{reasoning, tool_calls, tool_grammar};

/// What a request asks its output to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Structure {
    /// A grammar of the client's; `field` is where it came from, for errors.
    Grammar {
        /// The grammar.
        grammar: Grammar,
        /// `response_format`, `guided_json`, ...
        field: &'static str,
    },
    /// Tool calls forced by `tool_choice`: to the tool named, or to any offered one.
    ToolCalls {
        /// The one tool to call, if named.
        name: Option<String>,
        /// Whether several calls may follow each other (`parallel_tool_calls`).
        parallel: bool,
    },
}

impl Structure {
    /// The request field a problem with this structure is the client's to fix in (a forced
    /// call's grammar comes from the tools' parameter schemas).
    pub fn field(&self) -> &'static str {
        match self {
            Self::Grammar { field, .. } => field,
            Self::ToolCalls { .. } => "tools",
        }
    }
}

/// The fields that ask for a grammar. vLLM's names for the extensions: OpenAI clients pass them
/// in `extra_body` unchanged between vLLM and PIO, and `guided_grammar` there is a Lark
/// grammar too (llama.cpp's `grammar` is GBNF, which this server does not read).
#[derive(Debug, Deserialize)]
struct Fields {
    response_format: Option<Value>,
    guided_json: Option<Value>,
    guided_regex: Option<String>,
    guided_grammar: Option<String>,
    guided_choice: Option<Vec<String>>,
    /// vLLM's current spelling of the `guided_*` fields, in one object.
    structured_outputs: Option<StructuredOutputs>,
}

/// vLLM's `structured_outputs` (its options of how whitespace is drawn are not read).
#[derive(Debug, Deserialize)]
struct StructuredOutputs {
    json: Option<Value>,
    regex: Option<String>,
    choice: Option<Vec<String>>,
    grammar: Option<String>,
    json_object: Option<bool>,
    structural_tag: Option<Value>,
}

/// The four kinds of guided output, and the names a request gives them.
struct Guided {
    json: Option<Value>,
    regex: Option<String>,
    grammar: Option<String>,
    choice: Option<Vec<String>>,
    /// The fields' names for errors, in that order.
    names: [&'static str; 4],
}

fn bad(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_field(field, message)
}

/// The grammar `body` asks for, if any: at most one of `response_format` (other than `text`)
/// and the `guided_*` fields.
pub fn requested(body: &Value) -> Result<Option<Structure>, ApiError> {
    let f: Fields = super::openai::field(body)?;
    let mut asked: Vec<(&'static str, Grammar)> = Vec::new();
    if let Some(format) = &f.response_format {
        if let Some(g) = response_format(format)? {
            asked.push(("response_format", g));
        }
    }
    guided(
        &mut asked,
        Guided {
            json: f.guided_json,
            regex: f.guided_regex,
            grammar: f.guided_grammar,
            choice: f.guided_choice,
            names: [
                "guided_json",
                "guided_regex",
                "guided_grammar",
                "guided_choice",
            ],
        },
    )?;
    if let Some(so) = f.structured_outputs {
        if so.structural_tag.is_some() {
            return Err(bad(
                "structured_outputs.structural_tag",
                "`structured_outputs.structural_tag` is not supported: use json, regex, choice or grammar",
            ));
        }
        if so.json_object == Some(true) {
            asked.push((
                "structured_outputs.json_object",
                Grammar::JsonSchema(json!({"type": "object"})),
            ));
        }
        guided(
            &mut asked,
            Guided {
                json: so.json,
                regex: so.regex,
                grammar: so.grammar,
                choice: so.choice,
                names: [
                    "structured_outputs.json",
                    "structured_outputs.regex",
                    "structured_outputs.grammar",
                    "structured_outputs.choice",
                ],
            },
        )?;
    }
    if asked.len() > 1 {
        let names: Vec<&str> = asked.iter().map(|(n, _)| *n).collect();
        return Err(bad(
            names[1],
            format!(
                "give one output constraint per request, not {}",
                names.join(" and ")
            ),
        ));
    }
    Ok(asked
        .pop()
        .map(|(field, grammar)| Structure::Grammar { grammar, field }))
}

/// The grammars `g` asks for, added to `asked` under their field names.
fn guided(asked: &mut Vec<(&'static str, Grammar)>, g: Guided) -> Result<(), ApiError> {
    let [json_name, regex_name, grammar_name, choice_name] = g.names;
    if let Some(v) = g.json {
        let schema = match v {
            Value::String(s) => serde_json::from_str(&s)
                .map_err(|e| bad(json_name, format!("`{json_name}` is not JSON: {e}")))?,
            v => v,
        };
        asked.push((
            json_name,
            Grammar::JsonSchema(checked_schema(json_name, schema)?),
        ));
    }
    if let Some(rx) = g.regex {
        asked.push((regex_name, Grammar::Regex(non_empty(regex_name, rx)?)));
    }
    if let Some(lark) = g.grammar {
        asked.push((grammar_name, Grammar::Lark(non_empty(grammar_name, lark)?)));
    }
    if let Some(choices) = g.choice {
        asked.push((
            choice_name,
            Grammar::Lark(choice_grammar(choice_name, &choices)?),
        ));
    }
    Ok(())
}

fn non_empty(field: &str, s: String) -> Result<String, ApiError> {
    if s.trim().is_empty() {
        return Err(bad(field, format!("`{field}` must not be empty")));
    }
    Ok(s)
}

/// A schema is an object or a boolean (`true`: any JSON value).
fn checked_schema(field: &str, schema: Value) -> Result<Value, ApiError> {
    match schema {
        Value::Object(_) | Value::Bool(_) => Ok(schema),
        other => Err(bad(
            field,
            format!("`{field}` must be a JSON Schema object, found {other}"),
        )),
    }
}

/// OpenAI's `response_format`: `text`, `json_object` or `json_schema`.
fn response_format(format: &Value) -> Result<Option<Grammar>, ApiError> {
    const KINDS: &str = "\"text\", \"json_object\" or \"json_schema\"";
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Grammar::JsonSchema(json!({"type": "object"})))),
        Some("json_schema") => {
            let Some(spec) = format.get("json_schema").filter(|s| s.is_object()) else {
                return Err(bad(
                    "response_format.json_schema",
                    "`response_format.json_schema` must be an object: {\"name\": ..., \"schema\": {...}, \"strict\": true}",
                ));
            };
            if spec.get("name").is_some_and(|n| !n.is_string()) {
                return Err(bad(
                    "response_format.json_schema.name",
                    "`response_format.json_schema.name` must be a string",
                ));
            }
            let schema = spec.get("schema").cloned().unwrap_or(json!({}));
            let mut schema = checked_schema("response_format.json_schema.schema", schema)?;
            if spec.get("strict") == Some(&Value::Bool(true)) {
                closed(&mut schema);
            }
            Ok(Some(Grammar::JsonSchema(schema)))
        }
        Some(other) => Err(bad(
            "response_format.type",
            format!("`response_format.type` must be {KINDS}, found \"{other}\""),
        )),
        None => Err(bad(
            "response_format",
            format!("`response_format` must be an object whose `type` is {KINDS}"),
        )),
    }
}

/// Strict mode's objects: one that lists its properties and says nothing of others takes no
/// others (`additionalProperties: false`), as OpenAI's strict mode requires and vLLM's xgrammar
/// assumes; JSON Schema (and llguidance) would let the model add keys of its own, which a
/// client's `extra="forbid"` model then refuses. An object composed with others (`allOf`,
/// `anyOf`, `oneOf`, `$ref` beside its properties) is left open, as are `allOf`'s parts and the
/// definitions (one may be a part): closed, each would refuse the others' properties; so are
/// `not` and the conditionals, whose meaning closing would turn.
fn closed(schema: &mut Value) {
    let Value::Object(map) = schema else {
        return;
    };
    let composed = ["allOf", "anyOf", "oneOf", "$ref"]
        .iter()
        .any(|k| map.contains_key(*k));
    if map.contains_key("properties") && !map.contains_key("additionalProperties") && !composed {
        map.insert("additionalProperties".into(), Value::Bool(false));
    }
    if let Some(Value::Object(children)) = map.get_mut("properties") {
        children.values_mut().for_each(closed);
    }
    for key in ["items", "additionalProperties"] {
        if let Some(child) = map.get_mut(key) {
            closed(child);
        }
    }
    for key in ["anyOf", "oneOf", "prefixItems"] {
        if let Some(Value::Array(children)) = map.get_mut(key) {
            children.iter_mut().for_each(closed);
        }
    }
}

/// `guided_choice` (named `field`): exactly one of the strings.
fn choice_grammar(field: &str, choices: &[String]) -> Result<String, ApiError> {
    if choices.is_empty() || choices.iter().any(String::is_empty) {
        return Err(bad(
            field,
            format!("`{field}` must be a non-empty list of non-empty strings"),
        ));
    }
    let alternatives: Vec<String> = choices.iter().map(|c| tool_grammar::literal(c)).collect();
    Ok(format!("start: {}\n", alternatives.join(" | ")))
}

/// OpenAI's `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides.
    Auto,
    /// No call: the tools are still shown, but the output is all text.
    None,
    /// At least one call, to any tool.
    Required,
    /// A call to this tool.
    Named(String),
}

pub fn tool_choice(choice: Option<&Value>) -> Result<ToolChoice, ApiError> {
    let named = |v: &Value| {
        (v.get("type").and_then(Value::as_str) == Some("function"))
            .then(|| v.pointer("/function/name").and_then(Value::as_str))
            .flatten()
            .map(str::to_string)
    };
    match choice {
        None => Ok(ToolChoice::Auto),
        Some(Value::String(s)) if s == "auto" => Ok(ToolChoice::Auto),
        Some(Value::String(s)) if s == "none" => Ok(ToolChoice::None),
        Some(Value::String(s)) if s == "required" => Ok(ToolChoice::Required),
        Some(v) => named(v).map(ToolChoice::Named).ok_or_else(|| {
            bad(
                "tool_choice",
                "`tool_choice` must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
            )
        }),
    }
}

/// The calls `choice` forces among the offered `tools`.
pub fn forced_calls(
    choice: &ToolChoice,
    tools: Option<&[Value]>,
    parallel: Option<bool>,
) -> Result<Option<Structure>, ApiError> {
    let name = match choice {
        ToolChoice::Auto | ToolChoice::None => return Ok(None),
        ToolChoice::Required => None,
        ToolChoice::Named(n) => Some(n.clone()),
    };
    let offered = tools.unwrap_or_default();
    if offered.is_empty() {
        return Err(bad(
            "tool_choice",
            "`tool_choice` forces a tool call, but no `tools` were given",
        ));
    }
    if let Some(n) = &name {
        if !offered
            .iter()
            .any(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(n))
        {
            return Err(bad(
                "tool_choice.function.name",
                format!("`tool_choice` names `{n}`, which is not among the `tools`"),
            ));
        }
    }
    Ok(Some(Structure::ToolCalls {
        // One call to a named tool, as OpenAI makes it.
        parallel: name.is_none() && parallel.unwrap_or(true),
        name,
    }))
}

/// The constraint the worker gets for `structure`, given the model (`info`) and the request's
/// tools and template switches. A reasoning model thinks freely first: the grammar starts after
/// its end-of-thinking marker.
pub fn constraint(
    structure: &Structure,
    request: &InferRequest,
    chat: bool,
    model: &str,
    info: &ModelInfo,
) -> Result<Constraint, ApiError> {
    let after = (Parsing::of(request, chat, info).reasoning == Some(true))
        .then(|| reasoning::CLOSE.to_string());
    let grammar = match structure {
        Structure::Grammar { grammar, .. } => grammar.clone(),
        Structure::ToolCalls { name, parallel } => {
            let format = info
                .tool_call_format
                .as_deref()
                .and_then(tool_calls::Format::from_name)
                .ok_or_else(|| {
                    bad(
                        "tool_choice",
                        format!("model `{model}` writes tool calls in no format this server can force; use \"auto\""),
                    )
                })?;
            let tools = request.tools.as_deref().unwrap_or_default();
            Grammar::Lark(
                tool_grammar::lark(format, tools, name.as_deref(), *parallel)
                    .map_err(|e| bad("tools", e))?,
            )
        }
    };
    Ok(Constraint { grammar, after })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grammar_of(body: Value) -> Result<Option<Structure>, ApiError> {
        requested(&body)
    }

    #[test]
    fn response_formats_become_json_schemas() {
        assert_eq!(
            grammar_of(json!({"response_format": {"type": "text"}})).unwrap(),
            None
        );
        let object = grammar_of(json!({"response_format": {"type": "json_object"}})).unwrap();
        assert_eq!(
            object,
            Some(Structure::Grammar {
                grammar: Grammar::JsonSchema(json!({"type": "object"})),
                field: "response_format"
            })
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let with = |strict: bool| {
            let s = grammar_of(json!({"response_format": {"type": "json_schema",
                "json_schema": {"name": "x", "schema": schema, "strict": strict}}}))
            .unwrap();
            match s {
                Some(Structure::Grammar {
                    grammar: Grammar::JsonSchema(g),
                    ..
                }) => g,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(with(false), schema);
        // Strict: objects take no properties they do not list, nested ones and definitions
        // too; allOf's parts stay open; one that says otherwise keeps its word.
        assert_eq!(with(true)["additionalProperties"], false);
        let mut nested = json!({"type": "object", "properties": {
            "p": {"type": "object", "properties": {"q": {"type": "string"}}},
            "r": {"type": "array", "items": {"$ref": "#/$defs/R"}},
            "s": {"allOf": [{"properties": {"t": {}}}]},
            "u": {"type": "object", "properties": {}, "additionalProperties": true}},
            "$defs": {"R": {"type": "object", "properties": {"v": {"type": "integer"}}}}});
        closed(&mut nested);
        assert_eq!(nested["properties"]["p"]["additionalProperties"], false);
        // Definitions may be parts of a composition: open.
        assert!(nested["$defs"]["R"].get("additionalProperties").is_none());
        assert!(nested["properties"]["s"]["allOf"][0]
            .get("additionalProperties")
            .is_none());
        assert_eq!(nested["properties"]["u"]["additionalProperties"], true);
        // An object composed with others keeps them satisfiable.
        let mut composed = json!({"properties": {"a": {}}, "allOf": [{"properties": {"b": {}}, "required": ["b"]}]});
        closed(&mut composed);
        assert!(composed.get("additionalProperties").is_none(), "{composed}");
        let choice = grammar_of(json!({"guided_choice": ["yes", "no \"really\""]})).unwrap();
        assert!(
            matches!(&choice, Some(Structure::Grammar { grammar: Grammar::Lark(l), field: "guided_choice" })
                if l == "start: \"yes\" | \"no \\\"really\\\"\"\n"),
            "{choice:?}"
        );
    }

    /// vLLM's `structured_outputs` asks for what its `guided_*` fields ask for.
    #[test]
    fn structured_outputs_ask_what_the_guided_fields_ask() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        for (old, new) in [
            (
                json!({"guided_choice": ["yes", "no"]}),
                json!({"choice": ["yes", "no"]}),
            ),
            (
                json!({"guided_regex": "[a-z]+"}),
                json!({"regex": "[a-z]+"}),
            ),
            (json!({"guided_json": schema}), json!({"json": schema})),
            (
                json!({"guided_grammar": "start: \"x\""}),
                json!({"grammar": "start: \"x\""}),
            ),
            (
                json!({"response_format": {"type": "json_object"}}),
                json!({"json_object": true}),
            ),
        ] {
            let grammar = |s: Option<Structure>| match s {
                Some(Structure::Grammar { grammar, .. }) => grammar,
                other => panic!("{other:?}"),
            };
            assert_eq!(
                grammar(grammar_of(old).unwrap()),
                grammar(grammar_of(json!({ "structured_outputs": new })).unwrap())
            );
        }
    }

    #[test]
    fn malformed_requests_name_the_field() {
        for (body, param) in [
            (
                json!({"response_format": {"type": "xml"}}),
                "response_format.type",
            ),
            (json!({"response_format": "json"}), "response_format"),
            (
                json!({"response_format": {"type": "json_schema"}}),
                "response_format.json_schema",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"schema": 5}}}),
                "response_format.json_schema.schema",
            ),
            (json!({"guided_regex": ""}), "guided_regex"),
            (json!({"guided_json": "{nope"}), "guided_json"),
            (json!({"guided_choice": []}), "guided_choice"),
            (json!({"guided_regex": 5}), "guided_regex"),
            (
                json!({"guided_regex": "a", "response_format": {"type": "json_object"}}),
                "guided_regex",
            ),
            (
                json!({"structured_outputs": {"choice": []}}),
                "structured_outputs.choice",
            ),
            (
                json!({"structured_outputs": {"structural_tag": "{}"}}),
                "structured_outputs.structural_tag",
            ),
            (
                json!({"guided_regex": "a", "structured_outputs": {"regex": "b"}}),
                "structured_outputs.regex",
            ),
        ] {
            let e = grammar_of(body.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
            assert_eq!(e.status.as_u16(), 400);
        }
    }

    #[test]
    fn a_thinking_model_gets_its_grammar_after_the_reasoning() {
        let glm = ModelInfo {
            reasoning_format: Some("glm45".into()),
            tool_call_format: Some("glm47".into()),
            ..ModelInfo::default()
        };
        let s = Structure::Grammar {
            grammar: Grammar::Regex("a".into()),
            field: "guided_regex",
        };
        let mut request = InferRequest::default();
        let c = constraint(&s, &request, true, "glm", &glm).unwrap();
        assert_eq!(c.after.as_deref(), Some("</think>"));
        request
            .chat_template_kwargs
            .insert("enable_thinking".into(), false.into());
        assert_eq!(
            constraint(&s, &request, true, "glm", &glm).unwrap().after,
            None
        );
        let forced = Structure::ToolCalls {
            name: None,
            parallel: false,
        };
        let e = constraint(&forced, &request, true, "plain", &ModelInfo::default()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
    }
}
