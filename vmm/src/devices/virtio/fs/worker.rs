//! The worker thread of a virtio-fs device and the screening of guest
//! requests before they reach `fuse_backend_rs`. Each request is copied
//! out of guest memory once (`request.rs`); the screening and the server
//! read only that copy.
//!
//! Every descriptor chain popped from a queue ends in the used ring, with
//! one of three outcomes:
//! - served: `Server::handle_message` wrote the reply (or, for FORGET-like
//!   requests, nothing);
//! - refused: the worker writes a bare `fuse_out_header` with an errno
//!   (`EINVAL` for a header that disagrees with the chain, `ENOSYS` for
//!   opcodes the device does not serve, `EPERM` for device-node MKNOD,
//!   `EROFS` for writes on a read-only device, `EIO` after an internal
//!   failure);
//! - dropped: completed with length 0 when the chain cannot even carry a
//!   FUSE header or an error reply (unreadable descriptors, too short).
//!
//! Screening also keeps out of the library the opcodes it has no variant
//! for: its `Opcode::from(u32)` transmutes any value below 50, which is
//! undefined behaviour for the holes (7, 19) when its trace logging is on.

/// FUSE_SYNCFS (protocol 7.34), not in fuse-backend-rs's opcode list.
const FUSE_SYNCFS: u32 = 50;

use std::fmt;
use std::io;
use std::mem::size_of;
use std::os::fd::OwnedFd;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{
    AccessIn, CreateIn, InHeader, MknodIn, Opcode, OpenIn, OutHeader,
};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::PassthroughFs;
use fuse_backend_rs::transport::{FuseBuf, Reader, VirtioFsWriter};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::ByteValued;
use vmm_sys_util::epoll::{Epoll, EpollEvent};
use vmm_sys_util::eventfd::EventFd;

use super::bounded_fs::BoundedFs;
use super::chroot::confine_thread_to;
use super::request::{CopyError, RequestBuf};
use super::NUM_QUEUES;
use crate::devices::virtio::{GuestMemoryMmap, VirtioInterrupt, VIRTIO_MMIO_INT_VRING};

/// Epoll token of the kill eventfd (queue eventfds use their index).
pub(super) const KILL_TOKEN: u64 = NUM_QUEUES as u64;

/// Guest-triggered warnings logged at `warn` level before switching to
/// `debug`, so a hostile guest cannot flood the host log.
const WARN_BUDGET: u32 = 64;

/// Completed chains after which the guest is notified even if the queue
/// still has requests, so replies are not held back by a long drain.
const SIGNAL_BATCH: usize = 64;

const OUT_HEADER_LEN: usize = size_of::<OutHeader>();

/// What the worker state a device hands to its thread.
pub(super) struct Worker {
    pub(super) tag: String,
    pub(super) mem: GuestMemoryMmap,
    pub(super) interrupt: Arc<dyn VirtioInterrupt>,
    pub(super) queues: Vec<Queue>,
    pub(super) queue_evts: Vec<EventFd>,
    /// Kept open so the epoll registration of the kill eventfd lives as long
    /// as the worker.
    pub(super) _kill: EventFd,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) epoll: Epoll,
    pub(super) handler: RequestHandler,
    /// Import the root before serving (the device was restored from a
    /// snapshot: the guest will not send FUSE_INIT).
    pub(super) import_root: bool,
    /// The shared directory (an `O_PATH` descriptor the device opened),
    /// the worker thread's root once it runs.
    pub(super) share: OwnedFd,
}

