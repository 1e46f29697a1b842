//! Quantized weights kept between starts: quantizing a large model at load takes minutes
//! (Qwen3-Coder-30B to q4: ~10 on 2 cores), reading the result back takes as long as its bytes
//! take to read. The cache is one GGUF file per checkpoint folder and quantization, holding a key
//! over what it was made from (the config, each weight file's name, size and modification time,
//! the quantization); a file whose key differs (stale), whose tensors do not fit it (truncated) or
//! that cannot be parsed is not used, and is replaced by the next complete load. Each tensor
//! carries a CRC-32 of its bytes: one damaged in place (a bad disk, a stray write) is quantized
//! again from the checkpoint instead of loading as garbage, and the file is removed for the next
//! start to rebuild. Tensors are written as they are quantized into a data file beside it, so no
//! second copy is held in memory; the GGUF is assembled, synced and renamed into place once
//! loading is done.

use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QTensor};

use crate::error::{EngineError, Result};

/// How a cache file's stem ends (`….pio-cache.gguf`): a model folder that is also the cache
/// folder still holds one model, since [`crate::gguf::model_file`] passes these by.
pub const STEM_SUFFIX: &str = ".pio-cache";

/// GGUF's data alignment (its default).
const ALIGNMENT: u64 = 32;

/// The metadata key holding the cache key.
const KEY: &str = "pio.quantization_cache.key";

/// The metadata key holding tensor `name`'s CRC-32.
fn check_key(name: &str) -> String {
    format!("pio.quantization_cache.crc32.{name}")
}

/// A checkpoint's quantization cache: read when a valid one exists, written otherwise.
#[derive(Debug)]
pub struct QuantCache {
    path: PathBuf,
    key: String,
    /// This load's own in working files' names: a worker's pid is 2 in every sandbox's pid
    /// namespace, so two loads of one model (a start beside `pio quantize`) wrote one file.
    suffix: String,
    /// The valid cache file, read by position (so tensors load in parallel).
    found: Option<Found>,
    made: Mutex<Made>,
}

#[derive(Debug)]
struct Found {
    file: File,
    content: Content,
    /// The file mapped, so a hit is its pages rather than a copy (`None`: read instead).
    map: Option<crate::mapping::MappedFile>,
}

/// What this load quantized, written to the data file as it came.
#[derive(Debug, Default)]
struct Made {
    data: Option<BufWriter<File>>,
    entries: Vec<Entry>,
    offset: u64,
    /// A tensor the found cache lacked: it does not match this checkpoint after all.
    missed: bool,
    /// Tensors of the found cache whose bytes failed their checksum.
    damaged: Vec<String>,
    hits: usize,
    error: Option<String>,
}

#[derive(Debug)]
struct Entry {
    name: String,
    dtype: GgmlDType,
    shape: Vec<usize>,
    offset: u64,
    crc32: u32,
}

