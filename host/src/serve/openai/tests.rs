//! Unit tests of request parsing.
use super::*;
use pio_plugin_api::wire::Prompt;
use serde_json::json;

/// `body` with `extra`'s fields added.
fn with(mut body: Value, extra: Value) -> Value {
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

/// Asserts `got` is a refusal naming `param`, its message holding `words`.
fn assert_refused(got: Result<Parsed, ApiError>, param: &str, words: &str) {
    let e = got.unwrap_err();
    assert_eq!(e.param.as_deref(), Some(param), "{}", e.message);
    assert!(e.message.contains(words), "{param}: {}", e.message);
}

/// `body` parsed for `endpoint` under the default limits.
fn parse_default(
    body: &Value,
    endpoint: Endpoint,
    capabilities: Capabilities,
) -> Result<Parsed, ApiError> {
    parse(body, endpoint, capabilities, &Limits::default())
}

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
    let p = parse_default(&body, Endpoint::Chat, caps(&["chat", "logprobs"])).unwrap();
    let r = &p.request;
    assert_eq!(
        (r.max_tokens, r.temperature, r.top_p, r.top_k),
        (Some(7), Some(0.5), Some(0.9), Some(0)),
        "-1: no cut-off, the model's default one included"
    );
    assert_eq!(
        (r.min_p, r.seed, r.logprobs),
        (Some(0.1), Some(u64::MAX), Some(2))
    );
    assert_eq!(r.stop, vec!["END".to_string()]);
    assert_eq!(r.chat_template_kwargs["enable_thinking"], json!(false));
    assert!(p.stream && p.include_usage && p.logprobs == LogprobsFormat::Chat);
    assert!(matches!(&r.prompt, Prompt::Messages(m) if m.len() == 1));
    assert!(!p.single_call);

    // The same request with `extra`'s fields.
    let varied = |extra: Value| {
        parse(
            &with(body.clone(), extra),
            Endpoint::Chat,
            caps(&["chat", "logprobs"]),
            &Limits::default(),
        )
    };
    // Stop strings are bounded in number and length (each is matched against every token).
    for stop in [json!(vec!["x"; 65]), json!(["y".repeat(1025)])] {
        let e = varied(json!({ "stop": stop })).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stop"));
    }

    // Usage options on an answer that is not streamed are a mistake, as OpenAI and vLLM say.
    let e = varied(json!({"stream": false})).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("stream_options"));
    // An empty object asks for nothing: taken, as vLLM takes it.
    assert!(varied(json!({"stream": false, "stream_options": {}})).is_ok());
    let p = varied(json!({"parallel_tool_calls": false})).unwrap();
    assert!(p.single_call);
}

