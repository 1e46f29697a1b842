//! A running request's events with their flow-control credit, a load's events, how a worker died,
//! and its output forwarded to the daemon's log.

use std::sync::Mutex;

use pio_plugin_api::wire::ModelInfo;
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
        tokio::spawn(output_lines(r, move |text| {
            tracing::info!(target: "pio::worker", plugin = %prefix, "{text}");
        }));
    }
    if let Some(out) = stdout {
        pump(name.to_string(), out);
    }
    if let Some(err) = stderr {
        pump(name.to_string(), err);
    }
}

/// The longest line of a worker's output logged whole; a longer one is logged in pieces of
/// this size, each cut marked.
const MAX_LINE: usize = 64 << 10;

/// Reads `r` to its end, calling `each` with every line as [`log_text`] writes it. Lines are
/// cut at [`MAX_LINE`] and read whatever their bytes: a plugin writing without a newline grew
/// one line in the daemon's memory until it was killed, and a byte that was not UTF-8 ended
/// the forwarding (the pipe then filled, blocking the worker's every write).
async fn output_lines<R: tokio::io::AsyncRead + Unpin>(r: R, mut each: impl FnMut(String)) {
    use tokio::io::AsyncBufReadExt;
    let mut reader = tokio::io::BufReader::new(r);
    let mut line = Vec::new();
    loop {
        let (used, ended) = match reader.fill_buf().await {
            Ok(chunk) if !chunk.is_empty() => {
                let end = chunk.iter().position(|&b| b == b'\n');
                let used = end.map_or(chunk.len(), |i| i + 1);
                let room = MAX_LINE.saturating_sub(line.len());
                let taken = used.min(room);
                line.extend_from_slice(&chunk[..taken]);
                // A newline past the room ends the line all the same.
                (taken, end.is_some_and(|i| i < taken))
            }
            _ => break,
        };
        reader.consume(used);
        if ended || line.len() >= MAX_LINE {
            each(log_text(&line, !ended));
            line.clear();
        }
    }
    if !line.is_empty() {
        each(log_text(&line, false));
    }
}

/// A worker's output line as logged: read lossily, its newline dropped, control characters
/// escaped (a `\r` or an escape sequence from a plugin would rewrite what a terminal shows of
/// the daemon's log), a cut marked.
pub(crate) fn log_text(line: &[u8], cut: bool) -> String {
    let text = String::from_utf8_lossy(line);
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    let mut out: String = text
        .chars()
        .map(|c| match c {
            '\t' => "\t".to_string(),
            c if c.is_control() => c.escape_default().to_string(),
            c => c.to_string(),
        })
        .collect();
    if cut {
        out.push_str(" […cut]");
    }
    out
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

#[cfg(test)]
mod output_tests {
    use super::*;

    async fn lines(input: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        output_lines(input, |l| out.push(l)).await;
        out
    }

    /// Lines are cut at the cap, bytes that are not UTF-8 do not stop the reading, and control
    /// characters cannot rewrite the log.
    #[tokio::test]
    async fn a_workers_output_is_read_in_bounded_escaped_lines() {
        assert_eq!(lines(b"one\ntwo\r\nthree").await, ["one", "two", "three"]);
        let got = lines(b"\xff\xfe bad\nafter\n").await;
        assert_eq!(got[1], "after", "{got:?}");
        assert!(got[0].contains('\u{FFFD}'), "{got:?}");
        let got = lines(b"\x1b[2Jclear\rover\n").await;
        assert_eq!(got, ["\\u{1b}[2Jclear\\rover"]);
        let long = vec![b'a'; 3 * MAX_LINE + 10];
        let got = lines(&long).await;
        assert_eq!(got.len(), 4, "pieces of the cap");
        assert!(got[0].ends_with("[…cut]") && got[0].len() < MAX_LINE + 16);
        assert_eq!(got[3], "a".repeat(10));
    }
}
