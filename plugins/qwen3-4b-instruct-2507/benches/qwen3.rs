//! Qwen3 speed against transformers, in one run on the same machine: a Qwen3-0.6B-shaped random
//! checkpoint (generated on first use by `tests/bench/make_checkpoint.py`, not committed), a 512-token prompt
//! and 128 greedy decode steps, f32 and bf16, 2 threads; load time, tokens/s, peak RSS, ratios;
//! llama.cpp's `llama-bench` on the same weights too when it is built (`PIO_LLAMA_BENCH` or
//! `tests/bench/build_llama_cpp.sh`).
//!
//! Run: `cargo bench -p pio-plugin-qwen3 --bench qwen3` (needs python3 with
//! `tests/fixtures/requirements.txt` installed). Each dtype runs in its own process so peak RSS
//! is its own.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use pio_engine::candle_core::{DType, Device};
use pio_engine::checkpoint::Checkpoint;
use pio_engine::single::SingleSequence;
use pio_plugin_qwen3::model::Qwen3;

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

/// One dtype, in this process: prints a JSON line like the transformers script's.
fn measure(dir: &Path, dtype: &str) {
    let dt = if dtype == "bf16" {
        DType::BF16
    } else {
        DType::F32
    };
    let t = Instant::now();
    let checkpoint = Checkpoint::open(dir).expect("checkpoint");
    let model = Qwen3::load(&checkpoint, dt, &Device::Cpu, &mut |_, _| {}).expect("load");
    let load_s = t.elapsed().as_secs_f64();
    // The same pseudo-random prompt shape as the reference (the ids themselves do not matter).
    let prompt: Vec<u32> = (0..PROMPT as u32)
        .map(|i| (i * 7919 + 13) % 151_936)
        .collect();
    let mut seq = SingleSequence::new(&model, PROMPT + DECODE + 1).expect("pool");
    let t = Instant::now();
    let mut logits = seq.forward(&model, &prompt).expect("prefill");
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
        "{{\"dtype\": \"{dtype}\", \"load_s\": {load_s}, \"prefill_tps\": {}, \"decode_tps\": {}, \"peak_rss\": {}}}",
        PROMPT as f64 / prefill_s,
        DECODE as f64 / decode_s,
        common::peak_rss()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--measure") {
        measure(&checkpoint_dir(), &args[i + 1]);
        return;
    }
    let dir = checkpoint_dir();
    common::ensure_checkpoint(&root(), &dir, &["qwen3-0.6b"]);
    let exe = std::env::current_exe().expect("bench executable");
    let mut pio = Vec::new();
    for dtype in ["f32", "bf16"] {
        let out = Command::new(&exe)
            .args(["--measure", dtype])
            .env("RAYON_NUM_THREADS", THREADS.to_string())
            .output()
            .expect("run measurement");
        pio.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
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
        Some(bench) => common::llama_cpp(&root(), &bench, &dir, &work),
        None => {
            eprintln!(
                "llama.cpp not built (tests/bench/build_llama_cpp.sh): its rows are left out"
            );
            Vec::new()
        }
    };
    println!("Qwen3-0.6B shape, prompt {PROMPT} tokens, {DECODE} decode steps, {THREADS} threads");
    println!("| dtype | engine | load (s) | prefill tok/s | decode tok/s | peak RSS (GiB) |");
    println!("|---|---|---|---|---|---|");
    for (i, (ours, theirs)) in pio.iter().zip(&reference).enumerate() {
        let dtype = if ours.contains("bf16") { "bf16" } else { "f32" };
        let llama = llama.get(i).filter(|l| l.contains(&format!("\"{dtype}\"")));
        let mut rows = vec![("pio", ours), ("transformers", theirs)];
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
            println!(
                "| {dtype} | {name} | {} | {} | {} | {} |",
                cell("load_s", 1),
                cell("prefill_tps", 1),
                cell("decode_tps", 2),
                if line.contains("peak_rss") {
                    format!(
                        "{:.2}",
                        common::field(line, "peak_rss") / (1u64 << 30) as f64
                    )
                } else {
                    String::new()
                }
            );
        }
        let ratio = |other: &str, line: &String| {
            println!(
                "| {dtype} | pio / {other} | | {:.2}x | {:.2}x | |",
                common::field(ours, "prefill_tps") / common::field(line, "prefill_tps"),
                common::field(ours, "decode_tps") / common::field(line, "decode_tps")
            );
        };
        ratio("transformers", theirs);
        if let Some(l) = llama {
            ratio("llama.cpp", l);
        }
    }
}
