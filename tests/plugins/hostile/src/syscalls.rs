//! Calls the seccomp filter refuses, and the ways around it: another ABI (x32, `int 0x80`), a
//! namespace made or joined, a terminal's input, the network, and refusals met with SIGSYS
//! taken over or blocked.

use pio_plugin_api::PluginError;

use crate::errno_text;

/// The attack `verb` does with `arg`, when it is one of these (`None`: not one of them).
pub(crate) fn attack(verb: &str, arg: &str) -> Option<Result<String, PluginError>> {
    // SAFETY (for the libc calls below): plain system calls with valid arguments; failures are
    // reported through errno.
    let done = unsafe {
        match verb {
            // Takes SIGSYS over (ignored), then makes a call the filter refuses: it still fails
            // with EPERM (a refusal that trapped into a handler here would now be lost).
            "sigsys" => {
                let mut current: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGSYS, std::ptr::null(), &mut current) != 0 {
                    return Some(Ok(format!(
                        "asking SIGSYS's action failed: {}",
                        errno_text()
                    )));
                }
                let taken = if libc::signal(libc::SIGSYS, libc::SIG_IGN) == libc::SIG_ERR {
                    format!("sigaction denied: {}", errno_text())
                } else {
                    "sigaction taken".into()
                };
                let r = libc::ptrace(libc::PTRACE_ATTACH, 1, 0usize, 0usize);
                format!("{taken}; ptrace {r}: {}", errno_text())
            }
            // A refused call from a thread that blocks every signal, as libraries' helper
            // threads do: a refusal by SIGSYS would kill the worker; it should fail with EPERM.
            "blocked-ptrace" => std::thread::spawn(|| {
                let mut all: libc::sigset_t = std::mem::zeroed();
                libc::sigfillset(&mut all);
                libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
                let r = libc::ptrace(libc::PTRACE_ATTACH, 1, 0usize, 0usize);
                format!("ptrace with every signal blocked {r}: {}", errno_text())
            })
            .join()
            .unwrap_or_else(|_| "the thread panicked".into()),
            // A refused call, then a failed request: the error should say what was refused.
            "fail-after-ptrace" => {
                libc::ptrace(libc::PTRACE_ATTACH, 1, 0usize, 0usize);
                return Some(Err(PluginError::internal(format!(
                    "hostile gives up after ptrace ({})",
                    errno_text()
                ))));
            }
            "unshare" => {
                if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                    "unshared".into()
                } else {
                    format!("denied: {}", errno_text())
                }
            }
            "x32-getpid" => {
                let r = libc::syscall(0x4000_0000 | libc::SYS_getpid);
                if r >= 0 {
                    format!("x32 call answered {r}")
                } else {
                    format!("denied: {}", errno_text())
                }
            }
            "tiocsti" => {
                // Push a character into the terminal's input (CVE-2017-5226 style), with the
                // command's upper 32 bits set as well (CVE-2019-10063).
                let c = b'x';
                let plain = libc::ioctl(0, libc::TIOCSTI, &c);
                let plain_err = errno_text();
                let wide = libc::syscall(libc::SYS_ioctl, 0, (1u64 << 32) | libc::TIOCSTI, &c);
                if plain == 0 || wide == 0 {
                    "injected".into()
                } else {
                    format!("denied: {plain_err}")
                }
            }
            "int80-getpid" => {
                // The 32-bit system-call entry: getpid is number 20 there.
                let mut ret: i64 = 20;
                std::arch::asm!("int 0x80", inlateout("rax") ret, options(nostack));
                format!("int 0x80 answered {ret}")
            }
            "setns" => {
                let path = c"/proc/1/ns/net";
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
                if fd < 0 {
                    format!("denied: {}", errno_text())
                } else if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    "joined another namespace".into()
                } else {
                    format!("denied: {}", errno_text())
                }
            }
            "connect" => {
                match std::net::TcpStream::connect(("127.0.0.1", arg.parse().unwrap_or(1))) {
                    Ok(_) => "connected".into(),
                    Err(e) => format!("denied: {e}"),
                }
            }
            // A socket of family `arg` (a number: 40 is vsock, 38 the kernel's crypto).
            "socket" => {
                let fd = libc::socket(arg.parse().unwrap_or(-1), libc::SOCK_STREAM, 0);
                if fd >= 0 {
                    libc::close(fd);
                    "opened".into()
                } else {
                    format!("denied: {}", errno_text())
                }
            }
            // A host service's socket (a system bus, a journal) by its path.
            "unix-connect" => match std::os::unix::net::UnixStream::connect(arg) {
                Ok(_) => "connected".into(),
                Err(e) => format!("denied: {e}"),
            },
            _ => return None,
        }
    };
    Some(Ok(done))
}
