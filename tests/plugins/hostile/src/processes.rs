//! Reaching other processes and identities: signals and ptrace at the parent or any pid, a
//! grandchild that escapes by a double fork, a program run, root by `setuid`.

use pio_plugin_api::PluginError;

use crate::errno_text;

/// The attack `verb` does with `arg`, when it is one of these (`None`: not one of them).
pub(crate) fn attack(verb: &str, arg: &str, command: &str) -> Option<Result<String, PluginError>> {
    // SAFETY (for the libc calls below): plain system calls with valid arguments; failures are
    // reported through errno.
    let done = unsafe {
        match verb {
            "kill-parent" => {
                if libc::kill(libc::getppid(), libc::SIGKILL) == 0 {
                    "killed the parent".into()
                } else {
                    format!("denied: {}", errno_text())
                }
            }
            "ptrace-parent" => {
                let r = libc::ptrace(libc::PTRACE_ATTACH, libc::getppid(), 0usize, 0usize);
                if r == 0 {
                    "attached to the parent".into()
                } else {
                    format!("denied: {}", errno_text())
                }
            }
            "kill" => {
                if libc::kill(arg.parse().unwrap_or(0), libc::SIGKILL) == 0 {
                    "killed it".into()
                } else {
                    format!("denied: {}", errno_text())
                }
            }
            "ptrace" => {
                let r = libc::ptrace(
                    libc::PTRACE_ATTACH,
                    arg.parse::<i32>().unwrap_or(0),
                    0usize,
                    0usize,
                );
                if r == 0 {
                    "attached".into()
                } else {
                    format!("denied: {}", errno_text())
                }
            }
            "double-fork" => double_fork(),
            "exec" => {
                // Runs a program and returns its output: e.g. a setuid binary printing its euid.
                let mut parts = command.split_whitespace().skip(1);
                let program = parts.next().unwrap_or("/bin/true");
                match std::process::Command::new(program).args(parts).output() {
                    Ok(out) => format!("ran: {}", String::from_utf8_lossy(&out.stdout).trim()),
                    Err(e) => format!("denied: {e}"),
                }
            }
            "setuid-root" => {
                if libc::setuid(0) == 0 {
                    "became root".into()
                } else {
                    format!("denied: {}", errno_text())
                }
            }
            _ => return None,
        }
    };
    Some(Ok(done))
}

/// Forks a child that forks a grandchild and exits, leaving it orphaned: the grandchild's pid.
fn double_fork() -> String {
    // SAFETY: the children only call async-signal-safe functions before sleeping or exiting.
    unsafe {
        let mut pipe = [0i32; 2];
        libc::pipe(pipe.as_mut_ptr());
        match libc::fork() {
            0 => {
                libc::setsid();
                let grandchild = libc::fork();
                if grandchild == 0 {
                    libc::sleep(120);
                    libc::_exit(0);
                }
                libc::write(pipe[1], (&grandchild as *const i32).cast(), 4);
                libc::_exit(0);
            }
            -1 => format!("fork failed: {}", errno_text()),
            child => {
                libc::close(pipe[1]);
                let mut grandchild = 0i32;
                libc::read(pipe[0], (&mut grandchild as *mut i32).cast(), 4);
                libc::waitpid(child, std::ptr::null_mut(), 0);
                format!("grandchild={grandchild}")
            }
        }
    }
}
