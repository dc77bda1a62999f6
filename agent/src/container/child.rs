//! The code a container process runs between `clone()` and `execve()`.
//!
//! The process is created with `CLONE_VM` (see `mod.rs`): until it execs it
//! shares the agent's memory, including the agent thread's TLS, while the
//! agent keeps running. So the code here:
//! - never allocates, never takes a lock, never panics (no indexing that
//!   can fail, no `unwrap`), and only READS the [`ChildPlan`] that the
//!   agent prepared before cloning and keeps alive until the process exits;
//! - makes every system call through [`sys`] (inline `syscall`
//!   instructions), never through libc wrappers: those write `errno`,
//!   which lives in the agent thread's TLS;
//! - reports success or the first failure to the agent through the
//!   CLOEXEC `report` pipe as a fixed-size [`Report`], then exits with
//!   status 127 on failure.

use std::ffi::{c_char, c_int, c_ulong, c_void, CString};
use std::os::fd::RawFd;

use super::seccomp::Filter;

/// Raw system calls: no libc, no errno. Return values `< 0` are `-errno`.
pub mod sys {
    use std::arch::asm;

    /// # Safety
    /// The caller passes arguments valid for system call `nr`.
    #[inline(always)]
    pub unsafe fn call6(
        nr: i64,
        a: usize,
        b: usize,
        c: usize,
        d: usize,
        e: usize,
        f: usize,
    ) -> isize {
        let ret: isize;
        // SAFETY: the x86-64 Linux system call convention; rcx and r11 are
        // clobbered by `syscall`; the caller vouches for the arguments.
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") nr as isize => ret,
                in("rdi") a,
                in("rsi") b,
                in("rdx") c,
                in("r10") d,
                in("r8") e,
                in("r9") f,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }

    /// # Safety
    /// See [`call6`].
    #[inline(always)]
    pub unsafe fn call(nr: i64, a: usize, b: usize, c: usize, d: usize) -> isize {
        // SAFETY: forwarded.
        unsafe { call6(nr, a, b, c, d, 0, 0) }
    }
}

/// Declares [`Stage`] and its list, so that the two cannot drift apart.
macro_rules! stages {
    ($first:ident, $($rest:ident),* $(,)?) => {
        /// Where the child failed (sent in [`Report::stage`]).
        #[repr(u8)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Stage {
            $first = 1,
            $($rest,)*
        }

        impl Stage {
            const ALL: &'static [Stage] = &[Stage::$first, $(Stage::$rest,)*];
        }
    };
}

stages!(
    Signals,
    Setsid,
    JoinCgroup,
    Setns,
    Chroot,
    UnshareCgroupns,
    OomScoreAdj,
    Stdio,
    Ctty,
    RootPropagation,
    BindRoot,
    Mount,
    Remount,
    Propagation,
    Device,
    Symlink,
    ChdirRoot,
    PivotRoot,
    MoveRoot,
    Sysctl,
    Mask,
    ReadonlyPath,
    RootReadonly,
    Hostname,
    Rlimit,
    Seccomp,
    Setgroups,
    Setgid,
    Setuid,
    Capset,
    NoNewPrivs,
    Cwd,
    Lookup,
    Exec,
);

impl Stage {
    pub fn from_u8(v: u8) -> Option<Stage> {
        Self::ALL.iter().copied().find(|s| *s as u8 == v)
    }
}

/// What the child writes to the report pipe.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Report {
    /// [`REPORT_READY`] or [`REPORT_ERROR`].
    pub kind: u8,
    /// A [`Stage`].
    pub stage: u8,
    pub _pad: u16,
    /// Positive errno.
    pub errno: i32,
    /// Index into the plan's list for the stage (mount number, ...).
    pub index: u32,
}

pub const REPORT_LEN: usize = std::mem::size_of::<Report>();
pub const REPORT_READY: u8 = b'R';
pub const REPORT_ERROR: u8 = b'E';

