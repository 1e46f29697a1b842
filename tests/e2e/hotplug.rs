//! The daemon's life with its plugins: dropped in, replaced and removed while requests run (none
//! may fail), a client disconnecting mid-stream, and SIGTERM draining.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::daemon::*;
use crate::support::*;
use crate::worker::confinement_available;

fn stream_request(text: &str) -> Value {
    json!({"model": "echo", "stream": true, "messages": [{"role": "user", "content": text}]})
}

/// Echo's completion of "hello world" under its manifest's default `max_tokens` (each test's
/// versions of the manifest set another, which the answer's length shows).
fn echo_answer(d: &Daemon) -> String {
    let (_, r) = d.post(
        "/v1/completions",
        &json!({"model": "echo", "prompt": "hello world", "temperature": 0}),
    );
    r["choices"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn pid_alive(pid: &Value) -> bool {
    pid.as_u64()
        .is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
}

#[test]
fn plugins_are_dropped_in_replaced_and_removed_while_requests_run() {
    if !confinement_available() {
        return;
    }
    let d = Arc::new(Daemon::start(
        PluginDir::new(),
        "[server]\ndrain_timeout_secs = 30\n",
    ));
    d.wait_ready();
    assert_eq!(d.get("/v1/models").1["data"], json!([]));

    // A bad drop-in is reported and changes nothing.
    d.dir.write(
        "broken.toml",
        &manifest("broken", "0.1.0", "libmissing.so", ""),
    );
    d.wait_for(20, "the broken drop-in to be reported", |d| {
        d.get("/v1/plugins").1["errors"]
            .as_array()
            .is_some_and(|e| {
                e.iter().any(|x| {
                    x["manifest"]
                        .as_str()
                        .is_some_and(|m| m.ends_with("broken.toml"))
                })
            })
    });

    let library = d.dir.copy_lib("pio_plugin_echo", "libecho.so");
    d.dir.write(
        "echo.toml",
        &manifest(
            "echo",
            "0.1.0",
            "libecho.so",
            "[model.options]\ndelay_ms = 2\n",
        ),
    );
    d.wait_for(30, "echo to load", |d| d.plugin("echo")["state"] == "ready");
    let first = d.plugin("echo");

    // Clients stream without pause through the replacement and the removal.
    let (stop, ok, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let clients: Vec<_> = (0..3)
        .map(|i| {
            let (d, stop, ok, failed) = (d.clone(), stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let text = format!("client {i} says hello");
                while !stop.load(Ordering::Acquire) {
                    match d.try_stream("/v1/chat/completions", &stream_request(&text)) {
                        Ok(events) => {
                            let (got, done) = Daemon::chat_text(events);
                            if got == text && done {
                                ok.fetch_add(1, Ordering::AcqRel);
                            } else {
                                eprintln!("client {i}: incomplete stream {got:?} (done: {done})");
                                failed.fetch_add(1, Ordering::AcqRel);
                            }
                        }
                        // Removed: the model is gone, as it should be once unplugged.
                        Err((404, _)) => return,
                        Err((status, body)) => {
                            eprintln!("client {i}: {status} {body}");
                            failed.fetch_add(1, Ordering::AcqRel);
                        }
                    }
                }
            })
        })
        .collect();
    d.wait_for(10, "traffic", |_| ok.load(Ordering::Acquire) >= 3);

    // Replaced in place (truncated and rewritten, as `cp` does): reloaded blue/green.
    let mut bytes = std::fs::read(&library).expect("read library");
    bytes.extend_from_slice(b"\0a new build");
    std::fs::write(&library, bytes).expect("rewrite library");
    d.wait_for(30, "the reload", |d| {
        let p = d.plugin("echo");
        p["state"] == "ready" && p["pid"] != first["pid"] && p["reloading"] == false
    });
    d.wait_for(10, "the old worker to drain and stop", |_| {
        !pid_alive(&first["pid"])
    });
    let served = ok.load(Ordering::Acquire);
    d.wait_for(10, "traffic on the new worker", |_| {
        ok.load(Ordering::Acquire) >= served + 3
    });
    let second = d.plugin("echo");

    // Removed: drained and unloaded.
    std::fs::remove_file(d.plugin_path("echo.toml")).expect("remove manifest");
    d.wait_for(30, "the removal", |d| d.plugin("echo").is_null());
    stop.store(true, Ordering::Release);
    for c in clients {
        c.join().expect("client thread");
    }
    d.wait_for(10, "the last worker to stop", |_| {
        !pid_alive(&second["pid"])
    });
    assert_eq!(
        failed.load(Ordering::Acquire),
        0,
        "no request failed; logs:\n{}",
        d.logs()
    );
    assert!(ok.load(Ordering::Acquire) >= 6);
}

/// A manifest dropped in before its model is reported, keeps the daemon ready, and loads once the
/// model is there.
#[test]
fn a_plugin_dropped_in_before_its_model_loads_when_the_model_arrives() {
    if !confinement_available() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start(PluginDir::new(), "");
    d.wait_ready();
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d.dir.copy_lib("pio_plugin_echo", "libecho.so");
    d.dir.write(
        "echo.toml",
        &manifest("echo", "0.1.0", "libecho.so", "[model]\npath = \"later\"\n"),
    );
    let error = |d: &Daemon| {
        d.get("/v1/plugins").1["errors"].as_array().and_then(|e| {
            e.iter()
                .find(|x| {
                    x["manifest"]
                        .as_str()
                        .is_some_and(|m| m.ends_with("echo.toml"))
                })
                .map(|x| x["error"].as_str().unwrap_or_default().to_string())
        })
    };
    d.wait_for(20, "the missing model to be reported", |d| {
        error(d).is_some()
    });
    let why = error(&d).unwrap();
    assert!(why.contains("later does not exist"), "{why}");
    assert_eq!(
        d.get("/ready").0,
        200,
        "a drop-in without its model took the daemon out"
    );

    std::fs::create_dir(d.dir.path().join("later")).unwrap();
    d.wait_for(30, "echo to load", |d| d.plugin("echo")["state"] == "ready");
    assert_eq!(error(&d), None);
}

#[test]
fn a_client_that_disconnects_cancels_its_generation() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(echo_dir("[model.options]\ndelay_ms = 50\n"), "");
    d.wait_ready();
    // 200 tokens at 50 ms: 10 s if nobody stops it.
    let mut events = d.stream("/v1/chat/completions", &stream_request(&"x".repeat(200)));
    for _ in 0..3 {
        events.next().expect("a chunk");
    }
    assert_eq!(d.plugin("echo")["requests_in_flight"], 1);
    drop(events);
    d.wait_for(3, "the worker to stop generating", |d| {
        let p = d.plugin("echo");
        p["requests_in_flight"] == 0 && p["requests"] == 0
    });
    let metrics = d.get_text("/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == "pio_requests_total{model=\"echo\",endpoint=\"chat\",status=\"499\"} 1"),
        "{metrics}"
    );
    // The tokens it got before the client left count, as its latencies do.
    let value = |name: &str| {
        let prefix = format!("{name}{{model=\"echo\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    let generated = value("pio_generated_tokens_total");
    assert!(generated >= 2.0, "{metrics}");
    assert_eq!(
        generated,
        value("pio_time_to_first_token_seconds_count")
            + value("pio_inter_token_latency_seconds_count"),
        "{metrics}"
    );
}

#[test]
fn a_client_that_disconnects_before_a_whole_answer_cancels_it_too() {
    if !confinement_available() {
        return;
    }
    use std::io::Write;
    let d = Daemon::start(echo_dir("[model.options]\ndelay_ms = 50\n"), "");
    d.wait_ready();
    let body = json!({"model": "echo", "messages": [{"role": "user", "content": "y".repeat(200)}]})
        .to_string();
    let addr = d.base.trim_start_matches("http://").to_string();
    let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    d.wait_for(5, "the request to run", |d| {
        d.plugin("echo")["requests_in_flight"] == 1
    });
    drop(conn);
    d.wait_for(3, "the worker to stop generating", |d| {
        let p = d.plugin("echo");
        p["requests_in_flight"] == 0 && p["requests"] == 0
    });
}

fn cgroups_of(daemon_pid: u32) -> Vec<String> {
    let prefix = format!("echo-{daemon_pid}-");
    [
        "/sys/fs/cgroup/memory/pio",
        "/sys/fs/cgroup/unified/pio",
        "/sys/fs/cgroup/pio",
    ]
    .iter()
    .filter_map(|dir| std::fs::read_dir(dir).ok())
    .flat_map(|entries| entries.flatten())
    .map(|e| e.file_name().to_string_lossy().into_owned())
    .filter(|n| n.starts_with(&prefix))
    .collect()
}

#[test]
fn sigterm_lets_requests_finish_then_stops_workers_and_removes_cgroups() {
    if !confinement_available() {
        return;
    }
    let mut d = Daemon::start(echo_dir("[model.options]\ndelay_ms = 20\n"), "");
    d.wait_ready();
    let worker = d.plugin("echo")["pid"].clone();
    assert!(!cgroups_of(d.pid()).is_empty(), "the worker has a cgroup");
    let text: String = ('a'..='z').cycle().take(60).collect();
    let events = d.stream("/v1/chat/completions", &stream_request(&text));
    d.wait_for(5, "the request to run", |d| {
        d.plugin("echo")["requests"] == 1
    });
    d.terminate();
    let (got, done) = Daemon::chat_text(events);
    assert_eq!(
        (got.as_str(), done),
        (text.as_str(), true),
        "the request in flight finished"
    );
    let status = d.wait_exit(30);
    assert!(
        status.success(),
        "pio serve exited with {status}; logs:\n{}",
        d.logs()
    );
    let addr = d.base.trim_start_matches("http://").to_string();
    assert!(std::net::TcpStream::connect_timeout(
        &addr.parse().expect("address"),
        Duration::from_secs(1)
    )
    .is_err());
    assert!(!pid_alive(&worker), "the worker stopped");
    assert_eq!(
        cgroups_of(d.pid()),
        Vec::<String>::new(),
        "its cgroups are gone"
    );
    assert!(d.logs().contains("SIGTERM: draining"), "{}", d.logs());
}

/// A second SIGTERM during the drain stops the requests still running at once instead of
/// waiting out `drain_timeout_secs`; they are told the model was stopped (503: another replica
/// may serve them), not that its worker crashed.
#[test]
fn a_second_sigterm_ends_the_drain_at_once() {
    if !confinement_available() {
        return;
    }
    let d = Arc::new(Daemon::start(
        echo_dir("[model.options]\ndelay_ms = 100\n"),
        "[server]\ndrain_timeout_secs = 60\n",
    ));
    d.wait_ready();
    // 300 tokens at 100 ms: half a minute if nobody stops it.
    let body = json!({"model": "echo", "messages": [{"role": "user", "content": "y".repeat(300)}]});
    let running = {
        let d = d.clone();
        std::thread::spawn(move || d.post("/v1/chat/completions", &body))
    };
    d.wait_for(5, "the request to run", |d| {
        d.plugin("echo")["requests"] == 1
    });
    d.terminate();
    std::thread::sleep(Duration::from_millis(500));
    let started = std::time::Instant::now();
    d.terminate();
    let (status, r) = running.join().unwrap();
    let mut d = Arc::try_unwrap(d).ok().expect("the client thread is done");
    d.wait_exit(15);
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(d.logs().contains("a second SIGTERM came"), "{}", d.logs());
    assert_eq!(
        (status, r["error"]["code"].as_str()),
        (503, Some("model_unavailable")),
        "{r}"
    );
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("was stopped"),
        "{r}"
    );
}

/// A served version whose files break goes on serving (its worker runs a private copy), and an
/// older version left superseded beside it does not take its place unasked: the break is
/// listed and nothing else changes. Once it is unloaded, the older version loads instead of the
/// broken files; a fix brings the newer one back.
#[test]
fn a_broken_update_keeps_the_served_version_instead_of_an_older_one() {
    if !confinement_available() {
        return;
    }
    let dir = PluginDir::new();
    // The echo template built against plugin-api 1.0 reports version 0.0.9.
    dir.copy_lib("pio_test_plugin_old_minor", "libold.so");
    dir.write("old.toml", &manifest("echo", "0.0.9", "libold.so", ""));
    let library = dir.copy_lib("pio_plugin_echo", "libecho.so");
    dir.write("echo.toml", &manifest("echo", "0.1.0", "libecho.so", ""));
    let d = Daemon::start(dir, "");
    d.wait_ready();
    let served = d.plugin("echo");
    assert_eq!(served["version"], "0.1.0", "{served}");

    let good = std::fs::read(&library).expect("read library");
    std::fs::write(&library, b"not a library").expect("break the library");
    d.wait_for(20, "the broken update to be reported", |d| {
        d.get("/v1/plugins").1["errors"]
            .as_array()
            .is_some_and(|e| !e.is_empty())
    });
    // Another settle's worth: a switch would have begun by now.
    std::thread::sleep(Duration::from_secs(2));
    let now = d.plugin("echo");
    assert_eq!(now["version"], "0.1.0", "{now}");
    assert_eq!(now["pid"], served["pid"], "the same worker serves: {now}");
    assert_eq!(now["reloading"], false, "{now}");
    let asked = json!({"model": "echo", "messages": [{"role": "user", "content": "still here"}]});
    let (status, r) = d.post("/v1/chat/completions", &asked);
    assert_eq!(status, 200, "{r}");

    // Once nothing of 0.1.0 runs any more, the next load serves what is there: 0.0.9, not the
    // broken files.
    assert_eq!(d.post("/v1/plugins/echo/unload", &json!({})).0, 200);
    let (status, r) = d.post("/v1/chat/completions", &asked);
    assert_eq!(status, 200, "{r}");
    assert_eq!(d.plugin("echo")["version"], "0.0.9");

    // Fixed (a new build): 0.1.0 again, blue/green.
    let mut fixed = good;
    fixed.extend_from_slice(b"\0a new build");
    std::fs::write(&library, fixed).expect("fix the library");
    d.wait_for(30, "the fixed build to load", |d| {
        let p = d.plugin("echo");
        p["version"] == "0.1.0" && p["state"] == "ready" && p["reloading"] == false
    });
}

/// With hot plug off, an admin reload runs the files as they are now (not as last checked):
/// a changed manifest's limits apply, and files that fail their checks are refused with why
/// while the running version serves on.
#[test]
fn an_admin_reload_checks_the_files_again() {
    if !confinement_available() {
        return;
    }
    let limits = |m: &str| format!("[limits]\nmemory = \"{m}\"\n");
    let with_memory = |m: &str| manifest("echo", "0.1.0", "libecho.so", &limits(m));
    let d = Daemon::start(echo_dir(&limits("64MiB")), "[server]\nwatch = false\n");
    d.wait_ready();
    assert_eq!(d.plugin("echo")["memory_limit_bytes"], 64 << 20);

    d.dir.write("echo.toml", &with_memory("96MiB"));
    let (status, r) = d.post("/v1/plugins/echo/reload", &json!({}));
    assert_eq!(status, 200, "{r}");
    assert_eq!(d.plugin("echo")["memory_limit_bytes"], 96 << 20);
    let served = d.plugin("echo");

    d.dir.write("echo.toml", "name = \"echo\"\n");
    let (status, r) = d.post("/v1/plugins/echo/reload", &json!({}));
    assert_eq!(status, 409, "{r}");
    let message = r["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("fails its checks") && message.contains("missing field"),
        "{r}"
    );
    let now = d.plugin("echo");
    assert_eq!(
        now["pid"], served["pid"],
        "the running worker serves on: {now}"
    );
    assert_eq!(now["state"], "ready", "{now}");
}

/// A change that arrives while the model reloads for an earlier one is not lost: the reload
/// under way loads what it started with, then the newest files are loaded (before, the rescan
/// recorded the change, its own reload was refused as "already reloading", and the older
/// files served for good). Each version of the manifest sets another default `max_tokens`,
/// which echo's answer shows.
#[test]
fn a_change_during_a_reload_is_loaded_after_it() {
    if !confinement_available() {
        return;
    }
    let echo = |max_tokens: u32| {
        let extra = format!(
            "[model.options]\nload_delay_ms = 2000\n[model.generation]\nmax_tokens = {max_tokens}\n"
        );
        manifest("echo", "0.1.0", "libecho.so", &extra)
    };
    let dir = PluginDir::new();
    dir.copy_lib("pio_plugin_echo", "libecho.so");
    dir.write("echo.toml", &echo(1));
    let d = Daemon::start(dir, "");
    d.wait_ready();
    assert_eq!(echo_answer(&d), "h");
    d.dir.write("echo.toml", &echo(2));
    d.wait_for(20, "the reload for the first change to start", |d| {
        d.plugin("echo")["reloading"] == true
    });
    d.dir.write("echo.toml", &echo(3));
    d.wait_for(30, "the second change to serve", |d| {
        echo_answer(d) == "hel"
    });
    // The same while it loads: unloaded on purpose, then loaded again with a change under way.
    assert_eq!(d.post("/v1/plugins/echo/unload", &json!({})).0, 200);
    let load = std::thread::scope(|s| {
        let load = s.spawn(|| d.post("/v1/plugins/echo/load", &json!({})));
        d.wait_for(20, "the load to start", |d| {
            d.plugin("echo")["state"] == "loading"
        });
        d.dir.write("echo.toml", &echo(4));
        load.join().unwrap()
    });
    assert_eq!(load.0, 200, "{}", load.1);
    d.wait_for(30, "the change made while it loaded to serve", |d| {
        echo_answer(d) == "hell"
    });
}

/// A fix pushed while a broken version reloads is loaded once that reload fails (before, the
/// rescan's reload was refused as one was under way, only a success caught up, and the old
/// version served until something else changed).
#[test]
fn a_change_during_a_failing_reload_is_loaded_after_it() {
    if !confinement_available() {
        return;
    }
    let echo = |max_tokens: u32, broken: bool| {
        let mut extra = format!("[model.generation]\nmax_tokens = {max_tokens}\n");
        if broken {
            extra = format!(
                "[model.options]\nload_delay_ms = 3000\nload_error = \"weights torn\"\n{extra}"
            );
        }
        manifest("echo", "0.1.0", "libecho.so", &extra)
    };
    let dir = PluginDir::new();
    dir.copy_lib("pio_plugin_echo", "libecho.so");
    dir.write("echo.toml", &echo(1, false));
    let d = Daemon::start(dir, "[server]\nreload_strategy = \"blue-green\"\n");
    d.wait_ready();
    assert_eq!(echo_answer(&d), "h");
    d.dir.write("echo.toml", &echo(2, true));
    d.wait_for(20, "the broken version's reload to start", |d| {
        d.plugin("echo")["reloading"] == true
    });
    d.dir.write("echo.toml", &echo(3, false));
    d.wait_for(30, "the fix to serve", |d| echo_answer(d) == "hel");
}

/// A manifest renamed with nothing in it changed is the same plugin, not reloaded, and the
/// daemon follows it to its new name: an admin reload reads it there (before, it read the old
/// path and failed), and `/v1/plugins` names it.
#[test]
fn a_renamed_manifest_is_followed_to_its_new_name() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(echo_dir(""), "");
    d.wait_ready();
    let pid = d.plugin("echo")["pid"].clone();
    std::fs::rename(
        d.dir.path().join("echo.toml"),
        d.dir.path().join("served.toml"),
    )
    .unwrap();
    d.wait_for(30, "the new name", |d| {
        d.plugin("echo")["manifest"]
            .as_str()
            .is_some_and(|m| m.ends_with("served.toml"))
    });
    assert_eq!(d.plugin("echo")["pid"], pid, "the same files: not reloaded");
    let (status, r) = d.post("/v1/plugins/echo/reload", &json!({}));
    assert_eq!(status, 200, "{r}");
}

/// A manifest dropped in while the daemon's first scan still runs (a slow probe) is served
/// without waiting for some later change: the directories are watched from before that scan.
#[test]
fn a_plugin_dropped_in_during_the_first_scan_is_found() {
    if !confinement_available() {
        return;
    }
    let dir = PluginDir::new();
    dir.copy_lib("pio_test_plugin_hostile", "libhostile.so");
    dir.copy_lib("pio_plugin_echo", "libecho.so");
    let slow = "plugin = \"hostile\"\n[model.options]\nprobe_sleep_ms = 3000\n";
    dir.write(
        "slow.toml",
        &manifest("slow", "0.1.0", "libhostile.so", slow),
    );
    let (path, echo) = (
        dir.path().join("echo.toml"),
        manifest("echo", "0.1.0", "libecho.so", ""),
    );
    let dropper = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(1000));
        std::fs::write(path, echo).unwrap();
    });
    let d = Daemon::start(dir, "");
    dropper.join().unwrap();
    d.wait_for(30, "echo", |d| d.plugin("echo")["name"] == "echo");
}

