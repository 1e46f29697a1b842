//! The engine on a GPU, in process (no worker, no sandbox): the device's memory bandwidth
//! (device-to-device copies of 2 GiB, read plus write) and the single-stream decode limit it sets
//! for a checkpoint (its weights read once per token), then that checkpoint served in bf16 —
//! one stream (512-token prompt, 128 tokens), 32 streams at once and 1 stream on the same
//! workload (128-token prompts, 128 tokens each) — with each rate against the limit; last, the
//! engine's kernels against candle's operations (`PIO_GPU_KERNELS=candle`) and against cuBLAS's
//! projections (`PIO_GPU_GEMV=cublas`), alternated in the same run.
//! `cargo bench -p pio-engine --features cuda --bench gpu -- [CHECKPOINT_DIR]` (tests/gpu/run.sh).

use std::sync::Arc;
use std::time::{Duration, Instant};

use pio_engine::candle_core::{DType, Device, Storage, Tensor};
use pio_engine::checkpoint::Checkpoint;
use pio_engine::generate::Request;
use pio_engine::linear::Quantization;
use pio_engine::models::qwen3::Qwen3;
use pio_engine::runtime::LoadModel;
use pio_engine::sampling::SamplingParams;
use pio_engine::serving::{Engine, EngineConfig, Event};
use pio_engine::text::TextCodec;

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let dir = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let device = match pio_engine::runtime::open_gpu(0) {
        Ok(d) => d,
        Err(e) => {
            println!("no CUDA device ({e}): nothing to measure");
            return Ok(());
        }
    };
    let gb_per_s = bandwidth(&device)?;
    println!("device memory bandwidth: {gb_per_s:.0} GB/s (copies, read + write)");
    let Some(dir) = dir else { return Ok(()) };
    let checkpoint = Checkpoint::open(std::path::Path::new(&dir))?;
    let start = Instant::now();
    let model = <Qwen3 as LoadModel>::load(
        &checkpoint,
        DType::BF16,
        Quantization::None,
        &device,
        &mut |_, _| {},
    )?;
    let step_gb = model.step_bytes() as f64 / 1e9;
    println!(
        "{dir}: loaded in bf16 in {:.1} s; a decode step reads {step_gb:.2} GB of weights: \
         single-stream limit {:.0} tokens/s",
        start.elapsed().as_secs_f64(),
        gb_per_s / step_gb
    );
    let limit = gb_per_s / step_gb;
    let codec = TextCodec::load(&checkpoint)?;
    let engine = Engine::start(Arc::new(model), Arc::new(codec), EngineConfig::default())?;
    // Warm-up: cuBLAS handles, the attention kernel's compilation, candle's kernels loaded.
    run(&engine, 1, 64, 16, 0)?;

    let one = run(&engine, 1, 512, 128, 1)?;
    println!(
        "single stream, 512-token prompt: prefill {:.0} tokens/s, decode {:.1} tokens/s = {:.0}% of the limit",
        one.prefill_rate,
        one.decode_rate,
        100.0 * one.decode_rate / limit
    );
    let base = run(&engine, 1, 128, 128, 2)?;
    let many = run(&engine, 32, 128, 128, 3)?;
    println!(
        "1 stream, 128-token prompt: {:.1} tokens/s overall, decode {:.1}",
        base.overall_rate, base.decode_rate
    );
    println!(
        "32 streams, 128-token prompts: {:.0} tokens/s overall = {:.1}x one stream; decode {:.0} tokens/s \
         ({} steps, {:.1} sequences per step)",
        many.overall_rate,
        many.overall_rate / base.overall_rate,
        many.decode_rate,
        engine.stats().steps,
        engine.stats().batched_seqs as f64 / engine.stats().steps.max(1) as f64
    );
    fused_against_separate(&engine)
}

/// Rates with candle's operations, with the engine's kernels but cuBLAS's projections, and with
/// every kernel, two rounds of each alternated (lent machines drift): one stream's decode and
/// 32 streams' decode and overall (their prompts included).
fn fused_against_separate(engine: &Engine) -> Result<(), Error> {
    use pio_engine::cuda::{gemv, KERNELS};
    let arms = [
        ("candle", false, false),
        ("kernels, cuBLAS", true, false),
        ("all kernels", true, true),
    ];
    // Per arm: [1 stream decode, 32 streams decode, 32 streams overall], averaged over rounds.
    let mut rates = [[0.0; 3]; 3];
    for round in 0..2 {
        for (arm, &(_, kernels, projections)) in arms.iter().enumerate() {
            KERNELS.set(kernels);
            gemv::GEMV.set(projections);
            let seed = 10 + 3 * round + arm as u32;
            let many = run(engine, 32, 128, 128, 100 + seed)?;
            rates[arm][0] += run(engine, 1, 128, 128, seed)?.decode_rate / 2.0;
            rates[arm][1] += many.decode_rate / 2.0;
            rates[arm][2] += many.overall_rate / 2.0;
        }
    }
    KERNELS.set(true);
    gemv::GEMV.set(true);
    println!(
        "the engine's GPU kernels against candle's operations (2 rounds alternated; tokens/s):"
    );
    let base = rates[0];
    for ((name, ..), r) in arms.iter().zip(rates) {
        println!(
            "  {name:>16}: 1 stream decode {:.1} ({:.2}x); 32 streams decode {:.0} ({:.2}x), overall {:.0} ({:.2}x)",
            r[0],
            r[0] / base[0],
            r[1],
            r[1] / base[1],
            r[2],
            r[2] / base[2]
        );
    }
    Ok(())
}

