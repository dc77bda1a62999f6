//! Running code inside another network namespace.
//!
//! `setns(CLONE_NEWNET)` changes the namespace of the calling thread only,
//! so [`in_netns`] does it on a dedicated thread that ends with the
//! closure: no thread of the process is ever left in the wrong namespace.
//! Whatever the closure creates keeps its namespace afterwards: a tap
//! opened there stays in that namespace and its descriptor keeps working
//! from the host namespace; a socket created there operates on that
//! namespace's interfaces (e.g. for `ioctl(SIOCSIFFLAGS)` or netlink).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Runs `f` on a short-lived thread ("ember-netns") that first joins the
/// network namespace at `netns` (`/var/run/netns/<name>`,
/// `/proc/<pid>/ns/net`, or any open namespace file such as
/// `/proc/self/fd/<n>`) and returns what `f` returned.
///
/// Errors: the path cannot be opened, it is not a network namespace
/// (`EINVAL`), we lack `CAP_SYS_ADMIN` (`EPERM`), the thread cannot be
/// started, or `f` panicked (the panic is reported as an error, not
/// propagated).
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let ns = File::open(netns).map_err(|e| context(netns, "open", e))?;
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("ember-netns".into())
            .spawn_scoped(s, move || -> io::Result<T> {
                // SAFETY: setns on a descriptor we own; it moves only this
                // thread, which ends as soon as `f` returns.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                drop(ns);
                Ok(f())
            })
            .map_err(|e| context(netns, "start a thread", e))?;
        match handle.join() {
            Ok(r) => r.map_err(|e| context(netns, "setns", e)),
            Err(_) => Err(io::Error::other(format!(
                "the function run in network namespace {} panicked",
                netns.display()
            ))),
        }
    })
}

fn context(netns: &Path, op: &str, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("network namespace {}: {op}: {e}", netns.display()),
    )
}
