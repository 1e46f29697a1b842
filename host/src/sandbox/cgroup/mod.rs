//! A worker's cgroup, on cgroup v1 (one hierarchy per controller, as on this project's machines)
//! or v2 (one unified tree, as on most systems). What gets written is planned as data by
//! [`settings`], so the hierarchy a machine lacks is still tested on what it would write.
//!
//! On v1 hybrids the empty unified tree (`/sys/fs/cgroup/unified`) is used too: its
//! `cgroup.kill` removes every process of the worker, including double-forked escapees, in one
//! write. Groups live under `<hierarchy>/pio/` — on v2, under the daemon's own cgroup instead
//! where systemd delegated it (`Delegate=yes`, [`delegation`]) — and are removed when the
//! [`Cgroup`] is dropped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

mod delegation;
pub mod headroom;
mod settings;

pub use settings::{settings, Controller, GroupSpec, Setting};

const ROOT: &str = "/sys/fs/cgroup";

/// Which cgroup hierarchy is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Version {
    /// One hierarchy per controller (`/sys/fs/cgroup/memory`, ...).
    V1,
    /// The unified hierarchy (`/sys/fs/cgroup/cgroup.controllers` exists).
    V2,
}

impl Version {
    /// The hierarchy mounted at `/sys/fs/cgroup`, if this process may create groups in it.
    pub fn detect_writable() -> Option<Self> {
        Self::detect_at(Path::new(ROOT))
    }

    fn detect_at(root: &Path) -> Option<Self> {
        let writable = |p: &Path| nix::unistd::access(p, nix::unistd::AccessFlags::W_OK).is_ok();
        if root.join("cgroup.controllers").is_file() {
            return writable(root).then_some(Self::V2);
        }
        let v1 = ["memory", "cpu", "pids"]
            .iter()
            .all(|c| writable(&root.join(c)));
        v1.then_some(Self::V1)
    }
}

/// A cgroup operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: {action} failed: {source}")]
pub struct CgroupError {
    /// The file or directory.
    pub path: PathBuf,
    /// What was attempted.
    pub action: &'static str,
    /// The OS error.
    pub source: std::io::Error,
}

/// The leaf the processes of a v2 cgroup namespace's root move to (see [`evacuate`]).
pub const DAEMON_LEAF: &str = "pio-daemon";

/// Moves every process of the v2 cgroup `dir` into `dir/`[`DAEMON_LEAF`], one `cgroup.procs`
/// write per process (the kernel's rule); a process that exits meanwhile is skipped, one
/// started meanwhile is caught by another pass.
fn evacuate(dir: &Path) -> Result<(), CgroupError> {
    use std::io::Write;
    let home = dir.join(DAEMON_LEAF);
    io(&home, "create", std::fs::create_dir_all(&home))?;
    let target = home.join("cgroup.procs");
    for _ in 0..3 {
        let procs = dir.join("cgroup.procs");
        let listed = io(&procs, "read", std::fs::read_to_string(&procs))?;
        let pids: Vec<&str> = listed.split_whitespace().collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let mut file = io(
                &target,
                "open",
                std::fs::OpenOptions::new().append(true).open(&target),
            )?;
            match file.write_all(format!("{pid}\n").as_bytes()) {
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                r => io(&target, "move a process into", r)?,
            }
        }
    }
    Ok(())
}

fn io<T>(path: &Path, action: &'static str, r: std::io::Result<T>) -> Result<T, CgroupError> {
    r.map_err(|source| CgroupError {
        path: path.to_owned(),
        action,
        source,
    })
}

/// Figures read from a worker's cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Memory in use, bytes.
    pub memory_bytes: Option<u64>,
    /// The memory limit, bytes.
    pub memory_limit_bytes: Option<u64>,
    /// Times the kernel's OOM killer struck inside the group.
    pub oom_kills: u64,
    /// Processes plus threads.
    pub pids: Option<u64>,
    /// CPU time used, microseconds.
    pub cpu_usec: Option<u64>,
}

/// A worker's cgroup (one directory per v1 controller, or one v2 directory). Dropping it kills
/// whatever still runs inside and removes the directories.
#[derive(Debug)]
pub struct Cgroup {
    version: Version,
    memory: PathBuf,
    cpu: PathBuf,
    pids: PathBuf,
    devices: Option<PathBuf>,
    cpuset: Option<PathBuf>,
    /// v1's CPU accounting, where it is a hierarchy of its own (not mounted with `cpu`).
    cpuacct: Option<PathBuf>,
    /// A directory with `cgroup.kill` (v2, or the v1 hybrid's unified tree).
    unified: Option<PathBuf>,
    /// Optional limits the kernel offers no file for (swap, where swap accounting is off).
    unenforced: Vec<&'static str>,
}

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// Removes groups left behind by a `pio` that died without cleaning up (killed with SIGKILL,
/// say): any `pio/<name>-<pid>-<n>` whose `pid` is no longer running has its processes killed
/// and its directories removed. Returns how many groups were removed.
pub fn reap_stale(version: Version) -> usize {
    reap_stale_at(delegation::base(), version)
}

