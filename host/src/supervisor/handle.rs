//! The host's handle on one worker process: spawning it into its cgroup, the handshake, and the
//! request traffic. When the worker dies, every request in flight gets an error that says how
//! it died (crash, signal, memory limit), never silence.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pio_plugin_api::wire::{HostContext, InferOutcome, InferRequest, ModelConfig, ModelInfo};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};

use super::routing::{
    death_reason, dispatch, fail_all, forward_output, lock, Events, LoadEvent, Pending, Waiters,
    WINDOW,
};
use crate::fault::Fault;
use crate::probe::LibraryReport;
use crate::protocol::{
    encode, read_frame_async, FromWorker, ToWorker, TokenFrame, WireError, PROTOCOL_VERSION,
};
use crate::sandbox::cgroup::{Cgroup, Stats};
use crate::sandbox::Plan;
use crate::worker::SOCKET_FD;

/// What to start.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// The plugin's name (for messages and the cgroup's name).
    pub name: String,
    /// The library to load.
    pub library: PathBuf,
    /// How to confine it.
    pub plan: Plan,
    /// Passed to the plugin's `initialize`.
    pub host_context: HostContext,
    /// The `pio` executable to run as `pio worker`.
    pub exe: PathBuf,
    /// Other paths the worker must be able to read (the model folder).
    pub read_paths: Vec<PathBuf>,
}

/// One event of a running request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A token, as soon as it was produced.
    Token(TokenFrame),
    /// The request finished.
    Done(InferOutcome),
    /// The request failed.
    Failed(WireError),
}

/// A worker that could not be started or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WorkerError(pub WireError);

impl WorkerError {
    fn new(kind: Fault, message: impl Into<String>) -> Self {
        Self(WireError::new(kind, message))
    }
}

