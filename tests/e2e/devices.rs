//! The worker's own `/dev` from `medium` up: the harmless devices and its GPU's nodes, nothing
//! else of the host's, and no device node anywhere else it can open. The GPU case runs without a
//! GPU: pio runs with `/dev` replaced by one holding fake NVIDIA nodes (the driver's numbers, no
//! driver behind them) and the driver's list of GPUs faked too, so a node the worker may open
//! answers "no such device" and one it may not does not exist for it.

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;

use crate::medium::{attack, tier_dir};
use crate::support::*;
use crate::worker::{confinement_available, Ran};

/// What a worker without a GPU finds in its `/dev`.
const HARMLESS: &str = "fd full null random stderr stdin stdout urandom zero";

/// A folder in the host's `/dev/shm` (a mount the worker's `/dev` covers), writable by anyone
/// there, so that only the worker's view refuses a write; `None` without `/dev/shm`.
fn shared_memory_dir() -> Option<tempfile::TempDir> {
    let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("skipped: no /dev/shm here");
        return None;
    };
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    Some(dir)
}

/// Rewrites the hostile plugin's manifest in `dir` through `change`.
fn edit_manifest(dir: &PluginDir, change: impl FnOnce(&str) -> String) {
    let text = std::fs::read_to_string(dir.path().join("hostile.toml")).unwrap();
    dir.write("hostile.toml", &change(&text));
}

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
        let run = |what: &str| attack(&dir, what).stdout.trim().to_string();
        assert_eq!(run("write /dev/null"), "wrote", "{tier}");
        for device in ["zero", "random", "urandom", "full"] {
            assert_eq!(
                run(&format!("peek /dev/{device}")),
                "peeked 8 bytes",
                "{tier}"
            );
        }
        assert!(run("write /dev/full").contains("No space left"), "{tier}");
        let made = run("write /dev/new-node");
        assert!(made.starts_with("denied:"), "{tier}: {made}");
        assert_eq!(
            run("read /dev/stdin"),
            "read 0 bytes",
            "{tier}: the links lead to the worker's own descriptors"
        );
        if let Some(node) = host_only_node() {
            let out = run(&format!("peek {node}"));
            assert!(out.contains("No such file"), "{tier}: {node}: {out}");
        }
    }
}

/// Makes a character device node `number` at `path`, mode 0666; `false` where this host refuses
/// (in a user namespace, say), after saying the test is skipped.
fn make_node(path: &std::path::Path, number: libc::dev_t) -> bool {
    let name = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a plain system call on a NUL-terminated path.
    let made = unsafe { libc::mknod(name.as_ptr(), libc::S_IFCHR, number) };
    if made != 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "mknod: {e}");
        eprintln!("skipped: device nodes cannot be made here ({e})");
        return false;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).unwrap();
    true
}

/// A device node elsewhere on the host's tree (here in the model folder, as in a container's
/// root file system) does not open: every mount the worker reaches is `nodev`.
#[test]
fn device_nodes_outside_the_workers_dev_do_not_open() {
    if !confinement_available() {
        return;
    }
    for tier in ["medium", "high"] {
        let dir = tier_dir(tier);
        let node = dir.path().join("model/zero");
        if !make_node(&node, libc::makedev(1, 5)) {
            return;
        }
        let opens = std::fs::File::open(&node)
            .and_then(|mut f| std::io::Read::read(&mut f, &mut [0u8; 8]))
            .is_ok();
        if !opens {
            eprintln!("skipped: {} is on a nodev mount here", node.display());
            continue;
        }
        let out = attack(&dir, &format!("peek {}", node.display())).stdout;
        assert!(out.contains("Permission denied"), "{tier}: {out}");
    }
}

/// A model kept under `/dev/shm` (a tmpfs of its own, hidden by the worker's `/dev`) is bound
/// back, read-only.
#[test]
fn a_model_under_dev_shm_stays_readable() {
    if !confinement_available() {
        return;
    }
    let Some(shm) = shared_memory_dir() else {
        return;
    };
    std::fs::write(shm.path().join("config.json"), "{}").unwrap();
    for tier in ["medium", "high"] {
        let dir = tier_dir(tier);
        edit_manifest(&dir, |text| {
            text.replace("path = \"model\"", &format!("path = {:?}", shm.path()))
        });
        let run = |what: &str| attack(&dir, what).stdout.trim().to_string();
        let config = shm.path().join("config.json");
        assert_eq!(
            run(&format!("read {}", config.display())),
            "read 2 bytes",
            "{tier}"
        );
        let out = run(&format!("write {}/new", shm.path().display()));
        let refusal = if tier == "medium" {
            "Read-only file system"
        } else {
            "denied:"
        };
        assert!(out.contains(refusal), "{tier}: {out}");
    }
}

/// Started from a folder the view covers (here in the host's `/dev/shm`, writable by anyone),
/// the worker cannot write there through a relative path: it works from `/`.
#[test]
fn the_working_directory_is_left_behind() {
    if !confinement_available() {
        return;
    }
    let Some(cwd) = shared_memory_dir() else {
        return;
    };
    let dir = tier_dir("medium");
    let plugins = dir.path().to_str().unwrap();
    let args = [
        "run",
        "hostile",
        "--plugins",
        plugins,
        "--prompt",
        "write stray-file",
    ];
    let ran: Ran = pio(cwd.path(), &args).into();
    assert!(ran.ok, "{}", ran.stderr);
    assert!(
        ran.stdout.contains("Read-only file system"),
        "{}",
        ran.stdout
    );
    assert!(!cwd.path().join("stray-file").exists());
}

