//! Loading a plugin library in a child process to read what it is. Loading runs the library's
//! constructors, so the daemon and the CLI never do it themselves: they re-execute `pio` with the
//! hidden `probe` subcommand, which loads the library, runs plugin-api's checks and prints one
//! JSON line. A crash, hang or garbage output of the child is reported, never inherited.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use pio_plugin_api::{Capabilities, LoadError, PluginLibrary};
use serde::{Deserialize, Serialize};
use wait_timeout::ChildExt;

use crate::sandbox::fence::Fence;
use crate::sandbox::users::{WorkerUsers, UNNAMED_PROBE};
use crate::sandbox::{confine, NetworkCut, Plan, Policy, ResolvedLimits, Tier};

/// What a library says about itself, once every load-time check passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LibraryReport {
    /// The plugin-api version the library was built against.
    pub api_version: String,
    /// The plugin's name.
    pub name: String,
    /// The plugin's version.
    pub version: String,
    /// Its model family.
    pub family: String,
    /// What it can do (by name on the wire and in reports).
    #[serde(with = "capability_names")]
    pub capabilities: Capabilities,
}

/// [`Capabilities`] as the list of names `pio list` prints (`bitN` for bits this host does not
/// know), so reports and frames stay readable while the host works with the typed set.
mod capability_names {
    use pio_plugin_api::Capabilities;
    use serde::{de::Error, Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(caps: &Capabilities, s: S) -> Result<S::Ok, S::Error> {
        caps.names().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Capabilities, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        names.iter().try_fold(Capabilities::empty(), |caps, name| {
            let flag = Capabilities::from_name(name).or_else(|| {
                let bit: u32 = name.strip_prefix("bit")?.parse().ok()?;
                (bit < 64).then(|| Capabilities(1 << bit))
            });
            flag.map(|f| caps.union(f))
                .ok_or_else(|| D::Error::custom(format!("unknown capability `{name}`")))
        })
    }
}

/// One line the probe child prints.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ProbeLine {
    Ok(LibraryReport),
    /// The library loaded (`report`), and its plugin refused the model config it was asked
    /// about.
    ConfigRefused {
        report: LibraryReport,
        kind: String,
        message: String,
    },
    Error {
        kind: String,
        message: String,
        detail: Option<String>,
    },
}

