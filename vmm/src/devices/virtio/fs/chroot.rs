//! Confines a virtio-fs worker thread to its share, as virtiofsd's
//! `--sandbox` does for its process: the thread gets its own fs_struct
//! (root, cwd, umask) and its root becomes the shared directory.
//!
//! The backend already resolves names one component at a time under
//! descriptors it holds, never following symlinks; the chroot makes sure
//! that whatever does resolve a path on this thread (an absolute path, a
//! `..` at the top, a symlink some code follows after all) stays inside
//! the share. Submounts of the share (container rootfs, volumes) are
//! reached as before: a chroot only moves the root. What it does not do:
//! a descriptor for a directory that a host process moved out of the share
//! still leads outside (see the module doc of `fs`).
//!
//! Everything here runs on the worker thread before it serves anything,
//! and before the thread's other confinement (seccomp, capabilities).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

/// Gives the calling thread its own fs_struct and makes `share` (a
/// directory descriptor opened by the device) its root and cwd. Fails if
/// any step fails (the device then refuses to start): without `CLONE_FS`
/// the chroot would move the whole process.
pub(super) fn confine_thread_to(share: &OwnedFd) -> io::Result<()> {
    // SAFETY: unshare(2) takes a flag word and only changes the calling
    // thread's kernel state; the return value is checked.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(step_error("unshare(CLONE_FS)"));
    }
    // SAFETY: fchdir on a descriptor this function borrows for the call;
    // the return value is checked.
    if unsafe { libc::fchdir(share.as_raw_fd()) } != 0 {
        return Err(step_error("fchdir to the share"));
    }
    // SAFETY: the arguments are NUL-terminated constants; chroot(2) and
    // chdir(2) change only this thread's fs_struct (unshared above).
    if unsafe { libc::chroot(c".".as_ptr()) } != 0 {
        return Err(step_error("chroot into the share"));
    }
    // SAFETY: as above.
    if unsafe { libc::chdir(c"/".as_ptr()) } != 0 {
        return Err(step_error("chdir to the new root"));
    }
    check_root_is(share)
}

/// The path the backend opens as the share's root once the worker is
/// confined.
pub(super) const ROOT_IN_CHROOT: &str = "/";

/// `/` of this thread is the share (same device and inode).
fn check_root_is(share: &OwnedFd) -> io::Result<()> {
    let want = std::fs::File::from(share.try_clone()?).metadata()?;
    let got = std::fs::metadata(ROOT_IN_CHROOT)?;
    if (got.dev(), got.ino()) != (want.dev(), want.ino()) {
        return Err(io::Error::other(
            "after the chroot, / is not the shared directory",
        ));
    }
    Ok(())
}

fn step_error(step: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{step}: {e}"))
}