#[test]
fn tools_follow_tool_choice_and_the_capability() {
    let tools = json!([{"type": "function", "function": {"name": "f"}}]);
    let body = |choice: Value| json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": tools, "tool_choice": choice});
    let with_tools = caps(&["chat", "tools"]);
    let p = parse_default(&body(json!("auto")), Endpoint::Chat, with_tools).unwrap();
    assert_eq!(p.request.tools.map(|t| t.len()), Some(1));
    let p = parse_default(&body(json!("none")), Endpoint::Chat, caps(&["chat"])).unwrap();
    assert_eq!(p.request.tools, None);
    let e = parse_default(&body(json!("required")), Endpoint::Chat, with_tools).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("tool_choice"));
    let e = parse_default(&body(json!("auto")), Endpoint::Chat, caps(&["chat"])).unwrap_err();
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
        caps(&["text"]),
        &limits,
    )
    .unwrap();
    assert_eq!(p.request.prompt, Prompt::Text("one".into()));
    assert_eq!(
        p.request.max_tokens,
        Some(COMPLETIONS_MAX_TOKENS),
        "completions default to OpenAI's 16, inside the cap"
    );
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let p = parse(&chat, Endpoint::Chat, caps(&["chat"]), &limits).unwrap();
    assert_eq!(
        p.request.max_tokens,
        Some(50),
        "the cap is a chat's default"
    );
    let p = parse_default(&chat, Endpoint::Chat, caps(&["chat"])).unwrap();
    assert_eq!(
        p.request.max_tokens, None,
        "no cap: a chat runs to the context"
    );
    let small = Limits {
        max_tokens: 10,
        image_root: None,
    };
    let prompt = json!({"model": "m", "prompt": "x"});
    let p = parse(&prompt, Endpoint::Completions, caps(&["text"]), &small).unwrap();
    assert_eq!(
        p.request.max_tokens,
        Some(10),
        "the default is held to the cap"
    );
    let min = json!({"model": "m", "prompt": "x", "min_tokens": 20});
    let mut p = parse(&min, Endpoint::Completions, caps(&["text"]), &limits).unwrap();
    let e = default_limit(&mut p, None, &limits).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("min_tokens"), "{}", e.message);
    assert!(e.message.contains("the default"), "{}", e.message);
    let mut p = parse(&min, Endpoint::Completions, caps(&["text"]), &limits).unwrap();
    default_limit(&mut p, Some(40), &limits).expect("the operator's 40 leaves room for 20");
    for (body, param) in [
        (json!({"model": "m", "prompt": [1, 2, 3]}), "prompt"),
        (json!({"model": "m", "prompt": ["a", 7]}), "prompt[0]"),
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
        let text = caps(&["text", "logprobs"]);
        let e = parse(&body, Endpoint::Completions, text, &limits).unwrap_err();
        assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
    }
}

#[test]
fn tool_choice_forces_calls_to_offered_tools_on_models_that_constrain_output() {
    let tools = json!([
        {"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "b"}},
    ]);
    let chat = |extra: serde_json::Value| {
        with(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
            extra,
        )
    };
    let all = caps(&["chat", "tools", "structured_output"]);
    let parsed = |extra| parse_default(&chat(extra), Endpoint::Chat, all);
    let p = parsed(json!({"tools": tools, "tool_choice": "required"})).unwrap();
    assert_eq!(
        p.structure,
        Some(Structure::ToolCalls {
            name: None,
            parallel: true
        })
    );
    let p =
        parsed(json!({"tools": tools, "tool_choice": "required", "parallel_tool_calls": false}))
            .unwrap();
    assert!(matches!(
        p.structure,
        Some(Structure::ToolCalls {
            parallel: false,
            ..
        })
    ));
    let named = json!({"type": "function", "function": {"name": "b"}});
    let p = parsed(json!({"tools": tools, "tool_choice": named})).unwrap();
    assert_eq!(
        p.structure,
        Some(Structure::ToolCalls {
            name: Some("b".into()),
            parallel: false
        })
    );
    assert_eq!(parsed(json!({"tools": tools})).unwrap().structure, None);
    // "auto" with an empty list, or "none" with no tools, asks nothing wrong.
    assert!(parsed(json!({"tools": [], "tool_choice": "auto"})).is_ok());
    assert!(parsed(json!({"tool_choice": "none"})).is_ok());
    // `none`: the tools are shown, no call is forced or taken out.
    let none = parsed(json!({"tools": tools, "tool_choice": "none"})).unwrap();
    assert!(none.structure.is_none() && none.request.tools.is_some() && !none.calls_parsed);
    for (extra, param, needle) in [
        (
            json!({"tool_choice": "required"}),
            "tool_choice",
            "no `tools`",
        ),
        (
            json!({"tool_choice": "auto"}),
            "tool_choice",
            "only allowed with `tools`",
        ),
        (
            json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "z"}}}),
            "tool_choice.function.name",
            "`z`",
        ),
        (
            json!({"tools": tools, "tool_choice": "always"}),
            "tool_choice",
            "\"required\"",
        ),
        (
            json!({"tools": tools, "tool_choice": "required", "response_format": {"type": "json_object"}}),
            "tool_choice",
            "response_format",
        ),
    ] {
        let e = parsed(extra.clone()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some(param), "{extra}: {}", e.message);
        assert!(e.message.contains(needle), "{}", e.message);
    }
    let plain = caps(&["chat", "tools"]);
    let e = parse_default(
        &chat(json!({"response_format": {"type": "json_object"}})),
        Endpoint::Chat,
        plain,
    )
    .unwrap_err();
    assert_eq!(e.param.as_deref(), Some("response_format"));
    assert!(e.message.contains("does not declare"), "{}", e.message);
    let completion = json!({"model": "m", "prompt": "x", "guided_regex": "[0-9]+"});
    let p = parse_default(
        &completion,
        Endpoint::Completions,
        caps(&["text", "structured_output"]),
    )
    .unwrap();
    assert!(matches!(
        p.structure,
        Some(Structure::Grammar {
            field: "guided_regex",
            ..
        })
    ));
}

