//! The `medium` tier's namespaces and file-system view, entered by the worker itself.
//!
//! A new pid namespace applies to children only, so the worker forks twice: the process the host
//! started waits outside and mirrors the exit of pid 1, a minimal reaper that waits for the real
//! worker (pid 2) and mirrors its exit. The reaper exists because the kernel ignores default-
//! action signals a namespace's pid 1 sends itself (`abort()` would not end a pid-1 worker).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use super::confine::ConfineError;
use super::dev::{self, Devices};
use super::refusals::{self, Handoff};
use super::remount;
use super::{Isolation, Syscalls};

pub(super) fn fail(step: &'static str, e: impl std::fmt::Display) -> ConfineError {
    ConfineError {
        step,
        reason: e.to_string(),
    }
}

/// Enters new mount, pid, net, ipc and uts namespaces and builds the private file-system view;
/// returns only in the process that goes on to load the plugin, with its end of the channel to
/// the reaper, which answers the calls its filter will refuse (`refusals`). `gpu_nodes`: the
/// granted GPU's nodes, resolved on the host's view (`gpu::present_nodes`).
pub fn enter(
    isolation: &Isolation,
    owner: Option<(u32, u32)>,
    gpu_nodes: &[PathBuf],
) -> Result<Option<Handoff>, ConfineError> {
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    unshare(flags).map_err(|e| fail("unshare namespaces", e))?;
    // The inherited working directory may sit on a mount the view covers (the host's /tmp or
    // /dev/shm), which the read-only pass cannot reach: relative paths would lead there. Left
    // before the forks, so the reaper holds none either.
    nix::unistd::chdir("/").map_err(|e| fail("leave the working directory", e))?;
    // SAFETY: the worker is still single-threaded here.
    match unsafe { fork() }.map_err(|e| fail("fork into the pid namespace", e))? {
        ForkResult::Parent { child } => mirror_exit(child, false),
        ForkResult::Child => {}
    }
    // Now pid 1 of the new namespace: reap, and let pid 2 do the work.
    set_pdeathsig()?;
    // Where refusals kill (`maximum`) there is nothing to answer.
    let channel = match isolation.syscalls {
        Syscalls::AllowListKill => None,
        _ => Some(refusals::channel()?),
    };
    // SAFETY: still single-threaded.
    match unsafe { fork() }.map_err(|e| fail("fork the worker", e))? {
        ForkResult::Parent { child } => {
            if let Some((handoff, answerer)) = channel {
                drop(handoff);
                answerer.spawn();
            }
            unprivileged_reaper();
            mirror_exit(child, true)
        }
        ForkResult::Child => {}
    }
    set_pdeathsig()?;
    let _ = nix::unistd::sethostname("pio-worker");
    build_view(isolation, owner, gpu_nodes)?;
    Ok(channel.map(|(handoff, _)| handoff))
}

/// Enters a new user namespace mapping only the caller's own (already unprivileged) uid and gid:
/// host uids mean nothing inside it, and nothing inside it means anything to the host.
pub fn enter_user_namespace() -> Result<(), ConfineError> {
    let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
    // Switching uid made /proc/self root's; the maps below must be written by the process itself.
    nix::sys::prctl::set_dumpable(true).map_err(|e| fail("user namespace", e))?;
    unshare(CloneFlags::CLONE_NEWUSER).map_err(|e| fail("user namespace", e))?;
    let write = |file: &str, text: String| {
        std::fs::write(format!("/proc/self/{file}"), text)
            .map_err(|e| fail("user namespace", format!("{file}: {e}")))
    };
    write("setgroups", "deny".into())?;
    write("uid_map", format!("{uid} {uid} 1"))?;
    write("gid_map", format!("{gid} {gid} 1"))?;
    nix::sys::prctl::set_dumpable(false).map_err(|e| fail("user namespace", e))
}

