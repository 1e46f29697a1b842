//! Confinement of worker processes by trust tier. Planning is pure: [`plan`] turns a tier, the
//! resolved limits and what the host can do into a [`Plan`] (data, unit-tested); the effects live
//! in [`cgroup`] (host side, before the worker runs plugin code) and [`confine`] (worker side,
//! still single-threaded, before it loads the library).
//!
//! Never less confined than asked: when the host lacks a mechanism the tier needs, planning fails
//! with a clear error unless the operator allowed a downgrade, and then the plan records the tier
//! actually applied.

mod access;
pub mod cgroup;
pub mod confine;
mod dev;
pub mod fence;
pub mod gpu;
mod namespaces;
pub mod readable;
pub mod refusals;
mod remount;
mod seccomp;
pub mod users;
mod xattr;

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
    /// Whether the worker may use the network: `None` is the tier's default (open at `low`,
    /// closed above); `Some(false)` closes it at `low` too; `Some(true)` needs `low`.
    pub network: Option<bool>,
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
    /// Unprivileged user namespaces can be created.
    pub user_namespaces: bool,
    /// The Landlock ABI version, 0 when Landlock is unavailable.
    pub landlock_abi: u32,
    /// The CPUs this process may run on (its affinity, a container's share); empty when unknown.
    pub allowed_cpus: Vec<usize>,
}

impl HostSupport {
    /// A host with every mechanism: what a plugin may still be refused for comes from its
    /// manifest alone (what `pio check` reports, wherever it runs).
    pub fn complete() -> Self {
        Self {
            root: true,
            cgroups: Some(cgroup::Version::V2),
            seccomp: true,
            user_namespaces: true,
            landlock_abi: 6,
            allowed_cpus: Vec::new(),
        }
    }

    /// Looks at the running system.
    pub fn detect() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        // SAFETY: landlock_create_ruleset with the VERSION flag only returns the ABI version.
        let landlock = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<u8>(),
                0usize,
                1u32,
            )
        };
        Self {
            root: nix::unistd::geteuid().is_root(),
            cgroups: cgroup::Version::detect_writable(),
            seccomp: read("/proc/self/status").contains("\nSeccomp:"),
            user_namespaces: read("/proc/sys/user/max_user_namespaces")
                .trim()
                .parse::<u64>()
                .is_ok_and(|n| n > 0)
                && read("/proc/sys/kernel/unprivileged_userns_clone").trim() != "0",
            landlock_abi: u32::try_from(landlock).unwrap_or(0),
            allowed_cpus: allowed_cpus(),
        }
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..nix::sched::CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect()
}

/// The cpuset of a worker given `cpus` CPUs: the first of those the daemon may use (a container
/// may hold CPUs 4-7 only, where `0-1` is refused), else the first `cpus` of the machine's.
fn cpuset(cpus: usize, allowed: &[usize]) -> String {
    match allowed {
        [] => format!("0-{}", cpus - 1),
        _ => (allowed.iter().take(cpus))
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(","),
    }
}

/// The operator's sandbox policy (daemon config and CLI flags).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Every plugin runs at least at this tier.
    pub min_tier: Tier,
    /// Start a plugin less confined than asked (with a warning) when the host lacks a mechanism.
    pub allow_downgrade: bool,
    /// The unprivileged uids workers run as: one per plugin, or one for all.
    pub users: users::WorkerUsers,
    /// The gid every worker runs as: files readable to it are readable to every plugin.
    pub worker_gid: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            min_tier: Tier::Low,
            allow_downgrade: false,
            users: users::WorkerUsers::default(),
            // `nogroup`: owns nothing, so a worker can read only what is world-readable.
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
    /// Whether the worker leaves the host's network for an empty namespace of its own (above
    /// `low`, isolation always gives it one).
    pub network: NetworkCut,
    /// `medium` and up: namespaces, a private read-only view of the file system with a
    /// size-capped scratch, no capabilities, seccomp.
    pub isolation: Option<Isolation>,
}

/// Whether a process's network is cut: moved into an empty network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetworkCut {
    /// The host's network stays (`low`'s default).
    Kept,
    /// Cut, or the process does not start (`low` with `network = false`, as root).
    Required,
    /// Cut where the kernel lets this user make the namespace — inside a user namespace of its
    /// own when not root — else kept (a library probe started by an unprivileged user).
    WherePossible,
}

/// Which system calls a worker may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Syscalls {
    /// Everything but a deny-list (EPERM, and named in the worker's log).
    DenyList,
    /// Only an allow-list; anything else fails with EPERM (and is named in the worker's log).
    AllowList,
    /// Only an allow-list; anything else kills the worker.
    AllowListKill,
}

/// The mechanisms of `medium` and the tiers above it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Isolation {
    /// Size of the private tmpfs mounted at the worker's `/tmp`, its only writable place.
    pub scratch_bytes: u64,
    /// Paths the worker must still read (its library, the model folder).
    pub keep_visible: Vec<std::path::PathBuf>,
    /// Folders the worker may write besides its scratch (a quantization cache): bound where
    /// they are, left writable, allowed by Landlock.
    #[serde(default)]
    pub writable: Vec<std::path::PathBuf>,
    /// The system-call filter.
    pub syscalls: Syscalls,
    /// `high`+: a user namespace mapping only the worker's own uid and gid.
    pub user_namespace: bool,
    /// `high`+: Landlock: read only the library, the model, system libraries; write only the
    /// scratch; no TCP; no signals or abstract sockets outside the sandbox.
    pub landlock: bool,
    /// `high`+: the devices cgroup (v1) allows only null, zero, full, random, urandom.
    pub devices: bool,
    /// `maximum`: the root is an empty tmpfs holding only the library and the model.
    pub empty_root: bool,
    /// `maximum`: pin the worker to these CPUs (cgroup cpuset), e.g. "0-1".
    pub cpuset: Option<String>,
    /// The GPU the worker may open: its nodes alone in the worker's `/dev` (`dev`), also
    /// through Landlock and the devices cgroup at `high`; inside, CUDA numbers it 0.
    #[serde(default)]
    pub gpu: Option<u32>,
}

