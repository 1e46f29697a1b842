use super::*;
use crate::checkpoint::Checkpoint;
use crate::sampling::{Sampler, SamplingParams};
use serde_json::json;

fn grammars(fixture: &str, eos: Vec<u32>) -> (Arc<TextCodec>, Grammars) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(fixture);
    let codec = Arc::new(TextCodec::load(&Checkpoint::open(&dir).unwrap()).unwrap());
    (codec.clone(), Grammars::new(codec, eos))
}

/// Runs a guide over pseudo-random logits, greedily, until it allows only end of sequence.
fn generate(codec: &TextCodec, compiled: Compiled, eos: &[u32], seed: u64) -> (String, bool) {
    let mut guide = Guide::start(compiled).unwrap();
    let mut sampler = Sampler::new(SamplingParams {
        temperature: Some(1.0),
        seed: Some(seed),
        ..Default::default()
    });
    let vocab = codec.id_bound() as usize + 7; // models pad their vocabulary
    let mut out = Vec::new();
    for step in 0..400u64 {
        let logits: Vec<f32> = (0..vocab as u64)
            .map(|i| ((i * 7919 + step * 104729 + seed) % 1000) as f32 / 100.0)
            .collect();
        let allowed = guide.allowed(vocab).map(|m| m.unwrap());
        let token = sampler
            .sample_from(&logits, &[], &out, allowed.as_ref())
            .unwrap();
        if eos.contains(&token) {
            return (codec.decode(&out), true);
        }
        out.push(token);
        guide.advance(token, codec);
    }
    (codec.decode(&out), false)
}

fn schema(s: Value) -> Constraint {
    Constraint {
        grammar: Grammar::JsonSchema(s),
        after: None,
    }
}

#[test]
fn sampling_under_a_schema_gives_json_that_matches_it() {
    let (codec, g) = grammars("qwen3-tiny", vec![2, 0]);
    let s = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": false,
    });
    for seed in 0..5 {
        let (text, ended) = generate(
            &codec,
            g.compile(&schema(s.clone())).unwrap(),
            &[2, 0],
            seed,
        );
        assert!(
            ended,
            "the grammar completed and allowed only EOS: {text:?}"
        );
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!(
            v["name"].as_str().is_some_and(|n| n.chars().count() <= 12),
            "{v}"
        );
        assert!(
            v["age"].as_i64().is_some_and(|a| (0..=150).contains(&a)),
            "{v}"
        );
        let tags = v["tags"].as_array().unwrap();
        assert!(
            tags.len() <= 3 && tags.iter().all(|t| t == "a" || t == "b"),
            "{v}"
        );
        assert_eq!(v.as_object().unwrap().len(), 3, "{v}");
        assert!(text.starts_with("{\"name\": "), "PIO's layout: {text:?}");
    }
}

/// Text a grammar forces is spelled as forced, whatever the tokenizer's normalizer makes of it:
/// Qwen's NFC turned `e` + U+0301 into `é`, a token the grammar then refused, and the request
/// failed mid-stream.
#[test]
fn forced_text_is_spelled_byte_for_byte_under_a_normalizer() {
    let codec = Arc::new(crate::text::fixture_codec_with(|json| {
        json["normalizer"] = json!({"type": "NFC"});
    }));
    let g = Grammars::new(codec.clone(), vec![2, 0]);
    let word = "Cafe\u{301} \u{2126}";
    for s in [json!({"const": word}), json!({"enum": [word, "x"]})] {
        let (text, ended) = generate(&codec, g.compile(&schema(s.clone())).unwrap(), &[2, 0], 1);
        assert!(ended, "{s}: {text:?}");
        assert!(
            text == format!("\"{word}\"") || text == "\"x\"",
            "{s}: {text:?}"
        );
    }
}

