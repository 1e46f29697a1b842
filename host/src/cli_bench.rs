//! `pio bench`: drives one plugin through its confined worker, as the daemon does, with a
//! synthetic workload — prompt length, output length, concurrency, shared-prefix fraction — and
//! prints throughput, time to first token and inter-token latency percentiles.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use pio_host::supervisor::{Event, Worker};
use pio_plugin_api::wire::{InferRequest, Prompt};

use crate::cli_print::LoadProgress;
use crate::cli_run::{prepare, Prepared, TierArgs};
use crate::SearchArgs;

/// Arguments of `pio bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// The plugin to measure, by name.
    name: String,
    #[command(flatten)]
    search: SearchArgs,
    /// Use this model folder instead of the manifest's `[model] path`.
    #[arg(long, value_name = "DIR")]
    model_path: Option<PathBuf>,
    /// Words per prompt (each a common English word; the plugin's tokenizer decides the token
    /// count, which is reported).
    #[arg(long, default_value_t = 512)]
    prompt_words: usize,
    /// Tokens generated per request (greedy, no early stop).
    #[arg(long, default_value_t = 128)]
    output_tokens: u32,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Requests in all (default: the concurrency).
    #[arg(long)]
    requests: Option<usize>,
    /// The fraction of each prompt that is the same in every request (a shared system prompt).
    #[arg(long, default_value_t = 0.0)]
    shared_prefix: f64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tiers: TierArgs,
}

/// Words that are one token each in the common BPE vocabularies.
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has", "there",
    "been", "if", "more", "when", "will", "would", "who", "so", "no",
];

