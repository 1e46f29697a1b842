//! Where the workers' groups live: under the hierarchy's root, or, on the unified hierarchy,
//! under the daemon's own cgroup when its service manager delegated that group to it (systemd's
//! `Delegate=yes`). There the unit's accounting and limits (`MemoryMax=`) cover the workers,
//! `systemctl status` lists them, and pio makes no group outside the subtree systemd gave it.

use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::ROOT;

/// The attributes systemd (v251 and later) sets on a cgroup it delegated: `trusted.` from the
/// system manager, `user.` from a user's.
const DELEGATE: [&CStr; 2] = [c"trusted.delegate", c"user.delegate"];

/// The directory the `pio/` parent of every worker's group is made in (see the module's doc),
/// decided once: before the daemon moves into a leaf of its own cgroup, which is not marked.
pub(crate) fn base() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok();
        let base = base_at(
            Path::new(ROOT),
            own.as_deref().and_then(unified_path),
            delegated,
        );
        if base != Path::new(ROOT) {
            tracing::info!(
                "workers' cgroups go under {}/pio: the daemon's own cgroup, delegated to it",
                base.display()
            );
        }
        base
    })
}

/// The base under `root` for a daemon in the unified cgroup `own` (relative to `root`): that
/// group when `root` is a v2 hierarchy and `is_delegated` says the group is the daemon's to
/// manage; `root` otherwise.
fn base_at(root: &Path, own: Option<PathBuf>, is_delegated: impl Fn(&Path) -> bool) -> PathBuf {
    if !root.join("cgroup.controllers").is_file() {
        return root.to_path_buf();
    }
    match own.map(|own| root.join(own)) {
        Some(dir) if dir.is_dir() && is_delegated(&dir) => dir,
        _ => root.to_path_buf(),
    }
}

/// The unified hierarchy's path (its `0::` line, relative) in a `/proc/PID/cgroup` text; `None`
/// at the root or without that line.
fn unified_path(text: &str) -> Option<PathBuf> {
    let line = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let path = line.trim().trim_start_matches('/');
    (!path.is_empty() && !path.contains("..")).then(|| PathBuf::from(path))
}

/// Whether systemd marked the cgroup `dir` delegated.
fn delegated(dir: &Path) -> bool {
    DELEGATE
        .iter()
        .any(|name| crate::sandbox::xattr::get(dir, name, 8).is_some_and(|v| v == b"1"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unified_line_names_the_daemons_group() {
        let hybrid = "12:memory:/system.slice/pio.service\n0::/system.slice/pio.service\n";
        assert_eq!(
            unified_path(hybrid),
            Some(PathBuf::from("system.slice/pio.service"))
        );
        assert_eq!(unified_path("0::/\n"), None, "a namespace's root");
        assert_eq!(unified_path("4:memory:/x\n"), None, "v1 only");
    }

    /// A delegated group of a v2 tree is the base; an undelegated one, the root, or a v1 tree
    /// keep the root.
    #[test]
    fn workers_go_under_the_daemons_group_only_where_it_was_delegated() {
        let tree = tempfile::tempdir().unwrap();
        let root = tree.path();
        let unit = root.join("system.slice/pio.service");
        std::fs::create_dir_all(&unit).unwrap();
        let own = || Some(PathBuf::from("system.slice/pio.service"));
        assert_eq!(
            base_at(root, own(), |_| true),
            root,
            "v1: no cgroup.controllers"
        );
        std::fs::write(root.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        assert_eq!(base_at(root, own(), |d| d == unit), unit);
        assert_eq!(base_at(root, own(), |_| false), root);
        assert_eq!(base_at(root, None, |_| true), root);
        let gone = Some(PathBuf::from("system.slice/gone.service"));
        assert_eq!(
            base_at(root, gone, |_| true),
            root,
            "a group that is not there"
        );
    }

    /// systemd's mark is read from the group's attributes (`trusted.` needs root; skipped where
    /// the file system or the user cannot set it).
    #[test]
    fn systemds_delegation_mark_is_read() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!delegated(dir.path()));
        if crate::sandbox::xattr::set(dir.path(), DELEGATE[0], b"1").is_err() {
            eprintln!("skipped: cannot set trusted.delegate here");
            return;
        }
        assert!(delegated(dir.path()));
        crate::sandbox::xattr::set(dir.path(), DELEGATE[0], b"0").unwrap();
        assert!(!delegated(dir.path()));
    }
}
