//! The file systems PID 1 mounts before anything else.

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

/// One early mount.
#[derive(Debug, Clone, Copy)]
pub struct EarlyMount {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: MsFlags,
    pub data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// In order: /proc first (the command line is read right after it), then
/// /sys, /dev and what lives below them.
pub const EARLY_MOUNTS: &[EarlyMount] = &[
    EarlyMount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    EarlyMount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    EarlyMount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    EarlyMount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620"),
    },
    EarlyMount {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    EarlyMount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    EarlyMount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
];

/// What happened to one mount.
#[derive(Debug)]
pub enum Outcome {
    Mounted,
    /// EBUSY: something is mounted there already.
    AlreadyMounted,
    Failed(Errno),
}

/// Mount `m`. To save syscalls the mount point is only created (mode 0755)
/// when the first attempt fails with ENOENT.
pub fn mount_one(m: &EarlyMount) -> Outcome {
    let attempt = || mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data);
    let mut res = attempt();
    if res == Err(Errno::ENOENT) {
        match std::fs::create_dir_all(m.target) {
            Ok(()) => res = attempt(),
            Err(e) => {
                return Outcome::Failed(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
            }
        }
    }
    match res {
        Ok(()) => Outcome::Mounted,
        Err(Errno::EBUSY) => Outcome::AlreadyMounted,
        Err(e) => Outcome::Failed(e),
    }
}

/// Mount all of [`EARLY_MOUNTS`], in order, and report each outcome.
/// Failures do not stop the others (the agent can still serve, and the
/// host learns more from a running agent than from a dead VM).
pub fn mount_early() -> Vec<(&'static EarlyMount, Outcome)> {
    EARLY_MOUNTS.iter().map(|m| (m, mount_one(m))).collect()
}

/// Log what [`mount_early`] did (call once logging is up).
pub fn log_outcomes(outcomes: &[(&'static EarlyMount, Outcome)]) {
    for (m, o) in outcomes {
        match o {
            Outcome::Mounted => tracing::debug!("mounted {} on {}", m.fstype, m.target),
            Outcome::AlreadyMounted => tracing::debug!("{} already mounted", m.target),
            Outcome::Failed(e) => tracing::error!("mount {} on {}: {e}", m.fstype, m.target),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_first_and_parents_before_children() {
        assert_eq!(EARLY_MOUNTS[0].target, "/proc");
        for (i, m) in EARLY_MOUNTS.iter().enumerate() {
            for earlier in &EARLY_MOUNTS[..i] {
                assert!(
                    !earlier.target.starts_with(&format!("{}/", m.target)),
                    "{} must be mounted before {}",
                    m.target,
                    earlier.target
                );
            }
        }
        let pos = |t: &str| EARLY_MOUNTS.iter().position(|m| m.target == t).unwrap();
        assert!(pos("/dev") < pos("/dev/pts"));
        assert!(pos("/dev") < pos("/dev/shm"));
        assert!(pos("/sys") < pos("/sys/fs/cgroup"));
    }
}
