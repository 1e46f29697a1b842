//! Reaching the file system: listing, reading and writing paths, and mounting over one.

use std::ffi::CString;

use pio_plugin_api::PluginError;

use crate::errno_text;

/// The attack `verb` does with `arg`, when it is one of these (`None`: not one of them).
pub(crate) fn attack(verb: &str, arg: &str) -> Option<Result<String, PluginError>> {
    // SAFETY (for the libc calls below): plain system calls with valid arguments; failures are
    // reported through errno.
    let done = unsafe {
        match verb {
            "list" => list(arg),
            "peek" => peek(arg),
            "read" => match std::fs::read(arg) {
                Ok(bytes) => format!("read {} bytes", bytes.len()),
                Err(e) => format!("denied: {e}"),
            },
            "write" => match std::fs::write(arg, b"hostile") {
                Ok(()) => "wrote".into(),
                Err(e) => format!("denied: {e}"),
            },
            "mount" => {
                let (src, target, fstype) =
                    (c"none", CString::new(arg).unwrap_or_default(), c"tmpfs");
                if libc::mount(
                    src.as_ptr(),
                    target.as_ptr(),
                    fstype.as_ptr(),
                    0,
                    std::ptr::null(),
                ) == 0
                {
                    "mounted".into()
                } else {
                    format!("denied: {}", errno_text())
                }
            }
            _ => return None,
        }
    };
    Some(Ok(done))
}

/// The names in folder `path`, sorted.
fn list(path: &str) -> String {
    match std::fs::read_dir(path) {
        Ok(entries) => {
            let mut names: Vec<String> = entries
                .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .collect();
            names.sort();
            format!("listed {}", names.join(" "))
        }
        Err(e) => format!("denied: {e}"),
    }
}

/// Reads at most 8 bytes of `path` without waiting (a device that never ends, such as
/// `/dev/zero`, or one with nothing to say, such as `/dev/ptmx`, included).
fn peek(path: &str) -> String {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut buf = [0u8; 8];
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
    // A device with nothing yet (an unseeded /dev/random) gets two seconds to say something.
    let mut read = |f: &mut std::fs::File| match f.read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            use std::os::fd::AsRawFd;
            let mut ready = libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the call's length.
            unsafe { libc::poll(&mut ready, 1, 2000) };
            f.read(&mut buf)
        }
        other => other,
    };
    match opened.and_then(|mut f| read(&mut f)) {
        Ok(n) => format!("peeked {n} bytes"),
        Err(e) => format!("denied: {e}"),
    }
}
