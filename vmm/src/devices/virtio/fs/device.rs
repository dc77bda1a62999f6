//! The [`VirtioFs`] device: configuration, feature bits and the worker's
//! lifecycle. The request handling itself is in [`super::worker`].

use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::passthrough::{self, PassthroughFs};
use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::super::device_worker::{check_activation, read_config_bytes, DeviceWorker};
use super::bounded_fs::BoundedFs;
use super::chroot::ROOT_IN_CHROOT;
use super::limits::{fit_to_nofile, nofile_limit};
use super::worker::{RequestHandler, Worker, KILL_TOKEN};
use super::{CONFIG_SPACE_SIZE, NUM_QUEUES, QUEUE_SIZE, TAG_LEN};
use crate::config::FsLimits;
use crate::devices::virtio::{
    ActivateError, GuestMemoryMmap, VirtioDevice, VirtioInterrupt, TYPE_FS,
};

/// VIRTIO_F_VERSION_1.
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Name of the worker thread of every virtio-fs device.
pub(super) const THREAD_NAME: &str = "ember-virtiofs";

/// How the guest may cache file data (the FUSE open flags the backend
/// returns). See the module documentation for the choice of the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CachePolicy {
    /// Direct I/O for every file: no guest page cache, no shared writable
    /// mmap in the guest.
    Never,
    /// Close-to-open consistency: the guest drops a file's cached pages when
    /// it opens it again.
    #[default]
    Auto,
    /// The guest keeps cached pages across opens; only for trees that do not
    /// change on the host.
    Always,
}

impl From<CachePolicy> for passthrough::CachePolicy {
    fn from(c: CachePolicy) -> Self {
        match c {
            CachePolicy::Never => passthrough::CachePolicy::Never,
            CachePolicy::Auto => passthrough::CachePolicy::Auto,
            CachePolicy::Always => passthrough::CachePolicy::Always,
        }
    }
}

/// Options of one virtio-fs device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsOptions {
    /// Data cache policy (default [`CachePolicy::Auto`]).
    pub cache: CachePolicy,
    /// How long the guest trusts a directory entry (default 1 s).
    pub entry_timeout: Duration,
    /// How long the guest trusts attributes (default 1 s).
    pub attr_timeout: Duration,
    /// Serve extended attributes. Must stay off: [`VirtioFs::new`] refuses
    /// it, as the confined worker cannot reach them (see the module doc).
    pub xattr: bool,
    /// Let the guest cache writes (default off; refused with `Never`).
    pub writeback: bool,
    /// Refuse every request that modifies the tree (`EROFS`), whatever the
    /// guest mount options say (default off).
    pub read_only: bool,
    /// Caps on the inodes and open files the backend holds for the guest
    /// (shrunk at activation to fit `RLIMIT_NOFILE`).
    pub limits: FsLimits,
}

