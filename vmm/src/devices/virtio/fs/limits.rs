//! Caps on the host resources one virtio-fs device holds for its guest.
//!
//! `PassthroughFs` keeps, for every inode the guest has looked up and not
//! yet forgotten, an `O_PATH` descriptor and a table entry; for every open
//! file or directory a descriptor; and (with `use_host_ino` off, which the
//! device needs: see below) a host inode -> nodeid record for every inode
//! the guest ever looked up, kept until the guest unmounts. Nothing in the
//! library bounds those tables, so a guest could grow them until the VMM
//! process runs out of descriptors or memory.
//!
//! [`BoundedFs`] wraps the backend, mirrors its lookup counts and open
//! handles, and refuses what would pass a cap of [`FsLimits`]: `ENFILE`
//! for inodes, `EMFILE` for open files. A refused LOOKUP (or READDIRPLUS
//! entry) is forgotten in the backend at once, so the backend's table never
//! holds more than the cap plus the one inode being refused. The first
//! refusal of each kind is logged at `warn` naming the config key, later
//! ones at `debug`.
//!
//! `use_host_ino` stays off: with it on, the library can tell apart at most
//! 254 (st_dev, mount id) pairs over the life of the backend, and every
//! container rootfs and volume bind of a pod is one, so a pod restarting a
//! container often enough would lose its share. The price is the record of
//! known inodes, bounded here by `max_known_inodes`: the backend hands
//! nodeids out in increasing order and reuses a record for an inode it
//! knows, so the highest nodeid it returned since it last dropped its tables
//! (FUSE_DESTROY) counts the records.
//!
//! One quirk of the library is corrected here: its CREATE of an existing
//! name takes a lookup reference before opening the file and keeps it when
//! the open fails (a FIFO, a directory, ...), an inode pinned forever that
//! the guest never learns about. [`BoundedFs::create`] looks an existing
//! name up and opens it itself, dropping the reference when the open fails.

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::io;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid, ROOT_ID,
};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, IoctlData, ListxattrReply,
    ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::api::validate_path_component;
use fuse_backend_rs::transport::FsCacheReqHandler;

use crate::config::FsLimits;

/// Which cap a request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cap {
    Inodes,
    KnownInodes,
    Handles,
}

impl Cap {
    fn errno(self) -> i32 {
        match self {
            Cap::Inodes | Cap::KnownInodes => libc::ENFILE,
            Cap::Handles => libc::EMFILE,
        }
    }

    /// The shim config key that sizes this cap.
    fn config_key(self) -> &'static str {
        match self {
            Cap::Inodes => "fs_max_inodes",
            Cap::KnownInodes => "fs_max_known_inodes",
            Cap::Handles => "fs_max_handles",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The mirror of the backend's tables.
#[derive(Debug, Default)]
struct Tables {
    /// Lookup count of every inode the guest holds (the root excluded: the
    /// backend never drops it).
    lookups: HashMap<u64, u64>,
    /// Open file and directory handles.
    handles: HashSet<u64>,
    /// Nodeids up to here were handed out before the backend last dropped
    /// its tables.
    base_nodeid: u64,
    /// The highest nodeid the backend returned.
    highest_nodeid: u64,
    /// Whether each cap was already logged at `warn`.
    warned: [bool; 3],
}

impl Tables {
    fn new() -> Self {
        Self {
            base_nodeid: ROOT_ID,
            highest_nodeid: ROOT_ID,
            ..Self::default()
        }
    }

    fn known_inodes(&self) -> u64 {
        self.highest_nodeid.saturating_sub(self.base_nodeid)
    }

    fn is_live(&self, nodeid: u64) -> bool {
        nodeid == ROOT_ID || self.lookups.contains_key(&nodeid)
    }

    /// Room for one more inode the backend does not know yet?
    fn inode_room(&self, limits: &FsLimits) -> Result<(), Cap> {
        if self.lookups.len() as u64 >= limits.max_inodes {
            return Err(Cap::Inodes);
        }
        if self.known_inodes() >= limits.max_known_inodes {
            return Err(Cap::KnownInodes);
        }
        Ok(())
    }

    /// Whether the guest may get (one more reference to) `nodeid`, which
    /// the backend just returned with a reference taken.
    fn admits(&mut self, nodeid: u64, limits: &FsLimits) -> Result<(), Cap> {
        let known_before = self.known_inodes();
        self.highest_nodeid = self.highest_nodeid.max(nodeid);
        if self.is_live(nodeid) {
            return Ok(());
        }
        if self.lookups.len() as u64 >= limits.max_inodes {
            return Err(Cap::Inodes);
        }
        // A record the backend made just now, past the cap (an inode it
        // knew already keeps its lower nodeid).
        if nodeid > self.base_nodeid.saturating_add(limits.max_known_inodes)
            && self.known_inodes() > known_before
        {
            return Err(Cap::KnownInodes);
        }
        Ok(())
    }

    fn add_lookup(&mut self, nodeid: u64) {
        self.highest_nodeid = self.highest_nodeid.max(nodeid);
        if nodeid != ROOT_ID {
            *self.lookups.entry(nodeid).or_insert(0) += 1;
        }
    }

    fn forget(&mut self, nodeid: u64, count: u64) {
        if let Some(n) = self.lookups.get_mut(&nodeid) {
            *n = n.saturating_sub(count);
            if *n == 0 {
                self.lookups.remove(&nodeid);
            }
        }
    }

    /// The backend dropped every inode and handle (FUSE_DESTROY).
    fn clear(&mut self) {
        self.lookups.clear();
        self.handles.clear();
        self.base_nodeid = self.highest_nodeid;
    }
}

/// A `FileSystem` that forwards to `inner` within the caps of [`FsLimits`].
/// Nodeids and handles are the backend's `u64`s.
pub(super) struct BoundedFs<F> {
    inner: F,
    tag: String,
    limits: FsLimits,
    /// The caps were lowered to fit `RLIMIT_NOFILE` (said when refusing).
    fitted_to_nofile: bool,
    tables: Mutex<Tables>,
}

/// How many inodes and handles the device holds (for tests and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Usage {
    pub(super) inodes: u64,
    pub(super) handles: u64,
    pub(super) known_inodes: u64,
}

impl<F: FileSystem<Inode = u64, Handle = u64>> BoundedFs<F> {
    pub(super) fn new(inner: F, tag: String, limits: FsLimits, fitted_to_nofile: bool) -> Self {
        Self {
            inner,
            tag,
            limits,
            fitted_to_nofile,
            tables: Mutex::new(Tables::new()),
        }
    }

