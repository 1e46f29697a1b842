//! The system calls a worker's filter refused. At `medium` and `high` a refused call goes to the
//! filter's listener (seccomp user notification), which the worker's reaper answers: pid 1 of the
//! worker's namespaces, outside the filter, living exactly as long as the worker. It fails the
//! call with EPERM, as a plain errno rule would, names it once on stderr (the daemon's log) and
//! counts it in a page shared with the worker, so that a plugin failing on a refused call says
//! which one. Without this a GPU driver at `high` reported only "OS call failed"
//! (CUDA_ERROR_OPERATING_SYSTEM), with nothing to say what the sandbox had refused.
//!
//! Why the reaper and not a SIGSYS handler in the worker: a thread that blocks SIGSYS (helper
//! threads that block every signal, as GPU drivers' may) would be killed by the kernel on a trapped
//! call, and a handler in the worker's memory is the plugin's to disturb. The reaper answers
//! every thread alike, only ever with EPERM (it never lets a call through), and reads nothing of
//! the worker's memory but the shared counts, which a plugin can at worst garble for itself.
//! Where the listener cannot be installed (before Linux 5.7, which allows it with thread sync,
//! or under a container manager's filter that already has one) refused calls fail with EPERM
//! unnamed. Should the reaper's thread die, the kernel fails them with ENOSYS, unnamed; it
//! counts against the plugin's pids limit like any thread.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, Ordering};

use super::confine::ConfineError;

/// Distinct calls remembered; past that, refusals still fail with EPERM but go unnamed.
const SLOTS: usize = 32;
const EMPTY: i32 = -1;

/// Refused calls and how often each was refused, in the order first refused.
#[repr(C)]
struct Table {
    calls: [AtomicI32; SLOTS],
    counts: [AtomicU32; SLOTS],
}

impl Table {
    const fn new() -> Self {
        Self {
            calls: [const { AtomicI32::new(EMPTY) }; SLOTS],
            counts: [const { AtomicU32::new(0) }; SLOTS],
        }
    }

    /// Counts a refusal of call `nr`; true the first time that call is seen. Lock-free: the
    /// worker reads the shared table while the reaper writes it.
    fn record(&self, nr: i32) -> bool {
        for (call, count) in self.calls.iter().zip(&self.counts) {
            match call.compare_exchange(EMPTY, nr, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    count.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Err(seen) if seen == nr => {
                    count.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                Err(_) => {}
            }
        }
        false
    }

    /// Each refused call with its count, in the order first refused.
    fn refused(&self) -> Vec<(i32, u32)> {
        self.calls
            .iter()
            .zip(&self.counts)
            .map(|(c, n)| (c.load(Ordering::Acquire), n.load(Ordering::Relaxed)))
            .take_while(|(c, _)| *c != EMPTY)
            .collect()
    }
}

/// The table shared by the worker and its reaper (null until `channel`: no filter that names).
static SHARED: AtomicPtr<Table> = AtomicPtr::new(std::ptr::null_mut());

fn shared() -> Option<&'static Table> {
    // SAFETY: set once by `channel` to a mapping of a `Table` that is never unmapped.
    unsafe { SHARED.load(Ordering::Acquire).as_ref() }
}

/// The name of x86_64 system call `nr` ("unknown" for a number the table lacks).
fn name(nr: i32) -> &'static str {
    usize::try_from(nr)
        .ok()
        .and_then(syscalls::Sysno::new)
        .map_or("unknown", |s| s.name())
}

/// `calls` (number, times refused) as one clause for an error message.
fn describe(calls: &[(i32, u32)]) -> String {
    let mut text = String::from("the sandbox refused system calls (each failed with EPERM): ");
    for (i, (nr, times)) in calls.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        let _ = write!(text, "{sep}{} ({nr}) ×{times}", name(*nr));
    }
    text.push_str("; a plugin that needs one runs only at a lower tier");
    text
}

/// What this worker's filter has refused so far, as a clause to add to an error; `None` when
/// nothing was refused (or no filter is installed).
pub fn summary() -> Option<String> {
    let calls = shared()?.refused();
    (!calls.is_empty()).then(|| describe(&calls))
}

fn fail(what: &str, e: impl std::fmt::Display) -> ConfineError {
    ConfineError {
        step: "seccomp",
        reason: format!("{what}: {e}"),
    }
}

/// The worker's end of the channel: hands the filter's listener to the reaper.
pub struct Handoff(UnixStream);

/// The reaper's end: answers refused calls once the listener arrives.
pub struct Answerer(UnixStream);

