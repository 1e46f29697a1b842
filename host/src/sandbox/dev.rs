//! The worker's `/dev` from `medium` up: a fresh tmpfs, read-only once the view is built, holding
//! the devices programs expect and, for a worker granted a GPU, that GPU's nodes. The host's
//! `/dev` stays out of sight: its world-writable nodes (the other GPUs' `/dev/nvidia*`,
//! `/dev/fuse`, `/dev/net/tun`, `/dev/ptmx`, render nodes) would be open to any uid.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};

use super::confine::ConfineError;
use super::namespaces::{bind, fail, open_all};

/// The devices every worker gets (by name under `/dev`).
pub const HARMLESS: &[&str] = &["null", "zero", "full", "random", "urandom"];

/// Links programs use (`/dev/stdin`, `/dev/fd/N`), into the worker's own `/proc`.
pub const LINKS: &[(&str, &str)] = &[
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];

/// The host's nodes a worker's `/dev` holds: the harmless ones, then `gpu_nodes` (its GPU's
/// nodes that exist, `gpu::present_nodes`).
pub fn nodes(gpu_nodes: &[PathBuf]) -> Vec<PathBuf> {
    HARMLESS
        .iter()
        .map(|name| Path::new("/dev").join(name))
        .chain(gpu_nodes.iter().cloned())
        .collect()
}

/// Handles on a worker's device nodes, taken while the host's `/dev` is still in view.
pub struct Devices(Vec<(PathBuf, OwnedFd)>);

impl Devices {
    /// Opens (`O_PATH`) each of `nodes`; one missing fails the worker, naming it.
    pub fn open(nodes: &[PathBuf]) -> Result<Self, ConfineError> {
        Ok(Devices(open_all(nodes)?))
    }

    /// Mounts a fresh tmpfs at `at` holding these devices, each at its path under `/dev`, and
    /// the links.
    pub fn mount_at(&self, at: &Path) -> Result<(), ConfineError> {
        let step = "mount the worker's /dev";
        std::fs::create_dir_all(at).map_err(|e| fail(step, e))?;
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            flags,
            Some("size=64k,mode=0755"),
        )
        .map_err(|e| fail(step, e))?;
        // Each node is a bind mount of its own, so the tmpfs's `nodev` does not reach it.
        for (path, fd) in &self.0 {
            let name = path.strip_prefix("/dev").map_err(|_| {
                fail(
                    step,
                    format!("{}: a device node outside /dev", path.display()),
                )
            })?;
            bind(fd, &at.join(name))?;
        }
        for (name, target) in LINKS {
            std::os::unix::fs::symlink(target, at.join(name))
                .map_err(|e| fail(step, format!("{name}: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_gets_the_harmless_devices_and_its_gpu_nodes_only() {
        let gpu = [
            PathBuf::from("/dev/nvidia1"),
            PathBuf::from("/dev/nvidiactl"),
        ];
        let all = nodes(&gpu);
        assert_eq!(all.len(), HARMLESS.len() + 2);
        assert!(all.contains(&PathBuf::from("/dev/null")));
        assert!(all.ends_with(&gpu));
        assert!(!all.contains(&PathBuf::from("/dev/nvidia0")));
        assert_eq!(nodes(&[]).len(), HARMLESS.len());
    }
}
