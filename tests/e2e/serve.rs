//! `pio serve`'s HTTP API, against the real daemon on loopback: OpenAI shapes, errors, keys,
//! queueing, the admin API, on-demand loading, metrics and readiness, and the official `openai`
//! Python client.

use serde_json::{json, Value};

use crate::daemon::*;
use crate::support::*;
use crate::worker::confinement_available;

fn chat(model: &str, content: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": content}]})
}

#[test]
fn chat_and_completions_answer_in_openai_shapes() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(echo_dir(""), "");
    d.wait_ready();
    let (status, models) = d.get("/v1/models");
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "echo");

    let mut req = chat("echo", "hello");
    req["max_tokens"] = json!(3);
    let (status, r) = d.post("/v1/chat/completions", &req);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(r["choices"][0]["message"]["content"], "hel");
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(
        r["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
               "prompt_tokens_details": {"cached_tokens": 0}})
    );

    let req = json!({"model": "echo", "prompt": "abc def", "stop": " ", "logprobs": 0});
    let (status, r) = d.post("/v1/completions", &req);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["choices"][0]["text"], "abc");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        r["choices"][0]["stop_reason"], " ",
        "vLLM's: the stop string matched"
    );
    assert_eq!(
        r["choices"][0]["logprobs"]["tokens"],
        json!(["a", "b", "c"])
    );
    assert_eq!(r["choices"][0]["logprobs"]["text_offset"], json!([0, 1, 2]));

    // A completion left without `max_tokens` stops at OpenAI's 16; a chat runs on.
    let long = "abcdefghij".repeat(3);
    let (status, r) = d.post("/v1/completions", &json!({"model": "echo", "prompt": long}));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["text"], long[..16]);
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["choices"][0]["stop_reason"], Value::Null);
    let (status, r) = d.post("/v1/chat/completions", &chat("echo", &long));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["message"]["content"], long);

    let mut req = chat("echo", "hello");
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let events: Vec<String> = d.stream("/v1/chat/completions", &req).collect();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk is JSON"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    let (text, done) = Daemon::chat_text(events.into_iter());
    assert_eq!((text.as_str(), done), ("hello", true));
    let last = chunks.last().expect("chunks");
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 5);
    let finish = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(finish["finish_reason"], "stop");
    assert_eq!(
        finish["stop_reason"],
        Value::Null,
        "the end of the text, no stop string"
    );
    req["stop"] = json!(["ll"]);
    let events: Vec<String> = d.stream("/v1/chat/completions", &req).collect();
    let chunks: Vec<Value> = (events[..events.len() - 1].iter())
        .map(|e| serde_json::from_str(e).expect("chunk is JSON"))
        .collect();
    let finish = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(
        (&finish["finish_reason"], &finish["stop_reason"]),
        (&json!("stop"), &json!("ll"))
    );
}

/// `req` asking for a stream.
fn with_stream(req: &Value) -> Value {
    let mut req = req.clone();
    req["stream"] = json!(true);
    req
}

