use super::*;
use crate::sandbox::ResolvedLimits;

fn limits() -> ResolvedLimits {
    ResolvedLimits {
        memory_bytes: Some(256 << 20),
        cpus: Some(1.5),
        pids: Some(64),
        ..ResolvedLimits::default()
    }
}

fn spec() -> GroupSpec {
    GroupSpec {
        limits: limits(),
        ..GroupSpec::default()
    }
}

fn plan_text(version: Version) -> Vec<String> {
    settings(version, &spec())
        .iter()
        .map(|s| format!("{:?}/{}={}", s.controller, s.file, s.value))
        .collect()
}

#[test]
fn v1_writes_memory_with_memsw_cpu_quota_and_pids() {
    assert_eq!(
        plan_text(Version::V1),
        [
            "Memory/memory.limit_in_bytes=268435456",
            "Memory/memory.memsw.limit_in_bytes=268435456",
            "Cpu/cpu.cfs_period_us=100000",
            "Cpu/cpu.cfs_quota_us=150000",
            "Pids/pids.max=64",
        ]
    );
}

#[test]
fn v2_writes_memory_max_no_swap_cpu_max_and_pids() {
    assert_eq!(
        plan_text(Version::V2),
        [
            "Memory/memory.max=268435456",
            "Memory/memory.swap.max=0",
            "Cpu/cpu.max=150000 100000",
            "Pids/pids.max=64",
        ]
    );
}

#[test]
fn no_limits_write_nothing() {
    assert!(settings(Version::V1, &GroupSpec::default()).is_empty());
    assert!(settings(Version::V2, &GroupSpec::default()).is_empty());
}

#[test]
fn devices_and_cpuset_for_the_upper_tiers() {
    let spec = GroupSpec {
        devices: true,
        cpuset: Some("0-1".into()),
        ..GroupSpec::default()
    };
    let text = |v| -> Vec<String> {
        settings(v, &spec)
            .iter()
            .map(|s| format!("{:?}/{}={}", s.controller, s.file, s.value))
            .collect()
    };
    let v1 = text(Version::V1);
    assert_eq!(v1[0], "Cpuset/cpuset.cpus=0-1");
    assert_eq!(v1[2], "Devices/devices.deny=a");
    assert!(v1.contains(&"Devices/devices.allow=c 1:9 rwm".to_string()));
    // v2 has no devices files: Landlock and the private /dev view stand in.
    assert!(!text(Version::V2).iter().any(|s| s.starts_with("Devices")));
}

#[test]
fn a_gpu_worker_is_allowed_its_gpu_nodes_after_the_deny() {
    let spec = GroupSpec {
        devices: true,
        extra_devices: crate::sandbox::gpu::cgroup_rules(0, "195 nvidia\n236 nvidia-uvm\n"),
        ..GroupSpec::default()
    };
    let allowed: Vec<String> = settings(Version::V1, &spec)
        .iter()
        .filter(|s| s.file == "devices.allow")
        .map(|s| s.value.clone())
        .collect();
    for rule in ["c 195:0 rwm", "c 195:255 rwm", "c 236:0 rwm", "c 1:3 rwm"] {
        assert!(allowed.contains(&rule.to_string()), "{rule} in {allowed:?}");
    }
    assert!(!allowed.contains(&"c 195:1 rwm".to_string()));
}

