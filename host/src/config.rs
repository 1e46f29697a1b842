//! The daemon's configuration file (`pio serve --config`, also read by `pio run` and `pio list`):
//! where plugins are, the sandbox policy, default limits and supervision. Every key has a
//! default; unknown keys are errors naming file, line and key. Command-line flags override it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::manifest::{Limits, Tier};
use crate::sandbox::users::{UidRange, WorkerUsers};
use crate::sandbox::{Policy, ResolvedLimits};
use crate::supervisor::RestartPolicy;
use crate::tomlfile::TomlError;
use crate::units::ByteSize;

/// A setting 0 would make useless (every request refused, every worker quarantined).
fn not_zero<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default + PartialEq,
{
    let value = T::deserialize(d)?;
    if value == T::default() {
        return Err(serde::de::Error::custom(
            "must be more than 0; leave it out for the default",
        ));
    }
    Ok(value)
}

/// Why `addr` cannot be listened on, if it cannot: `HOST:PORT` (an IP address, `[v6]`, or a name
/// such as `localhost`) with a port from 0 to 65535; checked where it is written, not at bind.
pub fn listen_problem(addr: &str) -> Option<String> {
    let valid = addr.rsplit_once(':').is_some_and(|(host, port)| {
        // An IPv6 address is bracketed (`::1:8080` cannot say where the port starts) and is
        // one; any other host has no colon or bracket.
        let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => {
                !host.is_empty() && !host.contains(|c: char| c.is_whitespace() || ":[]".contains(c))
            }
        };
        host_ok && port.parse::<u16>().is_ok()
    });
    (!valid).then(|| {
        format!("`{addr}` is not an address to listen on: expected HOST:PORT, e.g. 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080")
    })
}

fn listen_address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let addr = String::deserialize(d)?;
    match listen_problem(&addr) {
        Some(problem) => Err(serde::de::Error::custom(problem)),
        None => Ok(addr),
    }
}

/// A worker uid or gid other than root's: workers run unprivileged.
fn unprivileged<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let id = u32::deserialize(d)?;
    if id == 0 {
        return Err(serde::de::Error::custom(
            "must not be 0 (root): workers run unprivileged; use an unused id (default 65534, nobody)",
        ));
    }
    if id == u32::MAX {
        return Err(serde::de::Error::custom(
            "must not be 4294967295, which the kernel reads as \"leave the id unchanged\" (root): use an unused id (default 65534, nobody)",
        ));
    }
    Ok(id)
}

fn some_unprivileged<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    unprivileged(d).map(Some)
}

fn uid_range<'de, D: serde::Deserializer<'de>>(d: D) -> Result<UidRange, D::Error> {
    UidRange::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directories scanned for plugin manifests (default: `manifests`).
    pub plugin_dirs: Vec<PathBuf>,
    /// Extra directories a manifest's `library` is looked up in.
    pub library_dirs: Vec<PathBuf>,
    /// How plugins are confined.
    pub sandbox: SandboxSection,
    /// Limits for plugins whose manifest sets none.
    pub limits: Limits,
    /// The most a manifest may set (`[limits_max]`): a manifest comes with a plugin, and its
    /// `memory = "1TiB"` took the host; one above is refused, one unset gets the most.
    pub limits_max: Limits,
    /// Restarts and deadlines.
    pub supervisor: SupervisorSection,
    /// The daemon (`pio serve`): listening, keys, request limits, loading.
    pub server: ServerSection,
}

/// `[sandbox]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxSection {
    /// Every plugin runs at least at this tier (default `low`).
    pub min_tier: Tier,
    /// Run a plugin less confined than asked, with a warning, when the host lacks a mechanism
    /// (default `false`: refuse it).
    pub allow_downgrade: bool,
    /// The one uid every worker runs as; unset (the default), each plugin's workers run as a
    /// uid of their own from `worker_uids`.
    #[serde(deserialize_with = "some_unprivileged")]
    pub worker_uid: Option<u32>,
    /// The range each plugin's uid is drawn from, as `"FIRST-LAST"` (default
    /// 1879048192-2147352575).
    #[serde(deserialize_with = "uid_range")]
    pub worker_uids: UidRange,
    /// The gid workers run as (default 65534).
    #[serde(deserialize_with = "unprivileged")]
    pub worker_gid: u32,
}

