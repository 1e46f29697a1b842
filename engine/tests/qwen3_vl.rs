//! Qwen3-VL against transformers' goldens on the tiny checkpoint: the expanded prompt, its
//! M-RoPE positions, and greedy tokens with top-5 log-probabilities for prompts with no image,
//! one image, two images in one message and images in two turns — each alone, all batched
//! together, in small prefill chunks, and again from the prefix cache.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::vl::{fixture, fixture_in, golden, image, request, run_all, NAME};
use common::{assert_matches, collect, fixtures};
use pio_engine::candle_core::{DType, Device};
use pio_engine::checkpoint::Checkpoint;
use pio_engine::generate::Request;
use pio_engine::images::{decode, DecodeLimits};
use pio_engine::linear::Quantization;
use pio_engine::models::qwen3_vl::Qwen3Vl;
use pio_engine::serving::{Engine, EngineConfig};
use serde_json::Value;

#[test]
fn every_case_matches_transformers_alone_and_batched() {
    let f = fixture();
    let cases: Vec<(Request, Value)> = golden()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (request(&f, c), c.clone()))
        .collect();
    for case in &cases {
        run_all(&f, EngineConfig::default(), std::slice::from_ref(case));
    }
    run_all(&f, EngineConfig::default(), &cases);
    // Prefill in chunks of 5 tokens: images cut across chunks and across KV blocks.
    let chunked = EngineConfig {
        block_size: 4,
        token_budget: 5,
        ..EngineConfig::default()
    };
    run_all(&f, chunked, &cases);
}

#[test]
fn the_same_image_twice_hits_the_prefix_cache_and_another_image_does_not() {
    let f = fixture();
    let golden = golden();
    let case = golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "one-image")
        .unwrap()
        .clone();
    let config = EngineConfig {
        block_size: 4,
        ..EngineConfig::default()
    };
    let engine = Engine::start(f.model.clone(), f.codec.clone(), config).unwrap();
    let first = request(&f, &case);
    for expected_hit in [false, true] {
        let (out, outcome) = collect(engine.submit(first.clone()).unwrap());
        assert_matches(&out, &case);
        let image_end = first.prompt.len() - 4;
        if expected_hit {
            assert!(outcome.cached_tokens >= image_end / 4 * 4, "{outcome:?}");
        } else {
            assert_eq!(outcome.cached_tokens, 0);
        }
    }
    // Same text, same size, another picture: the cache must not serve the first one's entries
    // past the text before the image.
    let mut other = case.clone();
    other["messages"][0]["content"][0]["image"] = "palette.png".into();
    let text = f
        .template
        .render(
            other["messages"].as_array().unwrap(),
            None,
            true,
            &Default::default(),
        )
        .unwrap();
    let bytes = std::fs::read(fixtures().join("images/palette.png")).unwrap();
    let image = decode(&bytes, &DecodeLimits::default()).unwrap();
    let (prompt, media) = f
        .model
        .prepare(f.codec.encode(&text).unwrap(), &[image])
        .unwrap();
    assert_eq!(prompt, first.prompt, "the two images take the same tokens");
    let request = Request {
        prompt,
        media: media.map(Arc::new),
        ..first.clone()
    };
    let (_, outcome) = collect(engine.submit(request).unwrap());
    let first_image_token = first.prompt.iter().position(|&t| t == 11).unwrap();
    assert!(outcome.cached_tokens <= first_image_token, "{outcome:?}");
}

/// A bf16 checkpoint's tower (its products' inputs rounded to bf16, as transformers' bf16 tower
/// has them, on the AMX tiles where the CPU has them) stays within bf16's error of the f32
/// tower on the same weights: the image's tokens and every DeepStack feature.
#[test]
fn a_bf16_tower_is_the_f32_tower_within_bf16_error() {
    let bytes = std::fs::read(fixtures().join("images/photo.jpg")).unwrap();
    let image = decode(&bytes, &DecodeLimits::default()).unwrap();
    let encode = |dtype| {
        let f = fixture_in(dtype, &Device::Cpu);
        let patches = f.model.processor().patches(&image).unwrap();
        let e = f.model.vision().encode(&patches).unwrap();
        std::iter::once(&e.embeddings)
            .chain(&e.deepstack)
            .map(common::testing::f32_values)
            .collect::<Vec<_>>()
    };
    let (exact, bf16) = (encode(DType::F32), encode(DType::BF16));
    assert_eq!(exact.len(), bf16.len());
    for (i, (a, b)) in exact.iter().zip(&bf16).enumerate() {
        assert_eq!(a.len(), b.len());
        let top = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        // bf16 keeps 8 bits: each rounding is within 2^-9 relative, and a few dozen of them
        // (weights, each product's inputs, the output) compound along the tower: 0.5–0.75% of
        // the largest value here, bounded at 2% (a wrong head or value row gives over 50%).
        assert!(
            worst <= 0.02 * top,
            "feature {i}: {worst} against values up to {top}"
        );
        assert!(
            worst > 0.0,
            "feature {i}: the bf16 tower computed nothing in bf16"
        );
    }
}