#[test]
fn vllm_min_tokens_and_ignore_eos_reach_the_plugin_checked() {
    let parse_completion = |extra: Value| {
        let body = with(
            json!({"model": "m", "prompt": "hi", "max_tokens": 8}),
            extra,
        );
        let caps = caps(&["text", "structured_output"]);
        parse_default(&body, Endpoint::Completions, caps)
    };
    let p = parse_completion(json!({"min_tokens": 3, "ignore_eos": true})).unwrap();
    assert_eq!(
        (p.request.min_tokens, p.request.ignore_eos),
        (Some(3), true)
    );
    let p = parse_completion(json!({})).unwrap();
    assert_eq!((p.request.min_tokens, p.request.ignore_eos), (None, false));
    let e = parse_completion(json!({"min_tokens": 9})).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("min_tokens"), "{e}");
    let e = parse_completion(json!({"ignore_eos": true, "guided_regex": "a+"})).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("ignore_eos"), "{e}");
    let e = parse_completion(json!({"min_tokens": 2, "guided_regex": "a+"})).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("min_tokens"), "{e}");
}

#[test]
fn a_chat_can_continue_its_final_message_or_leave_the_turn_closed() {
    let chat = |extra: Value| {
        let body = with(
            json!({"model": "m", "messages": [
                {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]}),
            extra,
        );
        parse_default(&body, Endpoint::Chat, caps(&["chat"]))
    };
    let r = chat(json!({"continue_final_message": true}))
        .unwrap()
        .request;
    assert_eq!(
        (r.continue_final_message, r.add_generation_prompt),
        (true, None)
    );
    let r = chat(json!({"add_generation_prompt": false}))
        .unwrap()
        .request;
    assert_eq!(
        (r.continue_final_message, r.add_generation_prompt),
        (false, Some(false))
    );
    let both = json!({"continue_final_message": true, "add_generation_prompt": true});
    let e = chat(both).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("continue_final_message"), "{e}");
}

#[test]
fn a_missing_field_is_named() {
    let body = json!({"model": "m"});
    let e = parse_default(&body, Endpoint::Completions, caps(&["text"])).unwrap_err();
    assert_eq!(
        (e.param.as_deref(), e.message.as_str()),
        (Some("prompt"), "`prompt` is required")
    );
    let e = parse_default(&body, Endpoint::Chat, caps(&["chat"])).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("messages"), "{e}");
}

#[test]
fn the_stop_string_can_end_the_output() {
    let body =
        json!({"model": "m", "prompt": "hi", "stop": ["\n"], "include_stop_str_in_output": true});
    let p = parse_default(&body, Endpoint::Completions, caps(&["text"])).unwrap();
    assert!(p.request.include_stop_str_in_output);
}

/// Each endpoint needs its capability: messages go only to a plugin that declares chat, a raw
/// prompt only to one that declares text completion; the error says where to go instead.
#[test]
fn each_endpoint_needs_its_capability() {
    let limits = Limits::default();
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let completion = json!({"model": "m", "prompt": "hi"});
    let e = parse(&chat, Endpoint::Chat, caps(&["text"]), &limits).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("messages"));
    assert!(e.message.contains("/v1/completions"), "{}", e.message);
    let e = parse(&completion, Endpoint::Completions, caps(&["chat"]), &limits).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("prompt"));
    assert!(e.message.contains("/v1/chat/completions"), "{}", e.message);
    assert!(parse(&chat, Endpoint::Chat, caps(&["chat"]), &limits).is_ok());
    assert!(parse(&completion, Endpoint::Completions, caps(&["text"]), &limits).is_ok());
}