    /// The wrapped backend.
    pub(super) fn inner(&self) -> &F {
        &self.inner
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub(super) fn usage(&self) -> Usage {
        let t = self.tables();
        Usage {
            inodes: t.lookups.len() as u64,
            handles: t.handles.len() as u64,
            known_inodes: t.known_inodes(),
        }
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        // The tables stay consistent whatever panicked while they were
        // locked (every update is a single map operation).
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Logs a refusal (once at `warn` per cap) and returns its error.
    fn refuse(&self, cap: Cap) -> io::Error {
        let first = {
            let mut t = self.tables();
            !std::mem::replace(&mut t.warned[cap.index()], true)
        };
        let (limit, what) = match cap {
            Cap::Inodes => (self.limits.max_inodes, "inodes held by the guest"),
            Cap::KnownInodes => (self.limits.max_known_inodes, "inodes known to the share"),
            Cap::Handles => (self.limits.max_handles, "files open in the guest"),
        };
        if first {
            let lowered = if self.fitted_to_nofile && cap != Cap::KnownInodes {
                ", lowered to fit the shim's RLIMIT_NOFILE"
            } else {
                ""
            };
            tracing::warn!(
                tag = %self.tag,
                "virtio-fs: {what} reached the cap of {limit} ({}{lowered}); refusing more with \
                 errno {} (further refusals are logged at debug level)",
                cap.config_key(),
                cap.errno()
            );
        } else {
            tracing::debug!(tag = %self.tag, "virtio-fs: {what} at the cap of {limit}");
        }
        io::Error::from_raw_os_error(cap.errno())
    }

    fn inode_room(&self) -> io::Result<()> {
        let room = self.tables().inode_room(&self.limits);
        room.map_err(|cap| self.refuse(cap))
    }

    fn handle_room(&self) -> io::Result<()> {
        let full = self.tables().handles.len() as u64 >= self.limits.max_handles;
        if full {
            return Err(self.refuse(Cap::Handles));
        }
        Ok(())
    }

    /// Hands `entry` (returned by the backend with a reference taken) to
    /// the guest, or drops that reference and refuses it past a cap.
    fn admit(&self, ctx: &Context, entry: Entry) -> io::Result<Entry> {
        let verdict = {
            let mut t = self.tables();
            let v = t.admits(entry.inode, &self.limits);
            if v.is_ok() {
                t.add_lookup(entry.inode);
            }
            v
        };
        match verdict {
            Ok(()) => Ok(entry),
            Err(cap) => {
                self.inner.forget(ctx, entry.inode, 1);
                Err(self.refuse(cap))
            }
        }
    }

    /// Records an entry the backend created after [`Self::inode_room`]
    /// said there was room.
    fn record(&self, entry: &Entry) {
        self.tables().add_lookup(entry.inode);
    }

    fn record_handle(&self, handle: Option<u64>) {
        if let Some(h) = handle {
            self.tables().handles.insert(h);
        }
    }

    /// CREATE of a name that exists: open the inode the lookup returned,
    /// dropping the lookup's reference if that fails.
    fn open_existing(
        &self,
        ctx: &Context,
        entry: Entry,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        let entry = self.admit(ctx, entry)?;
        match self
            .inner
            .open(ctx, entry.inode, args.flags, args.fuse_flags)
        {
            Ok((handle, opts, passthrough)) => {
                self.record_handle(handle);
                Ok((entry, handle, opts, passthrough))
            }
            Err(e) => {
                self.forget(ctx, entry.inode, 1);
                Err(e)
            }
        }
    }
}

impl<F: FileSystem<Inode = u64, Handle = u64>> FileSystem for BoundedFs<F> {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.inner.init(capable)
    }

    fn destroy(&self) {
        self.inner.destroy();
        self.tables().clear();
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let entry = self.inner.lookup(ctx, parent, name)?;
        self.admit(ctx, entry)
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.inner.forget(ctx, inode, count);
        self.tables().forget(inode, count);
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        {
            let mut t = self.tables();
            for (inode, count) in &requests {
                t.forget(*inode, *count);
            }
        }
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.inode_room()?;
        let entry = self.inner.symlink(ctx, linkname, parent, name)?;
        self.record(&entry);
        Ok(entry)
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.inode_room()?;
        let entry = self.inner.mknod(ctx, parent, name, mode, rdev, umask)?;
        self.record(&entry);
        Ok(entry)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.inode_room()?;
        let entry = self.inner.mkdir(ctx, parent, name, mode, umask)?;
        self.record(&entry);
        Ok(entry)
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        // A new name for an existing inode: admitted like a lookup.
        let entry = self.inner.link(ctx, inode, newparent, newname)?;
        self.admit(ctx, entry)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        self.handle_room()?;
        let opened = self.inner.open(ctx, inode, flags, fuse_flags)?;
        self.record_handle(opened.0);
        Ok(opened)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        // The backend validates the name too, but only after the lookup
        // below would have taken `.` or `..`.
        validate_path_component(name)?;
        self.handle_room()?;
        if args.flags & libc::O_EXCL as u32 == 0 {
            match self.inner.lookup(ctx, parent, name) {
                Ok(entry) => return self.open_existing(ctx, entry, args),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        self.inode_room()?;
        let created = self.inner.create(ctx, parent, name, args)?;
        self.record(&created.0);
        self.record_handle(created.1);
        Ok(created)
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)?;
        self.tables().handles.remove(&handle);
        Ok(())
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, inode, name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        self.handle_room()?;
        let opened = self.inner.opendir(ctx, inode, flags)?;
        self.record_handle(opened.0);
        Ok(opened)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        // The backend's own lookups here are dropped before it returns.
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let mut added = 0usize;
        let mut refused = None;
        let res = self
            .inner
            .readdirplus(ctx, inode, handle, size, offset, &mut |dirent, entry| {
                let nodeid = entry.inode;
                let verdict = self.tables().admits(nodeid, &self.limits);
                if let Err(cap) = verdict {
                    // The backend keeps the reference of an entry that
                    // fails; drop it. It stops at the first error and
                    // answers with the entries before it.
                    self.inner.forget(ctx, nodeid, 1);
                    refused = Some(cap);
                    return Err(io::Error::from_raw_os_error(cap.errno()));
                }
                let r = add_entry(dirent, entry);
                match r {
                    // The reply is full; the backend drops the reference.
                    Ok(0) => {}
                    Ok(_) => {
                        added += 1;
                        self.tables().add_lookup(nodeid);
                    }
                    // The backend keeps the reference; so do the tables.
                    Err(_) => self.tables().add_lookup(nodeid),
                }
                r
            });
        match (res, refused) {
            // Nothing fit under the cap: an error, not an empty directory.
            (Ok(()), Some(cap)) if added == 0 => Err(self.refuse(cap)),
            (Err(_), Some(cap)) => Err(self.refuse(cap)),
            (res, _) => res,
        }
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)?;
        self.tables().handles.remove(&handle);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn setupmapping(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        foffset: u64,
        len: u64,
        flags: u64,
        moffset: u64,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.inner
            .setupmapping(ctx, inode, handle, foffset, len, flags, moffset, vu_req)
    }

    fn removemapping(
        &self,
        ctx: &Context,
        inode: u64,
        requests: Vec<RemovemappingOne>,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.inner.removemapping(ctx, inode, requests, vu_req)
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    fn getlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.inner.getlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlkw(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlkw(ctx, inode, handle, owner, lock, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        flags: u32,
        cmd: u32,
        data: IoctlData,
        out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        self.inner
            .ioctl(ctx, inode, handle, flags, cmd, data, out_size)
    }

    fn bmap(&self, ctx: &Context, inode: u64, block: u64, blocksize: u32) -> io::Result<u64> {
        self.inner.bmap(ctx, inode, block, blocksize)
    }

    fn poll(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        khandle: u64,
        flags: u32,
        events: u32,
    ) -> io::Result<u32> {
        self.inner.poll(ctx, inode, handle, khandle, flags, events)
    }

    fn notify_reply(&self) -> io::Result<()> {
        self.inner.notify_reply()
    }

    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        self.inner.id_remap(ctx)
    }
}

/// Descriptors the rest of the VMM process keeps for itself (vsock
/// connections, the tap, KVM, logs, ...) out of `RLIMIT_NOFILE`.
pub(super) const FD_RESERVE: u64 = 4096;

/// Shrinks `limits` so that the inodes and handles (one descriptor each)
/// fit in `nofile` minus [`FD_RESERVE`] (a quarter of `nofile` when that is
/// small): past the process's descriptor
/// limit the share would fail with `EMFILE` anywhere, and take the
/// descriptors the VMM needs for itself. Handles get at most a fifth of
/// what is left. Returns whether anything was shrunk.
pub(super) fn fit_to_nofile(limits: &mut FsLimits, nofile: u64) -> bool {
    let reserve = FD_RESERVE.min(nofile / 4);
    let budget = nofile.saturating_sub(reserve).max(2);
    if limits.max_inodes.saturating_add(limits.max_handles) <= budget {
        return false;
    }
    limits.max_handles = limits.max_handles.min(budget / 5).max(1);
    limits.max_inodes = limits.max_inodes.min(budget - limits.max_handles).max(1);
    true
}

/// The soft `RLIMIT_NOFILE` of the process.
pub(super) fn nofile_limit() -> io::Result<u64> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `rl`, which lives across
    // the call; the return value is checked.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rl.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_fit_the_descriptor_limit() {
        let mut l = FsLimits::default();
        assert!(
            !fit_to_nofile(&mut l, 1 << 20),
            "1 Mi descriptors hold the defaults"
        );
        assert_eq!(l, FsLimits::default());

        let mut l = FsLimits::default();
        assert!(fit_to_nofile(&mut l, 20_000));
        assert_eq!(l.max_handles, (20_000 - FD_RESERVE) / 5);
        assert_eq!(l.max_inodes + l.max_handles, 20_000 - FD_RESERVE);
        assert_eq!(l.max_known_inodes, FsLimits::default().max_known_inodes);

        // A small limit keeps a quarter for the rest of the process.
        let mut l = FsLimits::default();
        assert!(fit_to_nofile(&mut l, 1024));
        assert_eq!((l.max_inodes, l.max_handles), (615, 153));
        let mut l = FsLimits::default();
        assert!(fit_to_nofile(&mut l, 0));
        assert!(l.max_inodes >= 1 && l.max_handles >= 1);
    }

    #[test]
    fn known_inodes_count_records_since_the_last_destroy() {
        let limits = FsLimits {
            max_inodes: 10,
            max_handles: 10,
            max_known_inodes: 3,
        };
        let mut t = Tables::new();
        for nodeid in 2..=4 {
            assert_eq!(t.admits(nodeid, &limits), Ok(()));
            t.add_lookup(nodeid);
            t.forget(nodeid, 1);
        }
        assert_eq!(t.known_inodes(), 3);
        assert!(t.lookups.is_empty());
        // A fourth record is past the cap; an inode known before is not.
        assert_eq!(t.admits(5, &limits), Err(Cap::KnownInodes));
        assert_eq!(t.admits(3, &limits), Ok(()));
        assert_eq!(t.inode_room(&limits), Err(Cap::KnownInodes));
        // DESTROY drops the records.
        t.clear();
        assert_eq!(t.known_inodes(), 0);
        assert_eq!(t.admits(6, &limits), Ok(()));
    }
}
