//! The prompt in an answer, through the daemon and a confined worker: completions' `echo` (with
//! `logprobs`, the prompt's tokens scored as lm-eval's loglikelihood tasks read them), prompts
//! of token ids, and vLLM's `prompt_logprobs` on both endpoints, against the scores transformers
//! gives the tiny checkpoint (tests/fixtures/prompt_logprobs.py).

use serde_json::{json, Value};

use crate::daemon::{qwen_daemon, Daemon};
use crate::support::repo_root;
use crate::worker::confinement_available;

const MODEL: &str = "qwen3-4b-instruct-2507";
/// The engine's bound against transformers (engine/tests/prompt_logprobs.rs says why).
const CLOSE: f64 = 2e-3;

fn goldens() -> Vec<Value> {
    let path = repo_root().join("tests/fixtures/golden/prompt-logprobs.json");
    let all: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    all["qwen3-tiny"].as_array().unwrap().clone()
}

fn close(got: &Value, want: &Value) -> bool {
    (got.as_f64().unwrap() - want.as_f64().unwrap()).abs() < CLOSE
}

/// `echo` with `logprobs`, as lm-eval asks (token ids, one token generated): the prompt's
/// tokens come first, the first with `null`s, the rest scored as transformers scores them; the
/// text is the prompt's and the output's, the offsets run on through both.
fn assert_echoed(d: &Daemon, case: &Value) {
    let ids = case["input_ids"].as_array().unwrap();
    let body = json!({"model": MODEL, "prompt": ids, "echo": true, "logprobs": 5,
        "max_tokens": 1, "temperature": 0});
    let (status, r) = d.post("/v1/completions", &body);
    assert_eq!(status, 200, "{r}");
    let prompt = case["prompt"].as_str().unwrap();
    let choice = &r["choices"][0];
    let text = choice["text"].as_str().unwrap();
    assert!(text.starts_with(prompt) && text.len() > prompt.len(), "{r}");
    let lp = &choice["logprobs"];
    let token_logprobs = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(token_logprobs.len(), ids.len() + 1, "{lp}");
    assert_eq!(token_logprobs[0], Value::Null);
    assert_eq!(lp["top_logprobs"][0], Value::Null);
    for (i, score) in case["scores"].as_array().unwrap().iter().enumerate() {
        assert!(
            close(&token_logprobs[i + 1], &score["logprob"]),
            "{i}: {lp}"
        );
        let top = lp["top_logprobs"][i + 1].as_object().unwrap();
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!(
            close(&json!(best), &score["top5"]["logprobs"][0]),
            "{i}: {top:?}"
        );
    }
    let offsets = lp["text_offset"].as_array().unwrap();
    assert_eq!(offsets[0], 0);
    assert_eq!(
        offsets[ids.len()],
        prompt.chars().count(),
        "the output's token follows"
    );
    assert_eq!(r["usage"]["prompt_tokens"], ids.len(), "{r}");
}