/// Seeds are taken signed or not, as vLLM takes them (-2^63 to 2^64 - 1), as their 64 bits; past
/// that range, or a fraction, is refused saying the range.
#[test]
fn seeds_signed_or_not_are_their_bits() {
    let limits = Limits::default();
    let seeded = |seed: Value| {
        let body = json!({"model": "m", "prompt": "x", "seed": seed});
        parse(&body, Endpoint::Completions, caps(&["text"]), &limits)
    };
    assert_eq!(seeded(json!(-1)).unwrap().request.seed, Some(u64::MAX));
    assert_eq!(
        seeded(json!(u64::MAX)).unwrap().request.seed,
        Some(u64::MAX)
    );
    assert_eq!(seeded(json!(7)).unwrap().request.seed, Some(7));
    assert_eq!(seeded(Value::Null).unwrap().request.seed, None);
    for bad in [json!(18446744073709551616.0), json!(1.5)] {
        let e = seeded(bad.clone()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("seed"), "{bad}: {}", e.message);
        assert!(
            e.message.contains("-2^63 to 2^64 - 1"),
            "{bad}: {}",
            e.message
        );
    }
}

/// vLLM's fields that would change the answer and are not implemented get a 400 naming them,
/// on both endpoints; `skip_special_tokens` defaults to true.
#[test]
fn unimplemented_vllm_fields_are_refused_by_name() {
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let prompt = json!({"model": "m", "prompt": "hi"});
    for (extra, param) in [
        (json!({"best_of": 2}), "best_of"),
        (json!({"prompt_logprobs": 1}), "prompt_logprobs"),
        (json!({"use_beam_search": true}), "use_beam_search"),
        (json!({"chat_template": "{{ messages }}"}), "chat_template"),
        (
            json!({"mm_processor_kwargs": {"max_pixels": 4}}),
            "mm_processor_kwargs",
        ),
        (
            json!({"return_tokens_as_token_ids": true}),
            "return_tokens_as_token_ids",
        ),
        (
            json!({"stream": true, "stream_options": {"continuous_usage_stats": true}}),
            "stream_options.continuous_usage_stats",
        ),
        (json!({"allowed_token_ids": [1, 2]}), "allowed_token_ids"),
        (json!({"bad_words": ["x"]}), "bad_words"),
        (
            json!({"truncate_prompt_tokens": 8}),
            "truncate_prompt_tokens",
        ),
    ] {
        for (base, endpoint, cap) in [
            (&chat, Endpoint::Chat, "chat"),
            (&prompt, Endpoint::Completions, "text"),
        ] {
            let body = with(base.clone(), extra.clone());
            let e = parse(&body, endpoint, caps(&[cap]), &Limits::default()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
    }
    let mut harmless = chat.clone();
    harmless["best_of"] = json!(1);
    harmless["stop_token_ids"] = json!([]);
    harmless["prompt_logprobs"] = Value::Null;
    harmless["allowed_token_ids"] = Value::Null;
    harmless["bad_words"] = json!([]);
    harmless["truncate_prompt_tokens"] = Value::Null;
    let p = parse_default(&harmless, Endpoint::Chat, caps(&["chat"])).unwrap();
    assert!(p.skip_special_tokens, "vLLM's default");
    harmless["skip_special_tokens"] = json!(false);
    let p = parse_default(&harmless, Endpoint::Chat, caps(&["chat"])).unwrap();
    assert!(!p.skip_special_tokens);
}

/// Type errors speak JSON, not Rust; a limit given as `max_completion_tokens` is blamed on it;
/// a prompt of the wrong type is not called a token array.
#[test]
fn errors_name_the_field_the_client_wrote_in_its_words() {
    let chat = |extra: Value| {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        parse(
            &with(body, extra),
            Endpoint::Chat,
            caps(&["chat"]),
            &Limits::default(),
        )
        .unwrap_err()
    };
    let e = chat(json!({"max_completion_tokens": 0}));
    assert_eq!(
        e.param.as_deref(),
        Some("max_completion_tokens"),
        "{}",
        e.message
    );
    assert!(
        e.message.contains("`max_completion_tokens`"),
        "{}",
        e.message
    );
    let e = chat(json!({"stop": 5}));
    assert!(
        e.message.contains("a string or a list of strings"),
        "{}",
        e.message
    );
    let e = chat(json!({"max_tokens": "many"}));
    assert!(
        e.message.contains("a whole number") && !e.message.contains("u32"),
        "{}",
        e.message
    );
    let e = chat(json!({"temperature": "hot"}));
    assert!(!e.message.contains("f32"), "{}", e.message);
    let prompt = |p: Value| {
        let body = json!({"model": "m", "prompt": p});
        parse_default(&body, Endpoint::Completions, caps(&["text"])).unwrap_err()
    };
    assert!(prompt(Value::Null)
        .message
        .contains("a string, a list of token ids, or a list of either"));
    assert!(prompt(json!([1, 2])).message.contains("`token_prompts`"));
}

/// The manifest's generation default replaces the API's 16 (and a chat's run to the context) for
/// a request that names no limit, held to the server's limit; a limit the client named stays.
#[test]
fn the_operators_default_beats_the_apis() {
    let limits = Limits {
        max_tokens: 50,
        image_root: None,
    };
    let parsed =
        |body: Value| parse(&body, Endpoint::Completions, caps(&["text"]), &limits).unwrap();
    let mut p = parsed(json!({"model": "m", "prompt": "x"}));
    default_limit(&mut p, Some(40), &limits).unwrap();
    assert_eq!(p.request.max_tokens, Some(40));
    default_limit(&mut p, Some(400), &limits).unwrap();
    assert_eq!(p.request.max_tokens, Some(50), "held to the server's limit");
    let mut p = parsed(json!({"model": "m", "prompt": "x", "max_tokens": 3}));
    default_limit(&mut p, Some(40), &limits).unwrap();
    assert_eq!(p.request.max_tokens, Some(3), "the client's own limit");
    // A chat whose operator's default is below its min_tokens is refused, not sent on.
    let chat =
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "min_tokens": 100});
    let mut p = parse_default(&chat, Endpoint::Chat, caps(&["chat"])).unwrap();
    let e = default_limit(&mut p, Some(50), &Limits::default()).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("min_tokens"), "{}", e.message);
}

