//! What a worker's cgroup enforces, as data: the file writes for cgroup v1 or v2. Pure, so the
//! hierarchy a machine lacks is still tested on what it would write.

use super::Version;
use crate::sandbox::ResolvedLimits;

/// CFS period for CPU quotas, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// A controller whose files a setting writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    /// Memory.
    Memory,
    /// CPU bandwidth.
    Cpu,
    /// Process count.
    Pids,
    /// Device access (v1 only; on v2 Landlock and the private /dev view stand in).
    Devices,
    /// CPU pinning.
    Cpuset,
}

/// What a worker's group enforces.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupSpec {
    /// Memory, CPU and pids limits.
    pub limits: ResolvedLimits,
    /// Allow only the harmless character devices (null, zero, full, random, urandom).
    pub devices: bool,
    /// Pin to these CPUs, e.g. "0-1".
    pub cpuset: Option<String>,
    /// Device rules allowed beside the harmless ones (a GPU's nodes, `sandbox::gpu`).
    pub extra_devices: Vec<String>,
}

/// Character devices a confined worker may open: null, zero, full, random, urandom.
const ALLOWED_DEVICES: [&str; 5] = [
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
];

/// One file write: `value` into `file` of the group's directory for `controller`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// Which controller's directory.
    pub controller: Controller,
    /// The control file.
    pub file: &'static str,
    /// What to write.
    pub value: String,
    /// Skip silently when the file does not exist (e.g. v1 swap accounting disabled).
    pub optional: bool,
}

fn setting(controller: Controller, file: &'static str, value: String) -> Setting {
    Setting {
        controller,
        file,
        value,
        optional: false,
    }
}

/// The writes that impose `spec` on `version`, in order.
pub fn settings(version: Version, spec: &GroupSpec) -> Vec<Setting> {
    let limits = &spec.limits;
    let mut out = Vec::new();
    if let Some(cpus) = &spec.cpuset {
        out.push(setting(Controller::Cpuset, "cpuset.cpus", cpus.clone()));
        // Memory nodes: the parent's (written when the parent is prepared).
        out.push(setting(Controller::Cpuset, "cpuset.mems", String::new()));
    }
    if spec.devices && version == Version::V1 {
        out.push(setting(Controller::Devices, "devices.deny", "a".into()));
        for device in ALLOWED_DEVICES {
            out.push(setting(Controller::Devices, "devices.allow", device.into()));
        }
        for device in &spec.extra_devices {
            out.push(setting(
                Controller::Devices,
                "devices.allow",
                device.clone(),
            ));
        }
    }
    let quota = limits
        .cpus
        .map(|cpus| ((cpus * CPU_PERIOD_US as f64).round() as u64).max(1000));
    match version {
        Version::V1 => v1_limits(&mut out, limits.memory_bytes, quota),
        Version::V2 => v2_limits(&mut out, limits.memory_bytes, quota),
    }
    if let Some(pids) = limits.pids {
        out.push(setting(Controller::Pids, "pids.max", pids.to_string()));
    }
    out
}

/// Memory (without swap on top) and CPU quota in cgroup v1's files.
fn v1_limits(out: &mut Vec<Setting>, memory_bytes: Option<u64>, quota: Option<u64>) {
    if let Some(bytes) = memory_bytes {
        out.push(setting(
            Controller::Memory,
            "memory.limit_in_bytes",
            bytes.to_string(),
        ));
        // memsw = memory + swap: equal to the memory limit means no swap on top.
        out.push(Setting {
            optional: true,
            ..setting(
                Controller::Memory,
                "memory.memsw.limit_in_bytes",
                bytes.to_string(),
            )
        });
    }
    if let Some(quota) = quota {
        out.push(setting(
            Controller::Cpu,
            "cpu.cfs_period_us",
            CPU_PERIOD_US.to_string(),
        ));
        out.push(setting(
            Controller::Cpu,
            "cpu.cfs_quota_us",
            quota.to_string(),
        ));
    }
}

/// Memory (no swap) and CPU quota in cgroup v2's files.
fn v2_limits(out: &mut Vec<Setting>, memory_bytes: Option<u64>, quota: Option<u64>) {
    if let Some(bytes) = memory_bytes {
        out.push(setting(Controller::Memory, "memory.max", bytes.to_string()));
        out.push(Setting {
            optional: true,
            ..setting(Controller::Memory, "memory.swap.max", "0".into())
        });
    }
    if let Some(quota) = quota {
        out.push(setting(
            Controller::Cpu,
            "cpu.max",
            format!("{quota} {CPU_PERIOD_US}"),
        ));
    }
}