/// A running worker.
pub struct Worker {
    name: String,
    pid: u32,
    plugin: LibraryReport,
    applied: Vec<String>,
    plan: Plan,
    outbox: mpsc::UnboundedSender<Vec<u8>>,
    pending: Pending,
    waiters: Arc<Mutex<Waiters>>,
    cgroup: Option<Arc<Cgroup>>,
    exit: watch::Receiver<Option<String>>,
    /// Why the host killed the worker, when it did: reported instead of "killed by SIGKILL".
    kill_reason: Arc<Mutex<Option<String>>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

/// A worker that drops to an unprivileged user must be able to read its library and its model
/// folder: refused up front with the path, the uid and the fix, rather than a loader's
/// "permission denied" from inside its sandbox.
fn readable_to_worker(spec: &WorkerSpec) -> Result<(), WorkerError> {
    let Some((uid, gid)) = spec.plan.drop_to else {
        return Ok(());
    };
    use crate::sandbox::readable::{unreadable, unreadable_tree, Reach};
    let empty_root = spec.plan.isolation.as_ref().is_some_and(|i| i.empty_root);
    let reach = if empty_root {
        Reach::Mounted
    } else {
        Reach::Host
    };
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

impl Worker {
    /// Spawns the worker, puts it in its cgroup, and completes the handshake: when this returns
    /// the worker is confined and the plugin constructed.
    pub async fn start(spec: WorkerSpec) -> Result<Worker, WorkerError> {
        let name = spec.name.clone();
        readable_to_worker(&spec)?;
        let cgroup = match (
            spec.plan.cgroup,
            crate::sandbox::cgroup::Version::detect_writable(),
        ) {
            (true, Some(version)) => Some(Arc::new({
                crate::sandbox::cgroup::reap_stale(version);
                Cgroup::create(version, &name, &group_spec(&spec.plan))
                    .map_err(|e| WorkerError::new(Fault::Sandbox, e.to_string()))?
            })),
            (true, None) => {
                return Err(WorkerError::new(
                    Fault::Sandbox,
                    format!(
                        "worker for {name} needs a cgroup, but no writable hierarchy was found"
                    ),
                ))
            }
            (false, _) => None,
        };
        let (host_end, worker_end) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| WorkerError::new(Fault::Spawn, format!("socketpair: {e}")))?;
        let worker_fd = worker_end.as_raw_fd();
        let mut command = tokio::process::Command::new(&spec.exe);
        command
            .arg("worker")
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
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
        let pid = child.id().unwrap_or(0);
        if let Some(cg) = &cgroup {
            if let Err(e) = cg.add(pid) {
                let _ = child.start_kill();
                return Err(WorkerError::new(Fault::Sandbox, e.to_string()));
            }
        }
        forward_output(&name, child.stdout.take(), child.stderr.take());

        host_end
            .set_nonblocking(true)
            .map_err(|e| WorkerError::new(Fault::Spawn, e.to_string()))?;
        let stream = tokio::net::UnixStream::from_std(host_end)
            .map_err(|e| WorkerError::new(Fault::Spawn, e.to_string()))?;
        let (mut read_half, mut write_half) = stream.into_split();
        let (outbox, mut outbox_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        tokio::spawn(async move {
            while let Some(frame) = outbox_rx.recv().await {
                if write_half.write_all(&frame).await.is_err() {
                    break;
                }
            }
        });

        let pending: Pending = Arc::default();
        let waiters: Arc<Mutex<Waiters>> = Arc::default();
        let (start_tx, start_rx) = oneshot::channel();
        lock(&waiters).start = Some(start_tx);
        let (exit_tx, exit) = watch::channel(None);
        let kill_reason: Arc<Mutex<Option<String>>> = Arc::default();
        {
            let (pending, waiters, cgroup, name, kill_reason) = (
                pending.clone(),
                waiters.clone(),
                cgroup.clone(),
                name.clone(),
                kill_reason.clone(),
            );
            tokio::spawn(async move {
                let reason = loop {
                    match read_frame_async::<FromWorker>(&mut read_half).await {
                        Ok(Some(frame)) => dispatch(frame, &pending, &waiters),
                        // A killed worker's socket may end in a reset instead of EOF.
                        Ok(None) | Err(crate::protocol::FrameError::Io(_)) => break None,
                        Err(e) => break Some(format!("sent a bad frame ({e})")),
                    }
                };
                if reason.is_some() {
                    let _ = child.start_kill();
                }
                let status = child.wait().await.ok();
                let stats = cgroup.as_ref().map(|c| c.stats());
                let why = reason
                    .or_else(|| lock(&kill_reason).clone())
                    .unwrap_or_else(|| death_reason(status, stats.as_ref()));
                let message = format!("worker for {name} {why}");
                fail_all(&pending, &waiters, &message);
                let _ = exit_tx.send(Some(message));
            });
        }

        let mut plan = spec.plan.clone();
        if let Some(isolation) = &mut plan.isolation {
            isolation.keep_visible.push(spec.library.clone());
            isolation
                .keep_visible
                .extend(spec.read_paths.iter().cloned());
        }
        let start = ToWorker::Start {
            protocol: PROTOCOL_VERSION,
            library: spec.library.clone(),
            plan,
            host_context: spec.host_context.clone(),
        };
        let frame = encode(&start).map_err(|e| WorkerError::new(Fault::Protocol, e.to_string()))?;
        let _ = outbox.send(frame);
        let reply = start_rx
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
                ..
            } if protocol == PROTOCOL_VERSION => Ok(Worker {
                name,
                pid,
                plugin,
                applied,
                plan: spec.plan,
                outbox,
                pending,
                waiters,
                cgroup,
                exit,
                kill_reason,
                next_id: AtomicU64::new(1),
            }),
            FromWorker::StartFailed { error } => Err(WorkerError(error)),
            other => Err(WorkerError::new(
                Fault::Protocol,
                format!("worker for {name} answered Start with {other:?}"),
            )),
        }
    }

    fn send(&self, message: &ToWorker) -> Result<(), WorkerError> {
        if let Some(why) = self.exit.borrow().clone() {
            return Err(WorkerError::new(Fault::WorkerDied, why));
        }
        let frame =
            encode(message).map_err(|e| WorkerError::new(Fault::Protocol, e.to_string()))?;
        self.outbox.send(frame).map_err(|_| {
            WorkerError::new(
                Fault::WorkerDied,
                format!("worker for {} is gone", self.name),
            )
        })
    }

