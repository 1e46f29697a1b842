//! Streaming one request through the worker: SIGINT and SIGTERM, the deadline, and how the run
//! ends (its exit code).

use anyhow::Context;
use pio_host::serve::openai::Parsed;
use pio_host::supervisor::{Event, Worker, WorkerSpec};

use super::request::constrained;
use super::start_loaded;
use crate::cli_print::{Shown, TokenPrinter};

/// SIGINT and SIGTERM, watched from when this is made (a stream made anew on each wait
/// misses a signal that comes between two waits).
pub(crate) struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Starts watching.
    pub(crate) fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("cannot watch for SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?,
        })
    }

    /// The next signal.
    pub(crate) async fn recv(&mut self) -> Stopped {
        tokio::select! {
            _ = self.interrupt.recv() => Stopped::Interrupted,
            _ = self.terminate.recv() => Stopped::Terminated,
        }
    }
}

/// A command stopped before its end (a signal, a deadline): what it says, and the exit status
/// a shell expects of it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct Halted {
    /// Why.
    pub by: Stopped,
    message: String,
}

impl Halted {
    /// Stopped `by`, saying `message`.
    pub(crate) fn new(by: Stopped, message: String) -> Self {
        Self { by, message }
    }
}

pub(super) async fn stream(
    spec: WorkerSpec,
    config: pio_plugin_api::wire::ModelConfig,
    parsed: Parsed,
    shown: Shown,
    timeout: Option<std::time::Duration>,
) -> anyhow::Result<u8> {
    let mut signals = StopSignals::new()?;
    let (worker, info) = start_loaded(spec, config, &mut signals).await?;
    let request = match constrained(&parsed, &info) {
        Ok(r) => r,
        Err(e) => {
            worker.shutdown().await;
            return Err(e);
        }
    };
    let mut printer = TokenPrinter::new(shown.json).parsing(&request, &info, shown.special);
    let (id, mut events) = worker.infer(request)?;
    let deadline = tokio::time::sleep(timeout.unwrap_or(std::time::Duration::MAX / 4));
    tokio::pin!(deadline);
    let mut stopped: Option<Stopped> = None;
    let code = loop {
        let event = tokio::select! {
            e = events.recv() => e,
            by = signals.recv() => {
                stop(&worker, id, &mut stopped, by);
                continue;
            }
            _ = &mut deadline, if timeout.is_some() => {
                let secs = timeout.map_or(0, |t| t.as_secs());
                printer.failed(&format!(
                    "timeout: the request ran past its {secs} s deadline (--timeout) and was cancelled"
                ));
                stopped = Some(Stopped::PastDeadline);
                if let Some(by) = past_deadline(&worker, id, &mut events, &mut signals, secs).await {
                    stopped = Some(by);
                }
                break 1;
            }
        };
        let failure = match event {
            Some(Event::Token(t)) => {
                if let Err(e) = printer.token(&t) {
                    return output_closed(&worker, e).await;
                }
                continue;
            }
            Some(Event::Done(outcome)) => {
                if let Err(e) = printer.done(&outcome) {
                    return output_closed(&worker, e).await;
                }
                break 0;
            }
            Some(Event::Failed(e)) => e.to_string(),
            None => worker.exited().await.to_string(),
        };
        printer.failed(&failure);
        break 1;
    };
    worker.shutdown().await;
    Ok(stopped.map_or(code, Stopped::exit_code))
}

/// The output's reader is gone: nobody reads the rest, so the worker (and its cgroup) goes now.
async fn output_closed(worker: &Worker, e: std::io::Error) -> anyhow::Result<u8> {
    worker.shutdown().await;
    Err(OutputClosed(e).into())
}

/// Writing the output failed (its reader went away, `pio run ... | head`): `main` exits as a
/// command SIGPIPE ended, without a message.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the output: {0}")]
pub struct OutputClosed(#[source] pub std::io::Error);

/// What a signal does to a running request: a first Ctrl-C cancels it (the plugin stops at its
/// next token); a second one, or SIGTERM, stops the worker at once (a plugin stuck in a loop
/// never sees a cancel, and the worker's cgroup goes with us).
fn stop(worker: &Worker, id: u64, stopped: &mut Option<Stopped>, by: Stopped) {
    let again = stopped.replace(by).is_some();
    match by {
        Stopped::Interrupted if !again => worker.cancel(id),
        _ => worker.kill_because(format!("was stopped: pio run was {by}")),
    }
}

/// A request past its deadline, as the daemon treats one: cancelled, and its worker stopped
/// only if it does not end within [`DEADLINE_GRACE`] (a plugin stuck in a loop never sees a
/// cancel) or a signal comes meanwhile, which is returned.
async fn past_deadline(
    worker: &Worker,
    id: u64,
    events: &mut pio_host::supervisor::Events,
    signals: &mut StopSignals,
    secs: u64,
) -> Option<Stopped> {
    worker.cancel(id);
    let ended = async { while let Some(Event::Token(_)) = events.recv().await {} };
    tokio::select! {
        ended = tokio::time::timeout(DEADLINE_GRACE, ended) => {
            if ended.is_err() {
                eprintln!("the request did not end when cancelled: its worker is stopped");
                worker.kill_because(format!(
                    "was stopped: the request ran past its {secs} s deadline and did not end when cancelled"
                ));
            }
            None
        }
        by = signals.recv() => {
            worker.kill_because(format!("was stopped: pio run was {by}"));
            Some(by)
        }
    }
}

/// How long a request cancelled at its deadline has to end before its worker is stopped.
const DEADLINE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a command stopped its work before the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stopped {
    /// SIGINT (Ctrl-C).
    Interrupted,
    /// SIGTERM.
    Terminated,
    /// `--timeout`.
    PastDeadline,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Interrupted => "interrupted (SIGINT)",
            Self::Terminated => "stopped (SIGTERM)",
            Self::PastDeadline => "past its deadline (--timeout)",
        })
    }
}

impl Stopped {
    /// The exit status, as shells and `timeout(1)` have it: 128 + the signal, 124 for a deadline.
    pub(crate) fn exit_code(self) -> u8 {
        match self {
            Self::Interrupted => 130,
            Self::Terminated => 143,
            Self::PastDeadline => 124,
        }
    }
}