impl Worker {
    /// Thread body: confines the thread to the share, reports readiness on
    /// `ready`, then serves until killed.
    pub(super) fn run(mut self, ready: SyncSender<io::Result<()>>) {
        // First of all, before anything is served: the thread gets its own
        // fs_struct (so the umask(0) the passthrough sets at FUSE_INIT and
        // the chroot stay on this thread) and the share becomes its root.
        if let Err(e) = confine_thread_to(&self.share) {
            tracing::error!(tag = %self.tag, "virtio-fs: cannot confine the worker to the share: {e}");
            let _ = ready.send(Err(e));
            return;
        }
        // Confinement (seccomp, capabilities) follows the chroot: the
        // chroot needs CAP_SYS_CHROOT, which the fs role drops.
        if let Err(e) = crate::confine::thread(crate::confine::Role::FsWorker) {
            tracing::error!(tag = %self.tag, "virtio-fs: cannot confine the worker thread: {e}");
            let _ = ready.send(Err(e.into()));
            return;
        }
        if self.import_root {
            if let Err(e) = self.handler.import_root() {
                tracing::error!(tag = %self.tag, "virtio-fs: importing the shared directory after a restore: {e}");
                let _ = ready.send(Err(e));
                return;
            }
            tracing::debug!(tag = %self.tag, "virtio-fs: root imported (restored device)");
        }
        if ready.send(Ok(())).is_err() {
            return;
        }
        drop(ready);
        self.event_loop();
        tracing::debug!(tag = %self.tag, "virtio-fs: worker exiting");
    }

    fn event_loop(&mut self) {
        let mut events = [EpollEvent::default(); NUM_QUEUES + 1];
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(tag = %self.tag, "virtio-fs: epoll_wait failed, stopping: {e}");
                    return;
                }
            };
            let mut pending = [false; NUM_QUEUES];
            for ev in events.iter().take(n) {
                let token = ev.data();
                if token == KILL_TOKEN {
                    return;
                }
                if let Some(p) = usize::try_from(token).ok().and_then(|i| pending.get_mut(i)) {
                    *p = true;
                }
            }
            // Hiprio (queue 0) first.
            for (q, _) in pending.iter().enumerate().filter(|(_, p)| **p) {
                if let Some(evt) = self.queue_evts.get(q) {
                    // Non-blocking; EAGAIN just means another wake drained it.
                    let _ = evt.read();
                }
                self.process_queue(q);
            }
        }
    }

    /// Serves every available chain of queue `q`.
    fn process_queue(&mut self, q: usize) {
        let Some(queue) = self.queues.get_mut(q) else {
            return;
        };
        let mut unsignalled = 0usize;
        loop {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(&self.mem) else {
                break;
            };
            let head = chain.head_index();
            let len = self.handler.handle(&self.mem, chain);
            if let Err(e) = queue.add_used(&self.mem, head, len) {
                self.handler
                    .guest_warn(format_args!("queue {q}: cannot add used entry {head}: {e}"));
                break;
            }
            unsignalled += 1;
            if unsignalled >= SIGNAL_BATCH {
                signal(&self.tag, &self.mem, queue, self.interrupt.as_ref());
                unsignalled = 0;
            }
        }
        if unsignalled > 0 {
            signal(&self.tag, &self.mem, queue, self.interrupt.as_ref());
        }
    }
}

/// Raises the vring interrupt if the driver wants it.
fn signal(tag: &str, mem: &GuestMemoryMmap, queue: &mut Queue, irq: &dyn VirtioInterrupt) {
    // On a ring error, notify anyway: a spurious interrupt is harmless, a
    // missed one hangs the guest.
    let needed = queue.needs_notification(mem).unwrap_or(true);
    if needed {
        if let Err(e) = irq.trigger(VIRTIO_MMIO_INT_VRING) {
            tracing::error!(tag, "virtio-fs: cannot interrupt the guest: {e}");
        }
    }
}

/// What to do with one request after screening.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Hand it to the FUSE server.
    Serve,
    /// Answer with this errno without calling the server.
    Reply(i32),
    /// Complete the chain with length 0 (no reply possible or expected).
    Drop,
}

/// Opcodes that get no reply.
fn is_no_reply(opcode: u32) -> bool {
    opcode == Opcode::Forget as u32
        || opcode == Opcode::BatchForget as u32
        || opcode == Opcode::Interrupt as u32
}

