//! `GET /metrics`: Prometheus text. Request counters and latency histograms are recorded as
//! requests run; worker figures (queue depth, restarts, OOM kills, memory, CPU) are read from the
//! supervisors and cgroups at scrape time.

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::models::PluginStatus;

/// A request's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The model asked for.
    pub model: String,
    /// `chat` or `completions`.
    pub endpoint: String,
    /// The HTTP status (for streams: 500 when they failed midway).
    pub status: String,
}

/// One model.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    /// The model.
    pub model: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

/// The daemon's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    prompt_tokens: Family<ModelLabel, Counter>,
    generated_tokens: Family<ModelLabel, Counter>,
    ttft: Family<ModelLabel, Histogram, fn() -> Histogram>,
    itl: Family<ModelLabel, Histogram, fn() -> Histogram>,
    workers: Arc<Mutex<Vec<PluginStatus>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("pio");
        let requests = Family::default();
        registry.register(
            "requests",
            "API requests by model, endpoint and status",
            requests.clone(),
        );
        let prompt_tokens = Family::default();
        registry.register(
            "prompt_tokens",
            "Prompt tokens processed",
            prompt_tokens.clone(),
        );
        let generated_tokens = Family::default();
        registry.register(
            "generated_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        let ttft = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "time_to_first_token_seconds",
            "Time from request to first token",
            ttft.clone(),
        );
        let itl = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "inter_token_latency_seconds",
            "Time between consecutive tokens",
            itl.clone(),
        );
        let workers: Arc<Mutex<Vec<PluginStatus>>> = Arc::default();
        registry.register_collector(Box::new(WorkerCollector(workers.clone())));
        Self {
            registry,
            requests,
            prompt_tokens,
            generated_tokens,
            ttft,
            itl,
            workers,
        }
    }
}

impl Metrics {
    /// Counts a finished request.
    pub fn request(&self, model: &str, endpoint: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                model: model.into(),
                endpoint: endpoint.into(),
                status: status.to_string(),
            })
            .inc();
    }

    /// Counts a request's tokens.
    pub fn tokens(&self, model: &str, prompt: u32, generated: u32) {
        let label = ModelLabel {
            model: model.into(),
        };
        self.prompt_tokens
            .get_or_create(&label)
            .inc_by(u64::from(prompt));
        self.generated_tokens
            .get_or_create(&label)
            .inc_by(u64::from(generated));
    }

    /// Records the time to a request's first token.
    pub fn first_token(&self, model: &str, seconds: f64) {
        self.ttft
            .get_or_create(&ModelLabel {
                model: model.into(),
            })
            .observe(seconds);
    }

    /// Records the time between two tokens.
    pub fn inter_token(&self, model: &str, seconds: f64) {
        self.itl
            .get_or_create(&ModelLabel {
                model: model.into(),
            })
            .observe(seconds);
    }

    /// The text exposition, with `workers` as the current worker figures.
    pub fn render(&self, workers: Vec<PluginStatus>) -> String {
        *self.workers.lock().unwrap_or_else(|p| p.into_inner()) = workers;
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!("cannot encode metrics: {e}");
        }
        text
    }
}

#[derive(Debug)]
struct WorkerCollector(Arc<Mutex<Vec<PluginStatus>>>);

type Figure = fn(&PluginStatus) -> Option<f64>;

/// Whole numbers print as integers (`3`, not `3.0`), as counts and bytes should.
fn encode_value(
    v: f64,
    kind: MetricType,
    encoder: prometheus_client::encoding::MetricEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    let whole = v.fract() == 0.0 && v.abs() < 9.0e15;
    match (kind, whole) {
        (MetricType::Counter, true) => ConstCounter::new(v as u64).encode(encoder),
        (MetricType::Counter, false) => ConstCounter::new(v).encode(encoder),
        (_, true) => ConstGauge::new(v as i64).encode(encoder),
        (_, false) => ConstGauge::new(v).encode(encoder),
    }
}

