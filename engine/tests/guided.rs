//! Constrained output in the batch-first engine: sequences under a JSON Schema run in the same
//! steps as free ones, each under its own mask; the free ones give exactly transformers' tokens
//! as if alone, the constrained ones valid JSON, and logprobs stay those of the raw model.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{assert_matches, collect, engine_for, fixtures, golden, ids};
use pio_engine::checkpoint::Checkpoint;
use pio_engine::generate::{Finish, Request};
use pio_engine::generation_config::GenerationConfig;
use pio_engine::guide::Grammars;
use pio_engine::models::qwen3::Qwen3;
use pio_engine::sampling::SamplingParams;
use pio_engine::serving::EngineConfig;
use pio_engine::text::TextCodec;
use pio_plugin_api::wire::{Constraint, Grammar};
use serde_json::{json, Value};

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "n": {"type": "integer", "minimum": -5, "maximum": 5000},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "n", "ok"],
        "additionalProperties": false,
    })
}

#[test]
fn constrained_and_free_sequences_share_steps_and_each_gets_its_own() {
    let dir = fixtures().join("qwen3-tiny");
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let eos = GenerationConfig::load(&checkpoint).unwrap().eos_token_id;
    let codec = Arc::new(TextCodec::load(&checkpoint).unwrap());
    let grammars = Grammars::new(codec.clone(), eos.clone());
    let constraint = Constraint {
        grammar: Grammar::JsonSchema(schema()),
        after: None,
    };
    let engine = engine_for::<Qwen3>("qwen3-tiny", EngineConfig::default());
    let cases = golden("qwen3-tiny");
    let free: Vec<Request> = cases
        .iter()
        .map(|case| Request {
            prompt: ids(&case["input_ids"]),
            max_tokens: case["tokens"].as_array().unwrap().len(),
            eos: eos.clone(),
            logprobs: Some(5),
            prompt_logprobs: None,
            ..Request::default()
        })
        .collect();
    let guided: Vec<Request> = (0..4u64)
        .map(|seed| Request {
            prompt: ids(&cases[0]["input_ids"]),
            sampling: SamplingParams {
                temperature: Some(1.0),
                seed: Some(seed),
                ..SamplingParams::default()
            },
            max_tokens: 200,
            eos: eos.clone(),
            logprobs: Some(5),
            prompt_logprobs: None,
            constraint: Some(grammars.compile(&constraint).unwrap()),
            ..Request::default()
        })
        .collect();
    // All at once: the engine batches them into the same steps.
    let streams: Vec<_> = free
        .iter()
        .chain(&guided)
        .map(|r| engine.submit(r.clone()).unwrap())
        .collect();
    let results: Vec<_> = streams.into_iter().map(collect).collect();
    assert!(
        engine.stats().batched_seqs > engine.stats().steps,
        "{:?}",
        engine.stats()
    );
    for ((out, _), case) in results.iter().zip(&cases) {
        assert_matches(out, case);
    }
    let first_free = &results[0].0[0];
    for (out, outcome) in &results[free.len()..] {
        assert_eq!(outcome.finish, Finish::Stop, "the grammar completed");
        let text: String = out.iter().map(|t| t.text.as_str()).collect();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!(v["name"].as_str().unwrap().chars().count() <= 8, "{v}");
        assert!((-5..=5000).contains(&v["n"].as_i64().unwrap()), "{v}");
        assert!(v["ok"].is_boolean(), "{v}");
        // The first step's distribution is the raw model's: the same prompt, free, reports the
        // same top 5 (the token the grammar allows need not be among them).
        let (a, b) = (&out[0].top, &first_free.top);
        assert_eq!(a.len(), 5);
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x.0, y.0);
            assert!((x.2 - y.2).abs() < 1e-4, "{a:?} vs {b:?}");
        }
        assert!(out[0].text.starts_with('{'), "{:?}", out[0].text);
        let raw = out[0].logprob.unwrap();
        assert!(
            raw < 0.0 && raw.is_finite(),
            "the raw logprob of the first token: {raw}"
        );
    }
}

#[test]
fn a_grammar_unfinished_at_max_tokens_ends_with_length_and_keeps_its_text() {
    let dir = fixtures().join("qwen3-tiny");
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let eos = GenerationConfig::load(&checkpoint).unwrap().eos_token_id;
    let codec = Arc::new(TextCodec::load(&checkpoint).unwrap());
    let grammars = Grammars::new(codec, eos.clone());
    let constraint = Constraint {
        grammar: Grammar::JsonSchema(schema()),
        after: None,
    };
    let engine = engine_for::<Qwen3>("qwen3-tiny", EngineConfig::default());
    let request = Request {
        prompt: vec![20, 21, 22],
        max_tokens: 4,
        eos,
        constraint: Some(grammars.compile(&constraint).unwrap()),
        ..Request::default()
    };
    let (out, outcome) = collect(engine.submit(request).unwrap());
    assert_eq!((out.len(), outcome.finish), (4, Finish::Length));
    let text: String = out.iter().map(|t| t.text.as_str()).collect();
    assert!(
        "{\"name\": \"".starts_with(&text) || text.starts_with("{\"name\": \""),
        "{text:?}"
    );
}
