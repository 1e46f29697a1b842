//! A worker's traffic, owned by one task: which request each frame belongs to, who waits for the
//! handshake, a load, an unload or a pong, and why the host killed the worker. The [`Worker`]
//! handle only sends it [`Command`]s, so there is no shared state and no lock order to get wrong.
//! When the worker dies, the task reaps it and gives everyone still waiting the account of how.
//!
//! [`Worker`]: super::Worker

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pio_plugin_api::wire::EngineStats;
use tokio::net::unix::OwnedReadHalf;
use tokio::sync::{mpsc, oneshot, watch};

use super::handle::Event;
use super::routing::{death_reason, LoadEvent};
use crate::fault::Fault;
use crate::protocol::{read_frame_async, FrameError, FromWorker, WireError, MAX_TOKEN_BYTES};
use crate::sandbox::cgroup::Cgroup;

/// What the handle asks of the traffic task. Each is sent before the frame it concerns, so the
/// answer's frame always finds its waiter.
pub(super) enum Command {
    /// Route the handshake's answer here.
    Start(oneshot::Sender<Result<FromWorker, WireError>>),
    /// Route request `id`'s events here.
    Request(u64, mpsc::Sender<Event>),
    /// Request `id` was never sent: forget it.
    Forget(u64),
    /// Route the load's progress and result here.
    Load(mpsc::UnboundedSender<LoadEvent>),
    /// Signal the unload's end here.
    Unload(oneshot::Sender<()>),
    /// Signal the pong for this nonce here.
    Ping(u64, oneshot::Sender<()>),
    /// Route the engine's figures for this nonce here.
    Stats(u64, oneshot::Sender<Option<EngineStats>>),
    /// The ask for this nonce timed out: forget its waiter.
    ForgetStats(u64),
    /// The host is killing the worker, for this reason (reported instead of the signal).
    KillReason(String),
    /// The host has sent the worker SIGKILL: it has [`KILL_GRACE`] to die.
    Killed,
}

/// The handle's side of the traffic task.
#[derive(Clone)]
pub(super) struct Traffic {
    commands: mpsc::UnboundedSender<Command>,
    in_flight: Arc<AtomicUsize>,
}

impl Traffic {
    /// Sends `command`; false once the worker is gone.
    pub(super) fn ask(&self, command: Command) -> bool {
        self.commands.send(command).is_ok()
    }

    /// Requests routed and not yet finished.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// The waiters other than requests.
#[derive(Default)]
struct Waiters {
    start: Option<oneshot::Sender<Result<FromWorker, WireError>>>,
    load: Option<mpsc::UnboundedSender<LoadEvent>>,
    unload: Option<oneshot::Sender<()>>,
    pongs: HashMap<u64, oneshot::Sender<()>>,
    stats: HashMap<u64, oneshot::Sender<Option<EngineStats>>>,
}

/// Everything the traffic task owns.
#[derive(Default)]
pub(super) struct Routes {
    requests: HashMap<u64, mpsc::Sender<Event>>,
    waiters: Waiters,
    kill_reason: Option<String>,
    killed_at: Option<tokio::time::Instant>,
    in_flight: Arc<AtomicUsize>,
}

impl Routes {
    pub(super) fn command(&mut self, command: Command) {
        match command {
            Command::Start(tx) => self.waiters.start = Some(tx),
            Command::Request(id, tx) => {
                self.requests.insert(id, tx);
            }
            Command::Forget(id) => {
                self.requests.remove(&id);
            }
            Command::Load(tx) => self.waiters.load = Some(tx),
            Command::Unload(tx) => self.waiters.unload = Some(tx),
            Command::Ping(nonce, tx) => {
                self.waiters.pongs.insert(nonce, tx);
            }
            Command::Stats(nonce, tx) => {
                self.waiters.stats.insert(nonce, tx);
            }
            Command::ForgetStats(nonce) => {
                self.waiters.stats.remove(&nonce);
            }
            Command::KillReason(why) => {
                self.kill_reason.get_or_insert(why);
            }
            Command::Killed => {
                self.killed_at.get_or_insert_with(tokio::time::Instant::now);
            }
        }
        self.count();
    }

    fn count(&self) {
        self.in_flight.store(self.requests.len(), Ordering::Relaxed);
    }

