//! A model to load: a Hugging Face snapshot folder (`config.json`, `model.safetensors` or shards
//! listed in `model.safetensors.index.json`, `tokenizer.json`, `tokenizer_config.json` with the
//! chat template or `chat_template.jinja` beside it, `generation_config.json`), or a GGUF file
//! (named directly, or the one in a folder) whose metadata stands in for those files (see
//! [`crate::gguf`]); files beside a GGUF in its folder take precedence over its metadata.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use crate::error::{EngineError, Result};
use crate::gguf::{self, GgufFile};
use crate::linear::Quantization;
use crate::quant_cache::QuantCache;

/// An opened snapshot folder or GGUF file.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The snapshot folder, or the folder of the GGUF file.
    dir: PathBuf,
    gguf: Option<Arc<GgufFile>>,
    /// Whether the files in `dir` belong to the model: not for a GGUF named directly, whose
    /// folder may hold anything (other models' files among them).
    companions: bool,
    cache: Option<Arc<QuantCache>>,
    /// Whether safetensors files are mapped in place (see [`crate::mapping`]).
    mapped: bool,
}

fn read(path: &Path, hint: &'static str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => EngineError::MissingFile {
            path: path.to_owned(),
            hint,
        },
        _ => EngineError::BadFile {
            path: path.to_owned(),
            reason: e.to_string(),
        },
    })
}

/// Parses JSON `text` of `path`, naming the offending field when the shape is wrong.
pub fn parse_json<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| EngineError::BadFile {
        path: path.to_owned(),
        reason: format!("{e} (line {}, column {})", e.line(), e.column()),
    })
}