#[test]
fn tool_calls_in_the_output_become_tool_calls_in_the_api() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(echo_dir(""), "");
    d.wait_ready();
    // Echo says back its prompt: a prompt that is a call makes it "call" the tool (hermes format).
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let call = "Checking.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    let mut req = chat("echo", call);
    req["tools"] = tools.clone();
    let (status, r) = d.post("/v1/chat/completions", &req);
    assert_eq!(status, 200, "{r}");
    let choice = &r["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{r}");
    // The text before the call as written, as vLLM keeps it (and as a stream sends it).
    assert_eq!(choice["message"]["content"], "Checking.\n");
    let whole = choice["message"]["content"].clone();
    let calls = choice["message"]["tool_calls"]
        .as_array()
        .expect("tool_calls");
    assert_eq!((calls.len(), &calls[0]["type"]), (1, &json!("function")));
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));
    assert!(calls[0]["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("call_")));
    // A message's calls are OpenAI's `ChatCompletionMessageToolCall`: `index` is the stream's.
    let mut keys: Vec<&String> = calls[0].as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["function", "id", "type"], "{r}");

    // Streamed: the markup never reaches the client as text; the call comes as a delta.
    req["stream"] = json!(true);
    let chunks: Vec<Value> = d
        .stream("/v1/chat/completions", &req)
        .filter(|e| e != "[DONE]")
        .map(|e| serde_json::from_str(&e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, whole.as_str().unwrap(), "streamed as answered whole");
    let delta = chunks
        .iter()
        .find_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .expect("a tool_calls delta");
    assert_eq!(delta[0]["function"]["name"], "get_weather");
    assert_eq!(delta[0]["index"], 0);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );

    // Two calls: both, unless `parallel_tool_calls` is false (the first alone, streamed or not).
    let second = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";
    let mut req = chat("echo", &format!("{call}{second}"));
    req["tools"] = tools.clone();
    let cities = |req: &Value| -> Vec<String> {
        let streamed: Vec<Value> = d
            .stream("/v1/chat/completions", &with_stream(req))
            .filter(|e| e != "[DONE]")
            .map(|e| serde_json::from_str(&e).unwrap())
            .collect();
        let (_, r) = d.post("/v1/chat/completions", req);
        let whole = r["choices"][0]["message"]["tool_calls"].clone();
        let delta = streamed
            .iter()
            .find_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array().cloned())
            .unwrap();
        assert_eq!(whole.as_array().unwrap().len(), delta.len(), "{r}");
        delta
            .iter()
            .map(|c| c["function"]["arguments"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(cities(&req).len(), 2);
    req["parallel_tool_calls"] = json!(false);
    assert_eq!(cities(&req), ["{\"city\":\"Paris\"}"]);
    // Cut by `max_tokens` inside the second call: the whole first call comes back, and the
    // finish says the output is incomplete, streamed or not.
    let mut cut = req.clone();
    cut["parallel_tool_calls"] = json!(true);
    cut["max_tokens"] = json!(call.chars().count() + 12);
    let (_, r) = d.post("/v1/chat/completions", &cut);
    assert_eq!(r["choices"][0]["finish_reason"], "length", "{r}");
    assert_eq!(
        r["choices"][0]["message"]["tool_calls"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "{r}"
    );
    let last: Value = d
        .stream("/v1/chat/completions", &with_stream(&cut))
        .filter(|e| e != "[DONE]")
        .map(|e| serde_json::from_str(&e).unwrap())
        .last()
        .unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length", "{last}");

    // Without tools offered, with `tool_choice: "none"` (the tools still shown), or with a
    // malformed call, it is all text.
    let (_, r) = d.post("/v1/chat/completions", &chat("echo", call));
    assert_eq!(r["choices"][0]["message"]["content"], call);
    assert!(r["choices"][0]["message"].get("tool_calls").is_none());
    let mut none = chat("echo", call);
    none["tools"] = tools.clone();
    none["tool_choice"] = json!("none");
    let (_, r) = d.post("/v1/chat/completions", &none);
    assert_eq!(r["choices"][0]["message"]["content"], call, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    let broken = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {oops}\n</tool_call>";
    let mut req = chat("echo", broken);
    req["tools"] = tools;
    let (_, r) = d.post("/v1/chat/completions", &req);
    assert_eq!(r["choices"][0]["message"]["content"], broken);
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
}

#[test]
fn reasoning_and_glm_tool_calls_come_apart_streamed_and_not() {
    if !confinement_available() {
        return;
    }
    // Echo configured as GLM-4.7-Flash marks its output: it says back a reasoning, an answer and
    // a call in GLM's markup, as the model would after the template's `<think>`.
    let d = Daemon::start(
        echo_dir("[model.options]\ntool_call_format = \"glm47\"\nreasoning_format = \"glm45\"\n"),
        "",
    );
    d.wait_ready();
    let tools = json!([{"type": "function", "function": {"name": "book",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "nights": {"type": "integer"}}}}}]);
    let output = "Need a booking.\n</think>\nBooking now.<tool_call>book<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>nights</arg_key><arg_value>2</arg_value></tool_call>";
    let mut req = chat("echo", output);
    req["tools"] = tools;
    req["logprobs"] = json!(true);
    let (status, r) = d.post("/v1/chat/completions", &req);
    assert_eq!(status, 200, "{r}");
    let message = &r["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], "Need a booking.", "{r}");
    assert_eq!(message["content"], "Booking now.");
    let call = &message["tool_calls"][0]["function"];
    assert_eq!(call["name"], "book");
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris", "nights": 2}));
    // Every generated token has its logprob, markup and reasoning included.
    let tokens = output.chars().count();
    assert_eq!(r["usage"]["completion_tokens"], tokens);
    assert_eq!(
        r["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .len(),
        tokens
    );

    req["stream"] = json!(true);
    let chunks: Vec<Value> = d
        .stream("/v1/chat/completions", &req)
        .filter(|e| e != "[DONE]")
        .map(|e| serde_json::from_str(&e).unwrap())
        .collect();
    let field = |name: &str| -> String {
        chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"][name].as_str())
            .collect()
    };
    // Streamed as whole: the whitespace around the reasoning left out.
    assert_eq!(field("reasoning_content"), "Need a booking.");
    assert_eq!(field("content"), "Booking now.");
    let streamed: usize = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .map(Vec::len)
        .sum();
    assert_eq!(streamed, tokens, "a logprob per token, in order");
    let delta = chunks
        .iter()
        .find_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .expect("a tool_calls delta");
    assert_eq!(delta[0]["function"]["name"], "book");

    // Thinking switched off: the prompt closed the block, so the output is all answer.
    let mut plain = chat("echo", "Just 4.");
    plain["chat_template_kwargs"] = json!({"enable_thinking": false});
    let (_, r) = d.post("/v1/chat/completions", &plain);
    assert_eq!(r["choices"][0]["message"]["content"], "Just 4.");
    assert!(
        r["choices"][0]["message"]
            .get("reasoning_content")
            .is_none(),
        "{r}"
    );
    // Completions return the raw text.
    let (_, r) = d.post(
        "/v1/completions",
        &json!({"model": "echo", "prompt": "a</think>b"}),
    );
    assert_eq!(r["choices"][0]["text"], "a</think>b");
}

#[test]
fn errors_have_the_openai_shape_the_right_status_and_the_field() {
    if !confinement_available() {
        return;
    }
    let config = "[server]\nmax_body_size = \"16KiB\"\nmax_tokens_limit = 100\n";
    let d = Daemon::start(echo_dir(""), config);
    d.wait_ready();
    let bad = |body: Value, param: &str| {
        let (status, r) = d.post("/v1/chat/completions", &body);
        assert_eq!(status, 400, "{r}");
        assert_eq!(r["error"]["type"], "invalid_request_error", "{r}");
        assert_eq!(r["error"]["param"], param, "{r}");
        assert!(!r["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .is_empty());
    };
    let with = |key: &str, value: Value| {
        let mut body = chat("echo", "hi");
        body[key] = value;
        body
    };
    bad(with("temperature", json!(5)), "temperature");
    bad(with("n", json!(0)), "n");
    bad(with("max_tokens", json!(1000)), "max_tokens");
    bad(with("top_logprobs", json!(3)), "top_logprobs");
    let mut required = with(
        "tools",
        json!([{"type": "function", "function": {"name": "f"}}]),
    );
    required["tool_choice"] = json!("required");
    bad(required, "tool_choice");
    bad(with("stop", json!(7)), "stop");
    bad(
        json!({"model": "echo", "messages": [{"role": "robot", "content": "x"}]}),
        "messages[0].role",
    );
    bad(
        json!({"model": "echo", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}),
        "messages[0].content[0]",
    );
    // No model named: the lone one served (echo) is taken, and its messages are checked.
    bad(json!({"messages": []}), "messages");

    let (status, r) = d.post_raw("/v1/chat/completions", "{\"model\": ", None);
    assert_eq!(status, 400);
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("not valid JSON"),
        "{r}"
    );

    let (status, r) = d.post("/v1/chat/completions", &chat("nope", "hi"));
    assert_eq!(
        (status, r["error"]["code"].as_str()),
        (404, Some("model_not_found")),
        "{r}"
    );
    let (status, _) = d.get("/v1/nothing");
    assert_eq!(status, 404);

    let (status, r) = d.post("/v1/chat/completions", &chat("echo", &"x".repeat(20_000)));
    assert_eq!(
        (status, r["error"]["code"].as_str()),
        (413, Some("request_too_large")),
        "{r}"
    );

    // The plugin's own refusal (echo's context is 4096 characters) is a 400 too, streamed or not,
    // with OpenAI's code and the prompt's field, which clients act on.
    let past_context = |r: &Value| (r["error"]["code"].clone(), r["error"]["param"].clone());
    let long = json!({"model": "echo", "prompt": "y".repeat(5000)});
    let (status, r) = d.post("/v1/completions", &long);
    assert_eq!(status, 400, "{r}");
    assert_eq!(
        past_context(&r),
        (json!("context_length_exceeded"), json!("prompt"))
    );
    let (status, r) = d.post("/v1/chat/completions", &chat("echo", &"y".repeat(5000)));
    assert_eq!(status, 400, "{r}");
    assert_eq!(
        past_context(&r),
        (json!("context_length_exceeded"), json!("messages"))
    );
    let mut streamed = long.clone();
    streamed["stream"] = json!(true);
    let Err((status, body)) = d.try_stream("/v1/completions", &streamed) else {
        panic!("a streamed prompt past the context was taken");
    };
    assert_eq!(status, 400, "{body}");
    let r: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        past_context(&r),
        (json!("context_length_exceeded"), json!("prompt"))
    );
}

#[test]
fn keys_guard_the_api_and_admin_keys_the_admin_api() {
    if !confinement_available() {
        return;
    }
    let config = "[server]\napi_keys = [\"user-key\"]\nadmin_keys = [\"admin-key\"]\n";
    let d = Daemon::start(echo_dir(""), config);
    d.wait_ready();
    let body = chat("echo", "hi").to_string();
    let (status, r) = d.post_raw("/v1/chat/completions", &body, None);
    assert_eq!(
        (status, r["error"]["type"].as_str()),
        (401, Some("authentication_error"))
    );
    assert_eq!(
        d.post_raw("/v1/chat/completions", &body, Some("wrong")).0,
        401
    );
    assert_eq!(
        d.post_raw("/v1/chat/completions", &body, Some("user-key"))
            .0,
        200
    );
    assert_eq!(
        d.post_raw("/v1/chat/completions", &body, Some("admin-key"))
            .0,
        200
    );
    assert_eq!(d.get_as("/v1/models", None).0, 401);
    assert_eq!(d.get_as("/v1/models", Some("user-key")).0, 200);
    // A user key is known, but does not open the admin API: forbidden, not unauthenticated.
    let (status, r) = d.get_as("/v1/plugins", Some("user-key"));
    assert_eq!(
        (status, r["error"]["type"].as_str()),
        (403, Some("permission_error")),
        "{r}"
    );
    assert_eq!(d.get_as("/v1/plugins", Some("wrong")).0, 401);
    assert_eq!(d.get_as("/v1/plugins", Some("admin-key")).0, 200);
    assert_eq!(
        d.post_raw("/v1/plugins/echo/reload", "", Some("user-key"))
            .0,
        403
    );
    assert_eq!(d.get("/health").0, 200);
}

#[test]
fn a_full_queue_gets_429_and_a_crashing_plugin_500_with_the_reason() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(
        echo_dir("[model.options]\ndelay_ms = 100\n"),
        "[server]\nqueue_depth = 1\n",
    );
    d.wait_ready();
    let mut slow = chat("echo", "0123456789");
    slow["stream"] = json!(true);
    let mut events = d.stream("/v1/chat/completions", &slow);
    let _first = events.next();
    let (status, r) = d.post("/v1/chat/completions", &chat("echo", "hi"));
    assert_eq!(
        (status, r["error"]["code"].as_str()),
        (429, Some("queue_full")),
        "{r}"
    );
    let (text, done) = Daemon::chat_text(events);
    assert!(
        done && text.len() >= 9,
        "the running request finished: {text}"
    );

    let h = restarting_hostile();
    let (status, r) = h.post(
        "/v1/completions",
        &json!({"model": "hostile", "prompt": "segfault"}),
    );
    assert_eq!(status, 500, "{r}");
    let message = r["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("SIGSEGV"),
        "the reason is given: {message}"
    );
    h.wait_restarts("hostile", 1);
    let (status, r) = h.post(
        "/v1/completions",
        &json!({"model": "hostile", "prompt": "status"}),
    );
    assert_eq!(status, 200, "served again after the restart: {r}");
}

#[test]
fn the_min_tier_flag_overrides_the_manifest_and_the_config() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start_with(
        echo_dir(""),
        "[sandbox]\nmin_tier = \"low\"\n",
        &["--min-tier", "medium"],
    );
    d.wait_ready();
    let echo = d.plugin("echo");
    assert_eq!(
        (
            echo["tier_requested"].as_str(),
            echo["tier_applied"].as_str()
        ),
        (Some("low"), Some("medium"))
    );
    assert_eq!(d.post("/v1/chat/completions", &chat("echo", "hi")).0, 200);
}

#[test]
fn a_loading_model_is_not_ready_and_requests_get_503_until_it_is() {
    if !confinement_available() {
        return;
    }
    let config = "[server]\nload_wait_secs = 0\nlog_format = \"json\"\n";
    let d = Daemon::start(echo_dir("[model.options]\nload_delay_ms = 2000\n"), config);
    let (status, ready) = d.get("/ready");
    assert_eq!(
        (status, &ready["models"]["echo"]),
        (503, &json!("loading")),
        "{ready}"
    );
    let (status, r) = d.post("/v1/chat/completions", &chat("echo", "hi"));
    assert_eq!(status, 503, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("still loading"),
        "{r}"
    );
    d.wait_ready();
    assert_eq!(d.post("/v1/chat/completions", &chat("echo", "hi")).0, 200);
    // log_format = "json": every log line is a JSON object.
    let logs = d.logs();
    assert!(logs.lines().count() >= 2);
    for line in logs.lines() {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
}

#[test]
fn a_plugin_that_fails_to_load_says_why_and_is_not_restarted_per_request() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(
        echo_dir("[model.options]\nload_error = \"the weights are damaged\"\n"),
        "",
    );
    d.wait_for(20, "the failed load", |d| {
        d.plugin("echo")["last_error"].is_string()
    });
    let echo = d.plugin("echo");
    assert_eq!(echo["state"], "failed");
    assert!(
        echo["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("the weights are damaged"),
        "{echo}"
    );
    assert_eq!(
        d.get("/ready").0,
        503,
        "a preloaded model that failed is not ready"
    );
    let (status, r) = d.post("/v1/chat/completions", &chat("echo", "hi"));
    assert_eq!(status, 500, "{r}");
    let message = r["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("the weights are damaged") && message.contains("retries after"),
        "{message}"
    );
    assert!(
        d.plugin("echo")["pid"].is_null(),
        "no worker was started for the request"
    );
    // An operator's unload ends its tries: unloaded on purpose, it no longer holds /ready back.
    assert_eq!(d.post("/v1/plugins/echo/unload", &json!({})).0, 200);
    assert_eq!(d.plugin("echo")["state"], "unloaded");
    assert_eq!(d.get("/ready").0, 200);
}

fn process_exists(pid: &Value) -> bool {
    pid.as_u64()
        .is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
}

#[test]
fn the_admin_api_loads_unloads_and_reloads() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(
        echo_dir(""),
        "[server]\npreload = []\nload_on_demand = false\n",
    );
    d.wait_ready();
    assert_eq!(d.plugin("echo")["state"], "unloaded");
    let (status, r) = d.post("/v1/chat/completions", &chat("echo", "hi"));
    assert_eq!(
        (status, r["error"]["code"].as_str()),
        (503, Some("model_unavailable")),
        "{r}"
    );
    assert!(r["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("/v1/plugins/echo/load"));

    let (status, r) = d.post_raw("/v1/plugins/echo/load", "", None);
    assert_eq!(status, 200, "{r}");
    let loaded = d.plugin("echo");
    assert_eq!(loaded["state"], "ready");
    assert_eq!(
        loaded["weight_bytes"], 0,
        "what the plugin reported at load"
    );
    assert!(process_exists(&loaded["pid"]));
    assert_eq!(d.post("/v1/chat/completions", &chat("echo", "hi")).0, 200);

    assert_eq!(d.post_raw("/v1/plugins/echo/reload", "", None).0, 200);
    let reloaded = d.plugin("echo");
    assert_eq!(reloaded["state"], "ready");
    assert_ne!(reloaded["pid"], loaded["pid"], "a new worker serves");
    d.wait_for(10, "the old worker to stop", |_| {
        !process_exists(&loaded["pid"])
    });

    assert_eq!(d.post_raw("/v1/plugins/echo/unload", "", None).0, 200);
    assert_eq!(d.plugin("echo")["state"], "unloaded");
    d.wait_for(10, "the worker to stop", |_| {
        !process_exists(&reloaded["pid"])
    });
    assert_eq!(d.post_raw("/v1/plugins/nope/load", "", None).0, 404);
}

#[test]
fn models_load_on_demand_within_the_cap_and_unload_when_idle() {
    if !confinement_available() {
        return;
    }
    let dir = echo_and_hostile_dir();
    let config =
        "[server]\npreload = []\nmax_loaded_models = 1\nkeep_alive_secs = 2\nwarmup = false\n";
    let d = Daemon::start(dir, config);
    assert_eq!(d.post("/v1/chat/completions", &chat("echo", "hi")).0, 200);
    assert_eq!(d.plugin("echo")["state"], "ready");
    let (status, r) = d.post(
        "/v1/completions",
        &json!({"model": "hostile", "prompt": "status"}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(d.plugin("hostile")["state"], "ready");
    assert_eq!(
        d.plugin("echo")["state"],
        "unloaded",
        "the idle model made room"
    );
    d.wait_for(15, "the idle unload", |d| {
        d.plugin("hostile")["state"] == "unloaded"
    });
}

/// A preloaded model that idled out keeps the replica ready: a load balancer must still send it
/// the request that loads it again.
#[test]
fn a_model_unloaded_when_idle_keeps_the_replica_ready() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(echo_dir(""), "[server]\nkeep_alive_secs = 1\n");
    d.wait_ready();
    d.wait_for(15, "the idle unload", |d| {
        d.plugin("echo")["state"] == "unloaded"
    });
    let (status, ready) = d.get("/ready");
    assert_eq!(status, 200, "{ready}");
    assert_eq!(d.post("/v1/chat/completions", &chat("echo", "hi")).0, 200);
}

#[test]
fn metrics_and_readiness_tell_the_truth() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(echo_dir(""), "");
    d.wait_ready();
    let (status, ready) = d.get("/ready");
    assert_eq!((status, &ready["models"]["echo"]), (200, &json!("ready")));
    assert_eq!(
        d.post("/v1/chat/completions", &chat("echo", "hello")).0,
        200
    );
    assert_eq!(
        d.post("/v1/chat/completions", &chat("nope", "hello")).0,
        404
    );
    let text = d.get_text("/metrics");
    for line in [
        "pio_requests_total{model=\"echo\",endpoint=\"chat\",status=\"200\"} 1",
        "pio_requests_total{model=\"\",endpoint=\"chat\",status=\"404\"} 1",
        "pio_generated_tokens_total{model=\"echo\"} 5",
        "pio_prompt_tokens_total{model=\"echo\"} 5",
        "pio_time_to_first_token_seconds_count{model=\"echo\"} 1",
        "pio_inter_token_latency_seconds_count{model=\"echo\"} 4",
        "pio_model_ready{model=\"echo\"} 1",
        "pio_queue_depth{model=\"echo\"} 0",
        "pio_worker_restarts_total{model=\"echo\"} 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
    let memory = text
        .lines()
        .find_map(|l| l.strip_prefix("pio_worker_memory_bytes{model=\"echo\"} "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(
        memory.is_some_and(|m| m > 0.0),
        "worker memory from its cgroup:\n{text}"
    );
    let cpu = text
        .lines()
        .find_map(|l| l.strip_prefix("pio_worker_cpu_seconds_total{model=\"echo\"} "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(
        cpu.is_some_and(|c| c > 0.0),
        "worker CPU time from its cgroup:\n{text}"
    );
}

/// A name in `server.preload` that no manifest serves keeps `/ready` at 503, and the log says why
/// from the start (a typo used to show only in `/ready`'s body).
#[test]
fn a_preload_no_manifest_serves_is_named_in_the_log() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(echo_dir(""), "[server]\npreload = [\"nosuch\", \"echo\"]\n");
    d.wait_for(20, "echo loaded", |d| d.plugin("echo")["state"] == "ready");
    let (status, ready) = d.get("/ready");
    assert_eq!(
        (status, &ready["models"]["nosuch"]),
        (503, &json!("missing"))
    );
    let logs = d.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("WARN") && l.contains("server.preload names nosuch")),
        "{logs}"
    );
}

/// The official `openai` Python package against the daemon, and the raw bodies validated against
/// OpenAI's published schemas (CI installs both packages; elsewhere the test is skipped when they
/// are missing).
#[test]
fn the_official_openai_client_works() {
    if !confinement_available() {
        return;
    }
    if !python_client_available() {
        return;
    }
    let d = Daemon::start(qwen_dir(""), "[server]\napi_keys = [\"test-key\"]\n");
    d.wait_ready();
    run_python_checks(
        &d,
        "api/openai_client.py",
        &[&format!("{}/v1", d.base), "test-key"],
    );
}

/// A daemon killed with SIGKILL cleans nothing; the next one to start removes what it left: its
/// runtime folder (library copies) and its workers' cgroups, the workers in them killed.
#[test]
fn the_next_start_cleans_what_a_killed_daemon_left() {
    if !confinement_available() {
        return;
    }
    let first = Daemon::start(echo_dir(""), "");
    first.wait_ready();
    let pid = first.pid();
    // `pio-serve-<pid>-<random>`.
    let runtime_of = |pid: u32| {
        let prefix = format!("pio-serve-{pid}-");
        std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .expect("the daemon's runtime folder")
    };
    let runtime = runtime_of(pid);
    assert!(runtime.join("libs").is_dir(), "{runtime:?}");
    let groups = || -> Vec<std::path::PathBuf> {
        ["/sys/fs/cgroup/memory/pio", "/sys/fs/cgroup/pio"]
            .iter()
            .filter_map(|p| std::fs::read_dir(p).ok())
            .flatten()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().contains(&format!("-{pid}-")))
            })
            .collect()
    };
    assert!(!groups().is_empty(), "the worker runs in its cgroup");
    drop(first); // SIGKILL
    assert!(runtime.is_dir(), "a killed daemon cleans nothing");
    let mut second = Daemon::start(echo_dir(""), "");
    second.wait_ready();
    assert!(!runtime.exists(), "the next start removed {runtime:?}");
    assert_eq!(groups(), Vec::<std::path::PathBuf>::new());
    // A clean stop leaves nothing for the next start to remove.
    let own = runtime_of(second.pid());
    assert!(own.is_dir());
    second.terminate();
    assert!(second.wait_exit(30).success());
    assert!(!own.exists(), "{own:?} left behind");
}

/// `/metrics` is open on a loopback listen, needs a metrics or admin key once any key is
/// configured, and off loopback is closed until a key is configured (saying which); so is the
/// admin API.
#[test]
fn metrics_need_a_key_off_loopback_or_once_metrics_keys_are_set() {
    if !confinement_available() {
        return;
    }
    let open = Daemon::start(echo_dir(""), "");
    assert_eq!(open.get("/metrics").0, 200);
    // The classic text format unless the scraper asks for OpenMetrics (Prometheus does).
    let content_type = |accept: Option<&str>| {
        let mut req = ureq::get(format!("{}/metrics", open.base));
        if let Some(a) = accept {
            req = req.header("Accept", a);
        }
        let response = req.call().unwrap();
        let ct = response.headers().get("content-type").unwrap();
        ct.to_str().unwrap().to_string()
    };
    assert!(content_type(None).starts_with("text/plain; version=0.0.4"));
    assert!(
        content_type(Some("application/openmetrics-text;version=1.0.0"))
            .starts_with("application/openmetrics-text")
    );
    let keyed = Daemon::start(
        echo_dir(""),
        "[server]\nmetrics_keys = [\"scrape\"]\nadmin_keys = [\"root\"]\napi_keys = [\"user\"]\n",
    );
    assert_eq!(keyed.get("/metrics").0, 401);
    assert_eq!(keyed.get_as("/metrics", Some("user")).0, 403);
    assert_eq!(keyed.get_as("/metrics", Some("guess")).0, 401);
    assert_eq!(keyed.get_as("/metrics", Some("scrape")).0, 200);
    assert_eq!(keyed.get_as("/metrics", Some("root")).0, 200);
    let public = Daemon::start_with(echo_dir(""), "", &["--listen", "0.0.0.0:0"]);
    let (status, body) = public.get("/metrics");
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("server.metrics_keys")),
        "{body}"
    );
    assert_eq!(public.get("/health").0, 200);
    let (status, body) = public.post("/v1/plugins/echo/unload", &serde_json::json!({}));
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("server.admin_keys")),
        "{body}"
    );
    assert_eq!(public.get("/v1/plugins").0, 401);
    assert_eq!(open.get("/v1/plugins").0, 200);
    // Keys of any kind say the daemon is shared (a proxy on the same host forwards from
    // loopback): user keys alone close /metrics on loopback too, saying which key opens it.
    let shared = Daemon::start(echo_dir(""), "[server]\napi_keys = [\"user\"]\n");
    let (status, body) = shared.get("/metrics");
    assert_eq!(status, 401, "{body}");
    assert_eq!(shared.get_as("/metrics", Some("user")).0, 403);
}