/// A format llguidance does not know is an annotation (OpenAPI's `password`, `int64`), in a
/// schema sent whole and in one a tool's grammar embeds; a known one still holds the value.
#[test]
fn unknown_formats_are_annotations() {
    let (codec, g) = grammars("qwen3-tiny", vec![2, 0]);
    let s = json!({"type": "object", "properties": {
        "secret": {"type": "string", "format": "password", "maxLength": 6},
        "id": {"type": "string", "format": "uuid"},
        "format": {"const": {"format": "int64"}}},
        "required": ["secret", "id", "format"], "additionalProperties": false});
    let (text, ended) = generate(&codec, g.compile(&schema(s)).unwrap(), &[2, 0], 4);
    assert!(ended, "{text:?}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let id = v["id"].as_str().unwrap();
    assert!(
        id.len() == 36 && id.matches('-').count() == 4,
        "uuid held: {v}"
    );
    assert_eq!(
        v["format"],
        json!({"format": "int64"}),
        "data left as it is: {v}"
    );
    let lark = Constraint {
        grammar: Grammar::Lark(format!(
            "start: %json {}",
            pio_plugin_api::wire::guidance_schema(&json!({"type": "integer", "format": "int64"}))
        )),
        after: None,
    };
    let (text, ended) = generate(&codec, g.compile(&lark).unwrap(), &[2, 0], 5);
    assert!(ended && text.parse::<i64>().is_ok(), "{text:?}");
}

/// `oneOf` (Pydantic's tagged unions) is taken as `anyOf`, as vLLM's guidance backend takes it;
/// a client's own `x-guidance` keeps PIO's layout in each key it leaves unset.
#[test]
fn one_of_compiles_and_a_clients_options_keep_the_layout() {
    let (codec, g) = grammars("qwen3-tiny", vec![2, 0]);
    // Overlapping branches (disjoint ones llguidance takes without the option).
    let branch = |key: &str| json!({"type": "object", "properties": {key: {"type": "integer"}}, "required": [key]});
    let union = json!({"oneOf": [branch("a"), branch("b")]});
    let (text, ended) = generate(&codec, g.compile(&schema(union)).unwrap(), &[2, 0], 3);
    assert!(ended, "{text:?}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(v["a"].is_i64() || v["b"].is_i64(), "{v}");
    let own = json!({
        "type": "object",
        "properties": {"a": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}},
        "required": ["a"], "additionalProperties": false,
        "x-guidance": {"coerce_one_of": true},
    });
    for seed in 0..3 {
        let (text, ended) = generate(
            &codec,
            g.compile(&schema(own.clone())).unwrap(),
            &[2, 0],
            seed,
        );
        assert!(ended, "{text:?}");
        assert!(text.starts_with("{\"a\": ["), "PIO's layout kept: {text:?}");
        assert!(!text.contains('\n') && !text.contains("  "), "{text:?}");
    }
}

#[test]
fn a_regex_and_a_lark_grammar_constrain_the_whole_output() {
    let (codec, g) = grammars("qwen3-tiny", vec![2, 0]);
    let rx = Constraint {
        grammar: Grammar::Regex("(yes|no), [0-9]{3}".into()),
        after: None,
    };
    let (text, ended) = generate(&codec, g.compile(&rx).unwrap(), &[2, 0], 1);
    assert!(ended, "{text:?}");
    let (word, digits) = text.split_once(", ").unwrap();
    assert!(
        ["yes", "no"].contains(&word) && digits.len() == 3,
        "{text:?}"
    );
    assert!(digits.bytes().all(|b| b.is_ascii_digit()), "{text:?}");

    let lark = Constraint {
        grammar: Grammar::Lark(
            "start: \"call \" NAME \"(\" %json {\"type\": \"integer\", \"minimum\": 1, \"maximum\": 9} \")\"\nNAME: /[a-z]{1,8}/"
                .into(),
        ),
        after: None,
    };
    let (text, ended) = generate(&codec, g.compile(&lark).unwrap(), &[2, 0], 2);
    assert!(ended, "{text:?}");
    let inner = text.strip_prefix("call ").unwrap();
    let (name, rest) = inner.split_once('(').unwrap();
    assert!(
        !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase()),
        "{text:?}"
    );
    let n: u32 = rest.strip_suffix(')').unwrap().parse().unwrap();
    assert!((1..=9).contains(&n), "{text:?}");
}