impl Report {
    pub fn from_bytes(b: &[u8; REPORT_LEN]) -> Report {
        Report {
            kind: b[0],
            stage: b[1],
            _pad: 0,
            errno: i32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
            index: u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        }
    }
}

/// One mount in the container's mount namespace.
#[derive(Debug)]
pub struct MountStep {
    pub source: Option<CString>,
    /// Absolute target (under the rootfs directory, before pivot_root).
    pub target: CString,
    pub fstype: Option<CString>,
    pub flags: c_ulong,
    pub data: Option<CString>,
    pub bind: bool,
    /// Flags of a second `MS_BIND | MS_REMOUNT` call (e.g. read-only binds).
    pub remount: Option<c_ulong>,
    /// Propagation changes applied after mounting.
    pub propagation: Vec<c_ulong>,
    /// Directories to create, top-down, when the target is missing.
    pub parents: Vec<CString>,
}

/// A device node to create.
#[derive(Debug)]
pub struct DeviceNode {
    pub path: CString,
    /// File type and permission bits (`S_IFCHR | 0o666`).
    pub mode: u32,
    pub dev: u64,
    pub uid: u32,
    pub gid: u32,
    pub parents: Vec<CString>,
}

/// Setting up the root file system (init processes only).
#[derive(Debug)]
pub struct RootfsPlan {
    pub root: CString,
    /// Propagation of "/" before anything (default `MS_REC | MS_SLAVE`).
    pub root_propagation: c_ulong,
    pub mounts: Vec<MountStep>,
    pub devices: Vec<DeviceNode>,
    /// (link target, link path under root).
    pub symlinks: Vec<(CString, CString)>,
    /// Sysctl files (`/proc/sys/...`, after pivot) and values.
    pub sysctls: Vec<(CString, Vec<u8>)>,
    pub masked: Vec<CString>,
    pub readonly_paths: Vec<CString>,
    /// Propagation of "/" after pivot_root (`linux.rootfsPropagation`).
    pub final_propagation: Option<c_ulong>,
    pub readonly: bool,
}

/// Capability sets (bit masks over capability numbers).
#[derive(Debug, Clone, Default)]
pub struct Caps {
    pub bounding_drop: Vec<c_ulong>,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: Vec<c_ulong>,
}

/// Everything a container process needs until execve, prepared (and
/// allocated) by the agent before cloning.
pub struct ChildPlan {
    /// Original signal mask of the cloning thread (kernel sigset).
    pub sigmask: u64,
    /// Namespaces to join, in order (the mount namespace last).
    pub setns: Vec<(RawFd, c_int)>,
    /// `cgroup.procs` of the container's cgroup (-1: stay).
    pub cgroup_procs: RawFd,
    /// Directory to chroot into after joining the mount namespace (exec
    /// processes: `/proc/<init>/root`); -1: none.
    pub root_fd: RawFd,
    pub new_cgroupns: bool,
    pub oom_score_adj: Option<Vec<u8>>,
    /// Descriptors to install as 0, 1, 2.
    pub stdio: [RawFd; 3],
    pub terminal: bool,
    /// Descriptors above 2 to keep open (sorted); all others are closed.
    pub keep: Vec<RawFd>,
    pub report: RawFd,
    /// Init processes: wait for a byte here before execve; -1: exec now.
    pub start: RawFd,
    pub rootfs: Option<RootfsPlan>,
    pub hostname: Option<CString>,
    /// (resource, soft, hard).
    pub rlimits: Vec<(c_int, u64, u64)>,
    pub umask: Option<u32>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
    pub caps: Option<Caps>,
    pub no_new_privs: bool,
    pub seccomp: Option<Filter>,
    pub cwd: CString,
    /// Paths to try for the executable, in order (PATH resolution).
    pub candidates: Vec<CString>,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    /// NULL-terminated pointer arrays into `argv` / `envp`.
    pub argv_ptrs: Vec<*const c_char>,
    pub envp_ptrs: Vec<*const c_char>,
}

