//! The seccomp filter of each role, built with `seccompiler`.
//!
//! - Control plane: a deny-list installed on every thread of the serving
//!   shim (`SECCOMP_FILTER_FLAG_TSYNC`, before its runtime starts, so later
//!   threads inherit it): system calls the shim never makes and that would
//!   widen a compromise (kernel modules, kexec, bpf, ptrace, keyrings,
//!   clocks, exec, ...).
//! - Guest-driven threads (vCPU, vsock, net and virtio-fs workers): an
//!   allow-list each, stacked on the control plane's at the thread's start
//!   once its set-up is done. Filters stack; a call must pass all of them.
//!
//! Every violation answers `SECCOMP_RET_TRAP`: `SIGSYS` to the thread, whose
//! handler ([`super::sigsys`]) logs and ends the VM.
//!
//! What the lists hold was read from the code and checked with
//! `strace -f` on real boots, snapshots, restores and container runs.

use std::collections::BTreeMap;
use std::mem::size_of;

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

use super::{ConfineError, Role};

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// What every guest-driven thread needs: the memory allocator, locks and
/// channels, signals (the vCPU kick, Rust's stack-overflow guard), clocks
/// and sleeps, log lines (`write` to the log fifo), thread exit, and what
/// the SIGSYS handler itself calls (`write`, `gettid`, `exit_group`).
const COMMON: &[i64] = &[
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_restart_syscall,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// vCPU threads: KVM_RUN and the vCPU ioctls below, the buses' work
/// (eventfd writes that raise interrupts, console bytes to an open file),
/// and device activation, which runs on the vCPU that wrote DRIVER_OK:
/// epoll and eventfd creation, fd duplication. No file opens (the virtio-fs
/// backend is built on its worker thread), no sockets, no thread creation
/// (workers are created by the spawner).
const VCPU: &[i64] = &[
    libc::SYS_read,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_eventfd2,
    libc::SYS_dup,
    libc::SYS_fcntl,
    libc::SYS_lseek,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
];

/// The vsock worker: the guest's streams to and from host Unix sockets
/// (accept on the pod's socket, connect to `<socket>_<port>`), epoll.
const VSOCK: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_accept4,
    libc::SYS_connect,
    // A zero-timeout poll for POLLHUP on a host stream.
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_fcntl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
];

/// The net worker: frames to and from the tap fd it was handed, epoll.
const NET: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
];

/// The virtio-fs worker: what a passthrough FUSE server does on the share
/// it is chrooted into (files, directories, links, attributes, xattrs,
/// per-request effective uid/gid and `CAP_FSETID` juggling), epoll.
const FS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_syncfs,
    libc::SYS_copy_file_range,
    libc::SYS_flock,
    libc::SYS_linkat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_fchownat,
    libc::SYS_fchown,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_utimensat,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_getxattr,
    libc::SYS_lgetxattr,
    libc::SYS_fgetxattr,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_flistxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    libc::SYS_fremovexattr,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_getuid,
    libc::SYS_getgid,
    libc::SYS_geteuid,
    libc::SYS_getegid,
    libc::SYS_umask,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_fcntl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
];

/// System calls no thread of the serving shim makes: the control plane's
/// deny-list.
const CONTROL_PLANE_DENIED: &[i64] = &[
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_process_madvise,
    libc::SYS_kcmp,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_adjtimex,
    libc::SYS_clock_adjtime,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_personality,
    libc::SYS_modify_ldt,
    libc::SYS_quotactl,
    libc::SYS_quotactl_fd,
    libc::SYS_lookup_dcookie,
    libc::SYS_vhangup,
    libc::SYS_syslog,
    libc::SYS_open_by_handle_at,
    libc::SYS_pivot_root,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_uselib,
    libc::SYS_ustat,
    libc::SYS_sysfs,
    libc::SYS__sysctl,
    libc::SYS_fanotify_init,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];

/// x32 system calls are x86_64's numbers with this bit set (same audit
/// arch): the deny-list blocks both forms.
const X32_SYSCALL_BIT: i64 = 0x4000_0000;

const KVMIO: u32 = 0xAE;

fn kvm_ior<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_READ, KVMIO, nr, size_of::<T>() as u32)
}

fn kvm_iow<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_WRITE, KVMIO, nr, size_of::<T>() as u32)
}

fn kvm_iowr(nr: u32, size: usize) -> u64 {
    ioctl_expr(_IOC_READ | _IOC_WRITE, KVMIO, nr, size as u32)
}

