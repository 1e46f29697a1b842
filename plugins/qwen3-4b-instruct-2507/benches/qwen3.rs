//! Qwen3 speed against transformers, in one run on the same machine: a Qwen3-0.6B-shaped random
//! checkpoint (generated on first use by `tests/bench/make_checkpoint.py`, not committed), a 512-token prompt
//! and 128 greedy decode steps after it, in f32, bf16, q8 and q4 (transformers in f32 and bf16), 2
//! threads; load time, tokens/s, peak RSS, ratios, and each mode's decode limit (the weight bytes
//! a step reads over a streaming read's bandwidth, measured in the same run); llama.cpp's
//! `llama-bench` on the same weights too when it is built (`PIO_LLAMA_BENCH` or
//! `tests/bench/build_llama_cpp.sh`), q8 against its Q8_0 and q4 against its Q4_K_M — and PIO
//! on those very GGUF files (`gguf-q8_0`, `gguf-q4_k_m`: the same bytes in both engines), and the
//! Q4_K_M file with an 8-bit KV cache in both (`gguf-q4_k_m+kv8`). Decode runs after the prompt
//! (depth 512) and again from an empty cache (depth 0).
//!
//! Run: `cargo bench -p pio-plugin-qwen3 --bench qwen3` (needs python3 with
//! `tests/fixtures/requirements.txt` installed). Each dtype runs in its own process so peak RSS
//! is its own. `-- --load MODE` only loads the model (`bf16`, or `bf16+read` with no file
//! mapped), printing the time and memory: run each in turn to compare.

use std::path::{Path, PathBuf};
use std::time::Instant;

use pio_engine::candle_core::{DType, Device};
use pio_engine::checkpoint::Checkpoint;
use pio_engine::kv_pool::CacheType;
use pio_engine::profile::{Op, PROFILE};
use pio_engine::single::SingleSequence;
use pio_plugin_qwen3::model::Qwen3;
use serde_json::{Map, Value};

const PROMPT: usize = 512;
const DECODE: usize = 128;
const THREADS: usize = 2;

#[path = "../../../tests/bench/common.rs"]
mod common;

fn root() -> PathBuf {
    common::repo_root(env!("CARGO_MANIFEST_DIR"))
}

fn checkpoint_dir() -> PathBuf {
    root().join("target/bench/qwen3-0.6b-random")
}

/// Embedding bytes of the Qwen3-0.6B shape in `dtype`.
fn embedding_bytes(dtype: DType) -> usize {
    151_936 * 1024 * dtype.size_in_bytes()
}

/// One mode (`f32`, `bf16`, `q8`, `q4`), in this process: prints a JSON line like the
/// transformers script's, with the weight bytes one decode step reads.
fn measure(dir: &Path, mode: &str, profiled: bool) {
    if profiled {
        PROFILE.enable();
    }
    // `MODE+kv8`: MODE's weights with an 8-bit KV cache.
    let (mode, cache) = match mode.strip_suffix("+kv8") {
        Some(weights) => (weights, Some(CacheType::Q8_0)),
        None => (mode, None),
    };
    let dt = if mode == "f32" {
        DType::F32
    } else {
        DType::BF16
    };
    let (model, load_s): (Qwen3, f64) = if mode == "f32" {
        let t = Instant::now();
        let checkpoint = Checkpoint::open(dir).expect("checkpoint");
        let model = Qwen3::load(&checkpoint, dt, &Device::Cpu, &mut |_, _| {}).expect("load");
        (model, t.elapsed().as_secs_f64())
    } else {
        common::load_timed(dir, mode)
    };
    // A step reads every layer and the output head; the head is the embedding unless quantized.
    let layers: usize = model.layer_weight_bytes().iter().sum();
    let head = model.weight_bytes() - layers - embedding_bytes(dt);
    let step_bytes = layers + if head == 0 { embedding_bytes(dt) } else { head };
    // The same pseudo-random prompt shape as the reference (the ids themselves do not matter).
    let prompt: Vec<u32> = (0..PROMPT as u32)
        .map(|i| (i * 7919 + 13) % 151_936)
        .collect();
    let cache = cache.unwrap_or(CacheType::Float(dt));
    let sequence = || SingleSequence::with_cache(&model, PROMPT + DECODE + 1, cache).expect("pool");
    let mut seq = sequence();
    let t = Instant::now();
    let logits = seq.forward(&model, &prompt).expect("prefill");
    let prefill_s = t.elapsed().as_secs_f64();
    let before = profiled.then(|| PROFILE.snapshot()).flatten();
    let decode_s = decode(&model, &mut seq, logits);
    let after = profiled.then(|| PROFILE.snapshot()).flatten();
    // The same steps from an empty cache: what attention over the cache costs is the difference.
    let mut seq = sequence();
    let logits = seq.forward(&model, &prompt[..1]).expect("first token");
    let start = profiled.then(|| PROFILE.snapshot()).flatten();
    let decode0_s = decode(&model, &mut seq, logits);
    let end = profiled.then(|| PROFILE.snapshot()).flatten();
    if let (Some(before), Some(after), Some(start), Some(end)) = (before, after, start, end) {
        print_profile(&format!("depth {PROMPT}"), (&before, &after), decode_s);
        print_profile("depth 0", (&start, &end), decode0_s);
    }
    println!(
        "{{\"dtype\": \"{mode}{}\", \"load_s\": {load_s}, \"prefill_tps\": {}, \"decode_tps\": {}, \"decode0_tps\": {}, \"peak_rss\": {}, \"step_bytes\": {step_bytes}}}",
        if cache == CacheType::Q8_0 { "+kv8" } else { "" },
        PROMPT as f64 / prefill_s,
        DECODE as f64 / decode_s,
        DECODE as f64 / decode0_s,
        common::peak_rss()
    );
}

