//! Which uid a plugin's workers run as. By default each plugin has one of its own: the kernel
//! lets a process signal or trace another, and write its files, by uid alone, so workers sharing
//! one could kill each other (each kill buying a restart) and rewrite each other's quantization
//! caches, whatever their tiers.
//!
//! A plugin's uid is derived from its name (stable across restarts and hosts, so the folders it
//! owns stay its own), skipping the uids the user database names and those this user namespace
//! does not map (a rootless container maps 65536).

/// How the workers' uids are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerUsers {
    /// Every worker and probe runs as this uid (`sandbox.worker_uid` set).
    Shared(u32),
    /// Each plugin's workers run as a uid of this range (`sandbox.worker_uids`).
    PerPlugin(UidRange),
}

impl Default for WorkerUsers {
    fn default() -> Self {
        Self::PerPlugin(UidRange::DEFAULT)
    }
}

/// The name a probe of a bare library (no manifest, no plugin name yet) takes its uid from: no
/// plugin can be named so (names have no parentheses).
pub const UNNAMED_PROBE: &str = "(probe)";

/// How many uids past its own a plugin's is looked for, when taken.
const TRIES: u64 = 4096;

/// Why no uid could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no uid of sandbox.worker_uids {range} is free for plugin {plugin}: the {TRIES} tried are each a user the user database names, or not mapped in this user namespace (a rootless container maps 0-65535 only); set sandbox.worker_uids to a range of unused, mapped uids (e.g. \"100000-165535\", or \"60000-64999\" in a rootless container), or sandbox.worker_uid to run every worker as one uid")]
pub struct UsersError {
    /// The plugin.
    pub plugin: String,
    /// The range searched.
    pub range: UidRange,
}

impl WorkerUsers {
    /// The uid `plugin`'s workers run as.
    pub fn uid_for(&self, plugin: &str) -> Result<u32, UsersError> {
        self.pick(host_seed(), plugin, unavailable())
    }

    /// Of `others`, a plugin whose workers would run as `plugin`'s uid (two names hashing to
    /// one uid): they must not both run, or each could signal the other's workers.
    pub fn clash<'a>(
        &self,
        plugin: &str,
        others: impl IntoIterator<Item = &'a str>,
    ) -> Option<&'a str> {
        self.clash_with(host_seed(), plugin, others, unavailable())
    }

    /// [`Self::clash`] with the hash's `seed`, where `taken` says which uids cannot be had.
    pub fn clash_with<'a>(
        &self,
        seed: u64,
        plugin: &str,
        others: impl IntoIterator<Item = &'a str>,
        taken: impl Fn(u32) -> bool,
    ) -> Option<&'a str> {
        let Self::PerPlugin(_) = self else {
            return None;
        };
        let mine = self.pick(seed, plugin, &taken).ok()?;
        (others.into_iter()).find(|o| *o != plugin && self.pick(seed, o, &taken).ok() == Some(mine))
    }

    /// The uid `plugin`'s workers run as where `taken` says which uids cannot be had: its name's
    /// hash from `seed` into the range, else the next one free. Never the uid bare-library
    /// probes run as ([`UNNAMED_PROBE`]'s), which a plugin would share with unvetted code.
    pub fn pick(
        &self,
        seed: u64,
        plugin: &str,
        taken: impl Fn(u32) -> bool,
    ) -> Result<u32, UsersError> {
        let range = match self {
            Self::Shared(uid) => return Ok(*uid),
            Self::PerPlugin(range) => *range,
        };
        let free_from = |name: &str, taken: &dyn Fn(u32) -> bool| {
            let len = range.len();
            let start = fnv1a(seed, name.as_bytes()) % len;
            (0..TRIES.min(len))
                .map(|i| range.first + ((start + i) % len) as u32)
                .find(|&uid| uid != 65535 && !taken(uid))
        };
        // A range of one uid has none to spare for them.
        let probes = match plugin {
            UNNAMED_PROBE => None,
            _ if range.len() < 2 => None,
            _ => free_from(UNNAMED_PROBE, &taken),
        };
        free_from(plugin, &|uid| taken(uid) || Some(uid) == probes).ok_or_else(|| UsersError {
            plugin: plugin.to_string(),
            range,
        })
    }
}

