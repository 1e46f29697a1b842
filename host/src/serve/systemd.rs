//! systemd's service notifications (`Type=notify`, sd_notify(3)): the daemon says when it is
//! ready (when `/ready` would answer 200), when it reloads on `SIGHUP`, when it stops, and,
//! when the unit sets `WatchdogSec=`, that it is still alive.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Where to tell systemd how the daemon is doing.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    to: SocketAddr,
    watchdog: Option<Duration>,
    ready: AtomicBool,
}

/// The socket address `NOTIFY_SOCKET` names: a path, or an abstract name after `@`.
fn address(name: &str) -> std::io::Result<SocketAddr> {
    match name.strip_prefix('@') {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()),
        None => SocketAddr::from_pathname(name),
    }
}

/// `WATCHDOG_USEC`, when `WATCHDOG_PID` (if set) is this process.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>) -> Option<Duration> {
    if pid.is_some_and(|p| p.parse() != Ok(std::process::id())) {
        return None;
    }
    let usec: u64 = usec?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

impl Notifier {
    /// The notifier systemd set up for this process, if it did. Takes `NOTIFY_SOCKET` and the
    /// watchdog variables out of the environment, so workers do not inherit them: call it before
    /// any other thread starts.
    pub fn from_env() -> Option<Self> {
        let name = std::env::var("NOTIFY_SOCKET").ok()?;
        let watchdog = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
        );
        for key in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(key);
        }
        let made = address(&name).and_then(|to| Ok((UnixDatagram::unbound()?, to)));
        match made {
            Ok((socket, to)) => Some(Self {
                socket,
                to,
                watchdog,
                ready: AtomicBool::new(false),
            }),
            Err(e) => {
                eprintln!("warning: NOTIFY_SOCKET={name}: {e}; systemd will not hear from pio");
                None
            }
        }
    }

    fn send(&self, message: &str) {
        if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.to) {
            tracing::warn!("cannot notify systemd ({message:?}): {e}");
        }
    }

    /// The daemon serves (once; later calls end a reload).
    pub fn ready(&self, status: &str) {
        self.ready.store(true, Ordering::Release);
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// Whether [`Notifier::ready`] was sent.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// A reload begins (`Type=notify-reload` needs the monotonic clock with it).
    pub fn reloading(&self) {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
            .unwrap_or(0);
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={now}\nSTATUS=reloading the configuration"
        ));
    }

    /// The daemon drains and stops.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=draining");
    }

    /// Sends `WATCHDOG=1` at half the unit's `WatchdogSec=`, for as long as the daemon's runtime
    /// runs (a wedged runtime stops it, and systemd restarts the service).
    pub async fn keep_alive(self: std::sync::Arc<Self>) {
        let Some(interval) = self.watchdog else {
            return;
        };
        loop {
            self.send("WATCHDOG=1");
            tokio::time::sleep(interval / 2).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_ours_only_when_its_pid_is() {
        let me = std::process::id().to_string();
        assert_eq!(
            watchdog_interval(Some("3000000"), Some(&me)),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            watchdog_interval(Some("3000000"), None),
            Some(Duration::from_secs(3))
        );
        assert_eq!(watchdog_interval(Some("3000000"), Some("1")), None);
        assert_eq!(watchdog_interval(Some("0"), None), None);
        assert_eq!(watchdog_interval(Some("soon"), None), None);
        assert_eq!(watchdog_interval(None, None), None);
    }

    #[test]
    fn messages_reach_the_socket_named_by_path_or_abstract_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).expect("bind");
        let abstract_name = format!("pio-test-{}", std::process::id());
        let abstract_listener = UnixDatagram::bind_addr(
            &SocketAddr::from_abstract_name(abstract_name.as_bytes()).expect("abstract"),
        )
        .expect("bind abstract");
        for (name, socket) in [
            (path.display().to_string(), &listener),
            (format!("@{abstract_name}"), &abstract_listener),
        ] {
            let n = Notifier {
                socket: UnixDatagram::unbound().expect("socket"),
                to: address(&name).expect("address"),
                watchdog: None,
                ready: AtomicBool::new(false),
            };
            assert!(!n.is_ready());
            n.ready("serving 2 models");
            assert!(n.is_ready());
            n.reloading();
            n.stopping();
            let mut buf = [0u8; 256];
            let mut got = Vec::new();
            for _ in 0..3 {
                let len = socket.recv(&mut buf).expect("recv");
                got.push(String::from_utf8_lossy(&buf[..len]).to_string());
            }
            assert_eq!(got[0], "READY=1\nSTATUS=serving 2 models");
            assert!(
                got[1].starts_with("RELOADING=1\nMONOTONIC_USEC="),
                "{}",
                got[1]
            );
            let usec: u64 = got[1]
                .lines()
                .nth(1)
                .and_then(|l| l.split('=').nth(1))
                .and_then(|v| v.parse().ok())
                .expect("usec");
            assert!(usec > 0);
            assert_eq!(got[2], "STOPPING=1\nSTATUS=draining");
        }
    }
}
