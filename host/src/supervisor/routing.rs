//! A running request's events with their flow-control credit, a load's events, how a worker died,
//! and its output forwarded to the daemon's log.

use std::sync::Mutex;

use pio_plugin_api::wire::ModelInfo;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use super::handle::Event;
use crate::protocol::{encode, ToWorker, WireError};
use crate::sandbox::cgroup::Stats;
use crate::units::ByteSize;

/// Tokens a worker may send for one request beyond those the host has taken: the most the host
/// ever buffers per request between the worker and the client's side.
pub const WINDOW: u32 = 32;

/// A running request's events. Taking tokens grants the worker more (by halves of the
/// window), so a request whose reader stops soon stops generating.
pub struct Events {
    rx: mpsc::Receiver<Event>,
    id: u64,
    outbox: mpsc::UnboundedSender<Vec<u8>>,
    taken: u32,
}

impl Events {
    pub(super) fn new(
        id: u64,
        outbox: mpsc::UnboundedSender<Vec<u8>>,
    ) -> (Self, mpsc::Sender<Event>) {
        // Room for the window and the request's last event.
        let (tx, rx) = mpsc::channel(WINDOW as usize + 1);
        let events = Self {
            rx,
            id,
            outbox,
            taken: 0,
        };
        (events, tx)
    }

    /// The next event; `None` once the worker is gone.
    pub async fn recv(&mut self) -> Option<Event> {
        let event = self.rx.recv().await?;
        if matches!(event, Event::Token(_)) {
            self.taken += 1;
            if self.taken >= WINDOW / 2 {
                let credit = ToWorker::Credit {
                    id: self.id,
                    tokens: self.taken,
                };
                if let Ok(frame) = encode(&credit) {
                    let _ = self.outbox.send(frame);
                }
                self.taken = 0;
            }
        }
        Some(event)
    }
}

pub(super) enum LoadEvent {
    Progress(String, u64, u64),
    Loaded(Box<ModelInfo>),
    Failed(WireError),
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How a worker died, from its exit status and its cgroup's counters.
pub fn death_reason(status: Option<std::process::ExitStatus>, stats: Option<&Stats>) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(stats) = stats.filter(|s| s.oom_kills > 0) {
        let limit = stats
            .memory_limit_bytes
            .map(|b| ByteSize(b).to_string())
            .unwrap_or_else(|| "its".into());
        return format!("was killed: memory limit {limit} reached");
    }
    match status {
        Some(s) if s.code() == Some(0) => "exited".into(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(sig)) => {
                let name = nix::sys::signal::Signal::try_from(sig)
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|_| format!("signal {sig}"));
                format!("was killed by {name}{}", signal_hint(sig))
            }
            _ => "ended".into(),
        },
        None => "ended".into(),
    }
}

/// Forwards the worker's stdout and stderr to ours, each line prefixed with the plugin's name.
pub(super) fn forward_output(
    name: &str,
    stdout: Option<tokio::process::ChildStdout>,
    stderr: Option<tokio::process::ChildStderr>,
) {
    fn pump<R: tokio::io::AsyncRead + Unpin + Send + 'static>(prefix: String, r: R) {
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::info!(target: "pio::worker", plugin = %prefix, "{line}");
            }
        });
    }
    if let Some(out) = stdout {
        pump(name.to_string(), out);
    }
    if let Some(err) = stderr {
        pump(name.to_string(), err);
    }
}

/// What a killing signal says about the cause, where it says something the name does not.
fn signal_hint(signal: i32) -> &'static str {
    if signal == libc::SIGSYS {
        // Only a seccomp filter sends it: the worker made a call its tier's filter kills for.
        " (a system call its sandbox does not allow: anything off the allow-list at `maximum`, \
         or the 32-bit system-call entry at any confined tier; at `medium` and `high` refused \
         calls fail with EPERM instead, named in the worker's log)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn a_seccomp_kill_says_what_it_means() {
        let sys = death_reason(Some(std::process::ExitStatus::from_raw(libc::SIGSYS)), None);
        assert!(
            sys.starts_with("was killed by SIGSYS (a system call its sandbox"),
            "{sys}"
        );
        let segv = death_reason(
            Some(std::process::ExitStatus::from_raw(libc::SIGSEGV)),
            None,
        );
        assert_eq!(segv, "was killed by SIGSEGV");
        let code = death_reason(Some(std::process::ExitStatus::from_raw(3 << 8)), None);
        assert_eq!(code, "exited with code 3");
    }
}
