//! `pio bench`: drives one plugin through its confined worker, as the daemon does, with a
//! synthetic workload — prompt length, output length, concurrency, shared-prefix fraction — and
//! prints throughput, time to first token and inter-token latency percentiles.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use pio_host::supervisor::{Event, Worker};
use pio_plugin_api::wire::{InferRequest, Prompt};

mod constrained;
mod llama_cpp;
mod profile;
mod report;
mod single;
use crate::cli_run::{prepare, start_loaded, Prepared, TierArgs};
use crate::SearchArgs;

/// Arguments of `pio bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// The plugin to measure, by name.
    name: String,
    #[command(flatten)]
    search: SearchArgs,
    /// Use this model folder or GGUF file instead of the manifest's `[model] path`.
    #[arg(long, value_name = "DIR")]
    model_path: Option<PathBuf>,
    /// Words per prompt (each a common English word; the plugin's tokenizer decides the token
    /// count, which is reported).
    #[arg(long, default_value_t = 512)]
    prompt_words: usize,
    /// Tokens generated per request (greedy unless `--sampled`, no early stop).
    #[arg(long, default_value_t = 128)]
    output_tokens: u32,
    /// Sample with the model's generation defaults (its `generation_config.json`, the manifest's
    /// `[model.generation]`) instead of decoding greedily: what a client that sets nothing gets.
    #[arg(long, conflicts_with = "compare_llama_cpp")]
    sampled: bool,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Requests in all (default: the concurrency).
    #[arg(long)]
    requests: Option<usize>,
    /// The fraction of each prompt that is the same in every request (a shared system prompt).
    #[arg(long, default_value_t = 0.0)]
    shared_prefix: f64,
    /// Also run llama.cpp's llama-batched-bench on this GGUF file (the same checkpoint, same
    /// precision) with the same prompt and output lengths and parallel sequences, and print
    /// the ratios.
    #[arg(long, value_name = "GGUF")]
    compare_llama_cpp: Option<PathBuf>,
    /// The llama-batched-bench binary (default: on the PATH).
    #[arg(long, value_name = "FILE")]
    llama_batched_bench: Option<PathBuf>,
    /// Threads for llama.cpp (default: RAYON_NUM_THREADS, else the CPUs available), to match the
    /// plugin's.
    #[arg(long)]
    llama_threads: Option<usize>,
    /// Run the workload a second time with every request's output constrained to a JSON
    /// Schema (a long array of records, so no request ends early), and print what a
    /// constrained step costs over a free one.
    #[arg(long)]
    constrained: bool,
    /// The JSON Schema for `--constrained` (default: the built-in array of records). It must
    /// not let the output end before `--output-tokens`, or the figures compare less work.
    #[arg(long, value_name = "FILE", requires = "constrained")]
    json_schema: Option<PathBuf>,
    /// Also print where the engine's time goes: linear layers, attention, the output head and
    /// the rest, per token (the model's `[model.options] profile`, set for this run).
    #[arg(long)]
    profile: bool,
    /// Measure one request at a time instead: prefill of the prompt, decode from an empty cache
    /// and decode after the prompt, beside the machine's memory bandwidth and the decode limit
    /// it sets (with `--compare-llama-cpp`: llama.cpp's single sequence on the same file).
    #[arg(long, conflicts_with_all = ["constrained", "concurrency", "requests", "shared_prefix"])]
    single_stream: bool,
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
    /// When each token arrived.
    arrivals: Vec<Instant>,
    ttft: Duration,
    gaps: Vec<Duration>,
    prompt_tokens: u32,
    cached_tokens: u32,
    completion_tokens: u32,
    /// The engine's figures as the request ended.
    engine: Option<pio_plugin_api::wire::EngineStats>,
    /// The engine's time per operation as the request ended (with `--profile`).
    profile: Option<serde_json::Value>,
}

/// Tokens per second while every request was decoding: from the moment the last one had its
/// first token to the moment the first one had its last (what llama-batched-bench's S_TG
/// measures: the prompts are all in, no sequence has finished).
fn steady_decode(timings: &[Timing]) -> Option<f64> {
    let start = timings.iter().filter_map(|t| t.arrivals.first()).max()?;
    let end = timings.iter().filter_map(|t| t.arrivals.last()).min()?;
    let secs = end.checked_duration_since(*start)?.as_secs_f64();
    let tokens = timings
        .iter()
        .map(|t| t.arrivals.iter().filter(|&a| a > start && a <= end).count())
        .sum::<usize>();
    (secs > 0.0 && tokens > 0).then(|| tokens as f64 / secs)
}

