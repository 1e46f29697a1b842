//! GGUF files written by llama.cpp's own converter and llama-quantize from the fixtures
//! (tests/fixtures/gguf.py): served unchanged, with their tokenizer, chat template and sampling
//! defaults from the metadata, matching transformers (F32) or the snapshot's own weights in the
//! same precision (F16, BF16), and within measured bounds of f32 when quantized.

#![allow(clippy::unwrap_used)]

use pio_engine::candle_core::quantized::{GgmlDType, QTensor};
use pio_engine::candle_core::{DType, Device, Module};
use pio_engine::chat::ChatTemplate;
use pio_engine::checkpoint::Checkpoint;
use pio_engine::generate::CausalLm;
use pio_engine::generation_config::GenerationConfig;
use pio_engine::linear::{Linear, Quantization};
use pio_engine::models::qwen3::{Qwen3, Qwen3Moe};
use pio_engine::runtime::LoadModel;
use pio_engine::text::TextCodec;

mod common;

use common::{agreement, check_against, distributions, fixtures};

fn gguf(name: &str) -> std::path::PathBuf {
    fixtures().join("gguf").join(name)
}

#[test]
fn an_f32_gguf_matches_transformers_with_its_own_tokenizer_and_template() {
    // The prompts are encoded (chats rendered) with what the file carries and checked against
    // transformers' token ids before the outputs are.
    check_against::<Qwen3>("gguf/qwen3-tiny.f32.gguf", "qwen3-tiny");
}

#[test]
fn half_precision_ggufs_equal_the_snapshot_in_that_precision() {
    // The converter rounds f32 to f16/bf16 as the engine does when it loads the snapshot in that
    // dtype (norms stay f32 in the file and are rounded at load either way): the same values,
    // the same products.
    let snapshot = fixtures().join("qwen3-tiny");
    for (file, dtype) in [
        ("qwen3-tiny.f16.gguf", DType::F16),
        ("qwen3-tiny.bf16.gguf", DType::BF16),
    ] {
        let want = distributions::<Qwen3>(&snapshot, "qwen3-tiny", dtype, Quantization::None);
        let got = distributions::<Qwen3>(&gguf(file), "qwen3-tiny", dtype, Quantization::None);
        let worst = want
            .iter()
            .flatten()
            .zip(got.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("{file}: max |Δ logprob| {worst}");
        assert!(worst < 1e-4, "{file}: {worst}");
    }
}

/// (agreement, mean, max) of GGUF `file` loaded as stored against `snapshot` in f32.
fn against_f32<M: LoadModel + CausalLm>(snapshot: &str, file: &str) -> (f32, f32, f32) {
    let exact = distributions::<M>(
        &gguf(snapshot),
        "qwen3-tiny",
        DType::F32,
        Quantization::None,
    );
    let got = distributions::<M>(&gguf(file), "qwen3-tiny", DType::F32, Quantization::None);
    let figures = agreement(&exact, &got);
    println!(
        "{file}: top-1 agreement {:.3}, |Δ logprob| mean {:.4} max {:.4} over {} steps",
        figures.0,
        figures.1,
        figures.2,
        exact.len()
    );
    figures
}

// Measured (deterministic: fixed files, fixed kernels), 80 steps each, each file loaded as stored
// against its snapshot in f32:
//   qwen3-wide.q8_0      agreement 0.950, |Δ| mean 0.031, max 0.088
//   qwen3-wide.q4_0      agreement 0.525, |Δ| mean 0.39,  max 1.34  (head Q6_K)
//   qwen3-wide.q4_k_m    agreement 0.562, |Δ| mean 0.35,  max 0.89  (Q4_K, Q6_K head and more)
//   qwen3-moe-gguf.q8_0  agreement 0.950, |Δ| mean 0.022, max 0.22
// As in quantized.rs, random fixtures have flat distributions, so 4 bits flip the argmax often;
// a misread block layout, scale or expert slice gives near-chance agreement and errors of
// several nats. Bounds ~30% outside the figures.

#[test]
fn quantized_ggufs_stay_near_f32() {
    for (agree, mean, max) in [
        against_f32::<Qwen3>("qwen3-wide", "qwen3-wide.q8_0.gguf"),
        against_f32::<Qwen3Moe>("qwen3-moe-gguf", "qwen3-moe-gguf.q8_0.gguf"),
    ] {
        assert!(
            agree >= 0.85 && mean < 0.05 && max < 0.3,
            "{agree} {mean} {max}"
        );
    }
    for (agree, mean, max) in [
        against_f32::<Qwen3>("qwen3-wide", "qwen3-wide.q4_0.gguf"),
        against_f32::<Qwen3>("qwen3-wide", "qwen3-wide.q4_k_m.gguf"),
    ] {
        assert!(
            agree >= 0.35 && mean < 0.5 && max < 1.8,
            "{agree} {mean} {max}"
        );
    }
}

/// The Euclidean norm of all of `t`'s values.
fn l2(t: &pio_engine::candle_core::Tensor) -> f32 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt()
}

