//! The system calls a worker's filter refused. A refused call traps (SIGSYS) rather than failing
//! silently: the handler fails it with EPERM, as a plain errno rule would, names it once on the
//! worker's stderr (which the daemon forwards to its log) and counts it, so that a plugin failing
//! on a refused call says which one. Without this a GPU driver at `high` reported only "OS call
//! failed" (CUDA_ERROR_OPERATING_SYSTEM), with nothing to say what the sandbox had refused.
//!
//! Only the worker installs this, after it is confined and before its plugin loads; the filters
//! refuse setting SIGSYS's action afterwards (asking is allowed), so a plugin cannot swap the
//! handler out and turn a refusal into a crash. One case still crashes where a plain errno rule
//! would not: a thread that blocks SIGSYS (some libraries' helper threads block every signal)
//! and makes a refused call is killed by the kernel with SIGSYS, which the host reports as such.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

use super::confine::ConfineError;

/// Distinct calls remembered; past that, refusals still fail with EPERM but go unnamed.
const SLOTS: usize = 32;
const EMPTY: i32 = -1;
static CALLS: [AtomicI32; SLOTS] = [const { AtomicI32::new(EMPTY) }; SLOTS];
static COUNTS: [AtomicU32; SLOTS] = [const { AtomicU32::new(0) }; SLOTS];

/// Counts a refusal of call `nr`; true the first time that call is seen. Lock-free, so the signal
/// handler may call it whatever the interrupted thread was doing.
fn record(nr: i32) -> bool {
    for (call, count) in CALLS.iter().zip(&COUNTS) {
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

/// The name of x86_64 system call `nr` ("unknown" for a number the table lacks).
fn name(nr: i32) -> &'static str {
    usize::try_from(nr)
        .ok()
        .and_then(syscalls::Sysno::new)
        .map_or("unknown", |s| s.name())
}

/// Each refused call with its count, in the order first refused.
fn refused() -> Vec<(i32, u32)> {
    CALLS
        .iter()
        .zip(&COUNTS)
        .map(|(c, n)| (c.load(Ordering::Acquire), n.load(Ordering::Relaxed)))
        .take_while(|(c, _)| *c != EMPTY)
        .collect()
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
    let calls = refused();
    (!calls.is_empty()).then(|| describe(&calls))
}

/// A fixed buffer the handler formats into: no allocation inside a signal handler.
struct Line {
    bytes: [u8; 160],
    len: usize,
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = (self.len + s.len()).min(self.bytes.len());
        self.bytes[self.len..end].copy_from_slice(&s.as_bytes()[..end - self.len]);
        self.len = end;
        Ok(())
    }
}

/// The SIGSYS payload (`siginfo_t._sifields._sigsys` on 64-bit Linux), which the libc crate
/// does not expose.
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: *mut libc::c_void,
    syscall: i32,
    arch: u32,
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo (SIGSYS layout, SA_SIGINFO) and ucontext; errno
    // is saved and restored so the interrupted code sees only the call's own result.
    unsafe {
        let saved = *libc::__errno_location();
        let nr = (*info.cast::<SigsysInfo>()).syscall;
        if record(nr) {
            let mut line = Line {
                bytes: [0; 160],
                len: 0,
            };
            let _ = writeln!(
                line,
                "worker: the sandbox refused system call {} ({nr}); it failed with EPERM",
                name(nr)
            );
            libc::write(2, line.bytes.as_ptr().cast(), line.len);
        }
        let context = context.cast::<libc::ucontext_t>();
        (*context).uc_mcontext.gregs[libc::REG_RAX as usize] = -(libc::EPERM as i64);
        *libc::__errno_location() = saved;
    }
}

/// Installs the handler that turns a trapped call into EPERM and a record (before the filter).
pub fn install() -> Result<(), ConfineError> {
    // SAFETY: a zeroed sigaction with a valid handler, an empty mask and SA_SIGINFO.
    let r = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(ConfineError {
            step: "seccomp",
            reason: format!(
                "installing the SIGSYS handler: {}",
                std::io::Error::last_os_error()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_per_call_and_named_in_order() {
        assert!(record(101));
        assert!(!record(101));
        assert!(record(165));
        assert_eq!(refused()[..2], [(101, 2), (165, 1)]);
        let text = summary().unwrap();
        assert!(text.contains("ptrace (101) ×2, mount (165) ×1;"), "{text}");
        assert_eq!(name(100_000), "unknown");
    }

    #[test]
    fn the_handlers_line_is_cut_at_its_buffer_not_overrun() {
        let mut line = Line {
            bytes: [0; 160],
            len: 0,
        };
        let _ = write!(line, "{}", "x".repeat(200));
        assert_eq!(line.len, 160);
    }
}