#[test]
fn placeholders_and_images_must_agree() {
    let f = fixture();
    let ids = f
        .codec
        .encode("<|vision_start|><|image_pad|><|vision_end|>hi")
        .unwrap();
    let e = f.model.prepare(ids, &[]).unwrap_err().to_string();
    assert!(
        e.contains("1 image placeholders (token") && e.contains("for 0 images"),
        "{e}"
    );
}

/// An image sent again (the next turn of a chat, another of `n` choices, at once from several
/// threads) reuses the tower's output instead of running the tower again; another image does
/// not. The goldens above pass through the same reuse.
#[test]
fn an_image_sent_again_reuses_the_towers_output() {
    let f = fixture();
    let ids = f
        .codec
        .encode("a<|vision_start|><|image_pad|><|vision_end|>b")
        .unwrap();
    let one = |name: &str| vec![image(name)];
    let (photo, wide) = (one("photo.jpg"), one("wide.png"));
    let keys = |images: &[_]| {
        let (_, media) = f.model.prepare(ids.clone(), images).unwrap();
        media.unwrap().cache_keys
    };
    let first = keys(&photo);
    assert_eq!(f.model.encodings_reused(), 0);
    assert_eq!(keys(&photo), first);
    assert_eq!(f.model.encodings_reused(), 1);
    keys(&wide);
    assert_eq!(f.model.encodings_reused(), 1, "another image is encoded");
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| f.model.prepare(ids.clone(), &one("small.png")).unwrap());
        }
    });
    assert_eq!(
        f.model.encodings_reused(),
        4,
        "one of four encoded it, three waited"
    );
}

/// A request cancelled while its images are encoded stops before the next image's tower run.
#[test]
fn a_cancelled_request_stops_between_images() {
    let f = fixture();
    let ids = f
        .codec
        .encode("<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>")
        .unwrap();
    let images = [image("photo.jpg"), image("large.png")];
    let asked = std::cell::Cell::new(0);
    let after_one = || {
        asked.set(asked.get() + 1);
        asked.get() > 1
    };
    let e = f.model.prepare_until(ids, &images, &after_one).unwrap_err();
    assert!(matches!(e, pio_engine::EngineError::Cancelled(_)), "{e}");
    assert_eq!(asked.get(), 2, "asked before each image");
}

/// `/tokenize`'s ids come from the images' sizes alone: the same as the vision tower's inputs,
/// for images of several sizes and shapes in one prompt.
#[test]
fn token_ids_without_the_vision_tower_are_the_prepared_prompt() {
    let f = fixture();
    let ids = f
        .codec
        .encode("a<|vision_start|><|image_pad|><|vision_end|>b<|vision_start|><|image_pad|><|vision_end|>c")
        .unwrap();
    for pair in [["small.png", "wide.png"], ["large.png", "photo.jpg"]] {
        let images = pair.map(image);
        let (prepared, _) = f.model.prepare(ids.clone(), &images).unwrap();
        let counted = f.model.token_ids(ids.clone(), &images).unwrap();
        assert!(prepared.len() > ids.len(), "{pair:?}");
        assert_eq!(counted, prepared, "{pair:?}");
    }
    let e = f.model.token_ids(ids, &[]).unwrap_err().to_string();
    assert!(
        e.contains("2 image placeholders (token") && e.contains("for 0 images"),
        "{e}"
    );
}

/// A copy of the fixture with `edit` applied to its config.json.
fn broken(edit: impl Fn(&mut Value), drop: Option<&str>) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join(NAME)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
    if let Some(file) = drop {
        std::fs::remove_file(dir.path().join(file)).unwrap();
    }
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let e = Qwen3Vl::load(
        &checkpoint,
        DType::F32,
        Quantization::None,
        &Device::Cpu,
        &mut |_, _| {},
    )
    .unwrap_err()
    .to_string();
    (dir, e)
}

