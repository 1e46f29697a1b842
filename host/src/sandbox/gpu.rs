//! What a confined worker needs to use one NVIDIA GPU, and nothing of the others: its device
//! node, the driver's control and unified-memory nodes, and the driver facts CUDA reads at start.
//! Pure functions of the ordinal and the driver's files ([`minor_of`], [`cgroup_rules`]), so the
//! plan is tested without a GPU; [`minor`] and [`present_nodes`] read this machine's.

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

/// The device nodes a worker on the GPU whose node is `/dev/nvidia{minor}` opens (read, write
/// and ioctl): its own node, the control node every process opens, and unified memory
/// (`cudaMallocManaged`, and the runtime's own bookkeeping).
pub fn device_nodes(minor: u32) -> Vec<PathBuf> {
    vec![
        PathBuf::from(format!("/dev/nvidia{minor}")),
        PathBuf::from("/dev/nvidiactl"),
        PathBuf::from("/dev/nvidia-uvm"),
        PathBuf::from("/dev/nvidia-uvm-tools"),
    ]
}

/// The devices cgroup (v1) rules that allow those nodes, given `/proc/devices` (where the
/// unified-memory driver's major, assigned at load, is listed). Without `nvidia-uvm` listed only
/// the fixed nodes are allowed (CUDA then fails to start, saying so, rather than getting more).
pub fn cgroup_rules(minor: u32, proc_devices: &str) -> Vec<String> {
    let mut rules = vec![
        format!("c {NVIDIA_MAJOR}:{minor} rwm"),
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

/// The device minor (`/dev/nvidia{minor}`) of CUDA's device `ordinal`, from the driver's
/// `information` file of each GPU: workers get `CUDA_DEVICE_ORDER=PCI_BUS_ID`, so CUDA's ordinals
/// follow the bus addresses, while the driver numbers nodes in its own order. Only GPUs whose
/// node exists (`node_exists`) count, as they do for CUDA: in a container given one GPU of eight,
/// `/dev` holds that GPU's node alone while a fresh `/proc` (the worker mounts one) lists all
/// eight. When no listed GPU has a node, all count. `None` when the files do not say (no driver,
/// or fewer GPUs).
pub fn minor_of(
    ordinal: u32,
    informations: &[String],
    node_exists: impl Fn(u32) -> bool,
) -> Option<u32> {
    counted(informations, node_exists)
        .get(ordinal as usize)
        .copied()
}

/// The minors of the GPUs CUDA counts, in its order (see [`minor_of`]).
fn counted(informations: &[String], node_exists: impl Fn(u32) -> bool) -> Vec<u32> {
    let mut gpus: Vec<(String, u32)> = informations
        .iter()
        .filter_map(|text| {
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name)?.trim_start().strip_prefix(':'))
                    .map(str::trim)
            };
            Some((
                field("Bus Location")?.to_ascii_lowercase(),
                field("Device Minor")?.parse().ok()?,
            ))
        })
        .collect();
    if gpus.iter().any(|g| node_exists(g.1)) {
        gpus.retain(|g| node_exists(g.1));
    }
    gpus.sort();
    gpus.into_iter().map(|g| g.1).collect()
}

/// [`minor_of`] on this machine (`/proc/driver/nvidia/gpus/*/information`, `/dev`); the ordinal
/// itself when the driver lists no GPU; an error when it lists GPUs and `ordinal` names none of
/// them (a guess would hand the worker another GPU, perhaps another plugin's).
pub fn minor(ordinal: u32) -> Result<u32, String> {
    let informations: Vec<String> = std::fs::read_dir("/proc/driver/nvidia/gpus")
        .into_iter()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("information")).ok())
        .collect();
    let node_exists = |minor: u32| std::path::Path::new(&format!("/dev/nvidia{minor}")).exists();
    if informations.is_empty() {
        return Ok(ordinal);
    }
    let gpus = counted(&informations, node_exists);
    match gpus.get(ordinal as usize) {
        Some(&minor) => Ok(minor),
        None if gpus.is_empty() => Err(format!(
            "`cuda:{ordinal}`: the driver's GPU list (/proc/driver/nvidia/gpus/*/information) names no bus location and device minor PIO can read; report it with that file"
        )),
        None => Err(format!(
            "`cuda:{ordinal}` names no GPU on this host: CUDA counts {} here (by bus address, those whose /dev node exists); name one of cuda:0 to cuda:{} (`nvidia-smi -L`)",
            gpus.len(),
            gpus.len() - 1
        )),
    }
}

/// The nodes of CUDA's device `ordinal` a confined worker gets ([`device_nodes`] of its
/// [`minor`]), resolved before the worker's own `/dev` replaces the host's: inside it the other
/// GPUs' nodes are gone, and with them what maps an ordinal to its node. Its own node, the
/// control node and unified memory's must exist (CUDA cannot start without them).
pub fn present_nodes(ordinal: u32) -> Result<Vec<PathBuf>, String> {
    nodes_that_exist(ordinal, minor(ordinal)?, |p| p.exists())
}

