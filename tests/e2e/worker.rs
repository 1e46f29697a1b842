//! Worker processes at the `low` tier: the hostile plugin attacks through `pio run`, and the
//! outcome is asserted as the kernel enforced it (root and a writable cgroup hierarchy needed, as
//! in CI).

use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::support::*;

/// Whether this machine can run confined workers; tests that need it say so and return.
pub(crate) fn confinement_available() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"));
    let ok = root.unwrap_or(false) && std::path::Path::new("/sys/fs/cgroup").exists();
    if !ok {
        eprintln!("skipped: needs root and cgroups (run as root, as CI does)");
    }
    ok
}

pub(crate) const LIMITS: &str =
    "[limits]\nmemory = \"64MiB\"\npids = 16\ncpus = 0.5\nscratch = \"1MiB\"\n";

fn hostile_dir() -> PluginDir {
    hostile_dir_with(LIMITS)
}

/// The hostile plugin at `low`, for tests of other tiers.
pub(crate) fn hostile_low_dir() -> PluginDir {
    hostile_dir()
}

/// The hostile plugin with `extra` (TOML lines) in its manifest, `hostile.toml`.
fn hostile_dir_with(extra: &str) -> PluginDir {
    let dir = PluginDir::new();
    dir.copy_lib("pio_test_plugin_hostile", "libhostile.so");
    dir.write(
        "hostile.toml",
        &manifest("hostile", "0.1.0", "libhostile.so", extra),
    );
    dir
}

