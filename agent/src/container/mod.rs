//! Containers and their processes, written by hand with libc/nix (no
//! youki `libcontainer`).
//!
//! # Why not libcontainer
//! libcontainer's init is a multi-stage dance (intermediate process for
//! namespaces, init process, plus a fork for the pid namespace): several
//! forks per container process. In the guest this project targets, guest
//! ring 0 is emulated: one fork+exec costs ~8 s and every syscall ~2.4 ms,
//! and every page the agent touches after a `fork()` costs a copy-on-write
//! fault in emulated ring 0. It also needs libseccomp (a C library) for
//! seccomp. So the agent creates each container process itself, with
//! exactly ONE `clone()`:
//!
//! # Process creation: one clone per process
//! - `clone(CLONE_VM | <CLONE_NEW* of the spec> | SIGCHLD)` on a stack the
//!   agent allocated, like `posix_spawn`: with `CLONE_VM` no page tables
//!   are copied and neither side takes copy-on-write faults. The new pid
//!   namespace comes from the clone flags, so the process itself is pid 1
//!   of it (no second fork). The cgroup namespace is unshared by the child
//!   AFTER it joined the container cgroup (so that cgroup is its root).
//! - The child runs `child::child_main` until `execve`: raw syscalls
//!   only, no allocation, no locks (see `child.rs`); everything it needs
//!   (strings, mount list, BPF program, descriptors) is prepared in a
//!   [`child::ChildPlan`] before cloning. The plan and the stack are owned
//!   by the task that waits for the process' exit, so they outlive the
//!   child's use of them.
//! - Exec processes must enter the init's pid namespace, which `setns`
//!   only applies to children: the agent thread calls
//!   `setns(/proc/<init>/ns/pid)` right before the clone and restores its
//!   own pid namespace right after. The other namespaces are joined by the
//!   child (mount namespace last, then chroot to `/proc/<init>/root`).
//! - The init process of a container is created at CreateContainer and
//!   blocks on the read end of a "start" pipe right before execve (after
//!   the executable was looked up, so a missing command fails Create);
//!   StartContainer writes one byte. The child reports "ready" or the
//!   failing step + errno through a CLOEXEC "report" pipe; EOF on that
//!   pipe means execve succeeded.
//! - All children are registered with the [`Reaper`] while its lock is
//!   held across the clone (`spawn_owned`).
//!
//! # Root file system
//! The rootfs mounts of the request are mounted by the agent in its own
//! mount namespace on `<run dir>/containers/<id>/rootfs`; spec mounts are
//! done by the child in the container's new mount namespace. The child
//! then tries `pivot_root`; in the VM the agent's root is the initramfs
//! (rootfs), which has no parent mount, and pivot_root answers EINVAL
//! there, so it falls back to `mount(MS_MOVE)` of the new root onto "/"
//! plus `chroot(".")` (runc's `--no-pivot`). The initramfs stays
//! underneath, unreachable by path (lookups land on the mount on top).

pub mod cgroup;
pub mod child;
pub mod events;
pub mod mountopts;
pub mod seccomp;
pub mod spec;
pub mod stdio;
pub mod syscalls;

use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use ember_proto::agent::*;
use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Process, Spec};
use tokio::io::unix::AsyncFd;
use tokio::sync::{watch, Notify};
use ttrpc::Code;

use crate::reaper::{Exit, Reaper};
use crate::service::rpc_error;
use child::{ChildPlan, Report, Stage, REPORT_ERROR, REPORT_LEN, REPORT_READY};
use stdio::{ChildFds, ProcessIo, Transport};

type R<T> = Result<T, ttrpc::Error>;

/// Stack of a cloned child until it execs.
const CHILD_STACK: usize = 256 * 1024;

/// How long Remove waits for processes to die and the cgroup to empty.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long Pause/Resume wait for `cgroup.events` to confirm.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where things live.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Agent state: containers in `<run_dir>/containers/<id>`, test-mode
    /// stdio sockets in `<run_dir>/stdio-<port>.sock`.
    pub run_dir: PathBuf,
    /// Where the virtio-fs share "ember" is mounted; spec paths under
    /// `/run/ember/shared` are rewritten to this directory.
    pub shared_dir: PathBuf,
    /// Parent of the container cgroups (cgroup v2); None: no cgroups.
    pub cgroup_root: Option<PathBuf>,
    pub stdio: Transport,
}

struct Proc {
    pid: i32,
    exit: watch::Receiver<Option<Exit>>,
    io: ProcessIo,
    /// Init only, until started: (start pipe write end, report pipe).
    start: tokio::sync::Mutex<Option<(OwnedFd, AsyncFd<OwnedFd>)>>,
    started: AtomicBool,
}

impl Proc {
    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }
}

struct Container {
    id: String,
    dir: PathBuf,
    /// Mounts made in the agent's namespace (rootfs), in mount order.
    mounts: Vec<PathBuf>,
    cgroup: Option<PathBuf>,
    events: Option<Arc<Notify>>,
    /// Namespace types of the init (new or joined), for exec.
    namespaces: Vec<LinuxNamespaceType>,
    seccomp: Option<seccomp::Filter>,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
}

