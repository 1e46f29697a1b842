//! The real chat templates of every model PIO ships a plugin for (Qwen3-Coder-30B-A3B, GLM-4.7-Flash,
//! Qwen3-VL-2B), rendered byte-identically to transformers' `apply_chat_template`: the goldens and
//! the template sources come from `tests/fixtures/generate.py`.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use pio_engine::chat::ChatTemplate;
use serde_json::Value;

/// The golden file of model `name`'s template, and the template it holds.
fn golden(name: &str) -> (Value, ChatTemplate) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/golden")
        .join(format!("chat-template-{name}.json"));
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let text = |v: &Value| v.as_str().map(str::to_string);
    let template = ChatTemplate::new(
        golden["template"].as_str().unwrap(),
        text(&golden["bos_token"]),
        text(&golden["eos_token"]),
    );
    (golden, template)
}

fn check(name: &str) {
    let (golden, template) = golden(name);
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 5, "{name}: too few cases");
    for case in cases {
        let rendered = common::render_case(&template, case);
        assert_eq!(
            rendered,
            case["rendered"].as_str().unwrap(),
            "{name}: {case}"
        );
    }
}

#[test]
fn qwen3_coder_template_matches_transformers() {
    check("qwen3-coder-30b-a3b-instruct");
}

#[test]
fn glm_4_7_flash_template_matches_transformers() {
    check("glm-4.7-flash");
}

#[test]
fn qwen3_vl_template_matches_transformers() {
    check("qwen3-vl-2b-instruct");
}

/// Every shipped template, and the qwen3 fixture's (Qwen3-4B-Instruct-2507's own), renders a
/// conversation whose contents are lists of one text part as it renders the same strings, for
/// every role: Qwen3's templates write nothing for a list and Qwen3-Coder's fails on one, so the
/// text is joined for them.
#[test]
fn content_sent_as_text_parts_renders_as_the_same_strings() {
    let templates = shipped_templates();
    let call = serde_json::json!([{"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]);
    let conversation = |parts: bool| {
        let content = |s: &str| {
            if parts {
                serde_json::json!([{"type": "text", "text": s}])
            } else {
                Value::String(s.into())
            }
        };
        vec![
            serde_json::json!({"role": "system", "content": content("Be brief.")}),
            serde_json::json!({"role": "user", "content": content("Weather in Paris?")}),
            serde_json::json!({"role": "assistant", "content": content("Checking."), "tool_calls": call}),
            serde_json::json!({"role": "tool", "tool_call_id": "call_1", "content": content("Sunny, 21 C")}),
            serde_json::json!({"role": "user", "content": content("Thanks")}),
        ]
    };
    for (name, template) in &templates {
        let render = |messages: &[Value]| {
            template
                .render(messages, None, true, &serde_json::Map::new())
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        let as_strings = render(&conversation(false));
        assert!(as_strings.contains("Sunny, 21 C"), "{name}: {as_strings}");
        assert_eq!(render(&conversation(true)), as_strings, "{name}");
        // A `developer` message (OpenAI's newer `system`) is written, not left out.
        let mut developer = conversation(true);
        developer[0]["role"] = Value::String("developer".into());
        assert!(render(&developer).contains("Be brief."), "{name}");
    }
}

/// Every shipped model's template, and the qwen3 fixture's (Qwen3-4B-Instruct-2507's own).
fn shipped_templates() -> Vec<(String, ChatTemplate)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let mut templates: Vec<(String, ChatTemplate)> = [
        "qwen3-coder-30b-a3b-instruct",
        "glm-4.7-flash",
        "qwen3-vl-2b-instruct",
    ]
    .iter()
    .map(|name| (name.to_string(), golden(name).1))
    .collect();
    let qwen3 = std::fs::read_to_string(root.join("qwen3-tiny/chat_template.jinja")).unwrap();
    templates.push(("qwen3-tiny".into(), ChatTemplate::new(qwen3, None, None)));
    templates
}

/// `continue_final_message`: the chat ends right after the final (assistant) message's text, as
/// the whole render begins, so the model goes on with that message instead of a new turn.
#[test]
fn a_final_message_is_continued_where_its_text_ends() {
    let messages = [
        serde_json::json!({"role": "user", "content": "Name a colour."}),
        serde_json::json!({"role": "assistant", "content": "The colour is"}),
    ];
    let none = serde_json::Map::new();
    for (name, template) in shipped_templates() {
        let continued = template
            .render_continuing(&messages, None, &none)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let closed = template.render(&messages, None, false, &none).unwrap();
        assert!(continued.ends_with("The colour is"), "{name}: {continued}");
        // What the template writes after the message (an end of turn; GLM's writes none).
        assert!(closed.starts_with(&continued), "{name}: {closed}");
    }
    // A final message without text has nothing to continue; a blank one continues (as in
    // transformers).
    let (_, template) = &shipped_templates()[0];
    let image = [serde_json::json!({"role": "assistant", "content": [{"type": "image"}]})];
    let e = template
        .render_continuing(&image, None, &none)
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs a final message with text"), "{e}");
    let blank = [serde_json::json!({"role": "assistant", "content": " "})];
    assert!(template.render_continuing(&blank, None, &none).is_ok());
}
