//! Confinement of the VMM and the shim that hosts it, as Firecracker
//! confines its own: per-thread seccomp filters, capabilities dropped to
//! what each part needs, and a bounded `RLIMIT_NOFILE`. The guest is
//! hostile; a thread it drives (a vCPU, a device worker) that makes a
//! system call outside its filter ends the VM (SIGSYS, one log line, exit
//! status [`sigsys::EXIT_STATUS`]); one serving shim is one pod's VM.
//!
//! | thread role | seccomp filter | capabilities |
//! |---|---|---|
//! | control plane: main thread, tokio workers and blocking pool (mounts, netlink/tc, fifo I/O, ttrpc, VM build, snapshots), the worker spawner | deny-list on every thread (TSYNC, before the runtime starts): exec, ptrace, process_vm_*, pidfd_getfd, kcmp, kexec, modules, bpf, perf_event_open, keyrings, userfaultfd, reboot, swap, acct, clock setting, iopl/ioperm, personality, modify_ldt, quotactl, syslog, open_by_handle_at, pivot_root, sethostname, io_uring, ... (and their x32 forms) | SYS_ADMIN, NET_ADMIN, SYS_CHROOT, SETPCAP, CHOWN, DAC_OVERRIDE, FOWNER, FSETID, MKNOD, SETUID, SETGID, SETFCAP (bounding = permitted = effective; inheritable, ambient empty) |
//! | vCPU (`ember-vcpu<N>`) | control plane's + allow-list: KVM_RUN and 13 vCPU ioctls (register reads for snapshots, #BP injection), eventfd/epoll creation and writes, allocator (no PROT_EXEC), futex, signals, clocks, write, exit | none |
//! | vsock worker (`ember-vsock`) | + allow-list: AF_UNIX socket/connect/accept4, stream I/O, FIONBIO, epoll, allocator, futex, exit | none |
//! | net worker (`ember-net`) | + allow-list: read/write(v) on the tap, epoll, allocator, futex, exit | none |
//! | virtio-fs worker (`ember-virtiofs`) | + allow-list: passthrough file operations (openat, *stat*, getdents64, read/write/pread/pwrite, links, renames, mkdir/mknod, chown/chmod/utimensat, xattrs, fsync/fallocate), setresuid/setresgid, capget/capset, epoll | CHOWN, DAC_OVERRIDE, FOWNER, FSETID, MKNOD, SETUID, SETGID, SETFCAP |
//!
//! The shim calls [`process`] before it starts any thread; the VMM calls
//! [`thread`] at the start of each guest-driven thread, which is a no-op
//! unless [`enable`] (or [`process`]) ran: unit tests and the `ember bench`
//! CLI stay unconfined.

mod caps;
mod seccomp;
pub mod sigsys;
mod spawner;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

pub use spawner::spawn;

/// What a thread is confined as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Every thread of the serving shim that the guest does not drive.
    ControlPlane,
    Vcpu,
    VsockWorker,
    NetWorker,
    FsWorker,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::ControlPlane,
        Role::Vcpu,
        Role::VsockWorker,
        Role::NetWorker,
        Role::FsWorker,
    ];

    /// The role's name in the SIGSYS report line.
    pub fn name(self) -> &'static str {
        match self {
            Role::ControlPlane => "control-plane",
            Role::Vcpu => "vcpu",
            Role::VsockWorker => "vsock",
            Role::NetWorker => "net",
            Role::FsWorker => "virtio-fs",
        }
    }

    /// The capabilities the role keeps, as `/proc/<pid>/status` prints
    /// them (`CapEff`, `CapPrm`, `CapBnd`).
    pub fn capability_mask(self) -> u64 {
        caps::mask(self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("building the seccomp filter: {0}")]
    Filter(String),
    #[error("installing the seccomp filter: {0}")]
    Install(String),
    #[error("dropping capabilities: {0}")]
    Caps(String),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl From<ConfineError> for io::Error {
    fn from(e: ConfineError) -> io::Error {
        io::Error::other(e.to_string())
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether guest-driven threads confine themselves in this process.
pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// Turns confinement of guest-driven threads on for this process: the
/// SIGSYS handler, and the spawner that creates device workers outside
/// any vCPU's filter. Call it before any VM starts.
pub fn enable() -> Result<(), ConfineError> {
    sigsys::install_handler().map_err(|source| ConfineError::Io {
        what: "installing the SIGSYS handler",
        source,
    })?;
    spawner::start().map_err(|source| ConfineError::Io {
        what: "starting the worker spawner thread",
        source,
    })?;
    ENABLED.store(true, Ordering::SeqCst);
    Ok(())
}

/// Confines the calling thread as `role` (its capability set, then its
/// allow-list), once its set-up is done. A no-op unless confinement is
/// enabled. On error the thread must not go on serving the guest.
pub fn thread(role: Role) -> Result<(), ConfineError> {
    if !is_enabled() {
        return Ok(());
    }
    let program = seccomp::program(role)?;
    caps::drop_to(role)?;
    sigsys::set_thread_role(role.name());
    seccompiler::apply_filter(&program).map_err(|e| ConfineError::Install(e.to_string()))?;
    tracing::debug!(role = role.name(), "thread confined");
    Ok(())
}

/// Process-wide limits of the serving shim.
#[derive(Debug, Clone, Copy)]
pub struct ProcessLimits {
    /// RLIMIT_NOFILE, soft and hard (the inherited hard limit if lower).
    pub max_open_files: u64,
}

/// Confines the whole serving shim. Call it on the main thread before any
/// other thread exists (capabilities are per thread and inherited):
/// RLIMIT_NOFILE, the control plane's capability set, confinement of
/// guest-driven threads enabled, and the control plane's deny-list on
/// every thread (TSYNC).
pub fn process(limits: ProcessLimits) -> Result<(), ConfineError> {
    // One malloc arena for the whole process. glibc gives threads arenas
    // of their own, and the first time it shrinks one (at a thread's exit,
    // say) it reads /proc/sys/vm/overcommit_memory: an `openat` on whatever
    // thread that is, which the vCPU and device filters forbid (seen as a
    // SIGSYS of the vsock worker at every VM teardown). The main arena
    // trims with brk(2) and never asks. The shim has a dozen threads; one
    // arena costs nothing measurable there.
    // SAFETY: mallopt sets an allocator parameter; called before the
    // process starts any thread of its own.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) } != 1 {
        return Err(ConfineError::Io {
            what: "limiting malloc to one arena (mallopt M_ARENA_MAX)",
            source: io::Error::other("mallopt refused M_ARENA_MAX"),
        });
    }
    let mut inherited = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass; the result is checked.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut inherited) } != 0 {
        return Err(ConfineError::Io {
            what: "reading RLIMIT_NOFILE",
            source: io::Error::last_os_error(),
        });
    }
    // Raising the hard limit needs CAP_SYS_RESOURCE, which the shim does
    // not keep (and containerd may not have): a lower inherited limit wins.
    let max = limits.max_open_files.min(inherited.rlim_max);
    let rlim = libc::rlimit {
        rlim_cur: max,
        rlim_max: max,
    };
    // SAFETY: setrlimit reads a valid rlimit struct; the result is checked.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rlim) } != 0 {
        return Err(ConfineError::Io {
            what: "setting RLIMIT_NOFILE",
            source: io::Error::last_os_error(),
        });
    }
    caps::drop_to(Role::ControlPlane)?;
    enable()?;
    let program = seccomp::program(Role::ControlPlane)?;
    seccompiler::apply_filter_all_threads(&program)
        .map_err(|e| ConfineError::Install(e.to_string()))?;
    Ok(())
}
