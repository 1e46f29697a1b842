//! Loading and unloading: on demand and on command, the cap on loaded models, idle unloading,
//! retries of failed preloads, and the stop of every deployment.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::Models;
use crate::serve::book::{
    drained, lock, park, retry_backoff, take_deployment, Inner, LoadResult, Slot,
};
use crate::serve::deployment::{deploy, Deployment};
use crate::serve::error::ApiError;

impl Models {
    /// Loads `name` unless it is loaded; waits until it is.
    pub async fn load(self: &Arc<Self>, name: &str) -> Result<(), ApiError> {
        let wait = {
            let mut inner = lock(&self.inner);
            let entry = inner.entry(name)?;
            match &entry.slot {
                // An operator's load is how a quarantine ends: a fresh worker, blue/green.
                Slot::Loaded(d) if d.quarantined() => None,
                Slot::Loaded(_) => return Ok(()),
                Slot::Loading(rx) => Some(rx.clone()),
                Slot::Unloaded => Some(self.begin_load(&mut inner, name)),
            }
        };
        match wait {
            Some(wait) => finished(wait).await,
            None => {
                tracing::info!(plugin = %name, "loading afresh: it was quarantined");
                // A quarantine takes no place under `max_loaded_models`: its fresh worker needs
                // one, made as for any load (another model may have taken it meanwhile).
                self.make_room(name).await?;
                // Boxed: a reload of a model not loaded loads it.
                Box::pin(self.reload(name)).await
            }
        }
    }

    pub(super) fn begin_load(
        self: &Arc<Self>,
        inner: &mut Inner,
        name: &str,
    ) -> watch::Receiver<LoadResult> {
        self.begin_load_after(inner, name, None)
    }

    /// [`Self::begin_load`], once `before` (the deployment a recreating reload replaces, taken
    /// out of the slot) has drained and stopped.
    pub(super) fn begin_load_after(
        self: &Arc<Self>,
        inner: &mut Inner,
        name: &str,
        before: Option<Arc<Deployment>>,
    ) -> watch::Receiver<LoadResult> {
        let (tx, rx) = watch::channel(None);
        let others: Vec<String> = inner.entries.keys().cloned().collect();
        if let Some(entry) = inner.entries.get_mut(name) {
            entry.slot = Slot::Loading(rx.clone());
            entry.holds_room = false;
            entry.fall_back();
            let found = entry.found.clone();
            let this = self.clone();
            let mine = rx.clone();
            tokio::spawn(async move {
                if let Some(old) = before {
                    let name = &found.manifest.name;
                    let cut = this.drain_retired(name, old, this.drain_timeout()).await;
                    warn_cut(name, cut);
                }
                // No room (every loaded model busy past the wait) is not the plugin's failure:
                // the next request tries again at once.
                let result = match this.make_room(&found.manifest.name).await {
                    Ok(()) => match this.uid_clash(&found.manifest.name, others).await {
                        Err(e) => Err((e, true)),
                        Ok(()) => (deploy(&this.setup, &this.config(), &found).await)
                            .map_err(|e| (e, true)),
                    },
                    Err(e) => Err((e, false)),
                };
                let mut changed = false;
                let (stopping, readded, outcome) = {
                    let mut inner = lock(&this.inner);
                    // Read under the lock `stop_all` sets it under: a load that ends after it is
                    // stopped, never left behind.
                    let stopping = this.stopping.load(std::sync::atomic::Ordering::Acquire);
                    let present = inner.entries.contains_key(&found.manifest.name);
                    // The entry as this load left it, if it is still this load's: a plugin
                    // removed and added again while it loaded has a new entry and a load of
                    // its own, which this one must not overwrite (two workers, one dropped
                    // undrained).
                    let entry = inner
                        .entries
                        .get_mut(&found.manifest.name)
                        .filter(|e| matches!(&e.slot, Slot::Loading(r) if r.same_channel(&mine)));
                    let readded = present && entry.is_none();
                    let outcome = match (entry, result) {
                        (Some(entry), Ok(d)) if !stopping => {
                            entry.holds_room = false;
                            // A reload while it loaded: the supervision in force now.
                            d.supervised.set_policy(this.config().restart_policy());
                            changed = entry.found.fingerprint != d.fingerprint;
                            entry.slot = Slot::Loaded(Arc::new(d));
                            entry.parked = false;
                            entry.over_cap = false;
                            entry.last_error = None;
                            entry.failed_at = None;
                            entry.failures = 0;
                            Ok(None)
                        }
                        (Some(entry), Err((e, failed))) => {
                            entry.holds_room = false;
                            entry.slot = Slot::Unloaded;
                            if failed {
                                entry.last_error = Some(e.message.clone());
                                entry.failed_at = Some(Instant::now());
                                entry.failures = entry.failures.saturating_add(1);
                            }
                            Err(e)
                        }
                        // Removed while it loaded, or the daemon is stopping: nothing keeps it.
                        (entry, Ok(d)) => {
                            if let Some(entry) = entry {
                                entry.holds_room = false;
                                entry.slot = Slot::Unloaded;
                            }
                            Ok(Some(d))
                        }
                        (None, Err((e, _))) => Err(e),
                    };
                    (stopping, readded, outcome)
                };
                let sent = match outcome {
                    // The plugin was added again meanwhile: its waiters follow the new entry
                    // (a `Ok` sends `acquire` round again), not a 404.
                    Ok(Some(orphan)) if readded && !stopping => {
                        orphan.supervised.stop().await;
                        Ok(())
                    }
                    Ok(Some(orphan)) => {
                        orphan.supervised.stop().await;
                        Err(match stopping {
                            true => ApiError::unavailable("the daemon is stopping".to_string()),
                            false => ApiError::unknown_model(&found.manifest.name),
                        })
                    }
                    Ok(None) => {
                        tracing::info!(plugin = %found.manifest.name, "model loaded");
                        if changed {
                            this.catch_up(&found.manifest.name);
                        }
                        Ok(())
                    }
                    Err(e) => {
                        tracing::error!(plugin = %found.manifest.name, "loading failed: {}", e.message);
                        Err(e)
                    }
                };
                let _ = tx.send(Some(sent));
            });
        }
        rx
    }