#[test]
fn a_grammar_that_waits_for_its_marker_leaves_the_text_before_it_free() {
    let (codec, g) = grammars("qwen3-tiny", vec![2, 0]);
    let c = Constraint {
        grammar: Grammar::Regex("ok".into()),
        after: Some("</think>".into()),
    };
    let mut guide = Guide::start(g.compile(&c).unwrap()).unwrap();
    let vocab = codec.id_bound() as usize;
    let free = |guide: &mut Guide| {
        let mask = guide.allowed(vocab).unwrap().unwrap();
        assert_eq!(mask.num_set(), vocab - 2, "all but the two EOS tokens");
        assert!(!mask.is_allowed(2) && !mask.is_allowed(0));
    };
    free(&mut guide);
    let think = codec.token_id("</think>").unwrap();
    for t in codec.encode("some thoughts").unwrap() {
        guide.advance(t, &codec);
        free(&mut guide);
    }
    guide.advance(think, &codec);
    let mask = guide.allowed(vocab).unwrap().unwrap();
    let allowed: Vec<String> = (0..codec.id_bound())
        .filter(|&t| mask.is_allowed(t))
        .map(|t| codec.decode(&[t]))
        .collect();
    assert!(
        !allowed.is_empty() && allowed.iter().all(|t| "ok".starts_with(t.as_str())),
        "{allowed:?}"
    );
}

#[test]
fn control_tokens_are_never_text_inside_a_grammar() {
    let (codec, g) = grammars("qwen3-tiny", vec![2, 0]);
    let c = schema(json!({"type": "string"}));
    let mut guide = Guide::start(g.compile(&c).unwrap()).unwrap();
    let quote = codec.encode("\"").unwrap();
    assert_eq!(quote.len(), 1);
    let vocab = codec.id_bound() as usize;
    guide.allowed(vocab).unwrap().unwrap();
    guide.advance(quote[0], &codec);
    let mask = guide.allowed(vocab).unwrap().unwrap();
    for control in codec.control_ids() {
        assert!(
            !mask.is_allowed(control),
            "{:?} inside a JSON string",
            codec.decode(&[control])
        );
    }
    assert!(mask.num_set() > 50, "text is allowed: {}", mask.num_set());
}