/// 64-bit FNV-1a: a stable hash (std's is not promised to stay the same across releases).
pub(crate) fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.iter().chain(&[0xFF]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

impl QuantCache {
    /// The cache file `{stem}.gguf` in `dir`, read if it is valid for `key` (else it will be
    /// replaced); `mapped`: its hits are the file's pages (see [`crate::mapping`]), else copies.
    pub fn open(dir: &Path, stem: &str, key: &str, mapped: bool) -> Self {
        let path = dir.join(format!("{stem}.gguf"));
        let found = Self::read(&path, key, mapped);
        sweep(dir, stem);
        Self {
            path,
            key: key.to_string(),
            suffix: format!("{}-{:016x}", std::process::id(), rand::random::<u64>()),
            found,
            made: Mutex::new(Made::default()),
        }
    }

    /// Tensors read from the found cache so far.
    pub fn hits(&self) -> usize {
        self.made.lock().map_or(0, |m| m.hits)
    }

    /// The cache file (present or to be written).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a valid cache was found.
    pub fn found(&self) -> bool {
        self.found.is_some()
    }

    /// `path` when it is a cache for `key` whose every tensor fits in the file and has its
    /// checksum (a cache written before checksums were is rebuilt).
    fn read(path: &Path, key: &str, mapped: bool) -> Option<Found> {
        let mut file = File::open(path).ok()?;
        let len = file.metadata().ok()?.len();
        let content = Content::read(&mut file).ok()?;
        if content.metadata.get(KEY).and_then(|v| v.to_string().ok()) != Some(&key.to_string()) {
            return None;
        }
        let fits = content.tensor_infos.values().all(|t| {
            let bytes = t.shape.elem_count() / t.ggml_dtype.block_size() * t.ggml_dtype.type_size();
            content.tensor_data_offset + t.offset + bytes as u64 <= len
        });
        let checked =
            (content.tensor_infos.keys()).all(|name| stored_crc32(&content, name).is_some());
        let fits = fits && checked;
        if !fits {
            return None;
        }
        let map = usize::try_from(len)
            .ok()
            .filter(|_| mapped)
            .and_then(|len| crate::mapping::MappedFile::map(&file, len));
        Some(Found { file, content, map })
    }

    /// The blocks of tensor `name` from the found cache, when it holds it as `dtype` of
    /// `shape`: its bytes as stored, the mapped file's own pages where it maps (the kernels' tiles
    /// are packed from them, and freeing them drops the pages), else read in one call straight
    /// into the returned buffer (a `QTensor` would copy them twice more on the way to the tiles).
    pub(crate) fn get(&self, name: &str, dtype: GgmlDType, shape: &[usize]) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let Found { file, content, map } = self.found.as_ref()?;
        let bytes = match content.tensor_infos.get(name) {
            Some(info) if info.ggml_dtype == dtype && info.shape.dims() == shape => {
                let len = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
                let at = content.tensor_data_offset + info.offset;
                let mapped = (map.as_ref())
                    .zip(usize::try_from(at).ok())
                    .and_then(|(map, at)| map.values::<u8>(at, len));
                mapped.or_else(|| {
                    let mut bytes = vec![0u8; len];
                    file.read_exact_at(&mut bytes, at).ok().map(|()| bytes)
                })
            }
            _ => None,
        };
        let intact = bytes
            .as_ref()
            .map(|b| stored_crc32(content, name) == Some(crc32fast::hash(b)));
        if let Ok(mut made) = self.made.lock() {
            match intact {
                Some(true) => made.hits += 1,
                Some(false) => made.damaged.push(name.to_string()),
                None => made.missed = true,
            }
        }
        bytes.filter(|_| intact == Some(true))
    }

    /// Records `q`, just quantized as `name`, for the cache this load will write.
    pub(crate) fn put(&self, name: &str, q: &QTensor) {
        if self.found.is_some() {
            return;
        }
        let Ok(mut made) = self.made.lock() else {
            return;
        };
        if made.error.is_some() {
            return;
        }
        if let Err(e) = self.append(&mut made, name, q) {
            made.error = Some(e);
        }
    }

    fn append(&self, made: &mut Made, name: &str, q: &QTensor) -> std::result::Result<(), String> {
        if made.data.is_none() {
            let dir = self.path.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let data = self.part("data");
            // Read back when the cache is assembled.
            let file = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&data)
                .map_err(|e| format!("{}: {e}", data.display()))?;
            made.data = Some(BufWriter::new(file));
        }
        let bytes = q.data().map_err(|e| e.to_string())?;
        let data = made.data.as_mut().ok_or("no data file")?;
        let padding = made.offset.next_multiple_of(ALIGNMENT) - made.offset;
        data.write_all(&vec![0; padding as usize])
            .and_then(|()| data.write_all(&bytes))
            .map_err(|e| format!("{}: {e}", self.part("data").display()))?;
        made.entries.push(Entry {
            name: name.to_string(),
            dtype: q.dtype(),
            shape: q.shape().dims().to_vec(),
            offset: made.offset + padding,
            crc32: crc32fast::hash(&bytes),
        });
        made.offset += padding + bytes.len() as u64;
        Ok(())
    }

    /// A working file beside the cache.
    fn part(&self, what: &str) -> PathBuf {
        self.path
            .with_extension(format!("gguf.{what}.{}", self.suffix))
    }

    /// Once loading is done: writes the cache when this load made one (returns its path), removes
    /// a found cache that lacked a tensor or held a damaged one. Errors name the file; the model
    /// is loaded either way.
    pub fn finish(&self) -> Result<Option<PathBuf>> {
        let mut made = self
            .made
            .lock()
            .map_err(|_| self.error("a loading thread panicked"))?;
        if !made.damaged.is_empty() {
            let _ = std::fs::remove_file(&self.path);
            return Err(EngineError::BadFile {
                path: self.path.clone(),
                reason: format!(
                    "{} tensor(s) of the quantization cache failed their checksum (first: {}); \
                     they were quantized again from the checkpoint and the file was removed, so \
                     the next start rebuilds it (check the disk it is on)",
                    made.damaged.len(),
                    made.damaged[0]
                ),
            });
        }
        if made.missed {
            // Stale in a way the key did not catch: the next start rebuilds it.
            let _ = std::fs::remove_file(&self.path);
            return Ok(None);
        }
        if let Some(e) = made.error.take() {
            let _ = std::fs::remove_file(self.part("data"));
            return Err(self.error(&e));
        }
        let Some(data) = made.data.take() else {
            return Ok(None);
        };
        let result = self.assemble(data, &made.entries);
        let _ = std::fs::remove_file(self.part("data"));
        result.map(|()| Some(self.path.clone()))
    }

    /// Header, then the data file, into a new file synced and renamed over the cache.
    fn assemble(&self, data: BufWriter<File>, entries: &[Entry]) -> Result<()> {
        let tmp = self.part("tmp");
        let write = || -> std::io::Result<()> {
            let mut data = data.into_inner().map_err(|e| e.into_error())?;
            let mut out = BufWriter::new(File::create(&tmp)?);
            write_header(&mut out, &self.key, entries)?;
            let mut out = out.into_inner().map_err(|e| e.into_error())?;
            data.rewind()?;
            std::io::copy(&mut data, &mut out)?;
            out.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            self.error(&e.to_string())
        })
    }

    fn error(&self, reason: &str) -> EngineError {
        EngineError::BadFile {
            path: self.path.clone(),
            reason: format!(
                "cannot write the quantization cache: {reason} (the model loaded; set quantization_cache to a writable folder, or remove it)"
            ),
        }
    }
}

