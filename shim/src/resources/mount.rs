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

/// Makes `dir` a mount of its own (a bind onto itself) in a peer group of
/// its own: private first, so it leaves whatever group its parent is in,
/// then shared, so that mounts made below it propagate to its slaves (the
/// read-only view [`read_only_view`] makes).
pub fn make_own_shared_mount(dir: &Path) -> anyhow::Result<MadeMount> {
    mount::<Path, Path, str, str>(Some(dir), dir, None, MsFlags::MS_BIND, None)
        .with_context(|| format!("bind-mounting {} onto itself", dir.display()))?;
    let made = MadeMount::on_top_of(dir)?;
    let rest = set_propagation(dir, MsFlags::MS_PRIVATE)
        .and_then(|()| set_propagation(dir, MsFlags::MS_SHARED));
    if let Err(e) = rest {
        let _ = unmount(&made);
        return Err(e);
    }
    Ok(made)
}

/// Binds `source` (a shared mount) at `target` as its slave, read-only:
/// mounts made below `source` appear below `target` (each with its own
/// flags, so a writable rootfs stays writable), but the tree of
/// directories of `target` itself cannot be written through it.
pub fn read_only_view(source: &Path, target: &Path) -> anyhow::Result<MadeMount> {
    mount::<Path, Path, str, str>(Some(source), target, None, MsFlags::MS_BIND, None)
        .with_context(|| format!("bind-mounting {} on {}", source.display(), target.display()))?;
    let made = MadeMount::on_top_of(target)?;
    let rest = set_propagation(target, MsFlags::MS_SLAVE).and_then(|()| remount_ro_bind(target));
    if let Err(e) = rest {
        let _ = unmount(&made);
        return Err(e);
    }
    Ok(made)
}

/// A mount this process made, and how to recognise it again: the kernel's
/// mount id of the mount on top of `target` right after it was made.
/// Unmounting checks the id first, so the shim never unmounts anything it
/// did not mount itself, whatever is at that path by then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MadeMount {
    pub target: PathBuf,
    pub mnt_id: u64,
}

impl MadeMount {
    /// Records the mount now on top of `target`.
    pub fn on_top_of(target: &Path) -> anyhow::Result<MadeMount> {
        let mnt_id = mount_id(target)
            .with_context(|| format!("reading the mount id of {}", target.display()))?;
        Ok(MadeMount {
            target: target.to_path_buf(),
            mnt_id,
        })
    }
}

/// The mount id of what `path` names, without following a symlink in its
/// last component (a symlink reports the mount it lives in, which is never
/// one the shim made on that path). The 64-bit id that is never reused
/// (`STATX_MNT_ID_UNIQUE`, Linux 6.8+) where the kernel has it, else the
/// classic id (which a later mount can get again once this one is gone).
pub fn mount_id(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `stx` a valid, writable
    // statx buffer for the duration of the call.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT,
            STATX_MNT_ID_UNIQUE,
            &mut stx,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if stx.stx_mask & (STATX_MNT_ID_UNIQUE | STATX_MNT_ID) == 0 {
        return Err(std::io::Error::other("the kernel reports no mount id"));
    }
    Ok(stx.stx_mnt_id)
}

// From <linux/stat.h> and <linux/mount.h> (the new mount API, Linux 5.12+).
const STATX_MNT_ID: u32 = 0x1000;
const STATX_MNT_ID_UNIQUE: u32 = 0x4000;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const OPEN_TREE_CLOEXEC: libc::c_uint = libc::O_CLOEXEC as libc::c_uint;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
/// `MS_PRIVATE`, as `struct mount_attr` takes it (a `__u64`).
const MS_PRIVATE: u64 = 1 << 18;

