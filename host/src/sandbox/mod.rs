//! Confinement of worker processes by trust tier. Planning is pure: [`plan`] turns a tier, the
//! resolved limits and what the host can do into a [`Plan`] (data, unit-tested); the effects live
//! in [`cgroup`] (host side, before the worker runs plugin code) and [`confine`] (worker side,
//! still single-threaded, before it loads the library).
//!
//! Never less confined than asked: when the host lacks a mechanism the tier needs, planning fails
//! with a clear error unless the operator allowed a downgrade, and then the plan records the tier
//! actually applied.

pub mod cgroup;
pub mod confine;
mod namespaces;
mod seccomp;

use serde::{Deserialize, Serialize};

pub use crate::manifest::Tier;

/// Resource limits, resolved from the manifest and the daemon's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResolvedLimits {
    /// RAM in bytes (swap is capped at the same total: no swap on top).
    pub memory_bytes: Option<u64>,
    /// CPU cores' worth of time.
    pub cpus: Option<f64>,
    /// Processes plus threads.
    pub pids: Option<u32>,
    /// GPU memory the plugin's allocator may take (handed to the plugin; not a kernel limit).
    pub gpu_memory_bytes: Option<u64>,
    /// Scratch directory size, and the largest file the worker may write.
    pub scratch_bytes: Option<u64>,
    /// Whether the worker may use the network.
    pub network: bool,
}

/// What the host is able to enforce, detected once at start.
#[derive(Debug, Clone, PartialEq)]
pub struct HostSupport {
    /// Running as root (needed to change the worker's uid).
    pub root: bool,
    /// Which cgroup hierarchy can be written, if any.
    pub cgroups: Option<cgroup::Version>,
    /// The kernel filters system calls (seccomp).
    pub seccomp: bool,
}

impl HostSupport {
    /// Looks at the running system.
    pub fn detect() -> Self {
        Self {
            root: nix::unistd::geteuid().is_root(),
            cgroups: cgroup::Version::detect_writable(),
            seccomp: std::fs::read_to_string("/proc/self/status")
                .is_ok_and(|s| s.contains("\nSeccomp:")),
        }
    }
}

/// The operator's sandbox policy (daemon config and CLI flags).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Every plugin runs at least at this tier.
    pub min_tier: Tier,
    /// Start a plugin less confined than asked (with a warning) when the host lacks a mechanism.
    pub allow_downgrade: bool,
    /// The unprivileged uid and gid workers run as.
    pub worker_uid: u32,
    /// See `worker_uid`.
    pub worker_gid: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            min_tier: Tier::Low,
            allow_downgrade: false,
            // `nobody`: owns nothing, so a worker can read only what is world-readable.
            worker_uid: 65534,
            worker_gid: 65534,
        }
    }
}

/// How one worker is confined: computed by the host, applied by the host (cgroups) and by the
/// worker itself (everything else).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The tier asked for (manifest, raised to the policy's minimum).
    pub requested: Tier,
    /// The tier applied; lower than `requested` only after an allowed downgrade.
    pub applied: Tier,
    /// Why the applied tier is lower, for `pio list` and the logs.
    pub downgrade_reason: Option<String>,
    /// Switch to this (uid, gid) and drop supplementary groups.
    pub drop_to: Option<(u32, u32)>,
    /// Resource limits (cgroup and rlimits).
    pub limits: ResolvedLimits,
    /// Put the worker in its own cgroup with the limits.
    pub cgroup: bool,
    /// `medium` and up: namespaces, a private read-only view of the file system with a
    /// size-capped scratch, no capabilities, a seccomp deny-list.
    pub isolation: Option<Isolation>,
}

/// The `medium` tier's mechanisms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Isolation {
    /// Size of the private tmpfs mounted at the worker's `/tmp`, its only writable place.
    pub scratch_bytes: u64,
    /// Paths the worker must still read (its library, the model folder): those under `/tmp`
    /// are bound into the private `/tmp`, read-only like everything else.
    pub keep_visible: Vec<std::path::PathBuf>,
}

/// Scratch size when the manifest and the daemon set none.
pub const DEFAULT_SCRATCH_BYTES: u64 = 64 << 20;

/// Why a worker cannot be confined as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("plugin {plugin} asks for tier `{tier}`, but {missing}; fix that, pick a lower tier in its manifest, or set allow_downgrade to run it less confined")]
pub struct PlanError {
    /// The plugin.
    pub plugin: String,
    /// The tier that cannot be had.
    pub tier: Tier,
    /// What is missing, as a clause.
    pub missing: String,
}

/// What each tier needs that this host may lack; `None` when it has everything for `tier`.
fn missing_for(tier: Tier, host: &HostSupport) -> Option<String> {
    if !host.root {
        return Some("the host is not running as root, so it can neither create cgroups nor switch the worker to an unprivileged uid".into());
    }
    if host.cgroups.is_none() {
        return Some("no writable cgroup hierarchy was found under /sys/fs/cgroup".into());
    }
    if tier >= Tier::Medium && !host.seccomp {
        return Some("the kernel has no seccomp support".into());
    }
    if tier > Tier::Medium {
        return Some(format!(
            "this build of PIO does not yet implement the `{tier}` tier's mechanisms (user namespace, Landlock, seccomp allow-list)"
        ));
    }
    None
}

