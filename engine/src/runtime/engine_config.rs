//! The engine settings a manifest may give under `[model.options]`, and the KV pool's size when
//! it gives none (see [`super::memory`]).

use pio_plugin_api::PluginError;
use serde_json::{Map, Value};

use crate::generate::CausalLm;
use crate::kv_pool::CacheType;
use crate::serving::EngineConfig;

use super::memory::{pool_bytes, Memory};

/// A byte count: a number, or a string with a K/M/G/T suffix (powers of 1024).
fn bytes(key: &str, v: &Value) -> Result<u64, PluginError> {
    let bad = || {
        PluginError::invalid_config(format!(
            "[model.options] {key} = {v}: expected a byte count such as 2147483648 or \"2G\""
        ))
    };
    if let Some(n) = v.as_u64() {
        return Ok(n);
    }
    let text = v.as_str().ok_or_else(bad)?.trim();
    let (digits, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1 << shift).ok_or_else(bad)
}

fn count(key: &str, v: &Value) -> Result<usize, PluginError> {
    v.as_u64()
        .filter(|&n| n > 0)
        .map(|n| n as usize)
        .ok_or_else(|| {
            PluginError::invalid_config(format!(
                "[model.options] {key} = {v}: expected a positive whole number"
            ))
        })
}

/// The `[model.options]` settings the engine reads.
const SETTINGS: [&str; 6] = [
    "kv_cache_bytes",
    "kv_cache_dtype",
    "max_seqs",
    "max_batch_tokens",
    "prefix_cache",
    "mmap",
];

/// Keys the host adds beside them: `quantization_cache` from `[model]`, `profile` for
/// `pio bench --profile`.
const ADDED: [&str; 2] = ["profile", "quantization_cache"];

/// A key of `options` the engine does not read, named with the ones it does: a typo would
/// otherwise leave a setting at its default without a word.
fn unknown_option(options: &Map<String, Value>) -> Result<(), PluginError> {
    let known = |k: &str| SETTINGS.contains(&k) || ADDED.contains(&k);
    match options.keys().find(|k| !known(k)) {
        None => Ok(()),
        Some(key) => Err(PluginError::invalid_config(format!(
            "[model.options] {key} is not a setting of this engine; it reads {}",
            SETTINGS.join(", ")
        ))),
    }
}

/// The `[model.options]` the engine reads, checked: what a load uses, and what
/// `supports_config` (and so `pio check`) refuses before any weight is read.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Options {
    kv_cache_bytes: Option<u64>,
    kv_dtype: Option<CacheType>,
    max_seqs: Option<usize>,
    max_batch_tokens: Option<usize>,
    prefix_cache: Option<bool>,
    mmap: Option<bool>,
}

impl Options {
    /// `options` checked: no unknown key, each value of its type.
    pub(super) fn parse(options: &Map<String, Value>) -> Result<Self, PluginError> {
        unknown_option(options)?;
        let get = |key| options.get(key);
        Ok(Self {
            kv_cache_bytes: get("kv_cache_bytes")
                .map(|v| bytes("kv_cache_bytes", v))
                .transpose()?,
            kv_dtype: get("kv_cache_dtype").map(cache_type).transpose()?,
            max_seqs: get("max_seqs").map(|v| count("max_seqs", v)).transpose()?,
            max_batch_tokens: get("max_batch_tokens")
                .map(|v| count("max_batch_tokens", v))
                .transpose()?,
            prefix_cache: get("prefix_cache")
                .map(|v| switch("prefix_cache", v))
                .transpose()?,
            mmap: get("mmap").map(|v| switch("mmap", v)).transpose()?,
        })
    }

    /// Whether the checkpoint's files are mapped in place (the default).
    pub(super) fn mmap(&self) -> bool {
        self.mmap.unwrap_or(true)
    }
}

fn switch(key: &str, v: &Value) -> Result<bool, PluginError> {
    v.as_bool().ok_or_else(|| {
        PluginError::invalid_config(format!(
            "[model.options] {key} = {v}: expected true or false"
        ))
    })
}

