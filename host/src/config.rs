//! The daemon's configuration file (`pio serve --config`, also read by `pio run` and `pio list`):
//! where plugins are, the sandbox policy, default limits and supervision. Every key has a
//! default; unknown keys are errors naming file, line and key. Command-line flags override it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::manifest::{Limits, Tier};
use crate::sandbox::{Policy, ResolvedLimits};
use crate::supervisor::RestartPolicy;
use crate::tomlfile::TomlError;

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
    /// Restarts and deadlines.
    pub supervisor: SupervisorSection,
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
    /// The uid workers run as (default 65534, `nobody`).
    pub worker_uid: u32,
    /// The gid workers run as (default 65534).
    pub worker_gid: u32,
}

impl Default for SandboxSection {
    fn default() -> Self {
        let p = Policy::default();
        Self {
            min_tier: p.min_tier,
            allow_downgrade: p.allow_downgrade,
            worker_uid: p.worker_uid,
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
    pub health_interval_secs: u64,
    /// Seconds a worker has to answer a health check (default 5).
    pub health_deadline_secs: u64,
    /// More failures than this within `crash_window_secs` quarantine a plugin (default 5).
    pub max_crashes: usize,
    /// See `max_crashes` (default 300).
    pub crash_window_secs: u64,
    /// First wait before a restart, doubling per failure (default 500 ms).
    pub restart_backoff_ms: u64,
    /// The longest wait between restarts (default 30 000 ms).
    pub max_restart_backoff_ms: u64,
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
        }
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
}

impl Config {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Ok(crate::tomlfile::parse(path, &text)?)
    }

    /// The sandbox policy it sets.
    pub fn policy(&self) -> Policy {
        Policy {
            min_tier: self.sandbox.min_tier,
            allow_downgrade: self.sandbox.allow_downgrade,
            worker_uid: self.sandbox.worker_uid,
            worker_gid: self.sandbox.worker_gid,
        }
    }

    /// `manifest`'s limits, each unset one taken from this file's defaults.
    pub fn limits_for(&self, manifest: &Limits) -> ResolvedLimits {
        let d = &self.limits;
        ResolvedLimits {
            memory_bytes: manifest.memory.or(d.memory).map(|b| b.0),
            cpus: manifest.cpus.or(d.cpus).map(|c| c.0),
            pids: manifest.pids.or(d.pids),
            gpu_memory_bytes: manifest.gpu_memory.or(d.gpu_memory).map(|b| b.0),
            scratch_bytes: manifest.scratch.or(d.scratch).map(|b| b.0),
            network: manifest.network.or(d.network),
        }
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::ByteSize;

    fn parse(text: &str) -> Result<Config, TomlError> {
        crate::tomlfile::parse(Path::new("pio.toml"), text)
    }

    #[test]
    fn an_empty_file_is_all_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.policy(), Policy::default());
        assert_eq!(
            c.restart_policy().max_crashes,
            RestartPolicy::default().max_crashes
        );
    }

    #[test]
    fn manifest_limits_win_over_the_defaults() {
        let c = parse("[limits]\nmemory = \"8GiB\"\npids = 100\n[sandbox]\nmin_tier = \"high\"\n")
            .unwrap();
        let manifest = Limits {
            memory: Some(ByteSize(1 << 30)),
            ..Limits::default()
        };
        let l = c.limits_for(&manifest);
        assert_eq!((l.memory_bytes, l.pids), (Some(1 << 30), Some(100)));
        assert_eq!(c.policy().min_tier, Tier::High);
    }

    #[test]
    fn unknown_keys_name_file_line_and_key() {
        let e = parse("plugin_dirs = [\"p\"]\n[sandbox]\nmin_teir = \"low\"\n").unwrap_err();
        assert_eq!((e.line, e.column), (3, 1));
        assert!(
            e.to_string().starts_with("pio.toml:3:1:") && e.message.contains("min_teir"),
            "{e}"
        );
        let e = parse("[supervisor]\nmax_crashes = \"many\"\n").unwrap_err();
        assert!(e.message.contains("`max_crashes`"), "{e}");
    }
}
