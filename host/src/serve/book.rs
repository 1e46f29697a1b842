//! The book of the models the daemon serves: each plugin found, where its deployment stands
//! (unloaded, loading, loaded), what failed and what it counted, and how a scan's result is
//! taken in. Plain data under `Models`' lock; the lifecycle that acts on it is in `models`.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::deployment::Deployment;
use super::error::ApiError;
use super::hotplug::Found;
use super::status::{Counted, PluginStatus};

pub(super) type LoadResult = Option<Result<(), ApiError>>;

/// How long after a failed load requests get its error instead of starting another load.
pub(super) const LOAD_RETRY: Duration = Duration::from_secs(10);

/// How long a preload waits after `failures` failed loads in a row before it is tried again.
pub(super) fn retry_backoff(failures: u32) -> Duration {
    let doubled = LOAD_RETRY.saturating_mul(1 << failures.saturating_sub(1).min(5));
    doubled.min(Duration::from_secs(300))
}

/// Where a model's deployment stands.
pub(super) enum Slot {
    /// None running.
    Unloaded,
    /// Loading; the receiver says how it ended.
    Loading(watch::Receiver<LoadResult>),
    /// Serving.
    Loaded(Arc<Deployment>),
}

/// One plugin the daemon knows, and what became of it.
pub(super) struct Entry {
    pub(super) found: Found,
    pub(super) slot: Slot,
    pub(super) last_error: Option<String>,
    /// When loading last failed: on-demand loads wait out [`LOAD_RETRY`] after it.
    pub(super) failed_at: Option<Instant>,
    /// Loads failed in a row (a preload is tried again after a backoff that grows with them).
    pub(super) failures: u32,
    pub(super) reloading: bool,
    /// Unloaded on purpose since it last loaded (see `PluginStatus::parked`); kept while it
    /// loads again, until that load succeeds.
    pub(super) parked: bool,
    /// Preloaded, but not loaded at start because `max_loaded_models` was full.
    pub(super) over_cap: bool,
    /// The counters of deployments gone by (see `PluginStatus::earlier`).
    pub(super) earlier: Counted,
    /// Deployments taken out (a reload's old one, an unload's) that still drain: their counters
    /// are counted live, and into `earlier` once they stopped (see [`drained`]).
    pub(super) draining: Vec<Arc<Deployment>>,
    /// Loading with its place under `max_loaded_models` secured (so two loads waiting for room
    /// never wait for each other, and never both take the last place).
    pub(super) holds_room: bool,
    /// While the loaded version's own files fail their checks: the older version found beside
    /// it, which a fresh load (after an unload, say) serves instead of the broken files.
    pub(super) fallback: Option<Found>,
    /// Places of requests waiting for it to load (counted in its queue depth).
    pub(super) waiting: Arc<std::sync::atomic::AtomicUsize>,
}

impl Entry {
    /// Whether it counts against `max_loaded_models`: loading or loaded, but not quarantined
    /// (no worker runs, nothing is held; the quarantine waits for an operator without keeping
    /// every other model out).
    pub(super) fn holds_a_place(&self) -> bool {
        match &self.slot {
            Slot::Loaded(d) => !d.quarantined(),
            Slot::Loading(_) => true,
            Slot::Unloaded => false,
        }
    }

    /// Loading, but still waiting for its place under a cap of `cap` loaded models (0: none),
    /// every loaded model busy.
    pub(super) fn waiting_for_room(&self, cap: usize) -> bool {
        cap > 0 && matches!(self.slot, Slot::Loading(_)) && !self.holds_room
    }

    /// Before a fresh load: the older version to serve instead of the loaded one's broken
    /// files, once nothing of that one runs any more.
    pub(super) fn fall_back(&mut self) {
        if let Some(older) = self.fallback.take() {
            tracing::warn!(
                plugin = %older.manifest.name,
                "version {} fails its checks: loading {} found beside it",
                self.found.manifest.version,
                older.manifest.version
            );
            self.found = older;
        }
    }

    /// `found`, just found: unloaded, nothing failed or counted yet.
    fn new(found: Found) -> Self {
        Self {
            found,
            slot: Slot::Unloaded,
            last_error: None,
            failed_at: None,
            failures: 0,
            reloading: false,
            parked: false,
            over_cap: false,
            earlier: Counted::default(),
            draining: Vec::new(),
            holds_room: false,
            fallback: None,
            waiting: Arc::default(),
        }
    }
}

/// Every plugin known, by name, and the manifests that failed their checks.
#[derive(Default)]
pub(super) struct Inner {
    pub(super) entries: BTreeMap<String, Entry>,
    /// Manifests that failed their checks, with why.
    pub(super) broken: BTreeMap<PathBuf, String>,
}