/// Text a grammar forces that spells a control token's tag is written as text: the tokenizer
/// would read `<|im_end|>` as the end-of-turn token and end the output there.
#[test]
fn forced_text_spelling_a_control_tag_stays_text() {
    let (codec, g) = grammars("qwen3-tiny", vec![2, 0]);
    for grammar in [
        Grammar::Lark(r#"start: "<|im_end|>""#.into()),
        Grammar::JsonSchema(json!({"const": "<|im_end|> and <tool_call>"})),
    ] {
        let c = Constraint {
            grammar,
            after: None,
        };
        let (text, ended) = generate(&codec, g.compile(&c).unwrap(), &[2, 0], 1);
        assert!(ended, "{text:?}");
        assert!(text.contains("<|im_end|>"), "{text:?}");
    }
}

/// A schema of `true` (any JSON) keeps the compact layout: no run of whitespace after `[`.
#[test]
fn any_json_keeps_the_layout() {
    let (codec, g) = grammars("qwen3-tiny", vec![2, 0]);
    let mut guide = Guide::start(g.compile(&schema(json!(true))).unwrap()).unwrap();
    let open = codec.encode("[").unwrap();
    let newline = codec.encode("\n").unwrap();
    assert_eq!((open.len(), newline.len()), (1, 1));
    let vocab = codec.id_bound() as usize;
    guide.allowed(vocab).unwrap().unwrap();
    guide.advance(open[0], &codec);
    let mask = guide.allowed(vocab).unwrap().unwrap();
    assert!(!mask.is_allowed(newline[0]), "whitespace after [");
    assert!(
        mask.num_set() > 10,
        "values are allowed: {}",
        mask.num_set()
    );
}

#[test]
fn bad_schemas_and_grammars_are_refused_with_the_reason() {
    let (_, g) = grammars("qwen3-tiny", vec![2, 0]);
    let e = g
        .compile(&schema(json!({"type": "strin"})))
        .unwrap_err()
        .to_string();
    assert!(e.contains("JSON schema") && e.contains("strin"), "{e}");
    let nested = json!({"type": "object", "properties": {"tags": {
        "type": "array", "items": {"type": "string"}, "uniqueItems": true}}});
    let e = g.compile(&schema(nested)).unwrap_err().to_string();
    assert!(
        e.contains("uniqueItems") && e.contains("at /properties/tags"),
        "{e}"
    );
    // Where it names the place, the place is said (an unknown format is an annotation now).
    let deep =
        json!({"type": "object", "properties": {"when": {"type": "string", "minLength": "x"}}});
    let e = g.compile(&schema(deep)).unwrap_err().to_string();
    assert!(e.contains("JSON schema"), "{e}");
    let rx = Constraint {
        grammar: Grammar::Regex("(unclosed".into()),
        after: None,
    };
    let e = g.compile(&rx).unwrap_err();
    assert!(matches!(e, EngineError::Constraint(_)), "{e:?}");
    let e = e.to_string();
    assert!(
        e.contains("regex") && e.contains("unclosed group") && !e.contains("at 1("),
        "the reason, not a position in a grammar the client never wrote: {e}"
    );
    let lark = Constraint {
        grammar: Grammar::Lark("start: missing_rule".into()),
        after: None,
    };
    let e = g.compile(&lark).unwrap_err().to_string();
    assert!(e.contains("grammar") && e.contains("missing_rule"), "{e}");
    // A grammar that parses but that no output can follow is refused before any request runs.
    let endless = Constraint {
        grammar: Grammar::Lark("start: start".into()),
        after: None,
    };
    let e = g.compile(&endless).unwrap_err();
    assert!(matches!(e, EngineError::Constraint(_)), "{e:?}");
    assert!(e.to_string().contains("grammar cannot be used"), "{e}");
    let none = Grammars::new(grammars("qwen3-tiny", vec![]).0, vec![]);
    let e = none.compile(&schema(json!({}))).unwrap_err().to_string();
    assert!(e.contains("eos_token_id"), "{e}");
}

/// A grammar that proves too much for the matcher midway (a recursion it cannot unroll) fails the
/// sequence as the client's input, in a line.
#[test]
fn a_grammar_too_much_for_the_matcher_midway_is_the_clients_input() {
    let (codec, g) = grammars("qwen3-tiny", vec![2, 0]);
    let lark = Constraint {
        grammar: Grammar::Lark("start: \"a\" start".into()),
        after: None,
    };
    let mut guide = Guide::start(g.compile(&lark).unwrap()).unwrap();
    let vocab = codec.id_bound() as usize + 7;
    let e = (0..5)
        .find_map(|_| match guide.allowed(vocab)? {
            Ok(mask) => {
                let token = (0..vocab as u32).find(|&t| mask.is_allowed(t))?;
                guide.advance(token, &codec);
                None
            }
            Err(e) => Some(e),
        })
        .expect("the matcher gave up");
    assert!(matches!(e, EngineError::Constraint(_)), "{e:?}");
    let e = e.to_string();
    assert!(
        e.contains("grammar") && !e.contains('\n') && e.len() < 400,
        "{e}"
    );
}
