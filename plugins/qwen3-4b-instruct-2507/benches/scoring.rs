//! Prompt scoring against transformers, in one run on the same machine: what lm-eval's
//! loglikelihood tasks and vLLM's `prompt_logprobs` ask (every prompt token's logprob, rank and
//! top 5), on a Qwen3-0.6B-shaped random checkpoint (the one the `qwen3` bench generates), a
//! 512-token prompt, f32 and bf16, 2 threads. PIO's batched engine runs the prompt with one
//! output token, unscored and scored; transformers runs its forward pass keeping the last row's
//! logits, then keeping every row's and reducing them the same way. Prints tokens/s of each and
//! the ratios; the scored rate over the unscored one is what scoring costs each engine.
//!
//! Run: `cargo bench -p pio-plugin-qwen3 --bench scoring` (needs python3 with
//! `tests/fixtures/requirements.txt` installed). Each dtype runs in its own process; the bench
//! binary run by hand as `--measure MODE --profile` also prints where a prefill's time goes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use pio_engine::candle_core::{DType, Device};
use pio_engine::checkpoint::Checkpoint;
use pio_engine::generate::Request;
use pio_engine::profile::{Op, PROFILE};
use pio_engine::serving::{Engine, EngineConfig};
use pio_engine::text::TextCodec;
use pio_plugin_qwen3::model::Qwen3;

const PROMPT: usize = 512;
const TOP: usize = 5;
const THREADS: usize = 2;
/// Runs of each measurement; the fastest counts (the machine is noisy).
const ROUNDS: usize = 3;

#[path = "../../../tests/bench/common.rs"]
mod common;

fn root() -> PathBuf {
    common::repo_root(env!("CARGO_MANIFEST_DIR"))
}

fn checkpoint_dir() -> PathBuf {
    root().join("target/bench/qwen3-0.6b-random")
}

/// Prompt `index`: pseudo-random ids of its own, so nothing comes from another's blocks.
fn prompt(index: u32) -> Vec<u32> {
    (0..PROMPT as u32)
        .map(|i| (i * 7919 + 13 + index * 104_729) % 151_936)
        .collect()
}

/// Seconds of the fastest of [`ROUNDS`] one-token runs of a fresh prompt, scored with `top`
/// alternatives or not.
fn fastest(engine: &Engine, scored: bool, first: u32) -> f64 {
    (0..ROUNDS as u32)
        .map(|round| {
            let request = Request {
                prompt: prompt(first + round),
                max_tokens: 1,
                prompt_logprobs: scored.then_some(TOP),
                ..Request::default()
            };
            let t = Instant::now();
            let outcome = engine.generate(request, &mut |_| true).expect("generate");
            let seconds = t.elapsed().as_secs_f64();
            let scores = outcome.prompt_logprobs.map_or(0, |s| s.len());
            assert_eq!(scores, if scored { PROMPT - 1 } else { 0 }, "scores");
            seconds
        })
        .fold(f64::MAX, f64::min)
}

/// One dtype, in this process: prints a JSON line like the reference script's; with `profiled`,
/// where an unscored prefill's time goes (stderr).
fn measure(mode: &str, profiled: bool) {
    if profiled {
        PROFILE.enable();
    }
    let dir = checkpoint_dir();
    let model = if mode == "f32" {
        let checkpoint = Checkpoint::open(&dir).expect("checkpoint");
        Qwen3::load(&checkpoint, DType::F32, &Device::Cpu, &mut |_, _| {}).expect("load")
    } else {
        common::load_timed::<Qwen3>(&dir, mode).0
    };
    // The random checkpoint has no tokenizer; ids only name rows here, and the engine needs one
    // to start (the tiny fixture's, as the GLM bench checkpoint borrows its fixture's).
    let fixture = root().join("tests/fixtures/qwen3-tiny");
    let codec = TextCodec::load(&Checkpoint::open(&fixture).expect("fixture")).expect("tokenizer");
    let config = EngineConfig {
        prefix_cache: false,
        ..EngineConfig::default()
    };
    let engine = Engine::start(Arc::new(model), Arc::new(codec), config).expect("engine");
    // A first run warms the pool and the kernels' buffers.
    fastest(&engine, false, 100);
    let before = PROFILE.snapshot();
    let plain = fastest(&engine, false, 0);
    if let (Some(from), Some(to)) = (before, PROFILE.snapshot()) {
        let ms = |key: &str| {
            let at = |m: &serde_json::Map<String, serde_json::Value>| {
                m.get(key)
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(0.0)
            };
            (at(&to) - at(&from)) / 1e3 / ROUNDS as f64
        };
        let parts: Vec<String> = (Op::ALL.iter())
            .map(|op| format!("{} {:.0}", op.key(), ms(op.key())))
            .collect();
        eprintln!(
            "profile, {mode} prefill of {PROMPT} tokens, ms per run: {}",
            parts.join(", ")
        );
    }
    let scored = fastest(&engine, true, 10);
    println!(
        "{{\"dtype\": \"{mode}\", \"prefill_tps\": {}, \"scoring_tps\": {}}}",
        PROMPT as f64 / plain,
        PROMPT as f64 / scored
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--measure") {
        measure(&args[i + 1], args.iter().any(|a| a == "--profile"));
        return;
    }
    let dir = checkpoint_dir();
    common::ensure_checkpoint(&root(), &dir, &["qwen3-0.6b"]);
    let reference = common::reference_script(
        &root(),
        "transformers_scoring.py",
        &[
            dir.display().to_string(),
            PROMPT.to_string(),
            THREADS.to_string(),
            "f32,bf16".into(),
            TOP.to_string(),
            ROUNDS.to_string(),
        ],
    );
    let modes = ["f32", "bf16"];
    let pio = common::measure_modes(&modes, THREADS);
    println!(
        "Qwen3-0.6B shape, prompt {PROMPT} tokens scored (logprob, rank, top {TOP}), {THREADS} threads, fastest of {ROUNDS}"
    );
    println!("| dtype | engine | prefill tok/s | scoring tok/s | scoring / prefill |");
    println!("|---|---|---|---|---|");
    for ((_, ours), mode) in pio.iter().zip(modes) {
        let theirs = reference
            .iter()
            .find(|l| l.contains(&format!("\"{mode}\"")));
        let mut rows = vec![("pio", ours)];
        rows.extend(theirs.map(|l| ("transformers", l)));
        for (name, line) in rows {
            let (prefill, scoring) = (
                common::field(line, "prefill_tps"),
                common::field(line, "scoring_tps"),
            );
            println!(
                "| {mode} | {name} | {prefill:.1} | {scoring:.1} | {:.2} |",
                scoring / prefill
            );
        }
        if let Some(t) = theirs {
            let ratio = |key: &str| common::field(ours, key) / common::field(t, key);
            println!(
                "| {mode} | pio / transformers | {:.2}x | {:.2}x | |",
                ratio("prefill_tps"),
                ratio("scoring_tps")
            );
        }
    }
}