#[test]
fn echo_and_prompt_logprobs_show_the_prompt_as_transformers_scores_it() {
    if !confinement_available() {
        return;
    }
    let d = qwen_daemon("");
    let cases = goldens();
    for case in &cases {
        assert_echoed(&d, case);
    }
    // vLLM's `prompt_logprobs`, a text prompt: ranked entries keyed by id.
    let case = &cases[3];
    let body = json!({"model": MODEL, "prompt": case["prompt"], "prompt_logprobs": 2,
        "max_tokens": 1});
    let (status, r) = d.post("/v1/completions", &body);
    assert_eq!(status, 200, "{r}");
    let rows = r["choices"][0]["prompt_logprobs"].as_array().unwrap();
    assert_eq!(rows[0], Value::Null);
    assert_eq!(
        rows.len(),
        case["input_ids"].as_array().unwrap().len(),
        "{r}"
    );
    for (row, score) in rows[1..].iter().zip(case["scores"].as_array().unwrap()) {
        let own = &row[score["id"].to_string()];
        assert!(close(&own["logprob"], &score["logprob"]), "{row}");
        assert_eq!(own["rank"], score["rank"], "{row}");
        let best = &row[score["top5"]["ids"][0].to_string()];
        assert_eq!(best["rank"], 1, "{row}");
        assert!(
            row.as_object().unwrap().len() <= 3,
            "the token and 2 more: {row}"
        );
    }
    assert!(r["choices"][0]["text"]
        .as_str()
        .is_some_and(|t| !t.starts_with("The quick")));

    // Both asked: each shows its own number of alternatives.
    let body = json!({"model": MODEL, "prompt": case["prompt"], "echo": true, "logprobs": 1,
        "prompt_logprobs": 3, "max_tokens": 1});
    let (status, r) = d.post("/v1/completions", &body);
    assert_eq!(status, 200, "{r}");
    let choice = &r["choices"][0];
    for i in 1..rows.len() {
        let echoed = choice["logprobs"]["top_logprobs"][i]
            .as_object()
            .unwrap()
            .len();
        assert!(
            (1..=2).contains(&echoed),
            "logprobs 1, and the token: {choice}"
        );
        let row = choice["prompt_logprobs"][i].as_object().unwrap().len();
        assert!(
            (3..=4).contains(&row),
            "prompt_logprobs 3, and the token: {choice}"
        );
    }

    // `max_tokens: 0` with echo: the prompt alone, scored.
    let body = json!({"model": MODEL, "prompt": case["prompt"], "echo": true, "logprobs": 0,
        "max_tokens": 0});
    let (status, r) = d.post("/v1/completions", &body);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["text"], case["prompt"], "{r}");
    let lp = &r["choices"][0]["logprobs"]["token_logprobs"];
    assert_eq!(lp.as_array().unwrap().len(), rows.len(), "{r}");

    // A chat's are the response's, one per templated prompt token, whatever `n`.
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
        "prompt_logprobs": 0, "max_tokens": 1, "n": 2});
    let (status, r) = d.post("/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{r}");
    let rows = r["prompt_logprobs"].as_array().unwrap();
    let prompt_tokens = r["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(rows.len() as u64, prompt_tokens);
    for choice in r["choices"].as_array().unwrap() {
        assert!(choice.get("prompt_logprobs").is_none(), "{r}");
    }
    assert!(rows[1].as_object().unwrap().len() <= 2, "{}", rows[1]);

    // Echo alone, streamed: the prompt comes first.
    let body = json!({"model": MODEL, "prompt": "Hello world", "echo": true,
        "max_tokens": 2, "stream": true});
    let first = d.stream("/v1/completions", &body).next().unwrap();
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["choices"][0]["text"], "Hello world", "{first}");

    // A token id outside the vocabulary is named.
    let bad = json!({"model": MODEL, "prompt": [1, 99999999], "max_tokens": 1});
    let (status, e) = d.post("/v1/completions", &bad);
    assert_eq!(
        (status, &e["error"]["param"]),
        (400, &json!("prompt")),
        "{e}"
    );
    // The echo plugin declares neither.
    let (status, e) = d.post(
        "/v1/completions",
        &json!({"model": "echo", "prompt": "hi", "prompt_logprobs": 1}),
    );
    assert_eq!(
        (status, &e["error"]["param"]),
        (400, &json!("prompt_logprobs")),
        "{e}"
    );
}

/// `echo` with `logprobs`, streamed (vLLM streams it): each choice's first chunk is its prompt
/// with the scores transformers gives it, and the whole stream's logprobs are the unstreamed
/// answer's — scores, tokens and offsets running on — for several prompts and `n`.
#[test]
fn echo_with_logprobs_streams_the_prompt_scored_first() {
    if !confinement_available() {
        return;
    }
    let d = qwen_daemon("");
    let cases = goldens();
    // A prompt with characters split across tokens, and one of several KV blocks (the
    // stream's runs take them from the cache the scoring run filled).
    let cases = [cases[2].clone(), cases[3].clone()];
    let ids: Vec<&Value> = cases.iter().map(|c| &c["input_ids"]).collect();
    let body = json!({"model": MODEL, "prompt": ids, "echo": true, "logprobs": 2,
        "max_tokens": 3, "temperature": 0, "n": 2, "ignore_eos": true});
    let (status, whole) = d.post("/v1/completions", &body);
    assert_eq!(status, 200, "{whole}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let mut tokens: Vec<Vec<Value>> = vec![Vec::new(); 4];
    let mut usage = Value::Null;
    let mut text = vec![String::new(); 4];
    let mut logprobs: Vec<Vec<Value>> = vec![Vec::new(); 4];
    let mut offsets: Vec<Vec<Value>> = vec![Vec::new(); 4];
    for event in d.stream("/v1/completions", &streamed) {
        if event == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&event).unwrap();
        if v["choices"].as_array().is_some_and(Vec::is_empty) {
            usage = v["usage"].clone();
            continue;
        }
        let choice = &v["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        if text[i].is_empty() {
            // The first chunk: the prompt and its scores, the first token's `null`.
            let prompt = cases[i / 2]["prompt"].as_str().unwrap();
            assert_eq!(choice["text"], prompt, "{v}");
            let scored = &choice["logprobs"]["token_logprobs"];
            assert_eq!(scored[0], Value::Null, "{v}");
            let scores = cases[i / 2]["scores"].as_array().unwrap();
            for (j, score) in scores.iter().enumerate() {
                assert!(close(&scored[j + 1], &score["logprob"]), "{j}: {v}");
            }
        }
        text[i].push_str(choice["text"].as_str().unwrap());
        if let Some(lp) = choice["logprobs"].as_object() {
            logprobs[i].extend(lp["token_logprobs"].as_array().unwrap().iter().cloned());
            offsets[i].extend(lp["text_offset"].as_array().unwrap().iter().cloned());
            tokens[i].extend(lp["tokens"].as_array().unwrap().iter().cloned());
        }
    }
    // The scoring runs count nothing: the usage is the whole answer's.
    for key in ["prompt_tokens", "completion_tokens"] {
        assert_eq!(usage[key], whole["usage"][key], "{usage}");
    }
    for choice in whole["choices"].as_array().unwrap() {
        let i = choice["index"].as_u64().unwrap() as usize;
        assert_eq!(text[i], choice["text"].as_str().unwrap(), "choice {i}");
        let want = choice["logprobs"]["token_logprobs"].as_array().unwrap();
        assert_eq!(logprobs[i].len(), want.len(), "choice {i}");
        for (got, want) in logprobs[i].iter().zip(want) {
            assert!(
                got == want || close(got, want),
                "choice {i}: {got} vs {want}"
            );
        }
        assert_eq!(
            &offsets[i],
            choice["logprobs"]["text_offset"].as_array().unwrap()
        );
        assert_eq!(&tokens[i], choice["logprobs"]["tokens"].as_array().unwrap());
    }
}

