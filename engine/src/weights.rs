//! Safetensors read tensor by tensor. A tensor the model takes as stored (a bf16 checkpoint
//! loaded in bf16) is the file's pages mapped in place ([`crate::mapping`]): nothing is copied,
//! and the page cache holds the only copy. Every other tensor (converted to another dtype, or
//! quantized) is read with positioned reads into its own buffer: pages of a mapped checkpoint
//! count as resident once touched, so quantizing a 61 GB model through a map showed a peak near
//! the file size, while reading each tensor keeps the peak at the loaded size plus one tensor.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use serde::Deserialize;

use crate::mapping::{MappedFile, Plain};
use crate::quant_cache::QuantCache;

/// Where one tensor's bytes are.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: u64,
    len: usize,
}

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// The tensors of a set of safetensors files.
#[derive(Debug)]
pub struct SafetensorsFiles {
    files: Vec<(PathBuf, File)>,
    entries: HashMap<String, Entry>,
    cache: Option<Arc<QuantCache>>,
    /// Each file mapped, by index ([`Self::mapped`]); empty: every tensor is read.
    maps: Vec<Option<MappedFile>>,
}

/// The name under which a linear layer asks for tensor `name` (`rows × cols`) quantized to
/// `format`: served as the blocks' bytes (`U8`), from the quantization cache or quantized on the
/// spot.
pub fn quantized_name(name: &str, format: GgmlDType, rows: usize, cols: usize) -> String {
    format!("{name}#{format:?}#{rows}x{cols}")
}

/// The name under which a linear layer asks for tensor `name` (`rows × cols`) as `format`
/// blocks stored in the file (a GGUF's): answered only where the file holds it so, with the
/// bytes as they are.
pub fn stored_name(name: &str, format: GgmlDType, rows: usize, cols: usize) -> String {
    format!("{}#stored", quantized_name(name, format, rows, cols))
}

/// `(name, format, rows, cols)` of a [`quantized_name`].
pub(crate) fn parse_quantized(name: &str) -> Option<(&str, GgmlDType, usize, usize)> {
    let (rest, dims) = name.rsplit_once('#')?;
    let (base, format) = rest.rsplit_once('#')?;
    let format = match format {
        "Q8_0" => GgmlDType::Q8_0,
        "Q4_0" => GgmlDType::Q4_0,
        "Q4K" => GgmlDType::Q4K,
        "Q6K" => GgmlDType::Q6K,
        _ => return None,
    };
    let (rows, cols) = dims.split_once('x')?;
    Some((base, format, rows.parse().ok()?, cols.parse().ok()?))
}

fn bad(path: &Path, what: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}: {what}", path.display()))
}

fn dtype_of(name: &str) -> Option<DType> {
    Some(match name {
        "F32" => DType::F32,
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        "F64" => DType::F64,
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I64" => DType::I64,
        _ => return None,
    })
}

impl SafetensorsFiles {
    /// Elements in all the tensors.
    pub fn elements(&self) -> u64 {
        self.entries
            .values()
            .map(|e| e.shape.iter().product::<usize>() as u64)
            .sum()
    }

