//! Host-side mount helpers: containerd's mount lists (the snapshot's
//! overlay), binds into the pod's virtio-fs share, and unmounting.
//!
//! Everything here is a direct mount(2)/umount2(2) call from this process:
//! no `mount` helper is spawned and nothing forks, so the reaper pitfall of
//! containerd-shim (a `waitpid(-1)` that steals children's statuses) cannot
//! bite, and no fork happens in a multi-threaded process.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Longest mount data the kernel accepts (one page).
const MAX_MOUNT_DATA: usize = 4096;

/// A mount to perform, as containerd describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRequest {
    pub fstype: String,
    pub source: String,
    pub options: Vec<String>,
}

/// mount(8)-style options split into flags to set, flags to clear,
/// propagation flags and file-system data.
#[derive(Debug, PartialEq, Eq)]
pub struct ParsedOptions {
    pub set: MsFlags,
    pub clear: MsFlags,
    pub propagation: MsFlags,
    pub data: String,
}

impl Default for ParsedOptions {
    fn default() -> Self {
        ParsedOptions {
            set: MsFlags::empty(),
            clear: MsFlags::empty(),
            propagation: MsFlags::empty(),
            data: String::new(),
        }
    }
}

impl ParsedOptions {
    pub fn flags(&self) -> MsFlags {
        self.set & !self.clear
    }
}

/// Splits options like containerd's mount package does.
pub fn parse_options(options: &[String]) -> ParsedOptions {
    let mut p = ParsedOptions::default();
    let mut data = Vec::new();
    for opt in options {
        let (clear, flag) = match opt.as_str() {
            "defaults" => continue,
            "async" => (true, MsFlags::MS_SYNCHRONOUS),
            "atime" => (true, MsFlags::MS_NOATIME),
            "bind" => (false, MsFlags::MS_BIND),
            "dev" => (true, MsFlags::MS_NODEV),
            "diratime" => (true, MsFlags::MS_NODIRATIME),
            "dirsync" => (false, MsFlags::MS_DIRSYNC),
            "exec" => (true, MsFlags::MS_NOEXEC),
            "mand" => (false, MsFlags::MS_MANDLOCK),
            "noatime" => (false, MsFlags::MS_NOATIME),
            "nodev" => (false, MsFlags::MS_NODEV),
            "nodiratime" => (false, MsFlags::MS_NODIRATIME),
            "noexec" => (false, MsFlags::MS_NOEXEC),
            "nomand" => (true, MsFlags::MS_MANDLOCK),
            "norelatime" => (true, MsFlags::MS_RELATIME),
            "nostrictatime" => (true, MsFlags::MS_STRICTATIME),
            "nosuid" => (false, MsFlags::MS_NOSUID),
            "rbind" => (false, MsFlags::MS_BIND | MsFlags::MS_REC),
            "relatime" => (false, MsFlags::MS_RELATIME),
            "remount" => (false, MsFlags::MS_REMOUNT),
            "ro" => (false, MsFlags::MS_RDONLY),
            "rw" => (true, MsFlags::MS_RDONLY),
            "strictatime" => (false, MsFlags::MS_STRICTATIME),
            "suid" => (true, MsFlags::MS_NOSUID),
            "sync" => (false, MsFlags::MS_SYNCHRONOUS),
            "private" => {
                p.propagation |= MsFlags::MS_PRIVATE;
                continue;
            }
            "rprivate" => {
                p.propagation |= MsFlags::MS_PRIVATE | MsFlags::MS_REC;
                continue;
            }
            "slave" => {
                p.propagation |= MsFlags::MS_SLAVE;
                continue;
            }
            "rslave" => {
                p.propagation |= MsFlags::MS_SLAVE | MsFlags::MS_REC;
                continue;
            }
            "shared" => {
                p.propagation |= MsFlags::MS_SHARED;
                continue;
            }
            "rshared" => {
                p.propagation |= MsFlags::MS_SHARED | MsFlags::MS_REC;
                continue;
            }
            "unbindable" => {
                p.propagation |= MsFlags::MS_UNBINDABLE;
                continue;
            }
            "runbindable" => {
                p.propagation |= MsFlags::MS_UNBINDABLE | MsFlags::MS_REC;
                continue;
            }
            other => {
                data.push(other);
                continue;
            }
        };
        if clear {
            p.clear |= flag;
            p.set &= !flag;
        } else {
            p.set |= flag;
            p.clear &= !flag;
        }
    }
    p.data = data.join(",");
    p
}