/// Why a library failed its load-time checks, or why the probe itself failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// plugin-api's loader refused the library (`kind`: open, not_a_plugin, incompatible_api,
    /// layout, other); `message` names the file, the versions involved and what to do.
    #[error("{message}")]
    Refused {
        /// Which check failed.
        kind: String,
        /// The loader's one-line reason.
        message: String,
        /// The long form (abi_stable's layout report), for logs.
        detail: Option<String>,
    },
    /// The child died while loading the library (a crashing constructor, a corrupt file).
    #[error(
        "{library}: the process loading it died ({how}); the library is broken or hostile{stderr}"
    )]
    Crashed {
        /// The library.
        library: PathBuf,
        /// Exit status or signal.
        how: String,
        /// The tail of what it wrote to stderr, prefixed with ": ".
        stderr: String,
    },
    /// The child did not finish in time (a constructor that never returns).
    #[error("{library}: loading it did not finish within {seconds} s; the library hangs in its constructors")]
    Timeout {
        /// The library.
        library: PathBuf,
        /// The deadline.
        seconds: u64,
    },
    /// The file is not a well-formed shared library (checked before any process maps it).
    #[error("{library}: not a loadable shared library: {reason}; rebuild or re-copy the plugin")]
    Malformed {
        /// The library.
        library: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The unprivileged user the probe runs as cannot read the library (the message names the
    /// path, the uid and the fix).
    #[error("{message}")]
    Unreadable {
        /// What to change.
        message: String,
    },
    /// The library loaded and reported itself (`report`, whose identity the caller checks
    /// first), but its plugin refused the manifest's `[model]` (`kind`: its error kind,
    /// `invalid_config` or `unsupported` mostly).
    #[error("{message}")]
    ConfigRefused {
        /// What the library reported.
        report: Box<LibraryReport>,
        /// The plugin's error kind.
        kind: String,
        /// The plugin's reason.
        message: String,
    },
    /// The probe process could not be started.
    #[error("cannot start `{exe} probe`: {reason}")]
    Spawn {
        /// The `pio` executable.
        exe: PathBuf,
        /// The OS error.
        reason: String,
    },
}

impl ProbeError {
    /// A short machine-readable name of the failure.
    pub fn kind(&self) -> &str {
        match self {
            Self::Refused { kind, .. } | Self::ConfigRefused { kind, .. } => kind,
            Self::Crashed { .. } => "crashed",
            Self::Timeout { .. } => "timeout",
            Self::Malformed { .. } => "malformed",
            Self::Spawn { .. } => "spawn",
            Self::Unreadable { .. } => "unreadable",
        }
    }
}

/// A verified copy of a pinned library, in a folder of its own readable to the probes' users
/// and writable by this process alone; removed when dropped.
struct PinnedCopy {
    dir: PathBuf,
    file: PathBuf,
}

impl PinnedCopy {
    /// `library`'s bytes as read now, if their sha256 is `expected`, in a new folder in `within`.
    fn make(library: &Path, expected: &str, within: &Path) -> Result<Self, ProbeError> {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let malformed = |reason: String| ProbeError::Malformed {
            library: library.to_owned(),
            reason,
        };
        let bytes =
            std::fs::read(library).map_err(|e| malformed(format!("cannot read it: {e}")))?;
        let actual = crate::serve::library::sha256_hex(&bytes);
        if actual != expected {
            return Err(malformed(format!(
                "its sha256 is {actual}, but its manifest pins {expected} (it changed while it was checked); check the file and its pin"
            )));
        }
        // Not a daemon's runtime folder's name, whose leftovers a starting daemon removes.
        let prefix = format!("pio-probe-{}", std::process::id());
        let dir = crate::serve::library::create_fresh_dir(within, &prefix, 0o700).map_err(|e| {
            malformed(format!(
                "cannot make a folder for its copy in {}: {e}",
                within.display()
            ))
        })?;
        let copy = Self {
            file: dir.join("library.so"),
            dir,
        };
        // Open to the probes' users whatever the umask made it.
        std::fs::set_permissions(&copy.dir, std::fs::Permissions::from_mode(0o755)).map_err(
            |e| {
                malformed(format!(
                    "cannot open {} to the probe: {e}",
                    copy.dir.display()
                ))
            },
        )?;
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&copy.file)
            .and_then(|mut f| f.write_all(&bytes))
            .and_then(|()| {
                std::fs::set_permissions(&copy.file, std::fs::Permissions::from_mode(0o644))
            });
        written
            .map_err(|e| malformed(format!("cannot copy it to {}: {e}", copy.file.display())))?;
        Ok(copy)
    }

    fn path(&self) -> &Path {
        &self.file
    }
}

impl Drop for PinnedCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs probes: re-executes `exe` (normally this very `pio`) as `exe probe LIBRARY`.
#[derive(Debug, Clone)]
pub struct Prober {
    exe: PathBuf,
    timeout: Duration,
    /// The uids the probes drop to when started as root: the workers' own.
    users: WorkerUsers,
    /// The gid they drop to.
    gid: u32,
    /// Where pinned libraries' copies are probed from (a folder that may map code: the
    /// daemon's runtime folder, else the temp folder).
    copies: PathBuf,
}

impl Prober {
    /// A prober re-executing the current executable, with a 20 s deadline.
    pub fn current_exe() -> std::io::Result<Self> {
        Ok(Self::new(std::env::current_exe()?))
    }

    /// A prober re-executing `exe`, dropping to the default workers' users.
    pub fn new(exe: PathBuf) -> Self {
        Self {
            exe,
            timeout: Duration::from_secs(20),
            users: WorkerUsers::default(),
            gid: Policy::default().worker_gid,
            copies: std::env::temp_dir(),
        }
    }

    /// The same prober copying pinned libraries into `dir` to probe them (the daemon's runtime
    /// folder: `/tmp` may be mounted `noexec`, which is why operators set `runtime_dir`).
    pub fn with_copies_in(mut self, dir: PathBuf) -> Self {
        self.copies = dir;
        self
    }

