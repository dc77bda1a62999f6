//! inotify on cgroup files: `cgroup.events` (freeze and populated state)
//! and `memory.events` (OOM kills). One inotify instance and one task for
//! the whole agent; no polling.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, Notify};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Events,
    Memory,
}

struct Watch {
    id: String,
    kind: Kind,
    file: PathBuf,
}

#[derive(Default)]
struct State {
    by_wd: HashMap<i32, Watch>,
    wds: HashMap<String, Vec<i32>>,
    notifies: HashMap<String, Arc<Notify>>,
    oom_kills: HashMap<String, u64>,
}

/// The watcher. Cheap to clone.
#[derive(Clone)]
pub struct Watcher {
    fd: Arc<AsyncFd<OwnedFd>>,
    state: Arc<Mutex<State>>,
    oom_tx: mpsc::UnboundedSender<String>,
    oom_rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>>,
}

impl Watcher {
    /// Create the inotify instance and start its task (needs a runtime).
    pub fn start() -> std::io::Result<Watcher> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let (oom_tx, oom_rx) = mpsc::unbounded_channel();
        let w = Watcher {
            fd: Arc::new(super::stdio::async_fd(fd)?),
            state: Default::default(),
            oom_tx,
            oom_rx: Arc::new(tokio::sync::Mutex::new(oom_rx)),
        };
        let task = w.clone();
        tokio::spawn(async move { task.run().await });
        Ok(w)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, file: &Path) -> Option<i32> {
        let c = std::ffi::CString::new(file.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: valid fd and path.
        let wd = unsafe {
            libc::inotify_add_watch(self.fd.get_ref().as_raw_fd(), c.as_ptr(), libc::IN_MODIFY)
        };
        if wd < 0 {
            tracing::debug!(
                "inotify on {}: {}",
                file.display(),
                std::io::Error::last_os_error()
            );
            None
        } else {
            Some(wd)
        }
    }

    /// Watch the cgroup of container `id`; returns the Notify fired on
    /// every change of its `cgroup.events`.
    pub fn watch(&self, id: &str, dir: &Path) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        let mut wds = Vec::new();
        let mut st = self.lock();
        for (name, kind) in [
            ("cgroup.events", Kind::Events),
            ("memory.events", Kind::Memory),
        ] {
            let file = dir.join(name);
            if let Some(wd) = self.add(&file) {
                if kind == Kind::Memory {
                    let n = std::fs::read_to_string(&file)
                        .ok()
                        .and_then(|s| super::cgroup::keyed(&s, "oom_kill"))
                        .unwrap_or(0);
                    st.oom_kills.insert(id.to_string(), n);
                }
                st.by_wd.insert(
                    wd,
                    Watch {
                        id: id.to_string(),
                        kind,
                        file,
                    },
                );
                wds.push(wd);
            }
        }
        st.wds.insert(id.to_string(), wds);
        st.notifies.insert(id.to_string(), notify.clone());
        notify
    }

    /// Stop watching container `id`.
    pub fn unwatch(&self, id: &str) {
        let mut st = self.lock();
        for wd in st.wds.remove(id).unwrap_or_default() {
            st.by_wd.remove(&wd);
            // SAFETY: valid fd; a stale wd only gives EINVAL.
            unsafe { libc::inotify_rm_watch(self.fd.get_ref().as_raw_fd(), wd) };
        }
        st.notifies.remove(id);
        st.oom_kills.remove(id);
    }

    /// Wait for the next OOM kill; returns the container id.
    pub async fn next_oom(&self) -> Option<String> {
        self.oom_rx.lock().await.recv().await
    }

    async fn run(self) {
        let mut buf = vec![0u8; 4096];
        loop {
            let mut guard = match self.fd.readable().await {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!("inotify: {e}");
                    return;
                }
            };
            let n = match guard.try_io(|fd| {
                // SAFETY: reads into our buffer.
                let n = unsafe {
                    libc::read(fd.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    tracing::error!("inotify read: {e}");
                    return;
                }
                Err(_would_block) => continue,
            };
            let mut off = 0;
            let hdr = std::mem::size_of::<libc::inotify_event>();
            while off + hdr <= n {
                let wd = i32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or([0; 4]));
                let len = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap_or([0; 4]));
                off += hdr + len as usize;
                self.on_event(wd);
            }
        }
    }

    fn on_event(&self, wd: i32) {
        let mut st = self.lock();
        let Some(w) = st.by_wd.get(&wd) else { return };
        match w.kind {
            Kind::Events => {
                if let Some(n) = st.notifies.get(&w.id) {
                    n.notify_waiters();
                }
            }
            Kind::Memory => {
                let id = w.id.clone();
                let now = std::fs::read_to_string(&w.file)
                    .ok()
                    .and_then(|s| super::cgroup::keyed(&s, "oom_kill"))
                    .unwrap_or(0);
                let before = st.oom_kills.insert(id.clone(), now).unwrap_or(0);
                if now > before {
                    tracing::info!("container {id}: OOM kill ({before} -> {now})");
                    let _ = self.oom_tx.send(id);
                }
            }
        }
    }
}
