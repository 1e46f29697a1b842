//! The `medium` tier's system-call deny-list: calls a model never needs and an escape would —
//! tracing other processes, mounting, new namespaces, kernel modules, BPF, keyrings, io_uring —
//! fail with EPERM. Compiled by seccompiler, with a guard in front for the x32 ABI (the same
//! architecture value, system-call numbers with bit 30 set), which a deny-list keyed on x86_64
//! numbers would otherwise let through.

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use super::confine::ConfineError;

/// System calls denied outright.
const DENIED: &[i64] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_acct,
    libc::SYS_syslog,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
];

/// `clone` flags that create namespaces: denied as `unshare` is.
const NAMESPACE_FLAGS: [i32; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
];

const X32_SYSCALL_BIT: u32 = 0x4000_0000;

fn fail(e: impl std::fmt::Display) -> ConfineError {
    ConfineError {
        step: "seccomp",
        reason: e.to_string(),
    }
}

/// The deny-list program, x32 guard first.
pub fn deny_list() -> Result<BpfProgram, ConfineError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            let flag = flag as u64;
            SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .and_then(|c| SeccompRule::new(vec![c]))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(fail)?;
    rules.insert(libc::SYS_clone, clone_rules);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(fail)?;
    let compiled: BpfProgram = filter.try_into().map_err(fail)?;
    let mut program = x32_guard();
    program.extend(compiled);
    Ok(program)
}

/// `clone3` passes its flags in memory a filter cannot read, so it is refused with ENOSYS, which
/// makes the C library fall back to `clone` (filtered above).
fn clone3_fallback() -> Result<BpfProgram, ConfineError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(fail)?;
    filter.try_into().map_err(fail)
}

/// Loads the system-call number; numbers with the x32 bit fail with EPERM, the rest fall through.
fn x32_guard() -> BpfProgram {
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JMP_JGE_K: u16 = 0x35;
    const BPF_RET_K: u16 = 0x06;
    vec![
        sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        sock_filter {
            code: BPF_JMP_JGE_K,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
    ]
}

/// Installs the deny-list on every thread of the process.
pub fn apply_deny_list() -> Result<(), ConfineError> {
    seccompiler::apply_filter_all_threads(&clone3_fallback()?).map_err(fail)?;
    seccompiler::apply_filter_all_threads(&deny_list()?).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_starts_with_the_x32_guard_and_compiles() {
        let program = deny_list().unwrap();
        assert_eq!(program[1].k, X32_SYSCALL_BIT);
        assert!(program.len() > DENIED.len());
        assert!(!clone3_fallback().unwrap().is_empty());
    }
}
