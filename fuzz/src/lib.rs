//! Fuzz targets: each takes arbitrary bytes to one of PIO's parsers of untrusted input and must
//! return, whatever the bytes, without a panic, a hang or an unbounded allocation (errors are the
//! expected outcome). `fuzz/run.sh` runs them under libFuzzer; `tests/corpus.rs` replays their
//! seed corpora and every input that once failed, on every `cargo test`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use pio_engine::candle_core::{DType, Device};
use pio_engine::chat::ChatTemplate;
use pio_engine::checkpoint::Checkpoint;
use pio_engine::images::{decode, DecodeLimits};
use pio_engine::linear::Quantization;
use pio_engine::models::glm4_moe_lite::Glm4MoeLite;
use pio_engine::models::qwen3::Qwen3;
use pio_engine::runtime::LoadModel;
use pio_host::config::Config;
use pio_host::manifest::Manifest;
use pio_host::protocol::{read_frame, FromWorker, ToWorker};
use pio_host::serve::openai::{self, Endpoint, Limits};
use pio_host::serve::tool_calls::{self, StreamFilter};
use pio_host::serve::{reasoning, tool_calls::Format};
use pio_plugin_api::Capabilities;
use serde_json::{json, Value};

/// A fuzz target: arbitrary bytes in, nothing out (a panic is the failure).
pub type Target = fn(&[u8]);

/// Every target, by name (as `fuzz/run.sh` and the corpus folders name them).
pub const TARGETS: [(&str, Target); 7] = [
    ("manifest", manifest),
    ("frames", frames),
    ("openai", openai),
    ("checkpoint", checkpoint),
    ("chat_template", chat_template),
    ("tool_calls", tool_calls),
    ("images", images),
];

/// The repository's test fixtures.
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// A plugin manifest and the daemon's configuration file, as TOML.
pub fn manifest(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = Manifest::parse(Path::new("fuzz.toml"), &text);
    let _ = pio_host::tomlfile::parse::<Config>(Path::new("pio.toml"), &text);
}

/// The worker protocol's frames, both directions: length-prefixed JSON until the bytes end or a
/// frame is refused.
pub fn frames(data: &[u8]) {
    let mut r = data;
    while let Ok(Some(_)) = read_frame::<ToWorker>(&mut r) {}
    let mut r = data;
    while let Ok(Some(_)) = read_frame::<FromWorker>(&mut r) {}
}

/// An OpenAI request body through the daemon's parsing and checks, for both endpoints and a
/// model that can do everything.
pub fn openai(data: &[u8]) {
    let Ok(mut body) = openai::body_json(data) else {
        return;
    };
    let _ = openai::model_of(&mut body, || vec!["a".to_string(), "b".to_string()]);
    let all = [
        Capabilities::TEXT,
        Capabilities::CHAT,
        Capabilities::TOOLS,
        Capabilities::VISION,
        Capabilities::LOGPROBS,
    ]
    .into_iter()
    .fold(Capabilities::empty(), Capabilities::union);
    let limits = Limits {
        max_tokens: 4096,
        image_root: None,
    };
    for endpoint in [Endpoint::Chat, Endpoint::Completions] {
        let _ = openai::parse(&body, endpoint, all, &limits);
    }
}

/// Copies of the tiny Qwen3 and GLM checkpoints whose files the checkpoint target replaces.
struct Snapshots {
    _root: tempfile::TempDir,
    qwen3: PathBuf,
    qwen3_single: PathBuf,
    glm: PathBuf,
    /// A folder for one `.gguf` file (the input).
    gguf: PathBuf,
}

fn snapshots() -> &'static Snapshots {
    static SNAPSHOTS: OnceLock<Snapshots> = OnceLock::new();
    SNAPSHOTS.get_or_init(|| {
        let root = tempfile::tempdir().expect("a temporary folder");
        let copy = |from: &str, to: &str| {
            let dest = root.path().join(to);
            std::fs::create_dir_all(&dest).expect("a snapshot folder");
            for entry in std::fs::read_dir(fixtures().join(from)).expect("the fixture") {
                let entry = entry.expect("a fixture file");
                std::fs::copy(entry.path(), dest.join(entry.file_name())).expect("a copy");
            }
            dest
        };
        let qwen3 = copy("qwen3-tiny", "qwen3");
        let glm = copy("glm4-moe-lite-tiny", "glm");
        let qwen3_single = root.path().join("single");
        std::fs::create_dir_all(&qwen3_single).expect("a snapshot folder");
        for name in ["config.json", "generation_config.json"] {
            std::fs::copy(qwen3.join(name), qwen3_single.join(name)).expect("a copy");
        }
        let gguf = root.path().join("gguf");
        std::fs::create_dir_all(&gguf).expect("a GGUF folder");
        Snapshots {
            _root: root,
            qwen3,
            qwen3_single,
            glm,
            gguf,
        }
    })
}