/// Opcodes handed to the server. Anything else is answered `ENOSYS` (or
/// `ENOTTY` for IOCTL) by the worker. SETUPMAPPING/REMOVEMAPPING need a DAX
/// window, which this device does not have.
const SERVED: &[Opcode] = &[
    Opcode::Lookup,
    Opcode::Forget,
    Opcode::Getattr,
    Opcode::Setattr,
    Opcode::Readlink,
    Opcode::Symlink,
    Opcode::Mknod,
    Opcode::Mkdir,
    Opcode::Unlink,
    Opcode::Rmdir,
    Opcode::Rename,
    Opcode::Link,
    Opcode::Open,
    Opcode::Read,
    Opcode::Write,
    Opcode::Statfs,
    Opcode::Release,
    Opcode::Fsync,
    Opcode::Setxattr,
    Opcode::Getxattr,
    Opcode::Listxattr,
    Opcode::Removexattr,
    Opcode::Flush,
    Opcode::Init,
    Opcode::Opendir,
    Opcode::Readdir,
    Opcode::Releasedir,
    Opcode::Fsyncdir,
    Opcode::Getlk,
    Opcode::Setlk,
    Opcode::Setlkw,
    Opcode::Access,
    Opcode::Create,
    Opcode::Interrupt,
    Opcode::Destroy,
    Opcode::BatchForget,
    Opcode::Fallocate,
    Opcode::Readdirplus,
    Opcode::Rename2,
    Opcode::Lseek,
];

/// Opcodes allowed on a read-only device (OPEN and ACCESS are further
/// checked for write intent).
const READ_ONLY_ALLOWED: &[Opcode] = &[
    Opcode::Lookup,
    Opcode::Forget,
    Opcode::Getattr,
    Opcode::Readlink,
    Opcode::Open,
    Opcode::Read,
    Opcode::Statfs,
    Opcode::Release,
    Opcode::Fsync,
    Opcode::Getxattr,
    Opcode::Listxattr,
    Opcode::Flush,
    Opcode::Init,
    Opcode::Opendir,
    Opcode::Readdir,
    Opcode::Releasedir,
    Opcode::Fsyncdir,
    Opcode::Getlk,
    Opcode::Setlk,
    Opcode::Setlkw,
    Opcode::Access,
    Opcode::Interrupt,
    Opcode::Destroy,
    Opcode::BatchForget,
    Opcode::Readdirplus,
    Opcode::Lseek,
];

fn in_set(set: &[Opcode], opcode: u32) -> bool {
    set.iter().any(|o| *o as u32 == opcode)
}

/// errno for an error the server returned without (necessarily) replying.
fn errno_of(e: &fuse_backend_rs::Error) -> i32 {
    use fuse_backend_rs::Error as E;
    match e {
        E::DecodeMessage(_)
        | E::MissingParameter
        | E::InvalidCString(_)
        | E::InvalidHeaderLength
        | E::InvalidXattrSize(_)
        | E::InvalidMessage(_) => libc::EINVAL,
        E::FailedToRemapID(_) => libc::EPERM,
        E::EncodeMessage(_) | E::FailedToWrite(_) | E::FailedToSplitWriter(_) => libc::EIO,
    }
}

/// The backend of a device: the passthrough within the table caps.
pub(super) type Backend = BoundedFs<PassthroughFs<()>>;

/// Screens and serves requests; owns the FUSE server (and so the
/// passthrough file system with all its descriptors).
pub(super) struct RequestHandler {
    tag: String,
    /// The backend, also held by `server`: a restored device imports its
    /// root without a FUSE_INIT.
    fs: Arc<Backend>,
    server: Server<Arc<Backend>>,
    read_only: bool,
    /// The private copy of the request being handled.
    request: RequestBuf,
    /// Set when the library panicked: its state may be inconsistent, so
    /// every later request gets `EIO` until the driver resets the device.
    poisoned: bool,
    warn_budget: u32,
    /// Runs right after a request was copied out of guest memory: lets a
    /// test play a vCPU that rewrites the request at the worst moment.
    #[cfg(test)]
    pub(super) after_copy: Option<super::device::AfterCopyHook>,
}

impl RequestHandler {
    pub(super) fn new(tag: String, fs: Backend, read_only: bool) -> Self {
        let fs = Arc::new(fs);
        Self {
            tag,
            server: Server::new(fs.clone()),
            fs,
            read_only,
            request: RequestBuf::default(),
            poisoned: false,
            warn_budget: WARN_BUDGET,
            #[cfg(test)]
            after_copy: None,
        }
    }

