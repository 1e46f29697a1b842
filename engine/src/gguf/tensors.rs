//! A GGUF file's tensors under transformers' names, read with positioned reads as
//! [`crate::weights::SafetensorsFiles`] reads safetensors. Quantized tensors go to the layers
//! as stored (asked for under [`crate::weights::stored_name`]); anything that wants values (an
//! embedding, a norm, a layer kept dense) gets them decoded.

use std::borrow::Cow;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::{names, stored_bytes, type_name, GgufFile, READABLE, REQUANTIZE};
use crate::quant_cache::QuantCache;
use crate::weights::{parse_quantized, quantized_blocks, shaped};

/// The tensors of one GGUF file.
#[derive(Debug)]
pub(crate) struct GgufTensors {
    file: Arc<GgufFile>,
    cache: Option<Arc<QuantCache>>,
}

/// One tensor as stored: llama.cpp's name, its type, row-major shape and bytes.
struct Stored {
    name: String,
    format: GgmlDType,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn error(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

impl GgufTensors {
    /// The tensors of `file`, float ones quantized for the layers through `cache` when set.
    pub(crate) fn new(file: Arc<GgufFile>, cache: Option<Arc<QuantCache>>) -> Self {
        Self { file, cache }
    }

    /// Type and row-major shape of transformers tensor `hf` (one expert's slice of a stacked
    /// expert tensor), without reading it.
    fn describe(&self, hf: &str) -> Option<(GgmlDType, Vec<usize>)> {
        let at = names::locate(hf)?;
        let info = self.file.content.tensor_infos.get(&at.name)?;
        let dims = info.shape.dims();
        match at.expert {
            None => Some((info.ggml_dtype, dims.to_vec())),
            Some(e) if dims.len() == 3 && e < dims[0] => {
                Some((info.ggml_dtype, dims[1..].to_vec()))
            }
            Some(_) => None,
        }
    }

    fn read(&self, hf: &str) -> candle_core::Result<Stored> {
        let path = self.file.path().display();
        let at =
            names::locate(hf).ok_or_else(|| error(format!("{path}: no tensor maps to {hf}")))?;
        let info = self
            .file
            .content
            .tensor_infos
            .get(&at.name)
            .ok_or_else(|| {
                candle_core::Error::CannotFindTensor {
                    path: format!("{hf} ({} in {path})", at.name),
                }
                .bt()
            })?;
        let (format, shape) = self
            .describe(hf)
            .ok_or_else(|| error(format!("{path}: {} has no expert {hf}", at.name)))?;
        let len = stored_bytes(format, shape.iter().product());
        let start = self.file.content.tensor_data_offset
            + info.offset
            + (at.expert.unwrap_or(0) * len) as u64;
        let mut bytes = vec![0u8; len];
        self.file
            .file
            .read_exact_at(&mut bytes, start)
            .map_err(|e| error(format!("{path}: reading {}: {e}", at.name)))?;
        Ok(Stored {
            name: at.name,
            format,
            shape,
            bytes,
        })
    }

    /// Tensor `hf`'s values (dequantized when stored quantized).
    fn values(&self, hf: &str) -> candle_core::Result<Tensor> {
        let Stored {
            name,
            format,
            shape,
            bytes,
        } = self.read(hf)?;
        let dtype = match format {
            GgmlDType::F32 => Some(DType::F32),
            GgmlDType::F16 => Some(DType::F16),
            GgmlDType::BF16 => Some(DType::BF16),
            _ => None,
        };
        if let Some(dtype) = dtype {
            return Tensor::from_raw_buffer(&bytes, dtype, &shape, &Device::Cpu);
        }
        if !READABLE.contains(&format) {
            return Err(error(format!(
                "{}: tensor {name} ({hf}) is stored as {}; {REQUANTIZE}",
                self.file.path().display(),
                type_name(format)
            )));
        }
        let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, format)?;
        QTensor::new(storage, shape)?.dequantize(&Device::Cpu)
    }

    /// Whether `hf` is stored as floats (which the layers may quantize as configured).
    fn is_float(&self, hf: &str) -> bool {
        matches!(
            self.describe(hf),
            Some((GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16, _))
        )
    }

    /// Whether `hf` is stored as `format` blocks of `rows × cols`.
    fn is_stored_as(&self, hf: &str, format: GgmlDType, rows: usize, cols: usize) -> bool {
        self.describe(hf) == Some((format, vec![rows, cols]))
    }
}

impl SimpleBackend for GgufTensors {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let what = format!("{name} in {}", self.file.path().display());
        shaped(self.get_unchecked(name, dtype, dev)?, s, &what)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Some(asked) = name.strip_suffix("#stored") {
            let (base, format, rows, cols) =
                parse_quantized(asked).ok_or_else(|| error(format!("bad tensor name {name}")))?;
            let stored = self.read(base)?;
            if stored.format != format || stored.shape != [rows, cols] {
                return Err(error(format!(
                    "{base} is not stored as {format:?} {rows}x{cols}"
                )));
            }
            let len = stored.bytes.len();
            return Tensor::from_vec(stored.bytes, len, dev);
        }
        if let Some((base, format, rows, cols)) = parse_quantized(name) {
            let read = || self.values(base);
            return quantized_blocks(self.cache.as_deref(), base, format, (rows, cols), read)?
                .to_device(dev);
        }
        self.values(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        if let Some(asked) = name.strip_suffix("#stored") {
            return parse_quantized(asked).is_some_and(|(base, format, rows, cols)| {
                self.is_stored_as(base, format, rows, cols)
            });
        }
        match parse_quantized(name) {
            Some((base, ..)) => self.is_float(base),
            None => self.describe(name).is_some(),
        }
    }
}