pub(crate) struct Ran {
    pub(crate) ok: bool,
    /// The exit status (`None`: killed by a signal).
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl From<std::process::Output> for Ran {
    fn from(out: std::process::Output) -> Self {
        Ran {
            ok: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

pub(crate) fn run_in(dir: &PluginDir, name: &str, prompt: &str, extra: &[&str]) -> Ran {
    let mut args = vec!["run", name, "--plugins", ".", "--prompt", prompt];
    args.extend_from_slice(extra);
    pio(dir.path(), &args).into()
}

fn attack(dir: &PluginDir, what: &str) -> Ran {
    run_in(dir, "hostile", what, &[])
}

#[test]
fn echo_streams_through_a_worker_as_json_lines() {
    if !confinement_available() {
        return;
    }
    let dir = PluginDir::new();
    dir.copy_lib("pio_plugin_echo", "libecho.so");
    dir.write("echo.toml", &manifest("echo", "0.1.0", "libecho.so", ""));
    let ran = run_in(
        &dir,
        "echo",
        "héllo",
        &["--json", "--logprobs", "0", "--max-tokens", "4"],
    );
    assert!(ran.ok, "{}", ran.stderr);
    let lines: Vec<serde_json::Value> = ran
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "{}", ran.stdout);
    assert_eq!(lines[1]["text"], "é");
    assert_eq!(lines[1]["token_id"], 233);
    assert_eq!(lines[1]["index"], 1);
    assert_eq!(lines[1]["logprob"], 0.0);
    assert_eq!(lines[4]["finish_reason"], "length");
    assert_eq!(lines[4]["usage"]["completion_tokens"], 4);
    assert_eq!(lines[4]["usage"]["prompt_tokens"], 5);
}

/// Without `--max-tokens`, `pio run` sends the manifest's `[model.generation] max_tokens`, as
/// the daemon does (echo itself ignores the generation defaults), and the flag wins.
#[test]
fn pio_run_sends_the_manifests_max_tokens() {
    if !confinement_available() {
        return;
    }
    let dir = PluginDir::new();
    dir.copy_lib("pio_plugin_echo", "libecho.so");
    let extra = "[model.generation]\nmax_tokens = 3\n";
    dir.write("echo.toml", &manifest("echo", "0.1.0", "libecho.so", extra));
    let ran = run_in(&dir, "echo", "hello world", &[]);
    assert!(ran.ok, "{}", ran.stderr);
    assert_eq!(ran.stdout.trim_end(), "hel");
    let ran = run_in(&dir, "echo", "hello world", &["--max-tokens", "5"]);
    assert_eq!(ran.stdout.trim_end(), "hello");
}

#[test]
fn the_worker_runs_unprivileged_in_its_cgroup_with_nothing_inherited() {
    if !confinement_available() {
        return;
    }
    let dir = hostile_dir();
    let leak = std::fs::File::open("/etc/hostname").unwrap();
    let mut cmd = Command::new(pio_bin());
    cmd.current_dir(dir.path())
        .args(["run", "hostile", "--plugins", ".", "--prompt", "status"])
        .env("PIO_TEST_SECRET", "hunter2")
        // The one variable a worker inherits (the kernels' cap), absent here.
        .env_remove("PIO_KERNELS");
    let leak_fd = std::os::fd::AsRawFd::as_raw_fd(&leak);
    // SAFETY: dup2 only, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // An fd without CLOEXEC in the host: the worker must not inherit it.
            if libc::dup2(leak_fd, 50) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uid = worker_uid("hostile");
    assert!(status.contains(&format!("uid={uid} ")), "{status}");
    assert!(status.contains("nonewprivs=1 "), "{status}");
    assert!(status.contains("cgroup=/pio/hostile-"), "{status}");
    assert!(
        status.contains("env=LANG,PATH ") || status.contains("env=PATH,LANG "),
        "{status}"
    );
    assert!(status.contains("core=0"), "{status}");
    let fds = status
        .split("fds=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    assert!(
        !fds.split(',').any(|fd| fd == "50"),
        "inherited fd 50: {status}"
    );
    assert!(
        fds.split(',').count() <= 6,
        "only stdio, the socket and its clone: {status}"
    );
}

#[test]
fn memory_past_the_limit_kills_the_worker_and_says_so() {
    if !confinement_available() {
        return;
    }
    let ran = attack(&hostile_dir(), "alloc 256");
    assert!(!ran.ok);
    assert!(
        ran.stderr
            .contains("worker for hostile was killed: memory limit 64 MiB reached"),
        "{}",
        ran.stderr
    );
}

#[test]
fn crashes_are_reported_by_signal() {
    if !confinement_available() {
        return;
    }
    let dir = hostile_dir();
    for (what, signal) in [("segfault", "SIGSEGV"), ("abort", "SIGABRT")] {
        let ran = attack(&dir, what);
        assert!(!ran.ok);
        assert!(
            ran.stderr
                .contains(&format!("worker for hostile was killed by {signal}")),
            "{what}: {}",
            ran.stderr
        );
    }
    let ran = attack(&dir, "exit");
    assert!(
        ran.stderr.contains("worker for hostile exited with code 3"),
        "{}",
        ran.stderr
    );
}

#[test]
fn a_panic_is_an_error_not_a_crash() {
    if !confinement_available() {
        return;
    }
    let ran = attack(&hostile_dir(), "panic");
    assert!(!ran.ok);
    assert!(
        ran.stderr.contains(
            "error: panicked: plugin hostile panicked in `infer`: hostile plugin panics on request"
        ),
        "{}",
        ran.stderr
    );
}

/// `pio run --timeout N` stops a request running past N seconds; 0 is no limit, as in the
/// config (it stopped every request at once before).
#[test]
fn a_timeout_of_zero_is_no_limit() {
    if !confinement_available() {
        return;
    }
    let dir = hostile_dir();
    let ran = run_in(&dir, "hostile", "spin 1.5", &["--timeout", "1"]);
    assert!(
        ran.stderr
            .contains("timeout: the request ran past its 1 s deadline (--timeout)"),
        "{}",
        ran.stderr
    );
    assert_eq!(ran.code, Some(124), "timeout(1)'s status: {}", ran.stderr);
    let ran = run_in(&dir, "hostile", "spin 1.5", &["--timeout", "0"]);
    assert!(
        ran.ok && ran.stdout.contains("wall_seconds=1.5"),
        "{}",
        ran.stderr
    );
}

#[test]
fn a_fork_bomb_hits_the_pids_limit() {
    if !confinement_available() {
        return;
    }
    let ran = attack(&hostile_dir(), "fork-bomb");
    assert!(ran.ok, "{}", ran.stderr);
    let forked: usize = ran
        .stdout
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(',')
        .parse()
        .unwrap();
    assert!(forked < 16, "{}", ran.stdout);
    assert!(
        ran.stdout.contains("Resource temporarily unavailable"),
        "{}",
        ran.stdout
    );
}

#[test]
fn the_uid_stops_host_files_the_daemon_and_root() {
    if !confinement_available() {
        return;
    }
    let dir = hostile_dir();
    for what in [
        "read /etc/shadow",
        "kill-parent",
        "ptrace-parent",
        "setuid-root",
    ] {
        let ran = attack(&dir, what);
        assert!(
            ran.ok,
            "{what}: the daemon survived and answered: {}",
            ran.stderr
        );
        assert!(ran.stdout.starts_with("denied:"), "{what}: {}", ran.stdout);
    }
}

#[test]
fn writes_stop_at_the_file_size_limit() {
    if !confinement_available() {
        return;
    }
    let target = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        target.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let file = target.path().join("huge");
    let ran = attack(&hostile_dir(), &format!("huge-file {}", file.display()));
    assert!(ran.ok, "{}", ran.stderr);
    assert!(
        ran.stdout
            .contains("wrote 1048576 bytes, then: File too large"),
        "{}",
        ran.stdout
    );
}

/// The user CPU time the hostile plugin's `spin` says its process used.
pub(crate) fn spun_cpu_seconds(said: &str) -> f64 {
    said.split("cpu_seconds=")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no cpu_seconds in {said:?}"))
}

#[test]
fn cpu_time_follows_the_quota() {
    if !confinement_available() {
        return;
    }
    // 2 s of spinning at 0.5 CPU gets about 1 s of CPU time.
    let ran = attack(&hostile_dir(), "spin 2");
    let cpu = spun_cpu_seconds(&ran.stdout);
    // The quota is a ceiling; a loaded machine may give less, never more.
    assert!((0.2..=1.4).contains(&cpu), "{}", ran.stdout);
}

#[test]
fn a_double_forked_grandchild_dies_with_the_worker() {
    if !confinement_available() {
        return;
    }
    let ran = attack(&hostile_dir(), "double-fork");
    let pid: i32 = ran
        .stdout
        .trim()
        .strip_prefix("grandchild=")
        .unwrap()
        .parse()
        .unwrap();
    assert!(pid > 0);
    // `pio run` has returned: the worker's cgroup was killed and removed.
    let gone = (0..100).any(|_| {
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
        if alive {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        !alive
    });
    assert!(gone, "grandchild {pid} escaped");
}

#[test]
fn library_constructors_run_only_in_confined_children() {
    if !confinement_available() {
        return;
    }
    let dir = hostile_dir();
    let marks = std::path::Path::new("/tmp/pio-hostile-ctor");
    std::fs::create_dir_all(marks).unwrap();
    std::fs::set_permissions(marks, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
    let before: Vec<_> = ctor_marks();
    let check = Command::new(pio_bin())
        .args(["check", dir.path().join("hostile.toml").to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let check_pid = check.id();
    assert!(check.wait_with_output().unwrap().status.success());
    let ran = attack(&dir, "status");
    assert!(ran.ok);
    let new: Vec<_> = ctor_marks()
        .into_iter()
        .filter(|m| !before.contains(m))
        .collect();
    assert!(
        new.len() >= 2,
        "the probe and the worker each loaded it: {new:?}"
    );
    for (path, text) in &new {
        assert!(
            !text.starts_with(&format!("pid={check_pid} ")),
            "ran inside `pio check` itself: {text}"
        );
        let uid = format!("uid={}", worker_uid("hostile"));
        assert!(text.contains(&uid), "ran unconfined: {text}");
        // In a session of its own, the probe's too: none shares the caller's terminal, where
        // a constructor's TIOCSTI would type into the operator's root shell.
        let ours = nix::unistd::getsid(None).unwrap();
        assert!(
            !text.contains(&format!("sid={ours}\n")),
            "shares its caller's session: {text}"
        );
        assert!(path.exists());
    }
    let _ = std::fs::remove_dir_all(marks);
}

/// What a library's constructors start in its probe (forked, out of its session, holding the
/// probe's output) is killed with the probe (in its cgroup, as root); `pio check` neither waits
/// for it nor leaves it. Run by an unprivileged user (no cgroup, so what left the probe's
/// process group survives), `pio check` still does not wait on it.
#[test]
fn what_a_probed_library_starts_dies_with_the_probe() {
    use std::os::unix::process::CommandExt;
    if !confinement_available() {
        return;
    }
    let dir = hostile_dir();
    open_to_workers(dir.path());
    let linger = std::path::Path::new("/tmp/pio-hostile-linger");
    // A zombie is dead: a container's pid 1 may never reap what is reparented to it.
    let running = |pid: &i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|s| !s.trim_start().starts_with('Z'))
        })
    };
    let check = |nobody: bool| {
        std::fs::create_dir_all(linger).unwrap();
        std::fs::set_permissions(linger, std::os::unix::fs::PermissionsExt::from_mode(0o1777))
            .unwrap();
        let mut command = Command::new(pio_bin());
        command
            .current_dir(dir.path())
            .args(["check", dir.path().join("hostile.toml").to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if nobody {
            command.uid(65534).gid(65534);
        }
        let mut check = command.spawn().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(12);
        let mut finished = None;
        while finished.is_none() && std::time::Instant::now() < deadline {
            finished = check.try_wait().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = check.kill();
        let _ = check.wait();
        let left: Vec<i32> = std::fs::read_dir(linger)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let alive: Vec<i32> = left.iter().copied().filter(running).collect();
        for &pid in &alive {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = std::fs::remove_dir_all(linger);
        (finished.is_some(), left, alive)
    };
    let (finished, left, alive) = check(false);
    assert!(!left.is_empty(), "the constructor ran in a probe");
    assert!(finished, "pio check waited on what the probe left");
    assert!(alive.is_empty(), "outlived the probe: {alive:?}");
    let (finished, left, _) = check(true);
    assert!(
        !left.is_empty(),
        "the constructor ran in the unprivileged probe"
    );
    assert!(
        finished,
        "an unprivileged pio check waited on what the probe left"
    );
}

fn ctor_marks() -> Vec<(std::path::PathBuf, String)> {
    std::fs::read_dir("/tmp/pio-hostile-ctor")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| {
            (
                e.path(),
                std::fs::read_to_string(e.path()).unwrap_or_default(),
            )
        })
        .collect()
}

#[test]
fn a_tier_the_host_cannot_give_is_refused_unless_downgrade_is_allowed() {
    if !confinement_available() {
        return;
    }
    // `maximum` needs a pinned library; this manifest pins none.
    let dir = hostile_dir();
    let ran = run_in(&dir, "hostile", "status", &["--min-tier", "maximum"]);
    assert!(!ran.ok);
    assert!(
        ran.stderr.contains("asks for tier `maximum`") && ran.stderr.contains("allow_downgrade"),
        "{}",
        ran.stderr
    );
    let ran = run_in(
        &dir,
        "hostile",
        "status",
        &["--min-tier", "maximum", "--allow-downgrade"],
    );
    assert!(ran.ok, "{}", ran.stderr);
    assert!(
        ran.stderr
            .contains("warning: running hostile at tier high instead of maximum"),
        "{}",
        ran.stderr
    );
    let uid = worker_uid("hostile");
    assert!(
        ran.stdout.contains(&format!("uidmap={uid}:{uid}:1")),
        "the high mechanisms apply: {}",
        ran.stdout
    );
}

#[test]
fn at_low_the_network_is_open() {
    if !confinement_available() {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let ran = attack(&hostile_dir(), &format!("connect {port}"));
    assert_eq!(ran.stdout.trim(), "connected", "{}", ran.stderr);
}

/// A library probe runs plugin code (constructors, `supports_config`) for any manifest, `maximum`
/// ones included, before any tier applies: it gets no network.
#[test]
fn a_library_probe_has_no_network() {
    if !confinement_available() {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = hostile_dir_with(&format!("[model.options]\nprobe_connect = {port}\n"));
    let path = dir.path().join("hostile.toml");
    let out = pio(dir.path(), &["check", path.to_str().unwrap()]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "the probe connected: {text}");
}

/// Started by a user other than root, the probe cuts its network inside a user namespace of its
/// own (where the kernel lets unprivileged users make one, as here).
#[test]
fn an_unprivileged_users_library_probe_has_no_network() {
    use std::os::unix::process::CommandExt;
    if !confinement_available() {
        return;
    }
    let nobody = |program: &str| {
        let mut c = std::process::Command::new(program);
        c.uid(65534).gid(65534);
        c
    };
    let userns = nobody("unshare").args(["--user", "--net", "true"]).status();
    if !userns.is_ok_and(|s| s.success()) {
        eprintln!("skipped: this kernel lets no unprivileged user make a user namespace");
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = hostile_dir_with(&format!("[model.options]\nprobe_connect = {port}\n"));
    open_to_workers(dir.path());
    let path = dir.path().join("hostile.toml");
    let out = nobody(pio_bin().to_str().unwrap())
        .current_dir(dir.path())
        .args(["check", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "the probe connected: {text}");
}

#[test]
fn list_start_reports_each_worker_from_its_cgroup() {
    if !confinement_available() {
        return;
    }
    let dir = PluginDir::new();
    dir.copy_lib("pio_plugin_echo", "libecho.so");
    dir.write(
        "echo.toml",
        &manifest(
            "echo",
            "0.1.0",
            "libecho.so",
            "[limits]\nmemory = \"96MiB\"\n",
        ),
    );
    let out = pio(dir.path(), &["list", "--json", "--plugins", ".", "--start"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let worker = &rows[0]["worker"];
    assert!(worker["pid"].as_u64().unwrap() > 1, "{worker}");
    assert_eq!(worker["tier"], "low");
    assert_eq!(worker["state"]["state"], "ready");
    assert_eq!(worker["restarts"], 0);
    assert_eq!(worker["memory_limit_bytes"], 96 << 20);
    assert!(worker["memory_bytes"].as_u64().unwrap() > 0);
    // The worker was stopped again.
    let pid = worker["pid"].as_u64().unwrap();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());

    let out = pio(
        dir.path(),
        &["list", "--plugins", ".", "--start", "--min-tier", "maximum"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // Raised to `maximum` by the flag, the unpinned manifest fails its check, as the daemon
    // would refuse it, and is not started.
    assert!(
        text.contains("cannot run at tier low") && text.contains("pins no sha256"),
        "{text}"
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
}

#[test]
fn no_new_privs_defeats_a_setuid_binary_and_setns_is_refused() {
    if !confinement_available() {
        return;
    }
    let bin = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        bin.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let id = bin.path().join("id");
    std::fs::copy("/usr/bin/id", &id).unwrap();
    // setuid root: run by anyone, it would print euid 0.
    std::fs::set_permissions(&id, std::os::unix::fs::PermissionsExt::from_mode(0o4755)).unwrap();
    let dir = hostile_dir();
    let out = attack(&dir, &format!("exec {} -u", id.display()));
    let uid = worker_uid("hostile");
    assert_eq!(out.stdout.trim(), format!("ran: {uid}"), "{}", out.stderr);
    let out = attack(&dir, "setns");
    assert!(out.stdout.starts_with("denied:"), "{}", out.stdout);
}

#[test]
fn network_false_closes_the_network_at_low() {
    if !confinement_available() {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = hostile_dir_with("[limits]\nnetwork = false\n");
    let out = attack(&dir, &format!("connect {port}"));
    assert!(
        out.stdout.contains("Network is unreachable"),
        "{}",
        out.stdout
    );
    // Asking for the network above `low` is refused.
    let text = manifest(
        "hostile",
        "0.1.0",
        "libhostile.so",
        "[limits]\nnetwork = true\n",
    )
    .replace("\"low\"", "\"medium\"");
    dir.write("hostile.toml", &text);
    let ran = attack(&dir, "status");
    assert!(
        !ran.ok && ran.stderr.contains("network access"),
        "{}",
        ran.stderr
    );
}

#[test]
fn no_terminal_to_inject_into() {
    if !confinement_available() {
        return;
    }
    let out = attack(&hostile_dir(), "tiocsti");
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.starts_with("denied:"), "{}", out.stdout);
}

#[test]
fn the_config_file_sets_plugin_dirs_default_limits_and_the_minimum_tier() {
    if !confinement_available() {
        return;
    }
    let plugins = PluginDir::new();
    plugins.copy_lib("pio_plugin_echo", "libecho.so");
    plugins.write("echo.toml", &manifest("echo", "0.1.0", "libecho.so", ""));
    let conf = PluginDir::new();
    let file = conf.write(
        "pio.toml",
        &format!(
            "plugin_dirs = [\"{}\"]\n[sandbox]\nmin_tier = \"high\"\n[limits]\nmemory = \"80MiB\"\n",
            plugins.path().display()
        ),
    );
    let out = pio(
        conf.path(),
        &[
            "list",
            "--json",
            "--start",
            "--config",
            file.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let worker = &rows[0]["worker"];
    assert_eq!(worker["tier"], "high", "{worker}");
    assert_eq!(worker["memory_limit_bytes"], 80 << 20, "{worker}");
    // A flag overrides the file.
    let out = pio(
        conf.path(),
        &[
            "list",
            "--json",
            "--start",
            "--config",
            "pio.toml",
            "--min-tier",
            "medium",
        ],
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["worker"]["tier"], "medium");

    conf.write("bad.toml", "[sandbox]\nmin_teir = \"high\"\n");
    let out = pio(conf.path(), &["list", "--config", "bad.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("bad.toml:2:1") && e.contains("min_teir"), "{e}");
}

/// A plugin folder, or a model file, that the unprivileged worker user cannot read is refused
/// before any process tries, naming the path, the uid and the fix.
#[test]
fn paths_the_worker_user_cannot_read_are_named_with_the_uid_and_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    if !confinement_available() {
        return;
    }
    let chmod = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    let dir = PluginDir::new();
    dir.copy_lib("pio_plugin_echo", "libecho.so");
    dir.write("echo.toml", &manifest("echo", "0.1.0", "libecho.so", ""));
    chmod(dir.path(), 0o700);
    let out = pio(dir.path(), &["list", "--plugins", "."]);
    let text = String::from_utf8_lossy(&out.stdout);
    let uid = format!("uid {} ", worker_uid("echo"));
    assert!(text.contains(&uid) && text.contains("chmod o+x"), "{text}");
    chmod(dir.path(), 0o755);
    let text =
        String::from_utf8_lossy(&pio(dir.path(), &["list", "--plugins", "."]).stdout).to_string();
    assert!(text.contains("ready"), "{text}");

    // A model whose weights are private to root.
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(repo_root().join("tests/fixtures/qwen3-tiny-untied")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    chmod(&model.join("model.safetensors"), 0o600);
    let lib = plugin_lib("pio_plugin_qwen3");
    dir.write(
        "qwen3.toml",
        &manifest(
            "qwen3-4b-instruct-2507",
            "0.1.0",
            lib.to_str().unwrap(),
            "[model]\npath = \"model\"\n",
        )
        .replace("^1.0", "^1.1"),
    );
    let out = pio(
        dir.path(),
        &[
            "run",
            "qwen3-4b-instruct-2507",
            "--plugins",
            ".",
            "--prompt",
            "Hi",
            "--max-tokens",
            "2",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("model.safetensors")
            && err.contains(&format!("uid {} ", worker_uid("qwen3-4b-instruct-2507")))
            && err.contains("chmod o+r"),
        "{err}"
    );
}

/// `pio quantize` into an existing folder the worker's user cannot write stops before loading,
/// naming the folder, the uid and the fix (the engine would only warn after quantizing); given
/// to that user, the same folder takes the cache.
#[test]
fn quantize_refuses_a_cache_folder_the_worker_user_cannot_write() {
    use std::os::unix::fs::PermissionsExt;
    if !confinement_available() {
        return;
    }
    let dir = PluginDir::new();
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o755)).unwrap();
    let lib = plugin_lib("pio_plugin_qwen3");
    let extra = format!(
        "[model]\npath = \"{}\"\nquantization = \"q8\"\nquantization_cache = \"cache\"\n",
        repo_root().join("tests/fixtures/qwen3-tiny").display()
    );
    dir.write(
        "qwen3.toml",
        &manifest(
            "qwen3-4b-instruct-2507",
            "0.1.0",
            lib.to_str().unwrap(),
            &extra,
        )
        .replace("^1.0", "^1.1"),
    );
    let quantize = || {
        pio(
            dir.path(),
            &["quantize", "qwen3-4b-instruct-2507", "--plugins", "."],
        )
    };
    let out = quantize();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let uid = worker_uid("qwen3-4b-instruct-2507");
    assert!(
        err.contains(&format!("uid {uid} "))
            && err.contains(&format!("chown {uid}:65534"))
            && err.contains(&cache.display().to_string()),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);
    // A run loads all the same, and says the cache is not kept, and the fix.
    let ran = run_in(&dir, "qwen3-4b-instruct-2507", "Hi", &["--max-tokens", "1"]);
    let err = &ran.stderr;
    assert!(ran.ok, "{err}");
    assert!(
        err.contains("quantizes again at every start")
            && err.contains(&format!("chown -R {uid}:65534")),
        "{err}"
    );

    std::os::unix::fs::chown(&cache, Some(uid), Some(65534)).unwrap();
    let out = quantize();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);
}

/// The probe runs as the configured worker user (`sandbox.worker_uid`), like the workers: a
/// plugin folder only that user can read is ready for it, and named as unreadable for the
/// default user.
#[test]
fn the_probe_runs_as_the_configured_worker_user() {
    use std::os::unix::fs::PermissionsExt;
    if !confinement_available() {
        return;
    }
    let dir = PluginDir::new();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::copy(plugin_lib("pio_plugin_echo"), plugins.join("libecho.so")).unwrap();
    std::fs::write(
        plugins.join("echo.toml"),
        manifest("echo", "0.1.0", "libecho.so", ""),
    )
    .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&plugins, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&plugins, Some(4321), Some(4321)).unwrap();
    std::os::unix::fs::chown(plugins.join("libecho.so"), Some(4321), Some(4321)).unwrap();
    let config = dir.write(
        "pio.toml",
        "[sandbox]\nworker_uid = 4321\nworker_gid = 4321\n",
    );
    let list = |extra: &[&str]| -> String {
        let mut args = vec!["list", "--plugins", plugins.to_str().unwrap()];
        args.extend_from_slice(extra);
        String::from_utf8_lossy(&pio(dir.path(), &args).stdout).into_owned()
    };
    let text = list(&["--config", config.to_str().unwrap()]);
    assert!(text.contains("ready"), "{text}");
    let text = list(&[]);
    let uid = format!("uid {} ", worker_uid("echo"));
    assert!(text.contains(&uid), "{text}");
}

/// A first Ctrl-C cancels a running request; a plugin stuck in a loop never sees it, and a
/// second one stops its worker at once: `pio run` ends with a shell's status for Ctrl-C.
#[test]
fn a_second_ctrl_c_stops_a_request_that_ignores_the_first() {
    if !confinement_available() {
        return;
    }
    let dir = hostile_dir();
    let child = Command::new(pio_bin())
        .current_dir(dir.path())
        .args([
            "run",
            "hostile",
            "--plugins",
            ".",
            "--prompt",
            "loop",
            "--timeout",
            "0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let interrupt = || nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    // Loaded (hostile loads at once) and looping, well before this.
    std::thread::sleep(std::time::Duration::from_secs(3));
    interrupt();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let running = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
    assert!(
        matches!(running, Ok(nix::sys::wait::WaitStatus::StillAlive)),
        "the loop ignored the cancel: {running:?}"
    );
    interrupt();
    let mut child = child;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let ended = child.try_wait().unwrap();
    if ended.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(ended.is_some(), "the second Ctrl-C stopped it: {err}");
    assert_eq!(out.status.code(), Some(130), "{err}");
}

/// `pio run ... 2>&1 | head`: the reader goes away mid-stream; pio stops quietly with the status
/// a shell gives SIGPIPE (it printed an error, and panicked as stderr shared the closed pipe).
#[test]
fn a_closed_output_pipe_ends_pio_run_quietly() {
    if !confinement_available() {
        return;
    }
    let dir = crate::daemon::echo_dir("[model.options]\ndelay_ms = 5\n");
    let script = format!(
        "{} run echo --plugins . --prompt {} 2>&1 | head -c 4 >/dev/null; echo \"rc=${{PIPESTATUS[0]}}\"",
        pio_bin().display(),
        "x".repeat(400)
    );
    let out = Command::new("bash")
        .current_dir(dir.path())
        .args(["-c", &script])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        said.trim(),
        "rc=141",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Ctrl-C while `pio run` loads the model, or while `pio bench` runs, stops the worker and its
/// cgroup with the command (before, the worker loaded on, unconfined by any parent, and its
/// group stayed until the next `pio` started).
#[test]
fn an_interrupted_run_or_bench_stops_its_worker() {
    if !confinement_available() {
        return;
    }
    let dir = crate::daemon::echo_dir("[model.options]\nload_delay_ms = 4000\ndelay_ms = 50\n");
    let groups = |pid: u32| -> usize {
        std::fs::read_dir("/sys/fs/cgroup/memory/pio")
            .into_iter()
            .chain(std::fs::read_dir("/sys/fs/cgroup/pio"))
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .contains(&format!("-{pid}-"))
            })
            .count()
    };
    let interrupt_after = |args: &[&str], secs: f64| {
        let child = Command::new(pio_bin())
            .current_dir(dir.path())
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_secs_f64(secs));
        assert_eq!(groups(child.id()), 1, "the worker runs in its group");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        (pid, out)
    };
    let (pid, out) = interrupt_after(&["run", "echo", "--plugins", ".", "--prompt", "hi"], 1.5);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(130),
        "a shell's status for Ctrl-C: {err}"
    );
    assert!(
        err.contains("interrupted (SIGINT) while the model loaded"),
        "{err}"
    );
    assert_eq!(groups(pid), 0, "{err}");

    // Loaded after 4 s, then 400 tokens at 50 ms.
    let long = "x".repeat(400);
    let (_, out) = interrupt_after(
        &[
            "run",
            "echo",
            "--plugins",
            ".",
            "--prompt",
            &long,
            "--timeout",
            "0",
        ],
        6.0,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("cancelled"), "{err}");

    // Loaded after 4 s, then measuring a long while.
    let (pid, out) = interrupt_after(
        &[
            "bench",
            "echo",
            "--plugins",
            ".",
            "--requests",
            "100000",
            "--concurrency",
            "2",
        ],
        6.0,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("interrupted (SIGINT): the run was abandoned"),
        "{err}"
    );
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert_eq!(groups(pid), 0, "{err}");
}

/// `pio bench --constrained` on a plugin without structured output is refused, as the API
/// refuses the constraint (it printed "constrained" figures of free output).
#[test]
fn bench_refuses_constraints_a_plugin_cannot_hold() {
    let dir = crate::daemon::echo_dir("");
    let out = pio(
        dir.path(),
        &["bench", "echo", "--plugins", ".", "--constrained"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("structured_output"), "{err}");
}

/// A `low` worker dies with the process that started it, even one that cannot notice its socket
/// close (stopped here; stuck in a driver's exit in life): its death signal is set again after
/// the uid switch, which clears it.
#[test]
fn a_busy_low_worker_dies_with_its_daemon() {
    if !confinement_available() {
        return;
    }
    let dir = hostile_dir();
    let mut child = frozen_run(&dir);
    let pid = child.id();
    let workers = || worker_group_procs(pid);
    let until = |done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        done()
    };
    assert!(
        until(&|| !workers().is_empty()),
        "no worker group for pio run {pid}"
    );
    // Stopped in its request by now.
    std::thread::sleep(std::time::Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    let survived = !until(&|| workers().is_empty());
    for pid in workers() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(!survived, "the worker outlived its daemon");
}

/// `pio run hostile --prompt freeze` in `dir`: its worker stops itself inside the request and
/// stays, for tests that look at a live worker.
pub(crate) fn frozen_run(dir: &PluginDir) -> std::process::Child {
    Command::new(pio_bin())
        .current_dir(dir.path())
        .args(["run", "hostile", "--plugins", ".", "--prompt", "freeze"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// The first process of `pid`'s worker cgroup that `which` picks, waited for up to 20 s.
pub(crate) fn worker_process(pid: u32, which: impl Fn(&i32) -> bool) -> Option<i32> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let found = worker_group_procs(pid).into_iter().find(&which);
        if found.is_some() || std::time::Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The processes in the worker cgroup of the `pio` process `pid` (`pio/<name>-<pid>-<n>`, in
/// v1's memory hierarchy or the one v2 tree); none before it exists.
pub(crate) fn worker_group_procs(pid: u32) -> Vec<i32> {
    let suffix = format!("-{pid}-");
    let group = ["/sys/fs/cgroup/memory/pio", "/sys/fs/cgroup/pio"]
        .iter()
        .filter_map(|root| std::fs::read_dir(root).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .find(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.contains(&suffix) && !name.starts_with("probe-")
        });
    group
        .and_then(|g| std::fs::read_to_string(g.path().join("cgroup.procs")).ok())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

/// A library probe is held to a memory limit whatever the plugin's tier: a library that takes
/// more while it is checked is stopped and the check fails (probes run at every daemon start,
/// hot-plug rescan and `pio list`, and took what they liked).
#[test]
fn a_greedy_probe_is_held_to_its_memory_limit() {
    if !confinement_available() {
        return;
    }
    let greedy = hostile_dir_with(&format!("{LIMITS}[model.options]\nprobe_alloc_mb = 1536\n"));
    let out = pio(
        greedy.path(),
        &[
            "check",
            greedy.path().join("hostile.toml").to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the check passed: {err}");
    assert!(err.contains("memory limit"), "{err}");
    let modest = hostile_dir_with(&format!("{LIMITS}[model.options]\nprobe_alloc_mb = 64\n"));
    let out = pio(
        modest.path(),
        &[
            "check",
            modest.path().join("hostile.toml").to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