    /// The same prober dropping to `policy`'s users (`sandbox.worker_uid` or `worker_uids`,
    /// `sandbox.worker_gid`): a library runs as the uid its plugin's workers will have, and one
    /// the workers can read is one the probe can read.
    pub fn with_users(mut self, policy: &Policy) -> Self {
        (self.users, self.gid) = (policy.users, policy.worker_gid);
        self
    }

    /// The user `plugin`'s probes (and workers) drop to, when this process can drop to one
    /// (`None` also where no uid can be had: the probe says why).
    pub fn drop_to(&self, plugin: &str) -> Option<(u32, u32)> {
        let uid = self.users.uid_for(plugin).ok()?;
        probe_plan((uid, self.gid)).drop_to
    }

    /// Loads `library`, whose plugin is not known yet, in a child process and reports what it
    /// is. It runs as a uid no plugin has.
    pub fn probe(&self, library: &Path) -> Result<LibraryReport, ProbeError> {
        self.probe_as(library, UNNAMED_PROBE, None)
    }

    /// [`Self::probe`] as `plugin`'s library, and asks the plugin whether it supports `config`
    /// (a manifest's `[model]`: an option it does not read, a dtype or quantization it cannot
    /// load), so the check finds what a load would refuse.
    pub fn probe_for(
        &self,
        library: &Path,
        plugin: &str,
        config: &pio_plugin_api::wire::ModelConfig,
    ) -> Result<LibraryReport, ProbeError> {
        self.probe_as(library, plugin, Some(config))
    }

    /// [`Self::probe_for`] of a library its manifest pins by `sha256`: the bytes read once,
    /// checked against the pin and probed from a private copy, so that a library swapped after
    /// its check (by whoever may write its folder, which the pin defends against) never runs.
    pub fn probe_pinned(
        &self,
        library: &Path,
        plugin: &str,
        config: &pio_plugin_api::wire::ModelConfig,
        sha256: &str,
    ) -> Result<LibraryReport, ProbeError> {
        let copy = PinnedCopy::make(library, sha256, &self.copies)?;
        self.probe_as(copy.path(), plugin, Some(config))
    }

    /// Probes `library` as `plugin`'s uid.
    fn probe_as(
        &self,
        library: &Path,
        plugin: &str,
        config: Option<&pio_plugin_api::wire::ModelConfig>,
    ) -> Result<LibraryReport, ProbeError> {
        let root = nix::unistd::geteuid().is_root();
        let uid = match root {
            true => self.users.uid_for(plugin).map_err(|e| ProbeError::Spawn {
                exe: self.exe.clone(),
                reason: e.to_string(),
            })?,
            false => nix::unistd::geteuid().as_raw(),
        };
        let user = (uid, self.gid);
        #[cfg(target_os = "linux")]
        crate::elf::check_shared_object(library).map_err(|reason| ProbeError::Malformed {
            library: library.to_owned(),
            reason,
        })?;
        if let Some((uid, gid)) = probe_plan(user).drop_to {
            if let Some(blocked) = crate::sandbox::readable::unreadable(
                library,
                uid,
                gid,
                crate::sandbox::readable::Reach::Host,
            ) {
                return Err(ProbeError::Unreadable {
                    message: blocked.message(&library.display().to_string(), uid, gid),
                });
            }
        }
        let mut command = Command::new(&self.exe);
        command
            .arg("probe")
            .args(["--uid", &user.0.to_string(), "--gid", &user.1.to_string()]);
        // The config goes on stdin, not in argv, which every user can read (`ps`): its options
        // may hold secrets.
        let json = config.map(|c| serde_json::to_string(c).unwrap_or_else(|_| "{}".into()));
        if json.is_some() {
            command.arg("--model-config-on-stdin");
        }
        // Whatever the library's constructors start is killed with the probe.
        let fence =
            Fence::new("probe", crate::config::DEFAULT_PIDS, PROBE_MEMORY).map_err(|e| {
                ProbeError::Spawn {
                    exe: self.exe.clone(),
                    reason: format!("cannot make the probe's cgroup: {e}"),
                }
            })?;
        fence.enclose(&mut command);
        let mut child = command
            .arg(library)
            // The child inherits nothing of ours: no secrets in the environment.
            .env_clear()
            .stdin(if json.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| ProbeError::Spawn {
                exe: self.exe.clone(),
                reason: e.to_string(),
            })?;
        if let (Some(json), Some(mut stdin)) = (json, child.stdin.take()) {
            // A child that exits without reading is its own failure, reported below.
            std::thread::spawn(move || {
                use std::io::Write;
                let _ = stdin.write_all(json.as_bytes());
            });
        }
        // Drain both pipes on threads so a chatty child cannot block on a full pipe.
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let status = match child.wait_timeout(self.timeout) {
            Ok(Some(status)) => status,
            Ok(None) | Err(_) => {
                fence.kill(child.id());
                let _ = child.kill();
                let _ = child.wait();
                return Err(ProbeError::Timeout {
                    library: library.to_owned(),
                    seconds: self.timeout.as_secs(),
                });
            }
        };
        // What the probe left running would hold its pipes open, and the reads below with them.
        // Without a cgroup a process that left the probe's group survives the kill: its pipes
        // are read for a moment more, then given up (the probe wrote its answer before it ended).
        fence.kill(child.id());
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        let stdout = stdout.until(deadline);
        let stderr = stderr.until(deadline);
        match outcome(library, &status, &stdout, &stderr) {
            Err(ProbeError::Crashed {
                library,
                how,
                stderr,
            }) if fence.hit_memory_limit() => Err(ProbeError::Crashed {
                library,
                how: format!(
                    "{how}, at the probe's memory limit of {} MiB: a library may take no more while it is checked",
                    PROBE_MEMORY >> 20
                ),
                stderr,
            }),
            other => other,
        }
    }
}