/// The uids that cannot be had here: those the user database names, and those this user
/// namespace does not map.
fn unavailable() -> impl Fn(u32) -> bool {
    let mapped = mapped_uids();
    move |uid| {
        known_user(uid)
            || !mapped
                .iter()
                .any(|(first, len)| uid.wrapping_sub(*first) < *len)
    }
}

/// FNV-1a's offset basis: the seed of a hash that no host key changed.
pub const UNKEYED: u64 = 0xcbf2_9ce4_8422_2325;

/// The hash's seed on this host: its machine id folded in, so that a plugin name cannot be
/// picked elsewhere to land on another plugin's uid here (the id is stable, so each plugin's
/// uid is too); unkeyed where there is none (some containers).
fn host_seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| match std::fs::read_to_string("/etc/machine-id") {
        Ok(id) if !id.trim().is_empty() => fnv1a(UNKEYED, id.trim().as_bytes()),
        _ => UNKEYED,
    })
}

/// An inclusive range of uids, holding neither root's nor `(uid_t) -1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    first: u32,
    last: u32,
}

impl UidRange {
    /// 1879048192-2147352575: unused by Linux distributions and by systemd, whose container
    /// ranges end below it and whose foreign range starts above it.
    pub const DEFAULT: Self = Self {
        first: 0x7000_0000,
        last: 0x7FFD_FFFF,
    };

    /// Reads `FIRST-LAST` (inclusive).
    pub fn parse(text: &str) -> Result<Self, String> {
        let expected = || {
            format!("expected FIRST-LAST, two uids with FIRST no greater than LAST, neither 0 (root) nor 4294967295, e.g. \"{}\"; found {text:?}", Self::DEFAULT)
        };
        let (first, last) = text.split_once('-').ok_or_else(expected)?;
        let id = |s: &str| s.trim().parse::<u32>().map_err(|_| expected());
        let (first, last) = (id(first)?, id(last)?);
        if first == 0 || last == u32::MAX || first > last {
            return Err(expected());
        }
        Ok(Self { first, last })
    }

    /// The number of uids in it (at least one).
    fn len(&self) -> u64 {
        u64::from(self.last - self.first) + 1
    }

    /// Whether `uid` is in it.
    pub fn contains(&self, uid: u32) -> bool {
        (self.first..=self.last).contains(&uid)
    }
}

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// FNV-1a from `seed`: a fixed hash, the same in every build (std's is seeded per process).
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(seed, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Whether the user database names `uid`. A database that cannot be read counts as naming
/// it, except for the errors getpwuid_r's page allows for "not found" (some NSS modules).
fn known_user(uid: u32) -> bool {
    use nix::errno::Errno;
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(found) => found.is_some(),
        Err(Errno::ENOENT | Errno::ESRCH | Errno::EBADF | Errno::EPERM) => false,
        Err(_) => true,
    }
}

/// The uids this user namespace maps, as (first, count) pairs: everything where the map cannot
/// be read (no /proc).
fn mapped_uids() -> Vec<(u32, u32)> {
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => parse_uid_map(&map),
        Err(_) => vec![(0, u32::MAX)],
    }
}

