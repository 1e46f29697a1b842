//! A child process and everything it starts, killed together: a cgroup of its own where this
//! process can make one, else the child's process group. A library probe runs a plugin's
//! constructors, which may fork, leave their session and hold the probe's pipes: without a
//! fence they would outlive the probe, unlimited, and hang whoever reads its output.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use super::cgroup::{Cgroup, CgroupError, GroupSpec, Version};
use super::ResolvedLimits;

/// The fence around one child; dropping it kills what is inside and removes the cgroup.
pub struct Fence {
    group: Option<Cgroup>,
    /// The group's `cgroup.procs` files, ready for the child to write itself into.
    procs: Vec<CString>,
}

impl Fence {
    /// A fence named `name` holding at most `pids` processes and threads and `memory_bytes` of
    /// memory: a cgroup when running as root with a writable hierarchy, else only the process
    /// group.
    pub fn new(name: &str, pids: u32, memory_bytes: u64) -> Result<Self, CgroupError> {
        let version = nix::unistd::geteuid()
            .is_root()
            .then(Version::detect_writable)
            .flatten();
        let Some(version) = version else {
            return Ok(Self {
                group: None,
                procs: Vec::new(),
            });
        };
        let spec = GroupSpec {
            limits: ResolvedLimits {
                pids: Some(pids),
                memory_bytes: Some(memory_bytes),
                ..ResolvedLimits::default()
            },
            devices: false,
            cpuset: None,
            extra_devices: Vec::new(),
        };
        let group = Cgroup::create(version, name, &spec)?;
        let procs = (group.procs_files().iter())
            .filter_map(|p| CString::new(p.as_os_str().as_bytes()).ok())
            .collect();
        Ok(Self {
            group: Some(group),
            procs,
        })
    }

    /// Makes `command`'s child lead a session (and so a process group) of its own and, with a
    /// cgroup, enter it before it runs any code of its own. A session of its own: a library's
    /// constructors run in it, and one sharing the caller's terminal (`sudo pio check` in an
    /// operator's shell) could type into that shell with TIOCSTI.
    pub fn enclose(&self, command: &mut Command) {
        let procs = self.procs.clone();
        // SAFETY: setsid, open, write and close only, between fork and exec
        // (async-signal-safe).
        unsafe {
            command.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for file in &procs {
                    let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    // "0": the writing process itself.
                    let wrote = fd >= 0 && libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                    if fd >= 0 {
                        libc::close(fd);
                    }
                    if !wrote {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }

    /// Whether the kernel killed a process inside at the memory limit.
    pub fn hit_memory_limit(&self) -> bool {
        self.group.as_ref().is_some_and(|g| g.stats().oom_kills > 0)
    }

    /// Kills everything inside: the cgroup's members, or without one the process group
    /// `leader` led (a process that left it with `setsid` escapes that).
    pub fn kill(&self, leader: u32) {
        match &self.group {
            Some(group) => group.kill_all(),
            // The leader may be reaped already: a group whose members are all gone can lend its
            // number to a new one, a moment's risk only where no cgroup could be made.
            None => {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(leader as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}