/// Scratch size when the manifest and the daemon set none.
pub const DEFAULT_SCRATCH_BYTES: u64 = 64 << 20;

/// Why a worker cannot be confined as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("plugin {plugin} asks for tier `{tier}`, but {missing}; fix that, pick a lower tier in its manifest, or allow a downgrade (--allow-downgrade; allow_downgrade in the daemon config) to run it less confined")]
pub struct PlanError {
    /// The plugin.
    pub plugin: String,
    /// The tier that cannot be had.
    pub tier: Tier,
    /// What is missing, as a clause.
    pub missing: String,
}

/// What is being confined.
#[derive(Debug, Clone, PartialEq)]
pub struct Subject<'a> {
    /// The plugin's name.
    pub plugin: &'a str,
    /// The tier its manifest asks for.
    pub tier: Tier,
    /// Its resolved limits.
    pub limits: ResolvedLimits,
    /// Whether its manifest pins the library's sha256 (`maximum` requires it).
    pub pinned: bool,
    /// The NVIDIA GPU its model runs on (`[model] device = "cuda[:N]"`), if any.
    pub gpu: Option<u32>,
    /// The uid its workers run as (from [`Policy::users`]).
    pub uid: u32,
}

/// What each tier needs that this host (or the plugin) lacks; `None` when nothing is missing.
fn missing_for(tier: Tier, host: &HostSupport, subject: &Subject<'_>) -> Option<String> {
    if !host.root {
        return Some("the host is not running as root, so it can neither create cgroups nor switch the worker to an unprivileged uid".into());
    }
    if host.cgroups.is_none() {
        return Some("no writable cgroup hierarchy was found under /sys/fs/cgroup".into());
    }
    if tier >= Tier::Medium && !host.seccomp {
        return Some("the kernel has no seccomp support".into());
    }
    if tier >= Tier::High && !host.user_namespaces {
        return Some("the kernel does not allow unprivileged user namespaces (user.max_user_namespaces is 0)".into());
    }
    if tier >= Tier::High && host.landlock_abi == 0 {
        return Some(
            "the kernel has no Landlock (needs Linux 5.13+ with landlock in the lsm= list)".into(),
        );
    }
    if tier >= Tier::Medium && subject.limits.network == Some(true) {
        return Some("its manifest asks for network access, which only `low` gives".into());
    }
    if tier >= Tier::Maximum && !subject.pinned {
        return Some("its manifest pins no sha256 of the library, which `maximum` requires".into());
    }
    if tier >= Tier::Maximum && (subject.limits.gpu_memory_bytes.is_some() || subject.gpu.is_some())
    {
        return Some("GPU access at `maximum` needs a hardware-enforced cap (MIG or MPS), which PIO does not set up yet".into());
    }
    None
}

/// Plans the confinement of `subject`.
pub fn plan(subject: Subject<'_>, policy: &Policy, host: &HostSupport) -> Result<Plan, PlanError> {
    let requested = subject.tier.max(policy.min_tier);
    let mut applied = requested;
    let mut downgrade_reason = None;
    if let Some(missing) = missing_for(requested, host, &subject) {
        if !policy.allow_downgrade {
            return Err(PlanError {
                plugin: subject.plugin.to_string(),
                tier: requested,
                missing,
            });
        }
        // The best tier this host can give; below `low` there is only "unconfined", recorded
        // as `low` with the reason.
        applied = [Tier::Maximum, Tier::High, Tier::Medium, Tier::Low]
            .into_iter()
            .filter(|t| *t <= requested)
            .find(|t| missing_for(*t, host, &subject).is_none())
            .unwrap_or(Tier::Low);
        downgrade_reason = Some(missing);
    }
    let limits = subject.limits;
    let cpus = limits.cpus.map_or(1, |c| c.ceil().max(1.0) as usize);
    Ok(Plan {
        requested,
        applied,
        downgrade_reason,
        drop_to: host.root.then_some((subject.uid, policy.worker_gid)),
        isolation: (applied >= Tier::Medium).then(|| Isolation {
            scratch_bytes: limits.scratch_bytes.unwrap_or(DEFAULT_SCRATCH_BYTES),
            keep_visible: Vec::new(),
            writable: Vec::new(),
            syscalls: match applied {
                Tier::Maximum => Syscalls::AllowListKill,
                Tier::High => Syscalls::AllowList,
                _ => Syscalls::DenyList,
            },
            user_namespace: applied >= Tier::High,
            landlock: applied >= Tier::High,
            devices: applied >= Tier::High,
            empty_root: applied >= Tier::Maximum,
            cpuset: (applied >= Tier::Maximum).then(|| cpuset(cpus, &host.allowed_cpus)),
            gpu: subject.gpu,
        }),
        network: match applied == Tier::Low && limits.network == Some(false) && host.root {
            true => NetworkCut::Required,
            false => NetworkCut::Kept,
        },
        limits,
        cgroup: host.root && host.cgroups.is_some(),
    })
}

#[cfg(test)]
mod tests;