/// The (first, count) pairs of a `uid_map`'s lines, as seen from inside it.
fn parse_uid_map(map: &str) -> Vec<(u32, u32)> {
    map.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace().map(|f| f.parse::<u32>().ok());
            let (inside, _outside, count) = (fields.next()??, fields.next()??, fields.next()??);
            Some((inside, count))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_plugin_has_its_own_stable_uid_in_the_range() {
        let users = WorkerUsers::default();
        let free = |_: u32| false;
        let a = users.pick(UNKEYED, "qwen3-4b", free).unwrap();
        let b = users.pick(UNKEYED, "glm-4.7-flash", free).unwrap();
        assert_ne!(a, b);
        assert!(UidRange::DEFAULT.contains(a) && UidRange::DEFAULT.contains(b));
        assert_eq!(users.pick(UNKEYED, "qwen3-4b", free).unwrap(), a, "stable");
        // Another host's key gives another uid: a name cannot be chosen elsewhere to land on
        // a given plugin's uid here.
        let keyed = fnv1a(UNKEYED, b"another machine id");
        assert_ne!(users.pick(keyed, "qwen3-4b", free).unwrap(), a);
        // Pinned: a change of hash would move every plugin's cache folder to another owner.
        assert_eq!(fnv1a(UNKEYED, b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn a_taken_uid_is_passed_over_and_a_full_range_is_an_error() {
        let users = WorkerUsers::PerPlugin(UidRange::parse("1000-1003").unwrap());
        let pick = |name: &str, taken: &dyn Fn(u32) -> bool| users.pick(UNKEYED, name, taken);
        let probes = pick(UNNAMED_PROBE, &|_| false).unwrap();
        let own = pick("echo", &|_| false).unwrap();
        assert_ne!(own, probes, "never the bare probes' uid");
        let next = pick("echo", &|uid| uid == own).unwrap();
        assert!(![own, probes].contains(&next) && (1000..=1003).contains(&next));
        let e = pick("echo", &|_| true).unwrap_err();
        assert!(e.to_string().contains("1000-1003") && e.to_string().contains("echo"));
        // 65535 is (uid_t) -1 to 16-bit programs: never handed out.
        let edge = WorkerUsers::PerPlugin(UidRange::parse("65535-65535").unwrap());
        assert!(edge.pick(UNKEYED, "echo", |_| false).is_err());
        assert_eq!(
            WorkerUsers::Shared(77).pick(UNKEYED, "echo", |_| true),
            Ok(77)
        );
        // A range of one uid serves a plugin (there is none to keep for probes).
        let one = WorkerUsers::PerPlugin(UidRange::parse("5000-5000").unwrap());
        assert_eq!(one.pick(UNKEYED, "echo", |_| false), Ok(5000));
    }

    /// Two names that hash to one uid are found; one shared uid for all is no clash.
    #[test]
    fn two_plugins_on_one_uid_are_found() {
        // Three uids, one kept for bare probes: names fall on the other two.
        let users = WorkerUsers::PerPlugin(UidRange::parse("1000-1002").unwrap());
        let free = |_: u32| false;
        let uid = |n: &str| users.pick(UNKEYED, n, free).unwrap();
        let names: Vec<String> = (0..8).map(|i| format!("model-{i}")).collect();
        let twin = (names[1..].iter())
            .find(|n| uid(n) == uid(&names[0]))
            .unwrap();
        let other = (names[1..].iter())
            .find(|n| uid(n) != uid(&names[0]))
            .unwrap();
        let others = [other.as_str(), names[0].as_str(), twin.as_str()];
        let clash = users.clash_with(UNKEYED, &names[0], others, free);
        assert_eq!(clash, Some(twin.as_str()));
        let apart = users.clash_with(UNKEYED, &names[0], [other.as_str()], free);
        assert_eq!(apart, None);
        let shared = WorkerUsers::Shared(5);
        assert_eq!(shared.clash_with(UNKEYED, "a", ["b"], free), None);
    }

    #[test]
    fn ranges_are_read_and_bad_ones_refused() {
        let r = UidRange::parse("100000-165535").unwrap();
        assert_eq!((r.len(), r.to_string()), (65536, "100000-165535".into()));
        for bad in ["", "5", "0-10", "10-5", "1-4294967295", "a-b", "1-2-3"] {
            let e = UidRange::parse(bad).unwrap_err();
            assert!(e.contains("FIRST-LAST"), "{bad}: {e}");
        }
        assert_eq!(
            UidRange::DEFAULT.to_string().parse::<String>().unwrap(),
            "1879048192-2147352575"
        );
    }

    #[test]
    fn the_namespace_map_is_read_as_seen_from_inside() {
        assert_eq!(
            parse_uid_map("         0          0 4294967295\n"),
            [(0, u32::MAX)]
        );
        assert_eq!(
            parse_uid_map("0 1000 1\n1 100000 65536\n"),
            [(0, 1), (1, 65536)]
        );
        assert!(parse_uid_map("garbage\n").is_empty());
    }

    #[test]
    fn the_user_database_names_root_and_this_machine_maps_the_default_range() {
        assert!(known_user(0));
        // Where the default range cannot be had the error says what to set instead.
        let users = WorkerUsers::default();
        match users.uid_for("echo") {
            Ok(uid) => assert!(UidRange::DEFAULT.contains(uid)),
            Err(e) => assert!(e.to_string().contains("sandbox.worker_uids")),
        }
    }
}