impl Default for SandboxSection {
    fn default() -> Self {
        let p = Policy::default();
        Self {
            min_tier: p.min_tier,
            allow_downgrade: p.allow_downgrade,
            worker_uid: None,
            worker_uids: UidRange::DEFAULT,
            worker_gid: p.worker_gid,
        }
    }
}

/// `[supervisor]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisorSection {
    /// Seconds a request may run before it is failed and its worker replaced (0: no limit;
    /// `maximum` always has one). Default 600.
    pub request_timeout_secs: u64,
    /// Seconds between health checks (default 5).
    #[serde(deserialize_with = "not_zero")]
    pub health_interval_secs: u64,
    /// Seconds a worker has to answer a health check (default 5).
    #[serde(deserialize_with = "not_zero")]
    pub health_deadline_secs: u64,
    /// More failures than this within `crash_window_secs` quarantine a plugin (default 5).
    pub max_crashes: usize,
    /// See `max_crashes` (default 300; 0 would never quarantine).
    #[serde(deserialize_with = "not_zero")]
    pub crash_window_secs: u64,
    /// First wait before a restart, doubling per failure (default 500 ms).
    #[serde(deserialize_with = "not_zero")]
    pub restart_backoff_ms: u64,
    /// The longest wait between restarts (default 30 000 ms).
    #[serde(deserialize_with = "not_zero")]
    pub max_restart_backoff_ms: u64,
    /// Seconds a worker has to start and load its model, at a load and at each restart, before
    /// it is stopped and its start counts as failed (0: no limit). Default 1800.
    pub load_timeout_secs: u64,
}

impl Default for SupervisorSection {
    fn default() -> Self {
        let r = RestartPolicy::default();
        Self {
            request_timeout_secs: r.request_timeout.map_or(0, |t| t.as_secs()),
            health_interval_secs: r.health_interval.as_secs(),
            health_deadline_secs: r.health_deadline.as_secs(),
            max_crashes: r.max_crashes,
            crash_window_secs: r.window.as_secs(),
            restart_backoff_ms: r.initial_backoff.as_millis() as u64,
            max_restart_backoff_ms: r.max_backoff.as_millis() as u64,
            load_timeout_secs: r.load_timeout.map_or(0, |t| t.as_secs()),
        }
    }
}