/// `logit_bias` and `stop_token_ids` reach the plugin request of a plugin that declares them
/// (ids in order, each once), are refused by name for one that does not, and are checked.
#[test]
fn logit_bias_and_stop_token_ids_go_to_plugins_that_take_them() {
    let body = json!({"model": "m", "prompt": "hi", "logit_bias": {"7": -100, "3": 2.5},
        "stop_token_ids": [4, 5]});
    let all = caps(&["text", "logit_bias", "stop_token_ids"]);
    let p = parse_default(&body, Endpoint::Completions, all).unwrap();
    assert_eq!(p.request.logit_bias, vec![(3, 2.5), (7, -100.0)]);
    assert_eq!(p.request.stop_token_ids, vec![4, 5]);
    for (without, param) in [
        ("stop_token_ids", "logit_bias"),
        ("logit_bias", "stop_token_ids"),
    ] {
        let e = parse_default(&body, Endpoint::Completions, caps(&["text", without])).unwrap_err();
        assert_eq!(e.param.as_deref(), Some(param), "{}", e.message);
    }
    for n in [json!(-1), json!(0), json!(129)] {
        let body = json!({"model": "m", "prompt": "hi", "n": n});
        let e = parse_default(&body, Endpoint::Completions, all).unwrap_err();
        assert!(e.message.contains("from 1 to 128"), "{n}: {}", e.message);
    }
    let many: Vec<u32> = (0..1025).collect();
    let body = json!({"model": "m", "prompt": "hi", "stop_token_ids": many});
    let e = parse_default(&body, Endpoint::Completions, all).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("stop_token_ids"), "{}", e.message);
    let repeated = json!({"model": "m", "prompt": "hi", "stop_token_ids": [9, 2, 9]});
    let p = parse_default(&repeated, Endpoint::Completions, all).unwrap();
    assert_eq!(p.request.stop_token_ids, vec![2, 9]);
    for bad in [json!({"x": 1}), json!({"1": 101}), json!({"1": "a"})] {
        let body = json!({"model": "m", "prompt": "hi", "logit_bias": bad});
        let e = parse_default(&body, Endpoint::Completions, all).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("logit_bias"), "{}", e.message);
    }
}

