//! The `medium` tier, end to end: namespaces, a read-only view with a private scratch, no
//! capabilities, the seccomp deny-list — on top of everything `low` gives.

use crate::support::*;
use crate::worker::{confinement_available, run_in, Ran, LIMITS};
use std::os::unix::fs::PermissionsExt;

/// A plugin directory with the hostile plugin at `tier` (its library pinned) and a model folder.
pub(crate) fn tier_dir(tier: &str) -> PluginDir {
    let dir = PluginDir::new();
    let lib = dir.copy_lib("pio_test_plugin_hostile", "libhostile.so");
    std::fs::create_dir(dir.path().join("model")).unwrap();
    dir.write("model/config.json", "{}");
    let sha = sha256_of(&lib);
    let extra = format!("sha256 = \"{sha}\"\n{LIMITS}[model]\npath = \"model\"\n");
    let text = manifest("hostile", "0.1.0", "libhostile.so", &extra)
        .replace("tier = \"low\"", &format!("tier = \"{tier}\""));
    dir.write("hostile.toml", &text);
    dir
}

fn medium_dir() -> PluginDir {
    tier_dir("medium")
}

pub(crate) fn attack(dir: &PluginDir, what: &str) -> Ran {
    let ran = run_in(dir, "hostile", what, &[]);
    assert!(ran.ok, "{what}: {}", ran.stderr);
    ran
}

#[test]
fn capabilities_are_gone_and_every_thread_is_filtered() {
    if !confinement_available() {
        return;
    }
    let dir = medium_dir();
    let status = attack(&dir, "status").stdout;
    let uid = format!("uid={} ", crate::support::worker_uid("hostile"));
    for expected in [
        uid.as_str(),
        "nonewprivs=1 ",
        "capeff=0000000000000000 ",
        "capbnd=0000000000000000 ",
        "seccomp=2 ",
    ] {
        assert!(status.contains(expected), "{expected}: {status}");
    }
    let threads = attack(&dir, "threads").stdout;
    let modes = threads.split("seccomp=").nth(1).unwrap().trim();
    let count: usize = threads["threads=".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        count >= 9,
        "the 8 new threads and the worker's own: {threads}"
    );
    assert!(modes.split(',').all(|m| m == "2"), "{threads}");
}

#[test]
fn the_file_system_is_read_only_but_for_the_scratch() {
    if !confinement_available() {
        return;
    }
    let dir = medium_dir();
    let model = dir.path().join("model");
    let read = attack(&dir, &format!("read {}/config.json", model.display())).stdout;
    assert_eq!(
        read.trim(),
        "read 2 bytes",
        "the model folder stays readable"
    );
    for path in [model.join("new.json"), "/var/tmp/pio-medium-test".into()] {
        let out = attack(&dir, &format!("write {}", path.display())).stdout;
        assert!(
            out.contains("Read-only file system"),
            "{}: {out}",
            path.display()
        );
        assert!(!path.exists());
    }
    assert_eq!(
        attack(&dir, "write /tmp/scratch-file").stdout.trim(),
        "wrote"
    );
    assert!(
        !std::path::Path::new("/tmp/scratch-file").exists(),
        "the scratch is private"
    );
    let out = attack(&dir, "huge-file /tmp/huge").stdout;
    assert!(
        out.contains("File too large") || out.contains("No space left"),
        "{out}"
    );
}

