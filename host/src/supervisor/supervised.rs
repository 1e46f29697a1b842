//! A plugin kept alive: its worker is restarted with exponential backoff when it dies or stops
//! answering health checks, requests past their deadline are failed and their worker replaced
//! (a plugin stuck in a loop cannot be cancelled), and a plugin that keeps crashing is
//! quarantined. Requests in flight when a worker dies get an error saying how it died.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pio_plugin_api::wire::{EngineStats, InferRequest, ModelConfig, ModelInfo};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use super::engine_counts::EngineCounts;
use super::forward::Forward;

use super::handle::{Event, Worker, WorkerError, WorkerSpec};
use crate::fault::Fault;
use crate::protocol::WireError;
use crate::sandbox::cgroup::Stats;

mod monitor;
use monitor::monitor;

/// What follows a worker's death while its plugin drains to stop.
pub(super) const NOT_RESTARTED: &str =
    "not restarted, as it was draining to stop (replaced, unloaded, or the daemon stopping)";

/// The request deadline `maximum` imposes when the operator sets none.
pub const MAXIMUM_WATCHDOG: Duration = Duration::from_secs(600);

/// When to restart, when to give up, and the deadlines.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartPolicy {
    /// Wait before the first restart; doubles on each crash in a row.
    pub initial_backoff: Duration,
    /// The longest wait between restarts.
    pub max_backoff: Duration,
    /// More crashes than this within `window` quarantine the plugin.
    pub max_crashes: usize,
    /// See `max_crashes`.
    pub window: Duration,
    /// A request still running after this is failed and its worker restarted.
    pub request_timeout: Option<Duration>,
    /// How often the worker's health is checked.
    pub health_interval: Duration,
    /// A worker that does not answer a health check within this is restarted.
    pub health_deadline: Duration,
    /// A worker not started and loaded within this is stopped, and its start counts as failed
    /// (a hung load: a wedged GPU, a stalled network mount); `None`: no limit.
    pub load_timeout: Option<Duration>,
    /// Whether a worker counts as started only once it has answered a one-token request (the
    /// first start's and every restart's: a worker that loads but cannot generate, a broken
    /// GPU context after a crash, fails its start instead of clients' requests).
    pub warmup: bool,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_crashes: 5,
            window: Duration::from_secs(300),
            request_timeout: Some(Duration::from_secs(600)),
            health_interval: Duration::from_secs(5),
            health_deadline: Duration::from_secs(5),
            load_timeout: Some(Duration::from_secs(1800)),
            warmup: true,
        }
    }
}

/// Where a supervised plugin stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum State {
    /// Serving requests.
    Ready,
    /// The worker died; a new one is being started.
    Restarting,
    /// Crashed too often; no more restarts until an operator reloads it.
    Quarantined(String),
    /// Stopped on purpose.
    Stopped,
}

/// A snapshot for `pio list` and the status API.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The plugin.
    pub name: String,
    /// Where it stands.
    pub state: State,
    /// The current worker's pid.
    pub pid: Option<u32>,
    /// Restarts so far.
    pub restarts: u32,
    /// The tier applied to its workers.
    pub tier: String,
    /// The last failure, in words.
    pub last_error: Option<String>,
    /// Cgroup figures: memory the current worker's, OOM kills and CPU time every worker's since
    /// the plugin was loaded (a restart's fresh cgroup starts its counters at 0).
    pub stats: Option<Stats>,
    /// Requests its worker is running (cancelled ones until the worker confirms).
    pub in_flight: usize,
    /// The current worker's engine figures, as of the last health check or request end.
    pub engine: Option<EngineStats>,
    /// The engine's counters over every worker since the plugin was loaded.
    pub engine_counts: Option<EngineCounts>,
}