/// The KVM ioctls a vCPU thread makes: KVM_RUN, the register reads of a
/// snapshot (taken on the vCPU's own thread), and the `#BP` injection of
/// the `emulated` CPU template. No VM or system ioctl: a vCPU thread
/// cannot add memory slots, devices or vCPUs.
pub fn vcpu_ioctls() -> Vec<u64> {
    // kvm_msrs and kvm_cpuid2 are 8-byte headers of variable-size arrays.
    const FAM_HEADER: usize = 8;
    vec![
        ioctl_expr(_IOC_NONE, KVMIO, 0x80, 0),       // KVM_RUN
        kvm_ior::<kvm_regs>(0x81),                   // KVM_GET_REGS
        kvm_iow::<kvm_regs>(0x82),                   // KVM_SET_REGS
        kvm_ior::<kvm_sregs>(0x83),                  // KVM_GET_SREGS
        kvm_iowr(0x88, FAM_HEADER),                  // KVM_GET_MSRS
        kvm_ior::<kvm_lapic_state>(0x8e),            // KVM_GET_LAPIC
        kvm_iowr(0x91, FAM_HEADER),                  // KVM_GET_CPUID2
        kvm_ior::<kvm_mp_state>(0x98),               // KVM_GET_MP_STATE
        kvm_ior::<kvm_vcpu_events>(0x9f),            // KVM_GET_VCPU_EVENTS
        kvm_iow::<kvm_vcpu_events>(0xa0),            // KVM_SET_VCPU_EVENTS
        kvm_ior::<kvm_debugregs>(0xa1),              // KVM_GET_DEBUGREGS
        kvm_ior::<kvm_xsave>(0xa4),                  // KVM_GET_XSAVE
        kvm_ior::<kvm_xcrs>(0xa6),                   // KVM_GET_XCRS
        ioctl_expr(_IOC_READ, KVMIO, 0xcf, 4096u32), // KVM_GET_XSAVE2
    ]
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, ConfineError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .map_err(|e| ConfineError::Filter(e.to_string()))
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, ConfineError> {
    SeccompRule::new(conds).map_err(|e| ConfineError::Filter(e.to_string()))
}

fn allow(rules: &mut Rules, nrs: &[i64]) {
    for nr in nrs {
        rules.insert(*nr, Vec::new());
    }
}

/// Allows `nr` when argument `arg` equals one of `values`.
fn allow_arg_in(rules: &mut Rules, nr: i64, arg: u8, values: &[u64]) -> Result<(), ConfineError> {
    let list = rules.entry(nr).or_default();
    for v in values {
        list.push(rule(vec![cond(arg, SeccompCmpOp::Eq, *v)?])?);
    }
    Ok(())
}

/// mmap and mprotect, never with PROT_EXEC: a compromised thread cannot
/// make new code executable.
fn allow_memory_without_exec(rules: &mut Rules) -> Result<(), ConfineError> {
    let prot_exec = libc::PROT_EXEC as u64;
    for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
        rules.insert(
            nr,
            vec![rule(vec![cond(2, SeccompCmpOp::MaskedEq(prot_exec), 0)?])?],
        );
    }
    Ok(())
}

/// The rules of `role`.
pub fn rules(role: Role) -> Result<Rules, ConfineError> {
    let mut rules = Rules::new();
    if role == Role::ControlPlane {
        for nr in CONTROL_PLANE_DENIED {
            rules.insert(*nr, Vec::new());
            rules.insert(*nr | X32_SYSCALL_BIT, Vec::new());
        }
        return Ok(rules);
    }
    allow(&mut rules, COMMON);
    allow_memory_without_exec(&mut rules)?;
    match role {
        Role::Vcpu => {
            allow(&mut rules, VCPU);
            allow_arg_in(&mut rules, libc::SYS_ioctl, 1, &vcpu_ioctls())?;
        }
        Role::VsockWorker => {
            allow(&mut rules, VSOCK);
            allow_arg_in(&mut rules, libc::SYS_socket, 0, &[libc::AF_UNIX as u64])?;
            // std's set_nonblocking on an accepted stream.
            allow_arg_in(&mut rules, libc::SYS_ioctl, 1, &[libc::FIONBIO])?;
        }
        Role::NetWorker => allow(&mut rules, NET),
        Role::FsWorker => allow(&mut rules, FS),
        Role::ControlPlane => unreachable!("handled above"),
    }
    // Dropping an fd checks it is open first (F_GETFD) in debug builds.
    if !rules.contains_key(&libc::SYS_fcntl) {
        allow_arg_in(&mut rules, libc::SYS_fcntl, 1, &[libc::F_GETFD as u64])?;
    }
    Ok(rules)
}

/// The compiled filter of `role`: an allow-list (else trap) for
/// guest-driven threads, a deny-list (trap those, allow the rest) for the
/// control plane.
pub fn program(role: Role) -> Result<BpfProgram, ConfineError> {
    let (mismatch, matched) = if role == Role::ControlPlane {
        (SeccompAction::Allow, SeccompAction::Trap)
    } else {
        (SeccompAction::Trap, SeccompAction::Allow)
    };
    let filter = SeccompFilter::new(rules(role)?, mismatch, matched, TargetArch::x86_64)
        .map_err(|e| ConfineError::Filter(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| ConfineError::Filter(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles() {
        for role in Role::ALL {
            let prog = program(role).unwrap();
            assert!(!prog.is_empty(), "{role:?}");
            // The kernel's limit for one filter.
            assert!(prog.len() < 4096, "{role:?}: {} instructions", prog.len());
        }
    }

    #[test]
    fn kvm_run_and_register_reads_have_their_kernel_numbers() {
        let ioctls = vcpu_ioctls();
        assert_eq!(ioctls[0], 0xae80, "KVM_RUN");
        assert_eq!(ioctls[1], 0x8090_ae81, "KVM_GET_REGS");
        assert_eq!(ioctls[3], 0x8138_ae83, "KVM_GET_SREGS");
        assert_eq!(ioctls[11], 0x9000_aea4, "KVM_GET_XSAVE");
    }

    #[test]
    fn guest_driven_threads_cannot_open_sockets_exec_or_mount() {
        for role in [Role::Vcpu, Role::NetWorker, Role::FsWorker] {
            let r = rules(role).unwrap();
            for nr in [
                libc::SYS_socket,
                libc::SYS_execve,
                libc::SYS_mount,
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_ptrace,
            ] {
                assert!(!r.contains_key(&nr), "{role:?} allows {nr}");
            }
        }
        let vsock = rules(Role::VsockWorker).unwrap();
        assert_eq!(vsock[&libc::SYS_socket].len(), 1, "AF_UNIX only");
        assert!(!vsock.contains_key(&libc::SYS_execve));
    }
}
