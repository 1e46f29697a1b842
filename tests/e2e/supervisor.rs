//! Supervision with real worker processes (through the host library; the daemon will sit on
//! top of the same API): crashes fail the requests in flight and restart the worker, repeated
//! crashes quarantine the plugin, stuck requests and frozen workers are replaced, and a
//! misbehaving plugin never disturbs another.

use std::time::Duration;

use pio_host::fault::Fault;
use pio_host::sandbox::{self, HostSupport, Policy, ResolvedLimits, Tier};
use pio_host::supervisor::{Event, RestartPolicy, State, Supervised, Worker, WorkerSpec};
use pio_plugin_api::wire::{InferRequest, ModelConfig, ModelInfo, Prompt};

use crate::support::*;

fn available() -> bool {
    let host = HostSupport::detect();
    let ok = host.root && host.cgroups.is_some();
    if !ok {
        eprintln!("skipped: needs root and a writable cgroup hierarchy (as in CI)");
    }
    ok
}

fn spec(name: &str, crate_name: &str) -> WorkerSpec {
    let limits = ResolvedLimits {
        memory_bytes: Some(128 << 20),
        pids: Some(32),
        ..ResolvedLimits::default()
    };
    let subject = sandbox::Subject {
        plugin: name,
        tier: Tier::Low,
        limits,
        pinned: false,
        gpu: None,
        uid: crate::support::worker_uid(name),
    };
    let plan = sandbox::plan(subject, &Policy::default(), &HostSupport::detect()).unwrap();
    WorkerSpec {
        name: name.into(),
        library: plugin_lib(crate_name),
        plan,
        host_context: Default::default(),
        exe: pio_bin(),
        read_paths: Vec::new(),
        write_paths: Vec::new(),
    }
}

fn fast_policy() -> RestartPolicy {
    RestartPolicy {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        max_crashes: 3,
        window: Duration::from_secs(60),
        // Generous enough that a healthy worker on a loaded 2-core CI machine never misses them.
        request_timeout: Some(Duration::from_secs(4)),
        health_interval: Duration::from_millis(300),
        health_deadline: Duration::from_secs(2),
        load_timeout: Some(Duration::from_secs(60)),
        warmup: false,
    }
}

/// Starts `name` (the library of `crate_name`) supervised by `policy`.
async fn supervise(name: &str, crate_name: &str, policy: RestartPolicy) -> (Supervised, ModelInfo) {
    Supervised::start(spec(name, crate_name), ModelConfig::default(), policy)
        .await
        .unwrap()
}

fn text(prompt: &str) -> InferRequest {
    InferRequest {
        prompt: Prompt::Text(prompt.into()),
        ..InferRequest::default()
    }
}

/// Runs a request to the end: the text, or the failure.
async fn complete(
    plugin: &Supervised,
    prompt: &str,
) -> Result<String, pio_host::protocol::WireError> {
    let mut events = plugin.infer(text(prompt)).map_err(|e| e.0)?;
    let mut out = String::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Token(t) => out.push_str(&t.text),
            Event::Done(_) => return Ok(out),
            Event::Failed(e) => return Err(e),
        }
    }
    panic!("the event stream ended without Done or Failed");
}