/// A checkpoint with one file replaced by the input (after its first byte, which picks the
/// file): Qwen3's or GLM's `config.json`, the shard index, a whole `model.safetensors`, or a
/// whole `.gguf` file (metadata, tensor table and data: a Qwen3 from it); then the model loads
/// as the plugins load it.
pub fn checkpoint(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let s = snapshots();
    let (dir, file) = match which % 5 {
        0 => (&s.qwen3, "config.json"),
        1 => (&s.qwen3, "model.safetensors.index.json"),
        2 => (&s.qwen3_single, "model.safetensors"),
        3 => (&s.glm, "config.json"),
        _ => (&s.gguf, "model.gguf"),
    };
    let path = dir.join(file);
    let original = std::fs::read(&path).ok();
    if std::fs::write(&path, body).is_err() {
        return;
    }
    if let Ok(checkpoint) = Checkpoint::open(dir) {
        let (dtype, device, q) = (DType::F32, Device::Cpu, Quantization::None);
        let mut progress = |_: usize, _: usize| {};
        if which % 5 == 3 {
            let _ = Glm4MoeLite::load(&checkpoint, dtype, q, &device, &mut progress);
        } else {
            let _ = <Qwen3 as LoadModel>::load(&checkpoint, dtype, q, &device, &mut progress);
        }
    }
    // The next input starts from the real file again.
    match original {
        Some(bytes) => {
            let _ = std::fs::write(&path, bytes);
        }
        None => {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The four real chat templates, from the fixtures.
fn templates() -> &'static [ChatTemplate] {
    static TEMPLATES: OnceLock<Vec<ChatTemplate>> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        [
            "qwen3-tiny",
            "qwen3-moe-tiny",
            "glm4-moe-lite-tiny",
            "qwen3-vl-tiny",
        ]
        .iter()
        .filter_map(|name| {
            let checkpoint = Checkpoint::open(&fixtures().join(name)).ok()?;
            ChatTemplate::load(&checkpoint).ok().flatten()
        })
        .collect()
    })
}

/// Hostile messages and tools (`{"messages": [...], "tools": [...], ...extra}`) rendered by
/// every real chat template.
pub fn chat_template(data: &[u8]) {
    let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let messages = match body.remove("messages") {
        Some(Value::Array(m)) => m,
        _ => return,
    };
    let tools = match body.remove("tools") {
        Some(Value::Array(t)) => Some(t),
        _ => None,
    };
    for template in templates() {
        let _ = template.render(&messages, tools.as_deref(), true, &body);
    }
}

/// Tools with every kind of parameter, for the typed parsers.
fn tools() -> &'static [Value] {
    static TOOLS: OnceLock<Vec<Value>> = OnceLock::new();
    TOOLS.get_or_init(|| {
        vec![
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "scale": {"type": "number"},
                "metric": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "where": {"type": "object"},
                "either": {"anyOf": [{"type": "string"}, {"type": "integer"}]}
            }}}}),
        ]
    })
}

/// Model output through the tool-call parsers (whole and streamed in pieces) and the
/// reasoning splitter. The first byte picks the format and the piece sizes.
pub fn tool_calls(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(body);
    let format = [Format::Hermes, Format::Qwen3Coder, Format::Glm47][usize::from(which % 3)];
    let _ = tool_calls::extract(format, &text, tools());
    let thinking = which & 4 != 0;
    let _ = reasoning::split(&text, thinking);

    let mut filter = StreamFilter::default();
    let mut splitter = reasoning::Splitter::new(thinking);
    let step = usize::from(which >> 3) + 1;
    let chars: Vec<char> = text.chars().collect();
    for piece in chars.chunks(step) {
        let piece: String = piece.iter().collect();
        let _ = filter.push(&piece);
        let _ = splitter.push(&piece);
    }
    let _ = filter.finish();
    let _ = splitter.finish();
}

/// An image file as a worker decodes it.
pub fn images(data: &[u8]) {
    let _ = decode(data, &DecodeLimits::default());
}
