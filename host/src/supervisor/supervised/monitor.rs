//! The watch over a supervised plugin's worker: it is replaced with exponential backoff when it
//! dies or stops answering health checks, and the plugin quarantined when it keeps crashing.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pio_plugin_api::wire::ModelConfig;
use tokio::sync::watch;

use super::{lock, start_and_load, RestartPolicy, Shared, State, NOT_RESTARTED};
use crate::supervisor::handle::{Worker, WorkerSpec};

/// Watches the current worker; replaces it when it dies or stops answering.
pub(super) async fn monitor(
    spec: WorkerSpec,
    config: ModelConfig,
    policies: watch::Receiver<RestartPolicy>,
    shared: Arc<Mutex<Shared>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut crashes: VecDeque<Instant> = VecDeque::new();
    let mut backoff = policies.borrow().initial_backoff;
    loop {
        let Some(worker) = lock(&shared).worker.clone() else {
            return;
        };
        let reason = tokio::select! {
            why = worker.exited() => why,
            why = watch_health(&worker, &policies, &shared) => {
                worker.kill_because(why);
                worker.exited().await
            }
            _ = stopped(&mut stop) => return,
        };
        if *stop.borrow() {
            return;
        }
        // As a reload left it: the crash window and count, the backoff's bounds.
        let policy = policies.borrow().clone();
        // Its cgroup stays until the last handle goes: its final counters are still there.
        let last = worker.stats();
        record(&mut crashes, Instant::now(), policy.window);
        backoff = first_wait(backoff, crashes.len(), &policy);
        {
            let mut s = lock(&shared);
            if s.stopped() {
                // `stop` took this worker and counts it out itself.
                return;
            }
            s.worker = None;
            s.count_out(last.as_ref());
            s.last_error = Some(reason.clone());
            if s.draining() {
                tracing::warn!(plugin = %spec.name, "{reason}; {NOT_RESTARTED}");
                return;
            }
            if crashes.len() > policy.max_crashes {
                let why = format!(
                    "{} failures within {} s, the last: {reason}",
                    crashes.len(),
                    policy.window.as_secs()
                );
                quarantine(&mut s, &spec.name, why);
                return;
            }
            s.state = State::Restarting;
        }
        tracing::warn!(plugin = %spec.name, "{reason}; restarting in {backoff:?}");
        let restart = Restart {
            spec: &spec,
            config: &config,
            policy: &policy,
            shared: &shared,
        };
        if !restart
            .until_up(&mut crashes, &mut backoff, &mut stop)
            .await
        {
            return;
        }
    }
}

/// The wait before restarting after a crash, `crashes` of them within the policy's window (this
/// one included), `doubled` the wait the last restarts reached: a crash with none before it in
/// the window starts again from the initial wait, so a plugin that crashed a few times over days
/// is not kept down for the longest wait each time; otherwise the doubled wait, within the
/// policy's bounds (a reload may have moved them).
fn first_wait(doubled: Duration, crashes: usize, policy: &RestartPolicy) -> Duration {
    if crashes <= 1 {
        return policy.initial_backoff;
    }
    doubled.clamp(
        policy.initial_backoff,
        policy.max_backoff.max(policy.initial_backoff),
    )
}

/// Takes the plugin out of service for `why`, saying so in the log: an operator reading it is
/// the one who can end it.
fn quarantine(s: &mut Shared, name: &str, why: String) {
    tracing::error!(
        plugin = %name,
        "quarantined, requests get 503 until an operator loads it again (fix the plugin, then POST /v1/plugins/{name}/load): {why}"
    );
    s.state = State::Quarantined(format!(
        "{why}; fix the plugin, then load it again (POST /v1/plugins/{name}/load)"
    ));
}

/// What restarting a plugin's worker takes.
struct Restart<'a> {
    spec: &'a WorkerSpec,
    config: &'a ModelConfig,
    policy: &'a RestartPolicy,
    shared: &'a Arc<Mutex<Shared>>,
}