/// All containers of the VM.
pub struct Manager {
    settings: Settings,
    reaper: Reaper,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    creating: Mutex<HashSet<String>>,
    ports: stdio::Ports,
    watcher: OnceLock<Option<events::Watcher>>,
    cgroups_ready: OnceLock<bool>,
    own_pidns: OnceLock<Option<OwnedFd>>,
}

fn errno_str(e: i32) -> String {
    let name = nix::errno::Errno::from_raw(e);
    format!("{name:?}: {}", io::Error::from_raw_os_error(e))
}

fn internal(what: impl std::fmt::Display, e: impl std::fmt::Display) -> ttrpc::Error {
    rpc_error(Code::INTERNAL, format!("{what}: {e}"))
}

fn invalid(msg: impl std::fmt::Display) -> ttrpc::Error {
    rpc_error(Code::INVALID_ARGUMENT, msg.to_string())
}

fn validate_id(id: &str, what: &str) -> R<()> {
    if id.is_empty() || id == "." || id == ".." || id.contains('/') || id.contains('\0') {
        return Err(invalid(format!("invalid {what} {id:?}")));
    }
    Ok(())
}

fn open_path(p: &Path, flags: i32) -> io::Result<OwnedFd> {
    let c = spec::path_cstring(p).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: valid C string; result checked.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Read one report (None on EOF).
async fn read_report(fd: &AsyncFd<OwnedFd>) -> io::Result<Option<Report>> {
    let mut buf = [0u8; REPORT_LEN];
    let mut got = 0;
    while got < REPORT_LEN {
        let mut guard = fd.readable().await?;
        match guard.try_io(|fd| {
            // SAFETY: reads into the rest of `buf`.
            let n = unsafe {
                libc::read(
                    fd.get_ref().as_raw_fd(),
                    buf[got..].as_mut_ptr().cast(),
                    REPORT_LEN - got,
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        }) {
            Ok(Ok(0)) => return Ok(None),
            Ok(Ok(n)) => got += n,
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(Some(Report::from_bytes(&buf)))
}

/// A readable message for a child's failure report.
fn describe_failure(rep: &Report, plan: &ChildPlan) -> String {
    let stage = Stage::from_u8(rep.stage);
    let err = errno_str(rep.errno);
    let i = rep.index as usize;
    match stage {
        Some(Stage::Lookup) => {
            let arg0 = plan
                .argv
                .first()
                .map(|a| a.to_string_lossy().into_owned())
                .unwrap_or_default();
            if rep.errno == libc::ENOENT {
                if arg0.contains('/') {
                    format!("exec: \"{arg0}\": stat {arg0}: no such file or directory")
                } else {
                    format!("exec: \"{arg0}\": executable file not found in $PATH")
                }
            } else {
                format!("exec: \"{arg0}\": permission denied")
            }
        }
        Some(Stage::Exec) => {
            let arg0 = plan
                .argv
                .first()
                .map(|a| a.to_string_lossy().into_owned())
                .unwrap_or_default();
            format!("exec: \"{arg0}\": execve: {err}")
        }
        Some(s @ (Stage::Mount | Stage::Remount | Stage::Propagation)) => {
            let m = plan.rootfs.as_ref().and_then(|r| r.mounts.get(i));
            match m {
                Some(m) => format!(
                    "{s:?}: mount {} on {} (type {}): {err}",
                    m.source
                        .as_ref()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    m.target.to_string_lossy(),
                    m.fstype
                        .as_ref()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "bind".into())
                ),
                None => format!("{s:?} #{i}: {err}"),
            }
        }
        Some(Stage::Cwd) => format!("chdir to cwd {:?}: {err}", plan.cwd),
        Some(s) => format!("container process setup, step {s:?} #{i}: {err}"),
        None => format!("container process setup failed (step {}): {err}", rep.stage),
    }
}

struct Spawned {
    pid: i32,
    plan: Arc<ChildPlan>,
    exit: watch::Receiver<Option<Exit>>,
    report: AsyncFd<OwnedFd>,
    start: Option<OwnedFd>,
}

impl Manager {
    pub fn new(settings: Settings, reaper: Reaper) -> Manager {
        Manager {
            settings,
            reaper,
            containers: Default::default(),
            creating: Default::default(),
            ports: Default::default(),
            watcher: OnceLock::new(),
            cgroups_ready: OnceLock::new(),
            own_pidns: OnceLock::new(),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn watcher(&self) -> Option<&events::Watcher> {
        self.watcher
            .get_or_init(|| match events::Watcher::start() {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(
                        "inotify unavailable: {e}; no OOM events, no freeze confirmation"
                    );
                    None
                }
            })
            .as_ref()
    }

    /// The cgroup root, prepared once; None when cgroups are unavailable.
    fn cgroup_root(&self) -> Option<&Path> {
        let root = self.settings.cgroup_root.as_deref()?;
        let ok = *self.cgroups_ready.get_or_init(|| {
            let parent = root.parent().unwrap_or(root);
            if !cgroup::is_cgroup2(parent) {
                tracing::warn!(
                    "{} is not on cgroup v2: containers get no cgroup",
                    parent.display()
                );
                return false;
            }
            match cgroup::prepare_root(root) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(
                        "cgroup root {}: {e}; containers get no cgroup",
                        root.display()
                    );
                    false
                }
            }
        });
        ok.then_some(root)
    }

    fn get(&self, id: &str) -> R<Arc<Container>> {
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| rpc_error(Code::NOT_FOUND, format!("container {id} not found")))
    }

    fn process(&self, c: &Container, exec_id: &str) -> R<Arc<Proc>> {
        if exec_id.is_empty() {
            return Ok(c.init.clone());
        }
        c.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| {
                rpc_error(
                    Code::NOT_FOUND,
                    format!("exec {exec_id} not found in container {}", c.id),
                )
            })
    }

    fn own_pidns(&self) -> Option<RawFd> {
        self.own_pidns
            .get_or_init(|| open_path(Path::new("/proc/self/ns/pid"), libc::O_RDONLY).ok())
            .as_ref()
            .map(|f| f.as_raw_fd())
    }

    /// Clone the child (see the module docs). `fds` are closed in the
    /// agent once the child exists.
    fn spawn(
        &self,
        mut plan: Box<ChildPlan>,
        flags: libc::c_int,
        pidns: Option<OwnedFd>,
        child_fds: ChildFds,
        fds: Vec<OwnedFd>,
        with_start: bool,
    ) -> R<Spawned> {
        let (report_r, report_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| internal("pipe2", e))?;
        stdio::set_nonblocking(&report_r).map_err(|e| internal("fcntl", e))?;
        let start = if with_start {
            Some(
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                    .map_err(|e| internal("pipe2", e))?,
            )
        } else {
            None
        };
        plan.report = report_w.as_raw_fd();
        plan.start = start.as_ref().map(|(r, _)| r.as_raw_fd()).unwrap_or(-1);
        plan.keep = vec![plan.report];
        if plan.start >= 0 {
            plan.keep.push(plan.start);
        }
        plan.keep.sort_unstable();
        plan.stdio = child_fds.raw();
        plan.terminal = child_fds.terminal;
        let restore_pidns = if pidns.is_some() {
            self.own_pidns()
        } else {
            None
        };
        if pidns.is_some() && restore_pidns.is_none() {
            return Err(internal("open /proc/self/ns/pid", "unavailable"));
        }
        // Final address of the plan BEFORE cloning: the child reads it
        // through this pointer (moving it afterwards, e.g. Box -> Arc,
        // would free the memory the child is reading).
        let mut plan: Arc<ChildPlan> = Arc::from(plan);
        let mut stack = vec![0u8; CHILD_STACK].into_boxed_slice();
        let top = (stack.as_mut_ptr() as usize + CHILD_STACK) & !15;

        let (pid, exit_rx) = self
            .reaper
            .spawn_owned(|| {
                // Block every signal around clone(): the child must not run
                // the agent's handlers before it reset them.
                let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
                let mut old = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
                // SAFETY: sigfillset/pthread_sigmask on local sets.
                unsafe {
                    libc::sigfillset(all.as_mut_ptr());
                    libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), old.as_mut_ptr());
                }
                // SAFETY: initialised by pthread_sigmask; the kernel's
                // sigset is the first 64 bits of glibc's.
                let mask = unsafe { *(old.as_ptr() as *const u64) };
                if let Some(p) = Arc::get_mut(&mut plan) {
                    p.sigmask = mask;
                }
                let restore_mask = || {
                    // SAFETY: restores the mask saved above.
                    unsafe {
                        libc::pthread_sigmask(libc::SIG_SETMASK, old.as_ptr(), std::ptr::null_mut())
                    };
                };
                if let Some(ns) = &pidns {
                    // SAFETY: valid namespace descriptor.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
                        let e = io::Error::last_os_error();
                        restore_mask();
                        return Err(io::Error::new(e.kind(), format!("setns(pid): {e}")));
                    }
                }
                let arg = Arc::as_ptr(&plan) as *mut c_void;
                // SAFETY: CLONE_VM child on its own stack, running
                // `child_main` on the plan, which (like the stack) is kept
                // alive by the exit task below until the child exits.
                let pid = unsafe {
                    libc::clone(
                        child::child_main,
                        top as *mut c_void,
                        flags | libc::CLONE_VM | libc::SIGCHLD,
                        arg,
                    )
                };
                let err = io::Error::last_os_error();
                if let Some(own) = restore_pidns {
                    // SAFETY: our own pid namespace (always allowed).
                    if unsafe { libc::setns(own, libc::CLONE_NEWPID) } != 0 {
                        tracing::error!(
                            "restoring the agent's pid namespace: {}",
                            io::Error::last_os_error()
                        );
                    }
                }
                restore_mask();
                if pid < 0 {
                    Err(io::Error::new(err.kind(), format!("clone: {err}")))
                } else {
                    Ok((pid, pid))
                }
            })
            .map_err(|e| internal("creating the container process", e))?;
        // The child has its own copies now.
        drop(child_fds);
        drop(fds);
        drop(report_w);
        drop(pidns);
        let start_w = start.map(|(r, w)| {
            drop(r);
            w
        });
        let (tx, rx) = watch::channel(None);
        let keep = plan.clone();
        tokio::spawn(async move {
            let exit = exit_rx.await.unwrap_or(Exit {
                pid,
                status: 255,
                exited_at: SystemTime::now(),
            });
            let _ = tx.send(Some(exit));
            // Only now may the plan and the stack go.
            drop(keep);
            drop(stack);
        });
        let report = stdio::async_fd(report_r).map_err(|e| internal("epoll", e))?;
        Ok(Spawned {
            pid,
            exit: rx,
            report,
            start: start_w,
            plan,
        })
    }
}

