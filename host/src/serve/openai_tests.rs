//! Unit tests of request parsing.
use super::*;
use serde_json::json;

fn caps(names: &[&str]) -> Capabilities {
    names.iter().fold(Capabilities::empty(), |c, n| {
        c.union(Capabilities::from_name(n).unwrap())
    })
}

#[test]
fn chat_fields_map_onto_the_plugin_request() {
    let body = json!({
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 9, "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9,
        "top_k": -1, "min_p": 0.1, "seed": -1, "stop": "END", "presence_penalty": 0.5,
        "frequency_penalty": -0.5, "logprobs": true, "top_logprobs": 2, "user": "ignored",
        "chat_template_kwargs": {"enable_thinking": false}, "stream": true,
        "stream_options": {"include_usage": true},
    });
    let p = parse(
        &body,
        Endpoint::Chat,
        caps(&["chat", "logprobs"]),
        &Limits::default(),
    )
    .unwrap();
    let r = &p.request;
    assert_eq!(
        (r.max_tokens, r.temperature, r.top_p, r.top_k),
        (Some(7), Some(0.5), Some(0.9), None)
    );
    assert_eq!(
        (r.min_p, r.seed, r.logprobs),
        (Some(0.1), Some(u64::MAX), Some(2))
    );
    assert_eq!(r.stop, vec!["END".to_string()]);
    assert_eq!(r.chat_template_kwargs["enable_thinking"], json!(false));
    assert!(p.stream && p.include_usage && p.logprobs == LogprobsFormat::Chat);
    assert!(matches!(&r.prompt, Prompt::Messages(m) if m.len() == 1));
}

#[test]
fn tools_follow_tool_choice_and_the_capability() {
    let tools = json!([{"type": "function", "function": {"name": "f"}}]);
    let body = |choice: Value| json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": tools, "tool_choice": choice});
    let with_tools = caps(&["chat", "tools"]);
    let p = parse(
        &body(json!("auto")),
        Endpoint::Chat,
        with_tools,
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(p.request.tools.map(|t| t.len()), Some(1));
    let p = parse(
        &body(json!("none")),
        Endpoint::Chat,
        caps(&["chat"]),
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(p.request.tools, None);
    let e = parse(
        &body(json!("required")),
        Endpoint::Chat,
        with_tools,
        &Limits::default(),
    )
    .unwrap_err();
    assert_eq!(e.param.as_deref(), Some("tool_choice"));
    let e = parse(
        &body(json!("auto")),
        Endpoint::Chat,
        caps(&["chat"]),
        &Limits::default(),
    )
    .unwrap_err();
    assert_eq!(e.param.as_deref(), Some("tools"));
}

#[test]
fn completion_prompts_and_limits() {
    let limits = Limits {
        max_tokens: 50,
        image_root: None,
    };
    let p = parse(
        &json!({"model": "m", "prompt": ["one"]}),
        Endpoint::Completions,
        Capabilities::empty(),
        &limits,
    )
    .unwrap();
    assert_eq!(p.request.prompt, Prompt::Text("one".into()));
    assert_eq!(p.request.max_tokens, Some(50), "the cap is the default");
    for (body, param) in [
        (json!({"model": "m", "prompt": [1, 2, 3]}), "prompt"),
        (json!({"model": "m", "prompt": ["a", "b"]}), "prompt"),
        (json!({"model": "m", "prompt": "x", "echo": true}), "echo"),
        (
            json!({"model": "m", "prompt": "x", "max_tokens": 51}),
            "max_tokens",
        ),
        (
            json!({"model": "m", "prompt": "x", "max_tokens": "many"}),
            "max_tokens",
        ),
        (
            json!({"model": "m", "prompt": "x", "logprobs": 9}),
            "logprobs",
        ),
        (json!({"model": "m", "prompt": "x", "top_k": -5}), "top_k"),
    ] {
        let e = parse(&body, Endpoint::Completions, caps(&["logprobs"]), &limits).unwrap_err();
        assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
    }
}
