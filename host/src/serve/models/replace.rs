//! Reloads: a running model's worker replaced by a fresh one (a changed plugin, `POST
//! .../reload`, an operator's load of a quarantined model), blue/green when the host has the
//! memory for two, else by recreating it.

use std::sync::Arc;

use super::loading::finished;
use super::memory::memory_available;
use super::Models;
use crate::config::ReloadStrategy;
use crate::serve::book::{lock, retire, take_deployment, LoadResult, Slot};
use crate::serve::deployment::{deploy, Deployment};
use crate::serve::error::ApiError;
use crate::serve::hotplug::Found;

/// How a blue/green reload's new worker ended.
enum Swap {
    /// In service; the slot it replaced (the old worker's, to drain).
    Done(Slot),
    /// Loaded but not kept (the daemon stops, or the old worker left the slot), and why.
    Refused(Box<Deployment>, String),
    /// Its load failed; the old worker keeps serving.
    Failed(ApiError),
}

/// How one reload goes.
enum Plan {
    /// Nothing loaded: a plain load.
    Load,
    /// Beside the running worker (the deployment it replaces).
    BlueGreen(Box<Found>, Arc<Deployment>),
    /// After it: the load under way.
    Recreate(tokio::sync::watch::Receiver<LoadResult>),
}

impl Models {
    /// Replaces `name`'s worker with a fresh one, blue/green or by recreating it as
    /// `server.reload_strategy` says (see [`side_by_side`]); a model not loaded is loaded. Not
    /// cancel-safe: dropped midway, it leaves a worker running; callers spawn it.
    pub async fn reload(self: &Arc<Self>, name: &str) -> Result<(), ApiError> {
        let strategy = self.config().server.reload_strategy;
        // Files read before the book's lock is taken, and only where they decide.
        let available = match strategy {
            ReloadStrategy::Auto => memory_available(),
            _ => None,
        };
        let plan = {
            let mut inner = lock(&self.inner);
            let entry = inner.entry_mut(name)?;
            match &entry.slot {
                Slot::Loaded(_) if entry.reloading => {
                    return Err(ApiError::unavailable(format!(
                        "plugin {name} is already reloading"
                    )))
                }
                Slot::Loaded(d) => {
                    let in_use = d.supervised.status().stats.and_then(|s| s.memory_bytes);
                    if side_by_side(strategy, available, in_use) {
                        entry.reloading = true;
                        Plan::BlueGreen(Box::new(entry.found.clone()), d.clone())
                    } else {
                        tracing::info!(
                            plugin = %name,
                            "reloading by recreating it (server.reload_strategy = {strategy}): the old worker drains and stops first{}",
                            why_recreate(strategy, available, in_use)
                        );
                        let old = take_deployment(&mut inner, name);
                        Plan::Recreate(self.begin_load_after(&mut inner, name, old))
                    }
                }
                _ => Plan::Load,
            }
        };
        match plan {
            Plan::Load => self.load(name).await,
            Plan::Recreate(loaded) => finished(loaded).await,
            Plan::BlueGreen(found, old) => self.blue_green(name, *found, old).await,
        }
    }

    /// The new worker loads and warms up while `old` serves; then traffic moves and `old`
    /// drains. The swap happens only if `old` still holds the slot: nothing else takes a model
    /// out while it reloads, and should that change, the new worker is not put back over it.
    async fn blue_green(
        self: &Arc<Self>,
        name: &str,
        found: Found,
        old: Arc<Deployment>,
    ) -> Result<(), ApiError> {
        let result = deploy(&self.setup, &self.config(), &found).await;
        let mut changed = false;
        let swapped = {
            let mut inner = lock(&self.inner);
            let stopping = self.stopping.load(std::sync::atomic::Ordering::Acquire);
            let entry = inner.entry_mut(name)?;
            entry.reloading = false;
            let replaced = matches!(&entry.slot, Slot::Loaded(d) if Arc::ptr_eq(d, &old));
            match result {
                Ok(new) if stopping => Swap::Refused(Box::new(new), "the daemon is stopping".to_string()),
                Ok(new) if !replaced => Swap::Refused(
                    Box::new(new),
                    format!("plugin {name} left its slot during the reload (unloaded or loaded anew); the new worker is stopped"),
                ),
                Ok(new) => {
                    // A SIGHUP during the load: the supervision in force now.
                    new.supervised.set_policy(self.config().restart_policy());
                    changed = entry.found.fingerprint != new.fingerprint;
                    entry.last_error = None;
                    let old = std::mem::replace(&mut entry.slot, Slot::Loaded(Arc::new(new)));
                    if let Slot::Loaded(d) = &old {
                        retire(entry, d);
                    }
                    Swap::Done(old)
                }
                Err(e) => {
                    tracing::error!(plugin = %name, "reload failed, the old version keeps serving: {}", e.message);
                    entry.last_error = Some(e.message.clone());
                    // Files changed while the failed version loaded (a fix pushed after a broken
                    // push): the rescan that saw them was refused as a reload was under way.
                    changed = entry.found.fingerprint != found.fingerprint;
                    Swap::Failed(e)
                }
            }
        };
        let old = match swapped {
            Swap::Done(old) => old,
            Swap::Refused(new, why) => {
                new.supervised.stop().await;
                return Err(ApiError::unavailable(why));
            }
            Swap::Failed(e) => {
                if changed && !self.stopping.load(std::sync::atomic::Ordering::Acquire) {
                    self.catch_up(name);
                }
                return Err(e);
            }
        };
        tracing::info!(plugin = %name, "reloaded; draining the old worker");
        if changed {
            self.catch_up(name);
        }
        if let Slot::Loaded(old) = old {
            self.drain_retired(name, old, self.drain_timeout()).await;
        }
        Ok(())
    }
}

