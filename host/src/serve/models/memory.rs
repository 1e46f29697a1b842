//! How much memory a second worker could have beside the running one (for `auto` reloads): the
//! host's `MemAvailable`, within the limit of the cgroup tree the workers' groups are made in —
//! a container's, whose limit `/proc/meminfo` does not show.

/// The memory that is free to use, in bytes: the host's, and (where the cgroup hierarchy at
/// `/sys/fs/cgroup` has a limit, as a container's has) what that limit leaves. `None` when
/// neither can be read.
pub(super) fn memory_available() -> Option<u64> {
    let host = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| meminfo_available(&t));
    let tree = crate::sandbox::cgroup::headroom::headroom();
    match (host, tree) {
        (Some(h), Some(t)) => Some(h.min(t)),
        (h, t) => h.or(t),
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn meminfo_available(text: &str) -> Option<u64> {
    let line = text.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib << 10)
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
}
