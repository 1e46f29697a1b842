//! One loaded version of a plugin: its supervised worker, the requests holding it, and draining.
//! A reload starts a new deployment beside the old one; the old one drains (its requests finish)
//! before its worker stops.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pio_plugin_api::wire::{ModelInfo, TokenTable};
use tokio::sync::Notify;

use super::error::ApiError;
use super::hotplug::Found;
use super::models::Setup;
use crate::config::Config;
use crate::launch;
use crate::sandbox::HostSupport;
use crate::supervisor::{State, Supervised};

/// A plugin version being served.
pub struct Deployment {
    /// The worker, kept alive by its supervisor.
    pub supervised: Supervised,
    /// What the model reported when it loaded (its token table taken out, into `tokens`).
    pub info: ModelInfo,
    /// Every token's raw bytes, when the plugin sent them (logprobs' `bytes`).
    pub tokens: Option<Arc<TokenTable>>,
    /// The model's special tokens (taken out of `info`), left out of the text by default.
    pub special: Option<Arc<std::collections::HashSet<u32>>>,
    /// The library copy this deployment runs (deleted when the last deployment using it goes).
    pub library: Arc<super::library::LibraryCopy>,
    /// The plugin's version.
    pub version: String,
    /// The manifest's `[model.generation] max_tokens`: a request that names none gets it, not
    /// the API's own default.
    pub default_max_tokens: Option<u32>,
    /// The fingerprint of the manifest and library it was made from (hot plug's), to tell
    /// whether the files changed while it loaded.
    pub fingerprint: String,
    /// What its library declared when checked: requests are held to the library serving them,
    /// not to newer files on disk that a reload has yet to load (or failed to).
    pub report: Option<crate::probe::LibraryReport>,
    leases: AtomicUsize,
    idle: Notify,
    last_used: Mutex<Instant>,
    loaded_at: Instant,
}

impl std::fmt::Debug for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployment")
            .field("version", &self.version)
            .field("leases", &self.leases)
            .finish_non_exhaustive()
    }
}

/// A request's hold on a deployment, weighing as many places of its queue as the sequences it
/// runs (`n` choices): while any exists the deployment is not stopped.
#[derive(Debug)]
pub struct Lease(Arc<Deployment>, usize);

