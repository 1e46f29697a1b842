//! What the worker sees of itself: its ids, limits, filters and descriptors, and its threads'
//! and reaper's.

use pio_plugin_api::PluginError;

/// What attack `verb` does, when it is one of these (`None`: not one of them).
pub(crate) fn attack(verb: &str) -> Option<Result<String, PluginError>> {
    let done = match verb {
        "status" => status(),
        "threads" => threads_status(),
        "reaper" => reaper(),
        _ => return None,
    };
    Some(Ok(done))
}

/// The worker's ids, CPUs, privileges, filter, memory cgroup, descriptors, environment names and
/// core limit, as `/proc` and `getrlimit` give them.
fn status() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| status_field(&status, k);
    let fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let memory_cgroup = cgroup
        .lines()
        .find(|l| l.contains(":memory:") || l.starts_with("0::"))
        .and_then(|l| l.rsplit(':').next())
        .unwrap_or("")
        .to_string();
    let env: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
    let mut core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut core) };
    let uid_map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let uid_map = uid_map.split_whitespace().collect::<Vec<_>>().join(":");
    format!(
        "uid={} uidmap={uid_map} cpus={} nonewprivs={} capeff={} capbnd={} seccomp={} cgroup={} fds={} env={} core={}",
        field("Uid:"),
        field("Cpus_allowed_list:"),
        field("NoNewPrivs:"),
        field("CapEff:"),
        field("CapBnd:"),
        field("Seccomp:"),
        memory_cgroup,
        fds.join(","),
        env.join(","),
        core.rlim_cur
    )
}

/// Starts 8 threads and reports each thread's seccomp mode.
fn threads_status() -> String {
    // The 8 threads wait at a barrier, not on a timer, so a slow machine can't let them end
    // before their status is read.
    let done = std::sync::Arc::new(std::sync::Barrier::new(9));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let done = done.clone();
            std::thread::spawn(move || {
                done.wait();
            })
        })
        .collect();
    let mut modes = Vec::new();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.filter_map(|t| t.ok()) {
            // A thread of the worker's own that ended after the listing has no status left to
            // read; a thread that is gone runs nothing unfiltered, so it is not counted.
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
                continue;
            };
            let mode = status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .map(|v| v.trim().to_string())
                .unwrap_or_default();
            modes.push(mode);
        }
    }
    done.wait();
    for h in handles {
        let _ = h.join();
    }
    format!("threads={} seccomp={}", modes.len(), modes.join(","))
}

/// The first word after `key` in a `/proc/<pid>/status` text ("" when absent).
fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or("")
        .to_string()
}

/// What pid 1 of the worker's namespace (the reaper, which answers refused calls) holds.
fn reaper() -> String {
    let status = std::fs::read_to_string("/proc/1/status").unwrap_or_default();
    let field = |k: &str| status_field(&status, k);
    let fds = std::fs::read_dir("/proc/1/fd").map_or_else(|e| e.to_string(), |_| "open".into());
    format!(
        "capeff={} capprm={} fds={fds}",
        field("CapEff:"),
        field("CapPrm:")
    )
}