    /// Reads the headers of `paths`.
    pub fn open(paths: &[PathBuf]) -> candle_core::Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            let mut file = File::open(path).map_err(|e| bad(path, e))?;
            let mut len = [0u8; 8];
            file.read_exact(&mut len).map_err(|e| bad(path, e))?;
            let header_len = u64::from_le_bytes(len);
            let file_len = file.metadata().map_err(|e| bad(path, e))?.len();
            if header_len > file_len.saturating_sub(8) || header_len > 100 << 20 {
                return Err(bad(path, format!("header length {header_len} is impossible: not a safetensors file, or a truncated one")));
            }
            let mut header = vec![0u8; header_len as usize];
            file.read_exact(&mut header).map_err(|e| bad(path, e))?;
            let header: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
                .map_err(|e| bad(path, format!("header is not JSON: {e}")))?;
            let base = 8 + header_len;
            for (name, value) in header {
                if name == "__metadata__" {
                    continue;
                }
                let h: HeaderEntry = serde_json::from_value(value)
                    .map_err(|e| bad(path, format!("tensor {name}: {e}")))?;
                let dtype = dtype_of(&h.dtype).ok_or_else(|| {
                    bad(
                        path,
                        format!("tensor {name}: unsupported dtype {}", h.dtype),
                    )
                })?;
                let [start, end] = h.data_offsets;
                // Checked: a hostile header's sizes must not wrap around into a small number.
                let expected = (h.shape.iter())
                    .try_fold(dtype.size_in_bytes(), |n, &d| n.checked_mul(d))
                    .filter(|&n| end.checked_sub(start) == u64::try_from(n).ok())
                    .filter(|_| base.checked_add(end).is_some_and(|e| e <= file_len));
                let Some(expected) = expected else {
                    return Err(bad(path, format!("tensor {name}: its data offsets {start}..{end} do not fit its shape {:?} or the file", h.shape)));
                };
                let entry = Entry {
                    file: index,
                    dtype,
                    shape: h.shape,
                    start: base + start,
                    len: expected,
                };
                // Two shards holding one name: which copy is meant cannot be told (the last one
                // read was taken, silently).
                if let Some(earlier) = entries.insert(name.clone(), entry) {
                    let first = paths.get(earlier.file).map_or(path, |p| p);
                    return Err(bad(
                        path,
                        format!("tensor {name} is also in {}: a checkpoint holds each tensor once; remove the stray shard", first.display()),
                    ));
                }
            }
            files.push((path.clone(), file));
        }
        Ok(Self {
            files,
            entries,
            cache: None,
            maps: Vec::new(),
        })
    }

    /// The same files, mapped: a tensor taken in its stored dtype then shares the file's pages
    /// (a file that cannot be mapped is read as before).
    pub fn mapped(self) -> Self {
        let maps = (self.files.iter())
            .map(|(_, file)| {
                let len = file.metadata().ok()?.len();
                MappedFile::map(file, usize::try_from(len).ok()?)
            })
            .collect();
        Self { maps, ..self }
    }

    /// The tensor at `entry` as the file's own pages, when it is stored as `dtype` (f32, bf16 or
    /// f16) and its file is mapped; `None` otherwise (it is read instead).
    fn in_place(&self, entry: &Entry, dtype: DType) -> Option<Tensor> {
        if entry.dtype != dtype {
            return None;
        }
        let map = self.maps.get(entry.file)?.as_ref()?;
        let offset = usize::try_from(entry.start).ok()?;
        fn tensor<T: Plain + candle_core::WithDType>(
            map: &MappedFile,
            offset: usize,
            entry: &Entry,
        ) -> Option<Tensor> {
            let values = map.values::<T>(offset, entry.len / std::mem::size_of::<T>())?;
            Tensor::from_vec(values, entry.shape.as_slice(), &Device::Cpu).ok()
        }
        match dtype {
            DType::BF16 => tensor::<pio_kernels::bf16>(map, offset, entry),
            DType::F16 => tensor::<pio_kernels::f16>(map, offset, entry),
            DType::F32 => tensor::<f32>(map, offset, entry),
            _ => None,
        }
    }

    /// The same files, quantized tensors kept in (or read from) `cache`.
    pub fn with_cache(self, cache: Arc<QuantCache>) -> Self {
        Self {
            cache: Some(cache),
            ..self
        }
    }

    fn read(&self, name: &str) -> candle_core::Result<Tensor> {
        let entry = self.entries.get(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })?;
        let (path, file) = &self.files[entry.file];
        let read = |bytes: &mut [u8]| {
            file.read_exact_at(bytes, entry.start)
                .map_err(|e| bad(path, format!("reading {name}: {e}")))
        };
        // Straight into the tensor's own buffer: a byte buffer converted after would copy the
        // tensor again (a second start from the quantization cache spends much of its time
        // reading the dense embedding).
        match entry.dtype {
            DType::BF16 => typed::<pio_kernels::bf16>(entry.len, &entry.shape, read),
            DType::F16 => typed::<pio_kernels::f16>(entry.len, &entry.shape, read),
            DType::F32 => typed::<f32>(entry.len, &entry.shape, read),
            dtype => {
                let mut bytes = vec![0u8; entry.len];
                read(&mut bytes)?;
                Tensor::from_raw_buffer(&bytes, dtype, &entry.shape, &Device::Cpu)
            }
        }
    }
}