/// Enters a new user namespace, still as root, where only `uid` and `gid` are mapped (to
/// themselves); the caller then switches to them inside it.
///
/// Made as root so that root owns it: a namespace's owner holds every capability in it, and an
/// owner of the workers' shared uid would let any process of that uid (a `low` worker) trace
/// and rewrite this one. A process inside cannot map ids other than its own, so a helper forked
/// first, still root in the host's namespace, writes the maps.
pub fn enter_owned_user_namespace(uid: u32, gid: u32) -> Result<(), ConfineError> {
    let step = "user namespace";
    let (ready_read, ready_write) = nix::unistd::pipe().map_err(|e| fail(step, e))?;
    let target = nix::unistd::getpid();
    // SAFETY: single-threaded still; the helper only reads a pipe, writes two files and exits.
    match unsafe { fork() }.map_err(|e| fail(step, e))? {
        ForkResult::Child => {
            drop(ready_write);
            let mut byte = [0u8];
            let ready = nix::unistd::read(&ready_read, &mut byte).is_ok_and(|n| n == 1);
            let write = |file: &str, id: u32| {
                std::fs::write(format!("/proc/{target}/{file}"), format!("{id} {id} 1"))
            };
            let mapped = ready && write("uid_map", uid).is_ok() && write("gid_map", gid).is_ok();
            // SAFETY: ends the helper without running the forked image's destructors.
            unsafe { libc::_exit(if mapped { 0 } else { 1 }) }
        }
        ForkResult::Parent { child } => {
            drop(ready_read);
            let entered = unshare(CloneFlags::CLONE_NEWUSER);
            if entered.is_ok() {
                let _ = nix::unistd::write(&ready_write, &[1]);
            }
            drop(ready_write);
            let helper = waitpid(child, None);
            entered.map_err(|e| fail(step, e))?;
            match helper {
                Ok(WaitStatus::Exited(_, 0)) => Ok(()),
                other => Err(fail(
                    step,
                    format!("the helper could not write the id maps ({other:?})"),
                )),
            }
        }
    }
}

/// The reaper reaps and answers refusals, which take no privilege: it keeps none (and cannot be
/// traced or have its memory read), so the process holding the filter's listener offers the
/// worker nothing to take over. Failing that, it ends, taking the worker with it.
fn unprivileged_reaper() {
    let dropped = nix::sys::prctl::set_dumpable(false)
        .map_err(|e| fail("the reaper's privileges", e))
        .and_then(|()| super::confine::clear_capabilities());
    if let Err(e) = dropped {
        let _ =
            std::io::Write::write_all(&mut std::io::stderr(), format!("worker: {e}\n").as_bytes());
        // SAFETY: ends the process without running destructors of the forked image.
        unsafe { libc::_exit(1) }
    }
}

fn set_pdeathsig() -> Result<(), ConfineError> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| fail("exit with the parent", e))
}

/// Waits for `child` (reaping any orphan meanwhile) and ends this process the same way.
/// As pid 1 (`reaper`), a signal death is passed on as exit code 128 + signal, which the outer
/// process turns back into the signal.
fn mirror_exit(child: Pid, reaper: bool) -> ! {
    loop {
        let target = if reaper { Pid::from_raw(-1) } else { child };
        match waitpid(target, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == child => {
                if !reaper && code > 128 && code <= 128 + 64 {
                    reraise(code - 128);
                }
                // SAFETY: ends the process without running destructors of the forked image.
                unsafe { libc::_exit(code) }
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == child => {
                if reaper {
                    // SAFETY: as above.
                    unsafe { libc::_exit(128 + signal as i32) }
                }
                reraise(signal as i32);
            }
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            // SAFETY: as above.
            Err(_) => unsafe { libc::_exit(1) },
        }
    }
}

fn reraise(signal: i32) -> ! {
    // SAFETY: restores the default action and raises the signal the child died of.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::kill(libc::getpid(), signal);
        libc::_exit(128 + signal)
    }
}

/// Private propagation, a fresh `/proc` for the pid namespace, a size-capped tmpfs at `/tmp`,
/// the worker's own `/dev` (`dev`), and every other mount read-only and `nodev` (`remount`).
fn build_view(
    isolation: &Isolation,
    owner: Option<(u32, u32)>,
    gpu_nodes: &[PathBuf],
) -> Result<(), ConfineError> {
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(|e| fail("make mounts private", e))?;
    let safe = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), "/proc", Some("proc"), safe, none).map_err(|e| fail("mount /proc", e))?;
    refuse_replaced(isolation)?;
    // Handles on what must stay reachable, taken before anything is mounted over it.
    let sources = open_all(&isolation.keep_visible)?;
    let writable = open_all(&isolation.writable)?;
    let device_nodes = dev::nodes(gpu_nodes);
    let devices = Devices::open(&device_nodes)?;
    if isolation.empty_root {
        build_empty_root(isolation, owner, &devices, &sources, &writable)?;
    } else {
        build_host_view(isolation, owner, &devices, &sources, &writable)?;
    }
    drop(sources);
    drop(writable);
    remount::read_only_pass(&isolation.writable, &device_nodes)
}