/// Mounts done in the agent's namespace, undone on failure or Remove.
fn unmount_all(mounts: &[PathBuf]) {
    for m in mounts.iter().rev() {
        if let Err(e) = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!("unmounting {}: {e}", m.display());
        }
    }
}

/// Remove the (empty) state directories of a container; never recursive,
/// so a failed unmount can never delete a rootfs' content.
fn remove_dirs(dir: &Path) {
    let _ = std::fs::remove_dir(dir.join("rootfs"));
    let _ = std::fs::remove_dir(dir);
}

/// Wait until `key` in the cgroup's `cgroup.events` equals `want`.
async fn wait_cgroup_event(
    dir: &Path,
    events: Option<&Arc<Notify>>,
    key: &str,
    want: u64,
    timeout: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let notified = events.map(|n| n.notified());
        tokio::pin!(notified);
        if let Some(n) = notified.as_mut().as_pin_mut() {
            n.enable();
        }
        let content = std::fs::read_to_string(dir.join("cgroup.events")).unwrap_or_default();
        match cgroup::keyed(&content, key) {
            Some(v) if v == want => return true,
            None => return false,
            _ => {}
        }
        match notified.as_pin_mut() {
            Some(n) => {
                if tokio::time::timeout_at(deadline, n).await.is_err() {
                    return false;
                }
            }
            // No inotify: re-check slowly until the deadline.
            None => {
                if tokio::time::Instant::now() >= deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

impl Manager {
    pub async fn create(&self, req: CreateContainerRequest) -> R<CreateContainerResponse> {
        let id = req.container_id.clone();
        validate_id(&id, "container id")?;
        let spec: Spec = serde_json::from_slice(&req.oci_spec)
            .map_err(|e| invalid(format!("CreateContainer: invalid OCI spec: {e}")))?;
        {
            let containers = self.containers.lock().unwrap_or_else(|p| p.into_inner());
            let mut creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
            if containers.contains_key(&id) || !creating.insert(id.clone()) {
                return Err(rpc_error(
                    Code::ALREADY_EXISTS,
                    format!("container {id} already exists"),
                ));
            }
        }
        let r = self.create_inner(&id, &spec, &req).await;
        self.creating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        match &r {
            Ok(_) => tracing::info!("container {id} created"),
            Err(e) => tracing::warn!("CreateContainer {id}: {e}"),
        }
        r
    }

    async fn create_inner(
        &self,
        id: &str,
        spec: &Spec,
        req: &CreateContainerRequest,
    ) -> R<CreateContainerResponse> {
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| invalid("the OCI spec has no process"))?;
        let linux = spec.linux().clone().unwrap_or_default();
        if linux.uid_mappings().as_ref().is_some_and(|m| !m.is_empty())
            || linux.gid_mappings().as_ref().is_some_and(|m| !m.is_empty())
        {
            return Err(invalid(
                "user namespaces (uid/gid mappings) are not supported by the Ember agent",
            ));
        }

        // Namespaces: new ones as clone flags, given paths opened now.
        let mut flags: libc::c_int = 0;
        let mut setns: Vec<(OwnedFd, libc::c_int)> = Vec::new();
        let mut pidns = None;
        let mut types = Vec::new();
        let (mut new_mnt, mut new_uts, mut new_cgroupns, mut any_mnt) =
            (false, false, false, false);
        for ns in linux.namespaces().iter().flatten() {
            let t = ns.typ();
            match t {
                LinuxNamespaceType::User => {
                    return Err(invalid(
                        "user namespaces are not supported by the Ember agent",
                    ))
                }
                LinuxNamespaceType::Time => {
                    tracing::warn!("container {id}: time namespace ignored");
                    continue;
                }
                _ => {}
            }
            if types.contains(&t) {
                return Err(invalid(format!(
                    "namespace {} listed twice",
                    spec::ns_name(t)
                )));
            }
            types.push(t);
            any_mnt |= t == LinuxNamespaceType::Mount;
            match ns.path() {
                Some(p) if !p.as_os_str().is_empty() => {
                    let fd = open_path(p, libc::O_RDONLY)
                        .map_err(|e| invalid(format!("namespace path {}: {e}", p.display())))?;
                    if t == LinuxNamespaceType::Pid {
                        pidns = Some(fd);
                    } else {
                        setns.push((fd, spec::ns_flag(t)));
                    }
                }
                _ => match t {
                    LinuxNamespaceType::Cgroup => new_cgroupns = true,
                    _ => {
                        new_mnt |= t == LinuxNamespaceType::Mount;
                        new_uts |= t == LinuxNamespaceType::Uts;
                        flags |= spec::ns_flag(t);
                    }
                },
            }
        }
        if !any_mnt {
            return Err(invalid("the spec must list a mount namespace"));
        }
        // The mount namespace is joined last.
        setns.sort_by_key(|(_, t)| (*t == libc::CLONE_NEWNS) as u8);

        let dir = self.settings.run_dir.join("containers").join(id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| internal(format!("mkdir {}", dir.display()), e))?;
        let mut mounts = Vec::new();
        let cleanup_early = |mounts: &[PathBuf]| {
            unmount_all(mounts);
            remove_dirs(&dir);
        };

        // Root file system.
        let root = if req.rootfs.is_empty() {
            let p = spec
                .root()
                .as_ref()
                .map(|r| r.path().clone())
                .ok_or_else(|| invalid("no rootfs mounts and no root.path in the spec"))?;
            if !p.is_absolute() {
                cleanup_early(&mounts);
                return Err(invalid(format!(
                    "root.path {} must be absolute",
                    p.display()
                )));
            }
            spec::rewrite_shared(&p, &self.settings.shared_dir)
        } else {
            let root = dir.join("rootfs");
            if let Err(e) = std::fs::create_dir_all(&root) {
                cleanup_early(&mounts);
                return Err(internal(format!("mkdir {}", root.display()), e));
            }
            for m in &req.rootfs {
                let target = if m.target.is_empty() {
                    root.clone()
                } else {
                    PathBuf::from(&m.target)
                };
                match crate::sandbox::mount(m, &target, &self.settings.shared_dir) {
                    Ok(()) => mounts.push(target),
                    Err(e) => {
                        cleanup_early(&mounts);
                        return Err(e);
                    }
                }
            }
            root
        };

        // cgroup.
        let cgroup_dir = self.cgroup_root().map(|r| cgroup::container_dir(r, id));
        let mut cgroup_procs = None;
        if let Some(cg) = &cgroup_dir {
            let r = std::fs::create_dir(cg)
                .or_else(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(|e| internal(format!("mkdir {}", cg.display()), e))
                .and_then(|()| match linux.resources() {
                    Some(res) => cgroup::apply(cg, res).map_err(invalid),
                    None => Ok(()),
                })
                .and_then(|()| {
                    open_path(&cg.join("cgroup.procs"), libc::O_WRONLY)
                        .map_err(|e| internal(format!("open {}/cgroup.procs", cg.display()), e))
                });
            match r {
                Ok(fd) => cgroup_procs = Some(fd),
                Err(e) => {
                    let _ = std::fs::remove_dir(cg);
                    cleanup_early(&mounts);
                    return Err(e);
                }
            }
        }

        let built = (|| -> Result<(Box<ChildPlan>, Option<seccomp::Filter>), String> {
            let mut plan = Box::new(spec::process_plan(process)?);
            if new_mnt {
                let cg_mount = match (&cgroup_dir, new_cgroupns) {
                    (None, _) => spec::CgroupMount::Skip,
                    (Some(_), true) => spec::CgroupMount::Namespaced,
                    (Some(d), false) => spec::CgroupMount::Bind(d),
                };
                plan.rootfs = Some(spec::rootfs_plan(
                    spec,
                    &root,
                    &self.settings.shared_dir,
                    cg_mount,
                )?);
            } else {
                // Joined mount namespace: just enter the root.
                tracing::info!(
                    "container {id}: joins an existing mount namespace; no rootfs setup"
                );
            }
            if let Some(h) = spec.hostname().as_ref().filter(|h| !h.is_empty()) {
                if new_uts {
                    plan.hostname = Some(spec::cstring(h)?);
                } else {
                    tracing::info!("container {id}: hostname {h:?} ignored (no new UTS namespace)");
                }
            }
            let filter = linux.seccomp().as_ref().map(seccomp::compile).transpose()?;
            plan.seccomp = filter.clone();
            plan.new_cgroupns = new_cgroupns;
            Ok((plan, filter))
        })();
        let (mut plan, filter) = match built {
            Ok(v) => v,
            Err(e) => {
                if let Some(cg) = &cgroup_dir {
                    let _ = std::fs::remove_dir(cg);
                }
                cleanup_early(&mounts);
                return Err(invalid(format!("CreateContainer: {e}")));
            }
        };
        plan.setns = setns.iter().map(|(fd, t)| (fd.as_raw_fd(), *t)).collect();
        plan.cgroup_procs = cgroup_procs.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1);

        let stdio_req = req.stdio.clone().unwrap_or_default();
        let (child_fds, host, ports) =
            match stdio::setup(&stdio_req, &self.settings.stdio, &self.ports) {
                Ok(v) => v,
                Err(e) => {
                    if let Some(cg) = &cgroup_dir {
                        let _ = std::fs::remove_dir(cg);
                    }
                    cleanup_early(&mounts);
                    return Err(internal("setting up stdio", e));
                }
            };
        let mut fds: Vec<OwnedFd> = setns.into_iter().map(|(fd, _)| fd).collect();
        fds.extend(cgroup_procs);
        let spawned = match self.spawn(plan, flags, pidns, child_fds, fds, true) {
            Ok(s) => s,
            Err(e) => {
                if let Some(cg) = &cgroup_dir {
                    let _ = std::fs::remove_dir(cg);
                }
                cleanup_early(&mounts);
                return Err(e);
            }
        };
        let io = host.start();
        let report = read_report(&spawned.report).await;
        let failure = match report {
            Ok(Some(r)) if r.kind == REPORT_READY => None,
            Ok(Some(r)) if r.kind == REPORT_ERROR => Some(describe_failure(&r, &spawned.plan)),
            Ok(Some(r)) => Some(format!(
                "unexpected report {r:?} from the container process"
            )),
            Ok(None) => Some("the container process exited during setup".to_string()),
            Err(e) => Some(format!("reading the setup report: {e}")),
        };
        if let Some(msg) = failure {
            // The child exits by itself; wait for it before removing its cgroup.
            let mut exit = spawned.exit.clone();
            // SAFETY: signalling our own child (not reaped while registered).
            unsafe { libc::kill(spawned.pid, libc::SIGKILL) };
            let _ = tokio::time::timeout(REMOVE_TIMEOUT, exit.wait_for(|e| e.is_some())).await;
            drop(io);
            if let Some(cg) = &cgroup_dir {
                if let Err(e) = std::fs::remove_dir(cg) {
                    tracing::warn!("rmdir {}: {e}", cg.display());
                }
            }
            cleanup_early(&mounts);
            let code = if msg.contains("executable file not found") || msg.contains("no such file")
            {
                Code::FAILED_PRECONDITION
            } else {
                Code::INTERNAL
            };
            return Err(rpc_error(code, format!("CreateContainer {id}: {msg}")));
        }
        let events = match (&cgroup_dir, self.watcher()) {
            (Some(cg), Some(w)) => Some(w.watch(id, cg)),
            _ => None,
        };
        let proc = Arc::new(Proc {
            pid: spawned.pid,
            exit: spawned.exit,
            io,
            start: tokio::sync::Mutex::new(spawned.start.map(|s| (s, spawned.report))),
            started: AtomicBool::new(false),
        });
        let container = Arc::new(Container {
            id: id.to_string(),
            dir,
            mounts,
            cgroup: cgroup_dir,
            events,
            namespaces: types,
            seccomp: filter,
            init: proc,
            execs: Default::default(),
        });
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), container);
        let mut resp = CreateContainerResponse::new();
        resp.pid = spawned.pid as u32;
        resp.stdio_ports = Some(ports).into();
        Ok(resp)
    }

    pub async fn start(&self, req: StartContainerRequest) -> R<StartContainerResponse> {
        let c = self.get(&req.container_id)?;
        let init = c.init.clone();
        let mut start = init.start.lock().await;
        let Some((start_w, report)) = start.take() else {
            return Err(rpc_error(
                Code::FAILED_PRECONDITION,
                format!("container {} was already started", c.id),
            ));
        };
        if init.exited().is_some() {
            return Err(rpc_error(
                Code::FAILED_PRECONDITION,
                format!("container {}: its init process has exited", c.id),
            ));
        }
        nix::unistd::write(&start_w, b"s")
            .map_err(|e| internal("StartContainer: write to the start pipe", e))?;
        drop(start_w);
        init.started.store(true, Ordering::SeqCst);
        match read_report(&report).await {
            Ok(None) => {}
            Ok(Some(r)) => {
                let msg = match Stage::from_u8(r.stage) {
                    Some(s) => format!("{s:?}: {}", errno_str(r.errno)),
                    None => errno_str(r.errno),
                };
                return Err(rpc_error(
                    Code::INTERNAL,
                    format!("StartContainer {}: {msg}", c.id),
                ));
            }
            Err(e) => return Err(internal("StartContainer: reading the report pipe", e)),
        }
        tracing::info!("container {} started (pid {})", c.id, init.pid);
        let mut r = StartContainerResponse::new();
        r.pid = init.pid as u32;
        Ok(r)
    }

    pub async fn exec(&self, req: ExecProcessRequest) -> R<ExecProcessResponse> {
        let c = self.get(&req.container_id)?;
        validate_id(&req.exec_id, "exec id")?;
        let process: Process = serde_json::from_slice(&req.process)
            .map_err(|e| invalid(format!("ExecProcess: invalid OCI process: {e}")))?;
        if c.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&req.exec_id)
        {
            return Err(rpc_error(
                Code::ALREADY_EXISTS,
                format!("exec {} already exists in container {}", req.exec_id, c.id),
            ));
        }
        if c.init.exited().is_some() {
            return Err(rpc_error(
                Code::FAILED_PRECONDITION,
                format!("container {} is not running", c.id),
            ));
        }
        let mut plan = Box::new(
            spec::process_plan(&process).map_err(|e| invalid(format!("ExecProcess: {e}")))?,
        );
        let proc_dir = PathBuf::from(format!("/proc/{}", c.init.pid));
        let mut fds = Vec::new();
        let mut setns = Vec::new();
        let mut pidns = None;
        let mut types = c.namespaces.clone();
        types.sort_by_key(|t| (*t == LinuxNamespaceType::Mount) as u8);
        for t in types {
            let p = proc_dir.join("ns").join(spec::ns_name(t));
            let fd = open_path(&p, libc::O_RDONLY)
                .map_err(|e| internal(format!("open {}", p.display()), e))?;
            if t == LinuxNamespaceType::Pid {
                pidns = Some(fd);
            } else {
                setns.push((fd.as_raw_fd(), spec::ns_flag(t)));
                fds.push(fd);
            }
        }
        let root = open_path(&proc_dir.join("root"), libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(|e| internal(format!("open {}/root", proc_dir.display()), e))?;
        plan.root_fd = root.as_raw_fd();
        fds.push(root);
        if let Some(cg) = &c.cgroup {
            let fd = open_path(&cg.join("cgroup.procs"), libc::O_WRONLY)
                .map_err(|e| internal(format!("open {}/cgroup.procs", cg.display()), e))?;
            plan.cgroup_procs = fd.as_raw_fd();
            fds.push(fd);
        }
        plan.setns = setns;
        plan.seccomp = c.seccomp.clone();
        let stdio_req = req.stdio.clone().unwrap_or_default();
        let (child_fds, host, ports) = stdio::setup(&stdio_req, &self.settings.stdio, &self.ports)
            .map_err(|e| internal("setting up stdio", e))?;
        let spawned = self.spawn(plan, 0, pidns, child_fds, fds, false)?;
        let io = host.start();
        match read_report(&spawned.report).await {
            Ok(None) => {}
            Ok(Some(r)) => {
                let msg = describe_failure(&r, &spawned.plan);
                let code = if r.stage == Stage::Lookup as u8 {
                    Code::FAILED_PRECONDITION
                } else {
                    Code::INTERNAL
                };
                return Err(rpc_error(
                    code,
                    format!("ExecProcess {}/{}: {msg}", c.id, req.exec_id),
                ));
            }
            Err(e) => return Err(internal("ExecProcess: reading the report pipe", e)),
        }
        let proc = Arc::new(Proc {
            pid: spawned.pid,
            exit: spawned.exit,
            io,
            start: tokio::sync::Mutex::new(None),
            started: AtomicBool::new(true),
        });
        c.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(req.exec_id.clone(), proc);
        tracing::info!(
            "exec {} in container {} (pid {})",
            req.exec_id,
            c.id,
            spawned.pid
        );
        let mut r = ExecProcessResponse::new();
        r.pid = spawned.pid as u32;
        r.stdio_ports = Some(ports).into();
        Ok(r)
    }

    pub async fn signal(&self, req: SignalProcessRequest) -> R<()> {
        let c = self.get(&req.container_id)?;
        let sig = req.signal as i32;
        if !(1..=64).contains(&sig) {
            return Err(invalid(format!("invalid signal {}", req.signal)));
        }
        let p = self.process(&c, &req.exec_id)?;
        if req.all {
            let pids: Vec<i32> = match &c.cgroup {
                Some(cg) => cgroup::procs(cg)
                    .map_err(|e| internal("reading cgroup.procs", e))?
                    .into_iter()
                    .map(|p| p as i32)
                    .collect(),
                None => vec![p.pid],
            };
            for pid in pids {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, sig) };
            }
            return Ok(());
        }
        if p.exited().is_some() {
            return Err(rpc_error(
                Code::NOT_FOUND,
                format!("process {} of container {} has already exited", p.pid, c.id),
            ));
        }
        // SAFETY: plain kill(2) on a child that is not reaped yet.
        if unsafe { libc::kill(p.pid, sig) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Err(rpc_error(
                    Code::NOT_FOUND,
                    format!("process {} not found", p.pid),
                ));
            }
            return Err(internal(format!("kill({}, {sig})", p.pid), e));
        }
        Ok(())
    }

    pub async fn wait(&self, req: WaitProcessRequest) -> R<WaitProcessResponse> {
        let c = self.get(&req.container_id)?;
        let p = self.process(&c, &req.exec_id)?;
        drop(c);
        let mut rx = p.exit.clone();
        let exit = match rx.wait_for(|e| e.is_some()).await {
            Ok(e) => (*e).unwrap_or(Exit {
                pid: p.pid,
                status: 255,
                exited_at: SystemTime::now(),
            }),
            Err(_) => Exit {
                pid: p.pid,
                status: 255,
                exited_at: SystemTime::now(),
            },
        };
        p.io.drained().await;
        let mut r = WaitProcessResponse::new();
        r.exit_status = exit.status;
        r.exited_at = Some(ember_proto::time::to_timestamp(exit.exited_at)).into();
        r.pid = exit.pid as u32;
        Ok(r)
    }

    fn cgroup_of<'a>(&self, c: &'a Container) -> R<&'a Path> {
        c.cgroup.as_deref().ok_or_else(|| {
            rpc_error(
                Code::FAILED_PRECONDITION,
                format!("container {} has no cgroup (cgroup v2 unavailable)", c.id),
            )
        })
    }

    pub async fn stats(&self, req: StatsContainerRequest) -> R<StatsContainerResponse> {
        let c = self.get(&req.container_id)?;
        Ok(cgroup::stats(self.cgroup_of(&c)?))
    }

    pub async fn update(&self, req: UpdateContainerRequest) -> R<()> {
        let c = self.get(&req.container_id)?;
        let res: LinuxResources = serde_json::from_slice(&req.resources)
            .map_err(|e| invalid(format!("UpdateContainer: invalid linux.resources: {e}")))?;
        let cg = self.cgroup_of(&c)?;
        cgroup::apply(cg, &res).map_err(|e| invalid(format!("UpdateContainer {}: {e}", c.id)))
    }

    pub async fn freeze(&self, id: &str, frozen: bool) -> R<()> {
        let c = self.get(id)?;
        let cg = self.cgroup_of(&c)?;
        let v = if frozen { "1" } else { "0" };
        std::fs::write(cg.join("cgroup.freeze"), v)
            .map_err(|e| internal(format!("write {v} to {}/cgroup.freeze", cg.display()), e))?;
        if !wait_cgroup_event(
            cg,
            c.events.as_ref(),
            "frozen",
            frozen as u64,
            FREEZE_TIMEOUT,
        )
        .await
        {
            return Err(rpc_error(
                Code::INTERNAL,
                format!("container {id}: cgroup.events did not report frozen {v} in time"),
            ));
        }
        Ok(())
    }

    pub async fn remove(&self, req: RemoveContainerRequest) -> R<()> {
        let c = self.get(&req.container_id)?;
        let init = &c.init;
        if init.exited().is_none() && init.started.load(Ordering::SeqCst) {
            return Err(rpc_error(
                Code::FAILED_PRECONDITION,
                format!(
                    "container {} is running (init pid {}): stop it first",
                    c.id, init.pid
                ),
            ));
        }
        // A created, never started init: tell it to give up, and kill it.
        init.start.lock().await.take();
        if init.exited().is_none() {
            // SAFETY: our child, not reaped yet.
            unsafe { libc::kill(init.pid, libc::SIGKILL) };
        }
        if let Some(cg) = &c.cgroup {
            // Everything left in the container (exec'd processes, daemons).
            if std::fs::write(cg.join("cgroup.kill"), "1").is_err() {
                for pid in cgroup::procs(cg).unwrap_or_default() {
                    // SAFETY: plain kill(2).
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
            // Thaw, so that a paused container can die.
            let _ = std::fs::write(cg.join("cgroup.freeze"), "0");
        }
        let mut exit = init.exit.clone();
        let _ = tokio::time::timeout(REMOVE_TIMEOUT, exit.wait_for(|e| e.is_some())).await;
        if let Some(cg) = &c.cgroup {
            wait_cgroup_event(cg, c.events.as_ref(), "populated", 0, REMOVE_TIMEOUT).await;
            if let Some(w) = self.watcher() {
                w.unwatch(&c.id);
            }
            if let Err(e) = std::fs::remove_dir(cg) {
                if e.kind() != io::ErrorKind::NotFound {
                    return Err(internal(
                        format!("RemoveContainer: rmdir {}", cg.display()),
                        e,
                    ));
                }
            }
        }
        unmount_all(&c.mounts);
        remove_dirs(&c.dir);
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&c.id);
        tracing::info!("container {} removed", c.id);
        Ok(())
    }

    pub async fn list(&self, req: ListProcessesRequest) -> R<ListProcessesResponse> {
        let c = self.get(&req.container_id)?;
        let mut r = ListProcessesResponse::new();
        r.pids = match &c.cgroup {
            Some(cg) => cgroup::procs(cg).map_err(|e| internal("reading cgroup.procs", e))?,
            None => {
                let mut v = vec![];
                if c.init.exited().is_none() {
                    v.push(c.init.pid as u32);
                }
                for p in c.execs.lock().unwrap_or_else(|p| p.into_inner()).values() {
                    if p.exited().is_none() {
                        v.push(p.pid as u32);
                    }
                }
                v
            }
        };
        Ok(r)
    }

    pub async fn resize_pty(&self, req: ResizePtyRequest) -> R<()> {
        let c = self.get(&req.container_id)?;
        let p = self.process(&c, &req.exec_id)?;
        let pty = p.io.pty.as_ref().ok_or_else(|| {
            rpc_error(
                Code::FAILED_PRECONDITION,
                "the process has no terminal".to_string(),
            )
        })?;
        let clamp = |v: u32| v.min(u16::MAX as u32) as u16;
        stdio::resize(pty, clamp(req.rows), clamp(req.cols))
            .map_err(|e| internal("ioctl(TIOCSWINSZ)", e))
    }

    pub async fn close_stdin(&self, req: CloseStdinRequest) -> R<()> {
        let c = self.get(&req.container_id)?;
        let p = self.process(&c, &req.exec_id)?;
        p.io.close_stdin();
        Ok(())
    }

    pub async fn oom_event(&self) -> R<OOMEvent> {
        let Some(w) = self.watcher() else {
            // No inotify: no OOM event will ever come.
            return std::future::pending().await;
        };
        match w.next_oom().await {
            Some(id) => {
                let mut e = OOMEvent::new();
                e.container_id = id;
                Ok(e)
            }
            None => Err(rpc_error(
                Code::INTERNAL,
                "the OOM watcher stopped".to_string(),
            )),
        }
    }
}
