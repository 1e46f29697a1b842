use super::*;

fn host(root: bool, cgroups: bool) -> HostSupport {
    HostSupport {
        root,
        cgroups: cgroups.then_some(cgroup::Version::V2),
        ..HostSupport::complete()
    }
}

fn subject(tier: Tier) -> Subject<'static> {
    Subject {
        plugin: "p",
        tier,
        limits: ResolvedLimits::default(),
        pinned: true,
        gpu: None,
        uid: 4321,
    }
}

#[test]
fn low_on_a_capable_host_is_applied_as_asked() {
    let p = plan(subject(Tier::Low), &Policy::default(), &host(true, true)).unwrap();
    assert_eq!((p.requested, p.applied), (Tier::Low, Tier::Low));
    assert_eq!(
        p.drop_to,
        Some((4321, 65534)),
        "the subject's uid, the policy's gid"
    );
    assert!(p.cgroup && p.downgrade_reason.is_none() && p.isolation.is_none());
}

#[test]
fn min_tier_raises_the_manifest_tier() {
    let policy = Policy {
        min_tier: Tier::High,
        ..Policy::default()
    };
    let p = plan(subject(Tier::Low), &policy, &host(true, true)).unwrap();
    assert_eq!((p.requested, p.applied), (Tier::High, Tier::High));
}

#[test]
fn each_tier_adds_its_mechanisms() {
    let iso = |t| {
        plan(subject(t), &Policy::default(), &host(true, true))
            .unwrap()
            .isolation
            .unwrap()
    };
    let medium = iso(Tier::Medium);
    assert_eq!(medium.syscalls, Syscalls::DenyList);
    assert_eq!(medium.scratch_bytes, DEFAULT_SCRATCH_BYTES);
    assert!(!medium.user_namespace && !medium.landlock && !medium.devices);
    let high = iso(Tier::High);
    assert_eq!(high.syscalls, Syscalls::AllowList);
    assert!(high.user_namespace && high.landlock && high.devices && !high.empty_root);
    let max = iso(Tier::Maximum);
    assert_eq!(max.syscalls, Syscalls::AllowListKill);
    assert!(max.empty_root);
    assert_eq!(max.cpuset.as_deref(), Some("0-0"));
}

/// A `maximum` worker's CPUs are taken from those the daemon may use (a container's 4-7), not
/// from 0 up, which the kernel refuses there; never more than there are.
#[test]
fn the_cpuset_comes_from_the_daemons_own_cpus() {
    assert_eq!(cpuset(2, &[4, 5, 6, 7]), "4,5");
    assert_eq!(cpuset(8, &[4, 5]), "4,5");
    assert_eq!(cpuset(2, &[]), "0-1");
    let host = HostSupport {
        allowed_cpus: vec![6, 7],
        ..host(true, true)
    };
    let mut s = subject(Tier::Maximum);
    s.limits.cpus = Some(1.5);
    let plan = plan(s, &Policy::default(), &host).unwrap();
    assert_eq!(plan.isolation.unwrap().cpuset.as_deref(), Some("6,7"));
}

#[test]
fn a_missing_mechanism_refuses_unless_downgrade_is_allowed() {
    let e = plan(subject(Tier::Low), &Policy::default(), &host(false, true)).unwrap_err();
    assert!(e.to_string().contains("not running as root"), "{e}");
    assert!(e.to_string().contains("allow_downgrade"), "{e}");

    let no_landlock = HostSupport {
        landlock_abi: 0,
        ..host(true, true)
    };
    let e = plan(subject(Tier::High), &Policy::default(), &no_landlock).unwrap_err();
    assert!(e.missing.contains("Landlock"), "{e}");
    let policy = Policy {
        allow_downgrade: true,
        ..Policy::default()
    };
    let p = plan(subject(Tier::High), &policy, &no_landlock).unwrap();
    assert_eq!((p.requested, p.applied), (Tier::High, Tier::Medium));
    assert!(p.downgrade_reason.unwrap().contains("Landlock"));
    assert_eq!(p.isolation.unwrap().syscalls, Syscalls::DenyList);
}

#[test]
fn network_is_open_only_at_low_and_can_be_closed_there() {
    let mut s = subject(Tier::Low);
    assert_eq!(
        plan(s.clone(), &Policy::default(), &host(true, true))
            .unwrap()
            .network,
        NetworkCut::Kept
    );
    s.limits.network = Some(false);
    assert_eq!(
        plan(s.clone(), &Policy::default(), &host(true, true))
            .unwrap()
            .network,
        NetworkCut::Required
    );
    let mut s = subject(Tier::Medium);
    s.limits.network = Some(true);
    let e = plan(s, &Policy::default(), &host(true, true)).unwrap_err();
    assert!(e.missing.contains("network"), "{e}");
}

#[test]
fn maximum_requires_a_pinned_library_and_no_uncapped_gpu() {
    let unpinned = Subject {
        pinned: false,
        ..subject(Tier::Maximum)
    };
    let e = plan(unpinned, &Policy::default(), &host(true, true)).unwrap_err();
    assert!(e.missing.contains("sha256"), "{e}");
    let mut gpu = subject(Tier::Maximum);
    gpu.limits.gpu_memory_bytes = Some(1 << 30);
    let e = plan(gpu, &Policy::default(), &host(true, true)).unwrap_err();
    assert!(e.missing.contains("MIG"), "{e}");
    // A model on a GPU without a cap is refused there too.
    let on_gpu = Subject {
        gpu: Some(0),
        ..subject(Tier::Maximum)
    };
    let e = plan(on_gpu, &Policy::default(), &host(true, true)).unwrap_err();
    assert!(e.missing.contains("MIG"), "{e}");
}

#[test]
fn high_lets_a_gpu_model_open_its_own_gpu() {
    let on_gpu = Subject {
        gpu: Some(1),
        ..subject(Tier::High)
    };
    let p = plan(on_gpu, &Policy::default(), &host(true, true)).unwrap();
    let isolation = p.isolation.unwrap();
    assert_eq!((isolation.gpu, isolation.devices), (Some(1), true));
    let p = plan(subject(Tier::High), &Policy::default(), &host(true, true)).unwrap();
    assert_eq!(p.isolation.unwrap().gpu, None);
}