/// Mounts one containerd mount onto `target`.
pub fn mount_request(m: &MountRequest, target: &Path) -> anyhow::Result<()> {
    let opts = parse_options(&m.options);
    if opts.data.len() >= MAX_MOUNT_DATA {
        bail!(
            "{} mount options are {} bytes, more than the kernel's one-page limit (too many image layers?)",
            m.fstype,
            opts.data.len()
        );
    }
    let flags = opts.flags();
    let fstype = (!m.fstype.is_empty() && m.fstype != "none").then_some(m.fstype.as_str());
    let data = (!opts.data.is_empty()).then_some(opts.data.as_str());
    let is_ro_bind = flags.contains(MsFlags::MS_BIND | MsFlags::MS_RDONLY);
    let first = if is_ro_bind {
        flags & !MsFlags::MS_RDONLY
    } else {
        flags
    };
    mount(Some(m.source.as_str()), target, fstype, first, data).with_context(|| {
        format!(
            "mounting {} ({}) on {}",
            m.source,
            m.fstype,
            target.display()
        )
    })?;
    // A bind ignores MS_RDONLY on the first call; read-only needs a remount.
    if is_ro_bind {
        remount_ro_bind(target)?;
    }
    if !opts.propagation.is_empty() {
        set_propagation(target, opts.propagation)?;
    }
    Ok(())
}

fn remount_ro_bind(target: &Path) -> anyhow::Result<()> {
    mount::<str, Path, str, str>(
        None,
        target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None,
    )
    .with_context(|| format!("making bind mount {} read-only", target.display()))
}

fn set_propagation(target: &Path, flags: MsFlags) -> anyhow::Result<()> {
    mount::<str, Path, str, str>(None, target, None, flags, None)
        .with_context(|| format!("setting mount propagation of {}", target.display()))
}

/// Recursively binds `source` onto `target` (which must exist and be of the
/// same kind, file or directory), makes the new mount private so nothing
/// mounted below either side propagates to the other, and makes it
/// read-only if asked. The guest reaches `target` through virtio-fs, so a
/// read-only volume must be read-only here, not only in the guest.
pub fn bind(source: &Path, target: &Path, readonly: bool) -> anyhow::Result<()> {
    mount::<Path, Path, str, str>(
        Some(source),
        target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )
    .with_context(|| format!("bind-mounting {} on {}", source.display(), target.display()))?;
    let rest = (|| {
        set_propagation(target, MsFlags::MS_PRIVATE | MsFlags::MS_REC)?;
        if readonly {
            remount_ro_bind(target)?;
        }
        Ok(())
    })();
    if rest.is_err() {
        let _ = unmount(target);
    }
    rest
}

/// Unmounts `target` once. Not mounted or missing is fine; a busy mount
/// (e.g. the in-process virtio-fs server still holds a file open) is
/// detached lazily.
pub fn unmount(target: &Path) -> anyhow::Result<()> {
    match umount2(target, MntFlags::empty()) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
        Err(Errno::EBUSY) => umount2(target, MntFlags::MNT_DETACH)
            .with_context(|| format!("lazily unmounting busy {}", target.display())),
        Err(e) => Err(e).with_context(|| format!("unmounting {}", target.display())),
    }
}

/// Undoes `octal` escapes of /proc/self/mountinfo (`\040` = space).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points listed in `mountinfo` text that are `dir` or below it,
/// deepest first (the order to unmount them in).
pub fn mount_points_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    // Deeper paths first; among equal paths (stacked mounts) keep the
    // later (upper) one first, as mountinfo lists them in mount order.
    points.reverse();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points
}

/// Unmounts everything mounted at or below `dir`, deepest first, each
/// detached lazily (this is cleanup after a crash: nothing may block it).
/// Returns the failures.
pub fn unmount_all_under(dir: &Path) -> Vec<anyhow::Error> {
    let info = match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(i) => i,
        Err(e) => return vec![anyhow::Error::from(e).context("reading /proc/self/mountinfo")],
    };
    let mut errors = Vec::new();
    for point in mount_points_under(&info, dir) {
        if let Err(e) = umount2(&point, MntFlags::MNT_DETACH) {
            if e != Errno::EINVAL && e != Errno::ENOENT {
                errors.push(
                    anyhow::Error::from(e).context(format!("unmounting {}", point.display())),
                );
            }
        }
    }
    errors
}

