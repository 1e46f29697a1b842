//! The worker's side of confinement: applied by the worker to itself, while it is still
//! single-threaded and before it loads the plugin library, so no plugin code ever runs
//! unconfined. The host has already placed it in its cgroup.

use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{Gid, Uid};

use super::Plan;

/// A confinement step that failed; the worker refuses to load the plugin.
#[derive(Debug, thiserror::Error)]
#[error("cannot confine the worker: {step} failed: {reason}")]
pub struct ConfineError {
    /// Which step.
    pub step: &'static str,
    /// Why.
    pub reason: String,
}

fn step<T, E: std::fmt::Display>(name: &'static str, r: Result<T, E>) -> Result<T, ConfineError> {
    r.map_err(|e| ConfineError {
        step: name,
        reason: e.to_string(),
    })
}

/// The most file descriptors a worker may hold (weights are few large mmaps, sockets are one).
const MAX_OPEN_FILES: u64 = 4096;

/// Applies `plan` to the calling process; returns the names of the mechanisms applied.
pub fn apply(plan: &Plan) -> Result<Vec<String>, ConfineError> {
    let mut applied = Vec::new();
    step(
        "exit with the daemon",
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL),
    )?;
    applied.push("pdeathsig".to_string());
    step("no core dumps", setrlimit(Resource::RLIMIT_CORE, 0, 0))?;
    applied.push("rlimit_core=0".into());
    step(
        "open-file limit",
        setrlimit(Resource::RLIMIT_NOFILE, MAX_OPEN_FILES, MAX_OPEN_FILES),
    )?;
    applied.push(format!("rlimit_nofile={MAX_OPEN_FILES}"));
    if let Some(bytes) = plan.limits.scratch_bytes {
        // Past the limit a write fails with EFBIG instead of SIGXFSZ killing the worker.
        // SAFETY: installs the ignore disposition; no handler code runs.
        step("ignore SIGXFSZ", unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGXFSZ,
                nix::sys::signal::SigHandler::SigIgn,
            )
        })?;
        step(
            "file-size limit",
            setrlimit(Resource::RLIMIT_FSIZE, bytes, bytes),
        )?;
        applied.push(format!("rlimit_fsize={bytes}"));
    }
    if let Some((uid, gid)) = plan.drop_to {
        let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
        step("drop supplementary groups", nix::unistd::setgroups(&[]))?;
        step("switch gid", nix::unistd::setresgid(gid, gid, gid))?;
        step("switch uid", nix::unistd::setresuid(uid, uid, uid))?;
        // Proves the switch cannot be undone.
        if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
            return Err(ConfineError {
                step: "switch uid",
                reason: "the worker could regain root after dropping it".into(),
            });
        }
        applied.push(format!("uid={uid}"));
    }
    step("no_new_privs", nix::sys::prctl::set_no_new_privs())?;
    applied.push("no_new_privs".into());
    Ok(applied)
}