/// Completions take token ids and echo the prompt; both endpoints take vLLM's
/// `prompt_logprobs`, which a stream cannot carry (its scores come at the end).
#[test]
fn token_prompts_echo_and_prompt_logprobs() {
    let all = caps(&[
        "text",
        "chat",
        "logprobs",
        "prompt_logprobs",
        "token_prompts",
    ]);
    let completion = |extra: Value| {
        let body = with(json!({"model": "m", "prompt": "hi"}), extra);
        parse_default(&body, Endpoint::Completions, all)
    };
    for ids in [json!([5, 6]), json!([[5, 6]])] {
        let p = completion(json!({"prompt": ids})).unwrap();
        assert_eq!(p.request.prompt, Prompt::Tokens(vec![5, 6]), "{ids}");
    }
    let p = completion(json!({"prompt": ["hi"]})).unwrap();
    assert_eq!(p.request.prompt, Prompt::Text("hi".into()));
    // Several prompts: `n` choices each, numbered prompt by prompt; the seeds start again.
    let p = completion(json!({"prompt": ["a", [7, 8], "c"], "n": 2, "seed": 5})).unwrap();
    assert_eq!(p.choices(), 6);
    let prompts: Vec<Prompt> = (0..6).map(|i| p.choice(i).prompt).collect();
    let (a, ids, c) = (
        Prompt::Text("a".into()),
        Prompt::Tokens(vec![7, 8]),
        Prompt::Text("c".into()),
    );
    assert_eq!(prompts, [a.clone(), a, ids.clone(), ids, c.clone(), c]);
    let seeds: Vec<Option<u64>> = (0..6).map(|i| p.choice(i).seed).collect();
    assert_eq!(
        seeds,
        [Some(5), Some(6), Some(5), Some(6), Some(5), Some(6)]
    );
    assert!(p.counts_prompt(2) && !p.counts_prompt(3));
    let scored = completion(json!({"prompt": ["a", "b"], "n": 2, "prompt_logprobs": 1})).unwrap();
    let asks: Vec<Option<u32>> = (0..4).map(|i| scored.choice(i).prompt_logprobs).collect();
    assert_eq!(
        asks,
        [Some(1), None, Some(1), None],
        "each prompt scored once"
    );
    let p = completion(json!({"echo": true, "logprobs": 2})).unwrap();
    assert_eq!(
        p.request.prompt_logprobs,
        Some(2),
        "echo scores with logprobs' k"
    );
    assert!(p.shown.echo && p.shown.logprobs.is_none());
    assert_eq!(p.shown.echo_top, Some(2));
    let p = completion(json!({"echo": true, "max_tokens": 0})).unwrap();
    assert!(
        p.shown.echo_only,
        "echo alone, as OpenAI's old scoring asks"
    );
    assert_eq!(p.request.max_tokens, Some(1), "one token run and left out");
    let e = completion(json!({"max_tokens": 0})).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("max_tokens"), "{}", e.message);
    let asked = completion(json!({"echo": true, "max_tokens": 0, "min_tokens": 3}));
    assert_refused(asked, "min_tokens", "`max_tokens` (0)");
    let p = completion(json!({"echo": true, "stream": true})).unwrap();
    assert_eq!(p.request.prompt_logprobs, None, "echo alone scores nothing");
    assert!(p.shown.echo);
    let both = json!({"echo": true, "logprobs": 1, "prompt_logprobs": 3});
    let p = completion(both).unwrap();
    assert_eq!(p.request.prompt_logprobs, Some(3), "the most either asks");
    assert_eq!((p.shown.echo_top, p.shown.logprobs), (Some(1), Some(3)));
    let chat =
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 0});
    let p = parse_default(&chat, Endpoint::Chat, all).unwrap();
    assert_eq!(p.request.prompt_logprobs, Some(0));
    assert!(p.shown.logprobs == Some(0) && !p.shown.echo);
    for (extra, param, words) in [
        (json!({"prompt": [1, -2]}), "prompt[1]", "token id"),
        (json!({"prompt": []}), "prompt", "must not be empty"),
        (
            json!({"prompt": [[1], []]}),
            "prompt[1]",
            "must not be empty",
        ),
        (json!({"prompt": [1, "a"]}), "prompt[1]", "token id"),
        (json!({"prompt_logprobs": 21}), "prompt_logprobs", "0 to 20"),
        (
            json!({"prompt_logprobs": -1}),
            "prompt_logprobs",
            "whole vocabulary",
        ),
        (
            json!({"prompt_logprobs": 1, "stream": true}),
            "prompt_logprobs",
            "stream",
        ),
    ] {
        assert_refused(completion(extra), param, words);
    }
    // `echo` with `logprobs` on a stream: the prompts scored apart, first; the stream's own
    // runs unscored.
    let p = completion(json!({"echo": true, "logprobs": 2, "stream": true})).unwrap();
    assert!(p.shown.scored_apart && p.shown.echo_top == Some(2));
    assert_eq!(p.request.prompt_logprobs, None);
    // A plugin that does not declare scoring or token prompts gets neither.
    let older = caps(&["text", "logprobs"]);
    for (extra, param, capability) in [
        (
            json!({"echo": true, "logprobs": 1}),
            "echo",
            "`prompt_logprobs`",
        ),
        (
            json!({"echo": true, "logprobs": 1, "stream": true}),
            "echo",
            "`prompt_logprobs`",
        ),
        (
            json!({"prompt_logprobs": 1}),
            "prompt_logprobs",
            "`prompt_logprobs`",
        ),
        (json!({"prompt": [1, 2]}), "prompt", "`token_prompts`"),
    ] {
        let body = with(json!({"model": "m", "prompt": "hi"}), extra);
        let got = parse_default(&body, Endpoint::Completions, older);
        assert_refused(got, param, capability);
    }
    let echo = with(json!({"model": "m", "prompt": "hi"}), json!({"echo": true}));
    assert!(parse_default(&echo, Endpoint::Completions, older).is_ok());
}