#[test]
fn impossible_configs_are_refused_naming_the_file_and_field() {
    let (_d, e) = broken(
        |c| c["text_config"]["rope_parameters"]["mrope_section"] = serde_json::json!([6, 5, 4]),
        None,
    );
    assert!(
        e.contains("config.json") && e.contains("mrope_section") && e.contains("16"),
        "{e}"
    );
    let (_d, e) = broken(|c| c["vision_config"]["out_hidden_size"] = 32.into(), None);
    assert!(
        e.contains("vision_config.out_hidden_size") && e.contains("64"),
        "{e}"
    );
    let (_d, e) = broken(|_| {}, Some("preprocessor_config.json"));
    assert!(
        e.contains("preprocessor_config.json") && e.contains("not found"),
        "{e}"
    );
    let (_d, e) = broken(
        |c| c["architectures"] = serde_json::json!(["Qwen3ForCausalLM"]),
        None,
    );
    assert!(e.contains("Qwen3VLForConditionalGeneration"), "{e}");
    // No heads: refused by name before the head width (hidden / heads) is worked out.
    let (_d, e) = broken(
        |c| {
            c["text_config"]["num_attention_heads"] = 0.into();
            c["text_config"]["head_dim"] = serde_json::Value::Null;
        },
        None,
    );
    assert!(
        e.contains("`num_attention_heads`") && e.contains("at least 1"),
        "{e}"
    );
    let (_d, e) = broken(
        |c| c["text_config"]["max_position_embeddings"] = 0.into(),
        None,
    );
    assert!(e.contains("`max_position_embeddings`"), "{e}");
    let (_d, e) = broken(|c| c["text_config"]["rope_theta"] = 0.into(), None);
    assert!(e.contains("`rope_theta`") && e.contains("positive"), "{e}");
    // shortest_edge 4096 pixels of 32 × 32 make every image at least 4 tokens: a context of 4
    // holds none, refused at load instead of at each image after the resize.
    let (_d, e) = broken(
        |c| c["text_config"]["max_position_embeddings"] = 4.into(),
        None,
    );
    assert!(
        e.contains("preprocessor_config.json")
            && e.contains("min_pixels")
            && e.contains("context of 4"),
        "{e}"
    );
    // An image pad past the vocabulary would index past the embedding table.
    let (_d, e) = broken(|c| c["image_token_id"] = 400.into(), None);
    assert!(
        e.contains("config.json") && e.contains("`image_token_id`") && e.contains("vocab_size"),
        "{e}"
    );
}

/// Prompt scores (vLLM's `prompt_logprobs`) of prompts with images in them against transformers'
/// (tests/fixtures/prompt_logprobs.py): each case alone, then all of them at once prefilled in
/// chunks of 5 tokens, so images cut across chunks and KV blocks while their rows are scored.
#[test]
fn prompt_scores_with_images_match_transformers() {
    let f = fixture();
    let scores = common::prompt_score_goldens(NAME);
    let cases = golden()["cases"].as_array().unwrap().clone();
    assert_eq!(scores.len(), cases.len(), "one scored prompt per case");
    let requests: Vec<Request> = cases
        .iter()
        .zip(&scores)
        .map(|(case, want)| {
            assert_eq!(case["name"], want["prompt"]);
            Request {
                max_tokens: 1,
                logprobs: None,
                prompt_logprobs: Some(5),
                ..request(&f, case)
            }
        })
        .collect();
    let chunked = EngineConfig {
        block_size: 4,
        token_budget: 5,
        ..EngineConfig::default()
    };
    for (config, together) in [(EngineConfig::default(), false), (chunked, true)] {
        let engine = Engine::start(f.model.clone(), f.codec.clone(), config).unwrap();
        let outcomes = if together {
            common::run_concurrently(&engine, requests.iter().cloned())
        } else {
            (requests.iter().cloned())
                .map(|r| common::collect(engine.submit(r).unwrap()))
                .collect()
        };
        for ((_, outcome), want) in outcomes.iter().zip(&scores) {
            let got = outcome
                .prompt_logprobs
                .as_ref()
                .expect("the scores asked for");
            common::assert_prompt_scores(got, want);
        }
    }
}