#[test]
fn quantized_tensors_are_used_as_stored() {
    let snapshot = Checkpoint::open(&gguf("qwen3-wide")).unwrap();
    let exact = snapshot.weights(DType::F32, &Device::Cpu).unwrap();
    for (file, want, head_format) in [
        ("qwen3-wide.q8_0.gguf", GgmlDType::Q8_0, GgmlDType::Q8_0),
        ("qwen3-wide.q4_0.gguf", GgmlDType::Q4_0, GgmlDType::Q6K),
        ("qwen3-wide.q4_k_m.gguf", GgmlDType::Q4K, GgmlDType::Q6K),
    ] {
        let checkpoint = Checkpoint::open(&gguf(file)).unwrap();
        // Whatever the manifest's quantization: the file decides.
        let vb = checkpoint.weights(DType::F32, &Device::Cpu).unwrap();
        let at = "model.layers.1.mlp.up_proj";
        let blocks = Linear::stored_blocks(256, 256, &vb.pp(at))
            .unwrap()
            .unwrap();
        assert_eq!(blocks.dtype(), want, "{file}");
        let head = Linear::stored_blocks(256, 400, &vb.pp("lm_head"))
            .unwrap()
            .unwrap();
        assert_eq!(head.dtype(), head_format, "{file}");
        // The layer over those bytes (packed into tiles without a QTensor between) computes what
        // the stored blocks do; only the activations' 8-bit rounding stands between them.
        let layer = Linear::stored(256, 400, &vb.pp("lm_head"))
            .unwrap()
            .unwrap();
        assert!(layer.is_quantized(), "{file}");
        let x = common::testing::normal(0.0, 1.0, (3, 256), &Device::Cpu, 1);
        let got = layer.forward(&x).unwrap();
        let dense = head.dequantize(&Device::Cpu).unwrap();
        let expected = x.matmul(&dense.t().unwrap()).unwrap();
        let rel = l2(&(got - &expected).unwrap()) / l2(&expected);
        assert!(rel < 0.02, "{file}: {rel}");
        // Weights stored as values are not "stored quantized".
        assert!(Linear::stored(256, 256, &exact.pp(at)).unwrap().is_none());
        let values = exact.get((256, 256), &format!("{at}.weight")).unwrap();
        let ours = QTensor::quantize(&values, want).unwrap();
        if want == GgmlDType::Q4K {
            // llama-quantize searches Q4_K's scales harder than ggml's reference quantizer (the
            // engine's): other bytes, as close to the values.
            let error = |q: &QTensor| {
                let d = (q.dequantize(&Device::Cpu).unwrap() - &values).unwrap();
                l2(&d) / l2(&values)
            };
            let (theirs, mine) = (error(&blocks), error(&ours));
            assert!(theirs < 0.1 && theirs <= mine * 1.05, "{theirs} vs {mine}");
        } else {
            // gguf-py and llama-quantize round as ggml's reference quantizers do.
            assert!(blocks.data().unwrap() == ours.data().unwrap(), "{file}");
        }
    }
}

