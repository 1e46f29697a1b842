//! The engine's behaviour on a real (tiny) checkpoint: UTF-8-safe streaming, stop strings across
//! tokens, seeds, the context limit, and errors for broken snapshots that name what is wrong.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use pio_engine::candle_core::{DType, Device};
use pio_engine::checkpoint::Checkpoint;
use std::sync::Arc;

use pio_engine::generate::{Emitted, Finish, Request};
use pio_engine::sampling::SamplingParams;
use pio_engine::serving::{Engine, EngineConfig};
use pio_engine::text::{StreamDecoder, TextCodec};
use pio_engine::EngineError;
use pio_plugin_qwen3::model::Qwen3;

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen3-tiny")
}

/// The tiny checkpoint served by an engine, and its codec.
fn load() -> (Engine, TextCodec) {
    let checkpoint = Checkpoint::open(&tiny()).unwrap();
    let model = Qwen3::load(&checkpoint, DType::F32, &Device::Cpu, &mut |_, _| {}).unwrap();
    let engine = Engine::start(
        Arc::new(model),
        Arc::new(TextCodec::load(&checkpoint).unwrap()),
        EngineConfig::default(),
    )
    .unwrap();
    (engine, TextCodec::load(&checkpoint).unwrap())
}

fn run(engine: &Engine, _codec: &TextCodec, request: &Request) -> (Vec<Emitted>, Finish) {
    let mut out = Vec::new();
    let outcome = engine
        .generate(request.clone(), &mut |e| {
            out.push(e);
            true
        })
        .unwrap();
    (out, outcome.finish)
}

fn request(codec: &TextCodec, prompt: &str, max_tokens: usize) -> Request {
    Request {
        prompt: codec.encode(prompt).unwrap(),
        max_tokens,
        ..Request::default()
    }
}

#[test]
fn streaming_never_splits_a_character() {
    let (_, codec) = load();
    let text = "Le café est très 中文 🙂 naïve";
    let ids = codec.encode(text).unwrap();
    // The tiny vocabulary splits the multi-byte characters into byte tokens.
    assert!(ids.len() > text.chars().count() / 2);
    let mut decoder = StreamDecoder::new();
    let mut pieces = Vec::new();
    for id in ids {
        pieces.push(decoder.push(&codec, id));
    }
    pieces.push(decoder.finish(&codec));
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert!(
        pieces.iter().any(String::is_empty),
        "some token completed no character: {pieces:?}"
    );
    assert_eq!(pieces.concat(), text);
}

#[test]
fn a_stop_string_spanning_tokens_ends_generation_before_it() {
    let (model, codec) = load();
    let (free, _) = run(&model, &codec, &request(&codec, "Hello world", 12));
    let text: String = free.iter().map(|e| e.text.as_str()).collect();
    // A stop string made of the end of one token's text and the start of a later one's.
    let pieces: Vec<&str> = free
        .iter()
        .map(|e| e.text.as_str())
        .filter(|t| !t.is_empty())
        .collect();
    let stop = format!(
        "{}{}",
        pieces[2].chars().last().unwrap(),
        pieces[3].chars().next().unwrap()
    );
    let expected = &text[..text.find(&stop).unwrap()];
    let mut with_stop = request(&codec, "Hello world", 12);
    with_stop.stop = vec![stop.clone()];
    let (out, finish) = run(&model, &codec, &with_stop);
    let got: String = out.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(finish, Finish::Stop);
    assert_eq!(got, expected, "stop {stop:?} in {text:?}");
}

