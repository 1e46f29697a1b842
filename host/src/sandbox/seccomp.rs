//! System-call filters. `medium`: a deny-list — calls a model never needs and an escape would
//! (tracing other processes, mounting, new namespaces, kernel modules, BPF, keyrings, io_uring)
//! fail with EPERM. `high`: an allow-list of what inference code uses (memory, files, threads,
//! time, Unix sockets), anything else EPERM; `maximum`: the same list, anything else kills.
//! At `medium` and `high` a refused call goes to the worker's reaper, which fails it with EPERM
//! and names it (`refusals`).
//! Compiled by seccompiler, with a guard in front for the x32 ABI (the same architecture value,
//! system-call numbers with bit 30 set), which rules keyed on x86_64 numbers would miss.

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use std::io::Write as _;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use super::confine::ConfineError;
use super::refusals::Handoff;

/// System calls denied outright.
const DENIED: &[i64] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    // Other processes' descriptors and memory (the reaper holds the filter's listener).
    libc::SYS_pidfd_getfd,
    libc::SYS_kcmp,
    libc::SYS_process_madvise,
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

/// What the compiled programs return for a refused call, until `refusing` sets the real answer
/// (seccompiler has no action for user notification, so `Trap` stands in for it).
const REFUSE: SeccompAction = SeccompAction::Trap;

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
    rules.insert(libc::SYS_socket, vec![other_families()?]);
    let program = compile(rules, SeccompAction::Allow, REFUSE)?;
    Ok([x32_guard(false), program].concat())
}

/// Socket families a `medium` worker may open: Unix, the (empty) network namespace's IP, and
/// netlink (glibc asks it for the interfaces). Not the others: the network namespace does not
/// hold them (vsock reaches the hypervisor's and the host's services from a VM), or they are
/// kernel surface an escape would use (AF_ALG, AF_PACKET, ...).
const SOCKET_FAMILIES: [i32; 4] = [
    libc::AF_UNIX,
    libc::AF_INET,
    libc::AF_INET6,
    libc::AF_NETLINK,
];

/// A rule matching `socket()` of any family but [`SOCKET_FAMILIES`].
fn other_families() -> Result<SeccompRule, ConfineError> {
    let conditions = SOCKET_FAMILIES
        .iter()
        .map(|&f| condition(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, f as u64))
        .collect::<Result<Vec<_>, _>>()?;
    SeccompRule::new(conditions).map_err(fail)
}

/// System calls inference code makes: memory, files (paths are Landlock's business), threads,
/// time, polling, its Unix socket. No exec, no ptrace, no mount, no new sockets but Unix ones.
const ALLOWED: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_getcwd,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_rmdir,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_flock,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_pipe,
    libc::SYS_pipe2,
    libc::SYS_utimensat,
    libc::SYS_umask,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_msync,
    libc::SYS_mincore,
    libc::SYS_brk,
    libc::SYS_mlock,
    libc::SYS_munlock,
    libc::SYS_memfd_create,
    libc::SYS_mbind,
    libc::SYS_get_mempolicy,
    libc::SYS_set_mempolicy,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    // How the kernel resumes a sleep (nanosleep, a futex or poll with a timeout) that a stop
    // interrupted: Ctrl-Z and `fg`, a frozen cgroup, SIGSTOP/SIGCONT.
    libc::SYS_restart_syscall,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_kill,
    libc::SYS_tgkill,
    libc::SYS_tkill,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getppid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getgroups,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    libc::SYS_getpgrp,
    libc::SYS_getsid,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_getparam,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min,
    libc::SYS_getpriority,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_time,
    libc::SYS_times,
    libc::SYS_getrusage,
    libc::SYS_getrlimit,
    libc::SYS_prlimit64,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_futex,
    libc::SYS_futex_waitv,
    libc::SYS_set_robust_list,
    libc::SYS_get_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_arch_prctl,
    libc::SYS_prctl,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_getrandom,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_select,
    libc::SYS_pselect6,
    libc::SYS_epoll_create,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_signalfd4,
    libc::SYS_membarrier,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_connect,
    libc::SYS_ioctl,
    // Let through here so that the separate clone3 filter's ENOSYS decides (see clone3_fallback).
    libc::SYS_clone3,
];

/// The allow-list program: what is not listed fails with EPERM, or kills when `kill` is set.
pub fn allow_list(kill: bool) -> Result<BpfProgram, ConfineError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    // Threads yes, namespaces no: clone only with none of the namespace flags.
    let ns_mask = NAMESPACE_FLAGS.iter().fold(0u64, |m, &f| m | f as u64);
    let no_namespaces = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(ns_mask),
        0,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(fail)?;
    rules.insert(libc::SYS_clone, vec![no_namespaces]);
    // Sockets: Unix ones only (the IPC pattern); no network at all.
    for call in [libc::SYS_socket, libc::SYS_socketpair] {
        rules.insert(
            call,
            vec![arg0_rule(SeccompCmpOp::Eq, libc::AF_UNIX as u64)?],
        );
    }
    let otherwise = if kill {
        SeccompAction::KillProcess
    } else {
        REFUSE
    };
    let program = compile(rules, otherwise, SeccompAction::Allow)?;
    Ok([x32_guard(kill), program].concat())
}

/// A rule matching when the first argument (a 32-bit one) compares `op` to `value`.
fn arg0_rule(op: SeccompCmpOp, value: u64) -> Result<SeccompRule, ConfineError> {
    SeccompRule::new(vec![condition(0, SeccompCmpArgLen::Dword, op, value)?]).map_err(fail)
}

