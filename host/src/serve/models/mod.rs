//! The models the daemon serves: which plugins exist (from discovery, kept current by hot plug),
//! which are loaded, loading on demand and on command, blue/green reloads, idle unloading and the
//! cap on loaded models.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pio_plugin_api::Capabilities;

use super::book::{lock, status_of, take_deployment, Inner, Slot, LOAD_RETRY};
use super::deployment::{Deployment, Lease, Refusal};
use super::error::ApiError;
use super::hotplug::{check_one, scan};
use super::library::LibraryStore;
pub use super::status::PluginStatus;
use crate::config::Config;
use crate::discovery::{self, SearchPaths};
use crate::probe::Prober;
use crate::sandbox::Policy;

mod loading;
mod memory;
mod replace;

use loading::finished;

/// Everything fixed for the daemon's lifetime that loading a plugin needs.
#[derive(Debug)]
pub struct Setup {
    /// The configuration, flags applied, as the daemon started (see [`Models::config`] for the
    /// one in force).
    pub config: Config,
    /// The file it came from, re-read on `SIGHUP`, with what it said at start (before flags): a
    /// reload compares its restart-only keys with that reading, not a second one.
    pub config_file: Option<(PathBuf, Config)>,
    /// Where plugins are looked for.
    pub search: SearchPaths,
    /// The sandbox policy, flags applied.
    pub policy: Policy,
    /// The `pio` executable (probes and workers).
    pub exe: PathBuf,
    /// The library copies workers run.
    pub store: LibraryStore,
    /// systemd's notification socket, when systemd started the daemon (`Type=notify`).
    pub systemd: Option<Arc<super::systemd::Notifier>>,
}

/// The daemon's models.
pub struct Models {
    setup: Setup,
    /// The configuration in force: the setup's, replaced on each `SIGHUP` reload.
    config: std::sync::RwLock<Arc<Config>>,
    inner: Mutex<Inner>,
    /// Set by [`Models::stop_all`]: a load that ends after it is stopped, not kept.
    stopping: std::sync::atomic::AtomicBool,
    /// Set when the daemon begins to drain ([`Models::wind_down`]): changes in the plugin
    /// folders and newly named preloads start nothing more (requests in flight still load).
    winding_down: std::sync::atomic::AtomicBool,
}

