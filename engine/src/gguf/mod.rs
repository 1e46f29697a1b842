//! GGUF files as llama.cpp, Ollama and LM Studio users download them, served through the same
//! seams as a snapshot folder: a `config.json`-shaped config from the metadata ([`config`]),
//! tensors under transformers' names with quantized ones handed to the layers as stored
//! ([`tensors`]), and the tokenizer, chat template and generation defaults from the metadata
//! ([`vocab`]). The models themselves do not know which they were loaded from.

pub(crate) mod config;
mod names;
pub(crate) mod tensors;
pub(crate) mod vocab;

use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;

use crate::error::{EngineError, Result};

/// The types PIO reads as stored: what F32/F16/BF16, Q8_0, Q4_0 and Q4_K_M files contain.
pub const READABLE: [GgmlDType; 7] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4K,
    GgmlDType::Q6K,
];

/// What to do about a file whose tensors PIO cannot read.
const REQUANTIZE: &str = "PIO reads F32, F16, BF16, Q8_0, Q4_0, Q4_K and Q6_K tensors (the \
    F16/BF16, Q8_0, Q4_0 and Q4_K_M files): download one of those, or requantize with \
    `llama-quantize --allow-requantize FILE OUT Q4_K_M`";

/// An opened GGUF file: its metadata and where each tensor's bytes are.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    file: File,
    content: Content,
}