    /// Delivers request `id`'s event; a request whose worker sent past its flow-control window
    /// (only a plugin writing to the socket itself could) is dropped, its reader seeing the end.
    fn deliver(&mut self, id: u64, event: Event, last: bool) {
        let overrun = self.requests.get(&id).is_some_and(|tx| {
            matches!(tx.try_send(event), Err(mpsc::error::TrySendError::Full(_)))
        });
        if overrun {
            tracing::warn!(
                request = id,
                "the worker sent past its flow-control window; request dropped"
            );
        }
        if last || overrun {
            self.requests.remove(&id);
            self.count();
        }
    }

    /// Sends `frame` where it belongs; `Some(why)` when the worker must go: its plugin panicked,
    /// so its state is suspect and every later call would fail (whether or not anyone still
    /// reads this request's answer).
    pub(super) fn dispatch(&mut self, frame: FromWorker) -> Option<String> {
        let w = &mut self.waiters;
        match frame {
            FromWorker::Token { id, token } => self.deliver(id, Event::Token(token), false),
            FromWorker::Done { id, outcome } => {
                self.deliver(id, Event::Done(Box::new(outcome)), true)
            }
            FromWorker::Failed { id, error } if error.kind == Fault::Panicked => {
                let error = from_worker(error);
                let why = format!("was stopped: {}", error.message);
                self.deliver(id, Event::Failed(error), true);
                return Some(why);
            }
            FromWorker::Failed { id, error } => {
                self.deliver(id, Event::Failed(from_worker(error)), true)
            }
            FromWorker::Ready { .. } => {
                if let Some(tx) = w.start.take() {
                    let _ = tx.send(Ok(frame));
                }
            }
            FromWorker::StartFailed { error } => {
                if let Some(tx) = w.start.take() {
                    let _ = tx.send(Err(from_worker(error)));
                }
            }
            FromWorker::Progress { stage, done, total } => {
                if let Some(tx) = &w.load {
                    // Shown on a terminal (`pio run`) and logged: a short line of text.
                    let mut bytes = stage.into_bytes();
                    bytes.truncate(MAX_STAGE);
                    let stage = super::routing::log_text(&bytes, false);
                    let _ = tx.send(LoadEvent::Progress(stage, done, total));
                }
            }
            FromWorker::Loaded { info } => {
                if let Some(tx) = w.load.take() {
                    let _ = tx.send(LoadEvent::Loaded(Box::new(info)));
                }
            }
            FromWorker::LoadFailed { error } => {
                if let Some(tx) = w.load.take() {
                    // As any failure from a worker: its lines escaped, its kind not the host's.
                    let _ = tx.send(LoadEvent::Failed(from_worker(error)));
                }
            }
            FromWorker::Pong { nonce } => {
                if let Some(tx) = w.pongs.remove(&nonce) {
                    let _ = tx.send(());
                }
            }
            FromWorker::Stats { nonce, engine } => {
                if let Some(tx) = w.stats.remove(&nonce) {
                    let _ = tx.send(engine);
                }
            }
            FromWorker::Unloaded => {
                if let Some(tx) = w.unload.take() {
                    let _ = tx.send(());
                }
            }
        }
        None
    }

