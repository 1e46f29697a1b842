//! What `/v1/plugins`, `/v1/models`, `/ready` and the worker metrics report about a plugin.

use std::path::PathBuf;

use serde::Serialize;

use super::deployment::Deployment;
use super::hotplug::Found;
use crate::supervisor::{EngineCounts, State};

/// A model's counters of workers gone by (replaced by a reload, unloaded): the metrics add them,
/// so that `/metrics` counters never go back within the daemon's life.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counted {
    /// Worker restarts.
    pub restarts: u64,
    /// OOM kills.
    pub oom_kills: u64,
    /// CPU seconds.
    pub cpu_seconds: f64,
    /// The engines' counters.
    pub engine: Option<EngineCounts>,
}

impl Counted {
    /// These counts with `status`'s own added.
    pub fn plus(self, status: &PluginStatus) -> Self {
        Self {
            restarts: self.restarts + u64::from(status.restarts),
            oom_kills: self.oom_kills + status.oom_kills,
            cpu_seconds: self.cpu_seconds + status.cpu_seconds.unwrap_or(0.0),
            engine: EngineCounts::sum(self.engine, status.engine_counts),
        }
    }
}

/// A plugin as `/v1/plugins` reports it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PluginStatus {
    /// The plugin (the model's id in the API).
    pub name: String,
    /// Its version.
    pub version: String,
    /// `unloaded`, `loading`, `ready`, `restarting`, `quarantined`, `stopped`.
    pub state: String,
    /// Its manifest.
    pub manifest: PathBuf,
    /// The tier it asked for.
    pub tier_requested: String,
    /// The tier its worker runs at, when loaded.
    pub tier_applied: Option<String>,
    /// The worker's pid, when loaded.
    pub pid: Option<u32>,
    /// Worker restarts since it loaded.
    pub restarts: u32,
    /// Requests the server holds for it (running or waiting).
    pub requests: usize,
    /// Requests its worker is running.
    pub requests_in_flight: usize,
    /// Worker memory in use, bytes.
    pub memory_bytes: Option<u64>,
    /// The worker's memory limit, bytes.
    pub memory_limit_bytes: Option<u64>,
    /// CPU time the worker used, seconds.
    pub cpu_seconds: Option<f64>,
    /// OOM kills in the worker's cgroup.
    pub oom_kills: u64,
    /// The model's context length, when loaded.
    pub context_length: Option<u32>,
    /// Bytes its weights take, as the plugin reports them.
    pub weight_bytes: Option<u64>,
    /// GPU memory the model holds (weights and KV pool), as the plugin reports it.
    pub gpu_memory_bytes: Option<u64>,
    /// The GPU memory cap the model was sized inside.
    pub gpu_memory_limit_bytes: Option<u64>,
    /// On the CPU, the instruction set the model's kernels chose (`amx`, `avx512`, ...).
    pub kernels: Option<String>,
    /// Capabilities the library declares.
    pub capabilities: Vec<String>,
    /// Whether a blue/green reload is under way.
    pub reloading: bool,
    /// The last failure, in words.
    pub last_error: Option<String>,
    /// The model engine's batching and KV-cache figures, as of the last health check or
    /// request end.
    pub engine: Option<pio_plugin_api::wire::EngineStats>,
    /// Unloaded on purpose (idle past `keep_alive_secs`, evicted by `max_loaded_models`, or by
    /// the admin API), not for want of loading: with `load_on_demand` it still serves.
    #[serde(skip)]
    pub parked: bool,
    /// Loading, but waiting for room under `server.max_loaded_models`: every model loaded is
    /// busy (shown only when true).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub waiting_for_room: bool,
    /// Preloaded but left unloaded at start because `max_loaded_models` was full: counted as
    /// ready, since the operator's cap is why.
    #[serde(skip)]
    pub over_cap: bool,
    /// The counters of its workers before the current deployment (the figures above are the
    /// current one's, since it loaded).
    #[serde(skip)]
    pub earlier: Counted,
    /// Earlier deployments (a reload's old version, an unload's) still finishing their requests.
    pub draining: usize,
    /// The current deployment's engine counters over its workers (for `/metrics`).
    #[serde(skip)]
    pub engine_counts: Option<EngineCounts>,
}

impl PluginStatus {
    /// A plugin found but not loaded.
    pub(super) fn new(found: &Found, last_error: Option<String>, reloading: bool) -> Self {
        Self {
            name: found.manifest.name.clone(),
            version: found.manifest.version.to_string(),
            state: "unloaded".into(),
            manifest: found.manifest_path.clone(),
            tier_requested: found.manifest.tier.to_string(),
            tier_applied: None,
            pid: None,
            restarts: 0,
            requests: 0,
            requests_in_flight: 0,
            memory_bytes: None,
            memory_limit_bytes: None,
            cpu_seconds: None,
            oom_kills: 0,
            context_length: None,
            weight_bytes: None,
            gpu_memory_bytes: None,
            gpu_memory_limit_bytes: None,
            kernels: None,
            capabilities: found.report.capabilities.names(),
            reloading,
            last_error,
            engine: None,
            parked: false,
            waiting_for_room: false,
            over_cap: false,
            earlier: Counted::default(),
            draining: 0,
            engine_counts: None,
        }
    }

    /// Not loaded because its last load failed (`last_error` says why).
    pub(super) fn failed(self) -> Self {
        Self {
            state: "failed".into(),
            ..self
        }
    }

    /// While its first worker loads.
    pub(super) fn loading(self) -> Self {
        Self {
            state: "loading".into(),
            ..self
        }
    }

    /// Served by `d`: its worker's figures.
    pub(super) fn serving(mut self, d: &Deployment) -> Self {
        let st = d.supervised.status();
        self.state = match &st.state {
            State::Ready => "ready",
            State::Restarting => "restarting",
            State::Quarantined(_) => "quarantined",
            State::Stopped => "stopped",
        }
        .into();
        self.version.clone_from(&d.version);
        self.tier_applied = Some(st.tier);
        self.pid = st.pid;
        self.restarts = st.restarts;
        self.requests = d.leases();
        self.requests_in_flight = st.in_flight;
        self.context_length = d.info.context_length;
        self.weight_bytes = d.info.weight_bytes;
        self.gpu_memory_bytes = d.info.device_memory_bytes;
        self.gpu_memory_limit_bytes = d.info.device_memory_limit_bytes;
        self.kernels.clone_from(&d.info.kernels);
        self.engine = st.engine;
        self.engine_counts = st.engine_counts;
        if let Some(stats) = st.stats {
            self.memory_bytes = stats.memory_bytes;
            self.memory_limit_bytes = stats.memory_limit_bytes;
            self.cpu_seconds = stats.cpu_usec.map(|u| u as f64 / 1e6);
            self.oom_kills = stats.oom_kills;
        }
        if self.last_error.is_none() {
            self.last_error = st.last_error;
        }
        self
    }
}