fn reap_stale_at(root: &Path, version: Version) -> usize {
    let parents: Vec<PathBuf> = match version {
        Version::V1 => [
            "memory", "cpu", "cpuacct", "pids", "devices", "cpuset", "unified",
        ]
        .iter()
        .map(|c| root.join(c).join("pio"))
        .collect(),
        Version::V2 => vec![root.join("pio")],
    };
    let mut removed = 0;
    for parent in parents {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let owner = name.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok());
            let Some(owner) = owner else { continue };
            if !entry.path().is_dir() || Path::new(&format!("/proc/{owner}")).exists() {
                continue;
            }
            let dir = entry.path();
            for _ in 0..100 {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                let pids: Vec<i32> = procs
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect();
                if pids.is_empty() {
                    break;
                }
                for pid in pids {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if std::fs::remove_dir(&dir).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

/// A new v1 cpuset group starts with no CPUs and no memory nodes: give `pio/` its root's.
fn inherit_cpuset(hierarchy: &Path) -> Result<(), CgroupError> {
    let parent = hierarchy.join("pio");
    io(&parent, "create", std::fs::create_dir_all(&parent))?;
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let target = parent.join(file);
        let current = std::fs::read_to_string(&target).unwrap_or_default();
        if current.trim().is_empty() {
            let value = std::fs::read_to_string(hierarchy.join(file)).unwrap_or_default();
            io(
                &target,
                "inherit cpuset",
                std::fs::write(&target, value.trim()),
            )?;
        }
    }
    Ok(())
}

/// The memory nodes of `dir`'s parent group, for a new cpuset group.
fn parent_mems(dir: &Path) -> String {
    dir.parent()
        .and_then(|p| std::fs::read_to_string(p.join("cpuset.mems")).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "0".into())
}

impl Cgroup {
    /// Creates `pio/<name>-<daemon pid>-<n>` enforcing `spec`.
    pub fn create(version: Version, name: &str, spec: &GroupSpec) -> Result<Self, CgroupError> {
        Self::create_at(delegation::base(), version, name, spec)
    }

    fn create_at(
        root: &Path,
        version: Version,
        name: &str,
        spec: &GroupSpec,
    ) -> Result<Self, CgroupError> {
        // Manifests' names are plain already; a name from elsewhere still makes one folder
        // beside the others, never a path out of the hierarchy.
        let name: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let leaf = format!(
            "{name}-{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        );
        let mut group = match version {
            Version::V1 => Self::v1_dirs(root, &leaf, spec)?,
            Version::V2 => Self::v2_dirs(root, &leaf, spec)?,
        };
        for dir in group.dirs() {
            io(dir, "create", std::fs::create_dir_all(dir))?;
        }
        for s in settings(version, spec) {
            let dir = group.dir_of(s.controller);
            let file = dir.join(s.file);
            if s.optional && !file.exists() {
                group.unenforced.push(s.file);
                continue;
            }
            let value = if s.file == "cpuset.mems" {
                parent_mems(dir)
            } else {
                s.value
            };
            io(&file, "write limit", std::fs::write(&file, value))?;
        }
        Ok(group)
    }

    /// Where the leaf `leaf` lives in each v1 hierarchy it needs (and in the unified one, for
    /// its statistics, where mounted beside them).
    fn v1_dirs(root: &Path, leaf: &str, spec: &GroupSpec) -> Result<Self, CgroupError> {
        let dir = |c: &str| root.join(c).join("pio").join(leaf);
        let unified_root = root.join("unified");
        let unified = unified_root
            .join("cgroup.procs")
            .is_file()
            .then(|| unified_root.join("pio").join(leaf));
        if spec.cpuset.is_some() {
            inherit_cpuset(&root.join("cpuset"))?;
        }
        Ok(Self {
            version: Version::V1,
            memory: dir("memory"),
            cpu: dir("cpu"),
            pids: dir("pids"),
            devices: spec.devices.then(|| dir("devices")),
            cpuset: spec.cpuset.is_some().then(|| dir("cpuset")),
            cpuacct: (!root.join("cpu/cpuacct.usage").exists()
                && root.join("cpuacct/cpuacct.usage").exists())
            .then(|| dir("cpuacct")),
            unified,
            unenforced: Vec::new(),
        })
    }

    /// The leaf `leaf` in the v2 tree, with the controllers it needs enabled above it.
    fn v2_dirs(root: &Path, leaf: &str, spec: &GroupSpec) -> Result<Self, CgroupError> {
        let parent = root.join("pio");
        io(&parent, "create", std::fs::create_dir_all(&parent))?;
        let controllers = if spec.cpuset.is_some() {
            "+memory +cpu +pids +cpuset"
        } else {
            "+memory +cpu +pids"
        };
        // Controllers must be enabled in every ancestor for the leaf to get them.
        for dir in [root, parent.as_path()] {
            let file = dir.join("cgroup.subtree_control");
            let written = match std::fs::write(&file, controllers) {
                // A cgroup holding processes cannot hand controllers down (v2's "no internal
                // processes" rule). The real root is exempt, a container's cgroup namespace
                // root is not: its processes (the daemon, an init) move to a leaf of their own
                // first, as Docker-in-Docker does.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && dir == root => {
                    evacuate(root)?;
                    std::fs::write(&file, controllers)
                }
                other => other,
            };
            io(&file, "enable controllers", written)?;
        }
        let dir = parent.join(leaf);
        Ok(Self {
            version: Version::V2,
            memory: dir.clone(),
            cpu: dir.clone(),
            pids: dir.clone(),
            devices: None,
            cpuset: spec.cpuset.is_some().then(|| dir.clone()),
            cpuacct: None,
            unified: Some(dir),
            unenforced: Vec::new(),
        })
    }

    fn dir_of(&self, c: Controller) -> &Path {
        match c {
            Controller::Memory => &self.memory,
            Controller::Cpu => &self.cpu,
            Controller::Pids => &self.pids,
            Controller::Devices => self.devices.as_ref().unwrap_or(&self.pids),
            Controller::Cpuset => self.cpuset.as_ref().unwrap_or(&self.pids),
        }
    }

    fn dirs(&self) -> Vec<&PathBuf> {
        let mut dirs = vec![&self.memory, &self.cpu, &self.pids];
        dirs.extend(self.devices.as_ref());
        dirs.extend(self.cpuset.as_ref());
        dirs.extend(self.cpuacct.as_ref());
        dirs.extend(self.unified.as_ref());
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// The optional limits this kernel has no file for (`memory.swap.max` or
    /// `memory.memsw.limit_in_bytes` where swap accounting is off): the worker may swap past its
    /// memory limit.
    pub fn unenforced(&self) -> &[&'static str] {
        &self.unenforced
    }

    /// Each hierarchy's `cgroup.procs` of the group (a process writing "0" there moves itself).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs().iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// The group's memory directory (where its limits can be read back).
    pub fn memory_dir(&self) -> &Path {
        &self.memory
    }

    /// Moves process `pid` into the group.
    pub fn add(&self, pid: u32) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            let file = dir.join("cgroup.procs");
            io(&file, "add process", std::fs::write(&file, pid.to_string()))?;
        }
        Ok(())
    }

    /// Kills every process in the group.
    pub fn kill_all(&self) {
        if let Some(dir) = &self.unified {
            if std::fs::write(dir.join("cgroup.kill"), "1").is_ok() {
                return;
            }
        }
        // No cgroup.kill: signal members until none is left (a fork racing us is caught by
        // the next round).
        for _ in 0..100 {
            let pids = self.members();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// The pids in the group.
    pub fn members(&self) -> Vec<u32> {
        let file = self
            .unified
            .as_ref()
            .unwrap_or(&self.pids)
            .join("cgroup.procs");
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Current usage and counters.
    pub fn stats(&self) -> Stats {
        let read = |dir: &Path, file: &str| std::fs::read_to_string(dir.join(file)).ok();
        let num =
            |dir: &Path, file: &str| read(dir, file).and_then(|s| s.trim().parse::<u64>().ok());
        let field = |text: Option<String>, key: &str| {
            text.and_then(|t| {
                t.lines().find_map(|l| {
                    l.strip_prefix(key)
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
            })
        };
        match self.version {
            Version::V1 => Stats {
                memory_bytes: num(&self.memory, "memory.usage_in_bytes"),
                memory_limit_bytes: v1_limit(num(&self.memory, "memory.limit_in_bytes")),
                oom_kills: field(read(&self.memory, "memory.oom_control"), "oom_kill ")
                    .unwrap_or(0),
                pids: num(&self.pids, "pids.current"),
                cpu_usec: num(self.cpuacct.as_ref().unwrap_or(&self.cpu), "cpuacct.usage")
                    .map(|ns| ns / 1000),
            },
            Version::V2 => Stats {
                memory_bytes: num(&self.memory, "memory.current"),
                memory_limit_bytes: num(&self.memory, "memory.max"),
                oom_kills: field(read(&self.memory, "memory.events"), "oom_kill ").unwrap_or(0),
                pids: num(&self.pids, "pids.current"),
                cpu_usec: field(read(&self.cpu, "cpu.stat"), "usage_usec "),
            },
        }
    }
}

/// A v1 memory limit, `None` when unlimited: v1 writes no limit as the largest page-aligned
/// 63-bit number (v2 writes `max`, which does not parse).
fn v1_limit(bytes: Option<u64>) -> Option<u64> {
    bytes.filter(|&b| b < 1 << 60)
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.kill_all();
        // A killed process leaves its cgroup a moment after the signal: retry briefly.
        for dir in self.dirs() {
            for _ in 0..200 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