// SAFETY: the raw pointers point into CStrings owned by the same plan,
// which is never mutated after it is built.
unsafe impl Send for ChildPlan {}
// SAFETY: as above; the plan is read-only once built.
unsafe impl Sync for ChildPlan {}

impl ChildPlan {
    /// Fill the NULL-terminated pointer arrays (call once argv/envp are final).
    pub fn finish_pointers(&mut self) {
        self.argv_ptrs = self.argv.iter().map(|s| s.as_ptr()).collect();
        self.argv_ptrs.push(std::ptr::null());
        self.envp_ptrs = self.envp.iter().map(|s| s.as_ptr()).collect();
        self.envp_ptrs.push(std::ptr::null());
    }
}

/// Signals whose disposition the agent may have changed (SIGPIPE is
/// ignored by Rust's runtime and would stay ignored across execve; SIGCHLD
/// has tokio's handler). Reset to default in the child.
const RESET_SIGNALS: [c_int; 9] = [
    libc::SIGPIPE,
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

const PR_CAP_AMBIENT: usize = 47;
const PR_CAP_AMBIENT_RAISE: usize = 2;
const CLOSE_RANGE_MAX: usize = u32::MAX as usize;

/// Kernel `struct sigaction` for rt_sigaction.
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: c_ulong,
    restorer: usize,
    mask: u64,
}

/// Entry point of the cloned process (`libc::clone` callback).
///
/// `arg` must point to a [`ChildPlan`] that outlives the process' use of
/// it (until it execs or exits); the agent passes nothing else.
pub extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: the agent passes its boxed plan, kept alive until the child
    // exits (see `spawn` in mod.rs).
    let plan = unsafe { &*(arg as *const ChildPlan) };
    // SAFETY: the plan was prepared for this child.
    unsafe { run(plan) }
}

/// Report a failure and exit. Never returns.
unsafe fn fail(plan: &ChildPlan, stage: Stage, errno: isize, index: usize) -> ! {
    let rep = Report {
        kind: REPORT_ERROR,
        stage: stage as u8,
        _pad: 0,
        errno: errno.unsigned_abs() as i32,
        index: index as u32,
    };
    // SAFETY: writes a plain struct from the stack; exits the process.
    unsafe {
        sys::call(
            libc::SYS_write,
            plan.report as usize,
            &rep as *const Report as usize,
            REPORT_LEN,
            0,
        );
        exit(127)
    }
}

unsafe fn exit(code: i32) -> ! {
    loop {
        // SAFETY: exit_group never returns.
        unsafe { sys::call(libc::SYS_exit_group, code as usize, 0, 0, 0) };
    }
}

/// `r` or fail.
#[inline(always)]
unsafe fn ok(plan: &ChildPlan, r: isize, stage: Stage, index: usize) -> isize {
    if r < 0 {
        // SAFETY: see fail.
        unsafe { fail(plan, stage, r, index) }
    }
    r
}

fn ptr(s: &CString) -> usize {
    s.as_ptr() as usize
}

fn opt_ptr(s: &Option<CString>) -> usize {
    match s {
        Some(s) => s.as_ptr() as usize,
        None => 0,
    }
}

unsafe fn mount(src: usize, target: usize, fstype: usize, flags: c_ulong, data: usize) -> isize {
    // SAFETY: NUL-terminated strings or NULL, owned by the plan.
    unsafe {
        sys::call6(
            libc::SYS_mount,
            src,
            target,
            fstype,
            flags as usize,
            data,
            0,
        )
    }
}

unsafe fn mkdirs(parents: &[CString]) {
    for p in parents {
        // SAFETY: plan-owned path; EEXIST and others are ignored (the
        // retried operation reports the real problem).
        unsafe { sys::call(libc::SYS_mkdir, ptr(p), 0o755, 0, 0) };
    }
}

