//! The quantization cache: a second load reads every quantized weight from the file the first
//! wrote and gives the same logits; a stale or truncated file is not used and is rebuilt, a
//! damaged one is caught by its checksums; a folder
//! that cannot be written leaves the model loaded and names the file.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use pio_engine::candle_core::{DType, Device};
use pio_engine::checkpoint::Checkpoint;
use pio_engine::generate::CausalLm;
use pio_engine::linear::Quantization;
use pio_engine::models::qwen3::Qwen3Moe;
use pio_engine::runtime::LoadModel;
use pio_engine::single::SingleSequence;

mod common;
use common::fixtures;

/// A copy of the MoE fixture (so its files' times can change), readable to anyone.
fn fixture_copy(into: &Path) -> std::path::PathBuf {
    let dir = into.join("qwen3-moe-tiny");
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixtures().join("qwen3-moe-tiny")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

/// Loads `dir` at q4 with its cache in `cache`; the model's logits for a short prompt, and the
/// checkpoint (to ask its cache what happened).
fn load(dir: &Path, cache: &Path) -> (Vec<f32>, Checkpoint) {
    let checkpoint = Checkpoint::open(dir)
        .unwrap()
        .with_quantization_cache(cache, "q4")
        .unwrap();
    let model = <Qwen3Moe as LoadModel>::load(
        &checkpoint,
        DType::F32,
        Quantization::Q4,
        &Device::Cpu,
        &mut |_, _| {},
    )
    .unwrap();
    let mut seq = SingleSequence::new(&model, model.context_length()).unwrap();
    (seq.forward(&model, &[1, 2, 3, 4]).unwrap(), checkpoint)
}

#[test]
fn a_second_load_reads_the_cache_and_a_stale_or_truncated_one_is_rebuilt() {
    let work = tempfile::tempdir().unwrap();
    let dir = fixture_copy(work.path());
    let cache_dir = work.path().join("cache");

    let (first, checkpoint) = load(&dir, &cache_dir);
    let cache = checkpoint.quantization_cache().unwrap();
    assert!(!cache.found());
    let file = cache
        .finish()
        .unwrap()
        .expect("the first load writes the cache");
    assert!(
        file.is_file() && file.starts_with(&cache_dir),
        "{}",
        file.display()
    );
    let size = std::fs::metadata(&file).unwrap().len();

    let (second, checkpoint) = load(&dir, &cache_dir);
    let cache = checkpoint.quantization_cache().unwrap();
    assert!(cache.found());
    // Every projection and expert of the fixture's layers (the tied head is quantized from the
    // embedding, not cached).
    assert!(cache.hits() >= 8, "{} tensors from the cache", cache.hits());
    assert_eq!(cache.finish().unwrap(), None, "nothing to write");
    assert_eq!(second, first, "the cached blocks are the blocks");

    // Truncated: not used, rebuilt whole.
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    let (third, checkpoint) = load(&dir, &cache_dir);
    let cache = checkpoint.quantization_cache().unwrap();
    assert!(!cache.found(), "a truncated cache is not read");
    assert_eq!(cache.finish().unwrap(), Some(file.clone()));
    assert_eq!(std::fs::metadata(&file).unwrap().len(), size);
    assert_eq!(third, first);

    // Damaged in place (same size, a byte of the last tensor changed): that tensor is quantized
    // again, the load says so, and the file goes for the next start to rebuild.
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() - 50;
    bytes[at] ^= 0x5A;
    std::fs::write(&file, &bytes).unwrap();
    let (damaged, checkpoint) = load(&dir, &cache_dir);
    let cache = checkpoint.quantization_cache().unwrap();
    assert!(cache.found(), "the file itself reads as a cache");
    assert_eq!(damaged, first, "the damaged tensor is quantized again");
    let e = cache.finish().unwrap_err().to_string();
    assert!(e.contains("checksum") && e.contains("rebuilds"), "{e}");
    assert!(!file.exists(), "a damaged cache is removed");
    let (_, checkpoint) = load(&dir, &cache_dir);
    let cache = checkpoint.quantization_cache().unwrap();
    assert!(!cache.found());
    assert_eq!(cache.finish().unwrap(), Some(file.clone()), "and rebuilt");

    // Stale: the weights changed after the cache was made.
    let weights = dir.join("model-00003-of-00005.safetensors");
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let (_, checkpoint) = load(&dir, &cache_dir);
    let cache = checkpoint.quantization_cache().unwrap();
    assert!(!cache.found(), "a cache of other weights is not read");
    assert_eq!(
        cache.finish().unwrap(),
        Some(file.clone()),
        "it is replaced"
    );
    let (_, checkpoint) = load(&dir, &cache_dir);
    assert!(checkpoint.quantization_cache().unwrap().found());
}

#[test]
fn a_cache_that_cannot_be_written_leaves_the_model_loaded_and_names_the_file() {
    let work = tempfile::tempdir().unwrap();
    // A file where the cache folder should be: nothing can be created under it.
    let blocked = work.path().join("blocked");
    std::fs::write(&blocked, b"").unwrap();
    let (logits, checkpoint) = load(&fixtures().join("qwen3-moe-tiny"), &blocked.join("cache"));
    assert!(logits.iter().all(|v| v.is_finite()));
    let e = checkpoint
        .quantization_cache()
        .unwrap()
        .finish()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("blocked") && e.contains("quantization_cache"),
        "{e}"
    );
}
