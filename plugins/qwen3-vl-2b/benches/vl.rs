//! Qwen3-VL-2B against transformers, in one run on the same machine: a checkpoint with the real
//! widths and depths (random bf16 weights, generated on first use, not committed) and two photos,
//! 448×448 and 1280×720. For each image: preprocessing (decode, resize, normalize, patches), the
//! vision tower alone, time to first token from the request (preprocessing, vision, prefill of the
//! image and text, one token) and greedy decode tokens/s after it; then load time and peak RSS.
//!
//! Run: `cargo bench -p pio-plugin-qwen3-vl --bench vl` (python3 with
//! `tests/fixtures/requirements.txt`; ~5 GB of disk and ~12 GB of memory). PIO runs in its own
//! process so its peak RSS is its own. llama.cpp is not compared yet: `tests/bench/build_llama_cpp.sh`
//! does not build its multimodal tool (`llama-mtmd-cli`), which also needs the vision tower
//! converted to a separate GGUF (`--mmproj`).
//!
//! `-- --tower N` runs only PIO's vision tower on the 1280×720 photo N times, printing each
//! time: a run to profile (`perf record`) with nothing else in it.
//!
//! `-- --load MODE` only loads the model (`bf16`, or `bf16+read` with no file mapped), printing
//! the time and memory: run each in turn to compare.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use pio_engine::chat::ChatTemplate;
use pio_engine::checkpoint::Checkpoint;
use pio_engine::generate::Request;
use pio_engine::images::{decode, DecodeLimits};
use pio_engine::models::qwen3_vl::Qwen3Vl;
use pio_engine::sampling::SamplingParams;
use pio_engine::serving::{Engine, EngineConfig, Event};
use pio_engine::text::TextCodec;

#[path = "../../../tests/bench/common.rs"]
mod common;

const DECODE: usize = 16;
const THREADS: usize = 2;
const IMAGES: [&str; 2] = ["bench-448x448.png", "bench-1280x720.png"];
const QUESTION: &str = "Describe this image.";

fn root() -> PathBuf {
    common::repo_root(env!("CARGO_MANIFEST_DIR"))
}

fn checkpoint_dir() -> PathBuf {
    root().join("target/bench/qwen3-vl-2b")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// One image through PIO: a JSON line like the reference script's.
fn measure_image(model: &Arc<Qwen3Vl>, engine: &Engine, dir: &Path, file: &str) -> String {
    let bytes = std::fs::read(dir.join(file)).expect("bench image");
    let limits = DecodeLimits::default();
    let preprocess = median(
        (0..3)
            .map(|_| {
                let t = Instant::now();
                let image = decode(&bytes, &limits).expect("decode");
                model.processor().patches(&image).expect("patches");
                ms(t)
            })
            .collect(),
    );
    let image = decode(&bytes, &limits).expect("decode");
    let (width, height) = (image.width, image.height);
    let patches = model.processor().patches(&image).expect("patches");
    let t = Instant::now();
    model.vision().encode(&patches).expect("vision");
    let vision = ms(t);
    // The whole request: render, decode, preprocess, encode, prefill, first token.
    let checkpoint = Checkpoint::open(dir).expect("checkpoint");
    let template = ChatTemplate::load(&checkpoint)
        .expect("template")
        .expect("a template");
    let codec = TextCodec::load(&checkpoint).expect("tokenizer");
    let messages = [serde_json::json!({"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": QUESTION}]})];
    let t = Instant::now();
    let text = template
        .render(&messages, None, true, &Default::default())
        .expect("render");
    let image = decode(&bytes, &limits).expect("decode");
    let (prompt, media) = model
        .prepare(codec.encode(&text).expect("encode"), &[image])
        .expect("prepare");
    let prompt_tokens = prompt.len();
    let request = Request {
        prompt,
        sampling: SamplingParams::default(),
        max_tokens: DECODE + 1,
        media: media.map(Arc::new),
        ..Request::default()
    };
    let stream = engine.submit(request).expect("submit");
    let mut at = Vec::new();
    while let Some(Event::Token(_)) = stream.next() {
        at.push(Instant::now());
    }
    let ttft = at
        .first()
        .map_or(f64::NAN, |&f| (f - t).as_secs_f64() * 1e3);
    let decode_tps = match (at.first(), at.last()) {
        (Some(&a), Some(&b)) if b > a => (at.len() - 1) as f64 / (b - a).as_secs_f64(),
        _ => f64::NAN,
    };
    let [_, gh, gw] = patches.grid;
    format!(
        "{{\"engine\": \"pio\", \"image\": \"{file}\", \"width\": {width}, \"height\": {height}, \"grid\": [1, {gh}, {gw}], \"image_tokens\": {}, \"prompt_tokens\": {prompt_tokens}, \"preprocess_ms\": {preprocess}, \"vision_ms\": {vision}, \"ttft_ms\": {ttft}, \"decode_tps\": {decode_tps}}}",
        patches.tokens(model.processor().merge_size),
    )
}

