//! Capability sets of each role, and dropping to them.
//!
//! Linux keeps capabilities per thread (capset(2) with pid 0 changes only
//! the caller), and a new thread starts with its creator's sets. So the
//! process-wide part runs before the shim starts any thread, and each
//! guest-driven thread drops to its own set at its start.

use caps::{CapSet, Capability, CapsHashSet};

use super::{ConfineError, Role};

/// What the shim's control plane keeps (every set: bounding, permitted,
/// effective; inheritable and ambient are empty):
/// - `SYS_ADMIN`: mount, umount2, open_tree/move_mount, setns into the
///   pod's network namespace, unshare;
/// - `NET_ADMIN`: the tap device and tc/netlink set-up of pod networking;
/// - `SYS_CHROOT`: the virtio-fs worker confines itself to its share;
/// - `SETPCAP`: threads drop capabilities from their bounding set;
/// - `CHOWN`, `DAC_OVERRIDE`, `FOWNER`, `FSETID`, `MKNOD`, `SETUID`,
///   `SETGID`, `SETFCAP`: the virtio-fs worker's set (a thread can only
///   keep what its creator has).
///
/// Dropped among others: `SYS_MODULE`, `SYS_RAWIO`, `SYS_BOOT`,
/// `SYS_TIME`, `SYS_PTRACE`, `SYS_RESOURCE`, `DAC_READ_SEARCH`
/// (open_by_handle_at), `KILL`, `NET_RAW`, `MAC_*`, `AUDIT_*`, `BPF`,
/// `PERFMON`, `SYSLOG`, `CHECKPOINT_RESTORE`.
const CONTROL_PLANE: &[Capability] = &[
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_SETPCAP,
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_MKNOD,
    Capability::CAP_SETUID,
    Capability::CAP_SETGID,
    Capability::CAP_SETFCAP,
];

/// What a passthrough FUSE server needs to act for the guest's users
/// (virtiofsd's default set): file ownership and modes on behalf of any
/// uid (`CHOWN`, `DAC_OVERRIDE`, `FOWNER`, `FSETID`), switching its
/// effective uid/gid per request (`SETUID`, `SETGID`), overlay whiteouts
/// (`MKNOD`; device nodes are refused before the library sees them), and
/// file capabilities in `security.capability` (`SETFCAP`).
const FS_WORKER: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_MKNOD,
    Capability::CAP_SETUID,
    Capability::CAP_SETGID,
    Capability::CAP_SETFCAP,
];

/// The capabilities a role keeps.
pub fn of(role: Role) -> &'static [Capability] {
    match role {
        Role::ControlPlane => CONTROL_PLANE,
        Role::FsWorker => FS_WORKER,
        Role::Vcpu | Role::VsockWorker | Role::NetWorker => &[],
    }
}

/// The role's set as a bit mask, as `/proc/<pid>/status` prints it
/// (`CapEff`, `CapPrm`, `CapBnd`).
pub fn mask(role: Role) -> u64 {
    of(role).iter().fold(0, |m, c| m | c.bitmask())
}

fn context(what: &'static str) -> impl FnOnce(caps::errors::CapsError) -> ConfineError {
    move |e| ConfineError::Caps(format!("{what}: {e}"))
}

/// Drops the calling thread to `role`'s set: bounding first (that needs
/// `SETPCAP`), then ambient and inheritable, effective, permitted.
pub fn drop_to(role: Role) -> Result<(), ConfineError> {
    let keep: CapsHashSet = of(role).iter().copied().collect();
    for cap in caps::all() {
        if keep.contains(&cap) {
            continue;
        }
        // Unknown to this kernel: nothing to drop.
        if caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap).map_err(context("bounding set"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(context("ambient set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(context("inheritable set"))?;
    let permitted = caps::read(None, CapSet::Permitted).map_err(context("permitted set"))?;
    let keep: CapsHashSet = keep.intersection(&permitted).copied().collect();
    caps::set(None, CapSet::Effective, &keep).map_err(context("effective set"))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(context("permitted set"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_driven_threads_keep_nothing_and_fs_no_admin() {
        for role in [Role::Vcpu, Role::VsockWorker, Role::NetWorker] {
            assert_eq!(mask(role), 0, "{role:?}");
        }
        let fs = of(Role::FsWorker);
        for forbidden in [
            Capability::CAP_SYS_ADMIN,
            Capability::CAP_DAC_READ_SEARCH,
            Capability::CAP_NET_ADMIN,
            Capability::CAP_SYS_CHROOT,
        ] {
            assert!(!fs.contains(&forbidden), "{forbidden}");
        }
        // A thread can only keep what the control plane it was created
        // from has.
        assert_eq!(mask(Role::FsWorker) & !mask(Role::ControlPlane), 0);
    }
}