/// llama.cpp's name of `format`.
pub(crate) fn type_name(format: GgmlDType) -> &'static str {
    match format {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// llama.cpp's name of ggml type `id` (for types candle does not know).
fn ggml_type_name(id: u32) -> String {
    let known = [
        (16, "IQ2_XXS"),
        (17, "IQ2_XS"),
        (18, "IQ3_XXS"),
        (19, "IQ1_S"),
        (20, "IQ4_NL"),
        (21, "IQ3_S"),
        (22, "IQ2_S"),
        (23, "IQ4_XS"),
        (29, "IQ1_M"),
        (34, "TQ1_0"),
        (35, "TQ2_0"),
        (39, "MXFP4"),
    ];
    known
        .iter()
        .find(|(k, _)| *k == id)
        .map_or_else(|| format!("type {id}"), |(_, n)| n.to_string())
}

impl GgufFile {
    /// Reads the header of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |reason: String| EngineError::BadFile {
            path: path.to_owned(),
            reason,
        };
        let file = File::open(path).map_err(|e| bad(e.to_string()))?;
        // candle divides by `general.alignment` unchecked: a 0 there panics in its reader.
        // Buffered: candle reads the header value by value (a Qwen vocabulary is about a
        // million reads of a few bytes each).
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Content::read(&mut std::io::BufReader::new(&file))
        }))
        .map_err(|_| {
            bad("not a GGUF file PIO can read: its header is inconsistent (`general.alignment` must be a power of two)".into())
        })?;
        let content = read.map_err(|e| {
            let e = e.to_string();
            match e.strip_prefix("unknown dtype for tensor ") {
                // Under RUST_BACKTRACE the id is followed by a backtrace.
                Some(id) => bad(format!(
                    "holds {} tensors; {REQUANTIZE}",
                    ggml_type_name(
                        (id.split_whitespace().next())
                            .and_then(|id| id.parse().ok())
                            .unwrap_or(u32::MAX)
                    )
                )),
                None => bad(format!("not a GGUF file PIO can read: {e}")),
            }
        })?;
        let this = Self {
            path: path.to_owned(),
            file,
            content,
        };
        if let Some(v) = this.get("general.alignment") {
            let reason = match v {
                Value::U32(n) if n.is_power_of_two() => None,
                Value::U32(n) => Some(format!(
                    "{n}: expected a power of two (llama.cpp writes 32)"
                )),
                // candle places the tensors by a u32 (or narrower) alignment only, 32 for any
                // other type: a u64 one passed this check and every tensor was read from the
                // wrong place. llama.cpp refuses any type but u32.
                other => Some(format!(
                    "{other:?}: expected a u32 power of two, the type llama.cpp writes"
                )),
            };
            if let Some(reason) = reason {
                return Err(EngineError::BadField {
                    path: path.to_owned(),
                    field: "general.alignment".into(),
                    reason,
                });
            }
        }
        if this.uint("split.count")?.is_some_and(|n| n > 1) {
            return Err(bad(
                "is one part of a split GGUF: merge the parts with `llama-gguf-split --merge \
                 FIRST-PART OUT.gguf` and set the model path to the merged file"
                    .into(),
            ));
        }
        this.check_unique()?;
        this.check_extent()?;
        Ok(this)
    }

    /// Refuses two tensors or two metadata keys of one name, as llama.cpp does: candle keeps
    /// the last of each, so which one served depended on the reader. The header's counts say
    /// how many there are; candle's maps, how many names.
    fn check_unique(&self) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let mut head = [0u8; 24];
        if self.file.read_exact_at(&mut head, 0).is_err() {
            return Ok(());
        }
        let word =
            |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        let long = |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().unwrap_or_default());
        // Version 1 counted in u32s.
        let (tensors, keys) = match word(4) {
            1 => (u64::from(word(8)), u64::from(word(12))),
            _ => (long(8), long(16)),
        };
        let repeated = [
            ("tensors", tensors, self.content.tensor_infos.len()),
            ("metadata keys", keys, self.content.metadata.len()),
        ];
        for (what, listed, distinct) in repeated {
            if distinct as u64 != listed {
                return Err(EngineError::BadFile {
                    path: self.path.clone(),
                    reason: format!(
                        "lists {listed} {what} but only {distinct} distinct names: some name is \
                         given twice (llama.cpp refuses such a file too); convert the model again"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Refuses a truncated file before any tensor is read.
    fn check_extent(&self) -> Result<()> {
        let len = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        for (name, info) in &self.content.tensor_infos {
            let block = info.ggml_dtype.block_size();
            let row = info.shape.dims().last().copied().unwrap_or(1);
            if row % block != 0 {
                return Err(EngineError::BadFile {
                    path: self.path.clone(),
                    reason: format!(
                        "tensor {name}'s rows hold {row} values, not a whole number of its {:?} \
                         blocks of {block}: the file is damaged or badly converted; convert the \
                         model again with llama.cpp",
                        info.ggml_dtype
                    ),
                });
            }
            // Checked: a hostile file's sizes must not wrap around into a small number.
            let end = (self.content.tensor_data_offset.checked_add(info.offset))
                .zip(tensor_bytes(info))
                .and_then(|(at, bytes)| at.checked_add(u64::try_from(bytes).ok()?));
            let Some(end) = end else {
                return Err(EngineError::BadFile {
                    path: self.path.clone(),
                    reason: format!(
                        "tensor {name}'s offset ({}) and shape {:?} overflow: the file is damaged, download it again",
                        info.offset,
                        info.shape.dims()
                    ),
                });
            };
            if end > len {
                return Err(EngineError::BadFile {
                    path: self.path.clone(),
                    reason: format!(
                        "tensor {name} ends at byte {end}, past the end of the file ({len} bytes): \
                         the file is truncated, download it again"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Its tensors' sizes: `(elements, bytes as stored)` each.
    pub fn tensor_sizes(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.content
            .tensor_infos
            .values()
            // Every size was checked at open.
            .map(|info| {
                let bytes = tensor_bytes(info).unwrap_or(usize::MAX);
                (info.shape.elem_count() as u64, bytes as u64)
            })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn field_error(&self, key: &str, reason: impl Into<String>) -> EngineError {
        EngineError::BadField {
            path: self.path.clone(),
            field: key.into(),
            reason: reason.into(),
        }
    }

    /// Metadata value `key`, if present.
    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn required(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| self.field_error(key, "missing from the GGUF metadata"))
    }

    /// An integer metadata value, whatever width it was written with.
    pub(crate) fn uint(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = integer(v)
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| {
                self.field_error(key, format!("expected a non-negative integer, found {v:?}"))
            })?;
        Ok(Some(n))
    }

    /// A required integer metadata value.
    pub(crate) fn required_uint(&self, key: &str) -> Result<u64> {
        self.required(key)?;
        self.uint(key).map(|n| n.unwrap_or_default())
    }

    /// A float metadata value.
    pub(crate) fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(_) => self.uint(key).map(|n| n.map(|n| n as f64)),
        }
    }

    /// A string metadata value.
    pub(crate) fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.field_error(
                key,
                format!("expected a string, found {:?}", other.value_type()),
            )),
        }
    }

    /// A required string metadata value.
    pub(crate) fn required_string(&self, key: &str) -> Result<&str> {
        self.required(key)?;
        self.string(key).map(Option::unwrap_or_default)
    }

    /// An array metadata value, each element through `item`.
    pub(crate) fn array<T>(
        &self,
        key: &str,
        item: impl Fn(&Value) -> Option<T>,
        what: &str,
    ) -> Result<Option<Vec<T>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let values = v
            .to_vec()
            .map_err(|_| self.field_error(key, format!("expected an array of {what}")))?;
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                item(v).ok_or_else(|| {
                    self.field_error(&format!("{key}[{i}]"), format!("expected {what}"))
                })
            })
            .collect::<Result<Vec<T>>>()
            .map(Some)
    }

    /// `general.architecture`: llama.cpp's name of the model family (`qwen3`, `qwen3moe`).
    pub fn architecture(&self) -> Result<&str> {
        self.required_string("general.architecture")
    }

    /// Whether the file holds tensor `name` (llama.cpp's name).
    pub(crate) fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }
}

