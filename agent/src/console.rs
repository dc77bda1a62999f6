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

/// Whether `fd` is open.
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only queries the descriptor flags.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// Whether fds 0, 1 and 2 are all open.
pub fn stdio_is_open() -> bool {
    (0..=2).all(fd_is_open)
}

/// Open /dev/console and install it on every fd of 0..=2 that is not open.
/// Needed only when the kernel could not open a console for init (no
/// /dev/console in the initramfs); call it after devtmpfs is mounted.
pub fn attach_console() -> std::io::Result<()> {
    use std::os::fd::IntoRawFd;
    let missing: Vec<RawFd> = (0..=2).filter(|fd| !fd_is_open(*fd)).collect();
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
            // SAFETY: dup2 onto a descriptor we know to be closed.
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
