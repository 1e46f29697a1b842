//! What a confined worker needs to use one NVIDIA GPU, and nothing of the others: its device
//! node, the driver's control and unified-memory nodes, and the driver facts CUDA reads at start.
//! Pure functions of the ordinal (and `/proc/devices`), so the plan is tested without a GPU.

use std::path::PathBuf;

/// The character-device major of `/dev/nvidia*` and `/dev/nvidiactl` (fixed by the driver).
const NVIDIA_MAJOR: u32 = 195;
/// `/dev/nvidiactl`'s minor.
const CONTROL_MINOR: u32 = 255;

/// Driver files CUDA reads while it starts: the driver's version and parameters, and the PCI
/// topology it matches devices against. Read-only.
pub const DRIVER_READ: &[&str] = &[
    "/proc/driver/nvidia",
    "/sys/module/nvidia",
    "/sys/bus/pci",
    "/sys/devices",
];

/// The device nodes a worker on GPU `ordinal` opens (read, write and ioctl): its own node, the
/// control node every process opens, and unified memory (`cudaMallocManaged`, and the runtime's
/// own bookkeeping). The ordinal is the node's number: the host sets `CUDA_DEVICE_ORDER=PCI_BUS_ID`
/// for the worker so CUDA counts devices in the same order as the driver numbers its nodes.
pub fn device_nodes(ordinal: u32) -> Vec<PathBuf> {
    vec![
        PathBuf::from(format!("/dev/nvidia{ordinal}")),
        PathBuf::from("/dev/nvidiactl"),
        PathBuf::from("/dev/nvidia-uvm"),
        PathBuf::from("/dev/nvidia-uvm-tools"),
    ]
}

/// The devices cgroup (v1) rules that allow those nodes, given `/proc/devices` (where the
/// unified-memory driver's major, assigned at load, is listed). Without `nvidia-uvm` listed only
/// the fixed nodes are allowed (CUDA then fails to start, saying so, rather than getting more).
pub fn cgroup_rules(ordinal: u32, proc_devices: &str) -> Vec<String> {
    let mut rules = vec![
        format!("c {NVIDIA_MAJOR}:{ordinal} rwm"),
        format!("c {NVIDIA_MAJOR}:{CONTROL_MINOR} rwm"),
    ];
    let uvm = proc_devices.lines().find_map(|line| {
        let (major, name) = line.trim().split_once(' ')?;
        (name.trim() == "nvidia-uvm").then(|| major.parse::<u32>().ok())?
    });
    if let Some(major) = uvm {
        // Minor 0 is /dev/nvidia-uvm, 1 /dev/nvidia-uvm-tools.
        rules.push(format!("c {major}:0 rwm"));
        rules.push(format!("c {major}:1 rwm"));
    }
    rules
}

/// The GPU ordinal a `[model] device` names: `cuda` is 0, `cuda:N` is N, anything else none.
pub fn ordinal(device: &str) -> Option<u32> {
    match device {
        "cuda" => Some(0),
        d => d.strip_prefix("cuda:")?.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_gets_its_own_gpu_node_and_the_shared_ones_only() {
        let nodes = device_nodes(2);
        assert!(nodes.contains(&PathBuf::from("/dev/nvidia2")));
        assert!(nodes.contains(&PathBuf::from("/dev/nvidiactl")));
        assert!(!nodes.iter().any(|n| n == &PathBuf::from("/dev/nvidia0")));
    }

    #[test]
    fn cgroup_rules_name_the_gpu_and_the_unified_memory_major_from_proc_devices() {
        let proc_devices = "Character devices:\n  1 mem\n195 nvidia-frontend\n234 nvidia-uvm\n509 nvidia-caps\n\nBlock devices:\n  8 sd\n";
        assert_eq!(
            cgroup_rules(1, proc_devices),
            ["c 195:1 rwm", "c 195:255 rwm", "c 234:0 rwm", "c 234:1 rwm"]
        );
        // No unified-memory driver loaded: only the fixed nodes.
        assert_eq!(
            cgroup_rules(0, "Character devices:\n195 nvidia\n"),
            ["c 195:0 rwm", "c 195:255 rwm"]
        );
    }

    #[test]
    fn device_names_map_to_ordinals() {
        assert_eq!(ordinal("cuda"), Some(0));
        assert_eq!(ordinal("cuda:3"), Some(3));
        assert_eq!(ordinal("cpu"), None);
        assert_eq!(ordinal("cuda:x"), None);
    }
}
