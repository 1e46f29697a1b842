//! What confinement costs: the same plugin (echo, which does no work of its own, so every
//! microsecond measured is overhead) in-process and in a worker at each tier — worker start-up,
//! request latency and streamed tokens per second. Needs root, as the tiers do.
//!
//! Run: `cargo bench -p pio-host --bench tiers` (after `cargo build --workspace --release`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pio_host::sandbox::{self, HostSupport, Policy, ResolvedLimits, Subject, Tier};
use pio_host::supervisor::{Event, Worker, WorkerSpec};
use pio_plugin_api::sinks::{CollectSink, NoProgress};
use pio_plugin_api::wire::{InferRequest, Prompt};
use pio_plugin_api::PluginLibrary;

const TOKENS: usize = 2000;
const REQUESTS: usize = 30;
const STARTS: usize = 5;

fn target_dir() -> PathBuf {
    // target/release/deps/tiers-HASH → target/release
    let exe = std::env::current_exe().expect("bench executable");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf()
}

fn request() -> InferRequest {
    InferRequest {
        prompt: Prompt::Text("x".repeat(TOKENS)),
        ..InferRequest::default()
    }
}

struct Figures {
    start_ms: f64,
    latency_ms: f64,
    tokens_per_s: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn in_process(library: &Path) -> Figures {
    let started = Instant::now();
    let lib = PluginLibrary::load(library).expect("load echo in-process");
    let mut plugin = lib.instantiate().expect("construct echo");
    plugin
        .load_model("{}".into(), NoProgress::boxed())
        .into_result()
        .expect("load");
    let start_ms = started.elapsed().as_secs_f64() * 1e3;
    let json = serde_json::to_string(&request()).expect("request JSON");
    let mut latencies = Vec::new();
    for _ in 0..REQUESTS {
        let sink = CollectSink::new();
        let t = Instant::now();
        plugin
            .infer(json.as_str().into(), sink.boxed())
            .into_result()
            .expect("infer");
        latencies.push(t.elapsed().as_secs_f64());
        assert_eq!(sink.tokens().len(), TOKENS);
    }
    let latency = median(latencies);
    Figures {
        start_ms,
        latency_ms: latency * 1e3,
        tokens_per_s: TOKENS as f64 / latency,
    }
}

async fn in_worker(library: &Path, tier: Tier) -> Result<Figures, String> {
    let subject = Subject {
        plugin: "echo",
        tier,
        limits: ResolvedLimits {
            memory_bytes: Some(256 << 20),
            pids: Some(64),
            ..ResolvedLimits::default()
        },
        // The bench loads the library it just built; `maximum` only needs to know a pin exists.
        pinned: true,
        gpu: None,
        uid: Policy::default()
            .users
            .uid_for("echo")
            .map_err(|e| e.to_string())?,
    };
    let plan = sandbox::plan(subject, &Policy::default(), &HostSupport::detect())
        .map_err(|e| e.to_string())?;
    let spec = WorkerSpec {
        name: "echo".into(),
        library: library.to_path_buf(),
        plan,
        host_context: Default::default(),
        exe: PathBuf::from(env!("CARGO_BIN_EXE_pio")),
        read_paths: Vec::new(),
        write_paths: Vec::new(),
    };
    let mut starts = Vec::new();
    let mut worker = None;
    for _ in 0..STARTS {
        let t = Instant::now();
        let w = Worker::start(spec.clone())
            .await
            .map_err(|e| e.to_string())?;
        w.load(Default::default(), |_, _, _| {})
            .await
            .map_err(|e| e.to_string())?;
        starts.push(t.elapsed().as_secs_f64() * 1e3);
        if let Some(old) = worker.replace(w) {
            old.shutdown().await;
        }
    }
    let worker = worker.ok_or("no worker")?;
    let mut latencies = Vec::new();
    for _ in 0..REQUESTS {
        let t = Instant::now();
        let (_, mut events) = worker.infer(request()).map_err(|e| e.to_string())?;
        let mut tokens = 0;
        while let Some(event) = events.recv().await {
            match event {
                Event::Token(_) => tokens += 1,
                Event::Done(_) => break,
                Event::Failed(e) => return Err(e.to_string()),
            }
        }
        latencies.push(t.elapsed().as_secs_f64());
        assert_eq!(tokens, TOKENS);
    }
    worker.shutdown().await;
    let latency = median(latencies);
    Ok(Figures {
        start_ms: median(starts),
        latency_ms: latency * 1e3,
        tokens_per_s: TOKENS as f64 / latency,
    })
}

fn main() {
    let library = target_dir().join("libpio_plugin_echo.so");
    assert!(
        library.is_file(),
        "{} missing: run `cargo build --workspace --release` first",
        library.display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let base = in_process(&library);
    println!(
        "echo plugin, {TOKENS} tokens per request, median of {REQUESTS} requests ({STARTS} starts)"
    );
    println!("| where | start (ms) | request (ms) | tokens/s | added per token (µs) |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, f: &Figures| {
        let per_token_us = (f.latency_ms - base.latency_ms) * 1e3 / TOKENS as f64;
        println!(
            "| {name} | {:.2} | {:.2} | {:.0} | {:.2} |",
            f.start_ms, f.latency_ms, f.tokens_per_s, per_token_us
        );
    };
    row("in-process", &base);
    for tier in [Tier::Low, Tier::Medium, Tier::High, Tier::Maximum] {
        match runtime.block_on(in_worker(&library, tier)) {
            Ok(f) => row(&format!("worker, {tier}"), &f),
            Err(e) => println!("| worker, {tier} | unavailable: {e} | | | |"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "A model decoding at 20 tokens/s spends 50,000 µs per token: the added microseconds are the \
         whole cost of the process boundary and the sandbox."
    );
}