/// v1 reports "no limit" as a huge number; it is no limit.
fn real_limit(bytes: u64) -> Option<f64> {
    (bytes < 1 << 60).then_some(bytes as f64)
}

/// The per-model gauges: name, help, and the figure from a plugin's status.
const GAUGES: [(&str, &str, Figure); 10] = [
    (
        "queue_depth",
        "Requests running or waiting per model",
        |s| Some(s.requests as f64),
    ),
    (
        "model_ready",
        "1 when the model is loaded and serving",
        |s| Some(f64::from(u8::from(s.state == "ready"))),
    ),
    (
        "worker_memory_bytes",
        "Memory in use by the model's worker (cgroup)",
        |s| s.memory_bytes.map(|b| b as f64),
    ),
    (
        "worker_memory_limit_bytes",
        "The worker's memory limit (cgroup)",
        |s| s.memory_limit_bytes.and_then(real_limit),
    ),
    (
        "engine_sequences_running",
        "Sequences in the model's running batch",
        |s| s.engine.map(|e| e.running as f64),
    ),
    (
        "engine_sequences_waiting",
        "Requests waiting to join the model's batch",
        |s| s.engine.map(|e| e.waiting as f64),
    ),
    (
        "engine_kv_blocks_used",
        "KV cache blocks held by sequences",
        |s| s.engine.map(|e| e.kv_blocks_used as f64),
    ),
    (
        "engine_kv_blocks_free",
        "KV cache blocks free (or cached and held by nobody)",
        |s| s.engine.map(|e| e.kv_blocks_free as f64),
    ),
    (
        "engine_prefix_cache_hit_ratio",
        "Prompt tokens served from the prefix cache, over those looked up",
        |s| {
            s.engine
                .map(|e| e.prefix_hit_tokens as f64 / e.prefix_lookup_tokens.max(1) as f64)
        },
    ),
    (
        "engine_batch_size_mean",
        "Sequences per forward pass, on average",
        |s| {
            s.engine
                .map(|e| e.batched_seqs as f64 / e.steps.max(1) as f64)
        },
    ),
];

/// The per-model counters.
const COUNTERS: [(&str, &str, Figure); 6] = [
    (
        "worker_restarts",
        "Worker restarts since the model loaded",
        |s| Some(f64::from(s.restarts)),
    ),
    (
        "worker_oom_kills",
        "OOM kills in the worker's cgroup",
        |s| Some(s.oom_kills as f64),
    ),
    (
        "worker_cpu_seconds",
        "CPU time used by the worker (cgroup)",
        |s| s.cpu_seconds,
    ),
    (
        "engine_preemptions",
        "Sequences preempted for want of KV blocks (recomputed later)",
        |s| s.engine.map(|e| e.preemptions as f64),
    ),
    (
        "engine_steps",
        "Forward passes the model's engine ran",
        |s| s.engine.map(|e| e.steps as f64),
    ),
    (
        "engine_prefix_cache_hit_tokens",
        "Prompt tokens served from the prefix cache",
        |s| s.engine.map(|e| e.prefix_hit_tokens as f64),
    ),
];

/// One family per table row, one sample per model that has the figure.
fn encode_table(
    encoder: &mut DescriptorEncoder,
    kind: MetricType,
    table: &[(&str, &str, Figure)],
    workers: &[PluginStatus],
) -> Result<(), std::fmt::Error> {
    for (name, help, figure) in table {
        let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
        for s in workers {
            if let Some(v) = figure(s) {
                let labels = [("model", s.name.as_str())];
                encode_value(v, kind, metric.encode_family(&labels)?)?;
            }
        }
    }
    Ok(())
}

impl Collector for WorkerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let workers = self.0.lock().unwrap_or_else(|p| p.into_inner());
        encode_table(&mut encoder, MetricType::Gauge, &GAUGES, &workers)?;
        encode_table(&mut encoder, MetricType::Counter, &COUNTERS, &workers)
    }
}