/// Plans the confinement of `plugin`, asked to run at `tier` with `limits`.
pub fn plan(
    plugin: &str,
    tier: Tier,
    limits: ResolvedLimits,
    policy: &Policy,
    host: &HostSupport,
) -> Result<Plan, PlanError> {
    let requested = tier.max(policy.min_tier);
    let mut applied = requested;
    let mut downgrade_reason = None;
    if let Some(missing) = missing_for(requested, host) {
        if !policy.allow_downgrade {
            return Err(PlanError {
                plugin: plugin.to_string(),
                tier: requested,
                missing,
            });
        }
        // The best tier this host can give; below `low` there is only "unconfined", recorded
        // as `low` with the reason.
        applied = [Tier::Maximum, Tier::High, Tier::Medium, Tier::Low]
            .into_iter()
            .filter(|t| *t <= requested)
            .find(|t| missing_for(*t, host).is_none())
            .unwrap_or(Tier::Low);
        downgrade_reason = Some(missing);
    }
    Ok(Plan {
        requested,
        applied,
        downgrade_reason,
        drop_to: host.root.then_some((policy.worker_uid, policy.worker_gid)),
        isolation: (applied >= Tier::Medium).then(|| Isolation {
            scratch_bytes: limits.scratch_bytes.unwrap_or(DEFAULT_SCRATCH_BYTES),
            keep_visible: Vec::new(),
        }),
        limits,
        cgroup: host.root && host.cgroups.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(root: bool, cgroups: bool) -> HostSupport {
        HostSupport {
            root,
            cgroups: cgroups.then_some(cgroup::Version::V2),
            seccomp: true,
        }
    }

    #[test]
    fn low_on_a_capable_host_is_applied_as_asked() {
        let p = plan(
            "p",
            Tier::Low,
            ResolvedLimits::default(),
            &Policy::default(),
            &host(true, true),
        )
        .unwrap();
        assert_eq!((p.requested, p.applied), (Tier::Low, Tier::Low));
        assert_eq!(p.drop_to, Some((65534, 65534)));
        assert!(p.cgroup && p.downgrade_reason.is_none());
    }

    #[test]
    fn min_tier_raises_the_manifest_tier() {
        let policy = Policy {
            min_tier: Tier::High,
            allow_downgrade: true,
            ..Policy::default()
        };
        let p = plan(
            "p",
            Tier::Low,
            ResolvedLimits::default(),
            &policy,
            &host(true, true),
        )
        .unwrap();
        assert_eq!(p.requested, Tier::High);
    }

    #[test]
    fn a_missing_mechanism_refuses_unless_downgrade_is_allowed() {
        let e = plan(
            "p",
            Tier::Low,
            ResolvedLimits::default(),
            &Policy::default(),
            &host(false, true),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not running as root"), "{e}");
        assert!(e.to_string().contains("allow_downgrade"), "{e}");

        let policy = Policy {
            allow_downgrade: true,
            ..Policy::default()
        };
        let p = plan(
            "p",
            Tier::High,
            ResolvedLimits::default(),
            &policy,
            &host(true, true),
        )
        .unwrap();
        assert_eq!((p.requested, p.applied), (Tier::High, Tier::Medium));
        assert!(p.downgrade_reason.unwrap().contains("high"));
        assert!(p.isolation.is_some(), "the medium mechanisms still apply");
        let no_seccomp = HostSupport {
            seccomp: false,
            ..host(true, true)
        };
        let p = plan(
            "p",
            Tier::Medium,
            ResolvedLimits::default(),
            &policy,
            &no_seccomp,
        )
        .unwrap();
        assert_eq!((p.applied, p.isolation), (Tier::Low, None));
    }

    #[test]
    fn medium_isolates_with_a_default_scratch() {
        let p = plan(
            "p",
            Tier::Medium,
            ResolvedLimits::default(),
            &Policy::default(),
            &host(true, true),
        )
        .unwrap();
        assert_eq!(p.isolation.unwrap().scratch_bytes, DEFAULT_SCRATCH_BYTES);
        let p = plan(
            "p",
            Tier::Low,
            ResolvedLimits::default(),
            &Policy::default(),
            &host(true, true),
        )
        .unwrap();
        assert_eq!(p.isolation, None);
    }

    #[test]
    fn unimplemented_tiers_are_refused_not_silently_weakened() {
        let e = plan(
            "p",
            Tier::Maximum,
            ResolvedLimits::default(),
            &Policy::default(),
            &host(true, true),
        )
        .unwrap_err();
        assert_eq!(e.tier, Tier::Maximum);
    }
}