/// `medium` and `high`: the host's tree, with the scratch and the worker's `/dev` on top and
/// what they hid bound back.
fn build_host_view(
    isolation: &Isolation,
    owner: Option<(u32, u32)>,
    devices: &Devices,
    sources: &[(PathBuf, OwnedFd)],
    writable: &[(PathBuf, OwnedFd)],
) -> Result<(), ConfineError> {
    mount_scratch(Path::new("/tmp"), isolation.scratch_bytes, owner)?;
    devices.mount_at(Path::new("/dev"))?;
    hide_run()?;
    // The paths are canonical already (`/var/run/x` arrives as `/run/x`).
    for (path, fd) in sources {
        if ["/tmp", "/dev", "/run"].iter().any(|r| path.starts_with(r)) {
            bind(fd, path)?;
        }
    }
    // Each writable folder becomes a mount point of its own, which the read-only pass leaves
    // writable.
    for (path, fd) in writable {
        bind(fd, path)?;
    }
    Ok(())
}

/// An empty `/run` (and so `/var/run`, its link): a read-only mount does not stop a
/// `connect()` to a socket file, and there the host's services listen (the system bus, the
/// journal, a GPU daemon) for anyone their modes allow.
fn hide_run() -> Result<(), ConfineError> {
    let run = Path::new("/run");
    if !run.is_dir() {
        return Ok(());
    }
    let safe = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        run,
        Some("tmpfs"),
        safe,
        Some("size=64k,mode=755"),
    )
    .map_err(|e| fail("hide /run", e))
}

/// The folders the worker's view replaces whole (`/`, `/tmp`, `/proc`, `/dev`, `/run`) cannot be kept
/// visible or writable: bound back over the fresh mount, they would hide it, and the read-only
/// pass leaves the scratch and `/proc` alone by path.
fn refuse_replaced(isolation: &Isolation) -> Result<(), ConfineError> {
    let replaced = ["/", "/tmp", "/proc", "/dev", "/run"].map(Path::new);
    for path in isolation.keep_visible.iter().chain(&isolation.writable) {
        if replaced.contains(&path.as_path()) {
            return Err(fail(
                "keep a path visible",
                format!(
                    "{}: a model or cache folder cannot be {} itself at `medium` and above (the worker gets its own); move it into a folder of its own",
                    path.display(),
                    path.display()
                ),
            ));
        }
        // Bound into the view, a folder brings its sockets with it: a model `path` of
        // /run/dbus gave back the system bus that hiding /run keeps out.
        if let Some(why) = socket_in(path) {
            return Err(fail(
                "keep a path visible",
                format!(
                    "{}: a model or cache folder at `medium` and above must hold no sockets (a host service's door the worker's view keeps shut), and {why}; point the manifest at a folder of model files",
                    path.display(),
                ),
            ));
        }
    }
    Ok(())
}

/// Why the tree at `root` (links not followed) may not come into a worker's view: a socket in it
/// (the path itself one, as `/run/dbus/system_bus_socket` is), or a part that cannot be looked
/// through (a folder it cannot list, more than 100 000 entries: a model folder holds a few dozen),
/// where one could hide.
fn socket_in(root: &Path) -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(root) {
        Ok(m) if m.file_type().is_socket() => return Some(format!("{} is one", root.display())),
        Ok(m) if m.is_dir() => {}
        // A file, or nothing (the worker's start names a missing one).
        _ => return None,
    }
    let mut left = 100_000usize;
    let mut folders = vec![root.to_path_buf()];
    while let Some(folder) = folders.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            return Some(format!("{} cannot be listed to check", folder.display()));
        };
        for entry in entries.flatten() {
            let Some(l) = left.checked_sub(1) else {
                return Some("it holds more than 100 000 entries to check".into());
            };
            left = l;
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_socket() {
                return Some(format!("{} is one", entry.path().display()));
            }
            if kind.is_dir() {
                folders.push(entry.path());
            }
        }
    }
    None
}

/// `O_PATH` handles on `paths`, each with its path; one missing fails the worker, naming it.
pub(super) fn open_all(paths: &[PathBuf]) -> Result<Vec<(PathBuf, OwnedFd)>, ConfineError> {
    paths
        .iter()
        .map(|p| open_path(p).map(|fd| (p.clone(), fd)))
        .collect()
}

fn open_path(path: &Path) -> Result<OwnedFd, ConfineError> {
    nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| fail("keep a path visible", format!("{}: {e}", path.display())))
}

/// Bind-mounts what `source` refers to at `target`, creating the mount point.
pub(super) fn bind(source: &OwnedFd, target: &Path) -> Result<(), ConfineError> {
    let error = |e: &dyn std::fmt::Display| {
        fail("keep a path visible", format!("{}: {e}", target.display()))
    };
    let from = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(source));
    let is_dir = std::fs::metadata(&from).map_err(|e| error(&e))?.is_dir();
    let made = if is_dir {
        std::fs::create_dir_all(target)
    } else {
        target
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(target, b""))
    };
    made.map_err(|e| error(&e))?;
    let none: Option<&str> = None;
    mount(
        Some(from.as_str()),
        target,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(|e| error(&e))
}

