//! GLM-4.7-Flash at reduced depth against transformers and llama.cpp, in one run on the same
//! machine: a checkpoint with the real widths and all 64 experts but `PIO_BENCH_LAYERS` (default
//! 4: the dense layer and 3 sparse ones) of the 47 layers (random weights, generated on first
//! use, not committed), loaded in bf16, q8 and q4. For each: load time, peak and steady RSS,
//! prompt and decode tokens/s, decode after a 4,096-token prompt (where the latent cache pays),
//! 4 streams decoding at once, and the 47-layer extrapolation (steady RSS plus the missing sparse
//! layers at the measured bytes of one).
//!
//! Run: `cargo bench -p pio-plugin-glm --bench glm` (python3 with `tests/fixtures/requirements.txt`;
//! llama.cpp rows when `tests/bench/build_llama_cpp.sh` has built it; ~6 GB of disk and ~12 GB of
//! memory at 4 layers, about 30 minutes on 2 cores). Each mode runs in its own process so its peak
//! RSS is its own.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use pio_engine::candle_core::DType;
use pio_engine::checkpoint::Checkpoint;
use pio_engine::generate::{CausalLm, Request};
use pio_engine::models::glm4_moe_lite::Glm4MoeLite;
use pio_engine::sampling::SamplingParams;
use pio_engine::serving::{Engine, EngineConfig, Event};
use pio_engine::single::SingleSequence;
use pio_engine::text::TextCodec;

#[path = "../../../tests/bench/common.rs"]
mod common;

const PROMPT: usize = 256;
const DECODE: usize = 32;
const DEPTH: usize = 4096;
const STREAMS: usize = 4;
const THREADS: usize = 2;
const FULL_DEPTH: usize = 47;
const VOCAB: u32 = 154_880;

fn root() -> PathBuf {
    common::repo_root(env!("CARGO_MANIFEST_DIR"))
}

fn checkpoint_dir() -> PathBuf {
    root().join(format!(
        "target/bench/glm-4.7-flash-{}-layers",
        common::bench_layers()
    ))
}

fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7919 + seed) % VOCAB).collect()
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best }) as u32
}

/// Greedy decode tokens/s after prefilling `prompt`; also the prefill's tokens/s.
fn prefill_then_decode(model: &Glm4MoeLite, prompt: &[u32]) -> (f64, f64) {
    let mut seq = SingleSequence::new(model, prompt.len() + DECODE + 1).expect("pool");
    let t = Instant::now();
    let mut logits = seq.prefill(model, prompt, 512).expect("prefill");
    let prefill = prompt.len() as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..DECODE {
        logits = seq.forward(model, &[argmax(&logits)]).expect("decode");
    }
    (prefill, DECODE as f64 / t.elapsed().as_secs_f64())
}

/// Tokens/s of `STREAMS` greedy requests decoding together in the batching engine, counted from
/// the moment all have their first token to the last token.
fn streams(model: Glm4MoeLite, dir: &Path) -> f64 {
    let codec = TextCodec::load(&Checkpoint::open(dir).expect("checkpoint")).expect("tokenizer");
    let config = EngineConfig {
        kv_blocks: STREAMS * (PROMPT + DECODE).div_ceil(16) + 8,
        ..EngineConfig::default()
    };
    let engine = Engine::start(Arc::new(model), Arc::new(codec), config).expect("engine");
    let times: Vec<Vec<Instant>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..STREAMS as u32)
            .map(|s| {
                let request = Request {
                    prompt: tokens(PROMPT, 13 + s),
                    sampling: SamplingParams::default(),
                    max_tokens: DECODE,
                    ..Request::default()
                };
                let stream = engine.submit(request).expect("submit");
                scope.spawn(move || {
                    let mut at = Vec::new();
                    while let Some(Event::Token(_)) = stream.next() {
                        at.push(Instant::now());
                    }
                    at
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("stream"))
            .collect()
    });
    let start = times.iter().filter_map(|t| t.first()).max().copied();
    let end = times.iter().filter_map(|t| t.last()).max().copied();
    match (start, end) {
        (Some(start), Some(end)) if end > start => {
            let counted = times.iter().flatten().filter(|&&t| t > start).count();
            counted as f64 / (end - start).as_secs_f64()
        }
        _ => f64::NAN,
    }
}