/// Every response carries an `x-request-id` (the client's when it is a sane token, else a new
/// one), and a request that fails in the worker is named by it in the worker's log lines.
#[test]
fn request_ids_come_back_and_reach_the_worker_log() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(echo_dir(""), "");
    d.wait_ready();
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build(),
    );
    let send = |id: Option<&str>, body: &Value| {
        let mut req = agent.post(format!("{}/v1/chat/completions", d.base));
        if let Some(id) = id {
            req = req.header("x-request-id", id);
        }
        let r = req.send_json(body).expect("POST");
        let header = r
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        (r.status().as_u16(), header)
    };
    // Longer than echo's context: the plugin refuses it in the worker.
    let long = chat("echo", &"x".repeat(5000));
    let (status, header) = send(Some("trace-abc.1"), &long);
    assert_eq!((status, header.as_deref()), (400, Some("trace-abc.1")));
    d.wait_for(10, "the worker's log line", |d| {
        d.logs()
            .lines()
            .any(|l| l.contains("pio::worker") && l.contains("request trace-abc.1 failed"))
    });
    let (status, header) = send(None, &chat("echo", "hi"));
    assert_eq!(status, 200);
    assert!(header.is_some_and(|h| h.starts_with("req-")));
    // Not a sane token: replaced.
    let (_, header) = send(Some("bad id with spaces"), &chat("echo", "hi"));
    assert!(header.is_some_and(|h| h.starts_with("req-")));
    // Routes that fail before any handler carry one too.
    let r = agent.get(format!("{}/nope", d.base)).call().expect("GET");
    assert_eq!(r.status().as_u16(), 404);
    assert!(r.headers().contains_key("x-request-id"));
}