/// `[server]`: what `pio serve` listens on and how it admits and loads.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// Address and port to listen on (default `127.0.0.1:8080`).
    #[serde(deserialize_with = "listen_address")]
    pub listen: String,
    /// Plugins loaded at start and when dropped in, by name; `"*"` is every plugin (default
    /// `["*"]`). Others load on their first request.
    pub preload: Vec<String>,
    /// Load a plugin that is not loaded when a request names it (default `true`).
    pub load_on_demand: bool,
    /// Seconds a request waits for its model to finish loading before a 503 (default 60).
    pub load_wait_secs: u64,
    /// Unload a model idle this many seconds (default 0: never).
    pub keep_alive_secs: u64,
    /// The most models loaded at once; the least recently used idle one is unloaded to make
    /// room (default 0: no cap).
    pub max_loaded_models: usize,
    /// Bearer keys for the inference API; empty: no key needed (default empty).
    pub api_keys: Vec<String>,
    /// Bearer keys for the admin API (they also work for the inference API). When any key is
    /// configured, the admin API needs one of these.
    pub admin_keys: Vec<String>,
    /// Bearer keys for `/metrics` (admin keys work too). Empty: `/metrics` is open when the
    /// daemon listens on a loopback address, and needs an admin key otherwise (default empty).
    pub metrics_keys: Vec<String>,
    /// Largest request body (default `16MiB`).
    #[serde(deserialize_with = "not_zero")]
    pub max_body_size: ByteSize,
    /// The most tokens one request may ask for (default 0: up to the model's context).
    pub max_tokens_limit: u32,
    /// Requests per model running or waiting at once (one with `n` choices counts `n`); more get
    /// 429 (default 64).
    #[serde(deserialize_with = "not_zero")]
    pub queue_depth: usize,
    /// A streaming client that takes no data for this many seconds while the stream's buffer is
    /// full is cut off, and its generation stopped (default 30).
    #[serde(deserialize_with = "not_zero")]
    pub stall_timeout_secs: u64,
    /// Seconds a client may take to send a request's head (and an idle keep-alive connection
    /// may wait); then the connection is closed (default 30).
    #[serde(deserialize_with = "not_zero")]
    pub header_timeout_secs: u64,
    /// Seconds a client may take to send a request's body; then it gets a 408 (default 30).
    #[serde(deserialize_with = "not_zero")]
    pub body_timeout_secs: u64,
    /// Each connection's kernel send buffer (`SO_SNDBUF`; default: the kernel's autotuning, up
    /// to `net.ipv4.tcp_wmem`'s maximum, often 4 MiB). A small one bounds what a client that
    /// stops reading can hold in socket memory (charged to the daemon's cgroup) and makes the
    /// daemon notice sooner; tokens stream at a few KiB/s, so 64KiB loses nothing.
    pub send_buffer: Option<ByteSize>,
    /// Seconds in-flight requests get to finish on shutdown, unload or reload (default 30).
    pub drain_timeout_secs: u64,
    /// How a reload (a changed plugin, `POST .../reload`, an operator's load of a quarantined
    /// model) replaces a running worker (default `auto`).
    pub reload_strategy: ReloadStrategy,
    /// Watch the plugin directories and load, reload or unload plugins as files change
    /// (default `true`).
    pub watch: bool,
    /// Generate one token after loading before a model counts as ready (default `true`).
    pub warmup: bool,
    /// `/ready` (and systemd's readiness) waits for every preloaded model to serve (default
    /// `true`); `false`: ready while the daemon serves, whatever its models' states (Triton's
    /// `--strict-readiness=false`), so one quarantined or failed model does not take the
    /// replica out of rotation for the others.
    pub strict_readiness: bool,
    /// Image content parts may name files under this directory (default: none, only `data:`
    /// URLs are accepted).
    pub image_root: Option<PathBuf>,
    /// Host names (as the `Host` header gives them, without the port) requests without a key
    /// may name besides `localhost` and loopback addresses, and browser origins they may come
    /// from: a reverse proxy's public name (default none).
    pub allowed_hosts: Vec<String>,
    /// Where copies of the plugin libraries being served are kept (default: a fresh folder
    /// under the system's temporary directory).
    pub runtime_dir: Option<PathBuf>,
    /// `text` or `json` (one JSON object per line) logs on stderr (default `text`).
    pub log_format: LogFormat,
}

/// How a reload replaces a running model's worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReloadStrategy {
    /// Blue/green while the host's available memory holds a second copy of what the running
    /// worker uses, else recreate.
    #[default]
    Auto,
    /// The new worker loads and warms up beside the old one, which serves meanwhile: no
    /// request waits, but both are in memory at once.
    BlueGreen,
    /// The old worker drains and stops first, then the new one loads; requests that arrive
    /// meanwhile wait for it as for any load (`load_wait_secs`).
    Recreate,
}

impl std::fmt::Display for ReloadStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::BlueGreen => "blue-green",
            Self::Recreate => "recreate",
        })
    }
}

/// How the daemon writes its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            preload: vec!["*".into()],
            load_on_demand: true,
            strict_readiness: true,
            load_wait_secs: 60,
            keep_alive_secs: 0,
            max_loaded_models: 0,
            api_keys: Vec::new(),
            admin_keys: Vec::new(),
            metrics_keys: Vec::new(),
            max_body_size: ByteSize(16 << 20),
            max_tokens_limit: 0,
            queue_depth: 64,
            stall_timeout_secs: 30,
            header_timeout_secs: 30,
            body_timeout_secs: 30,
            send_buffer: None,
            drain_timeout_secs: 30,
            reload_strategy: ReloadStrategy::Auto,
            watch: true,
            warmup: true,
            image_root: None,
            allowed_hosts: Vec::new(),
            runtime_dir: None,
            log_format: LogFormat::Text,
        }
    }
}