fn cache_type(v: &Value) -> Result<CacheType, PluginError> {
    v.as_str().and_then(CacheType::parse).ok_or_else(|| {
        PluginError::invalid_config(format!(
            "[model.options] kv_cache_dtype = {v}: expected \"f32\", \"bf16\", \"f16\" or \"q8_0\""
        ))
    })
}

/// The engine configuration for `model` from the manifest's options, the memory that bounds the
/// pool and the weights' size.
pub(super) fn engine_config<M: CausalLm>(
    model: &M,
    options: &Map<String, Value>,
    memory: Memory,
    weight_bytes: Option<u64>,
) -> Result<EngineConfig, PluginError> {
    let o = Options::parse(options)?;
    let pool_bytes = pool_bytes(memory, weight_bytes.unwrap_or(0), o.kv_cache_bytes)?;
    // A budget set alone bounds the default number of sequences (it was refused for the
    // default's 64 it never named).
    let default_seqs = EngineConfig::default().max_seqs;
    let max_seqs = (o.max_seqs).or(o.max_batch_tokens.map(|b| b.min(default_seqs)));
    let mut config = EngineConfig::with_pool_bytes(model, pool_bytes, o.kv_dtype, max_seqs);
    // The pool has at least one block; on a GPU that block must fit inside the budget too.
    if matches!(memory, Memory::Device { .. }) && config.pool_bytes(model) > pool_bytes {
        return Err(PluginError::new(
            pio_plugin_api::ErrorKind::OUT_OF_MEMORY,
            format!(
                "the GPU memory left for the KV cache ({pool_bytes} bytes) holds less than one block ({} bytes): raise limits.gpu_memory or kv_cache_bytes",
                config.pool_bytes(model)
            ),
        ));
    }
    // A step gives each running sequence at least its next token: a budget below the sequences
    // run at once would leave some without one every step (vLLM refuses such a pair too). Not
    // set, it grows to `max_seqs`.
    config.token_budget = match o.max_batch_tokens {
        Some(b) if b < config.max_seqs => {
            return Err(PluginError::invalid_config(format!(
                "[model.options] max_batch_tokens ({b}) is below max_seqs ({}): a step could not give every running sequence its next token; raise max_batch_tokens to at least max_seqs, or lower max_seqs",
                config.max_seqs
            )))
        }
        Some(b) => b,
        None => config.token_budget.max(config.max_seqs),
    };
    config.prefix_cache = o.prefix_cache.unwrap_or(config.prefix_cache);
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::super::memory::HOST_HEADROOM;
    use super::*;
    use serde_json::json;

    const NO_LIMIT: Memory = Memory::Host {
        limit: None,
        available: None,
    };

    #[test]
    fn byte_counts_take_numbers_and_suffixes() {
        assert_eq!(bytes("k", &json!(1024)).unwrap(), 1024);
        assert_eq!(bytes("k", &json!("2G")).unwrap(), 2 << 30);
        assert_eq!(bytes("k", &json!("512 MiB")).unwrap(), 512 << 20);
        let err = bytes("kv_cache_bytes", &json!("lots"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("kv_cache_bytes") && err.contains("\"2G\""),
            "{err}"
        );
        assert!(bytes("k", &json!(-1)).is_err());
    }

    /// The bound a GPU cap is checked against before loading is not above what loading takes,
    /// and near it: in f32, at q4, and for a GGUF file's stored blocks.
    #[test]
    fn the_weights_lower_bound_is_not_above_the_loaded_size_and_near_it() {
        use crate::checkpoint::Checkpoint;
        use crate::linear::Quantization;
        use crate::models::qwen3::Qwen3;
        use crate::runtime::LoadModel;
        use candle_core::{DType, Device};
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        for (path, q) in [
            ("qwen3-tiny", Quantization::None),
            ("qwen3-tiny", Quantization::Q4),
            ("gguf/qwen3-wide.q4_k_m.gguf", Quantization::None),
            // A float GGUF quantized as configured (its bound was its f32 size).
            ("gguf/qwen3-tiny.f32.gguf", Quantization::Q4),
        ] {
            let checkpoint = Checkpoint::open(&fixtures.join(path)).unwrap();
            let bound = checkpoint.weight_bytes_at_least(DType::F32, q).unwrap();
            let model = <Qwen3 as LoadModel>::load(
                &checkpoint,
                DType::F32,
                q,
                &Device::Cpu,
                &mut |_, _| {},
            )
            .unwrap();
            let loaded = LoadModel::weight_bytes(&model).unwrap();
            // The models' own counts leave out the norms' few weights (0.3% of this fixture).
            assert!(
                bound <= loaded + loaded / 100 && bound * 3 >= loaded,
                "{path} {q:?}: at least {bound}, loaded {loaded}"
            );
        }
    }

    #[test]
    fn options_size_and_shape_the_engine() {
        use crate::checkpoint::Checkpoint;
        use crate::linear::Quantization;
        use crate::models::qwen3::Qwen3;
        use crate::runtime::LoadModel;
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3-tiny");
        let checkpoint = Checkpoint::open(&dir).unwrap();
        let model = <Qwen3 as LoadModel>::load(
            &checkpoint,
            candle_core::DType::F32,
            Quantization::None,
            &candle_core::Device::Cpu,
            &mut |_, _| {},
        )
        .unwrap();
        let options = |v: Value| v.as_object().unwrap().clone();
        // f32: 3 layers × K and V × 2 heads × 32 × 4 bytes = 1536 bytes a token, 24 KiB a block.
        let c = engine_config(
            &model,
            &options(json!({"kv_cache_bytes": "1M"})),
            NO_LIMIT,
            None,
        )
        .unwrap();
        assert_eq!(c.kv_blocks, (1 << 20) / (1536 * 16));
        let c = engine_config(
            &model,
            &options(json!({"kv_cache_bytes": "1M", "kv_cache_dtype": "bf16", "max_seqs": 3, "max_batch_tokens": 64, "prefix_cache": false})),
            NO_LIMIT,
            None,
        )
        .unwrap();
        assert_eq!(c.kv_dtype, Some(CacheType::Float(candle_core::DType::BF16)));
        assert_eq!(
            c.kv_blocks,
            3 * 256 / 16,
            "no more than 3 full contexts of 256 (1M holds 85 blocks of bf16)"
        );
        let bf16 = engine_config(
            &model,
            &options(json!({"kv_cache_bytes": "1M", "kv_cache_dtype": "bf16"})),
            NO_LIMIT,
            None,
        )
        .unwrap();
        assert_eq!(
            bf16.kv_blocks,
            (1 << 20) / (768 * 16),
            "bf16 blocks take half the bytes: twice the tokens"
        );
        assert_eq!((c.max_seqs, c.token_budget, c.prefix_cache), (3, 64, false));
        // The ceiling is the configured sequences' contexts, not the default 64's.
        let c = engine_config(
            &model,
            &options(json!({"kv_cache_bytes": "1G", "max_seqs": 128})),
            NO_LIMIT,
            None,
        )
        .unwrap();
        assert_eq!((c.kv_blocks, c.max_seqs), (128 * 256 / 16, 128));
        let c = engine_config(
            &model,
            &options(json!({"kv_cache_bytes": "1M", "kv_cache_dtype": "q8_0"})),
            NO_LIMIT,
            None,
        )
        .unwrap();
        assert_eq!(c.kv_dtype, Some(CacheType::Q8_0));
        let q8 = model.kv_layout().bytes_per_token(CacheType::Q8_0);
        assert!(
            q8 < 1536 / 2 && q8 > 1536 / 4,
            "{q8} bytes per token: between bf16 and 4 bits"
        );
        assert_eq!(c.kv_blocks, (1 << 20) / (q8 * 16));
        // A memory limit leaves the pool what the weights and the headroom do not take.
        let c = engine_config(
            &model,
            &Map::new(),
            Memory::Host {
                limit: Some(HOST_HEADROOM + 1000 + (8 << 20)),
                available: None,
            },
            Some(1000),
        )
        .unwrap();
        assert_eq!(c.kv_blocks, (8 << 20) / (1536 * 16));
        let e = engine_config(
            &model,
            &Map::new(),
            Memory::Host {
                limit: Some(HOST_HEADROOM),
                available: None,
            },
            Some(1000),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("limits.memory"), "{e}");
        // A budget below the sequences run at once is refused; left out, it grows to them.
        let e = engine_config(
            &model,
            &options(json!({"max_seqs": 300, "max_batch_tokens": 256})),
            NO_LIMIT,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("max_batch_tokens") && e.contains("max_seqs"),
            "{e}"
        );
        let grown = engine_config(&model, &options(json!({"max_seqs": 300})), NO_LIMIT, None);
        assert_eq!(grown.unwrap().token_budget, 300);
        let budget = engine_config(
            &model,
            &options(json!({"max_batch_tokens": 32})),
            NO_LIMIT,
            None,
        );
        let budget = budget.unwrap();
        assert_eq!((budget.token_budget, budget.max_seqs), (32, 32));
        for (key, bad) in [
            ("kv_cache_dtype", json!("q4")),
            ("max_seqs", json!(0)),
            ("prefix_cache", json!("yes")),
        ] {
            let e = engine_config(&model, &options(json!({ key: bad })), NO_LIMIT, None)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{e}");
        }
    }

    #[test]
    fn an_option_the_engine_does_not_read_is_refused_by_name() {
        let options = |json: Value| json.as_object().unwrap().clone();
        assert!(unknown_option(&options(
            serde_json::json!({"kv_cache_bytes": "1G", "max_seqs": 4})
        ))
        .is_ok());
        let e = unknown_option(&options(serde_json::json!({"kv_cahce_bytes": 5}))).unwrap_err();
        assert_eq!(e.kind, pio_plugin_api::ErrorKind::INVALID_CONFIG);
        assert!(
            e.message.contains("kv_cahce_bytes") && e.message.contains("kv_cache_bytes"),
            "{}",
            e.message
        );
    }

    /// The options are checked whole, without a model: what `supports_config` (and `pio check`)
    /// refuses before a load.
    #[test]
    fn options_parse_without_a_model() {
        let options = |json: Value| json.as_object().unwrap().clone();
        let o = Options::parse(&options(serde_json::json!(
            {"kv_cache_bytes": "1G", "max_seqs": 4, "prefix_cache": false, "quantization_cache": "/c"}
        )))
        .unwrap();
        assert_eq!(
            (o.kv_cache_bytes, o.max_seqs, o.prefix_cache),
            (Some(1 << 30), Some(4), Some(false))
        );
        assert!(o.mmap(), "checkpoints are mapped unless asked not to be");
        let o = Options::parse(&options(serde_json::json!({"mmap": false}))).unwrap();
        assert!(!o.mmap());
        for (bad, key) in [
            (serde_json::json!({"max_seqs": 0}), "max_seqs"),
            (
                serde_json::json!({"kv_cache_dtype": "f8"}),
                "kv_cache_dtype",
            ),
            (serde_json::json!({"prefix_cache": "yes"}), "prefix_cache"),
            (serde_json::json!({"mmap": 0}), "mmap"),
            (
                serde_json::json!({"kv_cache_bytes": "lots"}),
                "kv_cache_bytes",
            ),
            (serde_json::json!({"kv_cahce_bytes": 5}), "kv_cahce_bytes"),
        ] {
            let e = Options::parse(&options(bad)).unwrap_err();
            assert!(e.message.contains(key), "{}", e.message);
        }
    }
}
