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

use std::ffi::CStr;
use std::io;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, IoctlData, ListxattrReply,
    ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::api::validate_path_component;
use fuse_backend_rs::transport::FsCacheReqHandler;

use super::limits::{Cap, Tables, Usage};
use crate::config::FsLimits;

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