    /// Loads the model, calling `progress(stage, done, total)` as the plugin reports.
    pub async fn load(
        &self,
        config: ModelConfig,
        mut progress: impl FnMut(&str, u64, u64),
    ) -> Result<ModelInfo, WorkerError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        lock(&self.waiters).load = Some(tx);
        self.send(&ToWorker::Load { config })?;
        while let Some(event) = rx.recv().await {
            match event {
                LoadEvent::Progress(stage, done, total) => progress(&stage, done, total),
                LoadEvent::Loaded(info) => return Ok(info),
                LoadEvent::Failed(e) => return Err(WorkerError(e)),
            }
        }
        Err(WorkerError::new(Fault::WorkerDied, self.exit_reason()))
    }

    /// Starts a request; its events arrive on the returned receiver, ending with `Done` or
    /// `Failed`.
    pub fn infer(&self, request: InferRequest) -> Result<(u64, Events), WorkerError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, tx) = Events::new(id, self.outbox.clone());
        lock(&self.pending).insert(id, tx);
        let infer = ToWorker::Infer {
            id,
            request,
            window: Some(WINDOW),
        };
        if let Err(e) = self.send(&infer) {
            lock(&self.pending).remove(&id);
            return Err(e);
        }
        Ok((id, events))
    }

    /// Asks the worker to stop request `id`; it ends with a `cancelled` failure.
    pub fn cancel(&self, id: u64) {
        let _ = self.send(&ToWorker::Cancel { id });
    }

    /// Fails unless the worker answers a ping within `deadline`.
    pub async fn ping(&self, deadline: Duration) -> Result<(), WorkerError> {
        let nonce = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).pongs.insert(nonce, tx);
        self.send(&ToWorker::Ping { nonce })?;
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(WorkerError::new(Fault::WorkerDied, self.exit_reason())),
            Err(_) => Err(WorkerError::new(
                Fault::Unresponsive,
                format!(
                    "worker for {} did not answer a health check within {deadline:?}",
                    self.name
                ),
            )),
        }
    }

    /// Releases the model (waits for requests in flight, which hold the plugin).
    pub async fn unload(&self) -> Result<(), WorkerError> {
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).unload = Some(tx);
        self.send(&ToWorker::Unload)?;
        rx.await
            .map_err(|_| WorkerError::new(Fault::WorkerDied, self.exit_reason()))
    }

    /// Kills the worker, recording `why` (a clause such as "was stopped: ...") as the reason its
    /// requests in flight are given.
    pub fn kill_because(&self, why: String) {
        lock(&self.kill_reason).get_or_insert(why);
        self.kill();
    }

    /// Kills the worker and everything it started (its cgroup is removed once it is reaped).
    pub fn kill(&self) {
        if let Some(cg) = &self.cgroup {
            cg.kill_all();
        } else {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Stops the worker: kills it and waits (at most 5 s) until it has been reaped.
    pub async fn shutdown(&self) {
        self.kill();
        let mut exit = self.exit.clone();
        let _ = tokio::time::timeout(Duration::from_secs(5), exit.wait_for(Option::is_some)).await;
    }

    /// Resolves when the worker has exited; yields how it died.
    pub async fn exited(&self) -> String {
        let mut exit = self.exit.clone();
        let reason = match exit.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or_default(),
            Err(_) => format!("worker for {} is gone", self.name),
        };
        reason
    }

    fn exit_reason(&self) -> String {
        self.exit
            .borrow()
            .clone()
            .unwrap_or_else(|| format!("worker for {} stopped answering", self.name))
    }

    /// The worker's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What the library reported at the handshake.
    pub fn plugin(&self) -> &LibraryReport {
        &self.plugin
    }

    /// The confinement plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Mechanisms the worker applied to itself.
    pub fn applied(&self) -> &[String] {
        &self.applied
    }

    /// Requests the worker has been sent and not yet finished (a cancelled request counts until
    /// the worker confirms it stopped).
    pub fn in_flight(&self) -> usize {
        lock(&self.pending).len()
    }

    /// Usage read from its cgroup, if it has one.
    pub fn stats(&self) -> Option<Stats> {
        self.cgroup.as_ref().map(|c| c.stats())
    }
}

/// What the worker's cgroup enforces, from its plan.
fn group_spec(plan: &Plan) -> crate::sandbox::cgroup::GroupSpec {
    crate::sandbox::cgroup::GroupSpec {
        limits: plan.limits.clone(),
        devices: plan.isolation.as_ref().is_some_and(|i| i.devices),
        cpuset: plan.isolation.as_ref().and_then(|i| i.cpuset.clone()),
    }
}
