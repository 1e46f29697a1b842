//! The ways a plugin crashes or hangs: a bad pointer, an abort, an exit, a panic, a spin that
//! never ends, a stop that keeps coming back, and a stop and continue it should survive.

use std::time::Duration;

use pio_plugin_api::PluginError;

use crate::errno_text;

/// What attack `verb` does, when it is one of these (`None`: not one of them).
pub(crate) fn attack(verb: &str) -> Option<Result<String, PluginError>> {
    // SAFETY: the null write is the attack (the worker dies of it, as asked); the libc calls
    // have valid arguments.
    let done = unsafe {
        match verb {
            "segfault" => {
                std::ptr::null_mut::<u8>().write_volatile(1);
                "survived a segfault".into()
            }
            "abort" => std::process::abort(),
            "exit" => std::process::exit(3),
            "panic" => panic!("hostile plugin panics on request"),
            "freeze" => loop {
                // Stopped again whenever something resumes it (the kernel sends SIGCONT to a
                // stopped process whose group becomes orphaned).
                libc::kill(libc::getpid(), libc::SIGSTOP);
                std::thread::sleep(Duration::from_millis(10));
            },
            "loop" => loop {
                std::hint::spin_loop();
            },
            "stop-continue" => stop_and_continue(),
            _ => return None,
        }
    };
    Some(Ok(done))
}

/// Stops this process for a moment while a thread sleeps, as Ctrl-Z and `fg` or a frozen cgroup
/// do: the sleep resumes through `restart_syscall`, which a filter must let through.
fn stop_and_continue() -> String {
    let sleeper = std::thread::spawn(|| {
        let t = libc::timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec; no remainder wanted.
        let r = unsafe { libc::nanosleep(&t, std::ptr::null_mut()) };
        let how = if r == 0 { "slept".into() } else { errno_text() };
        format!("nanosleep {r}: {how}")
    });
    std::thread::sleep(std::time::Duration::from_millis(100));
    // SAFETY: the child only calls async-signal-safe functions before exiting.
    unsafe {
        match libc::fork() {
            0 => {
                // Continues the parent whenever its stop has landed (a SIGCONT to a running
                // process does nothing).
                let tick = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 100_000_000,
                };
                for _ in 0..10 {
                    libc::nanosleep(&tick, std::ptr::null_mut());
                    libc::kill(libc::getppid(), libc::SIGCONT);
                }
                libc::_exit(0);
            }
            -1 => return format!("fork failed: {}", errno_text()),
            child => {
                libc::kill(libc::getpid(), libc::SIGSTOP);
                libc::waitpid(child, std::ptr::null_mut(), 0);
            }
        }
    }
    sleeper
        .join()
        .unwrap_or_else(|_| "the sleeper panicked".into())
}
