//! Qwen3-Coder-30B-A3B at reduced depth against transformers, in one run on the same machine: a
//! checkpoint with the real widths and all 128 experts but `PIO_BENCH_LAYERS` (default 4) of the 48
//! layers (random weights, generated on first use, not committed), loaded in bf16, q8 and q4;
//! load time, peak and steady RSS, prompt and decode tokens/s, and the 48-layer extrapolation
//! (steady RSS plus 44 more layers of the measured per-layer weight bytes).
//!
//! Run: `cargo bench -p pio-plugin-qwen3-coder --bench moe` (python3 with
//! `tests/fixtures/requirements.txt`; ~7 GB of disk and ~16 GB of memory at 4 layers). Each mode
//! runs in its own process so its peak RSS is its own.
//!
//! `cargo bench -p pio-plugin-qwen3-coder --bench moe -- --second-start` measures the
//! quantization cache instead: a first q4 start that quantizes and writes the cache, a second
//! that reads it, and a plain read of the cache file's bytes (alone, and with as many bytes of the
//! checkpoint as the model keeps dense: the embedding), from a cold page cache when run as root
//! (the target: a second start within 2x of reading its bytes).

use std::path::{Path, PathBuf};
use std::time::Instant;

use pio_engine::models::qwen3::Qwen3Moe;
use pio_engine::single::SingleSequence;

#[path = "../../../tests/bench/common.rs"]
mod common;

const PROMPT: usize = 256;
const DECODE: usize = 32;
const THREADS: usize = 2;
const FULL_DEPTH: usize = 48;

fn root() -> PathBuf {
    common::repo_root(env!("CARGO_MANIFEST_DIR"))
}

fn checkpoint_dir() -> PathBuf {
    root().join(format!(
        "target/bench/qwen3-30b-a3b-{}-layers",
        common::bench_layers()
    ))
}

/// One mode, in this process: prints a JSON line like the transformers script's.
fn measure(dir: &Path, mode: &str) {
    let (model, load_s) = common::load_timed::<Qwen3Moe>(dir, mode);
    let per_layer = model.inner().layer_weight_bytes();
    let prompt: Vec<u32> = (0..PROMPT as u32)
        .map(|i| (i * 7919 + 13) % 151_936)
        .collect();
    let mut seq = SingleSequence::new(&model, PROMPT + DECODE + 1).expect("pool");
    let t = Instant::now();
    let mut logits = seq.prefill(&model, &prompt, 512).expect("prefill");
    let prefill_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..DECODE {
        let next = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32);
        logits = seq.forward(&model, &[next]).expect("decode");
    }
    let decode_s = t.elapsed().as_secs_f64();
    println!(
        "{{\"dtype\": \"{mode}\", \"load_s\": {load_s}, \"prefill_tps\": {}, \"decode_tps\": {}, \"peak_rss\": {}, \"steady_rss\": {}, \"layer_bytes\": {}, \"weight_bytes\": {}}}",
        PROMPT as f64 / prefill_s,
        DECODE as f64 / decode_s,
        common::peak_rss(),
        common::rss(),
        per_layer.iter().sum::<usize>() as f64 / per_layer.len().max(1) as f64,
        model.inner().weight_bytes()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--measure") {
        measure(&checkpoint_dir(), &args[i + 1]);
        return;
    }
    let dir = checkpoint_dir();
    let depth = common::bench_layers().to_string();
    common::ensure_checkpoint(&root(), &dir, &["qwen3-30b-a3b", &depth]);
    if args.iter().any(|a| a == "--second-start") {
        second_start(&dir);
        return;
    }
    let mut rows = common::measure_modes(&["bf16", "q8", "q4"], THREADS);
    let work = common::Workload {
        prompt: PROMPT,
        decode: DECODE,
        threads: THREADS,
        depth: 0,
        streams: 1,
        dtypes: "bf16",
    };
    let reference = common::transformers(&root(), &dir, &work);
    let theirs = reference.first().cloned().unwrap_or_default();
    rows.push(("transformers", theirs.clone()));
    let n = common::bench_layers() as f64;
    println!(
        "Qwen3-Coder-30B-A3B widths, {} of {FULL_DEPTH} layers, prompt {PROMPT} tokens, {DECODE} decode steps, {THREADS} threads",
        common::bench_layers()
    );
    println!("| engine | mode | load (s) | prefill tok/s | decode tok/s | peak RSS (GiB) | steady RSS (GiB) | weights per layer (GiB) | 48 layers, extrapolated (GiB) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    // transformers' layers hold the same bf16 weights as pio's bf16 ones.
    let bf16_layer = rows
        .first()
        .map_or(f64::NAN, |(_, l)| common::field(l, "layer_bytes"));
    for (engine, line) in &rows {
        let f = |k: &str| common::field(line, k);
        let layer = if f("layer_bytes").is_nan() {
            bf16_layer
        } else {
            f("layer_bytes")
        };
        let full = f("steady_rss") + (FULL_DEPTH as f64 - n) * layer;
        println!(
            "| {engine} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.3} | {:.1} |",
            line.split('"').nth(3).unwrap_or("?"),
            f("load_s"),
            f("prefill_tps"),
            f("decode_tps"),
            common::gib(f("peak_rss")),
            common::gib(f("steady_rss")),
            common::gib(layer),
            common::gib(full),
        );
    }
    if let Some((_, bf16)) = rows.first() {
        println!(
            "| pio bf16 / transformers bf16 | | | {:.2}x | {:.2}x | | | | |",
            common::field(bf16, "prefill_tps") / common::field(&theirs, "prefill_tps"),
            common::field(bf16, "decode_tps") / common::field(&theirs, "decode_tps"),
        );
    }
}