/// A CPU tensor of `shape` whose `len` bytes of `T` values `read` fills in place.
fn typed<T: candle_core::WithDType>(
    len: usize,
    shape: &[usize],
    read: impl FnOnce(&mut [u8]) -> candle_core::Result<()>,
) -> candle_core::Result<Tensor> {
    let size = std::mem::size_of::<T>();
    if !len.is_multiple_of(size) {
        candle_core::bail!("{len} bytes are not whole {size}-byte values");
    }
    let mut values = vec![T::zero(); len / size];
    // SAFETY: the buffer holds exactly `len` initialized bytes, and every bit pattern is a
    // valid `T` (f32, f16, bf16: plain floats).
    let bytes = unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), len) };
    read(bytes)?;
    Tensor::from_vec(values, shape, &Device::Cpu)
}

/// Tensor `base` (`rows × cols`) as `format` blocks (their bytes, `U8`): from `cache` when it
/// holds them, else quantized from the values `read` gives (and handed to the cache).
pub(crate) fn quantized_blocks(
    cache: Option<&QuantCache>,
    base: &str,
    format: GgmlDType,
    (rows, cols): (usize, usize),
    read: impl FnOnce() -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let shape = [rows, cols];
    if let Some(bytes) = cache.and_then(|c| c.get(base, format, &shape)) {
        let len = bytes.len();
        return Tensor::from_vec(bytes, len, &Device::Cpu);
    }
    let stored = read()?;
    if stored.dims() != shape {
        return Err(candle_core::Error::UnexpectedShape {
            msg: format!("shape mismatch for {base}"),
            expected: shape.as_slice().into(),
            got: stored.shape().clone(),
        }
        .bt());
    }
    let q = QTensor::quantize(&stored.to_dtype(DType::F32)?, format)?;
    if let Some(cache) = cache {
        cache.put(base, &q);
    }
    let bytes = q.data()?;
    Tensor::from_raw_buffer(&bytes, DType::U8, &[bytes.len()], &Device::Cpu)
}

/// `tensor` when it has shape `s`; else the mismatch, naming `what`.
pub(crate) fn shaped(tensor: Tensor, s: Shape, what: &str) -> candle_core::Result<Tensor> {
    if tensor.shape() != &s {
        return Err(candle_core::Error::UnexpectedShape {
            msg: format!("shape mismatch for {what}"),
            expected: s,
            got: tensor.shape().clone(),
        }
        .bt());
    }
    Ok(tensor)
}