pub(super) struct Shared {
    worker: Option<Arc<Worker>>,
    state: State,
    restarts: u32,
    last_error: Option<String>,
    /// The current worker's engine figures, as of the last health check or request end.
    engine: Option<EngineStats>,
    /// What the workers before the current one used.
    retired: Retired,
    /// Set once the plugin drains before it stops (replaced, unloaded, the daemon stopping): a
    /// worker that dies then is not replaced, as nothing new will be sent to it.
    draining: bool,
}

/// What a plugin's past workers used, kept for its status: the counters a cgroup keeps go with
/// it, and each restart brings a fresh one, so OOM kills (the usual cause of a restart) would
/// never show.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Retired {
    oom_kills: u64,
    /// `None` until a worker reports CPU time (cgroup v1 without CPU accounting never does).
    cpu_usec: Option<u64>,
    /// The past workers' engines' counters (`None` until one reported).
    engine: Option<EngineCounts>,
}

impl Retired {
    /// Counts in a worker's last figures.
    fn add(&mut self, last: Option<&Stats>) {
        if let Some(s) = last {
            self.oom_kills += s.oom_kills;
            if let Some(used) = s.cpu_usec {
                self.cpu_usec = Some(self.cpu_usec.unwrap_or(0) + used);
            }
        }
    }

    /// `current` (the live worker's figures, if any) with the past workers' counted in.
    fn counted_into(self, current: Option<Stats>) -> Option<Stats> {
        if (self.oom_kills, self.cpu_usec) == (0, None) {
            return current;
        }
        let mut stats = current.unwrap_or_default();
        stats.oom_kills += self.oom_kills;
        if let Some(past) = self.cpu_usec {
            stats.cpu_usec = Some(stats.cpu_usec.unwrap_or(0) + past);
        }
        Some(stats)
    }
}

impl Shared {
    /// Whether the plugin was stopped on purpose (no restart follows).
    pub(super) fn stopped(&self) -> bool {
        self.state == State::Stopped
    }

    /// Whether a worker that dies now is left dead: the plugin is draining to stop.
    pub(super) fn draining(&self) -> bool {
        self.draining
    }

    /// Counts the figures of the worker that just ended (`last`: its cgroup's final ones) into
    /// the past workers'; the next one counts from nothing.
    pub(super) fn count_out(&mut self, last: Option<&Stats>) {
        let engine = self.engine.take().map(|e| EngineCounts::of(&e));
        self.retired.engine = EngineCounts::sum(self.retired.engine, engine);
        self.retired.add(last);
    }

    /// Keeps `figures`, from worker `from`, if they are the newest seen: concurrent requests end
    /// in any order, and the counters never go back. A dead worker's late figures (a request's
    /// end its slow client had not taken yet) are not the current engine's: dropped.
    pub(super) fn keep_newest(&mut self, from: &Arc<Worker>, figures: EngineStats) {
        let current = self.worker.as_ref().is_some_and(|w| Arc::ptr_eq(w, from));
        if current && self.engine.is_none_or(|e| e.steps <= figures.steps) {
            self.engine = Some(figures);
        }
    }
}

/// A supervised plugin.
pub struct Supervised {
    name: String,
    tier: crate::sandbox::Tier,
    /// The policy in force: a reload replaces it, and the monitor and new requests read it.
    policy: watch::Sender<RestartPolicy>,
    shared: Arc<Mutex<Shared>>,
    stop: watch::Sender<bool>,
}

