//! The host's handle on one worker process (started by [`super::spawn`]) and its request
//! traffic. When the worker dies, every request in flight gets an error that says how
//! it died (crash, signal, memory limit), never silence.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pio_plugin_api::wire::{
    EngineStats, HostContext, InferOutcome, InferRequest, ModelConfig, ModelInfo,
};
use tokio::sync::{mpsc, oneshot, watch};

use super::routing::{Events, LoadEvent, WINDOW};
use super::spawn::{
    connect, create_cgroup, handshake, readable_to_worker, spawn, writable_for_worker,
};
use super::traffic::{self, Command, Traffic};
use crate::fault::Fault;
use crate::probe::LibraryReport;
use crate::protocol::{encode, FrameError, ToWorker, TokenFrame, WireError, MAX_FRAME};
use crate::sandbox::cgroup::{Cgroup, Stats};
use crate::sandbox::Plan;

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
    /// Folders the worker may write (a quantization cache), created for it when missing.
    pub write_paths: Vec<PathBuf>,
}

/// One event of a running request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A token, as soon as it was produced.
    Token(TokenFrame),
    /// The request finished (boxed: an outcome is large beside a token).
    Done(Box<InferOutcome>),
    /// The request failed.
    Failed(WireError),
}

/// A worker that could not be started or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WorkerError(pub WireError);

impl WorkerError {
    pub(super) fn new(kind: Fault, message: impl Into<String>) -> Self {
        Self(WireError::new(kind, message))
    }
}

/// A running worker.
pub struct Worker {
    name: String,
    pid: u32,
    plugin: LibraryReport,
    applied: Vec<String>,
    /// Whether it answers [`Worker::engine_stats`] asks.
    answers_stats: bool,
    plan: Plan,
    outbox: mpsc::UnboundedSender<Vec<u8>>,
    /// The task that owns the worker's traffic (which request a frame belongs to, who waits).
    traffic: Traffic,
    cgroup: Option<Arc<Cgroup>>,
    exit: watch::Receiver<Option<String>>,
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

impl Worker {
    /// Spawns the worker, puts it in its cgroup, and completes the handshake: when this returns
    /// the worker is confined and the plugin constructed.
    pub async fn start(spec: WorkerSpec) -> Result<Worker, WorkerError> {
        readable_to_worker(&spec)?;
        writable_for_worker(&spec)?;
        let cgroup = create_cgroup(&spec)?;
        let (host_end, worker_end) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| WorkerError::new(Fault::Spawn, format!("socketpair: {e}")))?;
        let child = spawn(&spec, worker_end, cgroup.as_deref())?;
        let pid = child.id().unwrap_or(0);
        let (read_half, outbox) = connect(host_end)?;
        let (exit_tx, exit) = watch::channel(None);
        let traffic = traffic::start(spec.name.clone(), read_half, child, cgroup.clone(), exit_tx);
        let (start_tx, start_rx) = oneshot::channel();
        traffic.ask(Command::Start(start_tx));
        let hello = handshake(&spec, &outbox, start_rx).await?;
        Ok(Worker {
            name: spec.name,
            pid,
            plugin: hello.plugin,
            applied: hello.applied,
            answers_stats: hello.stats,
            plan: spec.plan,
            outbox,
            traffic,
            cgroup,
            exit,
            next_id: AtomicU64::new(1),
        })
    }

    /// Registers with the traffic task; fails once the worker is gone.
    fn ask(&self, command: Command) -> Result<(), WorkerError> {
        if self.traffic.ask(command) {
            Ok(())
        } else {
            Err(WorkerError::new(Fault::WorkerDied, self.exit_reason()))
        }
    }

    fn send(&self, message: &ToWorker) -> Result<(), WorkerError> {
        let frame =
            encode(message).map_err(|e| WorkerError::new(Fault::Protocol, e.to_string()))?;
        self.send_frame(frame)
    }

    fn send_frame(&self, frame: Vec<u8>) -> Result<(), WorkerError> {
        if let Some(why) = self.exit.borrow().clone() {
            return Err(WorkerError::new(Fault::WorkerDied, why));
        }
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
        self.ask(Command::Load(tx))?;
        self.send(&ToWorker::Load { config })?;
        while let Some(event) = rx.recv().await {
            match event {
                LoadEvent::Progress(stage, done, total) => progress(&stage, done, total),
                LoadEvent::Loaded(info) => return Ok(*info),
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
        self.ask(Command::Request(id, tx))?;
        let infer = ToWorker::Infer {
            id,
            request,
            window: Some(WINDOW),
        };
        // Too large for a frame is the request's size, the client's to change (not the
        // protocol's failure, a 500).
        let frame = encode(&infer).map_err(|e| match e {
            FrameError::TooLarge(n) => WorkerError::new(
                Fault::InvalidInput,
                format!("the request comes to {n} bytes as sent to the model, more than the {MAX_FRAME} one request may be: send fewer or smaller images, or a shorter prompt"),
            ),
            e => WorkerError::new(Fault::Protocol, e.to_string()),
        });
        if let Err(e) = frame.and_then(|frame| self.send_frame(frame)) {
            self.traffic.ask(Command::Forget(id));
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
        self.ask(Command::Ping(nonce, tx))?;
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

    /// The engine's figures as they are now, within `deadline`; `None` from a plugin built
    /// before plugin-api 1.7, one without an engine, or one too busy to say.
    pub async fn engine_stats(&self, deadline: Duration) -> Option<EngineStats> {
        if !self.answers_stats {
            return None;
        }
        let nonce = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.ask(Command::Stats(nonce, tx)).ok()?;
        self.send(&ToWorker::Stats { nonce }).ok()?;
        match tokio::time::timeout(deadline, rx).await {
            Ok(answer) => answer.ok()?,
            Err(_) => {
                let _ = self.traffic.ask(Command::ForgetStats(nonce));
                None
            }
        }
    }

    /// Releases the model (waits for requests in flight, which hold the plugin).
    pub async fn unload(&self) -> Result<(), WorkerError> {
        let (tx, rx) = oneshot::channel();
        self.ask(Command::Unload(tx))?;
        self.send(&ToWorker::Unload)?;
        rx.await
            .map_err(|_| WorkerError::new(Fault::WorkerDied, self.exit_reason()))
    }

    /// Kills the worker, recording `why` (a clause such as "was stopped: ...") as the reason its
    /// requests in flight are given.
    pub fn kill_because(&self, why: String) {
        self.traffic.ask(Command::KillReason(why));
        self.kill();
    }

    /// Kills the worker and everything it started (its cgroup is removed once it is reaped).
    pub fn kill(&self) {
        // Its traffic task times the death from here: one that does not come is given up on.
        self.traffic.ask(Command::Killed);
        // Not the pid as well, and not once reaped: then it may be another process's. Groups
        // are named from plain names, so killing the group reaches it.
        if let Some(cg) = &self.cgroup {
            cg.kill_all();
        } else if self.exit.borrow().is_none() {
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

    /// How the worker ended, once it has (`None` while it runs).
    pub fn ended(&self) -> Option<String> {
        self.exit.borrow().clone()
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
        self.traffic.in_flight()
    }

    /// Usage read from its cgroup, if it has one.
    pub fn stats(&self) -> Option<Stats> {
        self.cgroup.as_ref().map(|c| c.stats())
    }
}
