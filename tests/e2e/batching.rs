//! The batch-first engine behind the daemon: a model's concurrent requests reach its worker at
//! once and each gets the log-probabilities transformers gives for it alone; a repeated prompt is
//! served from the prefix cache and says so in `usage`.

use serde_json::{json, Value};

use crate::daemon::*;
use crate::support::*;
use crate::worker::confinement_available;

fn golden() -> Vec<Value> {
    let path = repo_root().join("tests/fixtures/golden/qwen3-tiny.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn qwen_daemon() -> Daemon {
    let dir = echo_dir("");
    let qwen = repo_root().join("tests/fixtures/qwen3-tiny");
    let library = plugin_lib("pio_plugin_qwen3");
    dir.write(
        "qwen3.toml",
        &manifest(
            "qwen3-4b-instruct-2507",
            "0.1.0",
            &library.display().to_string(),
            &format!("[model]\npath = \"{}\"\ndtype = \"f32\"\n", qwen.display()),
        ),
    );
    let d = Daemon::start(dir, "");
    d.wait_ready();
    d
}

/// Every step's log-probabilities are transformers' — the chosen token's always, and for chat
/// (whose format lists alternatives without merging equal texts) the top five — which they cannot
/// be once one token differs; the answer has the asked length.
fn assert_matches(r: &Value, case: &Value, max_tokens: usize) {
    let lp = &r["choices"][0]["logprobs"];
    let steps: Vec<(f64, Vec<f64>)> = match lp.get("content") {
        Some(content) => content
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let top = t["top_logprobs"].as_array().unwrap();
                let top = top.iter().map(|a| a["logprob"].as_f64().unwrap()).collect();
                (t["logprob"].as_f64().unwrap(), top)
            })
            .collect(),
        None => lp["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| (l.as_f64().unwrap(), Vec::new()))
            .collect(),
    };
    assert_eq!(steps.len(), max_tokens, "{r}");
    for (i, ((chosen, top), want)) in steps
        .iter()
        .zip(case["top5"].as_array().unwrap())
        .enumerate()
    {
        let want: Vec<f64> = want["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_f64().unwrap())
            .collect();
        assert!(
            (chosen - want[0]).abs() < 2e-3,
            "step {i} chose another token: {chosen} vs {want:?}"
        );
        for (g, w) in top.iter().zip(&want) {
            assert!((g - w).abs() < 2e-3, "step {i}: {top:?} vs {want:?}");
        }
    }
}

/// The request for golden `case`, cut to `max_tokens`.
fn body(case: &Value, max_tokens: usize) -> (&'static str, Value) {
    let model = "qwen3-4b-instruct-2507";
    match case.get("messages") {
        Some(messages) => (
            "/v1/chat/completions",
            json!({"model": model, "messages": messages, "max_tokens": max_tokens,
                   "temperature": 0, "logprobs": true, "top_logprobs": 5}),
        ),
        None => (
            "/v1/completions",
            json!({"model": model, "prompt": case["prompt"], "max_tokens": max_tokens,
                   "temperature": 0, "logprobs": 5}),
        ),
    }
}

#[test]
fn concurrent_requests_each_get_transformers_answer_and_a_repeat_hits_the_cache() {
    if !confinement_available() {
        return;
    }
    let d = qwen_daemon();
    let cases = golden();
    let lengths = [16usize, 9, 13, 16, 11, 16];
    // Every case three times over, all at once.
    let replies: Vec<(usize, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3 * cases.len())
            .map(|i| {
                let (d, case, n) = (&d, &cases[i % cases.len()], lengths[i % lengths.len()]);
                scope.spawn(move || {
                    let (path, body) = body(case, n);
                    let (status, r) = d.post(path, &body);
                    assert_eq!(status, 200, "{r}");
                    (i, r)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, r) in &replies {
        assert_matches(r, &cases[i % cases.len()], lengths[i % lengths.len()]);
    }
    // The longest prompt again: its full blocks come from the prefix cache.
    let long = cases
        .iter()
        .max_by_key(|c| c["input_ids"].as_array().unwrap().len())
        .unwrap();
    let prompt_len = long["input_ids"].as_array().unwrap().len();
    let (path, request) = body(long, 16);
    let (status, r) = d.post(path, &request);
    assert_eq!(status, 200, "{r}");
    assert_matches(&r, long, 16);
    let cached = r["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        prompt_len > 16,
        "the longest golden prompt spans a full block"
    );
    assert_eq!(cached as usize, (prompt_len - 1) / 16 * 16, "{r}");
}
