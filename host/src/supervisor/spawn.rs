//! Starting a worker process: the checks before it, its cgroup, the spawn with the socket at fd
//! 3, and the handshake that ends with it confined.

use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedReadHalf;
use tokio::sync::{mpsc, oneshot};

use super::handle::{WorkerError, WorkerSpec};
use super::routing::forward_output;
use crate::fault::Fault;
use crate::probe::LibraryReport;
use crate::protocol::{encode, FromWorker, ToWorker, WireError, PROTOCOL_VERSION};
use crate::sandbox::cgroup::Cgroup;
use crate::sandbox::Plan;
use crate::worker::SOCKET_FD;

/// A worker that drops to an unprivileged user must be able to read its library and its model
/// folder: refused up front with the path, the uid and the fix, rather than a loader's
/// "permission denied" from inside its sandbox.
pub(super) fn readable_to_worker(spec: &WorkerSpec) -> Result<(), WorkerError> {
    let Some((uid, gid)) = spec.plan.drop_to else {
        return Ok(());
    };
    use crate::sandbox::readable::{unreadable, unreadable_tree, Reach};
    let reach = Reach::of(&spec.plan);
    let library = std::iter::once(&spec.library)
        .filter_map(|l| unreadable(l, uid, gid, reach).map(|b| (l, b)));
    let model = spec
        .read_paths
        .iter()
        .filter_map(|p| unreadable_tree(p, uid, gid, reach).map(|b| (p, b)));
    match library.chain(model).next() {
        Some((path, blocked)) => Err(WorkerError::new(
            Fault::Sandbox,
            blocked.message(&format!("{}: {}", spec.name, path.display()), uid, gid),
        )),
        None => Ok(()),
    }
}

/// Creates the folders the worker may write (a quantization cache) when missing, owned by the
/// user it drops to; an existing folder is left as the operator made it.
pub(super) fn writable_for_worker(spec: &WorkerSpec) -> Result<(), WorkerError> {
    for dir in &spec.write_paths {
        if dir.is_dir() {
            // Used as the operator made it; one the worker cannot write (a cache made for an
            // earlier uid) only costs a quantization at each start, said here with the fix.
            if let Some((uid, gid)) = spec.plan.drop_to {
                use crate::sandbox::readable::{writable_folder, Reach};
                if !writable_folder(dir, uid, gid, Reach::of(&spec.plan)) {
                    tracing::warn!(
                        plugin = %spec.name,
                        "the worker runs as uid {uid}, gid {gid} and cannot write the quantization_cache folder {}: it quantizes again at every start; give it that user (chown -R {uid}:{gid} {}) or remove the folder so that the worker makes it",
                        dir.display(),
                        dir.display()
                    );
                }
            }
            continue;
        }
        let fail = |e: &dyn std::fmt::Display| {
            WorkerError::new(
                Fault::Sandbox,
                format!(
                    "{}: cannot create the folder {} ({e}); create it writable to the worker's user, or remove quantization_cache",
                    spec.name,
                    dir.display()
                ),
            )
        };
        // Root makes it only where it is safe; a daemon of another user makes what its user may.
        let dir = match nix::unistd::geteuid().is_root() {
            true => made_safely(dir).map_err(|e| fail(&e))?,
            false => {
                std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
                dir.clone()
            }
        };
        if let Some((uid, gid)) = spec.plan.drop_to {
            // Through a handle on the folder made, never a path a link could redirect; its own
            // alone: every worker shares the gid, and a umask may leave it group-writable.
            let folder = open_folder(&dir).map_err(|e| fail(&e))?;
            nix::unistd::fchown(&folder, Some(uid.into()), Some(gid.into()))
                .map_err(|e| fail(&e))?;
            nix::sys::stat::fchmod(&folder, nix::sys::stat::Mode::from_bits_truncate(0o700))
                .map_err(|e| fail(&e))?;
        }
    }
    Ok(())
}

/// Folders of the system a manifest's cache may not be made in: a folder made there and given
/// to the worker's user is one the system reads its own configuration or jobs from (a
/// `…/pio.service.d` the plugin writes is root's next start).
const SYSTEM_FOLDERS: [&str; 16] = [
    "/etc",
    "/usr",
    "/boot",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/root",
    "/run",
    "/proc",
    "/sys",
    "/dev",
    "/var/lib",
    "/var/spool",
];

