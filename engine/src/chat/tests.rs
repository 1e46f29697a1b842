use super::*;

fn render(source: &str, message: &str) -> String {
    let m: Json = serde_json::from_str(message).unwrap();
    ChatTemplate::new(source, None, None)
        .render(&[m], None, false, &Map::new())
        .unwrap()
}

#[test]
fn tojson_spaces_like_python_and_keeps_unicode_and_order() {
    let m = r#"{"name": "f", "arguments": {"city": "Zürich", "n": [1, 2.5]}}"#;
    assert_eq!(render("{{ messages[0] | tojson }}", m), m);
    let indented = render("{{ messages[0] | tojson(indent=2) }}", m);
    assert!(
        indented.starts_with("{\n  \"name\": \"f\",\n  \"arguments\": {\n    \"city\""),
        "{indented}"
    );
    let ascii = render(
        "{{ messages[0] | tojson(ensure_ascii=True, sort_keys=True) }}",
        m,
    );
    assert_eq!(
        ascii,
        r#"{"arguments": {"city": "Z\u00fcrich", "n": [1, 2.5]}, "name": "f"}"#
    );
    // Python's positional order, as transformers' filter takes them: ensure_ascii, indent.
    assert_eq!(
        render("{{ messages[0] | tojson(True) }}", m),
        m.replace('ü', "\\u00fc")
    );
    assert_eq!(render("{{ messages[0] | tojson(False, 2) }}", m), indented);
    let compact = render("{{ messages[0] | tojson(separators=(',', ':')) }}", m);
    assert_eq!(
        compact,
        r#"{"name":"f","arguments":{"city":"Zürich","n":[1,2.5]}}"#
    );
}

#[test]
fn none_is_not_iterable_as_in_jinja2() {
    let t = ChatTemplate::new(
        "{{ tools is iterable }} {{ messages is iterable }}",
        None,
        None,
    );
    assert_eq!(
        t.render(&[], None, false, &Map::new()).unwrap(),
        "False True",
        "rendered as Jinja2 renders Python booleans"
    );
}

#[test]
fn raise_exception_fails_the_render_with_its_message() {
    let t = ChatTemplate::new("{{ raise_exception('no system messages') }}", None, None);
    let e = t.render(&[], None, false, &Map::new()).unwrap_err();
    assert!(e.to_string().contains("no system messages"), "{e}");
}

/// A failing render says what failed on one line, not minijinja's debug dump of the template
/// and every variable in scope (the whole conversation, several KB in an API error).
#[test]
fn a_render_error_is_one_line_without_the_conversation() {
    let t = ChatTemplate::new(
        "{% for m in messages %}{{ m.content + 1 }}{% endfor %}",
        None,
        None,
    );
    let secret = "a long conversation ".repeat(20);
    let e = t
        .render(
            &[serde_json::json!({"role": "user", "content": secret})],
            None,
            false,
            &Map::new(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("cannot render the chat: "), "{e}");
    assert!(
        !e.contains('\n') && !e.contains("a long conversation"),
        "{e}"
    );
}

#[test]
fn strftime_now_formats_dates() {
    let s = strftime_now("%d %b %Y".into());
    assert_eq!(s.len(), 11, "{s}");
}

#[test]
fn tool_call_arguments_sent_as_json_text_reach_the_template_as_objects() {
    let t = ChatTemplate::new(
        "{% for m in messages %}{% for tc in m.tool_calls %}{% for k, v in tc.function.arguments.items() %}{{ k }}={{ v }};{% endfor %}{% endfor %}{% endfor %}",
        None,
        None,
    );
    let messages = [
        serde_json::json!({"role": "assistant", "content": null, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{\"city\": \"Paris\", \"n\": 2}"}}
        ]}),
    ];
    assert_eq!(
        t.render(&messages, None, false, &Map::new()).unwrap(),
        "city=Paris;n=2;"
    );
}