    /// Unloads the least recently used idle model when loading another would pass the cap;
    /// while every loaded model is busy, waits (up to `load_wait_secs`) for one to go idle.
    async fn make_room(&self, loading: &str) -> Result<(), ApiError> {
        let server = self.config().server.clone();
        let deadline = Instant::now() + Duration::from_secs(server.load_wait_secs);
        loop {
            match self.room(loading, server.max_loaded_models) {
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("{}", e.message);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
                Ok(Some((name, victim))) => {
                    self.drain_retired(&name, victim, self.drain_timeout())
                        .await;
                    return Ok(());
                }
                Ok(None) => return Ok(()),
            }
        }
    }

    /// Room for `loading` under `cap`: none needed (`None`), the idle model taken out to make
    /// it, or an error when every loaded model is busy.
    fn room(
        &self,
        loading: &str,
        cap: usize,
    ) -> Result<Option<(String, Arc<Deployment>)>, ApiError> {
        if cap == 0 {
            return Ok(None);
        }
        let mut inner = lock(&self.inner);
        let busy = (inner.entries.iter())
            .filter(|(n, _)| n.as_str() != loading)
            .filter(|(_, e)| match e.slot {
                Slot::Loading(_) => e.holds_room,
                _ => e.holds_a_place(),
            })
            .count();
        let take_place = |inner: &mut Inner| {
            if let Some(entry) = inner.entries.get_mut(loading) {
                entry.holds_room = true;
            }
        };
        if busy < cap {
            take_place(&mut inner);
            return Ok(None);
        }
        let lru = inner
            .entries
            .iter()
            .filter_map(|(n, e)| match &e.slot {
                // A model reloading is not idle: its new worker is on the way.
                Slot::Loaded(d) if !e.reloading => d.idle_for().map(|idle| (idle, n.clone())),
                _ => None,
            })
            .max();
        let Some((_, name)) = lru else {
            return Err(ApiError::unavailable(format!(
                "{busy} models are loaded (server.max_loaded_models = {cap}) and all are busy; retry later"
            )));
        };
        tracing::info!(plugin = %name, "unloading the least recently used model to make room for {loading}");
        let victim = park(&mut inner, &name);
        take_place(&mut inner);
        Ok(victim.map(|d| (name, d)))
    }