impl Models {
    /// No models yet; [`Models::rescan`] finds them.
    pub fn new(setup: Setup) -> Arc<Self> {
        Arc::new(Self {
            config: std::sync::RwLock::new(Arc::new(setup.config.clone())),
            setup,
            inner: Mutex::default(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            winding_down: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The daemon drains to stop: a rescan or a configuration reload from now on starts no
    /// load or reload (one begun then was neither waited for nor drained at the stop, and its
    /// worker died with the runtime).
    pub fn wind_down(&self) {
        self.winding_down
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether [`Self::wind_down`] was called.
    pub fn winding_down(&self) -> bool {
        self.winding_down.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The setup it runs with.
    pub fn setup(&self) -> &Setup {
        &self.setup
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts `config` in force; requests already running keep what they started with.
    pub fn set_config(&self, config: Config) {
        let policy = config.restart_policy();
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        // Supervision reaches the plugins already serving too (a load that ends after this
        // takes the configuration in force then: see `loading`).
        for entry in lock(&self.inner).entries.values() {
            if let Slot::Loaded(d) = &entry.slot {
                d.supervised.set_policy(policy.clone());
            }
        }
    }

    /// Starts loading each unloaded plugin the configuration in force preloads and `before`
    /// (the one it replaced) did not: a reload names new preloads, it does not undo an
    /// operator's unload, an idle unload or an eviction (parked), nor hurry a failed load's retry.
    pub fn preload_newly_named(self: &Arc<Self>, before: &Config) {
        self.warn_missing_preloads();
        if self.stopping.load(std::sync::atomic::Ordering::Acquire) || self.winding_down() {
            return;
        }
        let config = self.config();
        let mut inner = lock(&self.inner);
        let names: Vec<String> = inner
            .entries
            .iter()
            .filter(|(n, e)| {
                matches!(e.slot, Slot::Unloaded)
                    && config.server.preloads(n)
                    && !before.server.preloads(n)
                    && !e.parked
                    && e.failed_at.is_none()
            })
            .map(|(n, _)| n.clone())
            .collect();
        self.preload(&mut inner, &names, config.server.max_loaded_models);
    }

    /// Warns of each name in `server.preload` that no manifest serves (a typo would otherwise
    /// show only as a `/ready` that never turns 200).
    pub fn warn_missing_preloads(&self) {
        let config = self.config();
        let inner = lock(&self.inner);
        for name in &config.server.preload {
            if name != "*" && !inner.entries.contains_key(name) {
                tracing::warn!(
                    "server.preload names {name}, which no manifest that passed its checks serves: `pio list` shows them; /ready waits for it"
                );
            }
        }
    }

    /// Starts loading `names`, no more than `cap` holds beside what is loaded (0: no cap); the
    /// rest wait for their first request, parked (so `/ready` does not wait for them).
    fn preload(self: &Arc<Self>, inner: &mut Inner, names: &[String], cap: usize) {
        let room = inner.free_places(cap);
        for (i, name) in names.iter().enumerate() {
            if i < room {
                self.begin_load(inner, name);
            } else if let Some(entry) = inner.entries.get_mut(name) {
                tracing::info!(plugin = %name, "not preloaded: server.max_loaded_models = {cap} are loaded; it loads on its first request (or POST /v1/plugins/{name}/load)");
                entry.over_cap = true;
            }
        }
    }

    /// Whether a load of `name` would start a worker (it is not loaded, or quarantined): then
    /// an admin load checks its files again first.
    pub fn loads_afresh(&self, name: &str) -> Result<bool, ApiError> {
        Ok(match &lock(&self.inner).entry(name)?.slot {
            Slot::Loaded(d) => d.quarantined(),
            Slot::Loading(_) => false,
            Slot::Unloaded => true,
        })
    }

    /// Probes libraries as the workers' user.
    fn prober(&self) -> Prober {
        Prober::new(self.setup.exe.clone())
            .with_users(&self.setup.policy)
            .with_copies_in(self.setup.store.dir().to_path_buf())
    }

    /// Checks `name`'s manifest and library again and takes them in, so that an admin load or
    /// reload runs the files as they are now, not as last checked (with `watch = false` nothing
    /// else sees them change). Files that fail their checks are refused with why (409), and
    /// what is served stays.
    pub async fn recheck(&self, name: &str) -> Result<(), ApiError> {
        let path = {
            let inner = lock(&self.inner);
            let entry = inner.entry(name)?;
            // Unloaded with its own files broken: what a load would serve is the fallback.
            match (&entry.slot, &entry.fallback) {
                (Slot::Unloaded, Some(older)) => older.manifest_path.clone(),
                _ => entry.found.manifest_path.clone(),
            }
        };
        let (search, prober) = (self.setup.search.clone(), self.prober());
        let checked = tokio::task::spawn_blocking(move || check_one(&path, &search, &prober))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let found = checked.map_err(|why| {
            ApiError::conflict(format!(
                "plugin {name} fails its checks: {why}; fix its files and ask again"
            ))
        })?;
        if found.manifest.name != name {
            return Err(ApiError::conflict(format!(
                "{} now names plugin {}: not taken as {name}'s; a rescan serves it under its new name",
                found.manifest_path.display(),
                found.manifest.name
            )));
        }
        let mut inner = lock(&self.inner);
        let entry = inner.entry_mut(name)?;
        if entry
            .fallback
            .as_ref()
            .is_some_and(|f| f.manifest_path == found.manifest_path)
        {
            entry.fallback = None;
        }
        entry.found = found;
        Ok(())
    }

    /// Scans the plugin directories and brings the served set in line: new plugins are added
    /// (and loaded when preloaded), changed ones reloaded blue/green, removed ones drained and
    /// unloaded. A manifest that fails its checks is reported and changes nothing else.
    pub async fn rescan(self: &Arc<Self>) -> Result<(), discovery::ScanError> {
        if self.winding_down() {
            tracing::info!(
                "the plugin folders changed while the daemon drains to stop: not acted on"
            );
            return Ok(());
        }
        let (search, prober) = (self.setup.search.clone(), self.prober());
        // A scan that panicked found nothing: taken as it was, every served model was gone.
        let found = match tokio::task::spawn_blocking(move || scan(&search, &prober)).await {
            Ok(found) => found?,
            Err(e) => {
                tracing::error!(
                    "the scan of the plugin directories failed ({e}); nothing served was changed, and the next change in them scans again"
                );
                return Ok(());
            }
        };
        let (found, broken) = found;
        let preload = |name: &str| self.config().server.preloads(name);
        let (reload, unload) = {
            let mut inner = lock(&self.inner);
            let changes = inner.merge(found, broken, preload);
            // Loading from this moment, so `/ready` never sees a preloaded plugin as idle.
            let cap = self.config().server.max_loaded_models;
            self.preload(&mut inner, &changes.load, cap);
            let unload: Vec<_> = changes
                .gone
                .into_iter()
                .map(|name| {
                    // Out of the map at once: new requests get 404 instead of loading it again.
                    let deployment = take_deployment(&mut inner, &name);
                    inner.entries.remove(&name);
                    (name, deployment)
                })
                .collect();
            (changes.reload, unload)
        };
        for name in reload {
            // One refused as already reloading is caught up when that reload ends.
            self.spawn_reload(&name);
        }
        for (name, deployment) in unload {
            tracing::info!(plugin = %name, "plugin removed; draining and unloading it");
            if let Some(d) = deployment {
                let deadline = self.drain_timeout();
                // Its entry is gone, its counters with it: nothing to count the drain into.
                tokio::spawn(async move { d.drain_and_stop(deadline).await });
            }
        }
        Ok(())
    }

    /// A lease on `name`'s deployment for one request, loading it first when allowed.
    pub async fn acquire(self: &Arc<Self>, name: &str) -> Result<Lease, ApiError> {
        self.acquire_places(name, 1).await
    }

    /// A lease on `name`'s deployment for a request of `places` sequences (`n` choices), each
    /// a place of `server.queue_depth`, loading it first when allowed.
    pub async fn acquire_places(
        self: &Arc<Self>,
        name: &str,
        places: usize,
    ) -> Result<Lease, ApiError> {
        let config = self.config();
        let server = &config.server;
        for _ in 0..3 {
            let (wait, waiting) = {
                let mut inner = lock(&self.inner);
                let entry = inner.entry(name)?;
                let waiting = entry.waiting.clone();
                let wait = match &entry.slot {
                    Slot::Loaded(d) => {
                        return d.lease(server.queue_depth, places).map_err(|r| match r {
                            Refusal::Full => ApiError::queue_full(name, server.queue_depth),
                            Refusal::Unavailable(why) => ApiError::unavailable(format!(
                                "model `{name}` cannot serve now: {why}"
                            )),
                        })
                    }
                    Slot::Loading(rx) => rx.clone(),
                    Slot::Unloaded if entry.failed_at.is_some_and(|t| t.elapsed() < LOAD_RETRY) => {
                        // A plugin that just failed to load is not started again per request.
                        let why = entry.last_error.clone().unwrap_or_default();
                        return Err(ApiError::internal(format!(
                            "{why} (on-demand loading retries after {} s; POST /v1/plugins/{name}/load to retry now)",
                            LOAD_RETRY.as_secs()
                        )));
                    }
                    Slot::Unloaded if server.load_on_demand => self.begin_load(&mut inner, name),
                    Slot::Unloaded => {
                        return Err(ApiError::unavailable(format!(
                        "model `{name}` is not loaded; load it with POST /v1/plugins/{name}/load"
                    )))
                    }
                };
                (wait, waiting)
            };
            let deadline = Duration::from_secs(server.load_wait_secs);
            let _counted = Waiting::count(waiting, places);
            match tokio::time::timeout(deadline, finished(wait)).await {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(self.still_waiting(name, server.max_loaded_models)),
            }
        }
        Err(ApiError::unavailable(format!(
            "model `{name}` was unloaded while the request waited for it; retry"
        )))
    }

    /// Why a request gave up waiting for `name` to load: the load itself, or the room it waits
    /// for under `cap` (every loaded model busy), which nothing on the model's side will end.
    fn still_waiting(&self, name: &str, cap: usize) -> ApiError {
        let for_room = lock(&self.inner)
            .entries
            .get(name)
            .is_some_and(|e| e.waiting_for_room(cap));
        ApiError::unavailable(if for_room {
            format!("model `{name}` waits for room to load: the models loaded fill server.max_loaded_models ({cap}) and all are busy; retry shortly")
        } else {
            format!("model `{name}` is still loading; retry shortly")
        })
    }

    fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.config().server.drain_timeout_secs)
    }

    /// Every plugin with where it stands, and the manifests that failed their checks.
    pub fn statuses(&self) -> (Vec<PluginStatus>, Vec<(PathBuf, String)>) {
        let cap = self.config().server.max_loaded_models;
        let inner = lock(&self.inner);
        let plugins = inner.entries.values().map(|e| status_of(e, cap)).collect();
        let broken = inner
            .broken
            .iter()
            .map(|(p, w)| (p.clone(), w.clone()))
            .collect();
        (plugins, broken)
    }

    /// Capabilities `name` declares, or `None` if nobody serves it.
    pub fn capabilities(&self, name: &str) -> Option<Capabilities> {
        self.serving_report(name, |r| r.capabilities)
    }

    /// The plugin-api version `name`'s library was built against.
    pub fn plugin_api(&self, name: &str) -> Option<String> {
        self.serving_report(name, |r| r.api_version.clone())
    }

    /// `what` of the library that serves `name`'s requests now: the loaded deployment's while
    /// there is one (a reload's new files may add what it lacks, and may never load), else the
    /// files a load would start.
    fn serving_report<T>(
        &self,
        name: &str,
        what: impl Fn(&crate::probe::LibraryReport) -> T,
    ) -> Option<T> {
        let inner = lock(&self.inner);
        let entry = inner.entries.get(name)?;
        Some(match &entry.slot {
            Slot::Loaded(d) => what(d.report.as_ref().unwrap_or(&entry.found.report)),
            _ => what(&entry.found.report),
        })
    }

    /// `name`'s deployment when it is loaded, without taking a place of its queue.
    pub fn loaded(&self, name: &str) -> Option<Arc<Deployment>> {
        match &lock(&self.inner).entries.get(name)?.slot {
            Slot::Loaded(d) => Some(d.clone()),
            _ => None,
        }
    }

    /// The names of the models served, loaded or not, in name order.
    pub fn names(&self) -> Vec<String> {
        lock(&self.inner).entries.keys().cloned().collect()
    }
}

/// Places of a request waiting for its model to load, counted while it waits.
struct Waiting(Arc<std::sync::atomic::AtomicUsize>, usize);

impl Waiting {
    fn count(counter: Arc<std::sync::atomic::AtomicUsize>, places: usize) -> Self {
        counter.fetch_add(places, std::sync::atomic::Ordering::AcqRel);
        Self(counter, places)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0
            .fetch_sub(self.1, std::sync::atomic::Ordering::AcqRel);
    }
}