/// vLLM's `/tokenize` and `/detokenize`: a raw prompt's ids are transformers' (the golden's),
/// a chat's are those its generation runs (its usage counts them), ids come back as the text,
/// and a plugin that does not declare the capability, or an id outside the vocabulary, is
/// refused by name.
#[test]
fn tokenize_gives_the_ids_a_generation_runs_and_detokenize_reverses_them() {
    if !confinement_available() {
        return;
    }
    let d = qwen_daemon("");
    let golden = crate::qwen3::golden_of("qwen3-tiny");
    let case = &golden[0];
    let model = "qwen3-4b-instruct-2507";
    // Several prompts at once: refused, not the first one's count.
    let (status, r) = d.post(
        "/tokenize",
        &json!({"model": model, "prompt": ["hi", "there friend"]}),
    );
    assert_eq!(
        (status, &r["error"]["param"]),
        (400, &json!("prompt")),
        "{r}"
    );
    let (status, r) = d.post(
        "/tokenize",
        &json!({"model": model, "prompt": case["prompt"], "return_token_strs": true}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["tokens"], case["input_ids"], "{r}");
    assert_eq!(r["count"], case["input_ids"].as_array().unwrap().len());
    assert!(r["max_model_len"].as_u64().is_some_and(|n| n > 0), "{r}");
    let strs: String = (r["token_strs"].as_array().unwrap().iter())
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(strs, case["prompt"].as_str().unwrap());
    let (status, back) = d.post(
        "/detokenize",
        &json!({"model": model, "tokens": r["tokens"]}),
    );
    assert_eq!(status, 200, "{back}");
    assert_eq!(back["prompt"], case["prompt"]);

    // A chat: the template's tokens, as many as its generation's usage counts.
    let mut req = chat(model, "写一首诗 🙂");
    let (status, t) = d.post("/tokenize", &req);
    assert_eq!(status, 200, "{t}");
    req["max_tokens"] = json!(1);
    let (_, g) = d.post("/v1/chat/completions", &req);
    assert_eq!(t["count"], g["usage"]["prompt_tokens"], "{t} {g}");
    let detokenized = |tokens: &Value| -> String {
        let (status, r) = d.post("/detokenize", &json!({"model": model, "tokens": tokens}));
        assert_eq!(status, 200, "{r}");
        r["prompt"].as_str().unwrap().to_string()
    };
    let text = detokenized(&t["tokens"]);
    assert!(
        text.starts_with("<|im_start|>") && text.contains("写一首诗 🙂"),
        "{text}"
    );
    // Tools go through the template too; counting is not held to the context.
    req["tools"] = json!([{"type": "function", "function": {"name": "lookup", "parameters": {}}}]);
    let (status, with_tools) = d.post("/tokenize", &req);
    assert_eq!(status, 200, "{with_tools}");
    let count = |v: &Value| v["count"].as_u64().unwrap();
    assert!(count(&with_tools) > count(&t) + 20, "{with_tools}");
    assert!(detokenized(&with_tools["tokens"]).contains("\"lookup\""));

    let (status, e) = d.post(
        "/detokenize",
        &json!({"model": model, "tokens": [1, 99999999]}),
    );
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["param"], "tokens[1]");
    let (status, e) = d.post("/tokenize", &json!({"model": "echo", "prompt": "hi"}));
    assert_eq!(
        (status, &e["error"]["param"]),
        (400, &json!("model")),
        "{e}"
    );
    assert!(
        e["error"]["message"].as_str().unwrap().contains("tokenize"),
        "{e}"
    );
    let (status, _) = d.post("/tokenize", &json!({"model": "nope", "prompt": "hi"}));
    assert_eq!(status, 404);
    let both =
        json!({"model": model, "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]});
    let (status, e) = d.post("/tokenize", &both);
    assert_eq!(
        (status, &e["error"]["param"]),
        (400, &json!("prompt")),
        "{e}"
    );
}

/// `n` choices: each a sequence of its own, choice `i` of a seeded request is the single
/// request seeded `seed + i`; the usage counts the prompt once and every completion; streamed,
/// each choice's deltas carry its index and the usage comes once, after the last finish.
#[test]
fn n_choices_are_each_their_own_seeded_sample_streamed_or_not() {
    if !confinement_available() {
        return;
    }
    let d = qwen_daemon("");
    let model = "qwen3-4b-instruct-2507";
    for endpoint in ["/v1/chat/completions", "/v1/completions"] {
        let chat_endpoint = endpoint.contains("chat");
        let text_of = |choice: &Value| -> String {
            let text = if chat_endpoint {
                &choice["message"]["content"]
            } else {
                &choice["text"]
            };
            text.as_str().unwrap().to_string()
        };
        let mut req = if chat_endpoint {
            chat(model, "Tell me a story")
        } else {
            json!({"model": model, "prompt": "Once upon a time"})
        };
        req["max_tokens"] = json!(12);
        req["temperature"] = json!(1.5);
        req["seed"] = json!(7);
        let singles: Vec<Value> = (0..3)
            .map(|i| {
                let mut one = req.clone();
                one["seed"] = json!(7 + i);
                let (status, r) = d.post(endpoint, &one);
                assert_eq!(status, 200, "{r}");
                r
            })
            .collect();
        req["n"] = json!(3);
        let (status, r) = d.post(endpoint, &req);
        assert_eq!(status, 200, "{r}");
        let choices = r["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 3, "{r}");
        for (i, (choice, single)) in choices.iter().zip(&singles).enumerate() {
            assert_eq!(choice["index"], i, "{r}");
            assert_eq!(
                text_of(choice),
                text_of(&single["choices"][0]),
                "choice {i}"
            );
        }
        let texts: std::collections::HashSet<String> = choices.iter().map(text_of).collect();
        assert!(
            texts.len() > 1,
            "seeded differently, the samples differ: {r}"
        );
        let completion: u64 = (singles.iter())
            .map(|s| s["usage"]["completion_tokens"].as_u64().unwrap())
            .sum();
        assert_eq!(r["usage"]["completion_tokens"], completion, "{r}");
        assert_eq!(
            r["usage"]["prompt_tokens"],
            singles[0]["usage"]["prompt_tokens"]
        );

        // Streamed: the same texts by index, a finish for each, the usage once at the end.
        req["stream"] = json!(true);
        req["stream_options"] = json!({"include_usage": true});
        let chunks: Vec<Value> = d
            .stream(endpoint, &req)
            .filter(|e| e != "[DONE]")
            .map(|e| serde_json::from_str(&e).unwrap())
            .collect();
        let mut streamed = vec![String::new(); 3];
        let mut finishes = 0;
        for c in &chunks {
            assert_eq!(c["id"], chunks[0]["id"], "one id for every choice");
            let Some(choice) = c["choices"].get(0) else {
                continue;
            };
            let i = choice["index"].as_u64().unwrap() as usize;
            let piece = if chat_endpoint {
                &choice["delta"]["content"]
            } else {
                &choice["text"]
            };
            streamed[i].push_str(piece.as_str().unwrap_or_default());
            finishes += usize::from(!choice["finish_reason"].is_null());
        }
        let whole: Vec<String> = choices.iter().map(text_of).collect();
        assert_eq!(streamed, whole);
        assert_eq!(finishes, 3);
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"], r["usage"], "{last}");
    }
}

/// OpenAI's `logit_bias` reaches the sampler: -100 bans the greedy choice, +100 makes a token
/// the choice at every step; vLLM's `stop_token_ids` end the output after the token; an id
/// outside the vocabulary is a 400 naming the field.
#[test]
fn logit_bias_and_stop_token_ids_steer_the_real_sampler() {
    if !confinement_available() {
        return;
    }
    let d = qwen_daemon("");
    let model = "qwen3-4b-instruct-2507";
    let golden = crate::qwen3::golden_of("qwen3-tiny");
    // transformers' greedy tokens after the golden prompt.
    let case = &golden[0];
    let first = case["tokens"][0].as_u64().unwrap();
    let second = case["tokens"][1].as_u64().unwrap();
    let run = |bias: Value| -> Value {
        let body = json!({"model": model, "prompt": case["prompt"], "max_tokens": 6,
            "temperature": 0, "logprobs": 0, "logit_bias": bias});
        let (status, r) = d.post("/v1/completions", &body);
        assert_eq!(status, 200, "{r}");
        r["choices"][0].clone()
    };
    let text_of = |ids: Vec<u64>| -> Value {
        d.post("/detokenize", &json!({"model": model, "tokens": ids}))
            .1["prompt"]
            .clone()
    };
    let plain = run(json!({}));
    assert_eq!(plain["logprobs"]["tokens"][0], text_of(vec![first]));
    let banned = run(json!({first.to_string(): -100}));
    assert_ne!(
        banned["logprobs"]["tokens"][0], plain["logprobs"]["tokens"][0],
        "{banned}"
    );
    let forced = run(json!({second.to_string(): 100}));
    assert_eq!(forced["text"], text_of(vec![second; 6]), "{forced}");
    let (status, e) = d.post(
        "/v1/completions",
        &json!({"model": model, "prompt": "Hi", "logit_bias": {"99999999": 1}}),
    );
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["param"], "logit_bias");

    // vLLM's `stop_token_ids`: the output ends with the token, counted, its text shown only
    // with `include_stop_str_in_output`.
    let mut body = json!({"model": model, "prompt": case["prompt"], "max_tokens": 6,
        "temperature": 0, "stop_token_ids": [second]});
    let (status, r) = d.post("/v1/completions", &body);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["text"], text_of(vec![first]), "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert_eq!(r["usage"]["completion_tokens"], 2);
    body["include_stop_str_in_output"] = json!(true);
    let (_, r) = d.post("/v1/completions", &body);
    assert_eq!(r["choices"][0]["text"], text_of(vec![first, second]), "{r}");
    let (status, e) = d.post(
        "/v1/completions",
        &json!({"model": model, "prompt": "Hi", "stop_token_ids": [99999999]}),
    );
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["param"], "stop_token_ids");
}

#[test]
fn logprob_bytes_are_each_tokens_own_even_inside_a_character() {
    if !confinement_available() {
        return;
    }
    let d = qwen_daemon("");
    let mut req = chat("qwen3-4b-instruct-2507", "写一首关于大海的诗 🙂");
    req["max_tokens"] = json!(24);
    req["temperature"] = json!(0);
    req["logprobs"] = json!(true);
    req["top_logprobs"] = json!(5);
    // The tiny model draws special tokens (`<think>`), which the text would leave out.
    req["skip_special_tokens"] = json!(false);
    let (status, r) = d.post("/v1/chat/completions", &req);
    assert_eq!(status, 200, "{r}");
    let choice = &r["choices"][0];
    let entries = choice["logprobs"]["content"].as_array().expect("logprobs");
    let bytes_of = |e: &Value| -> Vec<u8> {
        e["bytes"]
            .as_array()
            .expect("bytes")
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect()
    };
    let mut partial = 0;
    for e in entries.iter().chain(
        entries
            .iter()
            .flat_map(|e| e["top_logprobs"].as_array().unwrap().iter()),
    ) {
        let bytes = bytes_of(e);
        assert!(!bytes.is_empty(), "every token has bytes: {e}");
        assert_eq!(e["token"], String::from_utf8_lossy(&bytes).as_ref(), "{e}");
        partial += usize::from(std::str::from_utf8(&bytes).is_err());
    }
    assert!(
        partial > 0,
        "the tiny vocabulary's byte tokens show up: {r}"
    );
    // The chosen tokens' bytes, joined, are the text (the end-of-turn token's are not text).
    let kept = match choice["finish_reason"].as_str() {
        Some("stop") => &entries[..entries.len() - 1],
        _ => &entries[..],
    };
    let joined: Vec<u8> = kept.iter().flat_map(bytes_of).collect();
    assert_eq!(
        String::from_utf8_lossy(&joined),
        choice["message"]["content"].as_str().unwrap(),
        "{r}"
    );
}

/// A request past its deadline is cancelled and answered 504; the worker, which honoured the
/// cancel, keeps serving the rest (with a batching engine, replacing it would fail every request
/// beside the late one).
#[test]
fn a_request_past_its_deadline_is_cancelled_without_replacing_the_worker() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(
        echo_dir("[model.options]\ndelay_ms = 100\n"),
        "[supervisor]\nrequest_timeout_secs = 1\n",
    );
    d.wait_ready();
    let pid = d.plugin("echo")["pid"].clone();
    let (status, r) = d.post("/v1/chat/completions", &chat("echo", &"x".repeat(50)));
    assert_eq!(
        (status, r["error"]["code"].as_str()),
        (504, Some("timeout")),
        "{r}"
    );
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("was cancelled"),
        "{r}"
    );
    // Past the grace a worker that ignored the cancel would have had.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let echo = d.plugin("echo");
    assert_eq!(
        (&echo["pid"], &echo["restarts"]),
        (&pid, &json!(0)),
        "{echo}"
    );
    assert_eq!(d.post("/v1/chat/completions", &chat("echo", "hi")).0, 200);
}