/// A mount whose path is not UTF-8 (a Linux path is any bytes) neither fails the start nor is
/// passed over: pio runs with a tmpfs, writable by anyone, at `/mnt/caf\xff`, which the worker
/// reaches through a link with a plain name and finds read-only.
#[test]
fn a_mount_whose_path_is_not_utf8_is_made_read_only() {
    if !confinement_available() {
        return;
    }
    if !std::path::Path::new("/mnt").is_dir() {
        eprintln!("skipped: no /mnt here");
        return;
    }
    let dir = medium_dir();
    let args = ["run", "hostile", "--plugins", ".", "--prompt"];
    let args = [&args[..], &["write /mnt/link/new"]].concat();
    // SAFETY: `setup` makes system calls only, on NUL-terminated literals.
    let ran = unsafe {
        pio_in_own_mounts(dir.path(), &args, || {
            let tmpfs = c"tmpfs".as_ptr();
            let mode = |m: &'static std::ffi::CStr| m.as_ptr().cast();
            // Over the host's /mnt, so nothing is made there.
            os(libc::mount(
                tmpfs,
                c"/mnt".as_ptr(),
                tmpfs,
                0,
                mode(c"mode=0755"),
            ))?;
            os(libc::mkdir(c"/mnt/caf\xff".as_ptr(), 0o755))?;
            let point = c"/mnt/caf\xff".as_ptr();
            os(libc::mount(tmpfs, point, tmpfs, 0, mode(c"mode=0777")))?;
            os(libc::symlink(c"caf\xff".as_ptr(), c"/mnt/link".as_ptr()))?;
            Ok(())
        })
    };
    let ran: Ran = ran.into();
    assert!(ran.ok, "{}", ran.stderr);
    assert!(
        ran.stdout.contains("Read-only file system"),
        "{}",
        ran.stdout
    );
}

#[test]
fn the_daemon_is_out_of_sight_and_reach() {
    if !confinement_available() {
        return;
    }
    let dir = medium_dir();
    let me = std::process::id();
    let out = attack(&dir, &format!("kill {me}")).stdout;
    assert!(out.contains("No such process"), "{out}");
    let out = attack(&dir, &format!("read /proc/{me}/environ")).stdout;
    assert!(out.contains("No such file"), "{out}");
    let out = attack(&dir, &format!("ptrace {me}")).stdout;
    assert!(out.contains("Operation not permitted"), "{out}");
}