impl ServerSection {
    /// Whether `name` is loaded at start and when dropped in.
    pub fn preloads(&self, name: &str) -> bool {
        self.preload.iter().any(|p| p == "*" || p == name)
    }
}

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read the configuration: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Syntax, an unknown key or a bad value.
    #[error("{0}")]
    Parse(#[from] TomlError),
    /// Values that parse but do not go together.
    #[error("{path}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the keys.
        problem: String,
    },
}

impl Config {
    /// Reads and parses `path`; the folders it names, when relative, are relative to it (as
    /// a manifest's paths are to the manifest: under systemd the working directory is `/`).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: Self = crate::tomlfile::parse(path, &text)?;
        if let Some(problem) = config.problem() {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                problem,
            });
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let beside = |p: &mut PathBuf| {
            if p.is_relative() {
                let joined = base.join(&*p);
                // Before, relative folders were the working directory's: say so where that
                // still finds one and the file's folder does not.
                if !joined.exists() && p.exists() {
                    tracing::warn!(
                        "{}: {} is relative to the configuration file's folder ({}), not to the working directory, where it exists; write it as an absolute path",
                        path.display(),
                        p.display(),
                        joined.display()
                    );
                }
                *p = joined;
            }
        };
        config.plugin_dirs.iter_mut().for_each(beside);
        config.library_dirs.iter_mut().for_each(beside);
        config.server.image_root.iter_mut().for_each(beside);
        config.server.runtime_dir.iter_mut().for_each(beside);
        Ok(config)
    }

    /// What is wrong with settings that parse one by one but not together.
    fn problem(&self) -> Option<String> {
        let s = &self.supervisor;
        if s.restart_backoff_ms > s.max_restart_backoff_ms {
            return Some(format!(
                "supervisor.restart_backoff_ms ({}) is more than supervisor.max_restart_backoff_ms ({}): the first wait cannot pass the longest",
                s.restart_backoff_ms, s.max_restart_backoff_ms
            ));
        }
        let server = &self.server;
        if let Some(problem) = self.too_long() {
            return Some(problem);
        }
        let keys = [
            ("server.api_keys", &server.api_keys),
            ("server.admin_keys", &server.admin_keys),
            ("server.metrics_keys", &server.metrics_keys),
        ];
        keys.into_iter().find_map(|(name, keys)| {
            keys.iter()
                .any(|k| k.trim().is_empty() || k.chars().any(char::is_whitespace))
                .then(|| format!("{name} holds an empty key or one with whitespace: a bearer key is one token, e.g. from `openssl rand -hex 32`"))
        })
    }

    /// A time past what a deadline can be set to (the clock plus it overflows, which panics).
    fn too_long(&self) -> Option<String> {
        let (s, server) = (&self.supervisor, &self.server);
        let secs = [
            ("supervisor.request_timeout_secs", s.request_timeout_secs),
            ("supervisor.health_interval_secs", s.health_interval_secs),
            ("supervisor.health_deadline_secs", s.health_deadline_secs),
            ("supervisor.crash_window_secs", s.crash_window_secs),
            ("supervisor.restart_backoff_ms", s.restart_backoff_ms / 1000),
            (
                "supervisor.max_restart_backoff_ms",
                s.max_restart_backoff_ms / 1000,
            ),
            ("supervisor.load_timeout_secs", s.load_timeout_secs),
            ("server.load_wait_secs", server.load_wait_secs),
            ("server.keep_alive_secs", server.keep_alive_secs),
            ("server.stall_timeout_secs", server.stall_timeout_secs),
            ("server.header_timeout_secs", server.header_timeout_secs),
            ("server.body_timeout_secs", server.body_timeout_secs),
            ("server.drain_timeout_secs", server.drain_timeout_secs),
        ];
        secs.into_iter().find(|&(_, v)| v > LONGEST_SECS).map(|(name, _)| {
            format!("{name} is more than a century ({LONGEST_SECS} s), past what a deadline can be set to: use a shorter time (0 turns the limit off where the setting says so)")
        })
    }

    /// The sandbox policy it sets.
    pub fn policy(&self) -> Policy {
        Policy {
            min_tier: self.sandbox.min_tier,
            allow_downgrade: self.sandbox.allow_downgrade,
            users: match self.sandbox.worker_uid {
                Some(uid) => WorkerUsers::Shared(uid),
                None => WorkerUsers::PerPlugin(self.sandbox.worker_uids),
            },
            worker_gid: self.sandbox.worker_gid,
        }
    }

    /// `manifest`'s limits, each unset one taken from this file's defaults (processes and
    /// threads from [`DEFAULT_PIDS`] when neither sets them), then from `[limits_max]`; one
    /// past `[limits_max]` is refused, naming both.
    pub fn limits_for(&self, manifest: &Limits) -> Result<ResolvedLimits, String> {
        let (d, m) = (&self.limits, &self.limits_max);
        let limits = ResolvedLimits {
            memory_bytes: manifest.memory.or(d.memory).or(m.memory).map(|b| b.0),
            cpus: manifest.cpus.or(d.cpus).or(m.cpus).map(|c| c.0),
            pids: (manifest.pids.or(d.pids).or(m.pids)).or(Some(DEFAULT_PIDS)),
            gpu_memory_bytes: (manifest.gpu_memory.or(d.gpu_memory).or(m.gpu_memory)).map(|b| b.0),
            scratch_bytes: manifest.scratch.or(d.scratch).or(m.scratch).map(|b| b.0),
            network: manifest.network.or(d.network).or(m.network),
        };
        let past = |name: &str, asked: f64, most: f64| {
            Err(format!(
                "limits.{name} = {asked} is past the {most} the daemon's [limits_max] allows; lower it in the manifest, or raise [limits_max] {name}"
            ))
        };
        let pairs = [
            (
                "memory",
                limits.memory_bytes.map(|v| v as f64),
                m.memory.map(|v| v.0 as f64),
            ),
            ("cpus", limits.cpus, m.cpus.map(|c| c.0)),
            ("pids", limits.pids.map(f64::from), m.pids.map(f64::from)),
            (
                "gpu_memory",
                limits.gpu_memory_bytes.map(|v| v as f64),
                m.gpu_memory.map(|v| v.0 as f64),
            ),
            (
                "scratch",
                limits.scratch_bytes.map(|v| v as f64),
                m.scratch.map(|v| v.0 as f64),
            ),
        ];
        for (name, asked, most) in pairs {
            if let (Some(asked), Some(most)) = (asked, most) {
                if asked > most {
                    return past(name, asked, most);
                }
            }
        }
        if m.network == Some(false) && limits.network == Some(true) {
            return Err("limits.network = true, but the daemon's [limits_max] network = false allows none; remove it from the manifest".into());
        }
        Ok(limits)
    }

    /// The supervision it sets.
    pub fn restart_policy(&self) -> RestartPolicy {
        let s = &self.supervisor;
        RestartPolicy {
            initial_backoff: Duration::from_millis(s.restart_backoff_ms),
            max_backoff: Duration::from_millis(s.max_restart_backoff_ms),
            max_crashes: s.max_crashes,
            window: Duration::from_secs(s.crash_window_secs),
            request_timeout: (s.request_timeout_secs > 0)
                .then(|| Duration::from_secs(s.request_timeout_secs)),
            health_interval: Duration::from_secs(s.health_interval_secs),
            health_deadline: Duration::from_secs(s.health_deadline_secs),
            load_timeout: (s.load_timeout_secs > 0)
                .then(|| Duration::from_secs(s.load_timeout_secs)),
            warmup: self.server.warmup,
        }
    }
}

