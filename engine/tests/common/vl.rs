//! The tiny Qwen3-VL checkpoint and its goldens: requests built from a golden case's messages and
//! images (prompt and M-RoPE positions checked against transformers' on the way), run through an
//! engine on the CPU or a GPU.

use std::sync::Arc;

use pio_engine::candle_core::{DType, Device};
use pio_engine::chat::ChatTemplate;
use pio_engine::checkpoint::Checkpoint;
use pio_engine::generate::{Outcome, Request};
use pio_engine::generation_config::GenerationConfig;
use pio_engine::images::{decode, DecodeLimits, RgbImage};
use pio_engine::linear::Quantization;
use pio_engine::models::qwen3_vl::Qwen3Vl;
use pio_engine::runtime::LoadModel;
use pio_engine::sampling::SamplingParams;
use pio_engine::serving::{Engine, EngineConfig};
use pio_engine::text::TextCodec;
use serde_json::Value;

use super::{assert_matches, collect, fixtures, ids};

/// The tiny Qwen3-VL checkpoint.
pub const NAME: &str = "qwen3-vl-tiny";

/// Its transformers goldens.
pub fn golden() -> Value {
    let text = std::fs::read_to_string(fixtures().join("golden/qwen3-vl-tiny.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The checkpoint loaded, with what requests are built from.
pub struct Fixture {
    pub model: Arc<Qwen3Vl>,
    pub codec: Arc<TextCodec>,
    pub template: ChatTemplate,
    pub eos: Vec<u32>,
}

/// The checkpoint in f32 on the CPU.
pub fn fixture() -> Fixture {
    fixture_on(&Device::Cpu)
}

/// The checkpoint in f32 on `device`.
pub fn fixture_on(device: &Device) -> Fixture {
    fixture_in(DType::F32, device)
}

/// The checkpoint in `dtype` on `device`.
pub fn fixture_in(dtype: DType, device: &Device) -> Fixture {
    let checkpoint = Checkpoint::open(&fixtures().join(NAME)).unwrap();
    let model = <Qwen3Vl as LoadModel>::load(
        &checkpoint,
        dtype,
        Quantization::None,
        device,
        &mut |_, _| {},
    );
    Fixture {
        model: Arc::new(model.unwrap()),
        codec: Arc::new(TextCodec::load(&checkpoint).unwrap()),
        template: ChatTemplate::load(&checkpoint).unwrap().unwrap(),
        eos: GenerationConfig::load(&checkpoint).unwrap().eos_token_id,
    }
}

/// The fixture image `name` (tests/fixtures/images), decoded.
pub fn image(name: &str) -> RgbImage {
    let bytes = std::fs::read(fixtures().join("images").join(name)).unwrap();
    decode(&bytes, &DecodeLimits::default()).unwrap()
}

/// A golden case's request, its prompt and positions checked against transformers'.
pub fn request(f: &Fixture, case: &Value) -> Request {
    let messages = case["messages"].as_array().unwrap();
    let text = f
        .template
        .render(messages, None, true, &Default::default())
        .unwrap();
    assert_eq!(text, case["prompt"].as_str().unwrap(), "{}", case["name"]);
    let images: Vec<_> = messages
        .iter()
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .filter_map(|p| p["image"].as_str())
        .map(image)
        .collect();
    let (prompt, media) = f
        .model
        .prepare(f.codec.encode(&text).unwrap(), &images)
        .unwrap();
    assert_eq!(
        prompt,
        ids(&case["input_ids"]),
        "input ids of {}",
        case["name"]
    );
    let want = case["position_ids"].as_array().unwrap();
    if let Some(m) = &media {
        for (i, p) in m.positions.iter().enumerate() {
            for axis in 0..3 {
                assert_eq!(
                    u64::from(p[axis]),
                    want[axis][i].as_u64().unwrap(),
                    "{}: position {i} axis {axis}",
                    case["name"]
                );
            }
        }
        assert_eq!(m.position_delta, case["rope_delta"].as_i64().unwrap());
    } else {
        assert_eq!(case["rope_delta"].as_i64().unwrap(), 0);
    }
    Request {
        prompt,
        sampling: SamplingParams::default(),
        max_tokens: case["tokens"].as_array().unwrap().len(),
        stop: Vec::new(),
        include_stop: false,
        eos: f.eos.clone(),
        stop_ids: Vec::new(),
        min_tokens: 0,
        logprobs: Some(5),
        prompt_logprobs: None,
        media: media.map(Arc::new),
        constraint: None,
    }
}

/// Every request at once through an engine with `config`, each answer checked against its golden.
pub fn run_all(f: &Fixture, config: EngineConfig, requests: &[(Request, Value)]) -> Vec<Outcome> {
    let engine = Engine::start(f.model.clone(), f.codec.clone(), config).unwrap();
    let streams: Vec<_> = requests
        .iter()
        .map(|(r, _)| engine.submit(r.clone()).unwrap())
        .collect();
    streams
        .into_iter()
        .zip(requests)
        .map(|(s, (_, case))| {
            let (out, outcome) = collect(s);
            assert_eq!(
                out.len(),
                case["tokens"].as_array().unwrap().len(),
                "{}",
                case["name"]
            );
            assert_matches(&out, case);
            outcome
        })
        .collect()
}
