//! A real `pio serve` on loopback for the API tests: started on a free port with a config file
//! and a plugin directory, spoken to over HTTP, stopped with SIGTERM or killed on drop.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

/// A running daemon.
pub struct Daemon {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    logs: Arc<Mutex<String>>,
    /// Its plugin directory.
    pub dir: PluginDir,
    _config: tempfile::TempDir,
    /// Its HTTP client (errors as statuses, not failures).
    pub agent: ureq::Agent,
}

/// An echo plugin directory: `echo.toml` plus its library, with `extra` manifest lines.
pub fn echo_dir(extra: &str) -> PluginDir {
    let dir = PluginDir::new();
    dir.copy_lib("pio_plugin_echo", "libecho.so");
    dir.write("echo.toml", &manifest("echo", "0.1.0", "libecho.so", extra));
    dir
}

/// [`echo_dir`] plus the hostile test plugin (`hostile`), at the manifests' default tier.
pub fn echo_and_hostile_dir() -> PluginDir {
    let dir = echo_dir("");
    dir.copy_lib("pio_test_plugin_hostile", "libhostile.so");
    dir.write(
        "hostile.toml",
        &manifest("hostile", "0.1.0", "libhostile.so", ""),
    );
    dir
}

/// A daemon, ready, serving the hostile test plugin at `low` (its test limits), with no warm-up
/// and restarts after 100 ms: for the faults that end a worker.
pub fn restarting_hostile() -> Daemon {
    restarting_hostile_with("", "")
}

/// [`restarting_hostile`] with more `[server]` and `[supervisor]` lines.
pub fn restarting_hostile_with(server: &str, supervisor: &str) -> Daemon {
    let d = Daemon::start(
        crate::medium::tier_dir("low"),
        &format!("[server]\nwarmup = false\n{server}[supervisor]\nrestart_backoff_ms = 100\n{supervisor}"),
    );
    d.wait_ready();
    d
}

/// [`echo_dir`] plus the qwen3 plugin serving the tiny checkpoint in f32, with `options` (TOML
/// lines) under `[model.options]` when there are any.
pub fn qwen_dir(options: &str) -> PluginDir {
    let dir = echo_dir("");
    add_qwen(&dir, options);
    dir
}

/// Writes into `dir` the manifest of the qwen3 plugin serving the tiny checkpoint in f32, with
/// `options` (TOML lines) under `[model.options]` when there are any.
pub fn add_qwen(dir: &PluginDir, options: &str) {
    let qwen = repo_root().join("tests/fixtures/qwen3-tiny");
    let library = plugin_lib("pio_plugin_qwen3");
    let mut model = format!("[model]\npath = \"{}\"\ndtype = \"f32\"\n", qwen.display());
    if !options.is_empty() {
        model.push_str(&format!("\n[model.options]\n{options}\n"));
    }
    dir.write(
        "qwen3.toml",
        &manifest(
            "qwen3-4b-instruct-2507",
            "0.1.0",
            &library.display().to_string(),
            &model,
        ),
    );
}

/// A daemon serving [`qwen_dir`] with `options` (and echo), ready.
pub fn qwen_daemon(options: &str) -> Daemon {
    let d = Daemon::start(qwen_dir(options), "");
    d.wait_ready();
    d
}

impl Daemon {
    /// Starts `pio serve` over `dir` with `config` (TOML), and waits until it listens.
    pub fn start(dir: PluginDir, config: &str) -> Daemon {
        Self::start_with(dir, config, &[])
    }

    /// As [`Daemon::start`], with extra command-line flags.
    pub fn start_with(dir: PluginDir, config: &str, flags: &[&str]) -> Daemon {
        Self::start_env(dir, config, flags, &[])
    }