impl Drop for QuantCache {
    /// A load that failed, or was given up on, before [`QuantCache::finish`] leaves no working
    /// file (each as large as the cache; a crashing load retried filled the disk).
    fn drop(&mut self) {
        for what in ["data", "tmp"] {
            let _ = std::fs::remove_file(self.part(what));
        }
    }
}

/// Working files no load has written to for this long were left by one killed midway.
const ABANDONED: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes the working files of `stem` in `dir` that loads killed midway left (a write in
/// progress touches its file continuously).
fn sweep(dir: &Path, stem: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefixes = [format!("{stem}.gguf.data."), format!("{stem}.gguf.tmp.")];
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let idle = (entry.metadata().ok())
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok());
        if prefixes.iter().any(|p| name.starts_with(p.as_str())) && idle > Some(ABANDONED) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// GGUF v3's header for `entries` (data offsets relative to the aligned data section).
fn write_header(w: &mut impl Write, key: &str, entries: &[Entry]) -> std::io::Result<()> {
    let mut h: Vec<u8> = Vec::new();
    let string = |h: &mut Vec<u8>, s: &str| {
        h.extend((s.len() as u64).to_le_bytes());
        h.extend(s.as_bytes());
    };
    h.extend(0x4655_4747u32.to_le_bytes());
    h.extend(3u32.to_le_bytes());
    h.extend((entries.len() as u64).to_le_bytes());
    h.extend((1 + entries.len() as u64).to_le_bytes());
    string(&mut h, KEY);
    h.extend(8u32.to_le_bytes()); // GGUF's string type
    string(&mut h, key);
    for e in entries {
        string(&mut h, &check_key(&e.name));
        h.extend(4u32.to_le_bytes()); // GGUF's uint32 type
        h.extend(e.crc32.to_le_bytes());
    }
    for e in entries {
        string(&mut h, &e.name);
        h.extend((e.shape.len() as u32).to_le_bytes());
        // ggml lists dimensions innermost first.
        for &d in e.shape.iter().rev() {
            h.extend((d as u64).to_le_bytes());
        }
        h.extend(ggml_type(e.dtype).to_le_bytes());
        h.extend(e.offset.to_le_bytes());
    }
    h.resize((h.len() as u64).next_multiple_of(ALIGNMENT) as usize, 0);
    w.write_all(&h)
}

/// The CRC-32 the cache holds for tensor `name`.
fn stored_crc32(content: &Content, name: &str) -> Option<u32> {
    content.metadata.get(&check_key(name))?.to_u32().ok()
}

/// ggml's type number for `dtype`.
fn ggml_type(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q4K => 12,
        GgmlDType::Q6K => 14,
        GgmlDType::BF16 => 30,
        // Linear layers quantize to the formats above only.
        _ => u32::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// A hit is the cache file's own pages (the tiles are packed from them), and the same
    /// blocks the load put there.
    fn quantized() -> QTensor {
        let values: Vec<f32> = (0..32 * 64).map(|i| (i % 13) as f32 * 0.1).collect();
        let w = Tensor::from_vec(values, (32, 64), &Device::Cpu).unwrap();
        QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Two loads of one model at once (same pid, as in two sandboxes) write files of their own,
    /// and the cache either leaves is whole; a load dropped before it finished leaves nothing.
    #[test]
    fn concurrent_and_abandoned_loads_keep_their_working_files_apart() {
        let dir = tempfile::tempdir().unwrap();
        let q = quantized();
        let (a, b) = (
            QuantCache::open(dir.path(), "m", "key", false),
            QuantCache::open(dir.path(), "m", "key", false),
        );
        a.put("w", &q);
        b.put("w", &q);
        assert_eq!(names(dir.path()).len(), 2, "{:?}", names(dir.path()));
        a.finish().unwrap().expect("written");
        b.finish().unwrap().expect("written");
        assert_eq!(names(dir.path()), ["m.gguf"]);
        let hit = QuantCache::open(dir.path(), "m", "key", false);
        assert_eq!(
            hit.get("w", GgmlDType::Q8_0, &[32, 64]).unwrap(),
            q.data().unwrap().to_vec()
        );
        let given_up = QuantCache::open(dir.path(), "n", "key", false);
        given_up.put("w", &q);
        drop(given_up);
        assert_eq!(names(dir.path()), ["m.gguf"]);
    }

    /// Working files a killed load left are removed by the next open once idle an hour; a
    /// recent one (a load still writing) is kept.
    #[test]
    fn a_killed_loads_working_files_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("m.gguf.data.2");
        let recent = dir.path().join("m.gguf.tmp.2-1");
        std::fs::write(&old, b"left").unwrap();
        std::fs::write(&recent, b"writing").unwrap();
        let then = std::time::SystemTime::now() - ABANDONED * 2;
        File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(then)
            .unwrap();
        let _cache = QuantCache::open(dir.path(), "m", "key", false);
        assert_eq!(names(dir.path()), ["m.gguf.tmp.2-1"]);
    }

    #[test]
    fn a_hit_is_the_mapped_files_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let values: Vec<f32> = (0..64 * 256).map(|i| (i % 97) as f32 * 0.01).collect();
        let w = Tensor::from_vec(values, (64, 256), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let first = QuantCache::open(dir.path(), "model", "key", true);
        first.put("w", &q);
        first.finish().unwrap().expect("written");
        let second = QuantCache::open(dir.path(), "model", "key", true);
        let hit = second.get("w", GgmlDType::Q8_0, &[64, 256]).expect("a hit");
        assert!(crate::mapping::is_mapped(hit.as_ptr()), "the file's pages");
        assert_eq!(hit, q.data().unwrap().to_vec());
        assert_eq!(second.hits(), 1);
        let read = QuantCache::open(dir.path(), "model", "key", false);
        let copy = read.get("w", GgmlDType::Q8_0, &[64, 256]).expect("a hit");
        assert!(
            !crate::mapping::is_mapped(copy.as_ptr()),
            "mmap = false: a copy"
        );
        assert_eq!(copy, hit);
    }
}