/// Argument `index` (of `len`) compared `op` to `value`.
fn condition(
    index: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, ConfineError> {
    SeccompCondition::new(index, len, op, value).map_err(fail)
}

/// `clone3` passes its flags in memory a filter cannot read, so it is refused with ENOSYS, which
/// makes the C library fall back to `clone` (filtered above).
fn clone3_fallback() -> Result<BpfProgram, ConfineError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    compile(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )
}

/// Compiles `rules` for x86_64: calls matching a rule get `on_match`, all others `otherwise`.
fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    otherwise: SeccompAction,
    on_match: SeccompAction,
) -> Result<BpfProgram, ConfineError> {
    let filter =
        SeccompFilter::new(rules, otherwise, on_match, TargetArch::x86_64).map_err(fail)?;
    filter.try_into().map_err(fail)
}

/// Loads the system-call number; numbers with the x32 bit fail with EPERM (or kill), the rest
/// fall through.
fn x32_guard(kill: bool) -> BpfProgram {
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
            k: if kill {
                libc::SECCOMP_RET_KILL_PROCESS
            } else {
                libc::SECCOMP_RET_ERRNO | libc::EPERM as u32
            },
        },
    ]
}

/// `program` with each refusal (`REFUSE`) answered by `action` instead.
fn refusing(program: &BpfProgram, action: u32) -> BpfProgram {
    const BPF_RET_K: u16 = 0x06;
    program
        .iter()
        .map(|i| {
            let refusal = i.code == BPF_RET_K && i.k == libc::SECCOMP_RET_TRAP;
            sock_filter {
                k: if refusal { action } else { i.k },
                ..i.clone()
            }
        })
        .collect()
}

/// Installs `program` on every thread with a listener for its refusals; or, where the kernel
/// cannot (no user notification, or none together with thread sync: before Linux 5.7; or a
/// listener already installed above the worker), why not, in words for the log.
fn install_with_listener(
    program: &BpfProgram,
) -> Result<Result<OwnedFd, &'static str>, ConfineError> {
    let mut filter: Vec<libc::sock_filter> = program
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    let fprog = libc::sock_fprog {
        len: u16::try_from(filter.len()).map_err(fail)?,
        filter: filter.as_mut_ptr(),
    };
    let flags = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER
        | libc::SECCOMP_FILTER_FLAG_TSYNC as libc::c_ulong
        | libc::SECCOMP_FILTER_FLAG_TSYNC_ESRCH;
    // SAFETY: seccomp reads the program through `fprog`, which outlives the call; a
    // non-negative result is a new descriptor owned here.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &fprog as *const libc::sock_fprog,
        )
    };
    if r >= 0 {
        // SAFETY: as above.
        return Ok(Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) }));
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) => Ok(Err(
            "naming them takes seccomp user notification with thread sync, Linux 5.7",
        )),
        // A process may have only one listener above it.
        Some(libc::EBUSY) => Ok(Err(
            "a seccomp listener is already installed above the worker (a container manager's seccomp agent, say), and a process may have only one",
        )),
        _ => Err(fail(format!("installing the filter: {e}"))),
    }
}

/// Installs the filter for `syscalls` on every thread of the process; at `medium` and `high` its
/// listener goes to the reaper through `handoff`. Returns what was applied, in words.
pub fn apply(syscalls: super::Syscalls, handoff: Option<Handoff>) -> Result<String, ConfineError> {
    seccompiler::apply_filter_all_threads(&clone3_fallback()?).map_err(fail)?;
    let program = match syscalls {
        super::Syscalls::AllowListKill => {
            seccompiler::apply_filter_all_threads(&allow_list(true)?).map_err(fail)?;
            return Ok(format!("seccomp {syscalls:?}"));
        }
        super::Syscalls::DenyList => deny_list()?,
        super::Syscalls::AllowList => allow_list(false)?,
    };
    let why = match handoff {
        Some(handoff) => {
            let notify = refusing(&program, libc::SECCOMP_RET_USER_NOTIF);
            match install_with_listener(&notify)? {
                Ok(listener) => {
                    // Until the reaper holds the listener, a refused call would wait on this
                    // very thread for ever: only sendmsg, recvmsg and close run in between,
                    // allowed at every tier.
                    handoff.send(listener)?;
                    return Ok(format!("seccomp {syscalls:?}, refusals named"));
                }
                Err(why) => why,
            }
        }
        None => "no reaper answers for this worker",
    };
    let errno = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    seccompiler::apply_filter_all_threads(&refusing(&program, errno)).map_err(fail)?;
    let _ = writeln!(
        std::io::stderr(),
        "worker: refused system calls fail with EPERM unnamed here: {why}"
    );
    Ok(format!("seccomp {syscalls:?}, refusals unnamed"))
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
        for kill in [false, true] {
            let program = allow_list(kill).unwrap();
            assert_eq!(program[1].k, X32_SYSCALL_BIT);
            let otherwise = if kill {
                libc::SECCOMP_RET_KILL_PROCESS
            } else {
                libc::SECCOMP_RET_TRAP
            };
            assert!(
                program.iter().any(|i| i.code == 0x06 && i.k == otherwise),
                "kill = {kill}"
            );
            let notify = refusing(&program, libc::SECCOMP_RET_USER_NOTIF);
            assert_eq!(notify.len(), program.len());
            assert!(notify.iter().all(|i| i.k != libc::SECCOMP_RET_TRAP));
            assert_eq!(
                notify
                    .iter()
                    .any(|i| i.code == 0x06 && i.k == libc::SECCOMP_RET_USER_NOTIF),
                !kill
            );
        }
    }

    #[test]
    fn the_allow_list_has_no_escape_hatches() {
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_bpf,
        ] {
            assert!(!ALLOWED.contains(&forbidden), "{forbidden}");
        }
    }
}