#[test]
fn the_network_is_unreachable() {
    if !confinement_available() {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let out = attack(&medium_dir(), &format!("connect {port}")).stdout;
    assert!(out.contains("Network is unreachable"), "{out}");
}

#[test]
fn mounts_namespaces_and_the_x32_abi_are_denied() {
    if !confinement_available() {
        return;
    }
    let dir = medium_dir();
    let before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    // vsock (40) reaches the host's services from a VM whatever the network namespace; the
    // kernel's crypto sockets (38) are surface an escape would use.
    for what in [
        "mount /mnt",
        "unshare",
        "x32-getpid",
        "setuid-root",
        "socket 40",
        "socket 38",
    ] {
        let out = attack(&dir, what).stdout;
        assert!(out.contains("Operation not permitted"), "{what}: {out}");
    }
    // Unix and the (empty) namespace's IP stay open to libraries that make them.
    for family in [libc::AF_UNIX, libc::AF_INET] {
        let out = attack(&dir, &format!("socket {family}")).stdout;
        assert!(out.contains("opened"), "{family}: {out}");
    }
    assert_eq!(
        std::fs::read_to_string("/proc/self/mountinfo").unwrap(),
        before,
        "host mounts unchanged"
    );
}

/// A refused call fails with EPERM, is named in the worker's log and in a failed request's error,
/// from any thread: one with SIGSYS ignored, one blocking every signal (at `medium` and `high`).
pub(crate) fn refused_calls_are_named(dir: &PluginDir) {
    for (what, answer) in [
        ("ptrace 1", "denied: Operation not permitted"),
        (
            "sigsys",
            "sigaction taken; ptrace -1: Operation not permitted",
        ),
        (
            "blocked-ptrace",
            "ptrace with every signal blocked -1: Operation not permitted",
        ),
    ] {
        let ran = attack(dir, what);
        assert!(ran.stdout.starts_with(answer), "{what}: {}", ran.stdout);
        assert!(
            ran.stderr
                .contains("the sandbox refused system call ptrace (101); it failed with EPERM"),
            "{what}: {}",
            ran.stderr
        );
    }
    let failed = run_in(dir, "hostile", "fail-after-ptrace", &[]);
    assert!(
        !failed.ok
            && failed.stderr.contains(
                "(the sandbox refused system calls (each failed with EPERM): ptrace (101) ×1;"
            ),
        "{}",
        failed.stderr
    );
}

#[test]
fn refused_calls_are_named_at_medium() {
    if !confinement_available() {
        return;
    }
    refused_calls_are_named(&medium_dir());
}

#[test]
fn deaths_are_still_reported_faithfully_through_the_pid_namespace() {
    if !confinement_available() {
        return;
    }
    let dir = medium_dir();
    for (what, expected) in [
        ("segfault", "worker for hostile was killed by SIGSEGV"),
        ("abort", "worker for hostile was killed by SIGABRT"),
        (
            "alloc 256",
            "worker for hostile was killed: memory limit 64 MiB reached",
        ),
        ("exit", "worker for hostile exited with code 3"),
    ] {
        let ran = run_in(&dir, "hostile", what, &[]);
        assert!(
            !ran.ok && ran.stderr.contains(expected),
            "{what}: {}",
            ran.stderr
        );
    }
}

#[test]
fn the_32_bit_system_call_entry_is_killed() {
    if !confinement_available() {
        return;
    }
    // At `low` nothing filters it (it may still be absent if the kernel lacks IA-32 emulation).
    let low = attack(&tier_dir("low"), "int80-getpid");
    assert!(
        low.stdout.starts_with("int 0x80 answered"),
        "{}",
        low.stdout
    );
    let ran = run_in(&medium_dir(), "hostile", "int80-getpid", &[]);
    assert!(!ran.ok);
    assert!(ran.stderr.contains("killed by SIGSYS"), "{}", ran.stderr);
}

/// Runs `pio args` in `dir` under a seccomp filter with a listener of its own, as a container
/// manager's seccomp agent would install above the daemon: the filter sends `acct` (which nothing
/// here calls) to a listener the daemon inherits and keeps open, so its workers can install none.
/// `None` where this kernel installs no such filter (before Linux 5.0).
fn run_under_a_listener(dir: &PluginDir, args: &[&str]) -> Option<Ran> {
    use std::os::unix::process::CommandExt;
    // Load the call's number; `acct` goes to the listener, everything else is allowed.
    let code = |class: u32, op: u32, mode: u32| (class | op | mode) as u16;
    let mut filter = [
        libc::sock_filter {
            code: code(libc::BPF_LD, libc::BPF_W, libc::BPF_ABS),
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: code(libc::BPF_JMP, libc::BPF_JEQ, libc::BPF_K),
            jt: 0,
            jf: 1,
            k: libc::SYS_acct as u32,
        },
        libc::sock_filter {
            code: code(libc::BPF_RET, libc::BPF_K, 0),
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_USER_NOTIF,
        },
        libc::sock_filter {
            code: code(libc::BPF_RET, libc::BPF_K, 0),
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    let prog_addr = &prog as *const libc::sock_fprog as usize;
    let mut command = std::process::Command::new(pio_bin());
    command.current_dir(dir.path()).args(args);
    // SAFETY: between fork and exec only two system calls run, on memory that outlives them
    // (`prog` and `filter` live until `output` returns).
    unsafe {
        command.pre_exec(move || {
            let fd = libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
                prog_addr as *const libc::sock_fprog,
            );
            // The listener is close-on-exec; the daemon must hold it, or the kernel drops it.
            if fd < 0 || libc::fcntl(fd as i32, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = match command.output() {
        Ok(out) => out,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return None,
        Err(e) => panic!("run pio under a listener: {e}"),
    };
    Some(out.into())
}

/// Under a listener installed above the worker (one process may have only one), refused calls
/// fall back to failing with EPERM, unnamed, at `medium` and `high`: the worker lives on, also
/// when the refused call comes from a thread blocking every signal, and its log says why.
#[test]
fn refusals_fall_back_to_eperm_under_a_listener_above_the_worker() {
    if !confinement_available() {
        return;
    }
    for tier in ["medium", "high"] {
        let dir = tier_dir(tier);
        // Without the listener above, this kernel names refusals: the fallback below is the
        // listener's doing.
        let named = attack(&dir, "ptrace 1");
        assert!(
            named
                .stderr
                .contains("the sandbox refused system call ptrace"),
            "{tier}: {}",
            named.stderr
        );
        for (what, answer) in [
            ("ptrace 1", "denied: Operation not permitted"),
            (
                "blocked-ptrace",
                "ptrace with every signal blocked -1: Operation not permitted",
            ),
        ] {
            let args = ["run", "hostile", "--plugins", ".", "--prompt", what];
            let Some(ran) = run_under_a_listener(&dir, &args) else {
                eprintln!("skipped: this kernel has no seccomp user notification (Linux 5.0)");
                return;
            };
            assert!(ran.ok, "{tier} {what}: {}", ran.stderr);
            assert!(
                ran.stdout.starts_with(answer),
                "{tier} {what}: {}",
                ran.stdout
            );
            assert!(
                ran.stderr.contains(
                    "refused system calls fail with EPERM unnamed here: a seccomp listener is already installed above the worker"
                ) && !ran.stderr.contains("the sandbox refused system call"),
                "{tier} {what}: {}",
                ran.stderr
            );
        }
        let args = [
            "run",
            "hostile",
            "--plugins",
            ".",
            "--prompt",
            "fail-after-ptrace",
        ];
        let failed = run_under_a_listener(&dir, &args).expect("installed for the runs above");
        assert!(
            !failed.ok && !failed.stderr.contains("the sandbox refused system calls"),
            "{tier}: {}",
            failed.stderr
        );
    }
}

/// A host service's socket (mode 0777, as a system bus's is) is out of reach from `medium` up:
/// the worker's `/run` is an empty one of its own. At `low` it is reached, which shows the test
/// reaches it.
#[test]
fn host_sockets_under_run_are_out_of_reach_from_medium() {
    if !confinement_available() {
        return;
    }
    let folder = std::path::PathBuf::from(format!("/run/pio-test-{}", std::process::id()));
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = folder.join("bus");
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
    let what = format!("unix-connect {}", path.display());
    let low = attack(&crate::worker::hostile_low_dir(), &what).stdout;
    let medium = attack(&medium_dir(), &what).stdout;
    let high = attack(&tier_dir("high"), &what).stdout;
    drop(listener);
    let _ = std::fs::remove_dir_all(&folder);
    assert!(low.contains("connected"), "{low}");
    for out in [medium, high] {
        assert!(out.contains("denied"), "{out}");
    }
}

/// A model folder named through a link into `/run` (`/var/run` is one) stays in the view of a
/// `medium` worker, whose `/run` is an empty one of its own: paths reach the plan canonical
/// (`launch`), so it is bound back where it really is.
#[test]
fn a_model_folder_under_var_run_is_bound_back() {
    if !confinement_available() || !std::path::Path::new("/var/run").is_symlink() {
        return;
    }
    let model = format!("/var/run/pio-test-{}/model", std::process::id());
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(format!("{model}/config.json"), "{}").unwrap();
    for dir in [model.as_str(), model.trim_end_matches("/model")] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let dir = tier_dir("medium");
    let manifest = std::fs::read_to_string(dir.path().join("hostile.toml")).unwrap();
    dir.write(
        "hostile.toml",
        &manifest.replace("path = \"model\"", &format!("path = \"{model}\"")),
    );
    let out = attack(&dir, &format!("read {model}/config.json")).stdout;
    let _ = std::fs::remove_dir_all(model.trim_end_matches("/model"));
    assert!(out.contains("read 2 bytes"), "{out}");
}