    /// Refuses to start `name` when another plugin served here has its uid (two names hashing
    /// alike in `sandbox.worker_uids`): either could signal, trace and write for the other.
    /// The user database is asked of each uid (NSS: LDAP can take seconds), so off the runtime's
    /// threads.
    async fn uid_clash(&self, name: &str, others: Vec<String>) -> Result<(), ApiError> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(());
        }
        let users = self.setup.policy.users;
        let mine = name.to_string();
        let found = tokio::task::spawn_blocking(move || {
            let other = users.clash(&mine, others.iter().map(String::as_str))?;
            Some((other.to_string(), users.uid_for(&mine).unwrap_or_default()))
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
        match found {
            None => Ok(()),
            Some((other, uid)) => Err(ApiError::conflict(format!(
                "plugins {name} and {other} would run as one uid ({uid}): their names hash alike in sandbox.worker_uids; set worker_uids to another range (one uid shorter gives every plugin another uid) and restart"
            ))),
        }
    }

    /// Unloads `name`, letting its requests finish (up to the drain timeout). Not cancel-safe:
    /// dropped during the drain, it leaves the worker running; callers spawn it or run it to
    /// its end.
    pub async fn unload(&self, name: &str) -> Result<(), ApiError> {
        self.unload_if(name, |_| true).await
    }

    /// [`Self::unload`] when `still`, asked under the book's lock, says so of the deployment
    /// (`Ok` and nothing done otherwise): for a decision taken earlier, such as idleness.
    async fn unload_if(
        &self,
        name: &str,
        still: impl FnOnce(&Deployment) -> bool,
    ) -> Result<(), ApiError> {
        let taken = {
            let mut inner = lock(&self.inner);
            let entry = inner.entry(name)?;
            if matches!(entry.slot, Slot::Loading(_)) {
                return Err(ApiError::unavailable(format!(
                    "plugin {name} is loading; unload it once it has loaded"
                )));
            }
            if entry.reloading {
                return Err(ApiError::unavailable(format!(
                    "plugin {name} is reloading; unload it once it has reloaded"
                )));
            }
            if matches!(&entry.slot, Slot::Loaded(d) if !still(d)) {
                return Ok(());
            }
            if matches!(entry.slot, Slot::Unloaded) {
                // An operator's unload of a model that failed to load: no more tries of its own.
                let entry = inner.entry_mut(name)?;
                entry.parked = true;
                entry.failed_at = None;
                entry.failures = 0;
            }
            park(&mut inner, name)
        };
        if let Some(d) = taken {
            let cut = self.drain_retired(name, d, self.drain_timeout()).await;
            warn_cut(name, cut);
            tracing::info!(plugin = %name, "model unloaded");
        }
        Ok(())
    }

    /// Drains `d`, taken out of `name`'s slot, for at most `deadline`, stops it, and counts it
    /// into `name`'s earlier counters. Returns how many requests the deadline cut off.
    pub(super) async fn drain_retired(
        &self,
        name: &str,
        d: Arc<Deployment>,
        deadline: Duration,
    ) -> usize {
        let cut = d.drain_and_stop(deadline).await;
        drained(&mut lock(&self.inner), name, &d);
        cut
    }

    /// Drains (for at most `grace`) and stops every model (shutdown).
    pub async fn stop_all(&self, grace: Duration) {
        let all: Vec<_> = {
            let mut inner = lock(&self.inner);
            // Under the lock a finishing load reads it under (see `begin_load`).
            self.stopping
                .store(true, std::sync::atomic::Ordering::Release);
            let names: Vec<String> = inner.entries.keys().cloned().collect();
            names
                .iter()
                .filter_map(|n| take_deployment(&mut inner, n))
                .collect()
        };
        futures_util::future::join_all(all.iter().map(|d| d.drain_and_stop(grace))).await;
    }

    /// Loads again each preloaded model whose last load failed, once its backoff passed
    /// ([`LOAD_RETRY`] doubling with each failure in a row, up to 5 minutes): a replica kept out
    /// of rotation by it gets no request that would load it on demand (a model folder that
    /// arrives late, a GPU that frees up). Not while the daemon stops, and not at the cost of a
    /// loaded model when `max_loaded_models` is reached.
    pub fn retry_failed_preloads(self: &Arc<Self>) {
        if self.stopping.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let config = self.config();
        let mut inner = lock(&self.inner);
        // Retries take free places only: making room would unload a model that works.
        let room = inner.free_places(config.server.max_loaded_models);
        let due: Vec<String> = inner
            .entries
            .iter()
            .filter(|(name, e)| {
                let backoff = retry_backoff(e.failures);
                matches!(e.slot, Slot::Unloaded)
                    && !e.parked
                    && !e.over_cap
                    && config.server.preloads(name)
                    && e.failed_at.is_some_and(|t| t.elapsed() >= backoff)
            })
            .map(|(n, _)| n.clone())
            .take(room)
            .collect();
        for name in due {
            tracing::info!(plugin = %name, "loading again: its last load failed");
            self.begin_load(&mut inner, &name);
        }
    }

    /// Unloads models idle longer than `keep_alive`.
    pub async fn unload_idle(&self, keep_alive: Duration) {
        let idle: Vec<String> = {
            let inner = lock(&self.inner);
            inner
                .entries
                .iter()
                .filter(|(_, e)| matches!(&e.slot, Slot::Loaded(d) if !e.reloading && is_idle(d, keep_alive)))
                .map(|(n, _)| n.clone())
                .collect()
        };
        for name in idle {
            // Asked again under the lock: an earlier model's drain may have let a request in.
            let idle = |d: &Deployment| {
                let idle = is_idle(d, keep_alive);
                if idle {
                    tracing::info!(plugin = %name, "unloading after {} s idle (server.keep_alive_secs)", keep_alive.as_secs());
                }
                idle
            };
            let _ = self.unload_if(&name, idle).await;
        }
    }
}

/// Logs the `cut` requests of `name` a drain's deadline cut off, if any.
fn warn_cut(name: &str, cut: usize) {
    if cut > 0 {
        tracing::warn!(plugin = %name, "{cut} requests were still running at the drain deadline");
    }
}

/// Waits for a load to end: its result.
pub(super) async fn finished(mut rx: watch::Receiver<LoadResult>) -> Result<(), ApiError> {
    match rx.wait_for(Option::is_some).await {
        Ok(v) => v.clone().unwrap_or(Ok(())),
        Err(_) => Err(ApiError::internal("the load was abandoned")),
    }
}

/// Whether `d` has served nothing for `keep_alive`.
fn is_idle(d: &Deployment, keep_alive: Duration) -> bool {
    d.idle_for().is_some_and(|t| t >= keep_alive)
}