impl Default for FsOptions {
    fn default() -> Self {
        Self {
            cache: CachePolicy::Auto,
            entry_timeout: Duration::from_secs(1),
            attr_timeout: Duration::from_secs(1),
            xattr: false,
            writeback: false,
            read_only: false,
            limits: FsLimits::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("invalid virtio-fs tag {tag:?}: {why}")]
    InvalidTag { tag: String, why: &'static str },
    #[error("shared directory {path}: {source}")]
    SharedDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("shared directory {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("shared directory {0} is not valid UTF-8")]
    NonUtf8Path(PathBuf),
    #[error("invalid virtio-fs options: {0}")]
    InvalidOptions(&'static str),
}

/// A test's stand-in for a vCPU that rewrites a request in guest memory
/// right after the device copied it.
#[cfg(test)]
pub(super) type AfterCopyHook = Arc<dyn Fn() + Send + Sync>;

/// The running worker of an activated device, and its stop flag (checked
/// between requests, so a worker busy with a long queue stops soon).
struct WorkerHandle {
    thread: DeviceWorker,
    stop: Arc<AtomicBool>,
}

/// A virtio-fs device exporting one host directory under one tag.
///
/// Lifecycle: [`VirtioDevice::activate`] builds a fresh passthrough file
/// system and starts the worker thread; [`VirtioDevice::reset`] and
/// [`VirtioDevice::shutdown`] stop and join it, which drops the file system
/// with every descriptor and inode it held, so the next activation starts
/// clean (the guest sends FUSE_INIT again). Dropping the device shuts it
/// down.
pub struct VirtioFs {
    tag: String,
    root: PathBuf,
    opts: FsOptions,
    config: [u8; CONFIG_SPACE_SIZE],
    acked_features: u64,
    queue_sizes: [u16; NUM_QUEUES],
    worker: Option<WorkerHandle>,
    /// The next activation restores a snapshot (see [`Self::mark_restored`]).
    restored: bool,
    /// Handed to the request handler of the next activations.
    #[cfg(test)]
    pub(super) after_copy: Option<AfterCopyHook>,
    /// The backend of the running worker, for tests to read its tables.
    #[cfg(test)]
    pub(super) backend: Option<Arc<super::worker::Backend>>,
}

impl std::fmt::Debug for VirtioFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioFs")
            .field("tag", &self.tag)
            .field("root", &self.root)
            .field("opts", &self.opts)
            .field("active", &self.worker.is_some())
            .finish()
    }
}

impl VirtioFs {
    /// Creates the device exporting `shared_dir` (canonicalized now; it must
    /// be a directory) under `tag` (1 to 36 bytes, no NUL).
    pub fn new(tag: &str, shared_dir: PathBuf, opts: FsOptions) -> Result<Self, FsError> {
        if tag.is_empty() {
            return Err(FsError::InvalidTag {
                tag: tag.into(),
                why: "empty",
            });
        }
        if tag.len() > TAG_LEN {
            return Err(FsError::InvalidTag {
                tag: tag.into(),
                why: "longer than 36 bytes",
            });
        }
        if tag.bytes().any(|b| b == 0) {
            return Err(FsError::InvalidTag {
                tag: tag.into(),
                why: "contains a NUL byte",
            });
        }
        if opts.writeback && opts.cache == CachePolicy::Never {
            return Err(FsError::InvalidOptions(
                "writeback caching needs cache policy auto or always",
            ));
        }
        if opts.xattr {
            // The backend reaches xattrs through "/proc/self/fd/N" paths,
            // which the worker's chroot would resolve inside the share.
            return Err(FsError::InvalidOptions(
                "extended attributes cannot be served by the confined worker",
            ));
        }
        let l = &opts.limits;
        if l.max_inodes == 0 || l.max_handles == 0 || l.max_known_inodes < l.max_inodes {
            return Err(FsError::InvalidOptions(
                "the inode and handle caps must be at least 1, and max_known_inodes at least max_inodes",
            ));
        }
        let root = shared_dir
            .canonicalize()
            .map_err(|source| FsError::SharedDir {
                path: shared_dir.clone(),
                source,
            })?;
        let meta = std::fs::metadata(&root).map_err(|source| FsError::SharedDir {
            path: root.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(FsError::NotADirectory(root));
        }
        if root.to_str().is_none() {
            return Err(FsError::NonUtf8Path(root));
        }

        let mut config = [0u8; CONFIG_SPACE_SIZE];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());

        Ok(Self {
            tag: tag.to_string(),
            root,
            opts,
            config,
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
            worker: None,
            restored: false,
            #[cfg(test)]
            after_copy: None,
            #[cfg(test)]
            backend: None,
        })
    }

    #[cfg(test)]
    /// The tag the guest mounts (`mount -t virtiofs <tag> <dir>`).
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The canonical host directory served as the root.
    #[cfg(test)]
    pub fn shared_dir(&self) -> &std::path::Path {
        &self.root
    }

    /// The device is about to be activated from a snapshot: the guest
    /// mounted the share (sent FUSE_INIT) before the snapshot and will not
    /// do it again, so the next activation imports the root inode itself.
    /// Later activations (after a driver reset) wait for FUSE_INIT again.
    pub fn mark_restored(&mut self) {
        self.restored = true;
    }

    /// Whether a worker thread is running.
    #[cfg(test)]
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// Signals the worker to stop and joins it. Idempotent.
    fn stop_worker(&mut self) {
        let Some(w) = self.worker.take() else {
            return;
        };
        w.stop.store(true, Ordering::SeqCst);
        if w.thread.stop() {
            tracing::debug!(tag = %self.tag, "virtio-fs: worker stopped");
        }
    }
}

/// A fresh backend for one activation, for a worker confined to the
/// share (its root is `/`). The passthrough opens `/proc/self/fd` here,
/// outside the chroot, and keeps that descriptor. Runs on the worker
/// thread before its chroot: the vCPU thread that activates the device
/// may open no file under its seccomp filter.
fn build_backend(opts: &FsOptions) -> io::Result<PassthroughFs<()>> {
    build_backend_at(opts, ROOT_IN_CHROOT)
}

/// A backend rooted at `root_dir` (the fuzz harness serves a directory of
/// its jail without a chroot).
pub(super) fn build_backend_at(opts: &FsOptions, root_dir: &str) -> io::Result<PassthroughFs<()>> {
    let cfg = passthrough::Config {
        root_dir: root_dir.to_string(),
        cache_policy: opts.cache.into(),
        entry_timeout: opts.entry_timeout,
        attr_timeout: opts.attr_timeout,
        xattr: opts.xattr,
        writeback: opts.writeback,
        // Import the root at FUSE_INIT and validate every name component
        // (the passthrough skips validation when it is not the top).
        do_import: true,
        // Keep O_PATH fds, never open_by_handle_at on guest-influenced
        // handles.
        inode_file_handles: false,
        no_open: false,
        no_opendir: false,
        killpriv_v2: false,
        dax_file_size: None,
        ..passthrough::Config::default()
    };
    PassthroughFs::new(cfg)
}

/// The configured caps, shrunk to fit the process's descriptor limit,
/// and whether they were.
fn effective_limits(tag: &str, opts: &FsOptions) -> (FsLimits, bool) {
    let mut limits = opts.limits;
    let mut fitted = false;
    match nofile_limit() {
        Ok(nofile) => {
            if fit_to_nofile(&mut limits, nofile) {
                fitted = true;
                tracing::info!(
                    tag = %tag,
                    nofile,
                    max_inodes = limits.max_inodes,
                    max_handles = limits.max_handles,
                    "virtio-fs: inode and handle caps lowered to fit RLIMIT_NOFILE"
                );
            }
        }
        Err(e) => tracing::warn!(tag = %tag, "virtio-fs: getrlimit(RLIMIT_NOFILE): {e}"),
    }
    (limits, fitted)
}

impl VirtioDevice for VirtioFs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The virtio-fs config space is read-only for the driver.
        tracing::debug!(
            tag = %self.tag,
            offset,
            len = data.len(),
            "virtio-fs: config write ignored"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        check_activation(
            self.worker.is_some(),
            false,
            NUM_QUEUES,
            &queues,
            &queue_evts,
        )?;

        let (kill, worker_kill) = DeviceWorker::kill_pair()?;
        let epoll = Epoll::new().map_err(ActivateError::Worker)?;
        for (i, evt) in queue_evts.iter().enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    std::os::fd::AsRawFd::as_raw_fd(evt),
                    EpollEvent::new(EventSet::IN, i as u64),
                )
                .map_err(ActivateError::Worker)?;
        }
        epoll
            .ctl(
                ControlOperation::Add,
                std::os::fd::AsRawFd::as_raw_fd(&worker_kill),
                EpollEvent::new(EventSet::IN, KILL_TOKEN),
            )
            .map_err(ActivateError::Worker)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_worker_flag = stop.clone();