/// Microseconds per decode step in each timed operation between two profile snapshots, and the
/// rest of the `seconds` the steps took (stderr).
fn print_profile(
    label: &str,
    (from, to): (&Map<String, Value>, &Map<String, Value>),
    seconds: f64,
) {
    let us = |key: &str| {
        let at = |m: &Map<String, Value>| m.get(key).and_then(Value::as_f64).unwrap_or(0.0);
        (at(to) - at(from)) / DECODE as f64
    };
    // Whole steps are timed here, not by the profile (`SingleSequence` opens no forward scope).
    let ops = &Op::ALL[1..];
    let step = seconds * 1e6 / DECODE as f64;
    let timed: f64 = ops.iter().map(|op| us(op.key())).sum();
    let parts: Vec<String> = ops
        .iter()
        .map(|op| format!("{} {:.0}", op.key(), us(op.key())))
        .collect();
    eprintln!(
        "profile, decode at {label}, µs per step: step {step:.0}, {}, other_us {:.0}",
        parts.join(", "),
        step - timed
    );
}

/// Seconds of `DECODE` greedy steps after `logits`.
fn decode(model: &Qwen3, seq: &mut SingleSequence, mut logits: Vec<f32>) -> f64 {
    let t = Instant::now();
    for _ in 0..DECODE {
        let next = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32);
        logits = seq.forward(model, &[next]).expect("decode");
    }
    t.elapsed().as_secs_f64()
}

