//! What the memory limit of the cgroup tree the workers' groups are made in leaves: a
//! container's, whose limit `/proc/meminfo` does not show.

use std::path::Path;

use super::delegation::base;
use super::v1_limit;

/// What the limit of the cgroup tree the workers' groups are made in leaves (`/sys/fs/cgroup`,
/// or a delegated service's own group), in bytes (see [`headroom_at`]).
pub fn headroom() -> Option<u64> {
    headroom_at(base())
}

/// What the limit of the cgroup tree at `root` leaves (v2: `memory.max`; v1: the memory
/// hierarchy's `memory.limit_in_bytes`), counting its inactive page cache as free; `None` without
/// a limit (the real root, or no limit set).
pub(super) fn headroom_at(root: &Path) -> Option<u64> {
    let read = |p: &Path| std::fs::read_to_string(p).ok();
    if let Some(max) = read(&root.join("memory.max")) {
        let current = read(&root.join("memory.current"))?;
        let stat = read(&root.join("memory.stat")).unwrap_or_default();
        return left(max.trim().parse().ok(), &current, &stat, "inactive_file");
    }
    let v1 = root.join("memory");
    let limit = read(&v1.join("memory.limit_in_bytes"))?;
    let usage = read(&v1.join("memory.usage_in_bytes"))?;
    let stat = read(&v1.join("memory.stat")).unwrap_or_default();
    let limit = v1_limit(limit.trim().parse().ok());
    left(limit, &usage, &stat, "total_inactive_file")
}

/// `limit` (`None`: no limit) less `usage` plus the `cache` line of `stat` (reclaimable), from
/// the files' texts.
fn left(limit: Option<u64>, usage: &str, stat: &str, cache: &str) -> Option<u64> {
    let limit = limit?;
    let usage: u64 = usage.trim().parse().ok()?;
    let reclaimable: u64 = stat
        .lines()
        .find_map(|l| {
            l.strip_prefix(cache)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0);
    Some(limit.saturating_sub(usage.saturating_sub(reclaimable)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A container's limit leaves its limit less what it holds, its inactive page cache counted
    /// free; no limit (v2's `max`, v1's "unlimited") leaves the host's figure alone.
    #[test]
    fn a_containers_limit_bounds_the_headroom() {
        let gib = 1u64 << 30;
        let stat = format!("anon 100\ninactive_file {}\nactive_file 5\n", 2 * gib);
        let room = left(
            Some(20 * gib),
            &format!("{}\n", 12 * gib),
            &stat,
            "inactive_file",
        );
        assert_eq!(room, Some(10 * gib));
        assert_eq!(left(None, "5\n", "", "inactive_file"), None);
        assert_eq!(
            left(Some(gib), &(3 * gib).to_string(), "", "x"),
            Some(0),
            "over its limit"
        );

        let tree = tempfile::tempdir().unwrap();
        std::fs::write(tree.path().join("memory.max"), format!("{}\n", 8 * gib)).unwrap();
        std::fs::write(tree.path().join("memory.current"), format!("{}\n", 3 * gib)).unwrap();
        std::fs::write(
            tree.path().join("memory.stat"),
            format!("inactive_file {gib}\n"),
        )
        .unwrap();
        assert_eq!(headroom_at(tree.path()), Some(6 * gib), "v2");
        std::fs::write(tree.path().join("memory.max"), "max\n").unwrap();
        assert_eq!(headroom_at(tree.path()), None, "v2 without a limit");
        let v1 = tempfile::tempdir().unwrap();
        let memory = v1.path().join("memory");
        std::fs::create_dir(&memory).unwrap();
        std::fs::write(
            memory.join("memory.limit_in_bytes"),
            format!("{}\n", 4 * gib),
        )
        .unwrap();
        std::fs::write(memory.join("memory.usage_in_bytes"), format!("{}\n", gib)).unwrap();
        std::fs::write(
            memory.join("memory.stat"),
            "inactive_file 7\ntotal_inactive_file 0\n",
        )
        .unwrap();
        assert_eq!(
            headroom_at(v1.path()),
            Some(3 * gib),
            "v1 reads the tree's total"
        );
        std::fs::write(
            memory.join("memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        assert_eq!(headroom_at(v1.path()), None, "v1's unlimited");
    }
}