/// The book, whatever a panic left it as.
pub(super) fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// Models that may still load beside those loaded or loading, under a cap of `cap` (0: no
    /// cap).
    pub(super) fn free_places(&self, cap: usize) -> usize {
        let held = (self.entries.values())
            .filter(|e| e.holds_a_place())
            .count();
        if cap == 0 {
            usize::MAX
        } else {
            cap.saturating_sub(held)
        }
    }

    /// `name`'s entry, or the API's 404.
    pub(super) fn entry(&self, name: &str) -> Result<&Entry, ApiError> {
        self.entries
            .get(name)
            .ok_or_else(|| ApiError::unknown_model(name))
    }

    /// `name`'s entry to change, or the API's 404.
    pub(super) fn entry_mut(&mut self, name: &str) -> Result<&mut Entry, ApiError> {
        self.entries
            .get_mut(name)
            .ok_or_else(|| ApiError::unknown_model(name))
    }
}

/// What a scan changes: plugins to load, to reload blue/green, and gone ones to drain.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Changes {
    pub(super) load: Vec<String>,
    pub(super) reload: Vec<String>,
    pub(super) gone: Vec<String>,
}

impl Inner {
    /// Takes a scan's result in: new plugins added (to load when `preload` says so), changed
    /// ones updated (to reload when loaded), the broken recorded (a broken replacement leaves
    /// the version being served alone); what no longer appears is gone.
    pub(super) fn merge(
        &mut self,
        found: Vec<Found>,
        broken: Vec<(PathBuf, String)>,
        preload: impl Fn(&str) -> bool,
    ) -> Changes {
        let mut changes = Changes::default();
        let (mut seen, held) = self.take_broken(broken);
        for f in found {
            let name = f.manifest.name.clone();
            seen.insert(name.clone());
            match self.entries.get_mut(&name) {
                None => {
                    tracing::info!(plugin = %name, version = %f.manifest.version, "plugin found");
                    if preload(&name) {
                        changes.load.push(name.clone());
                    }
                    self.entries.insert(name, Entry::new(f));
                }
                Some(e)
                    if held.contains(&name) && f.manifest.version < e.found.manifest.version =>
                {
                    tracing::warn!(
                        plugin = %name,
                        "version {} goes on serving: its files fail their checks (see `errors` in /v1/plugins); the older {} found beside it is not switched to while it runs; fix the files, or remove its manifest to serve the older one",
                        e.found.manifest.version,
                        f.manifest.version
                    );
                    e.fallback = Some(f);
                }
                Some(e) if e.found.fingerprint != f.fingerprint => {
                    tracing::info!(plugin = %name, version = %f.manifest.version, "plugin changed");
                    e.found = f;
                    if matches!(e.slot, Slot::Loaded(_)) {
                        changes.reload.push(name);
                    } else if matches!(e.slot, Slot::Unloaded) && e.failed_at.take().is_some() {
                        // A fix of what failed to load is tried at once, not after the backoff.
                        e.failures = 0;
                        if preload(&name) {
                            changes.load.push(name);
                        }
                    }
                }
                // The same files, perhaps under new names (a manifest renamed, a library
                // moved): later loads and rechecks go where they are now.
                Some(e) => e.found = f,
            }
        }
        changes.gone = self
            .entries
            .keys()
            .filter(|n| !seen.contains(*n))
            .cloned()
            .collect();
        changes
    }

    /// Records a scan's `broken` manifests: the names whose entries they are (still known,
    /// not gone), and of those the loaded ones, whose version goes on serving (its worker runs
    /// a private copy of the library) rather than an older one left superseded taking its
    /// place unasked.
    fn take_broken(
        &mut self,
        broken: Vec<(PathBuf, String)>,
    ) -> (HashSet<String>, HashSet<String>) {
        let (mut seen, mut held) = (HashSet::new(), HashSet::new());
        for e in self.entries.values_mut() {
            e.fallback = None;
        }
        for (path, why) in newly_broken(&self.broken, &broken) {
            tracing::warn!(manifest = %path.display(), "plugin not served: {why}");
        }
        for (path, _) in &broken {
            let Some((name, e)) = self
                .entries
                .iter()
                .find(|(_, e)| &e.found.manifest_path == path)
            else {
                continue;
            };
            seen.insert(name.clone());
            if matches!(e.slot, Slot::Loaded(_)) {
                held.insert(name.clone());
            }
        }
        self.broken = broken.into_iter().collect();
        (seen, held)
    }
}

