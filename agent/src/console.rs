//! The console: when the kernel starts init, fds 0-2 are /dev/console.
//!
//! Marker lines (exact text, one line each, written straight to stdout so
//! they do not depend on the log configuration) let the VMM and boot tests
//! follow the agent's progress:
//! - [`STARTED`]: first thing the agent does;
//! - [`LISTENING`]: the ttrpc server listens on vsock port 1024;
//! - [`POWERING_OFF`]: just before sync + reboot.

use std::io::Write;
use std::os::fd::RawFd;

pub const STARTED: &str = "ember-agent: started";
pub const LISTENING: &str = "ember-agent: listening on vsock port 1024";
pub const POWERING_OFF: &str = "ember-agent: powering off";

/// Write one line to stdout (the console for PID 1) in a single write;
/// errors are ignored (there may be no console at all).
pub fn line(msg: &str) {
    let mut buf = Vec::with_capacity(msg.len() + 1);
    buf.extend_from_slice(msg.as_bytes());
    buf.push(b'\n');
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&buf);
    let _ = out.flush();
}

/// Whether `fd` is closed or /dev/null (char 1:3). Rust's runtime puts
/// /dev/null on closed fds 0-2 before `main` (and aborts if it cannot, so
/// the initrd ships a /dev/null node).
pub fn fd_is_missing(fd: RawFd) -> bool {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: fstat writes into `st`; we only read it on success.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return true;
    }
    // SAFETY: initialised by a successful fstat.
    let st = unsafe { st.assume_init() };
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 3)
}

/// Whether stdout is a real output (not closed, not /dev/null).
pub fn stdout_is_usable() -> bool {
    !fd_is_missing(1)
}

/// Open /dev/console and install it on every fd of 0..=2 that is closed or
/// /dev/null. Needed only when the kernel could not give init a console;
/// call it after devtmpfs is mounted.
pub fn attach_console() -> std::io::Result<()> {
    use std::os::fd::IntoRawFd;
    let missing: Vec<RawFd> = (0..=2).filter(|fd| fd_is_missing(*fd)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let console = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")?
        .into_raw_fd();
    for fd in missing {
        if fd != console {
            // SAFETY: dup2 onto a descriptor that is closed or /dev/null.
            if unsafe { libc::dup2(console, fd) } == -1 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    if console > 2 {
        // SAFETY: `console` is our own descriptor, duplicated above.
        unsafe { libc::close(console) };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn missing_means_closed_or_dev_null() {
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(fd_is_missing(null.as_raw_fd()));
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        assert!(!fd_is_missing(file.as_raw_fd()));
        let closed = file.as_raw_fd();
        drop(file);
        drop(null);
        assert!(fd_is_missing(closed));
    }
}