#[test]
fn what_cannot_be_read_is_refused_by_name() {
    let load = |path: &std::path::Path| -> String {
        let checkpoint = match Checkpoint::open(path) {
            Ok(c) => c,
            Err(e) => return e.to_string(),
        };
        <Qwen3 as LoadModel>::load(
            &checkpoint,
            DType::F32,
            Quantization::None,
            &Device::Cpu,
            &mut |_, _| {},
        )
        .map(|_| String::new())
        .unwrap_or_else(|e| e.to_string())
    };
    let e = load(&gguf("qwen3-tiny.q5_0.gguf"));
    assert!(
        e.contains("qwen3-tiny.q5_0.gguf") && e.contains("Q5_0") && e.contains("blk.0."),
        "{e}"
    );
    assert!(e.contains("Q4_K_M"), "says what to do: {e}");
    let e = load(&gguf("qwen3-moe-gguf.q8_0.gguf"));
    assert!(
        e.contains("general.architecture") && e.contains("Qwen3ForCausalLM"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(gguf("qwen3-tiny.f32.gguf")).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let e = load(&cut);
    assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");
    // A tensor whose offset, added to where the data begins, wraps around: refused, not read.
    let name = b"token_embd.weight";
    let at = (bytes.windows(name.len()))
        .position(|w| w == name)
        .expect("the embedding's tensor info")
        + name.len();
    let dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let offset = at + 4 + 8 * dims + 4;
    let mut wraps = bytes.clone();
    wraps[offset..offset + 8].copy_from_slice(&(u64::MAX - 10).to_le_bytes());
    let wrapped = dir.path().join("wraps.gguf");
    std::fs::write(&wrapped, &wraps).unwrap();
    let e = load(&wrapped);
    assert!(
        e.contains("wraps.gguf") && e.contains("token_embd.weight") && e.contains("overflow"),
        "{e}"
    );
    let e = load(&gguf("qwen3-wide/config.json"));
    assert!(e.contains("not a GGUF file"), "{e}");
    // A folder holding one GGUF serves it; two are ambiguous.
    let folder = dir.path().join("model");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("a.gguf"), &bytes).unwrap();
    assert_eq!(load(&folder), "");
    std::fs::write(folder.join("b.gguf"), &bytes).unwrap();
    let e = load(&folder);
    assert!(e.contains("a.gguf, b.gguf"), "{e}");
}

/// `from`'s bytes with `key` (a metadata key) renamed to `to`, the same length so that no offset
/// moves, written to `dir/name`.
fn renamed(
    from: &[u8],
    key: &str,
    to: &str,
    dir: &std::path::Path,
    name: &str,
) -> std::path::PathBuf {
    assert_eq!(key.len(), to.len());
    let mut bytes = from.to_vec();
    let at = (bytes.windows(key.len()))
        .position(|w| w == key.as_bytes())
        .unwrap_or_else(|| panic!("no {key}"));
    bytes[at..at + key.len()].copy_from_slice(to.as_bytes());
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A header with one `general.alignment` (u32) key and no tensors.
fn aligned(alignment: u32, dir: &std::path::Path) -> std::path::PathBuf {
    aligned_as(4, &alignment.to_le_bytes(), &format!("{alignment}"), dir)
}

/// [`aligned`] with the alignment's value written as GGUF type `kind` (4 is u32, 10 u64).
fn aligned_as(kind: u32, value: &[u8], name: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let key = b"general.alignment";
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    bytes.extend_from_slice(&1u64.to_le_bytes());
    bytes.extend_from_slice(&(key.len() as u64).to_le_bytes());
    bytes.extend_from_slice(key);
    bytes.extend_from_slice(&kind.to_le_bytes());
    bytes.extend_from_slice(value);
    let path = dir.join(format!("aligned-{name}.gguf"));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn hostile_headers_and_vocabularies_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = |path: &std::path::Path| {
        let checkpoint = Checkpoint::open(path).unwrap();
        checkpoint
            .gguf_tokenizer()
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let bytes = std::fs::read(gguf("qwen3-tiny.f32.gguf")).unwrap();
    // Without merges every word would be split into characters; without types the control
    // tokens would be spelled out: both are refused, not served wrongly.
    for (key, to) in [
        ("tokenizer.ggml.merges", "tokenizer.ggml.mergez"),
        ("tokenizer.ggml.token_type", "tokenizer.ggml.token_typf"),
    ] {
        let path = renamed(&bytes, key, to, dir.path(), "renamed.gguf");
        let e = tokenizer(&path);
        assert!(e.contains("renamed.gguf") && e.contains(key), "{e}");
    }
    // candle divides by the alignment: 0 was a panic, 3 a misread.
    for alignment in [0, 3] {
        let e = Checkpoint::open(&aligned(alignment, dir.path()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("aligned-{alignment}.gguf")) && e.contains("general.alignment"),
            "{e}"
        );
    }
    assert!(Checkpoint::open(&aligned(64, dir.path())).is_ok());
    // A u64 alignment: candle places tensors by 32 whatever it says, so it is refused.
    let e = Checkpoint::open(&aligned_as(10, &64u64.to_le_bytes(), "u64", dir.path()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("aligned-u64.gguf") && e.contains("general.alignment") && e.contains("u32"),
        "{e}"
    );
    // A layer count past the tensors: refused at once, not looped over.
    let moe = std::fs::read(gguf("qwen3-moe-gguf.q8_0.gguf")).unwrap();
    let key = b"qwen3moe.block_count";
    let at = moe.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    assert_eq!(
        u32::from_le_bytes(moe[at..at + 4].try_into().unwrap()),
        4,
        "u32 type"
    );
    let mut huge = moe.clone();
    huge[at + 4..at + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    let path = dir.path().join("layers.gguf");
    std::fs::write(&path, huge).unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    let e = checkpoint
        .config::<serde_json::Value>()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("qwen3moe.block_count") && e.contains("4294967295"),
        "{e}"
    );
}

#[test]
fn tokenizer_template_and_defaults_come_from_the_metadata() {
    let snapshot = Checkpoint::open(&fixtures().join("qwen3-tiny")).unwrap();
    let file = Checkpoint::open(&gguf("qwen3-tiny.f32.gguf")).unwrap();
    let (want, got) = (
        TextCodec::load(&snapshot).unwrap(),
        TextCodec::load(&file).unwrap(),
    );
    let texts = [
        "Hello world! The quick brown fox jumps over the lazy dog.",
        "def add(a, b):\n    return a + b\n\n\n  x",
        "Le café est très bon. Über naïve façade, São Paulo, Zürich.",
        "中文测试，你好世界。日本語のテキスト。한국어 문장. 🦙🦙",
        "<|im_start|>user\n<think>hmm</think><tool_call>{}</tool_call><|im_end|>",
    ];
    for text in texts {
        let ids = want.encode(text).unwrap();
        assert_eq!(got.encode(text).unwrap(), ids, "{text:?}");
        assert_eq!(got.decode(&ids), want.decode(&ids), "{text:?}");
    }
    for id in 0..400 {
        assert_eq!(got.token_bytes(id), want.token_bytes(id), "token {id}");
    }
    assert_eq!(got.control_ids(), want.control_ids());
    let messages: Vec<serde_json::Value> = serde_json::from_str(
        r#"[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"}]"#,
    )
    .unwrap();
    let render = |c: &Checkpoint| {
        ChatTemplate::load(c)
            .unwrap()
            .unwrap()
            .render(&messages, None, true, &Default::default())
            .unwrap()
    };
    assert_eq!(render(&file), render(&snapshot));
    let (want, got) = (
        GenerationConfig::load(&snapshot).unwrap(),
        GenerationConfig::load(&file).unwrap(),
    );
    // The file names one end-of-sequence token (<|im_end|>); <|endoftext|>, which the
    // snapshot's generation_config.json lists too, is found by its text.
    assert_eq!(got.eos_token_id, want.eos_token_id);
    assert_eq!(
        (got.temperature, got.top_p, got.top_k, got.do_sample),
        (want.temperature, want.top_p, want.top_k, want.do_sample)
    );
}

/// Loads `path` in q8 with its quantization cache in `cache`: how many tensors came from the
/// cache, and the model's weight bytes.
fn cached_load(path: &std::path::Path, cache: &std::path::Path) -> (usize, usize) {
    let checkpoint = Checkpoint::open(path)
        .unwrap()
        .with_quantization_cache(cache, "q8")
        .unwrap();
    let model = <Qwen3 as LoadModel>::load(
        &checkpoint,
        DType::F32,
        Quantization::Q8,
        &Device::Cpu,
        &mut |_, _| {},
    )
    .unwrap();
    let cache = checkpoint.quantization_cache().unwrap();
    let hits = cache.hits();
    cache.finish().unwrap();
    (hits, Qwen3::weight_bytes(&model))
}

#[test]
fn a_float_gguf_is_quantized_as_configured_and_cached() {
    // The same f32 values as the snapshot, through the same quantizer: the same model.
    let snapshot = fixtures().join("qwen3-tiny");
    let want = distributions::<Qwen3>(&snapshot, "qwen3-tiny", DType::F32, Quantization::Q8);
    let file = gguf("qwen3-tiny.f32.gguf");
    let got = distributions::<Qwen3>(&file, "qwen3-tiny", DType::F32, Quantization::Q8);
    assert_eq!(got, want);
    let dir = tempfile::tempdir().unwrap();
    let load = || cached_load(&file, dir.path());
    let (first, bytes) = load();
    let (second, again) = load();
    assert_eq!((first, again), (0, bytes));
    assert!(
        second >= 3 * 7,
        "every layer's projections from the cache: {second}"
    );
}

/// Two GGUF files in one folder keep a cache each (they used to share, and rewrite, one file
/// named after the folder), and a cache folder that is the model folder still holds one model.
#[test]
fn ggufs_beside_each_other_keep_their_own_caches() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir(&models).unwrap();
    for name in ["a.gguf", "b.gguf"] {
        std::fs::copy(gguf("qwen3-tiny.f32.gguf"), models.join(name)).unwrap();
    }
    let hits = |path: &std::path::Path, cache: &std::path::Path| cached_load(path, cache).0;
    let caches = dir.path().join("caches");
    std::fs::create_dir(&caches).unwrap();
    let (a, b) = (models.join("a.gguf"), models.join("b.gguf"));
    assert_eq!((hits(&a, &caches), hits(&b, &caches)), (0, 0));
    assert!(hits(&a, &caches) > 0, "a's cache survived b's");
    // The model's own folder as the cache: the folder still names one model.
    let alone = dir.path().join("alone");
    std::fs::create_dir(&alone).unwrap();
    std::fs::copy(gguf("qwen3-tiny.f32.gguf"), alone.join("m.gguf")).unwrap();
    assert_eq!(hits(&alone, &alone), 0);
    assert!(
        hits(&alone, &alone) > 0,
        "the cache beside it is not a second model"
    );
}

/// A GGUF (version 3) of `keys` (u32 values) and `tensors` (name, dims as llama.cpp lists them,
/// row length first, ggml type: 0 f32, 8 q8_0), their data zeros.
fn written(
    keys: &[(&str, u32)],
    tensors: &[(&str, &[u64], u32)],
    path: &std::path::Path,
) -> std::path::PathBuf {
    let text = |bytes: &mut Vec<u8>, s: &str| {
        bytes.extend_from_slice(&(s.len() as u64).to_le_bytes());
        bytes.extend_from_slice(s.as_bytes());
    };
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&(keys.len() as u64).to_le_bytes());
    for (key, value) in keys {
        text(&mut bytes, key);
        bytes.extend_from_slice(&4u32.to_le_bytes());
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    let mut offset = 0u64;
    for (name, dims, kind) in tensors {
        text(&mut bytes, name);
        bytes.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in *dims {
            bytes.extend_from_slice(&d.to_le_bytes());
        }
        bytes.extend_from_slice(&kind.to_le_bytes());
        bytes.extend_from_slice(&offset.to_le_bytes());
        let values: u64 = dims.iter().product();
        let size = match kind {
            8 => values.div_ceil(32) * 34,
            _ => values * 4,
        };
        offset += size.div_ceil(32) * 32;
    }
    bytes.resize(bytes.len().div_ceil(32) * 32 + offset as usize, 0);
    std::fs::write(path, bytes).unwrap();
    path.to_owned()
}

/// Layouts llama.cpp refuses at open are refused at open, by name: two tensors or keys of one
/// name (candle kept the last), rows that are not whole quantization blocks (they failed later
/// in a kernel's shape check naming neither tensor nor file).
#[test]
fn repeated_names_and_partial_blocks_are_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let open = |keys: &[(&str, u32)], tensors: &[(&str, &[u64], u32)], name: &str| {
        let path = written(keys, tensors, &dir.path().join(name));
        Checkpoint::open(&path)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let whole = open(
        &[("a", 1)],
        &[("t", &[32, 2], 8), ("u", &[4], 0)],
        "whole.gguf",
    );
    assert!(whole.is_ok(), "{whole:?}");
    let e = open(&[], &[("t", &[4], 0), ("t", &[4], 0)], "tensors.gguf").unwrap_err();
    assert!(e.contains("tensors.gguf") && e.contains("2 tensors"), "{e}");
    let e = open(&[("a", 1), ("a", 2)], &[], "keys.gguf").unwrap_err();
    assert!(
        e.contains("keys.gguf") && e.contains("2 metadata keys"),
        "{e}"
    );
    let e = open(&[], &[("blk.0.attn_q.weight", &[33, 32], 8)], "rows.gguf").unwrap_err();
    assert!(
        e.contains("rows.gguf") && e.contains("blk.0.attn_q.weight") && e.contains("33 values"),
        "{e}"
    );
}

/// A folder holding one GGUF and a `config.json` but no safetensors serves the GGUF (some GGUF
/// repositories ship the config beside the file): it was read as a snapshot whose weights were
/// missing, the GGUF beside them never named.
#[test]
fn a_gguf_beside_a_config_json_is_served() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(gguf("qwen3-tiny.f32.gguf"), dir.path().join("m.gguf")).unwrap();
    std::fs::copy(
        fixtures().join("qwen3-tiny/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    assert!(
        checkpoint.gguf_tokenizer().unwrap().is_some(),
        "read as the GGUF"
    );
    assert!(
        checkpoint.config_path().ends_with("m.gguf"),
        "{:?}",
        checkpoint.config_path()
    );
    // With safetensors beside them, it is the snapshot.
    std::fs::write(dir.path().join("model.safetensors"), b"").unwrap();
    let snapshot = Checkpoint::open(dir.path()).unwrap();
    assert!(snapshot.gguf_tokenizer().unwrap().is_none());
}

/// A GGUF without a vocabulary, its `tokenizer.json` beside it in the folder, still gives its
/// chat template and defaults (they asked for the vocabulary the file lacks, and the error
/// told to put tokenizer.json beside it, where it was).
#[test]
fn a_gguf_without_a_vocabulary_reads_the_tokenizer_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(gguf("qwen3-tiny.f32.gguf")).unwrap();
    renamed(
        &bytes,
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.tokenz",
        dir.path(),
        "m.gguf",
    );
    std::fs::copy(
        fixtures().join("qwen3-tiny/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let template = ChatTemplate::load(&checkpoint).unwrap();
    assert!(template.is_some(), "the file's template");
    let codec = TextCodec::load(&checkpoint).unwrap();
    assert!(!codec.encode("hello").unwrap().is_empty());
    GenerationConfig::load(&checkpoint).unwrap();
}