/// The failures in `now` not already reported, as they are, in `before`: a rescan finds a broken
/// manifest again every few seconds, and the log says so once (and again when why changes).
fn newly_broken<'a>(
    before: &BTreeMap<PathBuf, String>,
    now: &'a [(PathBuf, String)],
) -> Vec<&'a (PathBuf, String)> {
    now.iter()
        .filter(|(path, why)| before.get(path) != Some(why))
        .collect()
}

/// `e`'s status as `/v1/plugins` reports it, under a cap of `cap` loaded models (0: none).
pub(super) fn status_of(e: &Entry, cap: usize) -> PluginStatus {
    let base = PluginStatus::new(&e.found, e.last_error.clone(), e.reloading);
    let base = PluginStatus {
        parked: e.parked,
        over_cap: e.over_cap,
        earlier: (e.draining.iter()).fold(e.earlier, |sum, d| sum.plus(&counters_of(e, d))),
        draining: e.draining.len(),
        ..base
    };
    let mut status = match &e.slot {
        Slot::Unloaded if e.failed_at.is_some() => base.failed(),
        Slot::Unloaded => base,
        Slot::Loading(_) => PluginStatus {
            waiting_for_room: e.waiting_for_room(cap),
            ..base.loading()
        },
        Slot::Loaded(d) => base.serving(d),
    };
    // Every request the model has taken: those waiting for its load (an autoscaler reading
    // the queue saw none while a load on demand took minutes) and those a reload's or an
    // unload's old deployment still runs.
    let waiting = e.waiting.load(std::sync::atomic::Ordering::Acquire);
    let draining: usize = e.draining.iter().map(|d| d.leases()).sum();
    status.requests += waiting + draining;
    status
}

/// Takes `name`'s deployment to unload it on purpose, marking it parked.
pub(super) fn park(inner: &mut Inner, name: &str) -> Option<Arc<Deployment>> {
    let taken = take_deployment(inner, name)?;
    if let Some(entry) = inner.entries.get_mut(name) {
        entry.parked = true;
    }
    Some(taken)
}

/// `d`'s counters, as a deployment of `entry`.
fn counters_of(entry: &Entry, d: &Deployment) -> PluginStatus {
    PluginStatus::new(&entry.found, None, false).serving(d)
}

/// Keeps `d`, as it leaves `entry`'s slot, among the deployments that drain (its counters go on
/// counting until it stopped), and marks its worker draining.
pub(super) fn retire(entry: &mut Entry, d: &Arc<Deployment>) {
    // Marked here, with the swap, not when the drain task first runs: a worker that dies in
    // between would otherwise be restarted, loading a model only to stop it.
    d.supervised.begin_drain();
    entry.draining.push(d.clone());
}

/// Counts `d`, drained and stopped, into `name`'s earlier counters (nothing when `name` is gone
/// from the book, its counters with it).
pub(super) fn drained(inner: &mut Inner, name: &str, d: &Arc<Deployment>) {
    let Some(entry) = inner.entries.get_mut(name) else {
        return;
    };
    if let Some(at) = entry.draining.iter().position(|x| Arc::ptr_eq(x, d)) {
        entry.draining.swap_remove(at);
        entry.earlier = entry.earlier.plus(&counters_of(entry, d));
    }
}

/// Takes `name`'s deployment out of the book, its counters kept.
pub(super) fn take_deployment(inner: &mut Inner, name: &str) -> Option<Arc<Deployment>> {
    let entry = inner.entries.get_mut(name)?;
    match std::mem::replace(&mut entry.slot, Slot::Unloaded) {
        Slot::Loaded(d) => {
            retire(entry, &d);
            Some(d)
        }
        other => {
            entry.slot = other;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest that stays broken is reported once, and again when why changes.
    #[test]
    fn a_broken_manifest_is_reported_once_per_reason() {
        let bad = |why: &str| (PathBuf::from("/p/x.toml"), why.to_string());
        let now = [bad("no library")];
        assert_eq!(newly_broken(&BTreeMap::new(), &now).len(), 1);
        let before: BTreeMap<_, _> = now.iter().cloned().collect();
        assert!(
            newly_broken(&before, &now).is_empty(),
            "the same failure again"
        );
        assert_eq!(newly_broken(&before, &[bad("bad sha256")]).len(), 1);
    }

    /// A failed preload is tried again after 10 s, then after twice as long each time, up to
    /// five minutes.
    #[test]
    fn the_retry_backoff_doubles_up_to_five_minutes() {
        let secs: Vec<u64> = (1..=8).map(|n| retry_backoff(n).as_secs()).collect();
        assert_eq!(secs, [10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(retry_backoff(0), LOAD_RETRY);
    }
}
