//! The `high` tier's Landlock ruleset: which paths the worker may read, execute or write, no TCP
//! at all, and no signals or abstract Unix sockets reaching outside its sandbox. Enforced by the
//! kernel on top of the uid and the read-only mounts, so a path the mounts leave readable (a
//! world-readable host file) is still out of reach.

use std::path::{Path, PathBuf};

use landlock::{
    path_beneath_rules, Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope, ABI,
};

use super::confine::ConfineError;

/// The ABI this ruleset is written for; older kernels get the subset they know.
const TARGET: ABI = ABI::V6;

fn fail(e: impl std::fmt::Display) -> ConfineError {
    ConfineError {
        step: "landlock",
        reason: e.to_string(),
    }
}

/// System paths every worker reads: shared libraries, the loader cache, its own /proc, CPU and
/// cgroup facts (thread pools size themselves from them).
const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/lib",
    "/lib64",
    "/etc/ld.so.cache",
    "/proc",
    "/sys/devices/system/cpu",
    "/sys/fs/cgroup",
];

/// Paths the worker may read and execute: the system's, `visible` (library, model), and with a
/// GPU the driver's facts that exist here.
pub fn read_paths(visible: &[PathBuf], gpu: bool) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = SYSTEM_READ.iter().map(PathBuf::from).collect();
    paths.extend(visible.iter().cloned());
    if gpu {
        paths.extend(
            super::gpu::DRIVER_READ
                .iter()
                .map(PathBuf::from)
                .filter(|p| p.exists()),
        );
    }
    paths
}

/// What a worker on a GPU may write of its own process's files: its threads' folder. CUDA names
/// the helper threads it starts by writing their `comm`, and without that `cuInit` fails with
/// `CUDA_ERROR_OPERATING_SYSTEM` (seen on an H200 at `high`, 2026-12-04). Opened by the worker
/// itself, `/proc/self/task` is its own `/proc/<pid>/task`: no other process's files.
pub fn own_thread_paths(gpu: bool) -> Vec<PathBuf> {
    if gpu {
        vec![PathBuf::from("/proc/self/task")]
    } else {
        Vec::new()
    }
}

/// Restricts the calling (single) thread and everything it starts; returns what the kernel
/// enforced ("fully" or "partially", on kernels with an older Landlock ABI). `devices`: the
/// granted GPU's nodes (none without a GPU), which it may read, write and control (ioctl).
pub fn restrict(
    visible: &[PathBuf],
    writable: &[PathBuf],
    scratch: &Path,
    devices: &[PathBuf],
) -> Result<String, ConfineError> {
    let gpu = !devices.is_empty();
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(TARGET))
        .map_err(fail)?
        .handle_access(AccessNet::from_all(TARGET))
        .map_err(fail)?
        .scope(Scope::from_all(TARGET))
        .map_err(fail)?
        .create()
        .map_err(fail)?
        .add_rules(path_beneath_rules(
            read_paths(visible, gpu),
            AccessFs::from_read(TARGET),
        ))
        .map_err(fail)?
        .add_rules(path_beneath_rules([scratch], AccessFs::from_all(TARGET)))
        .map_err(fail)?
        .add_rules(path_beneath_rules(writable, AccessFs::from_all(TARGET)))
        .map_err(fail)?
        .add_rules(path_beneath_rules(
            super::dev::HARMLESS
                .iter()
                .map(|d| Path::new("/dev").join(d)),
            AccessFs::ReadFile | AccessFs::WriteFile,
        ))
        .map_err(fail)?
        .add_rules(path_beneath_rules(
            own_thread_paths(gpu),
            AccessFs::ReadFile | AccessFs::ReadDir | AccessFs::WriteFile | AccessFs::Truncate,
        ))
        .map_err(fail)?
        .add_rules(path_beneath_rules(
            devices,
            AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev,
        ))
        .map_err(fail)?
        .restrict_self()
        .map_err(fail)?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => Ok("landlock".into()),
        RulesetStatus::PartiallyEnforced => Ok("landlock (partially: older kernel ABI)".into()),
        RulesetStatus::NotEnforced => Err(fail("the kernel enforced none of the ruleset")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_gpu_worker_writes_its_own_thread_files() {
        assert_eq!(own_thread_paths(true), [PathBuf::from("/proc/self/task")]);
        assert!(own_thread_paths(false).is_empty());
        // Reading stays as it was: /proc is readable to every worker.
        assert!(read_paths(&[], false).contains(&PathBuf::from("/proc")));
    }
}