/// Each file's length and modification time.
fn stamps(files: &[PathBuf]) -> Vec<Option<(u64, std::time::SystemTime)>> {
    files
        .iter()
        .map(|f| {
            f.metadata()
                .ok()
                .and_then(|m| Some((m.len(), m.modified().ok()?)))
        })
        .collect()
}

/// The q4 quantization cache's first and second start beside a cold read of the file it holds.
fn second_start(dir: &Path) {
    let cache = common::quantization_cache_dir(dir);
    // The first start must make the cache, not find one from an earlier run.
    let _ = std::fs::remove_dir_all(&cache);
    let first = common::measure_modes(&["q4+cache"], THREADS);
    let files: Vec<PathBuf> = std::fs::read_dir(&cache)
        .expect("the first start wrote the cache folder")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    let bytes: u64 = files
        .iter()
        .map(|f| f.metadata().map_or(0, |m| m.len()))
        .sum();
    let written = stamps(&files);
    let cold = drop_page_cache();
    let second = common::measure_modes(&["q4+cache"], THREADS);
    // The same start with no file mapped (`mmap = false`): the cache's blocks read into buffers.
    drop_page_cache();
    let second_read = common::measure_modes(&["q4+cache+read"], THREADS);
    // A second start that missed the cache quantizes again and rewrites it: its time would be a
    // first start's, not what this measures.
    if stamps(&files) != written {
        eprintln!("the second start rewrote the quantization cache (a miss): no figures");
        std::process::exit(1);
    }
    let field = |rows: &[(&str, String)], name: &str| {
        rows.first()
            .map_or(f64::NAN, |(_, l)| common::field(l, name))
    };
    // What a start must read besides the cache: the tensors kept dense (the embedding, above
    // all), as many bytes as the model holds beyond the cache's.
    let dense = (field(&second, "weight_bytes") as u64).saturating_sub(bytes);
    drop_page_cache();
    let t = Instant::now();
    for file in &files {
        read_through(file, u64::MAX);
    }
    let read_s = t.elapsed().as_secs_f64();
    read_through(&dir.join("model.safetensors"), dense);
    let with_dense_s = t.elapsed().as_secs_f64();
    let (first_s, second_s) = (field(&first, "load_s"), field(&second, "load_s"));
    let second_read_s = field(&second_read, "load_s");
    println!(
        "Qwen3-Coder-30B-A3B widths, {} of {FULL_DEPTH} layers, q4 with a quantization cache ({:.2} GiB; {:.2} GiB more kept dense), {THREADS} threads, page cache {}",
        common::bench_layers(),
        common::gib(bytes as f64),
        common::gib(dense as f64),
        if cold { "dropped before the second start and the reads" } else { "warm (not root: could not drop it)" }
    );
    println!("| first start (quantize, write) s | second start (read the cache) s | the same, mmap = false s | reading the cache file s | second start / that | reading it and the dense bytes s | second start / that |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {first_s:.1} | {second_s:.1} | {second_read_s:.1} | {read_s:.1} | {:.2}x | {with_dense_s:.1} | {:.2}x |",
        second_s / read_s,
        second_s / with_dense_s
    );
}

/// Drops the kernel's page cache (root only; the cache file is synced when written, so its
/// pages are clean); whether it could.
fn drop_page_cache() -> bool {
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// Reads up to `limit` bytes of `file` in 8 MiB pieces.
fn read_through(file: &Path, limit: u64) {
    use std::io::Read;
    let f = std::fs::File::open(file).expect("open the file to read");
    let mut f = f.take(limit);
    let mut buf = vec![0u8; 8 << 20];
    while f.read(&mut buf).expect("read the file") > 0 {}
}