/// The longest time a setting may name: a century, in seconds.
const LONGEST_SECS: u64 = 100 * 365 * 24 * 3600;

/// A worker's processes and threads when no manifest or configuration sets them: far more
/// than an engine runs (a thread per core, a few per request), and a bound on a fork bomb.
pub const DEFAULT_PIDS: u32 = 4096;

/// Why the configuration file at `path`, holding `server`'s bearer keys, is readable by the
/// workers' user (`worker_gid` for its group): a `low` or `medium` worker sees the host's files
/// and could hand the keys out in its answers. `None` when it holds no key or only its owner
/// reads it.
pub fn keys_exposed(path: &Path, server: &ServerSection, worker_gid: u32) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let keys = [&server.api_keys, &server.admin_keys, &server.metrics_keys];
    if keys.iter().all(|k| k.is_empty()) {
        return None;
    }
    let meta = std::fs::metadata(path).ok()?;
    let mode = meta.mode() & 0o777;
    let others = mode & 0o004 != 0;
    let group = mode & 0o040 != 0 && meta.gid() == worker_gid;
    (others || group).then(|| {
        format!(
            "{} holds bearer keys and is readable by the workers' user (mode {mode:o}): a plugin below `high` could read them; `chmod 600` it",
            path.display()
        )
    })
}