/// Several prompts in one request (lm-eval's batches): `n` choices each, numbered prompt by
/// prompt, each echoing and scoring its own prompt; the usage counts each prompt once; streamed,
/// every choice's chunks name it; and all the choices together take places of the queue.
#[test]
fn several_prompts_in_one_request_each_get_their_choices() {
    if !confinement_available() {
        return;
    }
    let d = qwen_daemon("");
    let cases = goldens();
    let (a, b) = (&cases[0], &cases[2]);
    let body = json!({"model": MODEL, "prompt": [a["input_ids"], b["prompt"]], "n": 2,
        "echo": true, "logprobs": 1, "max_tokens": 3, "ignore_eos": true, "temperature": 0});
    let (status, r) = d.post("/v1/completions", &body);
    assert_eq!(status, 200, "{r}");
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4, "{r}");
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i, "{r}");
        let case = if i < 2 { a } else { b };
        let text = choice["text"].as_str().unwrap();
        assert!(
            text.starts_with(case["prompt"].as_str().unwrap()),
            "{i}: {text}"
        );
        let lp = choice["logprobs"]["token_logprobs"].as_array().unwrap();
        let scores = case["scores"].as_array().unwrap();
        assert_eq!(
            lp.len(),
            scores.len() + 1 + 3,
            "{i}: the prompt's and 3 more"
        );
        assert!(close(&lp[1], &scores[0]["logprob"]), "{i}: {}", lp[1]);
    }
    assert_eq!(choices[0]["text"], choices[1]["text"], "greedy: the same");
    let prompt_tokens = cases[0]["input_ids"].as_array().unwrap().len()
        + cases[2]["input_ids"].as_array().unwrap().len();
    assert_eq!(r["usage"]["prompt_tokens"], prompt_tokens, "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 12, "{r}");

    let body = json!({"model": MODEL, "prompt": ["Hello", "world"], "max_tokens": 2,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
    let mut seen = std::collections::BTreeSet::new();
    let mut usage = Value::Null;
    for event in d.stream("/v1/completions", &body) {
        if event == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&event).unwrap();
        if let Some(choice) = v["choices"].get(0) {
            seen.insert(choice["index"].as_u64().unwrap());
        }
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), [0, 1]);
    assert_eq!(usage["completion_tokens"], 4, "{usage}");

    // An error the worker finds names the prompt it is about.
    let bad = json!({"model": MODEL, "prompt": [[1, 2], [1, 99999999]], "max_tokens": 1});
    let (status, e) = d.post("/v1/completions", &bad);
    assert_eq!(
        (status, &e["error"]["param"]),
        (400, &json!("prompt[1]")),
        "{e}"
    );
    let message = e["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("prompt[1]: ") && message.contains("99999999"),
        "{e}"
    );

    // So does an empty one (the engine's check), alone or among others.
    for (prompt, param) in [(json!(""), "prompt"), (json!(["a", ""]), "prompt[1]")] {
        let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 1});
        let (status, e) = d.post("/v1/completions", &body);
        assert_eq!((status, &e["error"]["param"]), (400, &json!(param)), "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains("empty"),
            "{e}"
        );
    }

    let many = json!({"model": MODEL, "prompt": ["a", "b"], "n": 40, "max_tokens": 1});
    let (status, e) = d.post("/v1/completions", &many);
    assert_eq!(
        (status, &e["error"]["param"]),
        (400, &json!("prompt")),
        "{e}"
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("queue_depth"),
        "{e}"
    );
}
