//! The shipped GLM-4.7-Flash manifest end to end through the real `pio` binary and a confined
//! worker: transformers' greedy tokens and logprobs for the tiny checkpoint, prompts rendered by
//! GLM's own template, and the reasoning returned apart from the answer.

use serde_json::Value;

use crate::qwen3::{assert_matches, golden_of, run_plugin_json};
use crate::worker::confinement_available;

#[test]
fn the_shipped_manifest_serves_transformers_tokens_and_splits_the_reasoning() {
    if !confinement_available() {
        return;
    }
    let golden = golden_of("glm4-moe-lite-tiny");
    assert_matches(
        &run_plugin_json(
            "glm-4.7-flash",
            &["--prompt", golden[0]["prompt"].as_str().unwrap()],
        ),
        &golden[0],
    );
    // A chat: the template ends the prompt inside `<think>`, so with thinking on the (random)
    // output is all reasoning until a `</think>`.
    let chat = golden.iter().find(|c| c.get("messages").is_some()).unwrap();
    let lines = run_plugin_json(
        "glm-4.7-flash",
        &["--messages", &chat["messages"].to_string()],
    );
    assert_matches(&lines, chat);
    let text: String = lines.iter().filter_map(|l| l["text"].as_str()).collect();
    let message = &lines.last().unwrap()["message"];
    match text.split_once("</think>") {
        Some((reasoning, answer)) => {
            assert_eq!(message["reasoning_content"], reasoning.trim());
            assert_eq!(message["content"], answer.trim_start());
        }
        None => {
            assert_eq!(message["reasoning_content"], text.trim(), "{message}");
            assert_eq!(message["content"], "");
        }
    }
    // Thinking off: the template closes the block and the output is the answer.
    let lines = run_plugin_json(
        "glm-4.7-flash",
        &[
            "--messages",
            &chat["messages"].to_string(),
            "--chat-template-kwargs",
            r#"{"enable_thinking": false}"#,
        ],
    );
    let summary: &Value = lines.last().unwrap();
    let text: String = lines.iter().filter_map(|l| l["text"].as_str()).collect();
    assert_eq!(summary["message"]["content"], text);
    assert!(summary["message"].get("reasoning_content").is_none());
    // `</think>` instead of `<think>`: one special token either way.
    assert_eq!(
        summary["usage"]["prompt_tokens"],
        chat["input_ids"].as_array().unwrap().len()
    );
}
