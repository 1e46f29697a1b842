//! The `high` and `maximum` tiers, end to end: a user namespace, Landlock and a seccomp
//! allow-list; then an empty root, kill-by-default, a cpuset, a mandatory watchdog and a pinned
//! library.

use std::os::unix::fs::PermissionsExt;

use crate::daemon::Daemon;
use crate::medium::{attack, refused_calls_are_named, tier_dir};
use crate::support::*;
use crate::worker::{confinement_available, run_in};

#[test]
fn high_maps_only_its_own_uid_and_filters_by_allow_list() {
    if !confinement_available() {
        return;
    }
    let dir = tier_dir("high");
    let status = attack(&dir, "status").stdout;
    let uid = crate::support::worker_uid("hostile");
    let (own, map) = (format!("uid={uid} "), format!("uidmap={uid}:{uid}:1 "));
    for expected in [
        own.as_str(),
        map.as_str(),
        "capeff=0000000000000000 ",
        "seccomp=2 ",
    ] {
        assert!(status.contains(expected), "{expected}: {status}");
    }
    let threads = attack(&dir, "threads").stdout;
    assert!(
        threads
            .split("seccomp=")
            .nth(1)
            .unwrap()
            .trim()
            .split(',')
            .all(|m| m == "2"),
        "{threads}"
    );
    // Not on the allow-list: refused, not fatal, at `high`.
    for what in [
        "ptrace 1",
        "mount /mnt",
        "unshare",
        "x32-getpid",
        "setuid-root",
    ] {
        let out = attack(&dir, what).stdout;
        assert!(out.contains("Operation not permitted"), "{what}: {out}");
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let out = attack(&dir, &format!("connect {port}")).stdout;
    assert!(
        out.contains("Operation not permitted"),
        "no TCP sockets at all: {out}"
    );
    refused_calls_are_named(&dir);
}

#[test]
fn landlock_hides_what_the_uid_and_the_mounts_would_let_through() {
    if !confinement_available() {
        return;
    }
    // World-readable on the host: readable at `medium`, not at `high`.
    let medium = attack(&tier_dir("medium"), "read /etc/hostname").stdout;
    assert!(medium.starts_with("read "), "{medium}");
    let dir = tier_dir("high");
    let high = attack(&dir, "read /etc/hostname").stdout;
    assert!(high.contains("Permission denied"), "{high}");
    let model = dir.path().join("model/config.json");
    assert_eq!(
        attack(&dir, &format!("read {}", model.display()))
            .stdout
            .trim(),
        "read 2 bytes"
    );
    assert_eq!(attack(&dir, "write /tmp/scratch").stdout.trim(), "wrote");
    let device = attack(&dir, "read /dev/vda").stdout;
    assert!(device.starts_with("denied:"), "{device}");
}

#[test]
fn maximum_refuses_an_unpinned_library() {
    if !confinement_available() {
        return;
    }
    let dir = tier_dir("maximum");
    let text = std::fs::read_to_string(dir.path().join("hostile.toml")).unwrap();
    let unpinned: String = text
        .lines()
        .filter(|l| !l.starts_with("sha256"))
        .map(|l| format!("{l}\n"))
        .collect();
    dir.write("hostile.toml", &unpinned);
    let ran = run_in(&dir, "hostile", "status", &[]);
    assert!(!ran.ok);
    assert!(ran.stderr.contains("pins no sha256"), "{}", ran.stderr);
}

#[test]
fn maximum_sees_only_its_library_and_model() {
    if !confinement_available() {
        return;
    }
    let dir = tier_dir("maximum");
    let status = attack(&dir, "status").stdout;
    assert!(status.contains("cpus=0 "), "pinned by the cpuset: {status}");
    for host_file in [
        "/etc/hostname",
        "/etc/passwd",
        "/usr/bin/env",
        &format!("/proc/{}/environ", std::process::id()),
    ] {
        let out = attack(&dir, &format!("read {host_file}")).stdout;
        assert!(out.contains("No such file"), "{host_file}: {out}");
    }
    let model = dir.path().join("model/config.json");
    assert_eq!(
        attack(&dir, &format!("read {}", model.display()))
            .stdout
            .trim(),
        "read 2 bytes"
    );
    let out = attack(
        &dir,
        &format!("write {}", dir.path().join("model/new").display()),
    )
    .stdout;
    assert!(
        out.contains("Read-only file system") || out.contains("Permission denied"),
        "{out}"
    );
}

#[test]
fn maximum_kills_on_any_call_off_the_allow_list() {
    if !confinement_available() {
        return;
    }
    let dir = tier_dir("maximum");
    for what in ["ptrace 1", "mount /mnt", "x32-getpid", "connect 9"] {
        let ran = run_in(&dir, "hostile", what, &[]);
        assert!(!ran.ok, "{what}: {}", ran.stdout);
        assert!(
            ran.stderr
                .contains("worker for hostile was killed by SIGSYS"),
            "{what}: {}",
            ran.stderr
        );
    }
}

#[test]
fn the_reaper_answering_refusals_holds_no_privilege() {
    if !confinement_available() {
        return;
    }
    for tier in ["medium", "high"] {
        let out = attack(&tier_dir(tier), "reaper").stdout;
        assert!(
            out.starts_with(
                "capeff=0000000000000000 capprm=0000000000000000 fds=Permission denied"
            ),
            "{tier}: {out}"
        );
    }
}

#[test]
fn a_sleep_interrupted_by_a_stop_resumes_at_every_tier() {
    if !confinement_available() {
        return;
    }
    for tier in ["medium", "high", "maximum"] {
        let ran = run_in(&tier_dir(tier), "hostile", "stop-continue", &[]);
        assert!(
            ran.ok && ran.stdout.starts_with("nanosleep 0: slept"),
            "{tier}: {}{}",
            ran.stdout,
            ran.stderr
        );
    }
}

#[test]
fn a_request_stuck_in_a_loop_hits_the_watchdog() {
    if !confinement_available() {
        return;
    }
    let ran = run_in(&tier_dir("maximum"), "hostile", "loop", &["--timeout", "1"]);
    assert_eq!(ran.code, Some(124), "{}", ran.stderr);
    // The loop never sees the cancel: its worker is stopped after the grace.
    assert!(
        ran.stderr
            .contains("the request did not end when cancelled: its worker is stopped")
            && ran
                .stderr
                .contains("timeout: the request ran past its 1 s deadline"),
        "{}",
        ran.stderr
    );
}

/// A model path given relative to the manifest, through `..` and a symlink, loads in the daemon
/// at every tier: the worker is handed the same resolved path that is mounted for it (at
/// `maximum` it sees nothing else, so an unresolved path through the manifest's folder was "not
/// found").
#[test]
fn a_model_path_through_dotdot_and_a_symlink_loads_at_every_tier() {
    if !confinement_available() {
        return;
    }
    let lib = plugin_lib("pio_plugin_qwen3");
    for tier in ["low", "medium", "high", "maximum"] {
        let dir = PluginDir::new();
        std::fs::create_dir(dir.path().join("m")).unwrap();
        std::os::unix::fs::symlink(
            repo_root().join("tests/fixtures/qwen3-tiny"),
            dir.path().join("m/link"),
        )
        .unwrap();
        let model = "path = \"m/../m/link\"\ndtype = \"f32\"\n";
        dir.write("qwen3.toml", &qwen3_manifest(&lib, tier, model));
        let d = Daemon::start(dir, "");
        d.wait_ready();
        let body = serde_json::json!({"model": "qwen3-4b-instruct-2507", "prompt": "Hello world",
            "max_tokens": 3, "temperature": 0});
        let (status, r) = d.post("/v1/completions", &body);
        assert_eq!(status, 200, "{tier}: {r}");
        assert_eq!(r["usage"]["completion_tokens"], 3, "{tier}: {r}");
    }
}

/// A GGUF file named as the model path (as llama.cpp users have their weights) is served at every
/// tier, the file alone mounted for the worker: the same greedy text as the snapshot it was
/// converted from.
#[test]
fn a_gguf_file_is_served_at_every_tier_as_its_snapshot_is() {
    if !confinement_available() {
        return;
    }
    let lib = plugin_lib("pio_plugin_qwen3");
    let complete = |tier: &str, path: &std::path::Path| {
        let dir = PluginDir::new();
        let model = format!("path = \"{}\"\ndtype = \"f32\"\n", path.display());
        dir.write("qwen3.toml", &qwen3_manifest(&lib, tier, &model));
        let d = Daemon::start(dir, "");
        d.wait_ready();
        let body = serde_json::json!({"model": "qwen3-4b-instruct-2507",
            "messages": [{"role": "user", "content": "Hello world"}],
            "max_tokens": 8, "temperature": 0});
        let (status, r) = d.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{tier}: {r}");
        assert_eq!(r["usage"]["completion_tokens"], 8, "{tier}: {r}");
        (
            r["choices"][0]["message"]["content"].clone(),
            r["usage"]["prompt_tokens"].clone(),
        )
    };
    let want = complete("low", &repo_root().join("tests/fixtures/qwen3-tiny"));
    let file = repo_root().join("tests/fixtures/gguf/qwen3-tiny.f32.gguf");
    for tier in ["low", "medium", "high", "maximum"] {
        assert_eq!(complete(tier, &file), want, "{tier}");
    }
}

/// The quantization cache folder of the manifest is created for the confined worker, writable to
/// it alone among the host's folders: `pio quantize` (or a first start) writes the cache there,
/// later starts read their weights from it, at `high` and `maximum`; the cache file may be larger
/// than the scratch (whose size is otherwise every file's limit).
#[test]
fn a_confined_worker_keeps_its_quantization_cache_between_starts() {
    if !confinement_available() {
        return;
    }
    let lib = plugin_lib("pio_plugin_qwen3_coder");
    // Traversable by the worker's user (a fresh temporary folder is 0700, root's).
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for tier in ["high", "maximum"] {
        let cache = work.path().join(format!("cache-{tier}"));
        let dir = PluginDir::new();
        let extra = format!(
            "sha256 = \"{}\"\n[limits]\nmemory = \"2GiB\"\ncpus = 2\nscratch = \"64KiB\"\n[model]\npath = \"{}\"\nquantization = \"q4\"\nquantization_cache = \"{}\"\n",
            sha256_of(&lib),
            repo_root().join("tests/fixtures/qwen3-moe-tiny").display(),
            cache.display()
        );
        let text = manifest("qwen3-coder-30b", "0.1.0", lib.to_str().unwrap(), &extra)
            .replace("tier = \"low\"", &format!("tier = \"{tier}\""));
        dir.write("coder.toml", &text);
        let args = [
            "run",
            "qwen3-coder-30b",
            "--plugins",
            ".",
            "--prompt",
            "def add(a, b):",
            "--temperature",
            "0",
            "--max-tokens",
            "8",
        ];
        // At `high` ahead of time with `pio quantize`, at `maximum` by a first run.
        let first = if tier == "high" {
            pio(
                dir.path(),
                &["quantize", "qwen3-coder-30b", "--plugins", "."],
            )
        } else {
            pio(dir.path(), &args)
        };
        let stderr = String::from_utf8_lossy(&first.stderr);
        assert!(first.status.success(), "{tier}: {stderr}");
        assert!(
            stderr.contains("wrote the quantization cache"),
            "{tier}: {stderr}"
        );
        // Made for the plugin's own uid alone (the workers share a gid).
        let meta = std::fs::metadata(&cache).unwrap();
        use std::os::unix::fs::MetadataExt;
        let owner = crate::support::worker_uid("qwen3-coder-30b");
        assert_eq!((meta.uid(), meta.mode() & 0o777), (owner, 0o700), "{tier}");
        let files: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(
            files.len(),
            1,
            "{tier}: one cache file, no leftovers: {files:?}"
        );
        if tier == "high" {
            let listed = String::from_utf8_lossy(&first.stdout);
            assert_eq!(listed.trim(), files[0].display().to_string());
        }

        let second = pio(dir.path(), &args);
        let stderr = String::from_utf8_lossy(&second.stderr);
        assert!(second.status.success(), "{tier}: {stderr}");
        assert!(
            stderr.contains("quantized weights from"),
            "{tier}: {stderr}"
        );
        assert!(
            !stderr.contains("wrote the quantization cache"),
            "{tier}: {stderr}"
        );
        let third = pio(dir.path(), &args);
        assert_eq!(
            second.stdout, third.stdout,
            "{tier}: the same answer from the cache"
        );
        if tier == "high" {
            // A folder shared with other models: `pio quantize` names this one's file alone.
            let other = cache.join("other-q4-00000000.pio-cache.gguf");
            std::fs::write(&other, b"another model's").unwrap();
            let again = pio(
                dir.path(),
                &["quantize", "qwen3-coder-30b", "--plugins", "."],
            );
            let listed = String::from_utf8_lossy(&again.stdout);
            assert_eq!(listed.trim(), files[0].display().to_string());
            std::fs::remove_file(other).unwrap();
        }
    }
}

/// Root owns a `high` worker's user namespace: a process of the workers' shared uid (here a
/// `low` worker) holds no capability in it, and cannot trace the worker.
#[test]
fn a_low_worker_cannot_trace_a_high_one() {
    if !confinement_available() {
        return;
    }
    let high = tier_dir("high");
    let mut frozen = crate::worker::frozen_run(&high);
    let run = frozen.id();
    // The worker: of the run's processes, the one in a user namespace of its own.
    let uid = crate::support::worker_uid("hostile").to_string();
    let own_namespace = |pid: &i32| {
        std::fs::read_to_string(format!("/proc/{pid}/uid_map"))
            .is_ok_and(|m| m.split_whitespace().collect::<Vec<_>>() == [&uid, &uid, "1"])
    };
    let worker = crate::worker::worker_process(run, own_namespace);
    let low = crate::worker::hostile_low_dir();
    let tried = worker.map(|pid| run_in(&low, "hostile", &format!("ptrace {pid}"), &[]).stdout);
    let owner = worker.map(namespace_owner);
    let _ = frozen.kill();
    let _ = frozen.wait();
    let out = tried.expect("the high worker in its own user namespace");
    assert!(out.contains("denied"), "{out}");
    // Owned by the uid it was made as: made after the switch, the workers' uid owned it, and a
    // `low` worker held every capability in it (the non-dumpable flag and the address space's
    // namespace are what stopped the trace above).
    assert_eq!(owner, Some(0), "the owner of the worker's user namespace");
}

/// The uid owning the user namespace of process `pid` (`NS_GET_OWNER_UID`).
fn namespace_owner(pid: i32) -> u32 {
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/user")).unwrap();
    let mut uid: libc::uid_t = u32::MAX;
    // SAFETY: NS_GET_OWNER_UID (_IO(0xb7, 0x4)) writes one uid_t through the pointer.
    let r = unsafe { libc::ioctl(ns.as_raw_fd(), 0xb704, &mut uid as *mut libc::uid_t) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    uid
}