/// PIO in this process: one line per image, then load time and memory.
fn measure(dir: &Path, mode: &str) {
    let (model, load_s) = common::load_timed::<Qwen3Vl>(dir, mode);
    let model = Arc::new(model);
    let codec = TextCodec::load(&Checkpoint::open(dir).expect("checkpoint")).expect("tokenizer");
    let engine =
        Engine::start(model.clone(), Arc::new(codec), EngineConfig::default()).expect("engine");
    for file in IMAGES {
        println!("{}", measure_image(&model, &engine, dir, file));
    }
    println!(
        "{{\"engine\": \"pio\", \"load_s\": {load_s}, \"peak_rss\": {}, \"rss\": {}}}",
        common::peak_rss(),
        common::rss()
    );
}

/// The vision tower alone on the large photo, `times` times.
fn tower(dir: &Path, times: usize) {
    let (model, _) = common::load_timed::<Qwen3Vl>(dir, "bf16");
    let bytes = std::fs::read(dir.join(IMAGES[1])).expect("bench image");
    let image = decode(&bytes, &DecodeLimits::default()).expect("decode");
    let patches = model.processor().patches(&image).expect("patches");
    for _ in 0..times {
        let t = Instant::now();
        model.vision().encode(&patches).expect("vision");
        println!("vision tower, {}: {:.0} ms", IMAGES[1], ms(t));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = checkpoint_dir();
    if let Some(at) = args.iter().position(|a| a == "--measure") {
        measure(&dir, args.get(at + 1).map_or("bf16", String::as_str));
        return;
    }
    if let Some(at) = args.iter().position(|a| a == "--load") {
        common::ensure_checkpoint(&root(), &dir, &["qwen3-vl-2b"]);
        common::print_load::<Qwen3Vl>(&dir, args.get(at + 1).map_or("bf16", String::as_str));
        return;
    }
    if let Some(at) = args.iter().position(|a| a == "--tower") {
        let times = args.get(at + 1).and_then(|n| n.parse().ok()).unwrap_or(1);
        common::ensure_checkpoint(&root(), &dir, &["qwen3-vl-2b"]);
        tower(&dir, times);
        return;
    }
    common::ensure_checkpoint(&root(), &dir, &["qwen3-vl-2b"]);
    let ours: Vec<String> = common::measure_modes(&["bf16"], THREADS)
        .into_iter()
        .flat_map(|(_, out)| out.lines().map(str::to_string).collect::<Vec<_>>())
        .collect();
    let mut script = Command::new("python3");
    script
        .arg(root().join("tests/bench/transformers_vl_bench.py"))
        .arg(&dir)
        .arg(THREADS.to_string())
        .arg(DECODE.to_string())
        .args(IMAGES.iter().map(|f| dir.join(f)));
    let out = script.output().expect("run transformers_vl_bench.py");
    if !out.status.success() {
        eprintln!(
            "transformers failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let theirs: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    report(&ours, &theirs);
}

fn report(ours: &[String], theirs: &[String]) {
    let f = |line: &str, k: &str| common::field(line, k);
    let per_image = |lines: &[String], file: &str| {
        lines
            .iter()
            .find(|l| l.contains(&format!("\"{file}\"")))
            .cloned()
            .unwrap_or_default()
    };
    let totals = |lines: &[String]| {
        lines
            .iter()
            .find(|l| l.contains("load_s"))
            .cloned()
            .unwrap_or_default()
    };
    println!("Qwen3-VL-2B shape (28 text layers, 24 vision blocks), bf16, {THREADS} threads, {DECODE} decode steps, prompt: the image and \"{QUESTION}\"");
    println!("| engine | image | image tokens | preprocess (ms) | vision tower (ms) | time to first token (ms) | decode tok/s |");
    println!("|---|---|---|---|---|---|---|");
    for file in IMAGES {
        for (engine, lines) in [("pio", ours), ("transformers", theirs)] {
            let l = per_image(lines, file);
            println!(
                "| {engine} | {file} | {} | {:.1} | {:.0} | {:.0} | {:.2} |",
                f(&l, "image_tokens"),
                f(&l, "preprocess_ms"),
                f(&l, "vision_ms"),
                f(&l, "ttft_ms"),
                f(&l, "decode_tps"),
            );
        }
    }
    println!("\n| same-run ratio (transformers time / pio time; decode pio / transformers) | preprocess | vision tower | time to first token | decode |");
    println!("|---|---|---|---|---|");
    for file in IMAGES {
        let (a, b) = (per_image(ours, file), per_image(theirs, file));
        println!(
            "| {file} | {:.2}x | {:.2}x | {:.2}x | {:.2}x |",
            f(&b, "preprocess_ms") / f(&a, "preprocess_ms"),
            f(&b, "vision_ms") / f(&a, "vision_ms"),
            f(&b, "ttft_ms") / f(&a, "ttft_ms"),
            f(&a, "decode_tps") / f(&b, "decode_tps"),
        );
    }
    println!("\n| engine | load (s) | peak RSS (GiB) | RSS after (GiB) |");
    println!("|---|---|---|---|");
    for (engine, lines) in [("pio", ours), ("transformers", theirs)] {
        let l = totals(lines);
        println!(
            "| {engine} | {:.1} | {:.2} | {:.2} |",
            f(&l, "load_s"),
            common::gib(f(&l, "peak_rss")),
            common::gib(f(&l, "rss")),
        );
    }
}