/// [`present_nodes`] given the GPU's minor and what exists.
fn nodes_that_exist(
    ordinal: u32,
    minor: u32,
    exists: impl Fn(&std::path::Path) -> bool,
) -> Result<Vec<PathBuf>, String> {
    let nodes = device_nodes(minor);
    // What creates each required node, in `device_nodes`' order; the rest are optional.
    let required = [
        "check that `nvidia-smi` lists the GPU and that the manifest's `[model] device` names one of this host's GPUs",
        "load the NVIDIA driver (`nvidia-smi` creates it)",
        "load the unified-memory driver as root before starting workers (`nvidia-modprobe -u -c 0`)",
    ];
    if let Some((node, what)) = nodes.iter().zip(required).find(|(n, _)| !exists(n)) {
        return Err(format!(
            "`cuda:{ordinal}` needs {}, which does not exist on this host: {what}",
            node.display()
        ));
    }
    Ok(nodes.into_iter().filter(|p| exists(p)).collect())
}

/// The device a plugin is told to use inside a worker whose `/dev` holds one GPU's nodes: CUDA
/// counts only the GPUs whose nodes it finds, so that GPU is device 0 there, whatever its
/// ordinal outside (as in a container given one GPU). Other devices pass unchanged.
pub fn inside_one_gpu(device: Option<String>) -> Option<String> {
    match device {
        Some(d) if ordinal(&d).is_some() => Some("cuda:0".into()),
        other => other,
    }
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
    fn a_gpu_without_its_nodes_is_refused_naming_the_missing_one() {
        let exists = |have: &'static [&'static str]| {
            move |p: &std::path::Path| have.iter().any(|h| p == std::path::Path::new(h))
        };
        let all: &[&str] = &["/dev/nvidia3", "/dev/nvidiactl", "/dev/nvidia-uvm"];
        assert_eq!(nodes_that_exist(1, 3, exists(all)).unwrap().len(), 3);
        let e = nodes_that_exist(5, 5, exists(all)).unwrap_err();
        assert!(
            e.contains("`cuda:5` needs /dev/nvidia5") && e.contains("nvidia-smi"),
            "{e}"
        );
        let e = nodes_that_exist(1, 3, exists(&["/dev/nvidia3", "/dev/nvidiactl"])).unwrap_err();
        assert!(
            e.contains("/dev/nvidia-uvm") && e.contains("nvidia-modprobe -u"),
            "{e}"
        );
        let e = nodes_that_exist(1, 3, exists(&["/dev/nvidia3"])).unwrap_err();
        assert!(e.contains("/dev/nvidiactl"), "{e}");
    }

    #[test]
    fn inside_a_one_gpu_view_every_cuda_device_is_device_0() {
        for outside in ["cuda", "cuda:0", "cuda:3"] {
            assert_eq!(
                inside_one_gpu(Some(outside.into())).as_deref(),
                Some("cuda:0")
            );
        }
        assert_eq!(inside_one_gpu(Some("cpu".into())).as_deref(), Some("cpu"));
        assert_eq!(inside_one_gpu(None), None);
    }

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
    fn ordinals_follow_bus_addresses_and_minors_come_from_the_driver() {
        let gpu = |bus: &str, minor: u32| {
            format!("Model: \t\t NVIDIA H200\nIRQ:   \t\t 0\nGPU UUID: \t GPU-x\nBus Location: \t {bus}\nDevice Minor: \t {minor}\n")
        };
        // Listed in the driver's order; minors not in bus order.
        let infos = [
            gpu("0000:9A:00.0", 0),
            gpu("0000:1b:00.0", 1),
            gpu("0000:3b:00.0", 2),
        ];
        let all = |_: u32| true;
        assert_eq!(minor_of(0, &infos, all), Some(1));
        assert_eq!(minor_of(1, &infos, all), Some(2));
        assert_eq!(minor_of(2, &infos, all), Some(0));
        assert_eq!(minor_of(3, &infos, all), None);
        assert_eq!(minor_of(0, &[], all), None);
        // Nodes nowhere (not created yet): the driver's list as it is.
        assert_eq!(minor_of(0, &infos, |_| false), Some(1));
    }

    #[test]
    fn in_a_container_only_gpus_with_a_node_have_ordinals() {
        let gpu =
            |bus: &str, minor: u32| format!("Bus Location: \t {bus}\nDevice Minor: \t {minor}\n");
        // A fresh /proc lists the host's GPUs; the container's /dev has nodes 5 and 2 only.
        let infos: Vec<String> = (0..8)
            .map(|m| gpu(&format!("0000:{:02x}:00.0", 0x10 + m), m))
            .collect();
        let given = |minor: u32| minor == 5 || minor == 2;
        assert_eq!(minor_of(0, &infos, given), Some(2));
        assert_eq!(minor_of(1, &infos, given), Some(5));
        assert_eq!(minor_of(2, &infos, given), None);
    }

    #[test]
    fn device_names_map_to_ordinals() {
        assert_eq!(ordinal("cuda"), Some(0));
        assert_eq!(ordinal("cuda:3"), Some(3));
        assert_eq!(ordinal("cpu"), None);
        assert_eq!(ordinal("cuda:x"), None);
    }
}