impl SimpleBackend for SafetensorsFiles {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        shaped(self.get_unchecked(name, dtype, dev)?, s, name)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Some((base, format, rows, cols)) = parse_quantized(name) {
            let read = || self.read(base);
            return quantized_blocks(self.cache.as_deref(), base, format, (rows, cols), read)?
                .to_device(dev);
        }
        if let Some(tensor) = self.entries.get(name).and_then(|e| self.in_place(e, dtype)) {
            return tensor.to_device(dev);
        }
        self.read(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        if self.entries.contains_key(name) {
            return true;
        }
        match parse_quantized(name) {
            Some((base, ..)) => self.entries.contains_key(base),
            None => self.entries.contains_key(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_read_back_and_damage_is_named() {
        let dir = std::env::temp_dir().join(format!("pio-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        let a = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let b = a.to_dtype(DType::BF16).unwrap();
        candle_core::safetensors::save(
            &HashMap::from([("a".to_string(), a.clone()), ("b".to_string(), b)]),
            &path,
        )
        .unwrap();
        let files = SafetensorsFiles::open(std::slice::from_ref(&path)).unwrap();
        let got = files
            .get(
                (3, 4).into(),
                "b",
                candle_nn::Init::Const(0.0),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        let e = files
            .get(
                (4, 3).into(),
                "a",
                candle_nn::Init::Const(0.0),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap_err();
        assert!(e.to_string().contains("shape mismatch for a"), "{e}");
        assert!(files.get_unchecked("c", DType::F32, &Device::Cpu).is_err());
        // Sizes that wrap around: a shape of 2^60 f32 values whose end offset, added to the
        // header's length, overflows to a small number.
        let mut hostile = Vec::new();
        let header = format!(
            r#"{{"x":{{"dtype":"F32","shape":[{}],"data_offsets":[{},{}]}}}}"#,
            1u64 << 60,
            u64::MAX - (1 << 62) - 63,
            u64::MAX - 63,
        );
        let header = format!("{header:<64}");
        hostile.extend_from_slice(&(header.len() as u64).to_le_bytes());
        hostile.extend_from_slice(header.as_bytes());
        hostile.extend_from_slice(&[0; 64]);
        let wraps = dir.join("wraps.safetensors");
        std::fs::write(&wraps, &hostile).unwrap();
        let e = SafetensorsFiles::open(std::slice::from_ref(&wraps)).unwrap_err();
        assert!(e.to_string().contains("do not fit"), "{e}");
        // Truncated: the header promises more data than the file holds.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let e = SafetensorsFiles::open(std::slice::from_ref(&path)).unwrap_err();
        assert!(
            e.to_string().contains("model.safetensors") && e.to_string().contains("do not fit"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A tensor in two shards is refused naming both (the last one read was taken).
    #[test]
    fn a_tensor_in_two_shards_is_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let shard = |n: usize, value: f32| {
            let path = dir
                .path()
                .join(format!("model-0000{n}-of-00002.safetensors"));
            let norm = Tensor::full(value, 4, &Device::Cpu).unwrap();
            let other = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
            let tensors = HashMap::from([
                ("model.norm.weight".to_string(), norm),
                (format!("only.in.{n}"), other),
            ]);
            candle_core::safetensors::save(&tensors, &path).unwrap();
            path
        };
        let paths = [shard(1, 1.0), shard(2, 2.0)];
        let e = SafetensorsFiles::open(&paths).err().unwrap().to_string();
        assert!(
            e.contains("model.norm.weight")
                && e.contains("model-00001-of-00002")
                && e.contains("model-00002-of-00002"),
            "{e}"
        );
        assert!(SafetensorsFiles::open(&paths[..1]).is_ok());
    }

    #[test]
    fn a_tensor_taken_as_stored_is_the_files_pages_and_others_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let a = Tensor::arange(0f32, 4096.0, &Device::Cpu)
            .unwrap()
            .reshape((64, 64))
            .unwrap();
        let b = (a.clone() * 0.25).unwrap().to_dtype(DType::BF16).unwrap();
        let tensors = HashMap::from([("a".to_string(), a.clone()), ("b".to_string(), b.clone())]);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let storage_of = crate::mapping::holds_mapped;
        let read = SafetensorsFiles::open(std::slice::from_ref(&path)).unwrap();
        let mapped = SafetensorsFiles::open(std::slice::from_ref(&path))
            .unwrap()
            .mapped();
        for (name, want) in [("a", &a), ("b", &b)] {
            let dtype = want.dtype();
            let kept = mapped.get_unchecked(name, dtype, &Device::Cpu).unwrap();
            assert!(storage_of(&kept), "{name} as stored is mapped");
            let copied = read.get_unchecked(name, dtype, &Device::Cpu).unwrap();
            assert!(!storage_of(&copied), "{name} without the map is read");
            let (kept, copied) = (
                kept.to_dtype(DType::F32).unwrap(),
                copied.to_dtype(DType::F32).unwrap(),
            );
            assert_eq!(
                kept.to_vec2::<f32>().unwrap(),
                want.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()
            );
            assert_eq!(
                copied.to_vec2::<f32>().unwrap(),
                kept.to_vec2::<f32>().unwrap()
            );
        }
        let again = mapped.get_unchecked("a", DType::F32, &Device::Cpu).unwrap();
        assert!(
            !storage_of(&again),
            "a tensor asked for twice (tied) is read the second time"
        );
        assert_eq!(again.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        let widened = mapped.get_unchecked("b", DType::F32, &Device::Cpu).unwrap();
        assert!(
            !storage_of(&widened),
            "a converted tensor is read, not mapped"
        );
        assert_eq!(
            widened.to_vec2::<f32>().unwrap(),
            b.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()
        );
    }
}