/// Of the `named` folders (a setting's key, the folder), those that cannot be used, each said
/// with its key and the reason: worth a warning at start, where they would otherwise be found
/// only as plugins not served or image files refused (a typo, or a folder not yet made).
pub fn unusable_folders<'a>(named: impl IntoIterator<Item = (&'a str, &'a Path)>) -> Vec<String> {
    named
        .into_iter()
        .filter_map(|(key, dir)| {
            let problem = folder_problem(dir)?;
            Some(format!(
                "{key}: {} cannot be used ({problem})",
                dir.display()
            ))
        })
        .collect()
}

/// Why `dir` is not a folder one can use (missing, not a folder, unreadable), if it is not.
/// Only that it is a folder: one the daemon may search but not list still serves its files.
pub fn folder_problem(dir: &Path) -> Option<String> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => None,
        Ok(_) => Some("it is not a folder".to_string()),
        Err(e) => Some(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, TomlError> {
        crate::tomlfile::parse(Path::new("pio.toml"), text)
    }

    #[test]
    fn an_empty_file_is_all_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.policy(), Policy::default());
        assert_eq!(c.restart_policy(), RestartPolicy::default());
        // 0 is no limit, as for the request deadline.
        let c = parse("[supervisor]\nload_timeout_secs = 0\nrequest_timeout_secs = 0\n").unwrap();
        assert_eq!(c.restart_policy().load_timeout, None);
        assert_eq!(c.restart_policy().request_timeout, None);
    }

    /// Settings that parse alone but not together, or keys no client could send, are refused
    /// naming the file and the keys; relative folders are the file's.
    #[test]
    fn settings_are_checked_together_and_folders_are_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pio.toml");
        let load = |text: &str| {
            std::fs::write(&file, text).unwrap();
            Config::load(&file)
        };
        let e = load("[supervisor]\nrestart_backoff_ms = 60000\nmax_restart_backoff_ms = 10\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pio.toml") && e.contains("max_restart_backoff_ms"),
            "{e}"
        );
        // i64::MAX seconds, TOML's largest integer, would overflow the clock at the first use.
        for (section, key) in [
            ("server", "load_wait_secs"),
            ("supervisor", "request_timeout_secs"),
            ("supervisor", "load_timeout_secs"),
        ] {
            let e = load(&format!("[{section}]\n{key} = 9223372036854775807\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("{section}.{key}")) && e.contains("century"),
                "{e}"
            );
        }
        assert!(load("[supervisor]\nload_timeout_secs = 3153600000\n").is_ok());
        let e = load("[server]\napi_keys = [\"\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.api_keys"), "{e}");
        for zero in [
            "[supervisor]\nrestart_backoff_ms = 0\n",
            "[server]\nstall_timeout_secs = 0\n",
        ] {
            assert!(load(zero).is_err(), "{zero}");
        }
        let c = load("plugin_dirs = [\"plugins.d\", \"/abs\"]\n[server]\nimage_root = \"img\"\n")
            .unwrap();
        assert_eq!(
            c.plugin_dirs,
            [dir.path().join("plugins.d"), PathBuf::from("/abs")]
        );
        assert_eq!(c.server.image_root, Some(dir.path().join("img")));
    }

    #[test]
    fn manifest_limits_win_over_the_defaults() {
        let c = parse("[limits]\nmemory = \"8GiB\"\npids = 100\n[sandbox]\nmin_tier = \"high\"\n")
            .unwrap();
        let manifest = Limits {
            memory: Some(ByteSize(1 << 30)),
            ..Limits::default()
        };
        let l = c.limits_for(&manifest).unwrap();
        assert_eq!((l.memory_bytes, l.pids), (Some(1 << 30), Some(100)));
        assert_eq!(c.policy().min_tier, Tier::High);
        // Set nowhere: no memory or CPU bound, the process bound.
        let l = Config::default().limits_for(&Limits::default()).unwrap();
        assert_eq!(
            (l.memory_bytes, l.cpus, l.pids),
            (None, None, Some(DEFAULT_PIDS))
        );
    }

    /// `[limits_max]` caps what a manifest may set: one past it is refused naming both, one
    /// unset gets the most (a manifest's `memory = "1TiB"` took the host).
    #[test]
    fn a_manifest_past_the_ceiling_is_refused() {
        let c = parse(
            "[limits_max]
memory = \"4GiB\"
cpus = 2
network = false
",
        )
        .unwrap();
        let greedy = Limits {
            memory: Some(ByteSize(1 << 40)),
            ..Limits::default()
        };
        let e = c.limits_for(&greedy).unwrap_err();
        assert!(
            e.contains("limits.memory") && e.contains("[limits_max]"),
            "{e}"
        );
        let l = c.limits_for(&Limits::default()).unwrap();
        assert_eq!((l.memory_bytes, l.cpus), (Some(4 << 30), Some(2.0)));
        let online = Limits {
            network: Some(true),
            ..Limits::default()
        };
        assert!(c.limits_for(&online).unwrap_err().contains("network"));
        let modest = Limits {
            memory: Some(ByteSize(1 << 30)),
            ..Limits::default()
        };
        assert_eq!(c.limits_for(&modest).unwrap().memory_bytes, Some(1 << 30));
    }

    #[test]
    fn server_keys_parse_with_units_and_defaults() {
        let c = parse("[server]\nlisten = \"0.0.0.0:9000\"\nmax_body_size = \"1MiB\"\npreload = [\"echo\"]\nlog_format = \"json\"\n").unwrap();
        assert_eq!(c.server.listen, "0.0.0.0:9000");
        assert_eq!(c.server.max_body_size, ByteSize(1 << 20));
        assert!(c.server.preloads("echo") && !c.server.preloads("qwen"));
        assert_eq!(c.server.log_format, LogFormat::Json);
        assert_eq!(c.server.queue_depth, ServerSection::default().queue_depth);
        assert!(ServerSection::default().preloads("anything"));
    }

    #[test]
    fn unknown_keys_name_file_line_and_key() {
        let e = parse("plugin_dirs = [\"p\"]\n[sandbox]\nmin_teir = \"low\"\n").unwrap_err();
        assert_eq!((e.line, e.column), (3, 1));
        assert!(
            e.to_string().starts_with("pio.toml:3:1:") && e.message.contains("min_teir"),
            "{e}"
        );
        let e = parse("[server]\nlisten = \"0.0.0.0:9000\"\nqueue_depht = 3\n").unwrap_err();
        assert!(
            e.to_string().starts_with("pio.toml:3:1:") && e.message.contains("queue_depht"),
            "{e}"
        );
        let e = parse("[supervisor]\nmax_crashes = \"many\"\n").unwrap_err();
        assert!(e.message.contains("`max_crashes`"), "{e}");
        // A strategy not known is named, with the ones that are.
        let e = parse("[server]\nreload_strategy = \"rolling\"\n").unwrap_err();
        assert!(
            e.to_string().starts_with("pio.toml:2:")
                && e.message.contains("rolling")
                && e.message.contains("blue-green")
                && e.message.contains("recreate"),
            "{e}"
        );
        let c = parse("[server]\nreload_strategy = \"blue-green\"\n").unwrap();
        assert_eq!(c.server.reload_strategy, ReloadStrategy::BlueGreen);
    }

    #[test]
    fn a_config_holding_keys_readable_by_workers_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pio.toml");
        std::fs::write(&path, "").unwrap();
        let chmod = |mode| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode));
        let mut server = ServerSection::default();
        chmod(0o644).unwrap();
        assert_eq!(keys_exposed(&path, &server, 65534), None, "no keys");
        server.metrics_keys = vec!["m".into()];
        let said = keys_exposed(&path, &server, 65534).unwrap();
        assert!(said.contains("644") && said.contains("chmod 600"), "{said}");
        chmod(0o600).unwrap();
        assert_eq!(keys_exposed(&path, &server, 65534), None);
        // Group-readable: exposed only when the group is the workers'.
        chmod(0o640).unwrap();
        let gid = std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(&path).unwrap());
        assert!(keys_exposed(&path, &server, gid).is_some());
        assert_eq!(keys_exposed(&path, &server, gid + 1), None);
    }

    /// Folders named but not there (or not folders) are listed with their keys.
    #[test]
    fn folders_that_cannot_be_used_are_named_with_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let (plugins, typo, file) = (
            dir.path().join("plugins"),
            dir.path().join("plugnis"),
            dir.path().join("file"),
        );
        std::fs::create_dir(&plugins).unwrap();
        std::fs::write(&file, b"").unwrap();
        let found = unusable_folders([
            ("plugin_dirs", plugins.as_path()),
            ("plugin_dirs", typo.as_path()),
            ("server.image_root", file.as_path()),
        ]);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].starts_with("plugin_dirs: ") && found[0].contains("plugnis"));
        assert!(found[1].starts_with("server.image_root: ") && found[1].contains("not a folder"));
    }

    /// Values that would make the server useless are refused where they are written.
    #[test]
    fn settings_that_would_serve_nothing_are_refused() {
        for (text, key) in [
            ("[server]\nqueue_depth = 0\n", "queue_depth"),
            ("[server]\nmax_body_size = \"0\"\n", "max_body_size"),
            ("[server]\nheader_timeout_secs = 0\n", "header_timeout_secs"),
            ("[server]\nbody_timeout_secs = 0\n", "body_timeout_secs"),
            (
                "[supervisor]\nhealth_deadline_secs = 0\n",
                "health_deadline_secs",
            ),
            (
                "[supervisor]\nhealth_interval_secs = 0\n",
                "health_interval_secs",
            ),
            ("[supervisor]\ncrash_window_secs = 0\n", "crash_window_secs"),
            ("[sandbox]\nworker_uid = 0\n", "worker_uid"),
            ("[sandbox]\nworker_gid = 0\n", "worker_gid"),
            ("[server]\nlisten = \"localhost\"\n", "listen"),
            ("[server]\nlisten = \"0.0.0.0:99999\"\n", "listen"),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.line, 2, "{text}: {e}");
            assert!(e.message.contains(key) && e.message.contains("0"), "{e}");
        }
        for good in [
            "127.0.0.1:8080",
            "localhost:9000",
            "[::1]:8080",
            "0.0.0.0:0",
            "[::]:80",
        ] {
            assert_eq!(listen_problem(good), None, "{good}");
        }
        for bad in ["::1:8080", "[::1:8080", "[nope]:80", "a]:80"] {
            assert!(listen_problem(bad).is_some(), "{bad}");
        }
        assert!(parse("[server]\nqueue_depth = 1\n").is_ok());
        // setresuid's "unchanged": the worker would stay root.
        let e = parse("[sandbox]\nworker_uid = 4294967295\n").unwrap_err();
        assert!(
            e.message.contains("worker_uid") && e.message.contains("unchanged"),
            "{e}"
        );
    }

    /// Unset, each plugin has a uid of its own from `worker_uids`; set, `worker_uid` is every
    /// worker's.
    #[test]
    fn workers_run_as_a_uid_per_plugin_unless_one_is_set() {
        let per_plugin = parse("[sandbox]\nworker_uids = \"100000-165535\"\n").unwrap();
        let WorkerUsers::PerPlugin(range) = per_plugin.policy().users else {
            panic!("{:?}", per_plugin.policy());
        };
        assert_eq!(range.to_string(), "100000-165535");
        let default = Config::default().policy().users;
        assert_eq!(default, WorkerUsers::PerPlugin(UidRange::DEFAULT));
        let shared = parse("[sandbox]\nworker_uid = 1234\n").unwrap();
        assert_eq!(shared.policy().users, WorkerUsers::Shared(1234));
        let e = parse("[sandbox]\nworker_uids = \"0-99\"\n").unwrap_err();
        assert!(e.message.contains("FIRST-LAST") && e.line == 2, "{e}");
    }
}
