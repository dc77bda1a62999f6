//! The pod's network-namespace holder: a thread of the shim that lives in
//! the pod's network namespace, so that hooks find it the way the OCI
//! state tells them to, through `/proc/<state.pid>/ns/net` (a thread id
//! names a `/proc` entry as a process id does).
//!
//! It creates a new namespace (unshare) or joins the one CNI made for a
//! CRI pod (setns), then parks until dropped; the namespace lives as long
//! as the holder, or longer while something else (the VM's taps) holds it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

#[derive(Debug)]
pub struct NetnsHolder {
    tid: u32,
    /// Dropping it ends the thread.
    release: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl NetnsHolder {
    /// A holder in `join` (a network namespace file), or in a new network
    /// namespace.
    pub fn new(join: Option<&Path>) -> io::Result<NetnsHolder> {
        let target = join
            .map(|p| {
                File::open(p).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("opening network namespace {}: {e}", p.display()),
                    )
                })
            })
            .transpose()?;
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<u32>>();
        let (release, released) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ember-netns-holder".into())
            .spawn(move || {
                // SAFETY: setns/unshare change only this thread's network
                // namespace; gettid has no preconditions.
                let entered = unsafe {
                    match &target {
                        Some(ns) => libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET),
                        None => libc::unshare(libc::CLONE_NEWNET),
                    }
                };
                drop(target);
                if entered != 0 {
                    let _ = ready_tx.send(Err(io::Error::last_os_error()));
                    return;
                }
                // SAFETY: as above.
                let tid = unsafe { libc::gettid() } as u32;
                let _ = ready_tx.send(Ok(tid));
                // Until the holder is dropped.
                let _ = released.recv();
            })?;
        let tid = ready_rx
            .recv()
            .map_err(|_| io::Error::other("the namespace holder thread ended"))?
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "{} a network namespace: {e}",
                        if join.is_some() {
                            "joining"
                        } else {
                            "creating"
                        }
                    ),
                )
            })?;
        Ok(NetnsHolder {
            tid,
            release: Some(release),
            thread: Some(thread),
        })
    }

    /// The pid hooks get (`state.pid`).
    pub fn pid(&self) -> u32 {
        self.tid
    }

    /// The namespace, as a path the shim and hooks can open.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.tid))
    }
}

impl Drop for NetnsHolder {
    fn drop(&mut self) {
        self.release.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn ns_inode(p: &Path) -> u64 {
        std::fs::metadata(p).unwrap().ino()
    }

    /// Needs root (CAP_SYS_ADMIN), as the shim has.
    #[test]
    fn a_new_namespace_is_found_through_the_pid_and_joined_by_a_second_holder() {
        let own = ns_inode(Path::new("/proc/self/ns/net"));
        let h = NetnsHolder::new(None).unwrap();
        let path = h.path();
        assert_eq!(path, PathBuf::from(format!("/proc/{}/ns/net", h.pid())));
        let ns = ns_inode(&path);
        assert_ne!(ns, own, "the holder is in the shim's namespace");
        let joined = NetnsHolder::new(Some(&path)).unwrap();
        assert_eq!(ns_inode(&joined.path()), ns);
        let pid = h.pid();
        drop(h);
        assert!(!Path::new(&format!("/proc/{pid}/ns/net")).exists());
        assert!(NetnsHolder::new(Some(Path::new("/nonexistent/ns"))).is_err());
    }
}