/// The KV cache as the last request left it: the most blocks held at once, the pool, bytes.
fn kv_use(timings: &[Timing]) -> serde_json::Value {
    let Some(e) = timings
        .iter()
        .filter_map(|t| t.engine)
        .max_by_key(|e| e.steps)
    else {
        return serde_json::Value::Null;
    };
    let block_bytes = e.kv_block_size * e.kv_bytes_per_token;
    serde_json::json!({
        "blocks_peak": e.kv_blocks_peak,
        "blocks_total": e.kv_blocks_used + e.kv_blocks_free,
        "block_size": e.kv_block_size,
        "bytes_per_token": e.kv_bytes_per_token,
        "peak_bytes": e.kv_blocks_peak * block_bytes,
        "preemptions": e.preemptions,
        "mean_batch": e.batched_seqs as f64 / e.steps.max(1) as f64,
    })
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
                timing.arrivals.push(now);
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
                timing.engine = outcome.engine;
                timing.profile = outcome.timings.get("profile").cloned();
                return Ok(timing);
            }
            Some(Event::Failed(e)) if e.kind == pio_host::fault::Fault::ContextLength => bail!(
                "a request failed: {}; a smaller --prompt-words (or --output-tokens) fits",
                e.message
            ),
            Some(Event::Failed(e)) => bail!("a request failed: {}", e.message),
            None => bail!("the worker went away: {}", worker.exited().await),
        }
    }
}

/// A bench request: greedy, or (`sampled`) with the model's own sampling defaults.
fn request(text: String, max_tokens: u32, sampled: bool) -> InferRequest {
    InferRequest {
        prompt: Prompt::Text(text),
        max_tokens: Some(max_tokens),
        temperature: (!sampled).then_some(0.0),
        // Every request generates exactly `max_tokens`: no stop string, the end of sequence
        // ignored (as vLLM's benchmarks do; a real model's answer would end early otherwise,
        // a plugin built before plugin-api 1.6 still ends there); no penalty unless the model's
        // defaults (sampled) have one.
        repetition_penalty: (!sampled).then_some(1.0),
        ignore_eos: true,
        ..InferRequest::default()
    }
}

/// Refuses flags that measure nothing, naming the flag; holds the concurrency to the requests,
/// so the report says how many really ran at once.
fn check(args: &mut BenchArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.shared_prefix) {
        bail!(
            "--shared-prefix must be between 0 and 1 (a fraction of the prompt), found {}",
            args.shared_prefix
        );
    }
    for (flag, value) in [
        ("--requests", args.requests.unwrap_or(1)),
        ("--output-tokens", args.output_tokens as usize),
        ("--prompt-words", args.prompt_words),
    ] {
        if value == 0 {
            bail!("{flag} must be at least 1: there would be nothing to measure");
        }
    }
    if let Some(requests) = args.requests {
        args.concurrency = args.concurrency.min(requests);
    }
    Ok(())
}