#[test]
fn seeds_make_sampling_reproducible() {
    let (model, codec) = load();
    let sample = |seed| {
        let mut r = request(&codec, "Hello world", 10);
        r.sampling = SamplingParams {
            temperature: Some(1.0),
            seed: Some(seed),
            ..SamplingParams::default()
        };
        run(&model, &codec, &r)
            .0
            .into_iter()
            .map(|e| e.token_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(sample(1), sample(1));
    assert_ne!(sample(1), sample(2));
}

#[test]
fn max_tokens_and_eos_end_generation() {
    let (model, codec) = load();
    let (out, finish) = run(&model, &codec, &request(&codec, "Hello world", 3));
    assert_eq!((out.len(), finish), (3, Finish::Length));
    let first = out[0].token_id;
    let mut r = request(&codec, "Hello world", 10);
    r.eos = vec![first];
    let (out, finish) = run(&model, &codec, &r);
    assert_eq!(
        (out.len(), finish, out[0].text.as_str()),
        (1, Finish::Stop, "")
    );
}

#[test]
fn a_prompt_longer_than_the_context_is_refused() {
    let (model, _) = load();
    let r = Request {
        prompt: vec![5; 300],
        max_tokens: 4,
        ..Request::default()
    };
    let e = model.generate(r, &mut |_| true).unwrap_err();
    assert!(matches!(e, EngineError::ContextLength(_)));
    assert!(
        e.to_string().contains("300 tokens") && e.to_string().contains("256"),
        "{e}"
    );
}

fn broken_copy(edit: impl FnOnce(&Path)) -> tempfile_dir::Dir {
    let dir = tempfile_dir::Dir::new();
    for entry in std::fs::read_dir(tiny()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    edit(dir.path());
    dir
}

fn load_error(dir: &Path) -> String {
    let checkpoint = Checkpoint::open(dir).unwrap();
    Qwen3::load(&checkpoint, DType::F32, &Device::Cpu, &mut |_, _| {})
        .unwrap_err()
        .to_string()
}

#[test]
fn broken_snapshots_name_the_file_field_or_tensor() {
    let dir =
        broken_copy(|d| std::fs::remove_file(d.join("model-00003-of-00005.safetensors")).unwrap());
    let e = load_error(dir.path());
    assert!(
        e.contains("model-00003-of-00005.safetensors") && e.contains("not found"),
        "{e}"
    );

    // The config promises a fourth layer the weights do not have.
    let dir = broken_copy(|d| {
        let config = std::fs::read_to_string(d.join("config.json")).unwrap();
        std::fs::write(
            d.join("config.json"),
            config.replace("\"num_hidden_layers\": 3", "\"num_hidden_layers\": 4"),
        )
        .unwrap();
    });
    let e = load_error(dir.path());
    assert!(
        e.contains("model.layers.3."),
        "names the missing tensor: {e}"
    );

    let dir = broken_copy(|d| {
        let config = std::fs::read_to_string(d.join("config.json")).unwrap();
        std::fs::write(
            d.join("config.json"),
            config.replace("\"intermediate_size\": 160", "\"intermediate_size\": 128"),
        )
        .unwrap();
    });
    let e = load_error(dir.path());
    assert!(
        e.contains("mlp") && e.contains("128") && e.contains("160"),
        "expected versus found shape: {e}"
    );

    let dir = broken_copy(|d| {
        let config = std::fs::read_to_string(d.join("config.json")).unwrap();
        std::fs::write(
            d.join("config.json"),
            config.replace("Qwen3ForCausalLM", "LlamaForCausalLM"),
        )
        .unwrap();
    });
    let e = load_error(dir.path());
    assert!(
        e.contains("architectures") && e.contains("LlamaForCausalLM"),
        "{e}"
    );

    let dir =
        broken_copy(|d| std::fs::write(d.join("config.json"), "{\"vocab_size\": 10").unwrap());
    let e = load_error(dir.path());
    assert!(e.contains("config.json"), "{e}");

    let dir = broken_copy(|d| std::fs::remove_file(d.join("tokenizer.json")).unwrap());
    let e = TextCodec::load(&Checkpoint::open(dir.path()).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("not found"),
        "{e}"
    );
}

/// A temporary directory without another dependency.
mod tempfile_dir {
    pub struct Dir(std::path::PathBuf);

    impl Dir {
        pub fn new() -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("pio-engine-test-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
