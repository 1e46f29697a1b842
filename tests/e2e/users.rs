//! Each plugin's workers run as a uid of their own: the kernel lets a process signal another
//! (and trace it, and write its files) by uid, so a shared one let any worker kill any other.

use crate::support::*;
use crate::worker::{confinement_available, frozen_run, run_in, worker_process};

/// The hostile library served under another plugin name (`intruder`).
fn intruder_dir() -> PluginDir {
    let dir = PluginDir::new();
    dir.copy_lib("pio_test_plugin_hostile", "libhostile.so");
    let text = manifest(
        "intruder",
        "0.1.0",
        "libhostile.so",
        "plugin = \"hostile\"\n",
    );
    dir.write("intruder.toml", &text);
    dir
}

#[test]
fn a_worker_cannot_kill_another_plugins_worker() {
    if !confinement_available() {
        return;
    }
    let (hostile, intruder) = (crate::worker::hostile_low_dir(), intruder_dir());
    let mut frozen = frozen_run(&hostile);
    let run = frozen.id();
    // The worker once it runs as its uid (it enters its cgroup as root, before the switch).
    let unprivileged = |pid: &i32| {
        std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && !l.contains("\t0\t"))
        })
    };
    let worker = worker_process(run, unprivileged);
    let tried = worker.map(|pid| run_in(&intruder, "intruder", &format!("kill {pid}"), &[]));
    let own = run_in(&intruder, "intruder", "status", &[]);
    let alive = worker.is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
    let _ = frozen.kill();
    let _ = frozen.wait();
    let tried = tried.expect("the frozen worker in its cgroup");
    assert!(
        tried.stdout.contains("denied"),
        "{}{}",
        tried.stdout,
        tried.stderr
    );
    assert!(alive, "the other plugin's worker was killed");
    let (mine, theirs) = (worker_uid("intruder"), worker_uid("hostile"));
    assert_ne!(mine, theirs);
    assert!(
        own.stdout.contains(&format!("uid={mine} ")),
        "{}",
        own.stdout
    );
}

/// Two plugins whose names give one uid are refused, saying so and what to change, rather than
/// run side by side as one user; alone, either runs.
#[test]
fn two_plugins_on_one_uid_are_refused() {
    use crate::daemon::{echo_and_hostile_dir, echo_dir, Daemon};
    if !confinement_available() {
        return;
    }
    let one_uid = "[sandbox]\nworker_uids = \"3000000-3000000\"\n";
    let d = Daemon::start(echo_and_hostile_dir(), one_uid);
    d.wait_for(30, "the refusal", |d| {
        d.plugin("echo")["last_error"].as_str().is_some_and(|e| {
            e.contains("would run as one uid (3000000)") && e.contains("worker_uids")
        })
    });
    let (status, r) = d.post(
        "/v1/completions",
        &serde_json::json!({"model": "hostile", "prompt": "status"}),
    );
    assert_ne!(status, 200, "{r}");
    drop(d);
    let alone = Daemon::start(echo_dir(""), one_uid);
    alone.wait_ready();
    let (status, r) = alone.post(
        "/v1/completions",
        &serde_json::json!({"model": "echo", "prompt": "hi"}),
    );
    assert_eq!(status, 200, "{r}");
}
