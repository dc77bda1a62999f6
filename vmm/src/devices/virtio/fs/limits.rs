//! The caps on the host resources one virtio-fs device holds for its
//! guest: the bookkeeping of inodes and handles the guest holds, and the
//! fit of the caps to the process's descriptor limit. [`super::bounded_fs`]
//! applies them to the backend; its module doc says why they exist.

use std::collections::{HashMap, HashSet};
use std::io;

use fuse_backend_rs::abi::fuse_abi::ROOT_ID;

use crate::config::FsLimits;

/// Which cap a request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cap {
    Inodes,
    KnownInodes,
    Handles,
}

impl Cap {
    pub(super) fn errno(self) -> i32 {
        match self {
            Cap::Inodes | Cap::KnownInodes => libc::ENFILE,
            Cap::Handles => libc::EMFILE,
        }
    }

    /// The shim config key that sizes this cap.
    pub(super) fn config_key(self) -> &'static str {
        match self {
            Cap::Inodes => "fs_max_inodes",
            Cap::KnownInodes => "fs_max_known_inodes",
            Cap::Handles => "fs_max_handles",
        }
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }
}

/// The mirror of the backend's tables.
#[derive(Debug, Default)]
pub(super) struct Tables {
    /// Lookup count of every inode the guest holds (the root excluded: the
    /// backend never drops it).
    pub(super) lookups: HashMap<u64, u64>,
    /// Open file and directory handles.
    pub(super) handles: HashSet<u64>,
    /// Nodeids up to here were handed out before the backend last dropped
    /// its tables.
    pub(super) base_nodeid: u64,
    /// The highest nodeid the backend returned.
    pub(super) highest_nodeid: u64,
    /// Whether each cap was already logged at `warn`.
    pub(super) warned: [bool; 3],
}

impl Tables {
    pub(super) fn new() -> Self {
        Self {
            base_nodeid: ROOT_ID,
            highest_nodeid: ROOT_ID,
            ..Self::default()
        }
    }

    pub(super) fn known_inodes(&self) -> u64 {
        self.highest_nodeid.saturating_sub(self.base_nodeid)
    }

    pub(super) fn is_live(&self, nodeid: u64) -> bool {
        nodeid == ROOT_ID || self.lookups.contains_key(&nodeid)
    }

    /// Room for one more inode the backend does not know yet?
    pub(super) fn inode_room(&self, limits: &FsLimits) -> Result<(), Cap> {
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
    pub(super) fn admits(&mut self, nodeid: u64, limits: &FsLimits) -> Result<(), Cap> {
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

    pub(super) fn add_lookup(&mut self, nodeid: u64) {
        self.highest_nodeid = self.highest_nodeid.max(nodeid);
        if nodeid != ROOT_ID {
            *self.lookups.entry(nodeid).or_insert(0) += 1;
        }
    }

    pub(super) fn forget(&mut self, nodeid: u64, count: u64) {
        if let Some(n) = self.lookups.get_mut(&nodeid) {
            *n = n.saturating_sub(count);
            if *n == 0 {
                self.lookups.remove(&nodeid);
            }
        }
    }

    /// The backend dropped every inode and handle (FUSE_DESTROY).
    pub(super) fn clear(&mut self) {
        self.lookups.clear();
        self.handles.clear();
        self.base_nodeid = self.highest_nodeid;
    }
}

/// How many inodes and handles the device holds (for tests and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Usage {
    pub(super) inodes: u64,
    pub(super) handles: u64,
    pub(super) known_inodes: u64,
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