/// Makes the missing folder `dir` (and the missing folders above it) as the daemon, and says
/// where it is, links resolved; refused when it would lie in one of the system's own folders,
/// or below a folder another user could write (who could swap what is made for a link before
/// it is handed to the worker). A manifest names the folder: root makes it only where no one
/// else could have placed it.
pub(super) fn made_safely(dir: &std::path::Path) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let mut existing = dir;
    while std::fs::symlink_metadata(existing).is_err() {
        existing = existing
            .parent()
            .ok_or_else(|| "no folder above it exists".to_string())?;
    }
    let real = existing.canonicalize().map_err(|e| e.to_string())?;
    let target = match dir.strip_prefix(existing) {
        Ok(rest)
            if rest
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_))) =>
        {
            real.join(rest)
        }
        _ => return Err("its path climbs with `..` past a missing folder".into()),
    };
    if let Some(system) = SYSTEM_FOLDERS
        .iter()
        .find(|s| target.starts_with(s) || target == std::path::Path::new("/"))
    {
        return Err(format!(
            "the daemon does not make folders in {system}, a folder of the system's own"
        ));
    }
    if !real.is_dir() {
        return Err(format!("{} is not a folder", real.display()));
    }
    // The folder made in, and every folder above it: root's or the daemon's, written by no
    // one else (a sticky folder such as /tmp above is fine: no one else may move what is ours).
    let me = nix::unistd::geteuid().as_raw();
    for (i, folder) in real.ancestors().enumerate() {
        let m = std::fs::metadata(folder).map_err(|e| e.to_string())?;
        let owned = m.uid() == me || m.uid() == 0;
        let shut = m.mode() & 0o022 == 0 || (i > 0 && m.mode() & 0o1000 != 0);
        if !(owned && shut) {
            return Err(format!(
                "{} is not the daemon's alone (owned by uid {}, mode {:o}): another user could replace what is made there",
                folder.display(),
                m.uid(),
                m.mode() & 0o7777
            ));
        }
    }
    std::fs::create_dir_all(&target).map_err(|e| e.to_string())?;
    Ok(target)
}

/// `dir` opened as a folder, not followed if it is a link.
fn open_folder(dir: &std::path::Path) -> nix::Result<std::os::fd::OwnedFd> {
    use nix::fcntl::{open, OFlag};
    open(
        dir,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
        nix::sys::stat::Mode::empty(),
    )
}

/// The worker's cgroup, when its plan wants one.
pub(super) fn create_cgroup(spec: &WorkerSpec) -> Result<Option<Arc<Cgroup>>, WorkerError> {
    let version = crate::sandbox::cgroup::Version::detect_writable();
    match (spec.plan.cgroup, version) {
        (true, Some(version)) => {
            crate::sandbox::cgroup::reap_stale(version);
            let group = Cgroup::create(version, &spec.name, &group_spec(&spec.plan))
                .map_err(|e| WorkerError::new(Fault::Sandbox, e.to_string()))?;
            if !group.unenforced().is_empty() {
                tracing::warn!(
                    plugin = %spec.name,
                    "this kernel offers no {} (swap accounting off: boot with swapaccount=1 or cgroup v2's memory.swap.max): the worker may swap past its memory limit",
                    group.unenforced().join(", ")
                );
            }
            Ok(Some(Arc::new(group)))
        }
        (true, None) => Err(WorkerError::new(
            Fault::Sandbox,
            format!(
                "worker for {} needs a cgroup, but no writable hierarchy was found",
                spec.name
            ),
        )),
        (false, _) => Ok(None),
    }
}

/// Starts `pio worker` with `worker_end` as its fd 3, in its own session, dying with us, and
/// puts it in `cgroup` before it can do anything.
pub(super) fn spawn(
    spec: &WorkerSpec,
    worker_end: std::os::unix::net::UnixStream,
    cgroup: Option<&Cgroup>,
) -> Result<tokio::process::Child, WorkerError> {
    let worker_fd = worker_end.as_raw_fd();
    let mut command = tokio::process::Command::new(&spec.exe);
    command
        .arg("worker")
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .envs(inherited_env(|k| std::env::var_os(k)))
        .envs(gpu_env(&spec.plan))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: only async-signal-safe calls between fork and exec: setsid, prctl, dup2.
    unsafe {
        command.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            // Dies with the thread that spawned it; tokio's core threads live as long as
            // the runtime, and workers are never spawned from the blocking pool.
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)?;
            // dup2 clears CLOEXEC on the copy: fd 3 is the only extra fd the worker keeps.
            if libc::dup2(worker_fd, SOCKET_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|e| {
        WorkerError::new(
            Fault::Spawn,
            format!("cannot start {} worker: {e}", spec.exe.display()),
        )
    })?;
    drop(worker_end);
    if let Some(cg) = cgroup {
        if let Err(e) = cg.add(child.id().unwrap_or(0)) {
            let _ = child.start_kill();
            return Err(WorkerError::new(Fault::Sandbox, e.to_string()));
        }
    }
    forward_output(&spec.name, child.stdout.take(), child.stderr.take());
    Ok(child)
}