/// A size-capped tmpfs at `at`, owned by the worker's uid.
fn mount_scratch(at: &Path, bytes: u64, owner: Option<(u32, u32)>) -> Result<(), ConfineError> {
    let options = scratch_options(bytes, owner.unwrap_or((0, 0)));
    mount(
        Some("tmpfs"),
        at,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .map_err(|e| fail("mount the scratch tmpfs", e))
}

/// The scratch tmpfs's options. tmpfs reads `size=0` as no limit at all, so a scratch of 0 is
/// mounted at its least, one page (the file-size limit of 0 still stops every write, and
/// folders bound inside it still find room for their mount points).
fn scratch_options(bytes: u64, (uid, gid): (u32, u32)) -> String {
    let size = bytes.max(1);
    format!("size={size},mode=0700,uid={uid},gid={gid}")
}

/// `maximum`: a new root holding only the library, the model, a fresh /proc, the worker's
/// `/dev` and the scratch; the host's file system is detached entirely.
fn build_empty_root(
    isolation: &Isolation,
    owner: Option<(u32, u32)>,
    devices: &Devices,
    sources: &[(PathBuf, OwnedFd)],
    writable: &[(PathBuf, OwnedFd)],
) -> Result<(), ConfineError> {
    let none: Option<&str> = None;
    let root = Path::new("/tmp");
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("size=1m,mode=0755"),
    )
    .map_err(|e| fail("mount the new root", e))?;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    devices.mount_at(&inside(Path::new("/dev")))?;
    let proc_dir = root.join("proc");
    std::fs::create_dir_all(&proc_dir).map_err(|e| fail("mount /proc", e))?;
    let safe = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), &proc_dir, Some("proc"), safe, none).map_err(|e| fail("mount /proc", e))?;
    let scratch = root.join("tmp");
    std::fs::create_dir_all(&scratch).map_err(|e| fail("mount the scratch tmpfs", e))?;
    mount_scratch(&scratch, isolation.scratch_bytes, owner)?;
    // After the scratch: a path under /tmp is bound inside it, not hidden beneath it.
    for (path, fd) in sources.iter().chain(writable) {
        bind(fd, &inside(path))?;
    }
    let old = root.join(".old");
    std::fs::create_dir_all(&old).map_err(|e| fail("pivot_root", e))?;
    nix::unistd::pivot_root(root, &old).map_err(|e| fail("pivot_root", e))?;
    nix::unistd::chdir("/").map_err(|e| fail("pivot_root", e))?;
    nix::mount::umount2("/.old", nix::mount::MntFlags::MNT_DETACH)
        .map_err(|e| fail("detach the host root", e))?;
    std::fs::remove_dir("/.old").map_err(|e| fail("detach the host root", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_the_view_replaces_cannot_be_kept() {
        let isolation = |keep: &str| Isolation {
            scratch_bytes: 1 << 20,
            keep_visible: vec![PathBuf::from(keep)],
            writable: Vec::new(),
            syscalls: Syscalls::DenyList,
            user_namespace: false,
            landlock: false,
            devices: false,
            empty_root: false,
            cpuset: None,
            gpu: None,
        };
        for replaced in ["/", "/tmp", "/proc", "/dev"] {
            let e = refuse_replaced(&isolation(replaced)).unwrap_err();
            assert!(e.reason.contains("cannot be"), "{replaced}: {e}");
        }
        for kept in ["/tmp/model", "/dev/shm/model", "/srv/model"] {
            assert!(refuse_replaced(&isolation(kept)).is_ok(), "{kept}");
        }
        // A folder holding a socket, however deep: it would come into the view with it.
        let folder = tempfile::tempdir().unwrap();
        let deep = folder.path().join("a/b");
        std::fs::create_dir_all(&deep).unwrap();
        let keep = folder.path().to_str().unwrap();
        assert!(refuse_replaced(&isolation(keep)).is_ok());
        let _bus = std::os::unix::net::UnixListener::bind(deep.join("bus")).unwrap();
        let e = refuse_replaced(&isolation(keep)).unwrap_err();
        assert!(
            e.reason.contains("sockets") && e.reason.contains("a/b/bus"),
            "{e}"
        );
    }

    /// tmpfs takes `size=0` for no limit: a scratch of 0 must not become an unbounded one.
    #[test]
    fn a_scratch_of_nothing_is_not_unbounded() {
        let options = scratch_options(0, (65534, 65534));
        assert_eq!(options, "size=1,mode=0700,uid=65534,gid=65534");
        assert!(scratch_options(1 << 20, (1, 2)).starts_with("size=1048576,"));
    }
}