/// With more preloaded models than `max_loaded_models`, the daemon preloads what the cap holds
/// and is ready; a request for another model waits for the busy one to go idle, then is served.
#[test]
fn a_cap_below_the_preloaded_models_still_serves_them_all() {
    if !confinement_available() {
        return;
    }
    let dir = echo_dir("[model.options]\ndelay_ms = 50\n");
    dir.copy_lib("pio_test_plugin_hostile", "libhostile.so");
    dir.write(
        "hostile.toml",
        &manifest("hostile", "0.1.0", "libhostile.so", ""),
    );
    let config = "[server]\nmax_loaded_models = 1\nwarmup = false\n";
    let d = std::sync::Arc::new(Daemon::start(dir, config));
    // Ready with one of the two loaded (the first by name).
    d.wait_ready();
    assert_eq!(d.plugin("echo")["state"], "ready");
    assert_eq!(d.plugin("hostile")["state"], "unloaded");
    // Ask for the other while echo streams for about a second: it waits, then is served.
    let busy = {
        let d = d.clone();
        std::thread::spawn(move || d.post("/v1/chat/completions", &chat("echo", &"x".repeat(20))))
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (status, r) = d.post(
        "/v1/completions",
        &json!({"model": "hostile", "prompt": "status"}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(busy.join().unwrap().0, 200);
    assert_eq!(
        d.get("/ready").0,
        200,
        "echo, unloaded to make room, still counts"
    );
}

/// A plugin built against plugin-api 1.0 has no field for what 1.6 added: a chat that asks it to
/// continue the final message, or to ignore the end of sequence, is refused naming the field,
/// not answered as if it had not asked; a plain chat is served.
#[test]
fn a_plugin_built_before_a_field_refuses_it_by_name() {
    if !crate::worker::confinement_available() {
        return;
    }
    let dir = PluginDir::new();
    dir.copy_lib("pio_test_plugin_old_minor", "libold.so");
    dir.write("old.toml", &manifest("echo", "0.0.9", "libold.so", ""));
    let d = Daemon::start(dir, "[server]\nwarmup = false\n");
    d.wait_ready();
    let chat = |extra: Value| {
        let mut body = json!({"model": "echo", "messages": [
            {"role": "user", "content": "Write a haiku"},
            {"role": "assistant", "content": "Autumn moon"}
        ]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        d.post("/v1/chat/completions", &body)
    };
    for field in ["continue_final_message", "ignore_eos"] {
        let (status, r) = chat(json!({ field: true }));
        assert_eq!(status, 400, "{r}");
        assert_eq!(r["error"]["param"], field, "{r}");
        let message = r["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("plugin-api 1.0"), "{message}");
    }
    let (status, r) = chat(json!({}));
    assert_eq!(status, 200, "{r}");

    // Newer files that pass their checks but fail to load: 1.0 still serves, and requests
    // are still held to what 1.0 has (they were checked against the files on disk).
    d.dir.copy_lib("pio_plugin_echo", "libecho.so");
    let newer = "[model.options]\nload_error = \"weights unreadable\"\n";
    d.dir
        .write("echo.toml", &manifest("echo", "0.1.0", "libecho.so", newer));
    d.wait_for(30, "the newer version's failed load", |d| {
        d.plugin("echo")["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("weights unreadable"))
    });
    assert_eq!(d.plugin("echo")["version"], "0.0.9");
    let (status, r) = chat(json!({"continue_final_message": true}));
    assert_eq!(status, 400, "held to the library serving: {r}");
}

/// Requests waiting for their model to load count in its queue depth (an autoscaler read none
/// while a load on demand took its time).
#[test]
fn requests_waiting_for_a_load_count_in_the_queue_depth() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(
        echo_dir("[model.options]\nload_delay_ms = 4000\n"),
        "[server]\npreload = []\nwarmup = false\n",
    );
    d.wait_ready();
    std::thread::scope(|scope| {
        let asks: Vec<_> = (0..3)
            .map(|_| scope.spawn(|| d.post("/v1/chat/completions", &chat("echo", "hi")).0))
            .collect();
        d.wait_for(10, "three requests in the queue", |d| {
            d.metric("pio_queue_depth{model=\"echo\"}") == Some(3.0)
        });
        for ask in asks {
            assert_eq!(ask.join().unwrap(), 200);
        }
    });
    assert_eq!(d.metric("pio_queue_depth{model=\"echo\"}"), Some(0.0));
}