    /// The backend (for the tests' view of its tables).
    #[cfg(test)]
    pub(super) fn backend(&self) -> Arc<Backend> {
        self.fs.clone()
    }

    /// Makes the shared directory the root inode, as FUSE_INIT does. A
    /// device restored from a snapshot serves a guest that sent FUSE_INIT
    /// to the VM the snapshot was taken from, never to this backend. Sets
    /// the calling thread's umask to 0 (call it on the worker thread).
    pub(super) fn import_root(&self) -> io::Result<()> {
        self.fs.inner().import()
    }

    fn guest_warn(&mut self, args: fmt::Arguments<'_>) {
        if self.warn_budget > 0 {
            self.warn_budget -= 1;
            tracing::warn!(tag = %self.tag, "virtio-fs: {args}");
            if self.warn_budget == 0 {
                tracing::warn!(
                    tag = %self.tag,
                    "virtio-fs: further guest-triggered warnings are logged at debug level"
                );
            }
        } else {
            tracing::debug!(tag = %self.tag, "virtio-fs: {args}");
        }
    }

    /// Serves one chain; returns the number of bytes written for the used
    /// ring. The request is copied out of guest memory once; screening and
    /// serving both read that copy (see [`super::request`]).
    pub(super) fn handle(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        let header = match self.request.copy_in(mem, chain.clone()) {
            Ok(h) => h,
            Err(CopyError::Drop(why)) => {
                self.guest_warn(format_args!("{why}"));
                return 0;
            }
            Err(CopyError::Refuse(h, why)) => {
                self.guest_warn(format_args!("{why}"));
                return if is_no_reply(h.opcode) {
                    0
                } else {
                    reply_error(mem, chain, h.unique, libc::EINVAL)
                };
            }
        };
        #[cfg(test)]
        if let Some(hook) = &self.after_copy {
            hook();
        }

        match self.screen(&header) {
            Verdict::Drop => 0,
            Verdict::Reply(errno) => reply_error(mem, chain, header.unique, errno),
            Verdict::Serve => self.serve(mem, chain, &header),
        }
    }

    /// Decides what to do with a request from its header (and, for a few
    /// opcodes, its fixed-size argument), both read from the copy.
    fn screen(&mut self, h: &InHeader) -> Verdict {
        let op = h.opcode;
        let refuse = if is_no_reply(op) {
            Verdict::Drop
        } else {
            Verdict::Reply(libc::EINVAL)
        };
        let refuse_with = |errno: i32| {
            if is_no_reply(op) {
                Verdict::Drop
            } else {
                Verdict::Reply(errno)
            }
        };
        let len = h.len as usize;

        if self.poisoned {
            return refuse_with(libc::EIO);
        }
        if op == Opcode::Ioctl as u32 {
            return refuse_with(libc::ENOTTY);
        }
        if !in_set(SERVED, op) {
            // Linux sends FUSE_SYNCFS (50) on every unmount; ENOSYS makes it
            // stop asking, so that is not worth a warning.
            if op == FUSE_SYNCFS {
                tracing::debug!("FUSE_SYNCFS answered ENOSYS");
                return refuse_with(libc::ENOSYS);
            }
            self.guest_warn(format_args!("unsupported opcode {op}"));
            return refuse_with(libc::ENOSYS);
        }

        if op == Opcode::Mknod as u32 {
            let Some(args) = arg::<MknodIn>(self.request.body(len)) else {
                self.guest_warn(format_args!("MKNOD without its arguments"));
                return refuse;
            };
            let kind = args.mode & libc::S_IFMT;
            let whiteout = kind == libc::S_IFCHR && args.rdev == 0;
            if (kind == libc::S_IFCHR || kind == libc::S_IFBLK) && !whiteout {
                self.guest_warn(format_args!(
                    "refusing MKNOD of a device node (mode {:#o}, rdev {:#x})",
                    args.mode, args.rdev
                ));
                return refuse_with(libc::EPERM);
            }
        }

        // Linux's FUSE client never sends O_PATH (such opens do not reach
        // FUSE); fuse-backend-rs 0.14 closes an O_PATH handle's descriptor
        // twice when a WRITE is made on it (found by the virtio_fs fuzz
        // target), so such a request never reaches it.
        let open_flags = if op == Opcode::Open as u32 || op == Opcode::Opendir as u32 {
            arg::<OpenIn>(self.request.body(len)).map(|a| a.flags)
        } else if op == Opcode::Create as u32 {
            arg::<CreateIn>(self.request.body(len)).map(|a| a.flags)
        } else {
            None
        };
        if open_flags.is_some_and(|f| f as i32 & libc::O_PATH != 0) {
            self.guest_warn(format_args!("refusing opcode {op} with O_PATH"));
            return refuse_with(libc::EINVAL);
        }

        if self.read_only {
            if !in_set(READ_ONLY_ALLOWED, op) {
                return refuse_with(libc::EROFS);
            }
            if op == Opcode::Open as u32 {
                let Some(args) = arg::<OpenIn>(self.request.body(len)) else {
                    return refuse;
                };
                let flags = args.flags as i32;
                if flags & libc::O_ACCMODE != libc::O_RDONLY
                    || flags & (libc::O_TRUNC | libc::O_CREAT) != 0
                {
                    return refuse_with(libc::EROFS);
                }
            }
            if op == Opcode::Access as u32 {
                let Some(args) = arg::<AccessIn>(self.request.body(len)) else {
                    return refuse;
                };
                if args.mask & libc::W_OK as u32 != 0 {
                    return refuse_with(libc::EROFS);
                }
            }
        }
        Verdict::Serve
    }