impl Checkpoint {
    /// Opens `path`: a snapshot folder holding at least `config.json`, a `.gguf` file, or a
    /// folder holding one `.gguf` file (and no `config.json`).
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(file) = gguf::model_file(path)? {
            let companions = path.is_dir();
            let dir = match file.parent() {
                Some(p) if !companions => p.to_owned(),
                _ => path.to_owned(),
            };
            return Ok(Self {
                gguf: Some(Arc::new(GgufFile::open(&file)?)),
                dir,
                companions,
                cache: None,
                mapped: true,
            });
        }
        if !path.is_dir() {
            return Err(EngineError::MissingFile {
                path: path.to_owned(),
                hint: "set the model path to a Hugging Face snapshot folder or a .gguf file",
            });
        }
        let this = Self {
            dir: path.to_owned(),
            gguf: None,
            companions: true,
            cache: None,
            mapped: true,
        };
        if !this.path("config.json").is_file() {
            return Err(EngineError::MissingFile {
                path: this.path("config.json"),
                hint: "the model folder must be a Hugging Face snapshot (config.json, *.safetensors, tokenizer.json) or hold a .gguf file",
            });
        }
        Ok(this)
    }

    /// File `name` beside the weights, when the model has one there (a GGUF named directly has
    /// none).
    pub fn companion(&self, name: &str) -> Option<PathBuf> {
        Some(self.path(name)).filter(|p| self.companions && p.is_file())
    }

    /// Where the model's configuration is read from: `config.json`, or the GGUF file.
    pub fn config_path(&self) -> PathBuf {
        match &self.gguf {
            Some(g) => g.path().to_owned(),
            None => self.path("config.json"),
        }
    }

    /// The tokenizer a GGUF file carries, when the weights come from one with no
    /// `tokenizer.json` beside it; `None` otherwise.
    pub fn gguf_tokenizer(&self) -> Result<Option<tokenizers::Tokenizer>> {
        match &self.gguf {
            Some(g) if self.companion("tokenizer.json").is_none() => {
                gguf::vocab::tokenizer(g).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A file in the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `config.json` (or what a GGUF file's metadata says), parsed into the model's config type.
    pub fn config<T: DeserializeOwned>(&self) -> Result<T> {
        if let Some(g) = &self.gguf {
            return serde_json::from_value(gguf::config::hf_config(g)?).map_err(|e| {
                EngineError::BadFile {
                    path: g.path().to_owned(),
                    reason: format!("its metadata does not describe the model: {e}"),
                }
            });
        }
        let path = self.path("config.json");
        parse_json(&path, &read(&path, "every snapshot has one")?)
    }

    /// Checks that `config.json`'s `architectures` names `architecture` (or is absent) before the
    /// rest of the file is read as that model's config, so that another family's checkpoint is
    /// refused by name rather than by the first field it lacks.
    pub fn expect_architecture(&self, architecture: &str) -> Result<()> {
        #[derive(serde::Deserialize)]
        struct Architectures {
            #[serde(default)]
            architectures: Vec<String>,
        }
        let found: Architectures = self.config()?;
        if found.architectures.is_empty() || found.architectures.iter().any(|a| a == architecture) {
            return Ok(());
        }
        Err(EngineError::BadField {
            path: self.config_path(),
            field: match self.gguf {
                Some(_) => "general.architecture".into(),
                None => "architectures".into(),
            },
            reason: format!(
                "expected {architecture}, found {:?}: this plugin serves {architecture} checkpoints only",
                found.architectures
            ),
        })
    }

    /// An optional JSON file, parsed; `None` when absent. A GGUF file stands in for
    /// `tokenizer_config.json` and `generation_config.json` when they are not beside it.
    pub fn optional_json<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        if let Some(path) = self.companion(name) {
            return parse_json(&path, &read(&path, "")?).map(Some);
        }
        let Some(g) = &self.gguf else {
            return Ok(None);
        };
        let value = match name {
            "tokenizer_config.json" => gguf::vocab::tokenizer_config(g)?,
            "generation_config.json" => gguf::vocab::generation_config(g)?,
            _ => return Ok(None),
        };
        serde_json::from_value(value)
            .map(Some)
            .map_err(|e| EngineError::BadFile {
                path: g.path().to_owned(),
                reason: format!("its metadata does not give a usable {name}: {e}"),
            })
    }

    /// The files holding the weights: the GGUF file, or the safetensors files in index order.
    pub fn weight_files(&self) -> Result<Vec<PathBuf>> {
        if let Some(g) = &self.gguf {
            return Ok(vec![g.path().to_owned()]);
        }
        let index = self.path("model.safetensors.index.json");
        if index.is_file() {
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: serde_json::Map<String, serde_json::Value>,
            }
            let parsed: Index = parse_json(&index, &read(&index, "")?)?;
            let mut files: Vec<PathBuf> = Vec::new();
            for (tensor, file) in parsed.weight_map {
                // A plain file name in the snapshot: an index must not point the loader at
                // files elsewhere (`../../etc/passwd`, an absolute path).
                let Some(file) = file.as_str().filter(|f| {
                    !f.is_empty() && *f != "." && *f != ".." && !f.contains(['/', '\\'])
                }) else {
                    return Err(EngineError::BadField {
                        path: index,
                        field: format!("weight_map.{tensor}"),
                        reason: "expected the name of a file in the snapshot's folder".into(),
                    });
                };
                let path = self.path(file);
                if !files.contains(&path) {
                    if !path.is_file() {
                        return Err(EngineError::MissingFile {
                            path,
                            hint: "a shard listed in model.safetensors.index.json is missing: download the whole snapshot",
                        });
                    }
                    files.push(path);
                }
            }
            return Ok(files);
        }
        let single = self.path("model.safetensors");
        if single.is_file() {
            return Ok(vec![single]);
        }
        Err(EngineError::MissingFile {
            path: single,
            hint: "no model.safetensors and no model.safetensors.index.json: download the weights",
        })
    }

    /// The weights, each tensor taken from its file when asked for and converted to `dtype` on
    /// `device`: in place where the file is mapped and the tensor stored as `dtype`, read
    /// otherwise (see [`crate::weights`]).
    pub fn weights(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        if let Some(g) = &self.gguf {
            let backend = gguf::tensors::GgufTensors::new(g.clone(), self.cache.clone());
            let backend: Box<dyn candle_nn::var_builder::SimpleBackend> = Box::new(backend);
            return Ok(VarBuilder::from_backend(backend, dtype, device.clone()));
        }
        let files = self.weight_files()?;
        let mut backend =
            crate::weights::SafetensorsFiles::open(&files).map_err(|e| EngineError::Weights {
                dir: self.dir.clone(),
                reason: format!("cannot read the safetensors files: {e}"),
            })?;
        if let Some(cache) = &self.cache {
            backend = backend.with_cache(cache.clone());
        }
        if self.mapped {
            backend = backend.mapped();
        }
        let backend: Box<dyn candle_nn::var_builder::SimpleBackend> = Box::new(backend);
        Ok(VarBuilder::from_backend(backend, dtype, device.clone()))
    }

    /// Bytes the weights take at least once loaded in `dtype` with `quantization`, from the files'
    /// headers (nothing is read): every element at the smallest size any tensor could get (4 bits
    /// for q4, 8 for q8, the dtype's otherwise; a GGUF's tensors as stored, or in `dtype` if
    /// smaller). For refusing, before loading, a model that cannot fit a memory cap.
    pub fn weight_bytes_at_least(&self, dtype: DType, quantization: Quantization) -> Result<u64> {
        let element = dtype.size_in_bytes() as f64;
        let per_element = match quantization {
            Quantization::None => element,
            Quantization::Q8 => element.min(1.0),
            Quantization::Q4 => element.min(0.5),
        };
        if let Some(g) = &self.gguf {
            // A float GGUF is quantized as configured too.
            return Ok(g
                .tensor_sizes()
                .map(|(n, stored)| stored.min((n as f64 * per_element) as u64))
                .sum());
        }
        let files = crate::weights::SafetensorsFiles::open(&self.weight_files()?).map_err(|e| {
            EngineError::Weights {
                dir: self.dir.clone(),
                reason: format!("cannot read the safetensors files: {e}"),
            }
        })?;
        Ok((files.elements() as f64 * per_element) as u64)
    }

    /// The same checkpoint with its safetensors files mapped in place (the default) or every
    /// tensor read into memory of its own (`[model.options] mmap = false`); before
    /// [`Self::with_quantization_cache`], which maps its file likewise.
    pub fn with_mapping(self, mapped: bool) -> Self {
        Self { mapped, ..self }
    }

    /// The same checkpoint, its quantized linear weights kept in a cache in `dir` between starts
    /// (see [`crate::quant_cache`]), keyed by `quantization` and what the weights are made from.
    pub fn with_quantization_cache(mut self, dir: &Path, quantization: &str) -> Result<Self> {
        let mut parts: Vec<Vec<u8>> =
            vec![b"pio-quantization-cache-1".to_vec(), quantization.into()];
        parts.push(std::fs::read(self.path("config.json")).unwrap_or_default());
        for file in self.weight_files()? {
            let meta = std::fs::metadata(&file).map_err(|e| EngineError::BadFile {
                path: file.clone(),
                reason: e.to_string(),
            })?;
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .unwrap_or_default();
            let name = file.file_name().unwrap_or_default().to_string_lossy();
            parts.push(format!("{name} {} {}", meta.len(), modified.as_nanos()).into_bytes());
        }
        let key = parts
            .iter()
            .map(|p| format!("{:016x}", crate::quant_cache::fnv1a(&[p])))
            .collect::<Vec<_>>()
            .join("-");
        // One file per checkpoint and quantization: the checkpoint's name to read (its folder,
        // or its GGUF file: two in one folder must not share one), a hash of its full path so
        // that two of the same name do not share one either.
        let source = self.gguf.as_ref().map_or(self.dir.as_path(), |g| g.path());
        let source = std::fs::canonicalize(source).unwrap_or_else(|_| source.to_owned());
        let name = match &self.gguf {
            Some(_) => source.file_stem(),
            None => source.file_name(),
        }
        .map_or("model".into(), |n| n.to_string_lossy());
        let at = crate::quant_cache::fnv1a(&[source.as_os_str().as_encoded_bytes()]);
        let stem = format!(
            "{name}-{quantization}-{:08x}{}",
            at as u32,
            crate::quant_cache::STEM_SUFFIX
        );
        self.cache = Some(Arc::new(QuantCache::open(dir, &stem, &key, self.mapped)));
        Ok(self)
    }

    /// The quantization cache, when one is set.
    pub fn quantization_cache(&self) -> Option<&QuantCache> {
        self.cache.as_deref()
    }

    /// A weights error for `tensor`, in words.
    pub fn weight_error(&self, e: candle_core::Error) -> EngineError {
        EngineError::Weights {
            dir: self.dir.clone(),
            reason: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_naming_files_outside_the_snapshot_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        std::fs::write(dir.path().join("model.safetensors"), b"").unwrap();
        for file in [
            "../outside.safetensors",
            "/etc/passwd",
            "..",
            "sub/dir.safetensors",
        ] {
            let index = serde_json::json!({"weight_map": {"w": file}});
            std::fs::write(
                dir.path().join("model.safetensors.index.json"),
                index.to_string(),
            )
            .unwrap();
            let e = Checkpoint::open(dir.path())
                .unwrap()
                .weight_files()
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("weight_map.w") && e.contains("snapshot's folder"),
                "{file}: {e}"
            );
        }
    }
}