/// The fake `/dev`: the harmless devices (the kernel's numbers), NVIDIA nodes for the GPUs
/// whose minors are 0 and 1, the control node and unified memory's (its major is the driver's
/// choice; no driver answers at any).
const FAKE_DEV: &[(&str, u32, u32)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("nvidia0", 195, 0),
    ("nvidia1", 195, 1),
    ("nvidiactl", 195, 255),
    ("nvidia-uvm", 510, 0),
];

/// The fake driver's list: the GPU on the later bus has minor 0, so CUDA's `cuda:1` (ordinals
/// follow the bus) is `/dev/nvidia0`.
const FAKE_GPUS: &[(&str, u32)] = &[("0000:01:00.0", 1), ("0000:02:00.0", 0)];

/// Runs `pio args` in `dir` in a mount namespace of its own whose `/dev` is [`FAKE_DEV`] and
/// whose `/proc/driver/nvidia/gpus` lists [`FAKE_GPUS`].
fn run_with_fake_gpus(dir: &PluginDir, args: &[&str]) -> Ran {
    let c = |s: String| CString::new(s).unwrap();
    let nodes: Vec<(CString, libc::dev_t)> = FAKE_DEV
        .iter()
        .map(|&(name, major, minor)| (c(format!("/dev/{name}")), libc::makedev(major, minor)))
        .collect();
    let mut folders = vec![
        c("/proc/driver/nvidia".into()),
        c("/proc/driver/nvidia/gpus".into()),
    ];
    let mut files = Vec::new();
    for (bus, minor) in FAKE_GPUS {
        let gpu = format!("/proc/driver/nvidia/gpus/{bus}");
        folders.push(c(gpu.clone()));
        let text = format!("Model: \t\t Fake\nBus Location: \t {bus}\nDevice Minor: \t {minor}\n");
        files.push((c(format!("{gpu}/information")), text.into_bytes()));
    }
    // SAFETY: `setup` makes system calls only, on NUL-terminated paths and buffers made before
    // the fork and moved into it.
    let ran = unsafe {
        pio_in_own_mounts(dir.path(), args, move || {
            // The nodes' modes as given; pio gets the umask it had.
            let umask = libc::umask(0);
            let tmpfs = c"tmpfs".as_ptr();
            for at in [c"/dev".as_ptr(), c"/proc/driver".as_ptr()] {
                let options = c"mode=0755".as_ptr().cast();
                os(libc::mount(tmpfs, at, tmpfs, libc::MS_NOSUID, options))?;
            }
            for (path, number) in &nodes {
                os(libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o666, *number))?;
            }
            for folder in &folders {
                os(libc::mkdir(folder.as_ptr(), 0o755))?;
            }
            for (path, text) in &files {
                let flags = libc::O_CREAT | libc::O_WRONLY;
                let fd = os(libc::open(path.as_ptr(), flags, 0o644))?;
                let written = libc::write(fd, text.as_ptr().cast(), text.len());
                libc::close(fd);
                os(written as libc::c_int)?;
            }
            libc::umask(umask);
            Ok(())
        })
    };
    ran.into()
}

/// A plugin directory with the hostile plugin at `tier` on `device`.
fn gpu_dir(tier: &str, device: &str) -> PluginDir {
    let dir = tier_dir(tier);
    edit_manifest(&dir, |text| format!("{text}device = \"{device}\"\n"));
    dir
}

/// A worker on `cuda:1` at `medium` and `high` finds that GPU's node (by the driver's list, as
/// the host sees it), the control and unified-memory nodes, not the other GPU's, and is told to
/// load on device 0: the only GPU CUDA will count there. A GPU the driver does not list is
/// refused, saying how many CUDA counts.
#[test]
fn a_gpu_worker_finds_its_own_gpu_nodes_only() {
    if !confinement_available() {
        return;
    }
    if std::path::Path::new("/proc/driver/nvidia").exists() {
        eprintln!("skipped: an NVIDIA driver is loaded; its GPUs would not match the fake nodes");
        return;
    }
    let probe = tempfile::tempdir().unwrap();
    if !make_node(&probe.path().join("zero"), libc::makedev(1, 5)) {
        return;
    }
    for tier in ["medium", "high"] {
        let dir = gpu_dir(tier, "cuda:1");
        let run = |what: &str| {
            let args = ["run", "hostile", "--plugins", ".", "--prompt", what];
            let ran = run_with_fake_gpus(&dir, &args);
            assert!(ran.ok, "{tier}: {what}: {}", ran.stderr);
            ran.stdout.trim().to_string()
        };
        if tier == "medium" {
            let listed = run("list /dev");
            assert_eq!(
                listed,
                "listed fd full null nvidia-uvm nvidia0 nvidiactl random stderr stdin stdout urandom zero"
            );
        }
        for node in ["/dev/nvidia0", "/dev/nvidiactl"] {
            let out = run(&format!("peek {node}"));
            assert!(out.contains("No such device"), "{tier}: {node}: {out}");
        }
        let out = run("peek /dev/nvidia1");
        assert!(out.contains("No such file"), "{tier}: {out}");
        assert_eq!(run("device"), "device cuda:0", "{tier}");
        let args = ["run", "hostile", "--plugins", ".", "--prompt", "device"];
        let absent = run_with_fake_gpus(&gpu_dir(tier, "cuda:5"), &args);
        assert!(!absent.ok, "{tier}: {}", absent.stdout);
        assert!(
            absent
                .stderr
                .contains("`cuda:5` names no GPU on this host: CUDA counts 2 here"),
            "{tier}: {}",
            absent.stderr
        );
    }
}