impl Models {
    /// Reloads `name` once more: its files changed while it loaded or reloaded, which a rescan
    /// records but a load under way cannot take (it loads what it started with).
    pub(super) fn catch_up(self: &Arc<Self>, name: &str) {
        tracing::info!(plugin = %name, "its files changed while it loaded: reloading it again");
        self.spawn_reload(name);
    }

    /// Reloads `name` in a task of its own (see [`Self::reload`]), logging a refusal or failure.
    pub(super) fn spawn_reload(self: &Arc<Self>, name: &str) {
        let (this, name) = (self.clone(), name.to_string());
        tokio::spawn(async move {
            if let Err(e) = this.reload(&name).await {
                tracing::warn!(plugin = %name, "reload not done: {}", e.message);
            }
        });
    }
}

/// Whether a reload may load the new worker beside the running one: always for `blue-green`,
/// never for `recreate`; for `auto`, while the `available` memory (the host's, within a
/// container's limit: [`memory_available`]) holds what the running
/// worker uses (`in_use`, both bytes) and a quarter more. Unknown figures (no memory cgroup, no
/// `/proc/meminfo`) allow it, as before strategies existed.
pub(crate) fn side_by_side(
    strategy: ReloadStrategy,
    available: Option<u64>,
    in_use: Option<u64>,
) -> bool {
    match (strategy, available, in_use) {
        (ReloadStrategy::BlueGreen, ..) => true,
        (ReloadStrategy::Recreate, ..) => false,
        (ReloadStrategy::Auto, Some(available), Some(used)) => {
            available >= used.saturating_add(used / 4)
        }
        (ReloadStrategy::Auto, ..) => true,
    }
}

/// Why `auto` recreated, for the log ("" when the strategy said so).
fn why_recreate(strategy: ReloadStrategy, available: Option<u64>, in_use: Option<u64>) -> String {
    match (strategy, available, in_use) {
        (ReloadStrategy::Auto, Some(available), Some(used)) => format!(
            ": {} MiB are available (the host's, within its container's limit) and the running worker uses {} MiB (server.reload_strategy = \"blue-green\" loads beside it anyway)",
            available >> 20,
            used >> 20
        ),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forced strategies ignore the figures; `auto` loads beside the running worker only
    /// while the memory available holds its use and a quarter more, and when it cannot tell.
    #[test]
    fn auto_loads_beside_the_running_worker_only_with_room_for_it() {
        use ReloadStrategy::*;
        let gib = 1u64 << 30;
        for (available, in_use) in [(Some(64 * gib), Some(gib)), (Some(gib), Some(16 * gib))] {
            assert!(side_by_side(BlueGreen, available, in_use));
            assert!(!side_by_side(Recreate, available, in_use));
        }
        assert!(side_by_side(Auto, Some(20 * gib), Some(16 * gib)));
        assert!(!side_by_side(Auto, Some(19 * gib), Some(16 * gib)));
        assert!(!side_by_side(Auto, Some(8 * gib), Some(16 * gib)));
        assert!(side_by_side(Auto, None, Some(16 * gib)));
        assert!(side_by_side(Auto, Some(gib), None));
        let why = why_recreate(Auto, Some(8 * gib), Some(16 * gib));
        assert!(
            why.contains("8192 MiB are available") && why.contains("16384 MiB"),
            "{why}"
        );
        assert_eq!(why_recreate(Recreate, Some(gib), Some(gib)), "");
    }
}
