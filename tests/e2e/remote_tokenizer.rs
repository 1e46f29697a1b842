//! The server as lm-eval's remote tokenizer reads it (`tokenizer_backend="remote"`, which
//! `local-completions` picks by itself when `/tokenizer_info` and `/tokenize` answer): the
//! tokenizer's settings from `GET /tokenizer_info`, and `/tokenize`, `/detokenize` and the
//! generation endpoints without `model` when the server serves one model.

use serde_json::{json, Value};

use crate::daemon::{add_qwen, qwen_daemon, Daemon};
use crate::support::{repo_root, PluginDir};
use crate::worker::confinement_available;

const MODEL: &str = "qwen3-4b-instruct-2507";
const FIXTURE: &str = "tests/fixtures/qwen3-tiny";

fn fixture_json(name: &str) -> Value {
    let path = repo_root().join(FIXTURE).join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The id `tokenizer.json` gives the added token `text`.
fn added_id(text: &str) -> u64 {
    let tokenizer = fixture_json("tokenizer.json");
    let added = tokenizer["added_tokens"].as_array().unwrap();
    let token = added.iter().find(|t| t["content"] == text).unwrap();
    token["id"].as_u64().unwrap()
}

/// lm-eval's flow, each request as its `RemoteTokenizer` sends it (no `model`): the settings
/// name the checkpoint's end-of-sequence token and carry its chat template (from
/// `chat_template.jinja`, which `tokenizer_config.json` does not hold; leaving file paths out is
/// the engine's unit test's); the token's id is the one `/tokenize` gives its text; ids come back as text; a generation
/// without `model` runs on the only model.
#[test]
fn a_lone_model_serves_lm_evals_remote_tokenizer() {
    if !confinement_available() {
        return;
    }
    let dir = PluginDir::new();
    add_qwen(&dir, "");
    let d = Daemon::start(dir, "");
    d.wait_ready();

    let (status, info) = d.get("/tokenizer_info");
    assert_eq!(status, 200, "{info}");
    let config = fixture_json("tokenizer_config.json");
    assert_eq!(info["eos_token"], config["eos_token"], "{info}");
    assert_eq!(info["model_max_length"], config["model_max_length"]);
    let template = std::fs::read_to_string(repo_root().join(FIXTURE).join("chat_template.jinja"));
    assert_eq!(info["chat_template"], template.unwrap().as_str());
    assert!(info["tokenizer_class"].is_string(), "{info}");

    let eos = info["eos_token"].as_str().unwrap();
    let (status, t) = d.post(
        "/tokenize",
        &json!({"prompt": eos, "add_special_tokens": false}),
    );
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["tokens"], json!([added_id(eos)]), "{t}");
    let (status, t) = d.post("/tokenize", &json!({"prompt": "Hello world"}));
    assert_eq!(status, 200, "{t}");
    let (status, back) = d.post("/detokenize", &json!({"tokens": t["tokens"]}));
    assert_eq!((status, &back["prompt"]), (200, &json!("Hello world")));

    // lm-eval given no model name sends `"model": null`.
    let body = json!({"model": null, "prompt": t["tokens"], "max_tokens": 2, "temperature": 0});
    let (status, r) = d.post("/v1/completions", &body);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["model"], MODEL, "{r}");
    let (status, r) = d.get(&format!("/tokenizer_info?model={MODEL}"));
    assert_eq!((status, &r["eos_token"]), (200, &info["eos_token"]));
}

/// With two models a request must name one, and the error lists them; a plugin that reports
/// no settings (echo) and an unknown model are refused by name.
#[test]
fn with_several_models_tokenizer_info_and_generations_need_model() {
    if !confinement_available() {
        return;
    }
    let d = qwen_daemon("");
    let (status, e) = d.get("/tokenizer_info");
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["param"], "model");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.contains("echo") && message.contains(MODEL), "{e}");
    let (status, e) = d.post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 1}));
    assert_eq!(
        (status, &e["error"]["param"]),
        (400, &json!("model")),
        "{e}"
    );
    let (status, e) = d.post("/detokenize", &json!({"tokens": [1]}));
    assert_eq!(
        (status, &e["error"]["param"]),
        (400, &json!("model")),
        "{e}"
    );

    let (status, info) = d.get(&format!("/tokenizer_info?model={MODEL}"));
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["eos_token"], "<|im_end|>");
    let (status, e) = d.get("/tokenizer_info?model=echo");
    assert_eq!(
        (status, &e["error"]["param"]),
        (400, &json!("model")),
        "{e}"
    );
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.contains("no tokenizer settings"), "{e}");
    let (status, e) = d.get("/tokenizer_info?model=nope");
    assert_eq!(
        (status, &e["error"]["param"]),
        (404, &json!("model")),
        "{e}"
    );
    // A query the route cannot read is the API's JSON error, as every other.
    for bad in ["?model=a&model=b", "?model="] {
        let (status, e) = d.get(&format!("/tokenizer_info{bad}"));
        assert_eq!(
            (status, &e["error"]["param"]),
            (400, &json!("model")),
            "{bad}: {e}"
        );
    }
}