/// What the probe child's last JSON line and exit status say about `library`.
fn outcome(
    library: &Path,
    status: &std::process::ExitStatus,
    stdout: &str,
    stderr: &str,
) -> Result<LibraryReport, ProbeError> {
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    match line.map(serde_json::from_str::<ProbeLine>) {
        Some(Ok(ProbeLine::Ok(report))) if status.success() => Ok(report),
        Some(Ok(ProbeLine::ConfigRefused {
            report,
            kind,
            message,
        })) => Err(ProbeError::ConfigRefused {
            report: Box::new(report),
            kind,
            message,
        }),
        Some(Ok(ProbeLine::Error {
            kind,
            message,
            detail,
        })) => Err(ProbeError::Refused {
            kind,
            message,
            detail,
        }),
        _ => Err(ProbeError::Crashed {
            library: library.to_owned(),
            how: describe_status(status),
            stderr: tail(stderr),
        }),
    }
}

/// A pipe read to its end on a thread of its own, so a chatty child cannot block on a full one.
struct Drained {
    text: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    done: std::sync::mpsc::Receiver<()>,
}

impl Drained {
    /// What was read by the pipe's end, or by `deadline` if its end has not come.
    fn until(self, deadline: std::time::Instant) -> String {
        let wait = deadline.saturating_duration_since(std::time::Instant::now());
        let _ = self.done.recv_timeout(wait);
        let bytes = self.text.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> Drained {
    let text = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (finished, done) = std::sync::mpsc::channel();
    let into = text.clone();
    std::thread::spawn(move || {
        if let Some(mut pipe) = pipe {
            let mut chunk = [0u8; 8192];
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => into
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        let _ = finished.send(());
    });
    Drained { text, done }
}

fn describe_status(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => {
            let name = nix::sys::signal::Signal::try_from(signal)
                .map(|s| format!(" ({})", s.as_str()))
                .unwrap_or_default();
            format!("killed by signal {signal}{name}")
        }
        (None, None) => "unknown status".into(),
    }
}

fn tail(stderr: &str) -> String {
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
    last.map(|l| format!(": {}", l.trim())).unwrap_or_default()
}

/// The confinement every probe gets before it loads a library (whose constructors run at load):
/// the base of the `low` tier — the workers' unprivileged `user` when started as root,
/// no_new_privs, no core dumps; its cgroup is the probe's fence, not a worker's — and an empty
/// network namespace:
/// reading what a library is needs no network, and the probe runs before any tier applies (a
/// `maximum` manifest's library included). Not as root, the namespace is made inside a user
/// namespace of its own where the kernel allows that, and the network stays where it does not.
/// The memory a probe may take: it loads a library and asks it questions, no model. Without a
/// cap a constructor (run at every daemon start, hot-plug rescan and `pio list`) could take the
/// host's memory whatever the plugin's tier.
const PROBE_MEMORY: u64 = 1 << 30;

fn probe_plan(user: (u32, u32)) -> Plan {
    let root = nix::unistd::geteuid().is_root();
    Plan {
        requested: Tier::Low,
        applied: Tier::Low,
        downgrade_reason: None,
        drop_to: root.then_some(user),
        limits: ResolvedLimits::default(),
        cgroup: false,
        network: NetworkCut::WherePossible,
        isolation: None,
    }
}

/// The plugin's answer to `config`, constructed and initialized as a worker confined as the
/// probe is would make it, when it refuses (or cannot be made: the library's failure).
fn config_refused(
    lib: &PluginLibrary,
    config: &str,
    report: &LibraryReport,
    user: (u32, u32),
) -> Option<ProbeLine> {
    // A plugin that cannot be made is the library's failure, not the manifest's.
    let broken = |kind: &str, message: String| ProbeLine::Error {
        kind: kind.into(),
        message,
        detail: None,
    };
    let mut plugin = match lib.instantiate() {
        Ok(p) => p,
        Err(e) => {
            let message = format!("the plugin's constructor failed: {e}");
            return Some(broken("construct", message));
        }
    };
    // The context of a worker confined as the probe is (`low`, no limits).
    let context = serde_json::to_string(&crate::launch::host_context(&probe_plan(user)))
        .unwrap_or_else(|_| "{}".into());
    if let Err(e) = plugin.initialize(context.as_str().into()).into_result() {
        let message = format!("the plugin's initialize failed: {e}");
        return Some(broken("initialize", message));
    }
    let e = plugin.supports_config(config.into()).into_result().err()?;
    Some(ProbeLine::ConfigRefused {
        report: report.clone(),
        kind: e.kind.name().into(),
        message: e.message.to_string(),
    })
}

/// The child's side: drops to `user` (when root), loads `library` and prints one JSON line.
/// Returns the process exit code.
pub fn run_child(library: &Path, user: (u32, u32), model_config: Option<&str>) -> i32 {
    // SAFETY: closes inherited descriptors this process does not use; nothing else runs yet.
    unsafe { libc::close_range(3, u32::MAX, 0) };
    if let Err(e) = confine::apply(&probe_plan(user)) {
        let line = ProbeLine::Error {
            kind: "confine".into(),
            message: e.to_string(),
            detail: None,
        };
        println!("{}", serde_json::to_string(&line).unwrap_or_default());
        return 0;
    }
    let line = match PluginLibrary::load(library) {
        Ok(lib) => {
            let info = lib.info();
            let report = LibraryReport {
                api_version: lib.built_with().to_string(),
                name: info.name.to_string(),
                version: info.version.to_string(),
                family: info.family.to_string(),
                capabilities: info.capabilities,
            };
            match model_config.and_then(|c| config_refused(&lib, c, &report, user)) {
                Some(refused) => refused,
                None => ProbeLine::Ok(report),
            }
        }
        Err(e) => {
            let kind = match &e {
                LoadError::Open { .. } => "open",
                LoadError::NotAPlugin { .. } => "not_a_plugin",
                LoadError::IncompatibleApi { .. } => "incompatible_api",
                LoadError::Layout { .. } => "layout",
                LoadError::Other { .. } => "other",
            };
            let detail = match &e {
                LoadError::Layout { report, .. } => Some(report.clone()),
                _ => None,
            };
            ProbeLine::Error {
                kind: kind.into(),
                message: e.to_string(),
                detail,
            }
        }
    };
    match serde_json::to_string(&line) {
        Ok(json) => {
            println!("{json}");
            0
        }
        Err(e) => {
            eprintln!("cannot encode probe result: {e}");
            2
        }
    }
}
