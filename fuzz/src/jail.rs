//! The jail the virtio-fs target serves requests in. The fuzzer plays a
//! hostile guest against the real passthrough file system, running as
//! root: if it ever found a way out of the shared directory, it must find
//! nothing on the host it could change. So the requests are served on one
//! dedicated thread that, before anything else:
//!
//! 1. takes a mount namespace and fs state of its own
//!    (`unshare(CLONE_NEWNS | CLONE_FS)`; the fuzzer's other threads, which
//!    write the corpus and crash files, keep the host's),
//! 2. makes every mount private, then read-only, `nodev` and `nosuid`
//!    (`mount_setattr(AT_RECURSIVE)`): what the thread sees of the host
//!    cannot be written, and no device node can be opened,
//! 3. mounts a fresh 64 MiB tmpfs over `/tmp` in that namespace: the only
//!    writable place, which is where the share lives ([`SHARE`]), bounded
//!    in size so a WRITE or FALLOCATE at a large offset cannot fill a host
//!    disk, and gone when the process ends.
//!
//! It then checks that `/` really is read-only for it and aborts the run
//! otherwise. The one exception is libFuzzer's artifact directory, so the
//! input of a crash on this thread is saved. Needs root (CI and
//! `deploy/fuzz.sh` run as root).

use std::ffi::CString;
use std::path::Path;
use std::sync::mpsc::{channel, sync_channel, Sender};
use std::thread;

/// The shared directory, inside the jail's tmpfs.
pub const SHARE: &str = "/tmp/share";

type Job = Box<dyn FnOnce() + Send>;

/// A thread confined as described in the module docs, running the jobs it
/// is given one at a time.
pub struct Jail {
    jobs: Sender<Job>,
}

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;

fn check(what: &str, rc: libc::c_long) -> Result<(), String> {
    if rc < 0 {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

fn confine() -> Result<(), String> {
    // SAFETY: unshare takes a flag word and changes only this thread's
    // namespaces and fs state.
    check(
        "unshare",
        unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_FS) } as libc::c_long,
    )?;
    let root = CString::new("/").map_err(|e| e.to_string())?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: libc::MS_PRIVATE,
        userns_fd: 0,
    };
    // SAFETY: the path is a valid C string and `attr` a mount_attr of the
    // size passed; the call only changes mounts of this thread's namespace
    // (a private copy since the unshare above).
    check("mount_setattr(/, AT_RECURSIVE)", unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            root.as_ptr(),
            libc::AT_RECURSIVE as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    keep_artifacts_writable()?;
    let src = CString::new("ember-fuzz").map_err(|e| e.to_string())?;
    let tmp = CString::new("/tmp").map_err(|e| e.to_string())?;
    let fstype = CString::new("tmpfs").map_err(|e| e.to_string())?;
    let opts = CString::new("size=64m,mode=0700").map_err(|e| e.to_string())?;
    // SAFETY: valid C strings; mounts in this thread's private namespace.
    check("mount tmpfs on /tmp", unsafe {
        libc::mount(
            src.as_ptr(),
            tmp.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID,
            opts.as_ptr().cast(),
        )
    } as libc::c_long)?;
    // SAFETY: statvfs fills the zeroed struct for a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    check(
        "statvfs(/)",
        unsafe { libc::statvfs(root.as_ptr(), &mut st) } as libc::c_long,
    )?;
    if st.f_flag & libc::ST_RDONLY == 0 || st.f_flag & libc::ST_NODEV == 0 {
        return Err("/ is still writable or allows devices after mount_setattr".into());
    }
    std::fs::create_dir(SHARE).map_err(|e| format!("mkdir {SHARE}: {e}"))?;
    std::env::set_current_dir(Path::new(SHARE)).map_err(|e| format!("chdir {SHARE}: {e}"))?;
    Ok(())
}

/// A crash on the jail thread (an abort) makes libFuzzer write the input
/// from this thread: bind the artifact directory (`-artifact_prefix=`, an
/// absolute path as `deploy/fuzz.sh` passes it) writable again, or the
/// reproducer would be lost.
fn keep_artifacts_writable() -> Result<(), String> {
    let Some(dir) = std::env::args()
        .find_map(|a| a.strip_prefix("-artifact_prefix=").map(str::to_string))
        .filter(|d| d.starts_with('/'))
    else {
        return Ok(());
    };
    let dir = CString::new(dir.trim_end_matches('/')).map_err(|e| e.to_string())?;
    // SAFETY: valid C strings; a bind mount in this thread's namespace.
    check("bind the artifact directory", unsafe {
        libc::mount(
            dir.as_ptr(),
            dir.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    } as libc::c_long)?;
    let attr = MountAttr {
        attr_set: 0,
        attr_clr: MOUNT_ATTR_RDONLY,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: as in `confine`, on the bind mount just made.
    check("make the artifact directory writable", unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            dir.as_ptr(),
            0 as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })
}

impl Jail {
    /// Starts the jail thread; panics (ending the fuzz run) if it cannot
    /// be confined.
    pub fn start() -> Self {
        let (jobs, rx) = channel::<Job>();
        let (ready_tx, ready_rx) = sync_channel(1);
        thread::Builder::new()
            .name("ember-fuzz-jail".into())
            .spawn(move || {
                let confined = confine();
                let ok = confined.is_ok();
                let _ = ready_tx.send(confined);
                if !ok {
                    return;
                }
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .expect("cannot spawn the jail thread");
        match ready_rx.recv() {
            Ok(Ok(())) => Self { jobs },
            Ok(Err(e)) => panic!("cannot confine the virtio-fs fuzz thread (run as root): {e}"),
            Err(_) => panic!("the jail thread died"),
        }
    }

    /// Runs `f` on the jail thread and returns its result.
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = sync_channel(1);
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .expect("the jail thread is gone");
        rx.recv().expect("the jail thread died running a job")
    }
}