    /// Fails everyone still waiting with `message` (the worker died).
    pub(super) fn fail_all(&mut self, message: &str) {
        let error = WireError::new(Fault::WorkerDied, message);
        for (_, tx) in self.requests.drain() {
            // A full channel's reader still learns of the death: the channel closes after it.
            let _ = tx.try_send(Event::Failed(error.clone()));
        }
        self.count();
        let w = std::mem::take(&mut self.waiters);
        if let Some(tx) = w.start {
            let _ = tx.send(Err(error.clone()));
        }
        if let Some(tx) = w.load {
            let _ = tx.send(LoadEvent::Failed(error));
        }
    }
}

/// How the worker's socket ended: `Some` when the worker broke the protocol.
type Ending = Option<String>;

/// Why `frame` is larger than the protocol lets it be, if it is (the worker fails such a token's
/// request alone; one that sends it anyway writes to the socket itself).
fn oversized(frame: &FromWorker) -> Option<String> {
    let FromWorker::Token { token, .. } = frame else {
        return None;
    };
    let bytes = token.text_bytes();
    (bytes > MAX_TOKEN_BYTES).then(|| {
        format!(
            "sent a token of {bytes} bytes of text, more than the {MAX_TOKEN_BYTES} one may hold"
        )
    })
}

/// Reads frames into a channel: the traffic task selects over it and its commands (reading a
/// frame is not cancel-safe, receiving from a channel is).
fn read_frames(mut read_half: OwnedReadHalf) -> mpsc::Receiver<Result<FromWorker, Ending>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let end = loop {
            match read_frame_async::<FromWorker>(&mut read_half).await {
                Ok(Some(frame)) => {
                    if let Some(why) = oversized(&frame) {
                        break Some(why);
                    }
                    if tx.send(Ok(frame)).await.is_err() {
                        return;
                    }
                }
                // A killed worker's socket may end in a reset instead of EOF.
                Ok(None) | Err(FrameError::Io(_)) => break None,
                Err(e) => break Some(format!("sent a bad frame ({e})")),
            }
        };
        let _ = tx.send(Err(end)).await;
    });
    rx
}

/// Routes the frames a worker that has exited wrote before it did (its last tokens, its final
/// answer), until none has come for a moment; `Some` when one broke the protocol.
async fn last_frames(
    frames: &mut mpsc::Receiver<Result<FromWorker, Ending>>,
    routes: &mut Routes,
) -> Ending {
    let quiet = std::time::Duration::from_millis(100);
    // At most this long in all: a process the worker left behind, writing frames on its socket
    // without end, held the worker's death (its restart, a stop) off for good.
    let until = tokio::time::Instant::now() + LAST_FRAMES;
    loop {
        let next = (tokio::time::Instant::now() + quiet).min(until);
        let Ok(Some(frame)) = tokio::time::timeout_at(next, frames.recv()).await else {
            break;
        };
        match frame {
            Ok(frame) => {
                if let Some(why) = routes.dispatch(frame) {
                    return Some(why);
                }
            }
            Err(ending) => return ending,
        }
    }
    None
}