impl Lease {
    /// The deployment held.
    pub fn deployment(&self) -> &Deployment {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        *self.0.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        if self.0.leases.fetch_sub(self.1, Ordering::AcqRel) == self.1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Why a deployment cannot take a request now.
#[derive(Debug)]
pub enum Refusal {
    /// `queue_depth` requests already hold it.
    Full,
    /// Its worker is restarting or quarantined: the reason.
    Unavailable(String),
}

impl Deployment {
    /// A deployment of a freshly loaded worker.
    pub fn new(
        supervised: Supervised,
        mut info: ModelInfo,
        version: String,
        library: Arc<super::library::LibraryCopy>,
    ) -> Self {
        let tokens = info.token_bytes.take().and_then(|t| match t.table() {
            Ok(table) => Some(Arc::new(table)),
            Err(e) => {
                tracing::warn!("the plugin's token table is unusable ({e}); logprobs report each token's text as its bytes");
                None
            }
        });
        let special =
            (info.special_token_ids.take()).map(|ids| Arc::new(ids.into_iter().collect()));
        Self {
            supervised,
            info,
            tokens,
            special,
            library,
            version,
            default_max_tokens: None,
            fingerprint: String::new(),
            report: None,
            leases: AtomicUsize::new(0),
            idle: Notify::new(),
            last_used: Mutex::new(Instant::now()),
            loaded_at: Instant::now(),
        }
    }

    /// Whether its worker is quarantined (failed too often; only an operator's load ends it).
    pub fn quarantined(&self) -> bool {
        matches!(self.supervised.state().0, State::Quarantined(_))
    }

    /// Takes a lease, unless `depth` requests already hold one or the worker cannot serve.
    pub fn lease(self: &Arc<Self>, depth: usize, weight: usize) -> Result<Lease, Refusal> {
        // Under the book's lock every request takes: the state alone, not the cgroup's counters.
        let (state, last_error) = self.supervised.state();
        match state {
            State::Ready => {}
            State::Restarting => {
                return Err(Refusal::Unavailable(format!(
                    "its worker is restarting after a failure ({})",
                    last_error.unwrap_or_default()
                )))
            }
            State::Quarantined(why) => {
                return Err(Refusal::Unavailable(format!("it is quarantined: {why}")))
            }
            State::Stopped => return Err(Refusal::Unavailable("it is stopping".into())),
        }
        let taken = self
            .leases
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n + weight <= depth).then_some(n + weight)
            });
        match taken {
            Ok(_) => Ok(Lease(self.clone(), weight)),
            Err(_) => Err(Refusal::Full),
        }
    }

    /// Requests holding it now.
    pub fn leases(&self) -> usize {
        self.leases.load(Ordering::Acquire)
    }

    /// How long since a request last finished (or it loaded), when none runs now and its
    /// worker serves: a quarantined or restarting one is not idle, so neither `keep_alive_secs`
    /// nor `max_loaded_models` unloads it (that lifted a quarantine, its reason lost, with no
    /// operator, and reset a crash count on its way to one).
    pub fn idle_for(&self) -> Option<Duration> {
        let serving = matches!(self.supervised.state().0, State::Ready);
        (serving && self.leases() == 0).then(|| {
            self.last_used
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed()
        })
    }

    /// Seconds since it loaded.
    pub fn uptime(&self) -> Duration {
        self.loaded_at.elapsed()
    }

    /// Waits until no request holds it, at most `deadline`; then stops its worker. Returns how
    /// many requests were still running when the deadline cut them off.
    pub async fn drain_and_stop(&self, deadline: Duration) -> usize {
        self.supervised.begin_drain();
        let wait = async {
            loop {
                let idle = self.idle.notified();
                if self.leases() == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(deadline, wait).await;
        let left = self.leases();
        self.supervised.stop().await;
        left
    }
}

/// Starts a worker for `found`, loads its model and warms it up (`server.warmup`; the
/// supervisor's start does, as each restart's).
pub(super) async fn deploy(
    setup: &Setup,
    config: &Config,
    found: &Found,
) -> Result<Deployment, ApiError> {
    let name = &found.manifest.name;
    let store = setup.store.clone();
    let library = found.library.clone();
    let copy = tokio::task::spawn_blocking(move || store.snapshot(&library))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(format!("cannot copy {}: {e}", found.library.display())))?;
    if let Some(pin) = &found.manifest.sha256 {
        if pin.get_ref().0 != copy.sha256 {
            return Err(ApiError::internal(format!(
                "{}: the library changed since it was checked (sha256 {}, pinned {}); it is not loaded",
                found.manifest_path.display(),
                copy.sha256,
                pin.get_ref().0
            )));
        }
    }
    // The plan looks the worker's uid up in the user database (NSS: LDAP can take seconds) and
    // reads /proc and /sys: off the runtime's threads.
    let (manifest, cfg, policy) = (found.manifest.clone(), config.clone(), setup.policy.clone());
    let plan = tokio::task::spawn_blocking(move || {
        launch::plan(&manifest, &cfg, &policy, &HostSupport::detect())
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| ApiError::internal(format!("plugin {name} cannot be confined: {e}")))?;
    if let Some(why) = &plan.downgrade_reason {
        tracing::warn!(plugin = %name, "running at tier {} instead of {}: {why}", plan.applied, plan.requested);
    }
    let model = launch::model_config(&found.manifest, &found.manifest_path);
    let spec = launch::worker_spec(name, &copy.path, &model, plan, setup.exe.clone());
    let (supervised, info) = Supervised::start(spec, model, config.restart_policy())
        .await
        .map_err(|e| ApiError::internal(format!("plugin {name} failed to load: {e}")))?;
    let mut deployment =
        Deployment::new(supervised, info, found.manifest.version.to_string(), copy);
    deployment.default_max_tokens = found.manifest.model.generation.max_tokens;
    deployment.fingerprint = found.fingerprint.clone();
    deployment.report = Some(found.report.clone());
    Ok(deployment)
}
