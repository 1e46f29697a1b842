//! The worker's own `/dev` from `medium` up: the harmless devices and its GPU's nodes, nothing
//! else of the host's. The GPU case runs without a GPU: pio runs with `/dev` replaced by one
//! holding fake NVIDIA nodes (the driver's numbers, no driver behind them), so a node the worker
//! may open answers "no such device" and one it may not does not exist for it.

use std::ffi::CString;

use crate::medium::{attack, tier_dir};
use crate::support::*;
use crate::worker::{confinement_available, Ran};

/// What a worker without a GPU finds in its `/dev`.
const HARMLESS: &str = "fd full null random stderr stdin stdout urandom zero";

/// A world-openable node of the host's `/dev` that no worker needs, if this host has one.
fn host_only_node() -> Option<&'static str> {
    ["/dev/ptmx", "/dev/tty", "/dev/fuse", "/dev/net/tun"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

#[test]
fn a_worker_finds_the_harmless_devices_only() {
    if !confinement_available() {
        return;
    }
    let dir = tier_dir("medium");
    let listed = attack(&dir, "list /dev").stdout;
    assert_eq!(listed.trim(), format!("listed {HARMLESS}"));
    // `high` and `maximum` hide the listing (Landlock); each name is tried instead.
    for tier in ["medium", "high", "maximum"] {
        let dir = tier_dir(tier);
        let out = attack(&dir, "write /dev/null").stdout;
        assert_eq!(out.trim(), "wrote", "{tier}");
        assert_eq!(
            attack(&dir, "read /dev/stdin").stdout.trim(),
            "read 0 bytes",
            "{tier}: the links lead to the worker's own descriptors"
        );
        if let Some(node) = host_only_node() {
            let out = attack(&dir, &format!("read {node}")).stdout;
            assert!(out.contains("No such file"), "{tier}: {node}: {out}");
        }
    }
}

/// The fake `/dev`: the harmless devices (the kernel's numbers) and NVIDIA nodes for GPUs 0
/// and 1 and the control node.
const FAKE_DEV: &[(&str, u32, u32)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("nvidia0", 195, 0),
    ("nvidia1", 195, 1),
    ("nvidiactl", 195, 255),
];

/// Runs `pio args` in `dir` in a mount namespace of its own whose `/dev` is [`FAKE_DEV`].
fn run_with_fake_gpus(dir: &PluginDir, args: &[&str]) -> Ran {
    use std::os::unix::process::CommandExt;
    let nodes: Vec<(CString, libc::dev_t)> = FAKE_DEV
        .iter()
        .map(|&(name, major, minor)| {
            let path = CString::new(format!("/dev/{name}")).unwrap();
            (path, libc::makedev(major, minor))
        })
        .collect();
    let mut command = std::process::Command::new(pio_bin());
    command.current_dir(dir.path()).args(args);
    // SAFETY: between fork and exec only system calls run, on memory made before the fork that
    // outlives them (`nodes` lives until `output` returns).
    unsafe {
        command.pre_exec(move || {
            let none = std::ptr::null();
            let check = |r: libc::c_int| match r {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            };
            check(libc::unshare(libc::CLONE_NEWNS))?;
            let root = c"/".as_ptr();
            check(libc::mount(
                none,
                root,
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                none.cast(),
            ))?;
            let (tmpfs, dev) = (c"tmpfs".as_ptr(), c"/dev".as_ptr());
            check(libc::mount(
                tmpfs,
                dev,
                tmpfs,
                libc::MS_NOSUID,
                c"mode=0755".as_ptr().cast(),
            ))?;
            for (path, number) in &nodes {
                check(libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o666, *number))?;
            }
            Ok(())
        });
    }
    command.output().expect("run pio with fake GPUs").into()
}

/// A worker on GPU 1 at `medium` and `high` finds that GPU's node and the control node, not
/// GPU 0's, and is told to load on device 0: the only GPU CUDA will count there.
#[test]
fn a_gpu_worker_finds_its_own_gpu_nodes_only() {
    if !confinement_available() {
        return;
    }
    if std::path::Path::new("/proc/driver/nvidia").exists() {
        eprintln!("skipped: an NVIDIA driver is loaded; its GPUs would not match the fake nodes");
        return;
    }
    for tier in ["medium", "high"] {
        let dir = tier_dir(tier);
        let text = std::fs::read_to_string(dir.path().join("hostile.toml")).unwrap();
        dir.write("hostile.toml", &format!("{text}device = \"cuda:1\"\n"));
        let run = |what: &str| {
            let ran = run_with_fake_gpus(
                &dir,
                &["run", "hostile", "--plugins", ".", "--prompt", what],
            );
            assert!(ran.ok, "{tier}: {what}: {}", ran.stderr);
            ran.stdout.trim().to_string()
        };
        if tier == "medium" {
            assert_eq!(
                run("list /dev"),
                "listed fd full null nvidia1 nvidiactl random stderr stdin stdout urandom zero"
            );
        }
        for node in ["/dev/nvidia1", "/dev/nvidiactl"] {
            let out = run(&format!("read {node}"));
            assert!(out.contains("No such device"), "{tier}: {node}: {out}");
        }
        let out = run("read /dev/nvidia0");
        assert!(out.contains("No such file"), "{tier}: {out}");
        assert_eq!(run("device"), "device cuda:0", "{tier}");
    }
}
