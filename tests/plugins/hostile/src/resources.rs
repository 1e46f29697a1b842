//! Using up what the worker's limits bound: memory, processes, CPU time, disk.

use std::ffi::CString;
use std::time::{Duration, Instant};

use pio_plugin_api::PluginError;

use crate::errno_text;

/// The attack `verb` does with `arg`, when it is one of these (`None`: not one of them).
pub(crate) fn attack(verb: &str, arg: &str) -> Option<Result<String, PluginError>> {
    // SAFETY (for the libc calls below): plain system calls with valid arguments; failures are
    // reported through errno.
    let done = unsafe {
        match verb {
            "alloc" => alloc(arg.parse().unwrap_or(64)),
            "fork-bomb" => fork_bomb(),
            "spin" => spin(arg.parse().unwrap_or(1.0)),
            "fill" => fill(arg),
            "huge-file" => {
                let path = CString::new(arg).unwrap_or_default();
                let fd = libc::open(path.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o600);
                if fd < 0 {
                    return Some(Ok(format!("denied: {}", errno_text())));
                }
                let block = vec![0u8; 1 << 20];
                let mut written = 0usize;
                loop {
                    let n = libc::write(fd, block.as_ptr().cast(), block.len());
                    if n <= 0 {
                        let e = errno_text();
                        libc::close(fd);
                        break format!("wrote {written} bytes, then: {e}");
                    }
                    written += n as usize;
                    if written >= 1 << 30 {
                        libc::close(fd);
                        break format!("wrote {written} bytes without a limit");
                    }
                }
            }
            _ => return None,
        }
    };
    Some(Ok(done))
}

/// Allocates and touches `megabytes` MiB, one at a time.
fn alloc(megabytes: usize) -> String {
    let mut blocks = Vec::new();
    for _ in 0..megabytes {
        let mut block = vec![0u8; 1 << 20];
        for page in block.iter_mut().step_by(4096) {
            *page = 1;
        }
        blocks.push(block);
    }
    format!("allocated {megabytes} MiB")
}

/// Forks sleeping children until the pids limit (or 10,000) stops it.
fn fork_bomb() -> String {
    let mut forked = 0;
    for _ in 0..10_000 {
        // SAFETY: the child only sleeps and exits.
        match unsafe { libc::fork() } {
            0 => {
                std::thread::sleep(Duration::from_secs(30));
                // SAFETY: exiting the forked child without running the parent's destructors.
                unsafe { libc::_exit(0) }
            }
            -1 => return format!("forked {forked}, then: {}", errno_text()),
            _ => forked += 1,
        }
    }
    format!("forked {forked} without hitting a limit")
}

/// Burns CPU for `seconds` of wall time, and says how much user CPU time the process used.
fn spin(seconds: f64) -> String {
    let start = Instant::now();
    let mut x = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
    }
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let cpu = usage.ru_utime.tv_sec as f64 + usage.ru_utime.tv_usec as f64 / 1e6;
    format!(
        "cpu_seconds={cpu:.3} wall_seconds={:.3} ({})",
        start.elapsed().as_secs_f64(),
        x % 2
    )
}

/// Writes `path` until the file system refuses, then says how far it got and why.
fn fill(path: &str) -> String {
    use std::io::Write;
    let mut file = match std::fs::File::create(path) {
        Ok(f) => f,
        Err(e) => return format!("denied: {e}"),
    };
    let chunk = vec![0x5a_u8; 64 << 10];
    let mut written = 0usize;
    loop {
        match file.write(&chunk) {
            Ok(0) => return format!("full after {written} bytes: wrote nothing"),
            Ok(n) => written += n,
            Err(e) => {
                drop(file);
                let _ = std::fs::remove_file(path);
                return format!("full after {written} bytes: {e}");
            }
        }
        if written > 1 << 30 {
            return format!("wrote {written} bytes without limit");
        }
    }
}