/// `struct mount_attr` (MOUNT_ATTR_SIZE_VER0).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Binds `source` (recursively) at `target`, which must exist and be of
/// the same kind, file or directory, and must not be a symlink (it is not
/// followed). Returns the mount made.
///
/// The bind is built detached (`open_tree(OPEN_TREE_CLONE)`), made private
/// (nothing mounted later below either side propagates to the other) and,
/// if asked, read-only on every mount of the tree (`mount_setattr`), and
/// only then attached (`move_mount`). So it is read-only from its first
/// moment, and every copy that mount propagation makes of it (the pod's
/// served view of the share) is a copy of a read-only mount: a bind
/// remounted read-only afterwards would leave its propagated copies
/// writable, and the guest reaches those through virtio-fs.
pub fn bind(source: &Path, target: &Path, readonly: bool) -> anyhow::Result<MadeMount> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let what = || format!("bind-mounting {} on {}", source.display(), target.display());
    let src = std::ffi::CString::new(source.as_os_str().as_bytes()).with_context(what)?;
    let dst = std::ffi::CString::new(target.as_os_str().as_bytes()).with_context(what)?;
    // SAFETY: `src` is a NUL-terminated path; the call returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("open_tree {}", source.display()))
            .with_context(what);
    }
    // SAFETY: `fd` was just returned by open_tree and is owned by no one
    // else; dropping it unmounts the tree if it was never attached.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    let attr = MountAttr {
        attr_set: if readonly { MOUNT_ATTR_RDONLY } else { 0 },
        attr_clr: 0,
        propagation: MS_PRIVATE,
        userns_fd: 0,
    };
    // SAFETY: the fd is a valid detached tree, the path is an empty C
    // string, and `attr` is a valid mount_attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("mount_setattr (private, read-only if asked)")
            .with_context(what);
    }
    // SAFETY: the fd is a valid detached tree and `dst` a NUL-terminated
    // path; without MOVE_MOUNT_T_SYMLINKS a symlink at `dst` is not
    // followed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("move_mount")
            .with_context(what);
    }
    drop(tree);
    let made = MadeMount::on_top_of(target);
    if made.is_err() {
        let _ = umount2(target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW);
    }
    made
}