/// The mounts made for one purpose, undone in reverse order.
#[derive(Debug, Default)]
pub struct MountStack {
    targets: Vec<PathBuf>,
}

impl MountStack {
    pub fn push(&mut self, target: PathBuf) {
        self.targets.push(target);
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// Moves `other`'s mounts on top of this stack.
    pub fn append(&mut self, other: &mut MountStack) {
        self.targets.append(&mut other.targets);
    }

    /// Unmounts everything, last first. Keeps going after a failure and
    /// returns the failures.
    pub fn unmount_all(&mut self) -> Vec<anyhow::Error> {
        let mut errors = Vec::new();
        while let Some(t) = self.targets.pop() {
            if let Err(e) = unmount(&t) {
                errors.push(e);
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(o: &[&str]) -> ParsedOptions {
        parse_options(&o.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let p = opts(&["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2"]);
        assert_eq!(p.flags(), MsFlags::empty());
        assert_eq!(p.data, "index=off,workdir=/w,upperdir=/u,lowerdir=/l1:/l2");

        let p = opts(&["rbind", "ro", "nosuid", "rprivate"]);
        assert_eq!(
            p.flags(),
            MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID
        );
        assert_eq!(p.propagation, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
        assert!(p.data.is_empty());

        // The last word wins.
        assert!(!opts(&["ro", "rw"]).flags().contains(MsFlags::MS_RDONLY));
        assert!(opts(&["rw", "ro"]).flags().contains(MsFlags::MS_RDONLY));
    }

    #[test]
    fn mountinfo_is_filtered_and_ordered_for_unmounting() {
        let info = "\
22 1 0:21 / /run rw - tmpfs tmpfs rw
40 22 0:50 / /run/ember/default/p rw - tmpfs tmpfs rw
41 40 0:51 / /run/ember/default/p/shared rw - tmpfs tmpfs rw
42 41 0:52 / /run/ember/default/p/shared/c1/rootfs rw - overlay overlay rw
43 41 0:53 / /run/ember/default/p/shared/c1/mounts/0 rw - ext4 /dev/sda rw
44 42 0:54 / /run/ember/default/p/shared/c1/rootfs rw - overlay overlay rw
45 22 0:55 / /run/ember/default/p2 rw - tmpfs tmpfs rw
46 22 0:56 / /run/ember/default/with\\040space rw - tmpfs tmpfs rw
";
        let got = mount_points_under(info, Path::new("/run/ember/default/p"));
        let want: Vec<PathBuf> = [
            "/run/ember/default/p/shared/c1/mounts/0",
            "/run/ember/default/p/shared/c1/rootfs",
            "/run/ember/default/p/shared/c1/rootfs",
            "/run/ember/default/p/shared",
            "/run/ember/default/p",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(got, want);
        let got = mount_points_under(info, Path::new("/run/ember/default/with space"));
        assert_eq!(got, vec![PathBuf::from("/run/ember/default/with space")]);
    }

    #[test]
    fn unmounting_what_is_not_mounted_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        unmount(dir.path()).unwrap();
        unmount(&dir.path().join("missing")).unwrap();
        let mut stack = MountStack::default();
        stack.push(dir.path().to_path_buf());
        assert!(stack.unmount_all().is_empty());
        assert!(stack.is_empty());
    }

    #[test]
    fn bind_and_unmount_round_trip() {
        // Needs CAP_SYS_ADMIN; skipped when not root.
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let dst = dir.path().join("dst");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        std::fs::write(src.join("f"), "x").unwrap();
        bind(&src, &dst, true).unwrap();
        assert_eq!(std::fs::read_to_string(dst.join("f")).unwrap(), "x");
        assert!(
            std::fs::write(dst.join("g"), "y").is_err(),
            "read-only bind"
        );
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert_eq!(mount_points_under(&info, &dst).len(), 1);
        assert!(unmount_all_under(dir.path()).is_empty());
        assert!(!dst.join("f").exists());
    }
}