/// The longest the frames a dead worker's socket still carries are read.
const LAST_FRAMES: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a killed worker has to die. Longer means it is stuck in the kernel (uninterruptible
/// sleep: a wedged driver or network file system), where no signal reaches it: it is left
/// behind, so that its requests fail and the plugin can restart instead of waiting on it for good.
pub(super) const KILL_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a worker whose socket ended has to exit on its own before it is killed.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Resolves [`KILL_GRACE`] after the kill, if there was one.
async fn past_grace(killed_at: Option<tokio::time::Instant>) {
    match killed_at {
        Some(at) => tokio::time::sleep_until(at + KILL_GRACE).await,
        None => std::future::pending().await,
    }
}

/// The most [`KILL_GRACE`]s a killed worker still exiting is waited for: a process freeing a
/// large model's memory (hundreds of GB, or a GPU context) runs in the kernel for a while, and
/// one restarted beside it would hold both models at once.
const MOST_GRACES: u32 = 6;

/// Whether process `pid` is in uninterruptible sleep (state D): stuck, where one still exiting
/// runs (R); not stuck when it cannot be read (gone, or being reaped).
fn in_uninterruptible_sleep(pid: Option<u32>) -> bool {
    let Some(stat) = pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
    else {
        return false;
    };
    // The state follows the command's closing parenthesis (the command may hold any bytes).
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        == Some("D")
}

/// A killed worker that did not die within [`KILL_GRACE`].
struct Stuck;

/// The worker's exit status once it has ended: killed first where `kill`, else given a moment to
/// end on its own (it may be exiting as its socket closes) and then killed.
async fn reap(
    child: &mut tokio::process::Child,
    kill: bool,
) -> Result<Option<std::process::ExitStatus>, Stuck> {
    if !kill {
        if let Ok(status) = tokio::time::timeout(EXIT_GRACE, child.wait()).await {
            return Ok(status.ok());
        }
    }
    let _ = child.start_kill();
    let pid = child.id();
    for grace in 1..=MOST_GRACES {
        if let Ok(status) = tokio::time::timeout(KILL_GRACE, child.wait()).await {
            return Ok(status.ok());
        }
        if grace == MOST_GRACES || in_uninterruptible_sleep(pid) {
            break;
        }
    }
    Err(Stuck)
}

/// Reaps a worker [`Stuck`] in the kernel whenever it ends, then lets its cgroup go.
fn leave_behind(name: String, mut child: tokio::process::Child, cgroup: Option<Arc<Cgroup>>) {
    let pid = child.id();
    tracing::error!(
        plugin = %name,
        pid,
        "a worker did not die within {} s of SIGKILL: it is stuck in the kernel (process state D; look for a wedged driver or file system, e.g. in dmesg) and left behind, its cgroup kept until it ends; the plugin is restarted beside it",
        KILL_GRACE.as_secs()
    );
    tokio::spawn(async move {
        let status = child.wait().await;
        tracing::info!(plugin = %name, pid, "the worker left behind has ended ({status:?})");
        if let Some(cg) = cgroup {
            let _ = tokio::task::spawn_blocking(move || cg.kill_all()).await;
        }
    });
}

/// Starts the traffic task of the worker `child` named `name`; its exit message goes to `exit`.
pub(super) fn start(
    name: String,
    read_half: OwnedReadHalf,
    mut child: tokio::process::Child,
    cgroup: Option<Arc<Cgroup>>,
    exit: watch::Sender<Option<String>>,
) -> Traffic {
    let (commands, mut command_rx) = mpsc::unbounded_channel();
    let mut routes = Routes::default();
    let traffic = Traffic {
        commands,
        in_flight: routes.in_flight.clone(),
    };
    let mut frames = read_frames(read_half);
    let child_pid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    tokio::spawn(async move {
        let (mut stuck, mut graces) = (false, 0);
        let ending = loop {
            // Commands first: a waiter is always registered before its frame can arrive.
            tokio::select! {
                biased;
                command = command_rx.recv() => match command {
                    Some(command) => routes.command(command),
                    // Nothing in the host holds the worker any more (a start or a load abandoned
                    // midway, as when its plugin is stopped while it restarts): it must not live
                    // on, loading a model nobody will use, even if its exit hangs.
                    None => break Some("was stopped: nothing in the host holds it any more".into()),
                },
                frame = frames.recv() => match frame {
                    Some(Ok(frame)) => {
                        if let Some(why) = routes.dispatch(frame) {
                            break Some(why);
                        }
                    }
                    Some(Err(ending)) => break ending,
                    None => break None,
                },
                // Dead with its socket still open: a process it started holds the socket (a
                // fork keeps every descriptor), so no end of the socket would ever come.
                _ = child.wait() => break last_frames(&mut frames, &mut routes).await,
                // Past the grace: stuck, unless still exiting (then another grace, a few).
                _ = past_grace(routes.killed_at) => {
                    graces += 1;
                    if graces >= MOST_GRACES || in_uninterruptible_sleep(child.id()) {
                        stuck = true;
                        break None;
                    }
                    routes.killed_at = Some(tokio::time::Instant::now());
                }
            }
        };
        let reaped = match stuck {
            true => Err(Stuck),
            false => reap(&mut child, ending.is_some() || routes.killed_at.is_some()).await,
        };
        // What it started dies with it: in its cgroup, or (none, as when not root) in the
        // process group it leads (`setsid`), which outlives it while a member lives.
        match &cgroup {
            Some(cg) => {
                let cg = cg.clone();
                let _ = tokio::task::spawn_blocking(move || cg.kill_all()).await;
            }
            None => {
                if let Some(pid) = child_pid {
                    let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
        let stats = cgroup.as_ref().map(|c| c.stats());
        while let Ok(command) = command_rx.try_recv() {
            routes.command(command);
        }
        let cause = ending.or_else(|| routes.kill_reason.clone());
        let why = match reaped {
            Ok(status) => cause.unwrap_or_else(|| death_reason(status, stats.as_ref())),
            Err(Stuck) => {
                leave_behind(name.clone(), child, cgroup.clone());
                format!(
                    "{}, and did not die within {} s of SIGKILL (stuck in the kernel: a wedged driver or file system); it is left behind",
                    cause.unwrap_or_else(|| "was killed".into()),
                    KILL_GRACE.as_secs()
                )
            }
        };
        let message = format!("worker for {name} {why}");
        routes.fail_all(&message);
        // Later commands find the channel closed: the handle reports the death itself.
        command_rx.close();
        let _ = exit.send(Some(message));
    });
    traffic
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{read_frame, ToWorker, TokenFrame};
    use crate::supervisor::routing::{Events, WINDOW};

    /// A dead worker's socket kept busy (by a process it left behind) is read for a bounded
    /// time, not as long as frames keep coming.
    #[tokio::test]
    async fn a_dead_workers_last_frames_are_read_for_a_bounded_time() {
        let (tx, mut frames) = mpsc::channel(16);
        tokio::spawn(async move {
            while tx.send(Ok(token(99))).await.is_ok() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        });
        let mut routes = Routes::default();
        let started = std::time::Instant::now();
        let ending = last_frames(&mut frames, &mut routes).await;
        assert!(ending.is_none());
        assert!(
            started.elapsed() < LAST_FRAMES * 2,
            "{:?}",
            started.elapsed()
        );
    }

    fn token(id: u64) -> FromWorker {
        FromWorker::Token {
            id,
            token: TokenFrame {
                token_id: 1,
                text: "a".into(),
                ..TokenFrame::default()
            },
        }
    }

    #[tokio::test]
    async fn taking_tokens_grants_credit_by_halves_of_the_window() {
        let (outbox, mut frames) = mpsc::unbounded_channel();
        let (mut events, tx) = Events::new(7, outbox);
        let mut routes = Routes::default();
        routes.command(Command::Request(7, tx));
        for _ in 0..WINDOW {
            routes.dispatch(token(7));
        }
        for _ in 0..WINDOW / 2 - 1 {
            events.recv().await.unwrap();
        }
        assert!(frames.try_recv().is_err(), "no credit before half a window");
        events.recv().await.unwrap();
        let frame = frames.try_recv().expect("a credit frame");
        match read_frame::<ToWorker>(&mut frame.as_slice()).unwrap() {
            Some(ToWorker::Credit { id: 7, tokens }) => assert_eq!(tokens, WINDOW / 2),
            other => panic!("expected a credit, got {other:?}"),
        }
    }

    /// A panic stops the worker whether or not the request's reader is still there (a
    /// client gone meanwhile would otherwise leave the plugin poisoned for the next one).
    #[tokio::test]
    async fn a_panicked_plugin_stops_its_worker_with_or_without_a_reader() {
        let panicked = |id| FromWorker::Failed {
            id,
            error: WireError::new(Fault::Panicked, "plugin p panicked in `infer`: boom"),
        };
        let (outbox, _frames) = mpsc::unbounded_channel();
        let (mut events, tx) = Events::new(5, outbox);
        let mut routes = Routes::default();
        routes.command(Command::Request(5, tx));
        let why = routes.dispatch(panicked(5));
        assert_eq!(
            why.as_deref(),
            Some("was stopped: plugin p panicked in `infer`: boom")
        );
        assert!(matches!(events.recv().await, Some(Event::Failed(e)) if e.kind == Fault::Panicked));
        assert!(
            routes.dispatch(panicked(6)).is_some(),
            "nobody reads request 6"
        );
        let failed = FromWorker::Failed {
            id: 7,
            error: WireError::new(Fault::Internal, "a plain failure"),
        };
        assert_eq!(routes.dispatch(failed), None);
    }

    #[tokio::test]
    async fn a_worker_that_overruns_its_window_loses_the_request() {
        let (outbox, _frames) = mpsc::unbounded_channel();
        let (mut events, tx) = Events::new(3, outbox);
        let mut routes = Routes::default();
        routes.command(Command::Request(3, tx));
        assert_eq!(routes.in_flight.load(Ordering::Relaxed), 1);
        for _ in 0..WINDOW + 5 {
            routes.dispatch(token(3));
        }
        assert_eq!(
            routes.in_flight.load(Ordering::Relaxed),
            0,
            "the request was dropped"
        );
        drop(routes);
        let mut received = 0;
        while events.recv().await.is_some() {
            received += 1;
        }
        assert_eq!(
            received,
            WINDOW as usize + 1,
            "what fit was delivered, then the end"
        );
    }

    #[tokio::test]
    async fn a_death_fails_every_request_and_waiter_with_its_account() {
        let (outbox, _frames) = mpsc::unbounded_channel();
        let (mut events, tx) = Events::new(1, outbox);
        let mut routes = Routes::default();
        routes.command(Command::Request(1, tx));
        let (load_tx, mut load_rx) = mpsc::unbounded_channel();
        routes.command(Command::Load(load_tx));
        routes.fail_all("worker for x was killed by SIGKILL");
        match events.recv().await {
            Some(Event::Failed(e)) => {
                assert_eq!(e.kind, Fault::WorkerDied);
                assert!(e.message.contains("SIGKILL"));
            }
            other => panic!("expected the death, got {other:?}"),
        }
        assert!(matches!(load_rx.recv().await, Some(LoadEvent::Failed(_))));
        assert_eq!(routes.in_flight.load(Ordering::Relaxed), 0);
    }
}

/// The longest failure message taken from a worker.
const MAX_MESSAGE: usize = 16 << 10;

/// A failure as a worker (so its plugin) reported it, made safe to log and to pass on: its
/// text bounded with control characters escaped (a newline in it forged a line of the
/// daemon's text log), and a kind only the host decides (a restart, a quarantine, a stop, the
/// worker's death) taken as the plugin's internal fault, not as a 503 to retry.
/// The most bytes of a load stage's name that are shown.
const MAX_STAGE: usize = 256;

fn from_worker(error: WireError) -> WireError {
    use Fault::*;
    let kind = match error.kind {
        Sandbox | Spawn | WorkerDied | Unresponsive | Restarting | Quarantined | Stopped => {
            Internal
        }
        kind => kind,
    };
    let mut bytes = error.message.into_bytes();
    bytes.truncate(MAX_MESSAGE);
    WireError {
        kind,
        message: super::routing::log_text(&bytes, false),
    }
}

#[cfg(test)]
mod from_worker_tests {
    use super::*;

    #[test]
    fn a_workers_failure_cannot_forge_log_lines_or_host_faults() {
        let e = from_worker(WireError::new(
            Fault::Restarting,
            "boom\n2026-12-07 INFO forged",
        ));
        assert_eq!(e.kind, Fault::Internal);
        assert!(
            !e.message.contains('\n') && e.message.contains("boom"),
            "{}",
            e.message
        );
        let e = from_worker(WireError::new(Fault::ContextLength, "x".repeat(1 << 20)));
        assert_eq!(e.kind, Fault::ContextLength);
        assert!(e.message.len() <= MAX_MESSAGE, "{}", e.message.len());
    }

    /// A load's failure and its progress come through as any failure does: no forged log
    /// lines, no host fault, no screenful of text (they went to the log as the plugin wrote
    /// them).
    #[test]
    fn a_loads_failure_and_progress_are_checked_too() {
        let mut routes = Routes::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        routes.waiters.load = Some(tx);
        routes.dispatch(FromWorker::Progress {
            stage: format!("weights\n2026-12-08 INFO forged{}", "x".repeat(1 << 20)),
            done: 1,
            total: 2,
        });
        routes.dispatch(FromWorker::LoadFailed {
            error: WireError::new(Fault::Quarantined, "torn\n2026-12-08 INFO forged"),
        });
        let Ok(LoadEvent::Progress(stage, ..)) = rx.try_recv() else {
            panic!("no progress");
        };
        assert!(
            !stage.contains('\n') && stage.len() <= 2 * MAX_STAGE,
            "{stage}"
        );
        let Ok(LoadEvent::Failed(e)) = rx.try_recv() else {
            panic!("no failure");
        };
        assert_eq!(e.kind, Fault::Internal);
        assert!(!e.message.contains('\n'), "{}", e.message);
    }
}

#[cfg(test)]
mod stuck_tests {
    /// A running process is not stuck, nor one that cannot be read; the state is read after
    /// the command's closing parenthesis, whatever the command holds.
    #[test]
    fn only_uninterruptible_sleep_is_stuck() {
        assert!(!super::in_uninterruptible_sleep(Some(std::process::id())));
        assert!(!super::in_uninterruptible_sleep(None));
        assert!(!super::in_uninterruptible_sleep(Some(u32::MAX)));
    }
}