/// `policy` as a plugin of `tier` runs with: `maximum` always has a per-request watchdog.
fn in_force(mut policy: RestartPolicy, tier: crate::sandbox::Tier) -> RestartPolicy {
    if tier == crate::sandbox::Tier::Maximum && policy.request_timeout.is_none() {
        policy.request_timeout = Some(MAXIMUM_WATCHDOG);
    }
    policy
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A worker that failed to start or load, with what its cgroup counted (a worker killed at
/// its memory limit while loading counts as an OOM kill).
type FailedStart = (WorkerError, Option<Stats>);

async fn start_and_load(
    spec: &WorkerSpec,
    config: &ModelConfig,
    policy: &RestartPolicy,
) -> Result<(Worker, ModelInfo), FailedStart> {
    let limit = policy.load_timeout;
    let deadline = limit.map(|l| tokio::time::Instant::now() + l);
    let within = |deadline| async move {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    let late = || {
        let secs = limit.map_or(0, |l| l.as_secs());
        err(
            Fault::Timeout,
            format!("{} did not start and load its model within {secs} s (supervisor.load_timeout_secs), and was stopped; raise the setting for a model this slow to load", spec.name),
        )
    };
    // Dropped unfinished, a start kills its worker.
    let worker = tokio::select! {
        started = Worker::start(spec.clone()) => started.map_err(|e| (e, None))?,
        _ = within(deadline) => return Err((late(), None)),
    };
    let loaded = tokio::select! {
        loaded = worker.load(config.clone(), |_, _, _| {}) => loaded,
        _ = within(deadline) => Err(late()),
    };
    // The warm-up is part of the start, under its deadline: with no request deadline one the
    // plugin never answers held the model `loading` for good.
    let loaded = match loaded {
        Ok(info) if policy.warmup => tokio::select! {
            warmed = warm_up(&worker) => warmed.map(|()| info),
            _ = within(deadline) => Err(err(
                Fault::Timeout,
                format!("{} loaded but did not answer its warm-up request within the {} s its start, load and warm-up have (supervisor.load_timeout_secs), and was stopped", spec.name, limit.map_or(0, |l| l.as_secs())),
            )),
        },
        loaded => loaded,
    };
    match loaded {
        Ok(info) => Ok((worker, info)),
        Err(e) => {
            worker.shutdown().await;
            // The cgroup lives as long as the handle: its final counters are still there.
            Err((e, worker.stats()))
        }
    }
}

/// One short generation: a worker counts as started only once it has produced a token.
async fn warm_up(worker: &Worker) -> Result<(), WorkerError> {
    let request = InferRequest {
        prompt: pio_plugin_api::wire::Prompt::Text("Hello".into()),
        max_tokens: Some(1),
        temperature: Some(0.0),
        ..InferRequest::default()
    };
    let failed = |e: &WireError| {
        WorkerError::new(
            e.kind,
            format!("loaded but failed its warm-up request: {}", e.message),
        )
    };
    let (_, mut events) = worker.infer(request).map_err(|e| failed(&e.0))?;
    while let Some(event) = events.recv().await {
        match event {
            Event::Token(_) => {}
            Event::Done(_) => return Ok(()),
            Event::Failed(e) => return Err(failed(&e)),
        }
    }
    Err(failed(&WireError::new(
        Fault::WorkerDied,
        "the worker ended the warm-up request without an answer",
    )))
}

impl Supervised {
    /// Starts the plugin's first worker and loads its model; failures here are returned, not
    /// retried (the operator's configuration is wrong, not the plugin unlucky).
    pub async fn start(
        spec: WorkerSpec,
        config: ModelConfig,
        policy: RestartPolicy,
    ) -> Result<(Self, ModelInfo), WorkerError> {
        let tier = spec.plan.applied;
        let (policy, policy_rx) = watch::channel(in_force(policy, tier));
        let first = policy.borrow().clone();
        let (worker, info) = (start_and_load(&spec, &config, &first).await).map_err(|(e, _)| e)?;
        let shared = Arc::new(Mutex::new(Shared {
            worker: Some(Arc::new(worker)),
            state: State::Ready,
            restarts: 0,
            last_error: None,
            engine: None,
            retired: Retired::default(),
            draining: false,
        }));
        let (stop, stop_rx) = watch::channel(false);
        let this = Self {
            name: spec.name.clone(),
            tier,
            policy,
            shared: shared.clone(),
            stop,
        };
        tokio::spawn(monitor(spec, config, policy_rx, shared, stop_rx));
        Ok((this, info))
    }

    /// Puts `policy` in force for this plugin from now on, as a configuration reload does: the
    /// deadline of requests started after it, the next health check, the next restart's backoff
    /// and crash count (a request already running keeps the deadline it started with).
    pub fn set_policy(&self, policy: RestartPolicy) {
        self.policy.send_replace(in_force(policy, self.tier));
    }

    /// Marks the plugin as draining before it stops: its worker, should it die now, is not
    /// replaced (the requests it ran are told so, and a later one is told to retry).
    pub fn begin_drain(&self) {
        lock(&self.shared).draining = true;
    }

    /// Starts a request. Fails at once, saying why, while the plugin is restarting or
    /// quarantined.
    pub fn infer(&self, request: InferRequest) -> Result<mpsc::Receiver<Event>, WorkerError> {
        let worker = self.ready_worker()?;
        let budget = super::forward::Budget::of(&request);
        // A worker that ended before the monitor saw it never had the request: like one that
        // is restarting, a retry will do (503, not a 500 for a request that failed in it).
        let (id, events) = worker.infer(request).map_err(|e| match e.0.kind {
            Fault::WorkerDied => self.not_taken(&e.0.message),
            _ => e,
        })?;
        // A small hand-over: the worker's window is where tokens wait for a slow reader.
        let (tx, rx) = mpsc::channel(4);
        let forward = Forward {
            name: self.name.clone(),
            timeout: self.policy.borrow().request_timeout,
            shared: self.shared.clone(),
            worker,
            id,
            budget,
            overrun: false,
        };
        tokio::spawn(forward.run(events, tx));
        Ok(rx)
    }

    /// Why a request the worker never took failed: it was ending (`why`), and the plugin is
    /// replaced or unloaded (draining) or restarts.
    fn not_taken(&self, why: &str) -> WorkerError {
        let name = &self.name;
        match lock(&self.shared).draining {
            true => err(
                Fault::Stopped,
                format!("plugin {name} was being replaced or unloaded when its worker ended ({why}); retry"),
            ),
            false => err(
                Fault::Restarting,
                format!("plugin {name}'s worker ended ({why}) and is restarting; retry shortly"),
            ),
        }
    }

    /// The worker, if the plugin is ready; else why not.
    fn ready_worker(&self) -> Result<Arc<Worker>, WorkerError> {
        let shared = lock(&self.shared);
        match (&shared.state, &shared.worker) {
            (State::Ready, Some(w)) => Ok(w.clone()),
            (State::Quarantined(why), _) => Err(err(
                Fault::Quarantined,
                format!("plugin {} is quarantined: {why}", self.name),
            )),
            (State::Stopped, _) => Err(err(
                Fault::Stopped,
                format!("plugin {} is stopped", self.name),
            )),
            _ if shared.draining => Err(err(
                Fault::Stopped,
                format!(
                    "plugin {} was being replaced or unloaded when its worker ended; retry",
                    self.name
                ),
            )),
            _ => Err(err(
                Fault::Restarting,
                format!(
                    "plugin {} is restarting after a failure; retry shortly",
                    self.name
                ),
            )),
        }
    }

    /// Its state and last error alone: what each request's lease asks, without
    /// [`Self::status`]'s reads of the cgroup's files.
    pub fn state(&self) -> (State, Option<String>) {
        let shared = lock(&self.shared);
        (shared.state.clone(), shared.last_error.clone())
    }

    /// A snapshot of where the plugin stands.
    pub fn status(&self) -> Status {
        let shared = lock(&self.shared);
        Status {
            name: self.name.clone(),
            state: shared.state.clone(),
            pid: shared.worker.as_ref().map(|w| w.pid()),
            restarts: shared.restarts,
            tier: self.tier.to_string(),
            last_error: shared.last_error.clone(),
            stats: shared
                .retired
                .counted_into(shared.worker.as_ref().and_then(|w| w.stats())),
            in_flight: shared.worker.as_ref().map_or(0, |w| w.in_flight()),
            engine: shared.engine,
            engine_counts: EngineCounts::sum(
                shared.retired.engine,
                shared.engine.as_ref().map(EngineCounts::of),
            ),
        }
    }

    /// Stops the plugin for good: no restart, the worker and its cgroup removed (a restart under
    /// way is abandoned as the monitor sees the stop, and the worker it began is killed).
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        // The worker stays in view until it is counted out: taken at once, its counters (CPU
        // seconds, OOM kills) went missing from the status while it exited, which a scrape
        // read as a counter reset.
        let (worker, draining) = {
            let mut shared = lock(&self.shared);
            shared.state = State::Stopped;
            (shared.worker.clone(), shared.draining())
        };
        if let Some(w) = worker {
            // Dead on its own before this stop took it: the monitor, which would have said so,
            // finds it taken and says nothing.
            if let Some(reason) = w.ended().filter(|_| draining) {
                tracing::warn!(plugin = %self.name, "{reason}; {NOT_RESTARTED}");
            }
            w.kill();
            w.exited().await;
            // Counted as a dead worker's are, so a stopped plugin's status keeps what its last
            // worker used (a drained deployment's counters are taken after its stop).
            let last = w.stats();
            let mut shared = lock(&self.shared);
            if shared
                .worker
                .as_ref()
                .is_some_and(|held| Arc::ptr_eq(held, &w))
            {
                // Counted once: a second stop meanwhile found the same worker.
                shared.worker = None;
                shared.count_out(last.as_ref());
            }
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(w) = lock(&self.shared).worker.take() {
            w.kill();
        }
    }
}

pub(super) fn err(kind: Fault, message: String) -> WorkerError {
    WorkerError(WireError::new(kind, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::Tier;

    #[test]
    fn maximum_always_runs_with_a_request_deadline() {
        let none = RestartPolicy {
            request_timeout: None,
            ..RestartPolicy::default()
        };
        let deadline =
            |policy: &RestartPolicy, tier| in_force(policy.clone(), tier).request_timeout;
        assert_eq!(deadline(&none, Tier::Maximum), Some(MAXIMUM_WATCHDOG));
        assert_eq!(deadline(&none, Tier::High), None);
        let short = RestartPolicy {
            request_timeout: Some(Duration::from_secs(3)),
            ..none
        };
        assert_eq!(
            deadline(&short, Tier::Maximum),
            Some(Duration::from_secs(3))
        );
    }

    #[test]
    fn past_workers_counters_are_kept_across_restarts() {
        let killed = Stats {
            memory_bytes: Some(60 << 20),
            oom_kills: 1,
            cpu_usec: Some(2_000_000),
            ..Stats::default()
        };
        let mut retired = Retired::default();
        assert_eq!(retired.counted_into(None), None, "no cgroups, no figures");
        retired.add(Some(&killed));
        retired.add(None);
        retired.add(Some(&killed));
        let live = Stats {
            memory_bytes: Some(10 << 20),
            oom_kills: 0,
            cpu_usec: Some(500_000),
            ..Stats::default()
        };
        let now = retired.counted_into(Some(live)).unwrap();
        assert_eq!(
            (now.memory_bytes, now.oom_kills, now.cpu_usec),
            (Some(10 << 20), 2, Some(4_500_000)),
            "memory is the live worker's; the counters are everyone's"
        );
        let between = retired.counted_into(None).unwrap();
        assert_eq!((between.memory_bytes, between.oom_kills), (None, 2));
        // Without CPU accounting no CPU time is made up.
        let mut no_cpu = Retired::default();
        no_cpu.add(Some(&Stats {
            oom_kills: 1,
            cpu_usec: None,
            ..Stats::default()
        }));
        assert_eq!(no_cpu.counted_into(None).unwrap().cpu_usec, None);
    }
}