/// Maps the shared table and opens the channel between the worker and its reaper; called in
/// the process that is about to fork into the two (still single-threaded).
pub fn channel() -> Result<(Handoff, Answerer), ConfineError> {
    // SAFETY: an anonymous shared mapping of one Table, initialized before anything reads it;
    // fork keeps it shared between the reaper and the worker.
    unsafe {
        let page = libc::mmap(
            std::ptr::null_mut(),
            std::mem::size_of::<Table>(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if page == libc::MAP_FAILED {
            return Err(fail("sharing the refusal counts", last_error()));
        }
        let page = page.cast::<Table>();
        page.write(Table::new());
        SHARED.store(page, Ordering::Release);
    }
    let (worker, reaper) = UnixStream::pair().map_err(|e| fail("a channel to the reaper", e))?;
    Ok((Handoff(worker), Answerer(reaper)))
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

impl Handoff {
    /// Sends the filter's `listener` to the reaper and waits for it to be taken; the worker
    /// keeps no copy of either.
    pub fn send(self, listener: OwnedFd) -> Result<(), ConfineError> {
        let fd: RawFd = listener.as_raw_fd();
        // SAFETY: the message has room for one descriptor's header, filled through the CMSG
        // macros within its control buffer.
        let r = with_fd_message(|msg| unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            libc::CMSG_DATA(cmsg).cast::<RawFd>().write_unaligned(fd);
            libc::sendmsg(self.0.as_raw_fd(), msg, 0)
        });
        if r != 1 {
            return Err(fail("handing the listener to the reaper", last_error()));
        }
        drop(listener);
        // Without its answering thread refused calls would fail with ENOSYS, unnamed.
        (&self.0).read_exact(&mut [0u8; 1]).map_err(|e| {
            fail(
                "the reaper did not take the filter's listener",
                format!("{e}: its thread did not start (is the plugin's pids limit too low?)"),
            )
        })
    }
}

/// Calls `f` with a one-byte message whose control buffer holds one descriptor's header.
fn with_fd_message<R>(f: impl FnOnce(&mut libc::msghdr) -> R) -> R {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE is arithmetic on a constant.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    // u64s: a control header must be aligned as one.
    let mut control = [0u64; 8];
    assert!(space <= std::mem::size_of_val(&control));
    // SAFETY: msghdr is plain data; all-zero is its empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    f(&mut msg)
}

impl Answerer {
    /// Answers refused calls on a thread of the reaper, from the listener the worker sends,
    /// until the worker is gone. Returns at once; a worker that sends nothing (no listener on
    /// this kernel) closes the channel and the thread ends.
    pub fn spawn(self) {
        let spawned = std::thread::Builder::new()
            .name("refusals".into())
            .spawn(move || {
                if let Some(listener) = self.receive() {
                    // SAFETY: sends one byte; MSG_NOSIGNAL, should the worker be gone.
                    unsafe {
                        libc::send(
                            self.0.as_raw_fd(),
                            [1u8].as_ptr().cast(),
                            1,
                            libc::MSG_NOSIGNAL,
                        )
                    };
                    answer(&listener);
                }
            });
        if let Err(e) = spawned {
            let line = format!("worker: the reaper cannot answer refused system calls: {e}\n");
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }

    /// The listener, once the worker has installed its filter; `None` if it sent none.
    fn receive(&self) -> Option<OwnedFd> {
        // SAFETY: recvmsg fills the message's buffers within their lengths; a received
        // descriptor is taken into an OwnedFd exactly once.
        with_fd_message(|msg| unsafe {
            loop {
                let r = libc::recvmsg(self.0.as_raw_fd(), msg, libc::MSG_CMSG_CLOEXEC);
                if r < 0 && last_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                if r <= 0 {
                    return None;
                }
                break;
            }
            let cmsg = libc::CMSG_FIRSTHDR(msg);
            if cmsg.is_null()
                || (*cmsg).cmsg_level != libc::SOL_SOCKET
                || (*cmsg).cmsg_type != libc::SCM_RIGHTS
            {
                return None;
            }
            let fd = libc::CMSG_DATA(cmsg).cast::<RawFd>().read_unaligned();
            Some(OwnedFd::from_raw_fd(fd))
        })
    }
}

/// Names each refused call (once) and counts it, then fails it with EPERM. Returns when the
/// listener fails; dropping it then makes the kernel fail further refused calls (ENOSYS) rather
/// than leave them waiting.
fn answer(listener: &OwnedFd) {
    // The log's "first time" is decided here, in memory the worker cannot reach.
    let named = Table::new();
    loop {
        // SAFETY: an all-zero seccomp_notif, as RECV requires, filled by the kernel.
        let mut notice: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: RECV writes one seccomp_notif into `notice`.
        let r = unsafe {
            libc::ioctl(
                listener.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_RECV,
                &mut notice,
            )
        };
        if r != 0 {
            match last_error().raw_os_error() {
                // Interrupted, or the caller was gone before its call was read.
                Some(libc::EINTR) | Some(libc::ENOENT) => continue,
                _ => return,
            }
        }
        let nr = notice.data.nr;
        if named.record(nr) {
            // One write, so the line cannot interleave with the worker's own.
            let line = format!(
                "worker: the sandbox refused system call {} ({nr}); it failed with EPERM\n",
                name(nr)
            );
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
        // Counted before the answer, so the worker's error for the failed call can name it.
        if let Some(shared) = shared() {
            shared.record(nr);
        }
        let reply = libc::seccomp_notif_resp {
            id: notice.id,
            val: 0,
            error: -libc::EPERM,
            flags: 0,
        };
        // SAFETY: SEND reads one seccomp_notif_resp. ENOENT (the caller gave up on a signal or
        // died) needs nothing further.
        unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, &reply) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_per_call_and_named_in_order() {
        let table = Table::new();
        assert!(table.record(101));
        assert!(!table.record(101));
        assert!(table.record(165));
        assert_eq!(table.refused(), [(101, 2), (165, 1)]);
        let text = describe(&table.refused());
        assert!(text.contains("ptrace (101) ×2, mount (165) ×1;"), "{text}");
        assert_eq!(name(100_000), "unknown");
    }

    #[test]
    fn a_full_table_still_counts_what_it_holds() {
        let table = Table::new();
        for nr in 0..SLOTS as i32 {
            assert!(table.record(nr));
        }
        assert!(!table.record(999));
        assert!(!table.record(3));
        assert_eq!(table.refused().len(), SLOTS);
        assert_eq!(table.refused()[3], (3, 2));
    }
}