/// Waits until the plugin serves again after its `restarts`-th restart.
async fn until_restarted(plugin: &Supervised, restarts: u32) {
    for _ in 0..400 {
        let status = plugin.status();
        if status.state == State::Ready && status.restarts >= restarts {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never became ready again: {:?}", plugin.status());
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_crash_fails_the_request_in_flight_then_the_worker_restarts() {
    if !available() {
        return;
    }
    runtime().block_on(async {
        let (plugin, _) = supervise("hostile", "pio_test_plugin_hostile", fast_policy()).await;
        let first_pid = plugin.status().pid;
        let e = complete(&plugin, "segfault").await.unwrap_err();
        assert_eq!(e.kind, Fault::WorkerDied);
        assert_eq!(
            e.message,
            "worker for hostile was killed by SIGSEGV; restarting"
        );
        until_restarted(&plugin, 1).await;
        let status = plugin.status();
        assert_eq!(status.restarts, 1);
        assert_ne!(status.pid, first_pid);
        assert!(complete(&plugin, "status")
            .await
            .unwrap()
            .contains(&format!("uid={}", crate::support::worker_uid("hostile"))));
        plugin.stop().await;
    });
}

#[test]
fn a_plugin_that_keeps_crashing_is_quarantined() {
    if !available() {
        return;
    }
    runtime().block_on(async {
        let (plugin, _) = supervise("hostile", "pio_test_plugin_hostile", fast_policy()).await;
        for crash in 0..=fast_policy().max_crashes {
            until_restarted(&plugin, crash as u32).await;
            assert!(complete(&plugin, "abort").await.is_err());
        }
        for _ in 0..400 {
            if matches!(plugin.status().state, State::Quarantined(_)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let State::Quarantined(why) = plugin.status().state else {
            panic!("not quarantined: {:?}", plugin.status());
        };
        assert!(
            why.contains("4 failures") && why.contains("SIGABRT"),
            "{why}"
        );
        let e = plugin.infer(text("status")).unwrap_err();
        assert_eq!(e.0.kind, Fault::Quarantined);
        assert!(e.0.message.contains("/v1/plugins/hostile/load"), "{e}");
    });
}

#[test]
fn a_plugin_stopped_while_its_worker_restarts_loads_nothing_more() {
    if !available() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let marker = dir.path().join("loaded");
    let mut spec = spec("hostile", "pio_test_plugin_hostile");
    spec.write_paths.push(dir.path().to_path_buf());
    let mut config = ModelConfig::default();
    config.extra.insert("load_delay_ms".into(), 1500.into());
    // Closing the socket would not end it: the host must kill what it abandons.
    config.extra.insert("exit_hangs".into(), true.into());
    config.extra.insert(
        "loaded_marker".into(),
        marker.to_str().unwrap().to_owned().into(),
    );
    runtime().block_on(async {
        let (plugin, _) = Supervised::start(spec, config, fast_policy())
            .await
            .unwrap();
        let begun = dir.path().join("loaded.begun");
        std::fs::remove_file(&marker).expect("the first load wrote its marker");
        std::fs::remove_file(&begun).expect("the first load marked its start");
        assert!(complete(&plugin, "abort").await.is_err());
        // The new worker is loading.
        for _ in 0..500 {
            if begun.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(begun.exists(), "no new worker began to load");
        assert_eq!(plugin.status().state, State::Restarting);
        plugin.stop().await;
        // Longer than the rest of that load would take.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(
            !marker.exists(),
            "a worker went on loading the model after the plugin was stopped"
        );
        let status = plugin.status();
        assert_eq!((status.state, status.restarts), (State::Stopped, 0));
    });
}

#[test]
fn a_request_stuck_in_a_loop_times_out_and_its_worker_is_replaced() {
    if !available() {
        return;
    }
    runtime().block_on(async {
        let (plugin, _) = supervise("hostile", "pio_test_plugin_hostile", fast_policy()).await;
        let e = complete(&plugin, "loop").await.unwrap_err();
        assert_eq!(e.kind, Fault::Timeout);
        assert!(e.message.contains("ran past its 4 s deadline"), "{e:?}");
        until_restarted(&plugin, 1).await;
        assert_eq!(plugin.status().restarts, 1);
        assert!(plugin.status().last_error.unwrap().contains("deadline"));
        assert!(complete(&plugin, "status").await.is_ok());
        plugin.stop().await;
    });
}

#[test]
fn a_frozen_worker_fails_its_health_check_and_is_replaced() {
    if !available() {
        return;
    }
    runtime().block_on(async {
        let mut policy = fast_policy();
        policy.request_timeout = None;
        let (plugin, _) = supervise("hostile", "pio_test_plugin_hostile", policy).await;
        let e = complete(&plugin, "freeze").await.unwrap_err();
        assert_eq!(e.kind, Fault::WorkerDied);
        assert!(e.message.contains("did not answer a health check"), "{e:?}");
        until_restarted(&plugin, 1).await;
        assert!(complete(&plugin, "status").await.is_ok());
        plugin.stop().await;
    });
}

#[test]
fn a_misbehaving_plugin_never_disturbs_another() {
    if !available() {
        return;
    }
    runtime().block_on(async {
        let (echo, _) = supervise("echo", "pio_plugin_echo", fast_policy()).await;
        let (hostile, _) = supervise("hostile", "pio_test_plugin_hostile", fast_policy()).await;
        let echo_pid = echo.status().pid;
        let mut crashes = 0;
        for attack in ["segfault", "alloc 512", "kill-parent", "abort"] {
            let (hostile_result, echo_result) =
                tokio::join!(complete(&hostile, attack), complete(&echo, "still here"));
            assert_eq!(
                echo_result.unwrap(),
                "still here",
                "during {attack}: {hostile_result:?}"
            );
            if hostile_result.is_err() {
                crashes += 1;
            }
            until_restarted(&hostile, crashes).await;
        }
        let status = echo.status();
        assert_eq!(
            (status.pid, status.restarts, status.state),
            (echo_pid, 0, State::Ready)
        );
        let stats = status.stats.unwrap();
        assert_eq!(stats.memory_limit_bytes, Some(128 << 20));
        assert!(stats.memory_bytes.unwrap() > 0);
        echo.stop().await;
        hostile.stop().await;
    });
}

#[test]
fn cancel_stops_generation_in_the_worker_and_unload_releases_the_model() {
    if !available() {
        return;
    }
    runtime().block_on(async {
        let worker = Worker::start(spec("echo", "pio_plugin_echo"))
            .await
            .unwrap();
        let mut config = ModelConfig::default();
        config.extra.insert("delay_ms".into(), 20.into());
        worker.load(config, |_, _, _| {}).await.unwrap();
        let (id, mut events) = worker.infer(text(&"x".repeat(200))).unwrap();
        let mut tokens = 0;
        let failure = loop {
            match events.recv().await.unwrap() {
                Event::Token(_) => {
                    tokens += 1;
                    if tokens == 3 {
                        worker.cancel(id);
                    }
                }
                Event::Done(_) => panic!("finished despite the cancel"),
                Event::Failed(e) => break e,
            }
        };
        assert_eq!(failure.kind, Fault::Cancelled);
        assert!(
            tokens < 10,
            "generation went on after the cancel: {tokens} tokens"
        );

        worker.unload().await.unwrap();
        let (_, mut events) = worker.infer(text("hi")).unwrap();
        match events.recv().await.unwrap() {
            Event::Failed(e) => assert_eq!(e.kind, Fault::NotReady, "{e:?}"),
            other => panic!("served without a model: {other:?}"),
        }
        assert!(worker.ping(Duration::from_secs(2)).await.is_ok());
        worker.shutdown().await;
    });
}

/// A worker the kernel will not let die (stuck in uninterruptible sleep; made here with cgroup
/// v1's freezer, whose frozen tasks SIGKILL does not wake) is given up on after the grace: its
/// request fails saying so, the plugin restarts beside it, a stop of such a worker returns, and
/// once it can end it is reaped.
#[test]
fn a_worker_that_cannot_be_killed_is_left_behind_and_replaced() {
    if !available() {
        return;
    }
    let Some(freezer) = Freezer::new() else {
        eprintln!("skipped: needs cgroup v1's freezer (its frozen tasks ignore SIGKILL)");
        return;
    };
    runtime().block_on(async {
        let mut policy = fast_policy();
        policy.request_timeout = None;
        let (plugin, _) = supervise("hostile", "pio_test_plugin_hostile", policy).await;
        let stuck = plugin.status().pid.expect("a worker");
        freezer.freeze(stuck);
        let answered = tokio::time::timeout(Duration::from_secs(60), complete(&plugin, "status"));
        let e = answered.await.expect("no answer").unwrap_err();
        assert_eq!(e.kind, Fault::WorkerDied);
        assert!(e.message.contains("did not die within"), "{e:?}");
        until_restarted(&plugin, 1).await;
        assert!(complete(&plugin, "status").await.is_ok());
        assert!(alive(stuck), "the stuck worker was not left behind");

        let second = plugin.status().pid.expect("a worker");
        freezer.freeze(second);
        let stopped = tokio::time::timeout(Duration::from_secs(30), plugin.stop()).await;
        freezer.thaw();
        assert!(
            stopped.is_ok(),
            "the stop waited on a worker that cannot die"
        );
        for _ in 0..100 {
            if !alive(stuck) && !alive(second) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("a worker left behind was not reaped once it could end");
    });
}

/// Whether `pid` is a process, a zombie included (one nobody reaped).
fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// A cgroup v1 freezer group of the test's own (the daemon does not use the freezer).
struct Freezer(std::path::PathBuf);

impl Freezer {
    fn new() -> Option<Self> {
        let root = std::path::Path::new("/sys/fs/cgroup/freezer");
        let dir = root.join(format!("pio-test-{}", std::process::id()));
        std::fs::create_dir(&dir).ok()?;
        Some(Self(dir))
    }

    /// Freezes `pid` and the rest of its worker (the processes of its memory cgroup).
    fn freeze(&self, pid: u32) {
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let group = own
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, path)| path.to_string()))
            .expect("the worker's memory cgroup");
        let procs =
            std::fs::read_to_string(format!("/sys/fs/cgroup/memory{group}/cgroup.procs")).unwrap();
        for p in procs.lines() {
            std::fs::write(self.0.join("cgroup.procs"), p).unwrap();
        }
        self.set("FROZEN");
    }

    fn thaw(&self) {
        self.set("THAWED");
    }

    fn set(&self, state: &str) {
        std::fs::write(self.0.join("freezer.state"), state).unwrap();
        for _ in 0..100 {
            let now = std::fs::read_to_string(self.0.join("freezer.state")).unwrap();
            if now.trim() == state {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the freezer did not reach {state}");
    }
}

impl Drop for Freezer {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("freezer.state"), "THAWED");
        let procs = std::fs::read_to_string(self.0.join("cgroup.procs")).unwrap_or_default();
        for p in procs.lines() {
            let _ = std::fs::write("/sys/fs/cgroup/freezer/cgroup.procs", p);
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}