/// A fake v2 tree in a temporary directory: the v2 path creates the group, enables the
/// controllers in each ancestor and writes the limits where the kernel would read them.
#[test]
fn v2_group_creation_writes_the_planned_files() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
    std::fs::create_dir_all(root.path().join("pio")).unwrap();
    let group = Cgroup::create_at(root.path(), Version::V2, "echo", &spec()).unwrap();
    let dir = group.memory_dir().to_path_buf();
    assert!(dir.starts_with(root.path().join("pio")));
    assert_eq!(
        std::fs::read_to_string(dir.join("memory.max")).unwrap(),
        "268435456"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("cpu.max")).unwrap(),
        "150000 100000"
    );
    assert_eq!(std::fs::read_to_string(dir.join("pids.max")).unwrap(), "64");
    let enabled = std::fs::read_to_string(root.path().join("pio/cgroup.subtree_control")).unwrap();
    assert_eq!(enabled, "+memory +cpu +pids");
    // No swap file here (swap accounting off): said, not silently skipped.
    assert_eq!(group.unenforced(), ["memory.swap.max"]);
    // A plain directory cannot be removed while it holds files; the real kernel files vanish.
    std::mem::forget(group);

    // A name with a path in it makes one folder beside the others, not one elsewhere.
    let group = Cgroup::create_at(root.path(), Version::V2, "../../h/x", &spec()).unwrap();
    let dir = group.memory_dir().to_path_buf();
    assert_eq!(
        dir.parent(),
        Some(root.path().join("pio").as_path()),
        "{dir:?}"
    );
    std::mem::forget(group);
}

/// The processes of a cgroup namespace's root are moved to a leaf of their own, one write each
/// (what lets the root hand controllers down in a container on cgroup v2).
#[test]
fn a_namespace_roots_processes_move_to_their_own_leaf() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("cgroup.procs"), "12\n34\n").unwrap();
    std::fs::create_dir(root.path().join(DAEMON_LEAF)).unwrap();
    std::fs::write(root.path().join(DAEMON_LEAF).join("cgroup.procs"), "").unwrap();
    evacuate(root.path()).unwrap();
    let moved =
        std::fs::read_to_string(root.path().join(DAEMON_LEAF).join("cgroup.procs")).unwrap();
    // A plain file keeps its list, so every pass moves both again.
    assert!(moved.starts_with("12\n34\n"), "{moved:?}");
}

/// On a machine with a writable hierarchy (root; CI): a real group, a real process in it, limits
/// read back from the kernel, then everything killed and removed.
#[test]
fn a_real_group_confines_a_process_and_is_removed() {
    let Some(version) = Version::detect_writable() else {
        eprintln!("skipped: no writable cgroup hierarchy (needs root)");
        return;
    };
    let group = Cgroup::create(version, "unit-test", &spec()).unwrap();
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    group.add(child.id()).unwrap();
    assert_eq!(group.members(), [child.id()]);
    let stats = group.stats();
    assert_eq!(stats.memory_limit_bytes, Some(256 << 20));
    assert_eq!(stats.pids, Some(1));
    let dirs: Vec<PathBuf> = group.dirs().into_iter().cloned().collect();
    drop(group);
    assert!(child.wait().unwrap().code().is_none(), "killed by a signal");
    for dir in dirs {
        assert!(!dir.exists(), "{} removed", dir.display());
    }
}

#[test]
fn groups_of_a_dead_pio_are_reaped_and_live_ones_kept() {
    let root = tempfile::tempdir().unwrap();
    let pio = root.path().join("pio");
    // pid 1 always runs; a pid beyond pid_max never does.
    for leaf in ["echo-1-0", "echo-4194305-0", "not-a-pio-group"] {
        std::fs::create_dir_all(pio.join(leaf)).unwrap();
    }
    assert_eq!(reap_stale_at(root.path(), Version::V2), 1);
    assert!(pio.join("echo-1-0").exists());
    assert!(!pio.join("echo-4194305-0").exists());
    assert!(pio.join("not-a-pio-group").exists());
}

/// v1 writes "no limit" as a number (9223372036854771712): it reads as none, not as 8 EiB.
#[test]
fn an_unlimited_v1_memory_limit_reads_as_none() {
    assert_eq!(v1_limit(Some(9_223_372_036_854_771_712)), None);
    assert_eq!(v1_limit(Some(256 << 20)), Some(256 << 20));
    assert_eq!(v1_limit(None), None);
}
