//! Prompt scores (vLLM's `prompt_logprobs`) against transformers' (tests/fixtures/
//! prompt_logprobs.py): every prompt token after the first, its logprob and its top 5 within
//! 2e-3 (the bound of the generation goldens: f32 sums in another order than torch's), its rank
//! exactly (the nearest other token is 1.6e-5 away or more in these goldens, and the f32 paths
//! here stay within ~2e-6 of transformers' on these checkpoints). Prompts run in chunks, beside
//! each other, after the same prompts filled the prefix cache, and preempted for want of blocks.

#![allow(clippy::unwrap_used)]

mod common;

use common::{assert_prompt_scores, engine_for, ids, prompt_score_goldens, run_concurrently};
use pio_engine::generate::{CausalLm, Request};
use pio_engine::models::glm4_moe_lite::Glm4MoeLite;
use pio_engine::models::qwen3::{Qwen3, Qwen3Moe};
use pio_engine::runtime::LoadModel;
use pio_engine::scoring::PromptScore;
use pio_engine::serving::{Engine, EngineConfig};
use serde_json::Value;

/// A greedy request for one token, scoring its prompt with `top` alternatives.
fn request(case: &Value, top: Option<usize>) -> Request {
    Request {
        prompt: ids(&case["input_ids"]),
        max_tokens: 1,
        prompt_logprobs: top,
        ..Request::default()
    }
}

/// Each case's prompt scores, the cases run together, each generating `tokens`.
fn scored(engine: &Engine, cases: &[Value], tokens: usize) -> Vec<Vec<PromptScore>> {
    let requests = cases.iter().map(|c| Request {
        max_tokens: tokens,
        ..request(c, Some(5))
    });
    run_concurrently(engine, requests)
        .into_iter()
        .map(|(out, outcome)| {
            assert_eq!(out.len(), tokens, "the request still generates");
            outcome.prompt_logprobs.expect("the scores asked for")
        })
        .collect()
}

/// The prompts run together in chunks of a few tokens, after unscored runs of the same prompts
/// left them in the prefix cache (which must not stand in for rows to score).
fn chunked_beside_each_other<M: LoadModel + CausalLm>(name: &str) {
    let config = EngineConfig {
        block_size: 4,
        token_budget: 11,
        ..EngineConfig::default()
    };
    let engine = engine_for::<M>(name, config);
    let cases = prompt_score_goldens(name);
    for (_, outcome) in run_concurrently(&engine, cases.iter().map(|c| request(c, None))) {
        assert!(outcome.prompt_logprobs.is_none(), "none asked for");
    }
    for (got, case) in scored(&engine, &cases, 1).iter().zip(&cases) {
        assert_prompt_scores(got, case);
    }
    let stats = engine.stats();
    assert!(
        stats.prefix_hit_tokens == 0,
        "scored prompts skip the cache: {stats:?}"
    );
    let unscored: usize = cases.iter().map(|c| ids(&c["input_ids"]).len()).sum();
    assert_eq!(
        stats.prefix_lookup_tokens, unscored as u64,
        "only the unscored runs looked: {stats:?}"
    );
}

#[test]
fn prompt_scores_match_transformers_dense() {
    chunked_beside_each_other::<Qwen3>("qwen3-tiny");
}

#[test]
fn prompt_scores_match_transformers_moe() {
    chunked_beside_each_other::<Qwen3Moe>("qwen3-moe-tiny");
}

#[test]
fn prompt_scores_match_transformers_mla() {
    chunked_beside_each_other::<Glm4MoeLite>("glm4-moe-lite-tiny");
}

#[test]
fn preempted_sequences_score_each_token_once() {
    // 30 blocks of 4 hold 120 positions: the long prompt (97 tokens) three times over beside
    // the others cannot run together, and sequences preempted as their outputs grow run their
    // prompts again.
    let name = "qwen3-tiny";
    let config = EngineConfig {
        block_size: 4,
        kv_blocks: 30,
        ..EngineConfig::default()
    };
    let engine = engine_for::<Qwen3>(name, config);
    let cases = prompt_score_goldens(name);
    let mut load = vec![cases[3].clone(), cases[3].clone(), cases[3].clone()];
    load.extend(cases[..3].iter().cloned());
    for (got, case) in scored(&engine, &load, 16).iter().zip(&load) {
        assert_prompt_scores(got, case);
    }
    let stats = engine.stats();
    assert!(
        stats.preemptions > 0,
        "the pool was too small to run all: {stats:?}"
    );
}