        // The backend, the share's descriptor and the caps are made on the
        // worker thread itself (spawned from the control plane, not from
        // this vCPU thread), right before it chroots into the share.
        let tag = self.tag.clone();
        let root = self.root.clone();
        let opts = self.opts.clone();
        let import_root = std::mem::take(&mut self.restored);
        #[cfg(test)]
        let after_copy = self.after_copy.clone();
        #[cfg(test)]
        let (backend_tx, backend_rx) = mpsc::sync_channel::<Arc<super::worker::Backend>>(1);
        let setup = move || -> io::Result<Worker> {
            let fs = build_backend(&opts).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("passthrough file system for {root:?}: {e}"),
                )
            })?;
            // The worker's root-to-be, opened now so that it is the
            // directory this device was created for.
            let share = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
                .open(&root)
                .map_err(|e| io::Error::new(e.kind(), format!("opening {root:?}: {e}")))?;
            let (limits, fitted) = effective_limits(&tag, &opts);
            let backend = BoundedFs::new(fs, tag.clone(), limits, fitted);
            tracing::info!(
                tag = %tag,
                root = %root.display(),
                cache = ?opts.cache,
                read_only = opts.read_only,
                max_inodes = limits.max_inodes,
                max_handles = limits.max_handles,
                "virtio-fs: device activated"
            );
            let worker = Worker {
                tag: tag.clone(),
                mem,
                interrupt,
                queues,
                queue_evts,
                _kill: worker_kill,
                stop: stop_worker_flag,
                epoll,
                handler: RequestHandler::new(tag, backend, opts.read_only),
                import_root,
                share: share.into(),
            };
            #[cfg(test)]
            let worker = {
                let mut worker = worker;
                worker.handler.after_copy = after_copy;
                let _ = backend_tx.send(worker.handler.backend());
                worker
            };
            Ok(worker)
        };

        // The worker reports whether it could isolate itself before it
        // serves anything; see `Worker::run`.
        let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<()>>(1);
        let thread = DeviceWorker::spawn(THREAD_NAME, kill, move || match setup() {
            Ok(worker) => worker.run(ready_tx),
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        })?;

        let started = match ready_rx.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("worker cannot start: {e}")),
            Err(_) => Err("worker exited before starting".to_string()),
        };
        if let Err(why) = started {
            stop.store(true, Ordering::SeqCst);
            thread.stop();
            return Err(ActivateError::Backend(why));
        }

        #[cfg(test)]
        {
            self.backend = backend_rx.try_recv().ok();
        }
        self.worker = Some(WorkerHandle { thread, stop });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop_worker();
        self.acked_features = 0;
        true
    }

    fn shutdown(&mut self) {
        self.stop_worker();
    }
}

impl Drop for VirtioFs {
    fn drop(&mut self) {
        self.stop_worker();
    }
}
