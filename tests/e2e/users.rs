//! Each plugin's workers run as a uid of their own: the kernel lets a process signal another
//! (and trace it, and write its files) by uid, so a shared one let any worker kill any other.

use crate::support::*;
use crate::worker::{confinement_available, frozen_run, run_in, worker_group_procs};

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
    let find = || worker_group_procs(run).into_iter().find(unprivileged);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut worker = find();
    while worker.is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        worker = find();
    }
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