/// OpenAI's deprecated `functions` and `function_call` are refused by name, saying what to send
/// instead (ignored, the model would answer without the functions it was given).
#[test]
fn deprecated_functions_are_refused_naming_tools() {
    let chat = |extra: Value| {
        let body = with(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
            extra,
        );
        parse_default(&body, Endpoint::Chat, caps(&["chat", "tools"]))
    };
    assert_refused(
        chat(json!({"functions": [{"name": "f"}]})),
        "functions",
        "`tools`",
    );
    assert_refused(
        chat(json!({"function_call": "auto"})),
        "function_call",
        "`tool_choice`",
    );
    // vLLM's chat echo.
    assert_refused(chat(json!({"echo": true})), "echo", "echo");
    assert!(chat(json!({"functions": null, "echo": false})).is_ok());
}

/// In a request of several prompts, an error about a prompt names it; one about the whole
/// request (a `logit_bias` id) is left as it is, whichever choice failed first.
#[test]
fn errors_name_the_prompt_they_are_about() {
    use crate::fault::Fault;
    use crate::protocol::WireError;
    use crate::serve::error::ApiError;
    let body = json!({"model": "m", "prompt": ["a", "b"], "n": 2});
    let p = parse_default(&body, Endpoint::Completions, caps(&["text"])).unwrap();
    let vocab = WireError::new(
        Fault::InvalidInput,
        "prompt: token 9 is not in the vocabulary",
    );
    let e = ApiError::of_choice(vocab.clone(), &p, 3);
    assert_eq!(e.param.as_deref(), Some("prompt[1]"), "{}", e.message);
    assert!(
        e.message.starts_with("prompt[1]: prompt: token 9"),
        "{}",
        e.message
    );
    let bias = WireError::new(
        Fault::InvalidInput,
        "logit_bias: token 9 is not in the vocabulary",
    );
    let e = ApiError::of_choice(bias, &p, 3);
    assert_eq!(e.param.as_deref(), Some("logit_bias"), "{}", e.message);
    assert!(e.message.starts_with("logit_bias"), "{}", e.message);
    let one = json!({"model": "m", "prompt": "a"});
    let p = parse_default(&one, Endpoint::Completions, caps(&["text"])).unwrap();
    assert_eq!(
        ApiError::of_choice(vocab, &p, 0).param.as_deref(),
        Some("prompt")
    );
}

