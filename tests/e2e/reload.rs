//! `SIGHUP` against the real daemon: keys and limits change without dropping a request in
//! flight; a bad file is refused with the reason and the running configuration kept; keys that
//! need a restart are named.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::daemon::*;
use crate::worker::confinement_available;

fn hangup(d: &Daemon) {
    send(d.pid(), "-HUP");
}

/// `kill <signal> <pid>`.
fn send(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// `pio serve --listen 127.0.0.1:0` with `args`, its log lines on a channel as they come.
fn serve_logging(
    args: &[&std::ffi::OsStr],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(crate::support::pio_bin())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Waits up to ten seconds for `check`.
fn eventually(what: &str, d: &Daemon, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "{what}; logs:\n{}", d.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sighup_reloads_keys_and_limits_keeps_requests_and_refuses_a_bad_file() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(
        echo_dir("[model.options]\ndelay_ms = 20\n"),
        "[server]\napi_keys = [\"old\"]\n",
    );
    d.wait_ready();
    let ask = |key: &str, max_tokens: u32| {
        let body = json!({"model": "echo", "prompt": "y".repeat(60), "max_tokens": max_tokens});
        d.post_raw("/v1/completions", &body.to_string(), Some(key))
    };
    assert_eq!(ask("old", 2).0, 200);

    std::thread::scope(|scope| {
        // 60 tokens at 20 ms: in flight while the configuration changes under it.
        let running = scope.spawn(|| ask("old", 60));
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(
            d.config_path(),
            "[server]\napi_keys = [\"new\"]\nmax_tokens_limit = 5\n",
        )
        .unwrap();
        hangup(&d);
        eventually("the new key is accepted", &d, || ask("new", 2).0 == 200);
        let (status, r) = running.join().unwrap();
        assert_eq!(status, 200, "{r}");
        assert_eq!(
            r["choices"][0]["text"],
            "y".repeat(60),
            "the request in flight finished"
        );
    });
    assert_eq!(ask("old", 2).0, 401, "the old key is gone");
    let (status, r) = ask("new", 10);
    assert_eq!(status, 400, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens_limit"),
        "{r}"
    );

    std::fs::write(d.config_path(), "[server\napi_keys = [").unwrap();
    hangup(&d);
    eventually("the bad file is refused", &d, || {
        d.logs().contains("kept the running configuration")
    });
    assert!(d.logs().contains("pio.toml"), "the refusal names the file");
    assert_eq!(ask("new", 2).0, 200, "the running configuration stays");

    std::fs::write(
        d.config_path(),
        "[server]\napi_keys = [\"new\"]\nlisten = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    hangup(&d);
    eventually("a restart-only key is named", &d, || {
        d.logs().contains("server.listen changed")
    });
    assert_eq!(ask("new", 10).0, 200, "max_tokens_limit is back to none");
    assert_eq!(d.get("/health").0, 200, "still listening where it was");

    // Back to the values in force: nothing waits for a restart any more.
    let reloads = |d: &Daemon| d.logs().matches("configuration reloaded").count();
    let before = reloads(&d);
    std::fs::write(d.config_path(), "[server]\napi_keys = [\"new\"]\n").unwrap();
    hangup(&d);
    eventually("the file is read again", &d, || reloads(&d) > before);
    assert_eq!(
        d.logs().matches("server.listen changed").count(),
        1,
        "the file matches what runs: {}",
        d.logs()
    );
}

/// Started without `--config`, the daemon has nothing to reload: SIGHUP is logged, and it
/// serves on (the signal's default action would have stopped it).
#[test]
fn sighup_without_a_config_file_changes_nothing_and_stops_nothing() {
    if !confinement_available() {
        return;
    }
    let dir = echo_dir("");
    let (mut child, rx) = serve_logging(&["--plugins".as_ref(), dir.path().as_os_str()]);
    let wait_for = |needle: &str| loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no `{needle}` in the logs"));
        if line.contains(needle) {
            return;
        }
    };
    wait_for("model loaded");
    send(child.id(), "-HUP");
    wait_for("no configuration file to reload");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        child.try_wait().unwrap().is_none(),
        "pio serve stopped on SIGHUP"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// A SIGHUP while the daemon starts (its probes may take seconds) neither stops it, as the
/// signal's default action would, nor is lost: the file is reloaded once it serves.
#[test]
fn sighup_during_start_up_is_acted_on_once_serving() {
    if !confinement_available() {
        return;
    }
    let dir = crate::daemon::echo_and_hostile_dir();
    dir.write("slow-probe", "");
    let config = tempfile::tempdir().unwrap();
    let file = config.path().join("pio.toml");
    std::fs::write(&file, "[server]\nwarmup = false\n").unwrap();
    let (mut child, rx) = serve_logging(&[
        "--config".as_ref(),
        file.as_os_str(),
        "--plugins".as_ref(),
        dir.path().as_os_str(),
    ]);
    std::thread::sleep(Duration::from_millis(1000));
    send(child.id(), "-HUP");
    let mut seen: Vec<String> = Vec::new();
    let wanted = ["listening on", "SIGHUP: configuration reloaded"];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !wanted.iter().all(|w| seen.iter().any(|l| l.contains(w)))
        && std::time::Instant::now() < deadline
    {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push(line);
        }
    }
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    for w in wanted {
        assert!(seen.iter().any(|l| l.contains(w)), "no `{w}` in {seen:#?}");
    }
    assert!(alive, "pio serve stopped on SIGHUP");
}

/// A reload's supervision reaches the plugin already serving, not only workers started after
/// it: a request deadline set by SIGHUP cancels the next long request on the worker that was
/// running before (under the old 600 s it would run its 5 s to the end).
#[test]
fn sighup_puts_a_new_request_deadline_on_the_serving_worker() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(
        echo_dir("[model.options]\ndelay_ms = 100\n"),
        "[supervisor]\nrequest_timeout_secs = 600\n",
    );
    d.wait_ready();
    let pid = d.plugin("echo")["pid"].clone();
    let reloads = |d: &Daemon| d.logs().matches("configuration reloaded").count();
    let before = reloads(&d);
    std::fs::write(d.config_path(), "[supervisor]\nrequest_timeout_secs = 1\n").unwrap();
    hangup(&d);
    eventually("the file is read again", &d, || reloads(&d) > before);
    let body = json!({"model": "echo", "messages": [{"role": "user", "content": "x".repeat(50)}]});
    let (status, r) = d.post("/v1/chat/completions", &body);
    assert_eq!(
        (status, r["error"]["code"].as_str()),
        (504, Some("timeout")),
        "{r}"
    );
    assert_eq!(
        d.plugin("echo")["pid"],
        pid,
        "the worker from before the reload"
    );
}

/// A SIGTERM while the daemon starts stops it as one after (exit 0, saying so), not by the
/// signal's default action.
#[test]
fn sigterm_during_start_up_stops_cleanly() {
    if !confinement_available() {
        return;
    }
    let dir = crate::daemon::echo_and_hostile_dir();
    dir.write("slow-probe", "");
    let (mut child, rx) = serve_logging(&["--plugins".as_ref(), dir.path().as_os_str()]);
    std::thread::sleep(Duration::from_millis(1000));
    send(child.id(), "-TERM");
    let status = child.wait().unwrap();
    let logs: String = rx.iter().map(|l| l + "\n").collect();
    assert_eq!(status.code(), Some(0), "{logs}");
    assert!(logs.contains("SIGTERM while starting"), "{logs}");
}

/// A reload starts only the preloads it newly names: a model an operator unloaded stays
/// unloaded (every `systemctl reload` loaded it again).
#[test]
fn a_sighup_leaves_an_unloaded_model_unloaded() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(echo_dir(""), "");
    d.wait_ready();
    assert_eq!(d.post("/v1/plugins/echo/unload", &json!({})).0, 200);
    eventually("echo is unloaded", &d, || {
        d.plugin("echo")["state"] == "unloaded"
    });
    hangup(&d);
    eventually("the reload is done", &d, || {
        d.logs().contains("configuration reloaded")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(d.plugin("echo")["state"], "unloaded", "{}", d.logs());
}

/// A preload a reload newly names starts loading at once.
#[test]
fn a_sighup_loads_a_newly_named_preload() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(echo_dir(""), "[server]\npreload = []\n");
    d.wait_ready();
    assert_eq!(d.plugin("echo")["state"], "unloaded");
    std::fs::write(d.config_path(), "[server]\npreload = [\"echo\"]\n").unwrap();
    hangup(&d);
    eventually("echo loads", &d, || d.plugin("echo")["state"] == "ready");
}