impl Restart<'_> {
    /// Starts a new worker after each backoff (doubling up to the policy's most) until one
    /// loads; false when monitoring ends instead: the plugin was stopped meanwhile (a start
    /// under way is abandoned, its worker killed), or too many starts failed and it is
    /// quarantined.
    async fn until_up(
        &self,
        crashes: &mut VecDeque<Instant>,
        backoff: &mut Duration,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        // Failed starts in a row: a start that fails slower than the window lets few in, and
        // would otherwise be tried for good.
        let mut in_a_row = 0;
        loop {
            let started = tokio::select! {
                started = async {
                    tokio::time::sleep(*backoff).await;
                    start_and_load(self.spec, self.config, self.policy).await
                } => started,
                _ = stopped(stop) => return false,
            };
            *backoff = (*backoff * 2).min(self.policy.max_backoff);
            match started {
                Ok((worker, _)) => {
                    let mut s = lock(self.shared);
                    if s.state == State::Stopped {
                        worker.kill();
                        return false;
                    }
                    s.worker = Some(Arc::new(worker));
                    s.state = State::Ready;
                    s.restarts += 1;
                    return true;
                }
                Err((e, last)) => {
                    // Windowed here too: failed starts as slow as `load_timeout` long ago
                    // counted towards a quarantine they were outside of.
                    record(crashes, Instant::now(), self.policy.window);
                    in_a_row += 1;
                    let mut s = lock(self.shared);
                    s.retired.add(last.as_ref());
                    s.last_error = Some(e.to_string());
                    if crashes.len() > self.policy.max_crashes || in_a_row > self.policy.max_crashes
                    {
                        quarantine(&mut s, &self.spec.name, format!("restarting failed: {e}"));
                        return false;
                    }
                    tracing::warn!(plugin = %self.spec.name, "restarting failed: {e}; trying again in {backoff:?}");
                }
            }
        }
    }
}

/// Records a failure at `now` among `crashes`, keeping those within `window` of it.
fn record(crashes: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    crashes.push_back(now);
    while crashes
        .front()
        .is_some_and(|t| now.duration_since(*t) > window)
    {
        crashes.pop_front();
    }
}

/// Resolves once the plugin is stopped on purpose.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Resolves only when the worker fails a health check; yields why. Each check also asks, on the
/// side, for the engine's figures, so the gauges are live rather than as of the last finished
/// request (at most one ask at a time: a slow answer must not delay the next check).
async fn watch_health(
    worker: &Arc<Worker>,
    policies: &watch::Receiver<RestartPolicy>,
    shared: &Arc<Mutex<Shared>>,
) -> String {
    let asking = Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        // Read at each check: a reload's interval and deadline apply from the next one.
        let policy = policies.borrow().clone();
        tokio::time::sleep(policy.health_interval).await;
        if worker.ping(policy.health_deadline).await.is_err() {
            return format!(
                "was stopped: it did not answer a health check within {:?}",
                policy.health_deadline
            );
        }
        if !asking.swap(true, std::sync::atomic::Ordering::AcqRel) {
            let (worker, shared, asking) = (worker.clone(), shared.clone(), asking.clone());
            let deadline = policy.health_deadline;
            tokio::spawn(async move {
                if let Some(figures) = worker.engine_stats(deadline).await {
                    lock(&shared).keep_newest(&worker, figures);
                }
                asking.store(false, std::sync::atomic::Ordering::Release);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only failures within the window of the latest count: a failed start's too.
    #[test]
    fn failures_older_than_the_window_are_forgotten() {
        let mut crashes = VecDeque::new();
        let t0 = Instant::now();
        let window = Duration::from_secs(60);
        record(&mut crashes, t0, window);
        record(&mut crashes, t0 + Duration::from_secs(30), window);
        assert_eq!(crashes.len(), 2);
        record(&mut crashes, t0 + Duration::from_secs(100), window);
        assert_eq!(crashes.len(), 1, "both earlier ones are past the window");
    }

    #[test]
    fn a_lone_crash_waits_the_initial_backoff_and_a_run_of_them_the_doubled_one() {
        let policy = RestartPolicy::default();
        let (initial, most) = (policy.initial_backoff, policy.max_backoff);
        assert_eq!(
            first_wait(most, 1, &policy),
            initial,
            "none before it in the window"
        );
        assert_eq!(first_wait(4 * initial, 3, &policy), 4 * initial);
        assert_eq!(first_wait(10 * most, 3, &policy), most, "within the bounds");
        let reloaded = RestartPolicy {
            initial_backoff: Duration::from_secs(2),
            ..policy
        };
        assert_eq!(first_wait(initial, 2, &reloaded), Duration::from_secs(2));
    }
}