    /// As [`Daemon::start_with`], with extra environment variables.
    pub fn start_env(dir: PluginDir, config: &str, flags: &[&str], env: &[(&str, &str)]) -> Daemon {
        let conf = tempfile::tempdir().expect("config dir");
        let path = conf.path().join("pio.toml");
        std::fs::write(&path, config).expect("write config");
        // Loopback on a free port unless the flags name another address.
        let listen = if flags.contains(&"--listen") {
            &[][..]
        } else {
            &["--listen", "127.0.0.1:0"][..]
        };
        let mut child = Command::new(pio_bin())
            .arg("serve")
            .args(listen)
            .arg("--config")
            .arg(&path)
            .arg("--plugins")
            .arg(dir.path())
            .args(flags)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pio serve");
        let logs: Arc<Mutex<String>> = Arc::default();
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("listening on http://") {
                    // Text logs end the line with the address; JSON logs close a string.
                    let rest = &line[at + "listening on ".len()..];
                    let end = rest
                        .find(|c: char| c == '"' || c.is_whitespace())
                        .unwrap_or(rest.len());
                    let _ = tx.send(rest[..end].to_string());
                }
                let mut logs = sink.lock().unwrap_or_else(|p| p.into_inner());
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        let base = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(base) => base,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "pio serve did not start listening: {}",
                    logs.lock().unwrap_or_else(|p| p.into_inner())
                );
            }
        };
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(60)))
                .build(),
        );
        Daemon {
            child,
            base,
            logs,
            dir,
            _config: conf,
            agent,
        }
    }

    /// What it logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Its configuration file.
    pub fn config_path(&self) -> std::path::PathBuf {
        self._config.path().join("pio.toml")
    }

    /// The address it listens on (`host:port`).
    pub fn addr(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// One line of `/metrics`, by its name and labels: the value.
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.get_text("/metrics")
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET; status and JSON body (`Null` if not JSON).
    pub fn get(&self, path: &str) -> (u16, Value) {
        self.get_as(path, None)
    }

    /// GET with an optional bearer `key`.
    pub fn get_as(&self, path: &str, key: Option<&str>) -> (u16, Value) {
        let mut req = self.agent.get(self.url(path));
        if let Some(k) = key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let mut r = req.call().expect("GET");
        let text = r.body_mut().read_to_string().unwrap_or_default();
        (
            r.status().as_u16(),
            serde_json::from_str(&text).unwrap_or(Value::Null),
        )
    }

    /// GET as text.
    pub fn get_text(&self, path: &str) -> String {
        let mut r = self.agent.get(self.url(path)).call().expect("GET");
        r.body_mut().read_to_string().unwrap_or_default()
    }

    /// POST `body` (raw) with optional bearer `key`; status and JSON body.
    pub fn post_raw(&self, path: &str, body: &str, key: Option<&str>) -> (u16, Value) {
        let mut req = self
            .agent
            .post(self.url(path))
            .header("Content-Type", "application/json");
        if let Some(k) = key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let mut r = req.send(body).expect("POST");
        let text = r.body_mut().read_to_string().unwrap_or_default();
        (
            r.status().as_u16(),
            serde_json::from_str(&text).unwrap_or(Value::Null),
        )
    }

    /// POST JSON.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, &body.to_string(), None)
    }

    /// POST a streaming request; the `data:` payloads, as they arrive.
    pub fn stream(&self, path: &str, body: &Value) -> impl Iterator<Item = String> {
        match self.try_stream(path, body) {
            Ok(events) => events,
            Err((status, body)) => panic!("stream refused with {status}: {body}"),
        }
    }

    /// POST a streaming request; the `data:` payloads, or the status and body of a refusal.
    pub fn try_stream(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<impl Iterator<Item = String>, (u16, String)> {
        let mut r = self
            .agent
            .post(self.url(path))
            .send_json(body)
            .map_err(|e| (0, e.to_string()))?;
        if r.status().as_u16() != 200 {
            return Err((
                r.status().as_u16(),
                r.body_mut().read_to_string().unwrap_or_default(),
            ));
        }
        Ok(BufReader::new(r.into_body().into_reader())
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string)))
    }

    /// The text a chat stream's chunks carry, and whether it ended with `[DONE]`.
    pub fn chat_text(events: impl Iterator<Item = String>) -> (String, bool) {
        let mut text = String::new();
        let mut done = false;
        for e in events {
            if e == "[DONE]" {
                done = true;
                break;
            }
            let v: Value = serde_json::from_str(&e).unwrap_or(Value::Null);
            if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                text.push_str(t);
            }
        }
        (text, done)
    }

    /// `/v1/plugins`' entry for `name`.
    pub fn plugin(&self, name: &str) -> Value {
        let (_, body) = self.get("/v1/plugins");
        body["plugins"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["name"] == name).cloned())
            .unwrap_or(Value::Null)
    }

    /// Waits until `check` holds, at most `secs` seconds.
    pub fn wait_for(&self, secs: u64, what: &str, mut check: impl FnMut(&Daemon) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !check(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (20 s at most) until `model` has had its `n`th restart and serves again.
    pub fn wait_restarts(&self, model: &str, n: u32) {
        self.wait_for(20, "the restart", |d| {
            let p = d.plugin(model);
            p["restarts"] == n && p["state"] == "ready"
        });
    }

    /// Waits until `/ready` answers 200.
    pub fn wait_ready(&self) {
        self.wait_for(60, "/ready", |d| d.get("/ready").0 == 200);
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Waits for it to exit, at most `secs`.
    pub fn wait_exit(&mut self, secs: u64) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "pio serve did not exit; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A path inside its plugin directory.
    pub fn plugin_path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether python3 with the `openai` and `jsonschema` packages is here (CI must have them:
/// `pip install -r tests/api/requirements.txt`); elsewhere tests that need them are skipped.
pub fn python_client_available() -> bool {
    let have = std::process::Command::new("python3")
        .args(["-c", "import openai, jsonschema"])
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install tests/api/requirements.txt (pip install openai jsonschema)"
        );
        eprintln!("skipped: python3 with openai and jsonschema is not installed (pip install -r tests/api/requirements.txt)");
    }
    have
}

/// Runs `tests/<script>` with `args` against `d`; fails the test with the script's output and
/// the daemon's logs unless it succeeds.
pub fn run_python_checks(d: &Daemon, script: &str, args: &[&str]) {
    let out = std::process::Command::new("python3")
        .arg(repo_root().join("tests").join(script))
        .args(args)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}\ndaemon logs:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        d.logs()
    );
}
