//! The real chat templates of every model PIO ships a plugin for (Qwen3-Coder-30B-A3B, GLM-4.7-Flash,
//! Qwen3-VL-2B), rendered byte-identically to transformers' `apply_chat_template`: the goldens and
//! the template sources come from `tests/fixtures/generate.py`.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use pio_engine::chat::ChatTemplate;
use serde_json::Value;

fn check(name: &str) {
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
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 5, "{name}: too few cases");
    for case in cases {
        let messages = case["messages"].as_array().unwrap();
        let tools = case.get("tools").map(|t| t.as_array().unwrap().clone());
        let kwargs = case
            .get("kwargs")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let add = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = template
            .render(messages, tools.as_deref(), add, &kwargs)
            .unwrap();
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