/// A plugin removed and added back while it loads: the first load, ending after, is not put over
/// the second's entry (it was: two workers of one model at once, and one dropped undrained as
/// the second load ended over it).
#[test]
fn a_plugin_removed_and_added_back_while_it_loads_keeps_one_worker() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(echo_dir("[model.options]\nload_delay_ms = 6000\n"), "");
    d.wait_for(20, "the load to start", |d| {
        d.plugin("echo")["state"] == "loading"
    });
    let path = d.dir.path().join("echo.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    d.wait_for(20, "the plugin to go", |d| d.plugin("echo").is_null());
    d.dir.write("echo.toml", &text);
    d.wait_for(40, "the plugin to load again", |d| {
        d.plugin("echo")["state"] == "ready"
    });
    let pid = d.plugin("echo")["pid"].clone();
    std::thread::sleep(std::time::Duration::from_secs(7));
    let now = d.plugin("echo");
    assert_eq!(now["pid"], pid, "{now:#}\nlogs:\n{}", d.logs());
}

/// A plugin folder named through a link that is pointed at another release (`ln -sfn`, a new
/// link renamed over the old): the other release is served. The watch stayed on the old folder,
/// where nothing changes, so hot plug went quiet for good.
#[test]
fn a_plugin_folder_link_pointed_elsewhere_is_followed() {
    use std::os::unix::fs::PermissionsExt;
    if !confinement_available() {
        return;
    }
    let releases = tempfile::tempdir().unwrap();
    std::fs::set_permissions(releases.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let one = echo_dir("[model.generation]\nmax_tokens = 1\n");
    let two = echo_dir("[model.generation]\nmax_tokens = 3\n");
    let link = releases.path().join("current");
    std::os::unix::fs::symlink(one.path(), &link).unwrap();
    let d = Daemon::start_with(PluginDir::new(), "", &["--plugins", link.to_str().unwrap()]);
    d.wait_ready();
    assert_eq!(echo_answer(&d), "h");
    let next = releases.path().join("next");
    std::os::unix::fs::symlink(two.path(), &next).unwrap();
    std::fs::rename(&next, &link).unwrap();
    d.wait_for(30, "the other release to serve", |d| {
        echo_answer(d) == "hel"
    });
    // The folder removed and made anew: watched again, and what it holds served.
    std::fs::remove_file(&link).unwrap();
    let three = echo_dir("[model.generation]\nmax_tokens = 2\n");
    std::os::unix::fs::symlink(three.path(), &link).unwrap();
    d.wait_for(30, "the third release to serve", |d| echo_answer(d) == "he");
    drop((one, two, three));
}

/// While the daemon drains to stop, a plugin dropped into its folder loads nothing and a SIGHUP
/// reloads nothing (both started loads the stop neither waited for nor drained; their workers
/// died with the daemon, unreaped).
#[test]
fn changes_during_the_drain_start_nothing() {
    if !confinement_available() {
        return;
    }
    let mut d = Daemon::start(
        echo_dir("[model.options]\ndelay_ms = 50\n"),
        "[server]\ndrain_timeout_secs = 30\n",
    );
    d.wait_ready();
    // A request of a few seconds keeps the drain going.
    let text: String = ('a'..='z').cycle().take(100).collect();
    let events = d.stream("/v1/chat/completions", &stream_request(&text));
    d.wait_for(5, "the request to run", |d| {
        d.plugin("echo")["requests"] == 1
    });
    d.terminate();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.logs().contains("draining") {
        assert!(Instant::now() < deadline, "no drain: {}", d.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    d.dir.copy_lib("pio_plugin_echo", "libecho2.so");
    d.dir
        .write("echo2.toml", &manifest("echo2", "0.1.0", "libecho2.so", ""));
    let status = std::process::Command::new("kill")
        .args(["-HUP", &d.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    std::thread::sleep(Duration::from_secs(3));
    let logs = d.logs();
    assert!(!logs.contains("plugin=echo2"), "{logs}");
    assert!(
        logs.contains("not acted on") && logs.contains("not reloaded"),
        "{logs}"
    );
    let (got, done) = Daemon::chat_text(events);
    assert_eq!(
        (got.as_str(), done),
        (text.as_str(), true),
        "the request finished"
    );
    assert!(d.wait_exit(30).success(), "{}", d.logs());
}
