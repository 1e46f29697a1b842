//! The worker's side of confinement: applied by the worker to itself, while it is still
//! single-threaded and before it loads the plugin library, so no plugin code ever runs
//! unconfined. The host has already placed it in its cgroup.

use std::path::{Path, PathBuf};

use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{Gid, Uid};

use super::{NetworkCut, Plan};

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

fn cut_network() -> nix::Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
}

/// An empty network namespace for a process that is not root, made inside a user namespace of
/// its own (where the kernel lets unprivileged users make one), whose capabilities it then
/// drops; what was applied, or why the network stays.
fn cut_network_unprivileged() -> String {
    let cut = super::namespaces::enter_user_namespace()
        .and_then(|()| step("empty network namespace", cut_network()));
    // Capabilities held in the new user namespace (even where the cut failed) go at once.
    let dropped = clear_capabilities();
    match (cut, dropped) {
        (Ok(()), Ok(())) => "no network (own user namespace)".into(),
        (Ok(()), Err(e)) => format!("no network, but its user namespace's capabilities stay: {e}"),
        (Err(e), _) => format!("network kept: {e}"),
    }
}

/// The most file descriptors a worker may hold (weights are few large mmaps, sockets are one).
const MAX_OPEN_FILES: u64 = 4096;

/// Applies `plan` to the calling process; returns the names of the mechanisms applied.
pub fn apply(plan: &Plan) -> Result<Vec<String>, ConfineError> {
    let mut applied = process_limits(plan)?;
    match plan.network {
        NetworkCut::Kept => {}
        NetworkCut::WherePossible if !nix::unistd::geteuid().is_root() => {
            applied.push(cut_network_unprivileged());
        }
        NetworkCut::Required | NetworkCut::WherePossible => {
            step("empty network namespace", cut_network())?;
            applied.push("no network".into());
        }
    }
    let mut handoff = None;
    // Resolved while the host's /dev and /proc are in view (the worker's own /dev holds one GPU).
    let gpu_nodes: Vec<PathBuf> = match plan.isolation.as_ref().and_then(|i| i.gpu) {
        Some(ordinal) => step(
            "find the GPU's device nodes",
            super::gpu::present_nodes(ordinal),
        )?,
        None => Vec::new(),
    };
    if let Some(isolation) = &plan.isolation {
        handoff = super::namespaces::enter(isolation, plan.drop_to, &gpu_nodes)?;
        applied.push("namespaces(mnt,pid,net,ipc,uts)".into());
        applied.push(format!(
            "read-only root, scratch tmpfs {} bytes",
            isolation.scratch_bytes
        ));
        drop_bounding_capabilities()?;
        applied.push("capabilities dropped".into());
    }
    // Who the worker dies with, before credentials change (which clears the death signal).
    let parent = nix::unistd::getppid();
    let user_namespace = plan.isolation.as_ref().is_some_and(|i| i.user_namespace);
    if let (true, Some((uid, gid))) = (user_namespace, plan.drop_to) {
        // As root, so that root owns it; the uid switch then happens inside.
        super::namespaces::enter_owned_user_namespace(uid, gid)?;
    }
    if let Some((uid, gid)) = plan.drop_to {
        switch_user(uid, gid)?;
        // Not left to `fs.suid_dumpable`: a dumpable worker can be traced by any process of
        // the workers' shared uid.
        step("not dumpable", nix::sys::prctl::set_dumpable(false))?;
        applied.push(format!("uid={uid}"));
    }
    if user_namespace {
        if plan.drop_to.is_none() {
            // Not root: a namespace of the caller's own, mapping its own ids.
            super::namespaces::enter_user_namespace()?;
        }
        clear_capabilities()?;
        applied.push("user namespace".into());
    }
    rearm_parent_death(parent)?;
    step("no_new_privs", nix::sys::prctl::set_no_new_privs())?;
    applied.push("no_new_privs".into());
    if let Some(isolation) = &plan.isolation {
        if isolation.landlock {
            applied.push(super::access::restrict(
                &isolation.keep_visible,
                &isolation.writable,
                Path::new("/tmp"),
                &gpu_nodes,
            )?);
        }
        applied.push(super::seccomp::apply(isolation.syscalls, handoff)?);
    }
    Ok(applied)
}

/// What every tier sets first: death with the daemon, no core dumps, the open-file limit and,
/// with a scratch size, the file-size limit.
fn process_limits(plan: &Plan) -> Result<Vec<String>, ConfineError> {
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
    Ok(applied)
}

/// Sets the death signal again: the kernel clears it when the uid or the user namespace
/// changes. A parent that died in between is not waited for.
fn rearm_parent_death(parent: nix::unistd::Pid) -> Result<(), ConfineError> {
    step(
        "exit with the daemon",
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL),
    )?;
    if nix::unistd::getppid() != parent {
        std::process::exit(1);
    }
    Ok(())
}

/// Switches to `uid`/`gid` with no supplementary groups, for good.
fn switch_user(uid: u32, gid: u32) -> Result<(), ConfineError> {
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
    Ok(())
}

/// Empties every capability set of the calling thread (inside a new user namespace its creator
/// holds them all).
pub(super) fn clear_capabilities() -> Result<(), ConfineError> {
    drop_bounding_capabilities()?;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads a v3 header and two data words from valid memory.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    if r != 0 {
        return Err(ConfineError {
            step: "clear capabilities",
            reason: std::io::Error::last_os_error().to_string(),
        });
    }
    Ok(())
}

/// Empties the capability bounding set (while still root: it takes CAP_SETPCAP), so nothing the
/// worker executes can regain a capability; switching uid then clears the other sets.
fn drop_bounding_capabilities() -> Result<(), ConfineError> {
    for cap in 0..=63 {
        // SAFETY: prctl with integer arguments.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            // EINVAL: no such capability on this kernel; every real one was dropped before it.
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(ConfineError {
                    step: "drop capabilities",
                    reason: e.to_string(),
                });
            }
        }
    }
    // SAFETY: as above; clears the ambient set.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    Ok(())
}