/// Whether the folder holds safetensors weights (or their index).
fn holds_safetensors(folder: &Path) -> bool {
    std::fs::read_dir(folder).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json")
        })
    })
}

/// Bytes of a tensor as stored.
/// The bytes `info`'s tensor takes; `None` when its shape's size overflows.
fn tensor_bytes(info: &candle_core::quantized::gguf_file::TensorInfo) -> Option<usize> {
    let values = (info.shape.dims().iter()).try_fold(1usize, |n, &d| n.checked_mul(d))?;
    Some(values / info.ggml_dtype.block_size())
        .and_then(|b| b.checked_mul(info.ggml_dtype.type_size()))
}

/// Bytes `values` values take stored as `format`.
pub(crate) fn stored_bytes(format: GgmlDType, values: usize) -> usize {
    values / format.block_size() * format.type_size()
}

/// A metadata integer of any width.
pub(crate) fn integer(v: &Value) -> Option<i128> {
    Some(match v {
        Value::U8(n) => (*n).into(),
        Value::U16(n) => (*n).into(),
        Value::U32(n) => (*n).into(),
        Value::U64(n) => (*n).into(),
        Value::I8(n) => (*n).into(),
        Value::I16(n) => (*n).into(),
        Value::I32(n) => (*n).into(),
        Value::I64(n) => (*n).into(),
        _ => return None,
    })
}

/// The `.gguf` file a model path names: the path itself, or the one GGUF in a folder that holds
/// no safetensors snapshot (a `config.json` alone does not make one: some GGUF repositories
/// ship it beside the file). `None` for a snapshot folder.
pub fn model_file(path: &Path) -> Result<Option<PathBuf>> {
    if path.is_file() {
        return Ok(Some(path.to_owned()));
    }
    if !path.is_dir() || (path.join("config.json").is_file() && holds_safetensors(path)) {
        return Ok(None);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| EngineError::BadFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let cache = format!("{}.gguf", crate::quant_cache::STEM_SUFFIX);
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            p.extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
                && !name.ends_with(&cache)
                && p.is_file()
        })
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(EngineError::BadFile {
            path: path.to_owned(),
            reason: format!(
                "holds {} GGUF files ({}): set the model path to the one to serve",
                found.len(),
                found
                    .iter()
                    .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}
