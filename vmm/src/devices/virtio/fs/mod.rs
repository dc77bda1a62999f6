//! virtio-fs device (virtio spec 1.2 section 5.11, device id 26), served
//! inside the VMM process: no virtiofsd, no vhost-user socket.
//!
//! The guest's FUSE requests arrive on two virtqueues (queue 0 "hiprio" for
//! FORGET/INTERRUPT, queue 1 the single request queue) and are answered by
//! `fuse_backend_rs::api::server::Server` over a
//! `fuse_backend_rs::passthrough::PassthroughFs` rooted at the shared
//! directory. One worker thread per device ("ember-virtiofs") epolls both
//! queue eventfds and a kill eventfd; see [`VirtioFs`] for the lifecycle.
//!
//! # Placing the device
//!
//! `VirtioFs::new(tag, shared_dir, FsOptions::default())`, behind an
//! `MmioTransport` like any other device: two queues of [`QUEUE_SIZE`]
//! (1024) entries, feature VIRTIO_F_VERSION_1 only, no DAX window (no
//! shared-memory region). The config space carries the tag (36 bytes, NUL
//! padded) and `num_request_queues = 1`. The guest mounts it with
//! `mount -t virtiofs <tag> <dir>` (kernel with CONFIG_VIRTIO_FS and
//! CONFIG_FUSE_FS).
//!
//! # Several directories: one device per pod, bind mounts under its root
//!
//! A device serves one directory tree under one tag; nothing stops the VMM
//! from placing several (each with its own tag, transport, IRQ and worker
//! thread). The intended use, though, is ONE device per pod (tag e.g.
//! `ember`) rooted at a per-pod host directory, say `/run/ember/<pod>/shared`
//! (mode 0700, root-owned), under which the shim bind-mounts each
//! container's rootfs (`<cid>/rootfs`) and each volume before telling the
//! agent to use them. Why:
//! - MMIO slots, GSIs and threads do not grow with the number of containers
//!   and volumes; the guest mounts the share once, at boot, and the agent
//!   bind-mounts `/<mnt>/<cid>/rootfs` etc. inside the guest;
//! - the backend resolves every name with `openat` on the parent directory
//!   at LOOKUP time, so a bind mount the shim adds after the guest mounted
//!   the share is visible at the next lookup of that name (failed lookups
//!   are not cached by the guest: the reply is an error, not a negative
//!   entry);
//! - read-only volumes get a read-only bind mount on the host (`MS_RDONLY`
//!   remount), which the host kernel enforces for that subtree; a device
//!   whose whole tree is read-only can also set [`FsOptions::read_only`];
//! - to remove a container's share, unmount its bind mounts lazily
//!   (`MNT_DETACH`): the backend may hold `O_PATH` descriptors on inodes the
//!   guest looked up;
//! - do not bind-mount the same host directory twice under one root: inodes
//!   are identified by (st_dev, st_ino), so the guest would see one
//!   directory inode at two places.
//!
//! # Cache policy: `auto` with 1 s timeouts
//!
//! The default [`CachePolicy::Auto`] gives close-to-open consistency: a file
//! opened in the guest after the host changed it is read afresh (its page
//! cache is dropped at open), and entries and attributes are trusted for
//! [`FsOptions::entry_timeout`] / [`FsOptions::attr_timeout`] (1 s) only.
//! Kubelet updates configMaps/secrets/downward-API volumes by writing a new
//! timestamped directory and atomically renaming the `..data` symlink; the
//! guest sees the new `..data` within a second (stale dentries are
//! revalidated by LOOKUP) and the new files are new inodes, so their content
//! is fresh. `Never` (direct I/O for every file) is also correct but breaks
//! shared writable `mmap` in the guest (e.g. SQLite WAL), which matters for
//! container root filesystems; `Always` trusts the guest page cache forever
//! and must only be used for trees nobody changes on the host. Writeback
//! caching is off (it lets the guest hold dirty data the host cannot see and
//! needs `auto`/`always`); xattrs are not served (see below).
//!
//! # Security: the guest is untrusted and the shim is root
//!
//! A guest that escapes the shared root through virtio-fs owns the host, so
//! the following holds (and the tests check the parts a unit test can):
//! - **No path walking on guest input.** Every request names an inode the
//!   guest got from an earlier LOOKUP (an `O_PATH` fd kept by the backend)
//!   plus at most one path component; nodeids never handed out are
//!   rejected (`EBADF`). Names containing `/` are refused (`EINVAL`); names
//!   are opened with `openat(parent_fd, name, O_NOFOLLOW)`, so a symlink is
//!   never followed on the host, wherever it points (guest-made symlinks are
//!   resolved by the guest kernel, inside the guest's mount). `..` from the
//!   root is mapped to `.`; `..` from any other directory is the kernel's
//!   `..` of a directory inside the tree, which comes back to the root's
//!   nodeid at the top.
//! - **Only regular files and directories are ever opened for I/O** (the
//!   backend checks the inode type before re-opening through
//!   `/proc/self/fd`); symlinks, FIFOs, sockets and device nodes are not.
//!   On top of that, the worker refuses MKNOD of block and character device
//!   nodes (except the 0:0 overlayfs whiteout), so the guest cannot plant a
//!   device node (e.g. of the host's disk) for some host process to open.
//! - **Credentials.** Files are created with the guest caller's uid/gid
//!   (per-thread `setresuid`/`setresgid` on the worker), so guest root is
//!   host root *inside the shared tree*: the guest can create setuid-root
//!   binaries there. The shared directories must therefore not be reachable
//!   by unprivileged host users (keep their parents 0700, as containerd's
//!   snapshot directories are), and host code walking a share must not
//!   follow symlinks (`rm -rf` does not).
//! - **One copy of each request.** The readable part of a chain is copied
//!   out of guest memory once, into a host buffer; the screening below and
//!   the FUSE server both read that copy, so a vCPU rewriting the request
//!   meanwhile cannot swap a screened request for another (see
//!   `request.rs`). A header whose `len` is not the chain's readable length,
//!   or a request over 1 MiB + 4 KiB, is refused before the body is copied.
//! - **The worker is confined to the share.** The worker thread first
//!   gives itself its own fs_struct (`unshare(CLONE_FS)`: the umask(0) the
//!   backend sets at FUSE_INIT stays on this thread and never loosens the
//!   modes of files the rest of the shim creates) and then chroots into the
//!   shared directory (see `chroot.rs`), so any path resolved on that
//!   thread, absolute or `..`, stays inside the share; submounts (container
//!   rootfs, volumes) are reached as before. The backend is built with `/`
//!   as its root and its `/proc/self/fd` descriptor opened before the
//!   chroot. Without both steps the device refuses to start. Extended
//!   attributes are refused as an option: the backend reaches them through
//!   `/proc/self/fd/N` paths, which do not exist inside the share.
//! - **Bounded tables.** The backend keeps a descriptor per inode the guest
//!   holds and per open file, and a small record per inode it ever looked
//!   up; [`FsOptions::limits`] caps the three (ENFILE for inodes, EMFILE for
//!   open files, logged once; see `limits.rs`), and the inode and handle
//!   caps are lowered at activation to fit the process's `RLIMIT_NOFILE`.
//! - **Read-only.** With [`FsOptions::read_only`] every opcode that can
//!   modify the tree (SETATTR, CREATE, MKNOD, MKDIR, SYMLINK, LINK, UNLINK,
//!   RMDIR, RENAME(2), WRITE, FALLOCATE, SETXATTR, REMOVEXATTR) is answered
//!   `EROFS`, as are an OPEN for writing or with `O_TRUNC`/`O_CREAT` and an
//!   ACCESS for `W_OK`; COPY_FILE_RANGE and other unserved opcodes get
//!   `ENOSYS` on every device. Read-only volumes inside a writable share
//!   are read-only bind mounts on the host.
//! - **What is NOT protected against:** host processes renaming a directory
//!   the guest has looked up to outside the shared tree (its `..` then leads
//!   outside, chroot or not: the walk starts from a descriptor, not from the
//!   root; the host must not move things out of a live share), and
//!   volumes the pod spec itself maps to sensitive host paths (hostPath).
//! - **Malformed input.** A descriptor chain outside guest memory or too
//!   short for a FUSE header is completed with length 0 ("dropped"); a
//!   header whose `len` disagrees with the chain gets `EINVAL`; unknown
//!   opcodes get `ENOSYS`; requests the library fails to decode get an
//!   error reply written by the worker. Nothing the guest sends reaches an
//!   `unwrap()` in this module, and a panic inside the library is caught:
//!   the device then answers `EIO` to everything until the driver resets
//!   it. Guest-triggered warnings are rate-limited.
//!
//! Known limits: one worker thread serves both queues in order, so one slow
//! host file-system operation delays the others (and `shutdown()` waits for
//! it); the library logs some decode errors itself through `log`.

mod bounded_fs;
mod chroot;
mod device;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod limits;
mod request;
mod worker;

#[cfg(test)]
mod tests;

#[cfg(test)]
pub use device::CachePolicy;
pub use device::{FsError, FsOptions, VirtioFs};

/// Number of virtqueues: hiprio + one request queue.
pub const NUM_QUEUES: usize = 2;
/// Maximum size of each virtqueue.
pub const QUEUE_SIZE: u16 = 1024;
/// Index of the high-priority queue (FORGET, INTERRUPT).
#[cfg(test)]
pub const HIPRIO_QUEUE: usize = 0;
/// Index of the (only) request queue.
#[cfg(test)]
pub const REQUEST_QUEUE: usize = 1;
/// Length of the tag field of the config space, in bytes.
pub const TAG_LEN: usize = 36;
/// Size of the config space: tag + `num_request_queues` (u32 LE).
pub const CONFIG_SPACE_SIZE: usize = TAG_LEN + 4;
