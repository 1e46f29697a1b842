//! How much memory a second worker could have beside the running one (for `auto` reloads): the
//! host's `MemAvailable`, within the limit of the cgroup tree the workers' groups are made in —
//! a container's, whose limit `/proc/meminfo` does not show.

use std::path::Path;

/// The memory that is free to use, in bytes: the host's, and (where the cgroup hierarchy at
/// `/sys/fs/cgroup` has a limit, as a container's has) what that limit leaves. `None` when
/// neither can be read.
pub(super) fn memory_available() -> Option<u64> {
    let host = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| meminfo_available(&t));
    let tree = cgroup_headroom(Path::new("/sys/fs/cgroup"));
    match (host, tree) {
        (Some(h), Some(t)) => Some(h.min(t)),
        (h, t) => h.or(t),
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub(super) fn meminfo_available(text: &str) -> Option<u64> {
    let line = text.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib << 10)
}

/// What the limit of the cgroup tree at `root` leaves (v2: `memory.max`; v1: the memory
/// hierarchy's `memory.limit_in_bytes`), counting its inactive page cache as free; `None` without
/// a limit (the real root, or no limit set).
fn cgroup_headroom(root: &Path) -> Option<u64> {
    let read = |p: &Path| std::fs::read_to_string(p).ok();
    if let Some(max) = read(&root.join("memory.max")) {
        let current = read(&root.join("memory.current"))?;
        let stat = read(&root.join("memory.stat")).unwrap_or_default();
        return headroom(&max, &current, &stat, "inactive_file");
    }
    let v1 = root.join("memory");
    let limit = read(&v1.join("memory.limit_in_bytes"))?;
    let usage = read(&v1.join("memory.usage_in_bytes"))?;
    let stat = read(&v1.join("memory.stat")).unwrap_or_default();
    headroom(&limit, &usage, &stat, "total_inactive_file")
}

/// `limit` less `usage` plus the `cache` line of `stat` (reclaimable), from the files' texts;
/// `None` for no limit (`max`, or v1's near-2⁶³ "unlimited").
fn headroom(limit: &str, usage: &str, stat: &str, cache: &str) -> Option<u64> {
    let limit: u64 = limit.trim().parse().ok()?;
    if limit >= 1 << 60 {
        return None;
    }
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

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text =
            "MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(meminfo_available(text), Some(20_000_000 << 10));
        assert_eq!(meminfo_available("MemTotal: 1 kB\n"), None);
        assert!(memory_available().is_some(), "this Linux has /proc/meminfo");
    }

    /// A container's limit leaves its limit less what it holds, its inactive page cache counted
    /// free; no limit (v2's `max`, v1's "unlimited") leaves the host's figure alone.
    #[test]
    fn a_containers_limit_bounds_the_headroom() {
        let gib = 1u64 << 30;
        let stat = format!("anon 100\ninactive_file {}\nactive_file 5\n", 2 * gib);
        let room = headroom(
            &format!("{}\n", 20 * gib),
            &format!("{}\n", 12 * gib),
            &stat,
            "inactive_file",
        );
        assert_eq!(room, Some(10 * gib));
        assert_eq!(headroom("max\n", "5\n", "", "inactive_file"), None);
        assert_eq!(
            headroom("9223372036854771712\n", "5\n", "", "total_inactive_file"),
            None
        );
        assert_eq!(
            headroom(&gib.to_string(), &(3 * gib).to_string(), "", "x"),
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
        assert_eq!(cgroup_headroom(tree.path()), Some(6 * gib), "v2");
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
            cgroup_headroom(v1.path()),
            Some(3 * gib),
            "v1 reads the tree's total"
        );
    }
}