/// The host's end of the socket: its read half, and a queue whose frames a task writes out.
pub(super) fn connect(
    host_end: std::os::unix::net::UnixStream,
) -> Result<(OwnedReadHalf, mpsc::UnboundedSender<Vec<u8>>), WorkerError> {
    let spawn_error = |e: std::io::Error| WorkerError::new(Fault::Spawn, e.to_string());
    host_end.set_nonblocking(true).map_err(spawn_error)?;
    let stream = tokio::net::UnixStream::from_std(host_end).map_err(spawn_error)?;
    let (read_half, mut write_half) = stream.into_split();
    let (outbox, mut outbox_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        while let Some(frame) = outbox_rx.recv().await {
            if write_half.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    Ok((read_half, outbox))
}

/// What a worker's `Ready` said.
pub(super) struct Handshake {
    /// What the library is.
    pub(super) plugin: LibraryReport,
    /// Mechanisms the worker applied to itself.
    pub(super) applied: Vec<String>,
    /// Whether it answers `Stats` (its plugin was built against plugin-api 1.7 or later).
    pub(super) stats: bool,
}

/// Sends `Start` (the plan, with the library and model kept visible) and waits for the worker
/// to report itself confined and its plugin constructed.
pub(super) async fn handshake(
    spec: &WorkerSpec,
    outbox: &mpsc::UnboundedSender<Vec<u8>>,
    reply: oneshot::Receiver<Result<FromWorker, WireError>>,
) -> Result<Handshake, WorkerError> {
    let mut plan = spec.plan.clone();
    // The file-size limit is per file and for every file: a folder the worker is given to write
    // (a quantization cache, as large as the quantized weights) lifts it, and the scratch
    // tmpfs (medium and above) still bounds the scratch.
    if !spec.write_paths.is_empty() {
        plan.limits.scratch_bytes = None;
    }
    if let Some(isolation) = &mut plan.isolation {
        isolation.keep_visible.push(spec.library.clone());
        isolation
            .keep_visible
            .extend(spec.read_paths.iter().cloned());
        isolation.writable.extend(spec.write_paths.iter().cloned());
    }
    let start = ToWorker::Start {
        protocol: PROTOCOL_VERSION,
        library: spec.library.clone(),
        plan,
        host_context: spec.host_context.clone(),
    };
    let frame = encode(&start).map_err(|e| WorkerError::new(Fault::Protocol, e.to_string()))?;
    let _ = outbox.send(frame);
    let name = &spec.name;
    let reply = reply
        .await
        .map_err(|_| {
            WorkerError::new(
                Fault::WorkerDied,
                format!("worker for {name} vanished during start"),
            )
        })?
        .map_err(WorkerError)?;
    match reply {
        FromWorker::Ready {
            protocol,
            plugin,
            applied,
            features,
        } if protocol == PROTOCOL_VERSION => Ok(Handshake {
            plugin,
            applied,
            stats: features.iter().any(|f| f == crate::protocol::STATS),
        }),
        FromWorker::StartFailed { error } => Err(WorkerError(error)),
        other => Err(WorkerError::new(
            Fault::Protocol,
            format!("worker for {name} answered Start with {other:?}"),
        )),
    }
}

/// The variables of the daemon's environment (read through `lookup`) that a worker, whose
/// environment is otherwise cleared, gets too: the kernels' cap (`PIO_KERNELS`), so an operator's
/// cap applies to the models, not only to the daemon process.
fn inherited_env(
    lookup: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Vec<(&'static str, std::ffi::OsString)> {
    ["PIO_KERNELS"]
        .into_iter()
        .filter_map(|k| lookup(k).map(|v| (k, v)))
        .collect()
}

/// The environment a worker confined to one GPU gets besides `PATH` and `LANG` (nothing for any
/// other): CUDA counts devices by bus address, the order the sandbox maps `cuda:N` to a node in
/// (`sandbox::gpu`); inside the worker's own `/dev` that GPU is the only one.
fn gpu_env(plan: &Plan) -> Vec<(&'static str, &'static str)> {
    match plan.isolation.as_ref().and_then(|i| i.gpu) {
        Some(_) => vec![("CUDA_DEVICE_ORDER", "PCI_BUS_ID")],
        None => Vec::new(),
    }
}

/// What the worker's cgroup enforces, from its plan.
fn group_spec(plan: &Plan) -> crate::sandbox::cgroup::GroupSpec {
    crate::sandbox::cgroup::GroupSpec {
        limits: plan.limits.clone(),
        devices: plan.isolation.as_ref().is_some_and(|i| i.devices),
        cpuset: plan.isolation.as_ref().and_then(|i| i.cpuset.clone()),
        // A GPU that maps to no node gets no rules: the worker refuses to start, saying why.
        extra_devices: match plan.isolation.as_ref().and_then(|i| i.gpu) {
            Some(gpu) => crate::sandbox::gpu::minor(gpu)
                .map(|minor| {
                    let devices = std::fs::read_to_string("/proc/devices").unwrap_or_default();
                    crate::sandbox::gpu::cgroup_rules(minor, &devices)
                })
                .unwrap_or_default(),
            None => Vec::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::{HostSupport, Policy, Subject, Tier};

    /// A manifest's cache folder is made by the daemon only where no one else could have placed
    /// it and outside the system's own folders (root made and handed to the worker any folder a
    /// manifest named: a systemd drop-in folder, say, was root's code at the next start).
    #[test]
    fn a_cache_folder_is_made_only_where_it_is_safe() {
        use std::os::unix::fs::PermissionsExt;
        let work = tempfile::tempdir().unwrap();
        let made = made_safely(&work.path().join("a/b")).unwrap();
        assert!(made.is_dir() && made.ends_with("a/b"));
        for system in [
            "/etc/systemd/system/pio.service.d",
            "/var/spool/cron/x",
            "/root/.ssh/y",
        ] {
            let e = made_safely(std::path::Path::new(system)).unwrap_err();
            assert!(e.contains("system"), "{system}: {e}");
        }
        // Through a link: where it leads counts.
        let link = work.path().join("link");
        std::os::unix::fs::symlink("/etc", &link).unwrap();
        let e = made_safely(&link.join("cron.d2")).unwrap_err();
        assert!(e.contains("/etc"), "{e}");
        // Below a folder others may write: refused, nothing made.
        let open = work.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = made_safely(&open.join("cache")).unwrap_err();
        assert!(e.contains("not the daemon's alone"), "{e}");
        assert!(!open.join("cache").exists());
        let e = made_safely(&work.path().join("missing/../../x")).unwrap_err();
        assert!(e.contains(".."), "{e}");
    }

    fn plan_for(gpu: Option<u32>) -> Plan {
        let host = HostSupport {
            root: true,
            cgroups: Some(crate::sandbox::cgroup::Version::V2),
            seccomp: true,
            user_namespaces: true,
            landlock_abi: 6,
            allowed_cpus: Vec::new(),
        };
        let subject = Subject {
            plugin: "p",
            tier: Tier::High,
            limits: Default::default(),
            pinned: false,
            gpu,
            uid: 65534,
        };
        crate::sandbox::plan(subject, &Policy::default(), &host).unwrap()
    }

    /// Only the kernels' cap passes from the daemon's environment, and only when set.
    #[test]
    fn a_worker_inherits_the_kernels_cap_and_nothing_else() {
        let env = |k: &str| match k {
            "PIO_KERNELS" => Some("avx2".into()),
            "HOME" | "PIO_TEST_SECRET" => Some("x".into()),
            _ => None,
        };
        assert_eq!(inherited_env(env), [("PIO_KERNELS", "avx2".into())]);
        assert!(inherited_env(|_| None).is_empty());
    }

    /// The hostile suite checks a CPU worker's environment is `PATH` and `LANG` only.
    #[test]
    fn only_a_gpu_worker_gets_the_cuda_device_order() {
        assert!(gpu_env(&plan_for(None)).is_empty());
        assert_eq!(
            gpu_env(&plan_for(Some(1))),
            [("CUDA_DEVICE_ORDER", "PCI_BUS_ID")]
        );
    }
}