/// Write `data` to the file at `path` (open, write, close).
unsafe fn write_file(path: &CString, data: &[u8]) -> isize {
    // SAFETY: plan-owned buffers.
    unsafe {
        let fd = sys::call(
            libc::SYS_openat,
            libc::AT_FDCWD as usize,
            ptr(path),
            (libc::O_WRONLY | libc::O_CLOEXEC) as usize,
            0,
        );
        if fd < 0 {
            return fd;
        }
        let r = sys::call(
            libc::SYS_write,
            fd as usize,
            data.as_ptr() as usize,
            data.len(),
            0,
        );
        sys::call(libc::SYS_close, fd as usize, 0, 0, 0);
        if r < 0 {
            r
        } else {
            0
        }
    }
}

unsafe fn run(plan: &ChildPlan) -> c_int {
    // SAFETY: every call below is a raw system call on plan-owned,
    // NUL-terminated strings, plan-owned descriptors or stack buffers.
    unsafe {
        // 1. Default signal dispositions, then the original mask (the agent
        //    blocked all signals around clone()).
        let dfl = KernelSigaction {
            handler: 0,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        for sig in RESET_SIGNALS {
            let r = sys::call(
                libc::SYS_rt_sigaction,
                sig as usize,
                &dfl as *const KernelSigaction as usize,
                0,
                8,
            );
            ok(plan, r, Stage::Signals, sig as usize);
        }
        let r = sys::call(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK as usize,
            &plan.sigmask as *const u64 as usize,
            0,
            8,
        );
        ok(plan, r, Stage::Signals, 0);

        // 2. Own session (and process group).
        ok(
            plan,
            sys::call(libc::SYS_setsid, 0, 0, 0, 0),
            Stage::Setsid,
            0,
        );

        // 3. oom_score_adj, through the agent's /proc while we still see it.
        if let Some(v) = &plan.oom_score_adj {
            let path = c"/proc/self/oom_score_adj";
            let fd = sys::call(
                libc::SYS_openat,
                libc::AT_FDCWD as usize,
                path.as_ptr() as usize,
                (libc::O_WRONLY | libc::O_CLOEXEC) as usize,
                0,
            );
            ok(plan, fd, Stage::OomScoreAdj, 0);
            let r = sys::call(
                libc::SYS_write,
                fd as usize,
                v.as_ptr() as usize,
                v.len(),
                0,
            );
            ok(plan, r, Stage::OomScoreAdj, 0);
            sys::call(libc::SYS_close, fd as usize, 0, 0, 0);
        }

        // 4. Join the cgroup (before a new cgroup namespace is made).
        if plan.cgroup_procs >= 0 {
            let r = sys::call(
                libc::SYS_write,
                plan.cgroup_procs as usize,
                b"0".as_ptr() as usize,
                1,
                0,
            );
            ok(plan, r, Stage::JoinCgroup, 0);
        }

        // 5. Join namespaces given by path.
        for (i, (fd, nstype)) in plan.setns.iter().enumerate() {
            let r = sys::call(libc::SYS_setns, *fd as usize, *nstype as usize, 0, 0);
            ok(plan, r, Stage::Setns, i);
        }
        if plan.root_fd >= 0 {
            ok(
                plan,
                sys::call(libc::SYS_fchdir, plan.root_fd as usize, 0, 0, 0),
                Stage::Chroot,
                0,
            );
            ok(
                plan,
                sys::call(libc::SYS_chroot, c".".as_ptr() as usize, 0, 0, 0),
                Stage::Chroot,
                1,
            );
        }
        if plan.new_cgroupns {
            let r = sys::call(libc::SYS_unshare, libc::CLONE_NEWCGROUP as usize, 0, 0, 0);
            ok(plan, r, Stage::UnshareCgroupns, 0);
        }

        // 6. stdio.
        for (i, fd) in plan.stdio.iter().enumerate() {
            if *fd as usize != i {
                let r = sys::call(libc::SYS_dup3, *fd as usize, i, 0, 0);
                ok(plan, r, Stage::Stdio, i);
            }
        }
        if plan.terminal {
            let r = sys::call(libc::SYS_ioctl, 0, libc::TIOCSCTTY as usize, 0, 0);
            ok(plan, r, Stage::Ctty, 0);
        }
        // Close everything else the agent had open (other containers'
        // pipes!), except the report and start pipes.
        let mut lo: usize = 3;
        for k in &plan.keep {
            let k = *k as usize;
            if k >= lo {
                if k > lo {
                    sys::call(libc::SYS_close_range, lo, k - 1, 0, 0);
                }
                lo = k + 1;
            }
        }
        sys::call(libc::SYS_close_range, lo, CLOSE_RANGE_MAX, 0, 0);

        // 7. Root file system.
        if let Some(rootfs) = &plan.rootfs {
            setup_rootfs(plan, rootfs);
        }

        // 8. Hostname (new UTS namespace only; checked by the agent).
        if let Some(h) = &plan.hostname {
            let r = sys::call(libc::SYS_sethostname, ptr(h), h.as_bytes().len(), 0, 0);
            ok(plan, r, Stage::Hostname, 0);
        }

        // 9. rlimits, umask.
        for (i, (res, soft, hard)) in plan.rlimits.iter().enumerate() {
            let lim = [*soft, *hard];
            let r = sys::call(
                libc::SYS_prlimit64,
                0,
                *res as usize,
                lim.as_ptr() as usize,
                0,
            );
            ok(plan, r, Stage::Rlimit, i);
        }
        if let Some(m) = plan.umask {
            sys::call(libc::SYS_umask, m as usize, 0, 0, 0);
        }

        // 10. Without no_new_privs, loading a filter needs CAP_SYS_ADMIN:
        //     load it before the user and capabilities change (as runc).
        if !plan.no_new_privs {
            load_seccomp(plan);
        }

        // 11. User and capabilities.
        set_user(plan);

        // 12. Working directory, executable lookup.
        ok(
            plan,
            sys::call(libc::SYS_chdir, ptr(&plan.cwd), 0, 0, 0),
            Stage::Cwd,
            0,
        );
        let exe = lookup(plan);

        // 13. Init: tell the agent we are ready and wait for Start.
        if plan.start >= 0 {
            let rep = Report {
                kind: REPORT_READY,
                ..Report::default()
            };
            sys::call(
                libc::SYS_write,
                plan.report as usize,
                &rep as *const Report as usize,
                REPORT_LEN,
                0,
            );
            let mut b = 0u8;
            loop {
                let r = sys::call(
                    libc::SYS_read,
                    plan.start as usize,
                    &mut b as *mut u8 as usize,
                    1,
                    0,
                );
                if r == -(libc::EINTR as isize) {
                    continue;
                }
                if r != 1 {
                    // The agent gave up on this container.
                    exit(0);
                }
                break;
            }
            sys::call(libc::SYS_close, plan.start as usize, 0, 0, 0);
        }

        // 14. no_new_privs and the filter as late as possible.
        if plan.no_new_privs {
            let r = sys::call(libc::SYS_prctl, libc::PR_SET_NO_NEW_PRIVS as usize, 1, 0, 0);
            ok(plan, r, Stage::NoNewPrivs, 0);
            load_seccomp(plan);
        }

        let r = sys::call(
            libc::SYS_execve,
            exe,
            plan.argv_ptrs.as_ptr() as usize,
            plan.envp_ptrs.as_ptr() as usize,
            0,
        );
        fail(plan, Stage::Exec, r, 0)
    }
}

unsafe fn load_seccomp(plan: &ChildPlan) {
    if let Some(f) = &plan.seccomp {
        let prog = libc::sock_fprog {
            len: f.program.len() as u16,
            filter: f.program.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: `prog` points to the plan's program.
        let r = unsafe {
            sys::call(
                libc::SYS_seccomp,
                1, // SECCOMP_SET_MODE_FILTER
                f.flags as usize,
                &prog as *const libc::sock_fprog as usize,
                0,
            )
        };
        // SAFETY: see fail.
        unsafe { ok(plan, r, Stage::Seccomp, 0) };
    }
}

unsafe fn set_user(plan: &ChildPlan) {
    // SAFETY: raw calls on plan-owned data.
    unsafe {
        if let Some(caps) = &plan.caps {
            for c in &caps.bounding_drop {
                // EINVAL for caps this kernel does not know: ignore.
                sys::call(
                    libc::SYS_prctl,
                    libc::PR_CAPBSET_DROP as usize,
                    *c as usize,
                    0,
                    0,
                );
            }
            if plan.uid != 0 {
                sys::call(libc::SYS_prctl, libc::PR_SET_KEEPCAPS as usize, 1, 0, 0);
            }
        }
        let r = sys::call(
            libc::SYS_setgroups,
            plan.groups.len(),
            plan.groups.as_ptr() as usize,
            0,
            0,
        );
        ok(plan, r, Stage::Setgroups, 0);
        let g = plan.gid as usize;
        ok(
            plan,
            sys::call(libc::SYS_setresgid, g, g, g, 0),
            Stage::Setgid,
            0,
        );
        let u = plan.uid as usize;
        ok(
            plan,
            sys::call(libc::SYS_setresuid, u, u, u, 0),
            Stage::Setuid,
            0,
        );
        if let Some(caps) = &plan.caps {
            #[repr(C)]
            struct Header {
                version: u32,
                pid: i32,
            }
            #[repr(C)]
            struct Data {
                effective: u32,
                permitted: u32,
                inheritable: u32,
            }
            let hdr = Header {
                version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
                pid: 0,
            };
            let data = [
                Data {
                    effective: caps.effective as u32,
                    permitted: caps.permitted as u32,
                    inheritable: caps.inheritable as u32,
                },
                Data {
                    effective: (caps.effective >> 32) as u32,
                    permitted: (caps.permitted >> 32) as u32,
                    inheritable: (caps.inheritable >> 32) as u32,
                },
            ];
            let r = sys::call(
                libc::SYS_capset,
                &hdr as *const Header as usize,
                data.as_ptr() as usize,
                0,
                0,
            );
            ok(plan, r, Stage::Capset, 0);
            for c in &caps.ambient {
                // Like runc: failures to raise ambient caps are ignored.
                sys::call(
                    libc::SYS_prctl,
                    PR_CAP_AMBIENT,
                    PR_CAP_AMBIENT_RAISE,
                    *c as usize,
                    0,
                );
            }
        }
    }
}

/// The first candidate that is an executable regular file, or fail with
/// ENOENT (none exists) / EACCES (one exists but is not executable).
unsafe fn lookup(plan: &ChildPlan) -> usize {
    let mut denied = false;
    for c in &plan.candidates {
        // SAFETY: stat into a stack buffer.
        unsafe {
            let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
            let r = sys::call(
                libc::SYS_newfstatat,
                libc::AT_FDCWD as usize,
                ptr(c),
                st.as_mut_ptr() as usize,
                0,
            );
            if r < 0 {
                if r == -(libc::EACCES as isize) {
                    denied = true;
                }
                continue;
            }
            let st = st.assume_init();
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                denied = true;
                continue;
            }
            let r = sys::call(
                libc::SYS_faccessat,
                libc::AT_FDCWD as usize,
                ptr(c),
                libc::X_OK as usize,
                0,
            );
            if r == 0 {
                return ptr(c);
            }
            denied = true;
        }
    }
    let errno = if denied { libc::EACCES } else { libc::ENOENT };
    // SAFETY: see fail.
    unsafe { fail(plan, Stage::Lookup, errno as isize, 0) }
}

unsafe fn setup_rootfs(plan: &ChildPlan, fs: &RootfsPlan) {
    // SAFETY: raw calls on plan-owned strings.
    unsafe {
        let r = mount(0, c"/".as_ptr() as usize, 0, fs.root_propagation, 0);
        ok(plan, r, Stage::RootPropagation, 0);
        let r = mount(
            ptr(&fs.root),
            ptr(&fs.root),
            0,
            libc::MS_BIND | libc::MS_REC,
            0,
        );
        ok(plan, r, Stage::BindRoot, 0);

        for (i, m) in fs.mounts.iter().enumerate() {
            let src = opt_ptr(&m.source);
            let mut r = mount(
                src,
                ptr(&m.target),
                opt_ptr(&m.fstype),
                m.flags,
                opt_ptr(&m.data),
            );
            if r == -(libc::ENOENT as isize) {
                mkdirs(&m.parents);
                let mut file = false;
                if m.bind {
                    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
                    let s = sys::call(
                        libc::SYS_newfstatat,
                        libc::AT_FDCWD as usize,
                        src,
                        st.as_mut_ptr() as usize,
                        0,
                    );
                    file = s == 0 && st.assume_init().st_mode & libc::S_IFMT != libc::S_IFDIR;
                }
                if file {
                    let fd = sys::call(
                        libc::SYS_openat,
                        libc::AT_FDCWD as usize,
                        ptr(&m.target),
                        (libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC) as usize,
                        0o644,
                    );
                    if fd >= 0 {
                        sys::call(libc::SYS_close, fd as usize, 0, 0, 0);
                    }
                } else {
                    sys::call(libc::SYS_mkdir, ptr(&m.target), 0o755, 0, 0);
                }
                r = mount(
                    src,
                    ptr(&m.target),
                    opt_ptr(&m.fstype),
                    m.flags,
                    opt_ptr(&m.data),
                );
            }
            ok(plan, r, Stage::Mount, i);
            if let Some(flags) = m.remount {
                let r = mount(0, ptr(&m.target), 0, flags, 0);
                ok(plan, r, Stage::Remount, i);
            }
            for p in &m.propagation {
                let r = mount(0, ptr(&m.target), 0, *p, 0);
                ok(plan, r, Stage::Propagation, i);
            }
        }

        for (i, d) in fs.devices.iter().enumerate() {
            let mut r = sys::call(
                libc::SYS_mknodat,
                libc::AT_FDCWD as usize,
                ptr(&d.path),
                d.mode as usize,
                d.dev as usize,
            );
            if r == -(libc::ENOENT as isize) {
                mkdirs(&d.parents);
                r = sys::call(
                    libc::SYS_mknodat,
                    libc::AT_FDCWD as usize,
                    ptr(&d.path),
                    d.mode as usize,
                    d.dev as usize,
                );
            }
            if r == -(libc::EEXIST as isize) {
                continue;
            }
            ok(plan, r, Stage::Device, i);
            if d.uid != 0 || d.gid != 0 {
                let r = sys::call6(
                    libc::SYS_fchownat,
                    libc::AT_FDCWD as usize,
                    ptr(&d.path),
                    d.uid as usize,
                    d.gid as usize,
                    0,
                    0,
                );
                ok(plan, r, Stage::Device, i);
            }
        }
        for (i, (target, link)) in fs.symlinks.iter().enumerate() {
            let r = sys::call(
                libc::SYS_symlinkat,
                ptr(target),
                libc::AT_FDCWD as usize,
                ptr(link),
                0,
            );
            if r < 0 && r != -(libc::EEXIST as isize) {
                fail(plan, Stage::Symlink, r, i);
            }
        }

        // pivot_root, or MS_MOVE + chroot when the current root cannot be
        // pivoted away from (the guest's root is the initramfs, which has
        // no parent mount: pivot_root answers EINVAL there).
        ok(
            plan,
            sys::call(libc::SYS_chdir, ptr(&fs.root), 0, 0, 0),
            Stage::ChdirRoot,
            0,
        );
        let dot = c".".as_ptr() as usize;
        let r = sys::call(libc::SYS_pivot_root, dot, dot, 0, 0);
        if r == 0 {
            // The old root now sits on top of "."; keep unmounts from
            // propagating to the agent, then detach it.
            let r = mount(0, dot, 0, libc::MS_SLAVE | libc::MS_REC, 0);
            ok(plan, r, Stage::PivotRoot, 1);
            let r = sys::call(libc::SYS_umount2, dot, libc::MNT_DETACH as usize, 0, 0);
            ok(plan, r, Stage::PivotRoot, 2);
        } else if r == -(libc::EINVAL as isize) {
            let r = mount(dot, c"/".as_ptr() as usize, 0, libc::MS_MOVE, 0);
            ok(plan, r, Stage::MoveRoot, 0);
            ok(
                plan,
                sys::call(libc::SYS_chroot, dot, 0, 0, 0),
                Stage::MoveRoot,
                1,
            );
        } else {
            fail(plan, Stage::PivotRoot, r, 0);
        }
        ok(
            plan,
            sys::call(libc::SYS_chdir, c"/".as_ptr() as usize, 0, 0, 0),
            Stage::ChdirRoot,
            1,
        );

        for (i, (path, value)) in fs.sysctls.iter().enumerate() {
            let r = write_file(path, value);
            ok(plan, r, Stage::Sysctl, i);
        }
        for (i, p) in fs.masked.iter().enumerate() {
            let mut r = mount(c"/dev/null".as_ptr() as usize, ptr(p), 0, libc::MS_BIND, 0);
            if r == -(libc::ENOTDIR as isize) {
                r = mount(
                    c"tmpfs".as_ptr() as usize,
                    ptr(p),
                    c"tmpfs".as_ptr() as usize,
                    libc::MS_RDONLY,
                    c"size=0k".as_ptr() as usize,
                );
            }
            if r < 0 && r != -(libc::ENOENT as isize) {
                fail(plan, Stage::Mask, r, i);
            }
        }
        for (i, p) in fs.readonly_paths.iter().enumerate() {
            let r = mount(ptr(p), ptr(p), 0, libc::MS_BIND | libc::MS_REC, 0);
            if r == -(libc::ENOENT as isize) {
                continue;
            }
            ok(plan, r, Stage::ReadonlyPath, i);
            let flags = libc::MS_BIND
                | libc::MS_REMOUNT
                | libc::MS_RDONLY
                | libc::MS_REC
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC;
            let r = mount(ptr(p), ptr(p), 0, flags, 0);
            ok(plan, r, Stage::ReadonlyPath, i);
        }
        if let Some(p) = fs.final_propagation {
            let r = mount(0, c"/".as_ptr() as usize, 0, p, 0);
            ok(plan, r, Stage::RootPropagation, 1);
        }
        if fs.readonly {
            let r = mount(
                0,
                c"/".as_ptr() as usize,
                0,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                0,
            );
            ok(plan, r, Stage::RootReadonly, 0);
        }
    }
}

#[cfg(test)]
mod stage_tests {
    use super::Stage;

    #[test]
    fn every_stage_round_trips_through_its_byte() {
        for (i, s) in Stage::ALL.iter().enumerate() {
            assert_eq!(*s as u8 as usize, i + 1);
            assert_eq!(Stage::from_u8(*s as u8), Some(*s));
        }
        assert_eq!(Stage::from_u8(0), None);
        assert_eq!(Stage::from_u8(Stage::ALL.len() as u8 + 1), None);
    }
}
