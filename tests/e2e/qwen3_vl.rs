//! Qwen3-VL end to end through the real `pio` binary and a confined worker, on the tiny
//! checkpoint: images given to `pio run` (files) and to the chat API (data URLs, files under
//! `server.image_root`) give transformers' greedy tokens; image tokens count in the usage; the
//! same image twice hits the prefix cache; every bad image is a clear error, never a crash.

use base64::Engine as _;
use serde_json::{json, Value};

use crate::daemon::Daemon;
use crate::qwen3::run_plugin;
use crate::support::{manifest, plugin_lib, repo_root, PluginDir};
use crate::worker::confinement_available;

const PLUGIN: &str = "qwen3-vl-2b";

fn golden() -> Value {
    let path = repo_root().join("tests/fixtures/golden/qwen3-vl-tiny.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn case(name: &str) -> Value {
    golden()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone()
}

fn image_path(file: &str) -> String {
    format!("tests/fixtures/images/{file}")
}

/// `pio run qwen3-vl-2b` greedy with top-5 logprobs: (its JSON lines, exit status, stderr).
fn run(extra: &[&str], max_tokens: usize) -> (Vec<Value>, bool, String) {
    let out = run_plugin(PLUGIN, extra, max_tokens);
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    (
        lines,
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The one-image golden case's request through `pio run`: its JSON lines.
fn run_one_image() -> Vec<Value> {
    let (lines, ok, err) = run(
        &[
            "--image",
            &image_path("rgb.png"),
            "--prompt",
            "What is in the picture?",
        ],
        12,
    );
    assert!(ok, "{err}");
    lines
}

/// Greedy tokens and top-5 logprobs within 2e-3 of transformers'.
fn assert_tokens(lines: &[Value], case: &Value) {
    let tokens: Vec<&Value> = lines.iter().filter_map(|l| l.get("token_id")).collect();
    let want = case["tokens"].as_array().unwrap();
    assert_eq!(tokens, want.iter().collect::<Vec<_>>(), "{}", case["name"]);
    for (line, step) in lines.iter().zip(case["top5"].as_array().unwrap()) {
        for (g, lp) in line["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(step["logprobs"].as_array().unwrap())
        {
            assert!((g["logprob"].as_f64().unwrap() - lp.as_f64().unwrap()).abs() < 2e-3);
        }
    }
}

#[test]
fn pio_run_with_images_gives_transformers_tokens() {
    if !confinement_available() {
        return;
    }
    let one = case("one-image");
    let lines = run_one_image();
    assert_tokens(&lines, &one);
    let usage = &lines.last().unwrap()["usage"];
    assert_eq!(
        usage["prompt_tokens"],
        one["input_ids"].as_array().unwrap().len(),
        "image tokens count in the prompt"
    );
    // Messages with image parts naming files, two images in one message.
    let two = case("two-images");
    let mut messages = two["messages"].clone();
    for part in messages[0]["content"].as_array_mut().unwrap() {
        if let Some(file) = part.get("image").and_then(Value::as_str) {
            *part = json!({"type": "image_url", "image_url": {"url": image_path(file)}});
        }
    }
    let (lines, ok, err) = run(&["--messages", &messages.to_string()], 12);
    assert!(ok, "{err}");
    assert_tokens(&lines, &two);
}

#[test]
fn pio_run_refuses_bad_images_with_the_reason() {
    if !confinement_available() {
        return;
    }
    for (file, reason) in [
        ("bad/truncated.png", "corrupt or truncated"),
        ("bad/bomb.png", "100000x100000"),
        ("bad/random.png", "PNG, JPEG, WebP or GIF"),
        ("bad/image.bmp", "not a PNG, JPEG, GIF or WebP file"),
        ("bad/empty.gif", "the image is empty"),
        ("bad/sliver.png", "ratio is more than 200"),
        ("missing.png", "missing.png: No such file"),
    ] {
        let (_, ok, err) = run(&["--image", &image_path(file), "--prompt", "hi"], 4);
        assert!(!ok, "{file} was accepted");
        assert!(err.contains(reason), "{file}: {err}");
        assert!(!err.contains("panicked"), "{file}: {err}");
    }
}

fn data_url(file: &str, mime: &str) -> String {
    let bytes = std::fs::read(repo_root().join(image_path(file))).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    format!("data:{mime};base64,{b64}")
}

fn chat(url: &str, text: &str, max_tokens: u32) -> Value {
    json!({
        "model": PLUGIN,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": text},
        ]}],
        "temperature": 0,
        "max_tokens": max_tokens,
    })
}

fn vl_daemon() -> Daemon {
    let dir = PluginDir::new();
    let model = repo_root().join("tests/fixtures/qwen3-vl-tiny");
    let library = plugin_lib("pio_plugin_qwen3_vl");
    dir.write(
        "qwen3-vl.toml",
        &manifest(
            PLUGIN,
            "0.1.0",
            &library.display().to_string(),
            &format!("[model]\npath = \"{}\"\ndtype = \"f32\"\n", model.display()),
        ),
    );
    let root = repo_root().join("tests/fixtures/images");
    let d = Daemon::start(
        dir,
        &format!("[server]\nimage_root = \"{}\"\n", root.display()),
    );
    d.wait_ready();
    d
}

#[test]
fn the_chat_api_takes_images_and_refuses_bad_ones() {
    if !confinement_available() {
        return;
    }
    let d = vl_daemon();
    let one = case("one-image");
    let cli = run_one_image();
    let cli_text: String = cli.iter().filter_map(|l| l["text"].as_str()).collect();
    let prompt_tokens = one["input_ids"].as_array().unwrap().len() as u64;
    let body = chat(
        &data_url("rgb.png", "image/png"),
        "What is in the picture?",
        12,
    );
    for attempt in 0..2 {
        let (status, r) = d.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{r}");
        assert_eq!(
            r["choices"][0]["message"]["content"],
            cli_text.as_str(),
            "{r}"
        );
        assert_eq!(r["usage"]["prompt_tokens"], prompt_tokens);
        let cached = r["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        if attempt == 1 {
            // The image is most of the prompt: sent again, its cache entries are reused.
            assert!(cached * 2 > prompt_tokens, "{r}");
        }
    }
    // `/tokenize` counts the image's tokens from its size: transformers' input ids, exactly.
    let (status, r) = d.post("/tokenize", &body);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["tokens"], one["input_ids"], "{r}");
    assert_eq!(r["count"], prompt_tokens);
    // A file under the image root works like the data URL.
    let root = repo_root().join("tests/fixtures/images/rgb.png");
    let (status, r) = d.post(
        "/v1/chat/completions",
        &chat(&root.display().to_string(), "What is in the picture?", 12),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["message"]["content"], cli_text.as_str());
    // Bad images: a 400 naming the part and the reason; the worker stays up.
    for (url, reason) in [
        (
            data_url("bad/truncated.png", "image/png"),
            "corrupt or truncated",
        ),
        (data_url("bad/bomb.png", "image/png"), "100000x100000"),
        (data_url("bad/empty.gif", "image/gif"), "the image is empty"),
        (
            data_url("bad/sliver.png", "image/png"),
            "ratio is more than 200",
        ),
        (
            data_url("bad/image.bmp", "image/bmp"),
            "unsupported image format",
        ),
        (
            "https://example.com/cat.png".into(),
            "does not fetch remote images",
        ),
        ("/etc/hostname".into(), "not a file under the image root"),
    ] {
        let (status, r) = d.post("/v1/chat/completions", &chat(&url, "hi", 4));
        assert_eq!(status, 400, "{reason}: {r}");
        let message = r["error"]["message"].as_str().unwrap();
        assert!(message.contains(reason), "{reason}: {message}");
        // The part is named as `param`, whether the host, the worker's decoder or the
        // model's processor (the sides' ratio) found the fault.
        let named = |r: &Value| {
            (r["error"]["param"].as_str()).is_some_and(|p| p.starts_with("messages[0].content[0]"))
        };
        assert!(named(&r), "{reason}: {r}");
        if reason.contains("ratio") {
            // Counting its tokens meets the processor's check too.
            let (status, r) = d.post("/tokenize", &chat(&url, "hi", 4));
            assert_eq!(status, 400, "{r}");
            assert!(named(&r), "/tokenize: {r}");
        }
    }
    let (status, r) = d.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "still serving after the bad images: {r}");
}