/// Runs `pio bench`.
pub fn run(mut args: BenchArgs) -> anyhow::Result<u8> {
    check(&mut args)?;
    let Prepared {
        mut config,
        spec,
        capabilities,
        ..
    } = prepare(
        &args.name,
        &args.search,
        &args.tiers,
        args.model_path.as_ref(),
    )?;
    if args.profile {
        profile::enable(&mut config);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let constraint = match (args.constrained, &args.json_schema) {
        (false, _) => None,
        (true, path) => Some(constrained::constraint(path.as_deref())?),
    };
    if constraint.is_some()
        && !capabilities.contains(pio_plugin_api::Capabilities::STRUCTURED_OUTPUT)
    {
        bail!(
            "--constrained needs constrained output, which {} does not declare (capability structured_output)",
            args.name
        );
    }
    runtime.block_on(async move {
        // Ctrl-C from the start stops the worker (its cgroup goes with it) instead of leaving
        // both: during the load, then through the runs.
        let mut signals = crate::cli_run::StopSignals::new()?;
        let (worker, info) = start_loaded(spec, config, &mut signals).await?;
        let worker = std::sync::Arc::new(worker);
        let result = tokio::select! {
            r = measure(&worker, &info, &args, constraint) => r,
            by = signals.recv() => Err(crate::cli_run::Halted::new(by, format!("{by}: the run was abandoned and the worker stopped")).into()),
        };
        worker.shutdown().await;
        // llama.cpp's turn comes with the worker gone: not two models in memory at once.
        match result? {
            Measured::Single(measured) => single::report(&args, measured, &info),
            Measured::Workload(figures, timings) => {
                let llama = match &args.compare_llama_cpp {
                    Some(gguf) => Some(compare(&args, gguf, &timings)?),
                    None => None,
                };
                report::print(&args, figures, llama.as_deref())?;
                Ok(0)
            }
        }
    })
}

/// What the measured runs gave.
enum Measured {
    /// The single-stream figures, and the engine's profile of them.
    Single((single::Figures, Option<serde_json::Value>)),
    /// The workload's figures and its requests' timings, to print beside llama.cpp's.
    Workload(serde_json::Value, Vec<Timing>),
}

/// How many `timings` generated fewer than `asked` tokens (with `ignore_eos`, only the context
/// ends one early), and the fewest any did.
fn shortfall(asked: u32, timings: &[Timing]) -> Option<(usize, u32)> {
    let short = (timings.iter())
        .map(|t| t.completion_tokens)
        .filter(|&n| n < asked);
    Some((short.clone().count(), short.min()?))
}

/// The warm-up and the measured runs on a loaded `worker`.
async fn measure(
    worker: &std::sync::Arc<Worker>,
    info: &pio_plugin_api::wire::ModelInfo,
    args: &BenchArgs,
    constraint: Option<pio_plugin_api::wire::Constraint>,
) -> anyhow::Result<Measured> {
    {
        // Warm-up: thread pools and buffers, with a prompt that shares nothing.
        one(worker, request("Hello".into(), 2, false)).await?;
        if args.single_stream {
            // Reported once the worker is gone: the streaming read and llama.cpp then run with
            // the machine to themselves, as the workload's comparison does.
            return single::run(worker, args).await.map(Measured::Single);
        }
        let (timings, wall) = workload(worker, args, None, 0).await?;
        if let Some((short, least)) = shortfall(args.output_tokens, &timings) {
            let context = info.context_length.map_or("its".into(), |c| c.to_string());
            eprintln!(
                "warning: {short} of {} requests stopped before --output-tokens {} (the shortest at {least}): prompt and output pass the model's context of {context} tokens; lower --prompt-words or --output-tokens to measure what was asked",
                timings.len(),
                args.output_tokens
            );
        }
        let mut figures = figures(args, &timings, wall);
        if let Some(c) = constraint {
            // Free, constrained, free again: the overheads compare against both free runs'
            // mean, so a machine that drifts during the run does not pass for a cost. Each run
            // has prompts of its own: the same ones again were the prefix cache's, prefill
            // skipped in the later runs and not the first.
            let total = args.requests.unwrap_or(args.concurrency);
            let (timings, wall) = workload(worker, args, Some(c), total).await?;
            let constrained_figures = self::figures(args, &timings, wall);
            let (timings, wall) = workload(worker, args, None, 2 * total).await?;
            let again = self::figures(args, &timings, wall);
            constrained::add(&mut figures, constrained_figures, &again);
        }
        Ok(Measured::Workload(figures, timings))
    }
}

/// Runs the workload (every request's output held to `constraint`, if given) with the prompts
/// numbered from `first`; the requests' timings and the wall time.
async fn workload(
    worker: &std::sync::Arc<Worker>,
    args: &BenchArgs,
    constraint: Option<pio_plugin_api::wire::Constraint>,
    first: usize,
) -> anyhow::Result<(Vec<Timing>, Duration)> {
    let total = args.requests.unwrap_or(args.concurrency);
    let shared = (args.prompt_words as f64 * args.shared_prefix).round() as usize;
    let started = Instant::now();
    let mut timings = Vec::with_capacity(total);
    let mut next = 0;
    let mut running = tokio::task::JoinSet::new();
    while timings.len() < total {
        while running.len() < args.concurrency && next < total {
            let text = prompt(first + next, args.prompt_words, shared);
            let w = worker.clone();
            let mut r = request(text, args.output_tokens, args.sampled);
            r.constraint = constraint.clone();
            running.spawn(async move { one(&w, r).await });
            next += 1;
        }
        match running.join_next().await {
            Some(t) => timings.push(t.context("a bench task panicked")??),
            None => break,
        }
    }
    Ok((timings, started.elapsed()))
}

/// llama.cpp's rows for the same workload.
fn compare(
    args: &BenchArgs,
    gguf: &std::path::Path,
    timings: &[Timing],
) -> anyhow::Result<Vec<llama_cpp::Row>> {
    let n = timings.len().max(1) as f64;
    let prompt = timings
        .iter()
        .map(|t| f64::from(t.prompt_tokens))
        .sum::<f64>()
        / n;
    let threads = threads(args);
    let workload = llama_cpp::Workload {
        prompt: prompt.round() as u32,
        output: args.output_tokens,
        parallel: args.concurrency,
        threads,
    };
    llama_cpp::run(
        &llama_cpp::binary(args.llama_batched_bench.as_ref()),
        gguf,
        workload,
    )
}

/// Threads for llama.cpp and the streaming read: `--llama-threads`, else RAYON_NUM_THREADS (the
/// plugin's), else the CPUs available.
fn threads(args: &BenchArgs) -> usize {
    args.llama_threads.unwrap_or_else(|| {
        std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    })
}

/// The run's figures, as `--json` prints them.
fn figures(args: &BenchArgs, timings: &[Timing], wall: Duration) -> serde_json::Value {
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
    let p = |v: &[Duration]| serde_json::json!({"p50": percentile(v, 50.0), "p90": percentile(v, 90.0), "p99": percentile(v, 99.0)});
    serde_json::json!({
        "plugin": args.name,
        "requests": timings.len(),
        "concurrency": args.concurrency,
        "sampled": args.sampled,
        "prompt_tokens_mean": prompt as f64 / n,
        "cached_tokens_mean": cached as f64 / n,
        "output_tokens": completion,
        "wall_s": secs,
        "output_tokens_per_s": completion as f64 / secs,
        "total_tokens_per_s": (completion + prompt - cached) as f64 / secs,
        "decode_tokens_per_s": steady_decode(timings),
        "kv_cache": kv_use(timings),
        // The engine's counters as the last request left them (they count from its start).
        "engine": timings.iter().filter_map(|t| t.engine).max_by_key(|e| e.steps),
        "ttft_ms": p(&ttft),
        "itl_ms": p(&itl),
        "profile": profile::latest(timings.iter().filter_map(|t| t.profile.as_ref())),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(flags: &[&str]) -> BenchArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let argv = [&["pio", "echo", "--plugins", "."][..], flags].concat();
        <Cli as clap::Parser>::try_parse_from(argv).unwrap().bench
    }

    #[test]
    fn flags_that_measure_nothing_are_named_and_concurrency_is_held_to_the_requests() {
        for (flags, says) in [
            (
                &["--concurrency", "0"][..],
                "--concurrency must be at least 1",
            ),
            (
                &["--shared-prefix", "1.5"],
                "--shared-prefix must be between 0 and 1",
            ),
            (&["--requests", "0"], "--requests must be at least 1"),
            (
                &["--prompt-words", "0"],
                "--prompt-words must be at least 1",
            ),
            (
                &["--output-tokens", "0"],
                "--output-tokens must be at least 1",
            ),
        ] {
            let e = check(&mut args(flags)).unwrap_err().to_string();
            assert!(e.contains(says), "{flags:?}: {e}");
        }
        let mut a = args(&["--concurrency", "4", "--requests", "2"]);
        check(&mut a).unwrap();
        assert_eq!(a.concurrency, 2, "2 requests never run 4 at once");
        let mut a = args(&["--concurrency", "4"]);
        check(&mut a).unwrap();
        assert_eq!(a.concurrency, 4);
    }

    #[test]
    fn requests_cut_short_by_the_context_are_counted() {
        let timing = |n| Timing {
            completion_tokens: n,
            ..Timing::default()
        };
        assert_eq!(shortfall(8, &[timing(8), timing(8)]), None);
        assert_eq!(
            shortfall(8, &[timing(8), timing(5), timing(3)]),
            Some((2, 3))
        );
    }

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
    fn steady_decode_counts_only_while_every_request_decodes() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let timing = |arrivals: Vec<Instant>| Timing {
            arrivals,
            ..Timing::default()
        };
        // One starts at 0 ms, the other at 100; both decode every 10 ms until 200 and 300.
        let a = timing((0..=20).map(|i| at(10 * i)).collect());
        let b = timing((10..=30).map(|i| at(10 * i)).collect());
        // From 100 to 200 ms: 10 tokens each after 100 ms, in 0.1 s.
        let rate = steady_decode(&[a, b]).expect("they decode together from 100 to 200 ms");
        assert!((rate - 200.0).abs() < 1e-6, "{rate}");
        // One after the other, they never decode together.
        let a = timing(vec![at(0), at(10)]);
        let b = timing(vec![at(20), at(30)]);
        assert_eq!(steady_decode(&[a, b]), None);
    }

    #[test]
    fn sampled_requests_leave_the_temperature_to_the_model() {
        let greedy = request("a".into(), 4, false);
        assert_eq!(greedy.temperature, Some(0.0));
        let sampled = request("a".into(), 4, true);
        assert_eq!(sampled.temperature, None);
        assert_eq!(sampled.top_p, None);
        assert_eq!(sampled.repetition_penalty, None);
        assert_eq!(greedy.repetition_penalty, Some(1.0));
    }

    #[test]
    fn percentiles_pick_from_the_sorted_figures() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), 51.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
