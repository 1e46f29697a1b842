//! Parity of GLM-4.7-Flash's model (`Glm4MoeLiteForCausalLM`) with Hugging Face transformers on
//! the tiny random checkpoints of `tests/fixtures/generate.py`: one in the real config's form
//! (one expert group, `first_k_dense_replace`, a next-token-prediction layer stored past the
//! last layer, filled with NaN so that reading it would show), one with group-limited routing and
//! dense layers between sparse ones. Same greedy tokens, top-5 log-probabilities within 2e-3
//! (f32), the same experts chosen on every sparse layer, and the absorbed and expanded attention
//! forms agreeing.

#![allow(clippy::unwrap_used)]

mod common;

use common::{check_checkpoint, fixtures, golden, ids};
use pio_engine::batch::{Batch, Positions, SeqStep, Wanted};
use pio_engine::candle_core::{DType, Device};
use pio_engine::checkpoint::Checkpoint;
use pio_engine::generate::CausalLm;
use pio_engine::kv_pool::{CacheType, KvPool, PoolShape};
use pio_engine::linear::Quantization;
use pio_engine::models::glm4_moe_lite::{Glm4MoeLite, MlaForm};
use pio_engine::single::SingleSequence;

const FIXTURES: [&str; 2] = ["glm4-moe-lite-tiny", "glm4-moe-lite-grouped"];

fn load(name: &str, form: MlaForm) -> Glm4MoeLite {
    let checkpoint = Checkpoint::open(&fixtures().join(name)).unwrap();
    Glm4MoeLite::load(
        &checkpoint,
        DType::F32,
        Quantization::None,
        &Device::Cpu,
        &mut |_, _| {},
    )
    .unwrap()
    .with_form(form)
}

#[test]
fn real_config_form_with_a_next_token_layer_matches_transformers() {
    check_checkpoint::<Glm4MoeLite>("glm4-moe-lite-tiny");
}

#[test]
fn grouped_routing_checkpoint_matches_transformers() {
    check_checkpoint::<Glm4MoeLite>("glm4-moe-lite-grouped");
}

/// The experts each prompt token is routed to, per sparse layer, over a whole prompt in one pass.
fn choices(model: &Glm4MoeLite, prompt: &[u32]) -> Vec<Vec<Vec<usize>>> {
    let shape = PoolShape {
        block_size: 16,
        blocks: prompt.len().div_ceil(16),
        storage: CacheType::Float(DType::F32),
    };
    let mut pool = KvPool::new(model.kv_layout(), shape, &Device::Cpu).unwrap();
    let blocks: Vec<u32> = (0..shape.blocks as u32).collect();
    let batch = Batch::new(vec![SeqStep {
        tokens: prompt,
        splices: &[],
        start: 0,
        positions: &Positions::Linear,
        blocks: &blocks,
        logits: Wanted::Logits,
        score: None,
    }]);
    model.forward_traced(&batch, &mut pool).unwrap().1
}

#[test]
fn every_sparse_layer_chooses_the_experts_transformers_chooses() {
    for name in FIXTURES {
        let model = load(name, MlaForm::Absorbed);
        for case in golden(name) {
            let expected: Vec<Vec<Vec<usize>>> =
                serde_json::from_value(case["experts"].clone()).unwrap();
            let got = choices(&model, &ids(&case["input_ids"]));
            assert_eq!(got.len(), expected.len(), "{name}: sparse layers");
            assert_eq!(got, expected, "{name}: experts for {}", case["input_ids"]);
        }
    }
}

#[test]
fn absorbed_and_expanded_attention_agree() {
    for name in FIXTURES {
        let absorbed = load(name, MlaForm::Absorbed);
        let expanded = load(name, MlaForm::Expanded);
        let prompt = ids(&golden(name)[3]["input_ids"]);
        let mut a = SingleSequence::new(&absorbed, 64).unwrap();
        let mut b = SingleSequence::new(&expanded, 64).unwrap();
        // A prompt in chunks, then decode steps: both read the same latent cache.
        let mut worst = 0f32;
        let steps = [a.prefill(&absorbed, &prompt, 5).unwrap()]
            .into_iter()
            .zip([b.prefill(&expanded, &prompt, 5).unwrap()]);
        for (x, y) in steps {
            worst = worst.max(max_diff(&x, &y));
        }
        for token in [5u32, 77, 200] {
            let x = a.forward(&absorbed, &[token]).unwrap();
            let y = b.forward(&expanded, &[token]).unwrap();
            worst = worst.max(max_diff(&x, &y));
        }
        assert!(
            worst < 1e-3,
            "{name}: the forms differ by {worst} in a logit"
        );
    }
}

fn max_diff(x: &[f32], y: &[f32]) -> f32 {
    assert_eq!(x.len(), y.len());
    x.iter()
        .zip(y)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

#[test]
fn the_cache_keeps_one_latent_per_token_and_layer() {
    let model = load("glm4-moe-lite-tiny", MlaForm::Absorbed);
    let layout = model.kv_layout();
    assert_eq!(layout.layers, 3);
    assert_eq!(layout.vectors.len(), 1);
    // kv_lora_rank 32 + qk_rope_head_dim 16, one "head" shared by all four query heads.
    assert_eq!((layout.vectors[0].heads, layout.vectors[0].dim), (1, 48));
    // Full keys and values would be 4 heads × (40 + 32) per layer.
    assert_eq!(
        layout.bytes_per_token(CacheType::Float(DType::BF16)),
        3 * 48 * 2
    );
    // 8-bit: Q8_0 blocks of 32 values and an f16 scale, the row zero-padded to 64.
    assert_eq!(layout.bytes_per_token(CacheType::Q8_0), 3 * 2 * 34);
}

#[test]
fn other_architectures_are_refused_by_name() {
    let qwen = Checkpoint::open(&fixtures().join("qwen3-tiny")).unwrap();
    let e = Glm4MoeLite::load(
        &qwen,
        DType::F32,
        Quantization::None,
        &Device::Cpu,
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("expected Glm4MoeLiteForCausalLM"),
        "{e}"
    );
}