/// One mode, in this process: prints a JSON line like the reference scripts'.
fn measure(dir: &Path, mode: &str) {
    let (model, load_s) = common::load_timed::<Glm4MoeLite>(dir, mode);
    let loaded = common::rss();
    let sparse_layer = model.layer_weight_bytes().last().copied().unwrap_or(0);
    let kv_per_token = model
        .kv_layout()
        .bytes_per_token(pio_engine::kv_pool::CacheType::Float(DType::BF16));
    let (prefill_tps, decode_tps) = prefill_then_decode(&model, &tokens(PROMPT, 13));
    let steady = common::rss();
    let (_, deep_decode_tps) = prefill_then_decode(&model, &tokens(DEPTH, 29));
    let weight_bytes = model.weight_bytes();
    let streams_decode_tps = streams(model, dir);
    println!(
        "{{\"dtype\": \"{mode}\", \"load_s\": {load_s}, \"prefill_tps\": {prefill_tps}, \"decode_tps\": {decode_tps}, \"deep_decode_tps\": {deep_decode_tps}, \"streams_decode_tps\": {streams_decode_tps}, \"peak_rss\": {}, \"loaded_rss\": {loaded}, \"steady_rss\": {steady}, \"layer_bytes\": {sparse_layer}, \"weight_bytes\": {weight_bytes}, \"kv_bytes_per_token\": {kv_per_token}}}",
        common::peak_rss(),
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
    common::ensure_checkpoint(&root(), &dir, &["glm-4.7-flash", &depth]);
    let mut rows = common::measure_modes(&["bf16", "q8", "q4"], THREADS);
    let ours = rows.clone();
    let mut work = common::Workload {
        prompt: PROMPT,
        decode: DECODE,
        threads: THREADS,
        dtypes: "bf16",
        depth: DEPTH,
        streams: STREAMS,
    };
    let theirs = common::transformers(&root(), &dir, &work);
    rows.extend(theirs.iter().map(|l| ("transformers", l.clone())));
    let llama = match common::llama_bench(&root()) {
        Some(bench) => {
            work.dtypes = "bf16,q8_0,q4_k_m";
            common::llama_cpp(&root(), &bench, &dir, &work)
        }
        None => {
            eprintln!(
                "llama.cpp not built (tests/bench/build_llama_cpp.sh): its rows are left out"
            );
            Vec::new()
        }
    };
    rows.extend(llama.iter().map(|l| ("llama.cpp", l.clone())));
    report(&rows, &ours, &theirs, &llama);
}

/// The table, the same-run ratios and the extrapolations.
fn report(rows: &[(&str, String)], ours: &[(&str, String)], theirs: &[String], llama: &[String]) {
    let n = common::bench_layers() as f64;
    let f = |line: &str, k: &str| common::field(line, k);
    println!(
        "GLM-4.7-Flash widths, {} of {FULL_DEPTH} layers, prompt {PROMPT} tokens, {DECODE} decode steps (also after {DEPTH} tokens, and {STREAMS} streams at once), {THREADS} threads",
        common::bench_layers()
    );
    println!("| engine | mode | load (s) | prefill tok/s | decode tok/s | decode at {DEPTH} tok/s | {STREAMS} streams tok/s | peak RSS (GiB) | steady RSS (GiB) | per sparse layer (GiB) | {FULL_DEPTH} layers, extrapolated (GiB) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let bf16_layer = ours.first().map_or(f64::NAN, |(_, l)| f(l, "layer_bytes"));
    for (engine, line) in rows {
        let layer = if *engine == "pio" {
            f(line, "layer_bytes")
        } else {
            bf16_layer
        };
        let full = f(line, "steady_rss") + (FULL_DEPTH as f64 - n) * layer;
        println!(
            "| {engine} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} | {:.1} |",
            line.split('"').nth(3).unwrap_or("?"),
            f(line, "load_s"),
            f(line, "prefill_tps"),
            f(line, "decode_tps"),
            f(line, "deep_decode_tps"),
            f(line, "streams_decode_tps"),
            common::gib(f(line, "peak_rss")),
            common::gib(f(line, "steady_rss")),
            common::gib(layer),
            common::gib(full),
        );
    }
    let keys = [
        "prefill_tps",
        "decode_tps",
        "deep_decode_tps",
        "streams_decode_tps",
    ];
    let ratio = |name: &str, a: &str, b: &str| {
        let cells: Vec<String> = keys
            .iter()
            .map(|k| format!("{:.2}x", f(a, k) / f(b, k)))
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    };
    println!("\n| same-run ratio | prefill | decode | decode at {DEPTH} | {STREAMS} streams |");
    println!("|---|---|---|---|---|");
    if let (Some((_, bf16)), Some(hf)) = (ours.first(), theirs.first()) {
        ratio("pio bf16 / transformers bf16", bf16, hf);
    }
    for ((_, mine), other) in ours.iter().zip(llama) {
        let name = format!(
            "pio {} / llama.cpp {}",
            mine.split('"').nth(3).unwrap_or("?"),
            other.split('"').nth(3).unwrap_or("?")
        );
        ratio(&name, mine, other);
    }
    // What the latent cache saves, at the full model's 47 layers.
    let latent = FULL_DEPTH * (512 + 64) * 2;
    let full_kv = FULL_DEPTH * 20 * (256 + 256) * 2;
    if let Some((_, q4)) = ours.last() {
        let weights = f(q4, "steady_rss") + (FULL_DEPTH as f64 - n) * f(q4, "layer_bytes");
        let room = 24.0 * (1u64 << 30) as f64 - weights;
        println!(
            "\nKV cache per token (bf16, {FULL_DEPTH} layers): PIO's latent {latent} B, full K/V {full_kv} B ({:.1}x); beside the q4 model ({:.1} GiB), 24 GiB holds {:.0} tokens of latent cache ({:.0} of full K/V)",
            full_kv as f64 / latent as f64,
            common::gib(weights),
            room / latent as f64,
            room / full_kv as f64,
        );
    }
}