    /// Hands a screened request, from the copy, to the FUSE server.
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        header: &InHeader,
    ) -> u32 {
        let writer = match VirtioFsWriter::new(mem, chain.clone()) {
            Ok(w) => w,
            Err(e) => {
                self.guest_warn(format_args!("dropping chain with bad writable part: {e}"));
                return 0;
            }
        };
        let request = self.request.request(header.len as usize);
        let reader = match Reader::<()>::from_fuse_buffer(FuseBuf::new(request)) {
            Ok(r) => r,
            Err(_) => return 0,
        };
        let writable = writer.available_bytes();
        let server = &self.server;
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            server.handle_message(reader, writer.into(), None, None)
        }));
        let expects_reply = !is_no_reply(header.opcode);
        match result {
            Ok(Ok(0)) if expects_reply && header.opcode == Opcode::Destroy as u32 => {
                // The library does not answer DESTROY; the guest waits for it.
                reply(mem, chain, header.unique, 0)
            }
            Ok(Ok(n)) => u32::try_from(n.min(writable)).unwrap_or(u32::MAX),
            Ok(Err(e)) => {
                self.guest_warn(format_args!(
                    "opcode {} (unique {}): {e}",
                    header.opcode, header.unique
                ));
                if expects_reply {
                    reply_error(mem, chain, header.unique, errno_of(&e))
                } else {
                    0
                }
            }
            Err(_) => {
                tracing::error!(
                    tag = %self.tag,
                    opcode = header.opcode,
                    "virtio-fs: the FUSE server panicked; answering EIO until the device is reset"
                );
                self.poisoned = true;
                if expects_reply {
                    reply_error(mem, chain, header.unique, libc::EIO)
                } else {
                    0
                }
            }
        }
    }
}

/// A request's fixed-size argument, read from (a copy of) its body.
fn arg<T: ByteValued + Default>(body: &[u8]) -> Option<T> {
    let mut t = T::default();
    let n = size_of::<T>();
    t.as_mut_slice().copy_from_slice(body.get(..n)?);
    Some(t)
}

/// Writes a bare reply header (`error` is 0 or a negated errno) at the start
/// of the chain's writable part; returns its length, or 0 if it does not fit.
fn reply(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    unique: u64,
    error: i32,
) -> u32 {
    let Ok(mut w) = VirtioFsWriter::new(mem, chain) else {
        return 0;
    };
    let out = OutHeader {
        len: OUT_HEADER_LEN as u32,
        error,
        unique,
    };
    match w.write_obj(out) {
        Ok(()) => OUT_HEADER_LEN as u32,
        Err(_) => 0,
    }
}

fn reply_error(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    unique: u64,
    errno: i32,
) -> u32 {
    reply(mem, chain, unique, -errno)
}
