//! What the engine's integration tests share: the fixture checkpoints, their transformers
//! goldens, an engine serving one of them, and the parity check against a golden case.

// Each test crate uses its own subset.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use pio_engine::candle_core::{DType, Device};
use pio_engine::checkpoint::Checkpoint;
use pio_engine::generate::{CausalLm, Emitted};
use pio_engine::linear::Quantization;
use pio_engine::runtime::LoadModel;
use pio_engine::serving::{Engine, EngineConfig};
use pio_engine::text::TextCodec;
use serde_json::Value;

/// tests/fixtures.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// The golden cases transformers wrote for fixture `name`.
pub fn golden(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join(format!("golden/{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Fixture `name` loaded in f32 and served by an engine with `config`.
pub fn engine_for<M: LoadModel + CausalLm>(name: &str, config: EngineConfig) -> Engine {
    let checkpoint = Checkpoint::open(&fixtures().join(name)).unwrap();
    let model = M::load(
        &checkpoint,
        DType::F32,
        Quantization::None,
        &Device::Cpu,
        &mut |_, _| {},
    )
    .unwrap();
    let codec = TextCodec::load(&checkpoint).unwrap();
    Engine::start(Arc::new(model), Arc::new(codec), config).unwrap()
}

/// The tokens are transformers' and the top-5 log-probabilities within 2e-3, for as many steps as
/// were generated; greedy picked the top token.
pub fn assert_matches(out: &[Emitted], case: &Value) {
    let tokens: Vec<u32> = out.iter().map(|e| e.token_id).collect();
    assert_eq!(
        tokens,
        ids(&case["tokens"])[..tokens.len()],
        "greedy tokens of {}",
        case["input_ids"]
    );
    for (step, (emitted, expected)) in out.iter().zip(case["top5"].as_array().unwrap()).enumerate()
    {
        let got_ids: Vec<u32> = emitted.top.iter().map(|t| t.0).collect();
        assert_eq!(got_ids, ids(&expected["ids"]), "top-5 ids at step {step}");
        for ((_, _, got), want) in emitted
            .top
            .iter()
            .zip(expected["logprobs"].as_array().unwrap())
        {
            let want = want.as_f64().unwrap() as f32;
            assert!(
                (got - want).abs() < 2e-3,
                "step {step}: logprob {got} vs {want}"
            );
        }
        assert_eq!(
            emitted.logprob,
            Some(emitted.top[0].2),
            "greedy picks the top token"
        );
    }
}