/// Request `index`'s prompt: the shared words, then words in an order of its own.
fn prompt(index: usize, words: usize, shared: usize) -> String {
    let mut state = (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..words)
        .map(|i| {
            if i < shared {
                WORDS[(i * 7) % WORDS.len()]
            } else {
                // xorshift: a different sequence per request, so nothing past the prefix is shared.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                WORDS[(state % WORDS.len() as u64) as usize]
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What one request measured.
#[derive(Debug, Default)]
struct Timing {
    ttft: Duration,
    gaps: Vec<Duration>,
    prompt_tokens: u32,
    cached_tokens: u32,
    completion_tokens: u32,
}

/// The `p`-th percentile of `sorted`, in milliseconds.
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p / 100.0).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

async fn one(worker: &Worker, request: InferRequest) -> anyhow::Result<Timing> {
    let started = Instant::now();
    let (_, mut events) = worker.infer(request)?;
    let mut timing = Timing::default();
    let mut last = None;
    loop {
        match events.recv().await {
            Some(Event::Token(_)) => {
                let now = Instant::now();
                match last {
                    None => timing.ttft = now - started,
                    Some(t) => timing.gaps.push(now - t),
                }
                last = Some(now);
            }
            Some(Event::Done(outcome)) => {
                timing.prompt_tokens = outcome.usage.prompt_tokens;
                timing.cached_tokens = outcome.usage.cached_tokens;
                timing.completion_tokens = outcome.usage.completion_tokens;
                return Ok(timing);
            }
            Some(Event::Failed(e)) => bail!("a request failed: {}", e.message),
            None => bail!("the worker went away: {}", worker.exited().await),
        }
    }
}

fn request(text: String, max_tokens: u32) -> InferRequest {
    InferRequest {
        prompt: Prompt::Text(text),
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        // Every request generates exactly `max_tokens`: no stop string, no penalty.
        repetition_penalty: Some(1.0),
        ..InferRequest::default()
    }
}

/// Runs `pio bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<u8> {
    if args.concurrency == 0 || !(0.0..=1.0).contains(&args.shared_prefix) {
        bail!("--concurrency must be at least 1 and --shared-prefix between 0 and 1");
    }
    let Prepared { config, spec, .. } = prepare(
        &args.name,
        &args.search,
        &args.tiers,
        args.model_path.as_ref(),
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let progress = LoadProgress::new(&spec.name);
        let worker = Worker::start(spec).await?;
        let loaded = worker
            .load(config, |stage, done, total| {
                progress.update(stage, done, total)
            })
            .await;
        progress.finish();
        loaded?;
        // Warm-up: thread pools and buffers, with a prompt that shares nothing.
        one(&worker, request("Hello".into(), 2)).await?;
        let total = args.requests.unwrap_or(args.concurrency);
        let shared = (args.prompt_words as f64 * args.shared_prefix).round() as usize;
        let started = Instant::now();
        let mut timings = Vec::with_capacity(total);
        let mut next = 0;
        let mut running = tokio::task::JoinSet::new();
        let worker = std::sync::Arc::new(worker);
        while timings.len() < total {
            while running.len() < args.concurrency && next < total {
                let (w, text) = (worker.clone(), prompt(next, args.prompt_words, shared));
                let max = args.output_tokens;
                running.spawn(async move { one(&w, request(text, max)).await });
                next += 1;
            }
            match running.join_next().await {
                Some(t) => timings.push(t.context("a bench task panicked")??),
                None => break,
            }
        }
        let wall = started.elapsed();
        worker.shutdown().await;
        report(&args, &timings, wall);
        Ok(0)
    })
}

fn report(args: &BenchArgs, timings: &[Timing], wall: Duration) {
    let n = timings.len().max(1) as f64;
    let completion: u64 = timings.iter().map(|t| u64::from(t.completion_tokens)).sum();
    let prompt: u64 = timings.iter().map(|t| u64::from(t.prompt_tokens)).sum();
    let cached: u64 = timings.iter().map(|t| u64::from(t.cached_tokens)).sum();
    let mut ttft: Vec<Duration> = timings.iter().map(|t| t.ttft).collect();
    let mut itl: Vec<Duration> = timings
        .iter()
        .flat_map(|t| t.gaps.iter().copied())
        .collect();
    ttft.sort();
    itl.sort();
    let secs = wall.as_secs_f64();
    let figures = serde_json::json!({
        "plugin": args.name,
        "requests": timings.len(),
        "concurrency": args.concurrency,
        "prompt_tokens_mean": prompt as f64 / n,
        "cached_tokens_mean": cached as f64 / n,
        "output_tokens": completion,
        "wall_s": secs,
        "output_tokens_per_s": completion as f64 / secs,
        "total_tokens_per_s": (completion + prompt - cached) as f64 / secs,
        "ttft_ms": {"p50": percentile(&ttft, 50.0), "p90": percentile(&ttft, 90.0), "p99": percentile(&ttft, 99.0)},
        "itl_ms": {"p50": percentile(&itl, 50.0), "p90": percentile(&itl, 90.0), "p99": percentile(&itl, 99.0)},
    });
    if args.json {
        println!("{figures}");
        return;
    }
    println!(
        "{} requests, {} at once: {:.0} prompt tokens each ({:.0} from the prefix cache), {} output tokens in {:.2} s",
        timings.len(),
        args.concurrency,
        prompt as f64 / n,
        cached as f64 / n,
        completion,
        secs
    );
    println!(
        "output throughput  {:>9.2} tokens/s",
        completion as f64 / secs
    );
    println!(
        "total throughput   {:>9.2} tokens/s (prompt tokens computed + output)",
        (completion + prompt - cached) as f64 / secs
    );
    println!("                      p50       p90       p99");
    for (name, v) in [("TTFT ms", &ttft), ("ITL ms", &itl)] {
        println!(
            "{name:<16} {:>9.1} {:>9.1} {:>9.1}",
            percentile(v, 50.0),
            percentile(v, 90.0),
            percentile(v, 99.0)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_share_exactly_the_asked_prefix() {
        let (a, b) = (prompt(0, 100, 40), prompt(1, 100, 40));
        let (wa, wb): (Vec<&str>, Vec<&str>) = (a.split(' ').collect(), b.split(' ').collect());
        assert_eq!((wa.len(), wb.len()), (100, 100));
        assert_eq!(wa[..40], wb[..40]);
        assert_ne!(
            wa[40..],
            wb[40..],
            "past the prefix, each prompt is its own"
        );
        assert_eq!(prompt(3, 10, 0), prompt(3, 10, 0), "reproducible");
    }

    #[test]
    fn percentiles_pick_from_the_sorted_figures() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), 51.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