/// A template that loops without end, or writes without end, fails the render; it does not
/// hold the worker or take its memory.
#[test]
fn a_runaway_template_fails_instead_of_holding_the_worker() {
    let forever =
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
    let e = ChatTemplate::new(forever, None, None)
        .render(&[], None, true, &Map::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("steps") && e.contains("chat_template"), "{e}");
    let huge = "{% for i in range(100) %}{{ 'x' * 1000000 }}{% endfor %}";
    let e = ChatTemplate::new(huge, None, None)
        .render(&[], None, true, &Map::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("bytes") && e.contains("chat_template"), "{e}");
}

/// The four shipped models' templates over a long chat with tools stay far inside the budgets.
#[test]
fn real_templates_render_a_long_chat_with_tools_within_the_budgets() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let tools: Vec<Json> = (0..16)
        .map(|i| {
            serde_json::json!({"type": "function", "function": {
                "name": format!("tool_{i}"), "description": "does a thing with a city",
                "parameters": {"type": "object", "properties": {
                    "city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}})
        })
        .collect();
    let mut messages = vec![serde_json::json!({"role": "system", "content": "Be brief."})];
    for turn in 0..150 {
        messages.push(serde_json::json!({"role": "user", "content": format!("question {turn}")}));
        messages.push(serde_json::json!({"role": "assistant", "content": "",
            "tool_calls": [{"id": format!("c{turn}"), "type": "function", "function": {
                "name": "tool_1", "arguments": {"city": "Paris", "days": turn}}}]}));
        messages.push(
            serde_json::json!({"role": "tool", "tool_call_id": format!("c{turn}"),
            "content": "sunny"}),
        );
        messages
            .push(serde_json::json!({"role": "assistant", "content": format!("answer {turn}")}));
    }
    for model in [
        "qwen3-tiny",
        "qwen3-moe-tiny",
        "glm4-moe-lite-tiny",
        "qwen3-vl-tiny",
    ] {
        let checkpoint = Checkpoint::open(&fixtures.join(model)).unwrap();
        let template = ChatTemplate::load(&checkpoint).unwrap().unwrap();
        let text = template.render(&messages, Some(&tools), true, &Map::new());
        assert!(text.is_ok_and(|t| t.contains("answer 149")), "{model}");
    }
}

/// `chat_template.jinja` wins over `tokenizer_config.json`'s entry, as in transformers, and its
/// errors name it.
#[test]
fn a_template_file_wins_over_the_config_entry_and_is_named_in_errors() {
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3-tiny");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
    let config = dir.path().join("tokenizer_config.json");
    let mut json: Json = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["chat_template"] = Json::String("OLD".into());
    std::fs::write(&config, json.to_string()).unwrap();
    let load = || ChatTemplate::load(&Checkpoint::open(dir.path()).unwrap());
    assert_eq!(load().unwrap().unwrap().source(), "OLD");
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "NEW {{ messages | length }}",
    )
    .unwrap();
    assert_eq!(
        load().unwrap().unwrap().source(),
        "NEW {{ messages | length }}"
    );
    std::fs::write(dir.path().join("chat_template.jinja"), "{% if %}").unwrap();
    let e = load().unwrap_err().to_string();
    assert!(
        e.contains("chat_template.jinja") && !e.contains("tokenizer_config"),
        "{e}"
    );
}

/// Python's strftime directives, as transformers' `strftime_now` fills them (C locale).
#[test]
fn strftime_fills_pythons_directives() {
    // 2024-02-29 13:05:09 UTC, a Thursday, the 60th day of a leap year.
    let at = 1_709_211_909;
    assert_eq!(
        strftime("%Y-%m-%d %H:%M:%S %j", at),
        "2024-02-29 13:05:09 060"
    );
    assert_eq!(
        strftime("%A %a %B %b %y %e %I%p %%", at),
        "Thursday Thu February Feb 24 29 01PM %"
    );
    assert_eq!(strftime("%d %B %Y, %q", 0), "01 January 1970, %q");
    assert_eq!(strftime("%I %p %j", 0), "12 AM 001");
}