/// Unmounts a mount this process made, after checking that the mount on
/// top of its target is still that one (by mount id; a symlink in the
/// last component is never followed). Gone already is fine; something
/// else there is an error and is left alone. A busy mount (the in-process
/// virtio-fs server still holds a file open) is detached lazily.
pub fn unmount(made: &MadeMount) -> anyhow::Result<()> {
    let target = &made.target;
    match mount_id(target) {
        Ok(id) if id == made.mnt_id => {}
        Ok(id) => {
            // Our mount is gone (only we unmount it, so this is a bug or
            // someone else's doing); what is there now is not ours.
            bail!(
                "not unmounting {}: mount {id} there is not the mount {} the shim made",
                target.display(),
                made.mnt_id
            );
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => {
            return Err(e).with_context(|| format!("checking the mount on {}", target.display()))
        }
    }
    match umount2(target, MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
        Err(Errno::EBUSY) => umount2(target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW)
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
/// deepest first.
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

fn read_mountinfo() -> anyhow::Result<String> {
    std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")
}

/// Most mounts stacked on one path that crash cleanup takes off.
const MAX_STACKED: usize = 64;

/// Detaches (lazily, with everything mounted below) every mount stacked
/// exactly at `point`, as mountinfo lists them. This is cleanup after a
/// crash, when the ids of the shim's mounts are lost: it never resolves a
/// path below `point` (whose contents may be the guest's to write), never
/// follows a symlink at `point`, and a lazy detach takes the submounts
/// along. Returns the failures.
pub fn detach_all_at(point: &Path) -> Vec<anyhow::Error> {
    let mut errors = Vec::new();
    for _ in 0..MAX_STACKED {
        let info = match read_mountinfo() {
            Ok(i) => i,
            Err(e) => return vec![e],
        };
        if !mount_points_under(&info, point).iter().any(|p| p == point) {
            return errors;
        }
        match umount2(point, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => {}
            Err(e) => {
                errors.push(
                    anyhow::Error::from(e).context(format!("unmounting {}", point.display())),
                );
                return errors;
            }
        }
    }
    errors.push(anyhow::anyhow!(
        "more than {MAX_STACKED} mounts stacked on {}; left the rest",
        point.display()
    ));
    errors
}

/// The mounts made for one purpose, undone in reverse order.
#[derive(Debug, Default)]
pub struct MountStack {
    made: Vec<MadeMount>,
}

impl MountStack {
    pub fn push(&mut self, made: MadeMount) {
        self.made.push(made);
    }

    pub fn is_empty(&self) -> bool {
        self.made.is_empty()
    }

    pub fn len(&self) -> usize {
        self.made.len()
    }

    /// Moves `other`'s mounts on top of this stack.
    pub fn append(&mut self, other: &mut MountStack) {
        self.made.append(&mut other.made);
    }

    /// Unmounts everything, last first. Keeps going after a failure and
    /// returns the failures.
    pub fn unmount_all(&mut self) -> Vec<anyhow::Error> {
        let mut errors = Vec::new();
        while let Some(m) = self.made.pop() {
            if let Err(e) = unmount(&m) {
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
    fn unmounting_what_is_gone_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let mut stack = MountStack::default();
        stack.push(MadeMount {
            target: dir.path().join("missing"),
            mnt_id: 1,
        });
        assert!(stack.unmount_all().is_empty());
        assert!(stack.is_empty());
    }

    fn is_mount_point(p: &Path) -> bool {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        mount_points_under(&info, p).iter().any(|m| m == p)
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
        let made = bind(&src, &dst, true).unwrap();
        assert_eq!(std::fs::read_to_string(dst.join("f")).unwrap(), "x");
        assert_eq!(
            std::fs::write(dst.join("g"), "y")
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EROFS),
            "read-only bind"
        );
        assert!(is_mount_point(&dst));
        unmount(&made).unwrap();
        assert!(!is_mount_point(&dst));
        assert!(!dst.join("f").exists());
        assert!(src.join("f").exists());
    }

    #[test]
    fn a_mount_that_is_not_ours_is_left_alone() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (src, dst, other) = (
            dir.path().join("src"),
            dir.path().join("dst"),
            dir.path().join("other"),
        );
        for d in [&src, &dst, &other] {
            std::fs::create_dir_all(d).unwrap();
        }
        let made = bind(&src, &dst, false).unwrap();
        // Someone swaps our mount for another one, then for a symlink.
        umount2(&dst, MntFlags::empty()).unwrap();
        let theirs = bind(&other, &dst, false).unwrap();
        let e = unmount(&made).unwrap_err();
        assert!(format!("{e:#}").contains("not the mount"), "{e:#}");
        assert!(is_mount_point(&dst));
        unmount(&theirs).unwrap();
        std::fs::remove_dir(&dst).unwrap();
        std::os::unix::fs::symlink(&other, &dst).unwrap();
        let other_mount = bind(&src, &other, false).unwrap();
        assert!(unmount(&made).is_err(), "a symlink is not our mount");
        assert!(is_mount_point(&other), "the symlink's target stays mounted");
        unmount(&other_mount).unwrap();
    }

    #[test]
    fn read_only_binds_propagate_read_only_into_the_view() {
        // The layout of a pod's share: binds made in the host-only tree
        // appear in the read-only view with their own flags.
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (tree, view, vol, rw) = (
            dir.path().join("tree"),
            dir.path().join("view"),
            dir.path().join("vol"),
            dir.path().join("rw"),
        );
        for d in [&tree, &view, &vol, &rw] {
            std::fs::create_dir_all(d).unwrap();
        }
        let tree_mount = make_own_shared_mount(&tree).unwrap();
        let view_mount = read_only_view(&tree, &view).unwrap();
        std::fs::create_dir_all(tree.join("ro")).unwrap();
        std::fs::create_dir_all(tree.join("rw")).unwrap();
        let ro_bind = bind(&vol, &tree.join("ro"), true).unwrap();
        let rw_bind = bind(&rw, &tree.join("rw"), false).unwrap();
        let erofs = |p: &Path| std::fs::write(p, "x").unwrap_err().raw_os_error();
        assert_eq!(
            erofs(&view.join("new")),
            Some(libc::EROFS),
            "the view is read-only"
        );
        assert_eq!(
            erofs(&view.join("ro/f")),
            Some(libc::EROFS),
            "ro volume, view side"
        );
        assert_eq!(
            erofs(&tree.join("ro/f")),
            Some(libc::EROFS),
            "ro volume, host side"
        );
        std::fs::write(view.join("rw/f"), "x").unwrap();
        assert_eq!(std::fs::read_to_string(rw.join("f")).unwrap(), "x");
        assert!(is_mount_point(&view.join("ro")));
        unmount(&ro_bind).unwrap();
        unmount(&rw_bind).unwrap();
        assert!(!is_mount_point(&view.join("ro")), "unmounts propagate");
        assert!(!is_mount_point(&view.join("rw")));
        unmount(&view_mount).unwrap();
        unmount(&tree_mount).unwrap();
    }
}