/// Rates of one round of `streams` requests submitted at once.
struct Rates {
    /// Prompt tokens over the time to the last stream's first token.
    prefill_rate: f64,
    /// Tokens after each stream's first over the time from the last first token to the end.
    decode_rate: f64,
    /// Every generated token over the whole round.
    overall_rate: f64,
}

fn run(
    engine: &Engine,
    streams: usize,
    prompt: usize,
    tokens: usize,
    round: u32,
) -> Result<Rates, Error> {
    let start = Instant::now();
    let handles = (0..streams)
        .map(|i| engine.submit(request(prompt, tokens, round * 1000 + i as u32)))
        .collect::<Result<Vec<_>, _>>()?;
    let times: Vec<(Duration, Duration, usize)> = std::thread::scope(|s| {
        let readers: Vec<_> = handles
            .into_iter()
            .map(|stream| {
                s.spawn(move || -> Result<_, String> {
                    let (mut first, mut n) = (None, 0);
                    loop {
                        match stream.next() {
                            Some(Event::Token(_)) => {
                                first.get_or_insert(start.elapsed());
                                n += 1;
                            }
                            Some(Event::Done(_)) => break,
                            Some(Event::Failed(e)) => return Err(e.to_string()),
                            None => return Err("the stream ended without a result".into()),
                        }
                    }
                    Ok((first.unwrap_or_default(), start.elapsed(), n))
                })
            })
            .collect();
        readers
            .into_iter()
            .map(|r| r.join().expect("reader"))
            .collect::<Vec<_>>()
    })
    .into_iter()
    .collect::<Result<_, String>>()?;
    let last_first = times.iter().map(|t| t.0).max().unwrap_or_default();
    let end = times.iter().map(|t| t.1).max().unwrap_or_default();
    let generated: usize = times.iter().map(|t| t.2).sum();
    if generated != streams * tokens {
        return Err(format!(
            "{generated} tokens generated, {} asked for",
            streams * tokens
        )
        .into());
    }
    Ok(Rates {
        prefill_rate: (streams * prompt) as f64 / last_first.as_secs_f64(),
        decode_rate: (generated - streams) as f64 / (end - last_first).as_secs_f64(),
        overall_rate: generated as f64 / end.as_secs_f64(),
    })
}

/// A greedy request for `tokens` tokens after `prompt` ids drawn from `seed` (distinct prompts:
/// no prefix-cache hits between streams); no end-of-sequence id, so every stream runs its length.
fn request(prompt: usize, tokens: usize, seed: u32) -> Request {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    let ids = (0..prompt)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            1000 + x % 100_000
        })
        .collect();
    Request {
        prompt: ids,
        sampling: SamplingParams::default(),
        max_tokens: tokens,
        stop: Vec::new(),
        include_stop: false,
        eos: Vec::new(),
        stop_ids: Vec::new(),
        min_tokens: 0,
        logprobs: None,
        prompt_logprobs: None,
        media: None,
        constraint: None,
    }
}

/// Device-to-device copy bandwidth (bytes read plus written), over ten copies of 2 GiB into one
/// buffer allocated beforehand (a fresh allocation per copy would be timed too).
fn bandwidth(device: &Device) -> Result<f64, Error> {
    let bytes = 2usize << 30;
    let cuda = device.as_cuda_device()?;
    // Random bits, not zeros: a copy of zeros could be served faster than real data.
    let src = Tensor::rand(0f32, 1.0, bytes / 4, device)?;
    let (storage, _) = src.storage_and_layout();
    let Storage::Cuda(storage) = &*storage else {
        return Err("the source tensor is not on the GPU".into());
    };
    let src = storage.as_cuda_slice::<f32>()?;
    let mut dst = cuda.alloc_zeros::<f32>(bytes / 4)?;
    cuda.memcpy_dtod(src, &mut dst)?;
    device.synchronize()?;
    let rounds = 10;
    let start = Instant::now();
    for _ in 0..rounds {
        cuda.memcpy_dtod(src, &mut dst)?;
    }
    device.synchronize()?;
    Ok((2 * bytes * rounds) as f64 / start.elapsed().as_secs_f64() / 1e9)
}