#[test]
fn model_may_be_left_out_only_when_one_is_served() {
    let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut unnamed = json!({"prompt": "a"});
    let e = model_of(&mut unnamed, || names(&["a", "b"])).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("model"));
    assert!(e.message.contains("2 models (a, b)"), "{}", e.message);
    let e = model_of(&mut unnamed, Vec::new).unwrap_err();
    assert!(e.message.contains("no model is served"), "{}", e.message);
    assert_eq!(model_of(&mut unnamed, || names(&["m"])).unwrap(), "m");
    // Written in, so that the parse finds it.
    assert_eq!(unnamed["model"], "m");
    parse_default(&unnamed, Endpoint::Completions, caps(&["text"])).unwrap();
    // `null` is taken as left out (lm-eval sends it; vLLM accepts it).
    let mut null = json!({"model": null, "prompt": "a"});
    assert_eq!(model_of(&mut null, || names(&["m"])).unwrap(), "m");
    assert_eq!(null["model"], "m");
    // A named model is taken as named, even one not served (the lookup answers 404).
    let mut named = json!({"model": "x", "prompt": "a"});
    assert_eq!(model_of(&mut named, || names(&["m"])).unwrap(), "x");
    let e = model_of(&mut json!({"model": ""}), || names(&["m"])).unwrap_err();
    assert!(e.message.contains("non-empty"), "{}", e.message);
}

/// A plugin built against plugin-api 1.0–1.5 has no field for what 1.6 added: a request that
/// asks for one is refused naming it, not answered as if it had not asked; 1.6 and later, and a
/// request that asks for none, pass.
#[test]
fn fields_an_older_plugin_would_drop_are_refused() {
    let asked = |f: &dyn Fn(&mut InferRequest)| {
        let mut r = InferRequest::default();
        f(&mut r);
        r
    };
    let cases: [(&str, InferRequest); 5] = [
        ("min_tokens", asked(&|r| r.min_tokens = Some(3))),
        ("ignore_eos", asked(&|r| r.ignore_eos = true)),
        (
            "include_stop_str_in_output",
            asked(&|r| r.include_stop_str_in_output = true),
        ),
        (
            "add_generation_prompt",
            asked(&|r| r.add_generation_prompt = Some(false)),
        ),
        (
            "continue_final_message",
            asked(&|r| r.continue_final_message = true),
        ),
    ];
    for (field, request) in &cases {
        let e = older_plugin(request, "m", "1.5.2").unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{field}");
        assert!(
            e.message.contains(field) && e.message.contains("1.5.2"),
            "{field}: {}",
            e.message
        );
        assert!(older_plugin(request, "m", "1.6.0").is_ok(), "{field}");
        assert!(older_plugin(request, "m", "1.11.0").is_ok(), "{field}");
    }
    let plain = asked(&|r| r.add_generation_prompt = Some(true));
    assert!(older_plugin(&plain, "m", "1.0.0").is_ok());
}