/// GB/s of a streaming read of 1 GiB over `THREADS` threads (the decode bandwidth limit).
fn streaming_read() -> f64 {
    let bytes = vec![1u8; 1 << 30];
    let chunk = bytes.len() / THREADS;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for part in bytes.chunks(chunk) {
                s.spawn(move || {
                    // Eight independent sums: the loop vectorizes and the read is the limit.
                    let mut acc = [0u64; 8];
                    for line in part.chunks_exact(64) {
                        for (a, w) in acc.iter_mut().zip(line.chunks_exact(8)) {
                            *a = a
                                .wrapping_add(u64::from_le_bytes(w.try_into().unwrap_or_default()));
                        }
                    }
                    std::hint::black_box(acc);
                });
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    bytes.len() as f64 / best / 1e9
}

/// llama.cpp's name for a mode's weights.
fn llama_dtype(mode: &str) -> &str {
    match mode {
        "q8" => "q8_0",
        "q4" => "q4_k_m",
        other => other.strip_prefix("gguf-").unwrap_or(other),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--measure") {
        let profiled = args.iter().any(|a| a == "--profile");
        measure(&checkpoint_dir(), &args[i + 1], profiled);
        return;
    }
    let dir = checkpoint_dir();
    common::ensure_checkpoint(&root(), &dir, &["qwen3-0.6b"]);
    if let Some(i) = args.iter().position(|a| a == "--load") {
        common::print_load::<Qwen3>(&dir, args.get(i + 1).map_or("bf16", String::as_str));
        return;
    }
    let bandwidth = streaming_read();
    let work = common::Workload {
        prompt: PROMPT,
        decode: DECODE,
        threads: THREADS,
        depth: 0,
        streams: 1,
        dtypes: "f32,bf16",
    };
    let reference = common::transformers(&root(), &dir, &work);
    // llama.cpp when it has been built (tests/bench/build_llama_cpp.sh): prefill and decode only.
    let llama = match common::llama_bench(&root()) {
        Some(bench) => common::llama_cpp(
            &root(),
            &bench,
            &dir,
            &common::Workload {
                dtypes: "f32,bf16,q8_0,q4_k_m,q4_k_m+kv8",
                ..work
            },
        ),
        None => {
            eprintln!(
                "llama.cpp not built (tests/bench/build_llama_cpp.sh): its rows are left out"
            );
            Vec::new()
        }
    };
    // After llama.cpp's side, which writes the GGUF files PIO then loads too.
    let mut modes = vec!["f32", "bf16", "q8", "q4"];
    for (mode, kind) in [
        ("gguf-q8_0", "q8_0"),
        ("gguf-q4_k_m", "q4_k_m"),
        ("gguf-q4_k_m+kv8", "q4_k_m"),
    ] {
        if common::gguf_path(&dir, kind).is_file() {
            modes.push(mode);
        }
    }
    let pio = common::measure_modes(&modes, THREADS);
    println!(
        "Qwen3-0.6B shape, prompt {PROMPT} tokens, {DECODE} decode steps after it, {THREADS} threads; \
         streaming read {bandwidth:.1} GB/s"
    );
    println!("| mode | engine | load (s) | prefill tok/s | decode tok/s | decode limit tok/s | of the limit | decode at depth 0 | of the limit | peak RSS (GiB) |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for ((_, ours), &mode) in pio.iter().zip(&modes) {
        let theirs = reference
            .iter()
            .find(|l| l.contains(&format!("\"{mode}\"")));
        let llama = llama
            .iter()
            .find(|l| l.contains(&format!("\"{}\"", llama_dtype(mode))));
        let limit = bandwidth * 1e9 / common::field(ours, "step_bytes");
        let mut rows = vec![("pio", ours)];
        rows.extend(theirs.map(|l| ("transformers", l)));
        rows.extend(llama.map(|l| ("llama.cpp", l)));
        for (name, line) in rows {
            let cell = |key: &str, digits: usize| {
                let v = common::field(line, key);
                if v.is_nan() {
                    String::new()
                } else {
                    format!("{v:.digits$}")
                }
            };
            let decode = common::field(line, "decode_tps");
            let decode0 = common::field(line, "decode0_tps");
            let share = |v: f64| {
                if v.is_nan() {
                    String::new()
                } else {
                    format!("{:.0}%", 100.0 * v / limit)
                }
            };
            println!(
                "| {mode} | {name} | {} | {} | {} | {limit:.1} | {} | {} | {} | {} |",
                cell("load_s", 1),
                cell("prefill_tps", 1),
                cell("decode_tps", 2),
                share(decode),
                cell("decode0_tps", 2),
                share(decode0),
                if line.contains("peak_rss") {
                    format!("{:.2}", common::gib(common::field(line, "peak_rss")))
                } else {
                    String::new()
                }
            );
        }
        let ratio = |other: &str, line: &String| {
            let ratio = |key: &str| {
                let r = common::field(ours, key) / common::field(line, key);
                if r.is_nan() {
                    String::new()
                } else {
                    format!("{r:.2}x")
                }
            };
            println!(
                "| {mode} | pio / {other} | | {} | {} | | | {} | | |",
                ratio("prefill_tps"),
                ratio("decode_tps"),
                ratio("decode0_tps")
            );
        };
        if let Some(t) = theirs {
            ratio("transformers", t);
        }
        if let Some(l) = llama {
            ratio("llama.cpp", l);
        }
    }
}
