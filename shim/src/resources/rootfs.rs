//! Putting a container's root file system and volumes into the pod's
//! virtio-fs share, and taking them out again.
//!
//! For `ctr run` (and CRI), containerd does not mount the image snapshot
//! itself: it passes the overlay mount in `CreateTaskRequest.rootfs`, and
//! the shim mounts it on `<bundle>/rootfs`, as runc's shim does. That
//! directory is then bound (recursively, with private propagation) at
//! `<mounts>/<container>/rootfs` in the pod's host-only tree; the bind
//! propagates into the read-only view served over virtio-fs, where the
//! guest sees it at `/run/ember/shared/<container>/rootfs`. Writes land in
//! the snapshot's upper directory, exactly as with runc.
//!
//! Every path this module creates, mounts on or unmounts lies in the
//! host-only tree, whose directories the guest cannot write (it sees them
//! read-only), or in the bundle; never below a mount point the guest can
//! write. Unmounting checks the mount id first (`mount::unmount`).
//! Nothing is ever removed recursively while something is still mounted
//! below it: a leftover bind mount would turn the removal into deleting the
//! user's data.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ember_proto::agent;

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

use super::mount::{self, MadeMount, MountRequest, MountStack};
use super::spec::{HostBind, SharePaths};

/// What the host did for one container.
#[derive(Debug, Default)]
pub struct PreparedContainer {
    /// Every host mount made for the container, in order.
    pub mounts: MountStack,
    /// `<mounts>/<container>` in the pod's host-only tree.
    pub container_dir: PathBuf,
}

/// The rootfs directory of a bundle: `root.path` of the spec (relative to
/// the bundle), `rootfs` when unset.
pub fn bundle_rootfs(bundle: &Path, spec_root_path: Option<&str>) -> PathBuf {
    match spec_root_path {
        Some(p) if !p.is_empty() => {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                bundle.join(p)
            }
        }
        _ => bundle.join("rootfs"),
    }
}

/// The rootfs mount the agent gets: a bind of the container's rootfs
/// directory inside the share.
pub fn guest_rootfs_mount(share: &SharePaths, container_id: &str) -> agent::Mount {
    let mut m = agent::Mount::new();
    m.fstype = "bind".into();
    m.source = format!("{}/rootfs", share.container_guest(container_id));
    m
}

/// Mounts containerd's rootfs mounts on the bundle rootfs, binds it and the
/// spec's host binds into the pod's host-only tree. Blocking (mount
/// syscalls). On error, everything done so far is undone.
pub fn prepare(
    container_id: &str,
    rootfs_dir: &Path,
    rootfs_mounts: &[MountRequest],
    share: &SharePaths,
    binds: &[HostBind],
) -> anyhow::Result<PreparedContainer> {
    if !crate::sandbox::paths::is_valid_id(container_id) {
        bail!("{container_id:?} is not a valid container id");
    }
    let container_dir = share.container_host(container_id);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&share.host)
        .with_context(|| format!("creating {}", share.host.display()))?;
    match std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&container_dir)
    {
        Ok(()) => {}
        // Not ours to clean up: refuse before touching anything.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
            "{} already exists: a container with this id is (or was) in this pod",
            container_dir.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("creating {}", container_dir.display())),
    }
    let mut prepared = PreparedContainer {
        mounts: MountStack::default(),
        container_dir,
    };
    match prepare_steps(&mut prepared, rootfs_dir, rootfs_mounts, binds) {
        Ok(()) => Ok(prepared),
        Err(e) => {
            for undo in cleanup(&mut prepared) {
                tracing::warn!("undoing a failed rootfs setup: {undo:#}");
            }
            Err(e)
        }
    }
}

fn prepare_steps(
    prepared: &mut PreparedContainer,
    rootfs_dir: &Path,
    rootfs_mounts: &[MountRequest],
    binds: &[HostBind],
) -> anyhow::Result<()> {
    if !rootfs_mounts.is_empty() {
        std::fs::create_dir_all(rootfs_dir)
            .with_context(|| format!("creating {}", rootfs_dir.display()))?;
        for m in rootfs_mounts {
            mount::mount_request(m, rootfs_dir)?;
            prepared.mounts.push(MadeMount::on_top_of(rootfs_dir)?);
        }
    } else if !rootfs_dir.is_dir() {
        bail!(
            "the container has no rootfs: no mounts from containerd and {} is not a directory",
            rootfs_dir.display()
        );
    }

    let shared_rootfs = prepared.container_dir.join("rootfs");
    create_dir(&shared_rootfs)?;
    prepared
        .mounts
        .push(mount::bind(rootfs_dir, &shared_rootfs, false)?);

    for b in binds {
        if !b.target.starts_with(&prepared.container_dir) {
            bail!(
                "bind target {} is outside {}",
                b.target.display(),
                prepared.container_dir.display()
            );
        }
        let meta = std::fs::metadata(&b.source)
            .with_context(|| format!("bind mount source {}", b.source.display()))?;
        if let Some(parent) = b.target.parent() {
            if !parent.exists() {
                create_dir(parent)?;
            }
        }
        if meta.is_dir() {
            create_dir(&b.target)?;
        } else {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&b.target)
                .with_context(|| format!("creating {}", b.target.display()))?;
        }
        prepared
            .mounts
            .push(mount::bind(&b.source, &b.target, b.readonly)?);
    }
    Ok(())
}

/// Creates one directory of the host-only tree (never an existing one:
/// each mount point is new).
fn create_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Unmounts everything of a container (last first) and removes its
/// directory in the share if nothing is mounted below it any more.
/// Blocking. Returns what failed.
pub fn cleanup(prepared: &mut PreparedContainer) -> Vec<anyhow::Error> {
    let mut errors = prepared.mounts.unmount_all();
    if !prepared.container_dir.as_os_str().is_empty() {
        if let Err(e) = remove_dir_if_unmounted(&prepared.container_dir) {
            errors.push(e);
        }
    }
    errors
}

/// Removes `dir` recursively, but only if nothing is mounted at or below
/// it. A missing directory is fine.
pub fn remove_dir_if_unmounted(dir: &Path) -> anyhow::Result<()> {
    if std::fs::symlink_metadata(dir).is_err() {
        return Ok(());
    }
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let still = mount::mount_points_under(&info, dir);
    if let Some(first) = still.first() {
        bail!(
            "not removing {}: {} is still mounted",
            dir.display(),
            first.display()
        );
    }
    // Never follows a symlink (std removes links, not their targets).
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootfs_dir_follows_the_spec() {
        let b = Path::new("/b");
        assert_eq!(bundle_rootfs(b, None), PathBuf::from("/b/rootfs"));
        assert_eq!(bundle_rootfs(b, Some("")), PathBuf::from("/b/rootfs"));
        assert_eq!(bundle_rootfs(b, Some("fs")), PathBuf::from("/b/fs"));
        assert_eq!(bundle_rootfs(b, Some("/abs")), PathBuf::from("/abs"));
    }

    #[test]
    fn the_guest_gets_a_bind_of_the_shared_rootfs() {
        let share = SharePaths::new("/run/ember/ns/pod/shared".into());
        let m = guest_rootfs_mount(&share, "c1");
        assert_eq!(m.fstype, "bind");
        assert_eq!(m.source, "/run/ember/shared/c1/rootfs");
        assert!(m.target.is_empty());
    }

    #[test]
    fn prepare_and_cleanup_round_trip() {
        // Needs CAP_SYS_ADMIN for the binds; skipped when not root.
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle");
        let rootfs = bundle.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        let vol = dir.path().join("vol");
        std::fs::create_dir_all(&vol).unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let share = SharePaths::new(dir.path().join("shared"));
        let binds = vec![
            HostBind {
                source: vol.clone(),
                target: share.container_host("c1").join("mounts/0"),
                readonly: false,
            },
            HostBind {
                source: hosts,
                target: share.container_host("c1").join("mounts/1"),
                readonly: true,
            },
        ];
        let mut p = prepare("c1", &rootfs, &[], &share, &binds).unwrap();
        assert_eq!(p.mounts.len(), 3);
        assert!(share.container_host("c1").join("rootfs/bin").is_dir());
        assert!(
            std::fs::read_to_string(share.container_host("c1").join("mounts/1"))
                .unwrap()
                .contains("localhost")
        );
        // A second container with the same id is refused.
        assert!(prepare("c1", &rootfs, &[], &share, &[]).is_err());
        assert!(cleanup(&mut p).is_empty());
        assert!(!share.container_host("c1").exists());
        assert!(rootfs.join("bin").is_dir(), "the source is untouched");

        // A missing bind source fails and undoes the rootfs bind.
        let bad = vec![HostBind {
            source: dir.path().join("missing"),
            target: share.container_host("c2").join("mounts/0"),
            readonly: false,
        }];
        let e = prepare("c2", &rootfs, &[], &share, &bad).unwrap_err();
        assert!(format!("{e:#}").contains("missing"), "{e:#}");
        assert!(!share.container_host("c2").exists());
    }

    #[test]
    fn removal_refuses_mounted_trees() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("precious"), "x").unwrap();
        std::fs::create_dir_all(tree.join("m")).unwrap();
        let made = mount::bind(&src, &tree.join("m"), false).unwrap();
        assert!(remove_dir_if_unmounted(&tree).is_err());
        assert!(src.join("precious").exists());
        mount::unmount(&made).unwrap();
        remove_dir_if_unmounted(&tree).unwrap();
        assert!(!tree.exists());
        assert!(src.join("precious").exists());
    }

    /// Everything below `dir` (not following symlinks): path, kind, and
    /// the contents of files.
    fn listing(dir: &Path) -> Vec<(PathBuf, String)> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let meta = std::fs::symlink_metadata(&p).unwrap();
                let what = if meta.is_dir() {
                    todo.push(p.clone());
                    "dir".to_string()
                } else if meta.file_type().is_symlink() {
                    format!("link {:?}", std::fs::read_link(&p).unwrap())
                } else {
                    format!("file {:?}", std::fs::read_to_string(&p).unwrap())
                };
                out.push((p, what));
            }
        }
        out.sort();
        out
    }

    fn mount_lines_under(dir: &Path) -> Vec<String> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mut v: Vec<String> = info
            .lines()
            .filter(|l| {
                l.split(' ')
                    .nth(4)
                    .is_some_and(|p| Path::new(p).starts_with(dir))
            })
            .map(String::from)
            .collect();
        v.sort();
        v
    }

    /// 200 rounds of container preparation and cleanup while a thread
    /// playing guest root races to redirect them at a host directory. The
    /// planter is a stand-in for the guest: it works by path on the
    /// served view `shared/`, as the in-process virtio-fs server does for
    /// the guest (lookups by name below the share's root), and tries what
    /// CVE-2020-2026-style attacks do: rename a container's `mounts/` away
    /// and leave symlinks to an outside tmpfs in place of `mounts`,
    /// `mounts/<n>`, `rootfs` and of the directories of containers yet to
    /// be created.
    #[test]
    fn a_racing_symlink_planter_cannot_redirect_host_mounts() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::{Arc, Mutex};

        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let paths =
            crate::sandbox::paths::SandboxPaths::new(&dir.path().join("state"), "ns", "pod");
        crate::sandbox::prepare_state_dir(&paths).unwrap();

        // The host's own data, outside the share: a tmpfs with a marker.
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        nix::mount::mount::<str, Path, str, str>(
            Some("tmpfs"),
            &outside,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None,
        )
        .unwrap();
        std::fs::write(outside.join("marker"), "precious").unwrap();
        std::fs::create_dir(outside.join("dir")).unwrap();
        let outside_before = listing(&outside);
        let outside_mounts_before = mount_lines_under(&outside);

        let rootfs = dir.path().join("bundle/rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        let vol = dir.path().join("vol");
        std::fs::create_dir_all(&vol).unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let share = SharePaths::new(paths.mounts.clone());
        let ids = ["c0", "c1", "c2"];

        let stop = Arc::new(AtomicBool::new(false));
        let landed = Arc::new(AtomicUsize::new(0));
        let tries = Arc::new(AtomicUsize::new(0));
        let errnos = Arc::new(Mutex::new(
            std::collections::BTreeMap::<String, usize>::new(),
        ));
        let planter = {
            let (view, outside) = (paths.shared.clone(), outside.clone());
            let (stop, landed, tries, errnos) =
                (stop.clone(), landed.clone(), tries.clone(), errnos.clone());
            std::thread::spawn(move || {
                use std::os::unix::fs::symlink;
                while !stop.load(Ordering::Relaxed) {
                    for id in ids {
                        let c = view.join(id);
                        let attempts: [std::io::Result<()>; 7] = [
                            std::fs::rename(c.join("mounts"), c.join("moved")),
                            symlink(&outside, c.join("mounts")),
                            symlink(outside.join("marker"), c.join("mounts/1")),
                            std::fs::remove_file(c.join("mounts/1")),
                            symlink(outside.join("dir"), c.join("rootfs")),
                            symlink(&outside, &c),
                            std::fs::File::create(c.join("mounts/planted")).map(drop),
                        ];
                        for a in attempts {
                            tries.fetch_add(1, Ordering::Relaxed);
                            match a {
                                Ok(()) => {
                                    landed.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) => {
                                    *errnos
                                        .lock()
                                        .unwrap()
                                        .entry(format!("{:?}", e.kind()))
                                        .or_default() += 1;
                                }
                            }
                        }
                    }
                }
            })
        };

        let mut prepared_ok = 0;
        for round in 0..200 {
            let id = ids[round % ids.len()];
            let binds = vec![
                HostBind {
                    source: vol.clone(),
                    target: share.container_host(id).join("mounts/0"),
                    readonly: false,
                },
                HostBind {
                    source: hosts.clone(),
                    target: share.container_host(id).join("mounts/1"),
                    readonly: true,
                },
            ];
            match prepare(id, &rootfs, &[], &share, &binds) {
                Ok(mut p) => {
                    // The guest's view has the container's mounts.
                    assert!(paths.shared.join(id).join("rootfs/bin").is_dir());
                    let errors = cleanup(&mut p);
                    assert!(errors.is_empty(), "round {round}: {errors:?}");
                    prepared_ok += 1;
                }
                Err(e) => panic!("round {round}: prepare failed: {e:#}"),
            }
            assert!(
                std::fs::symlink_metadata(share.container_host(id)).is_err(),
                "round {round}: {id} cleaned up"
            );
        }
        stop.store(true, Ordering::Relaxed);
        planter.join().unwrap();
        eprintln!(
            "planter: {} attempts, {} landed, errors {:?}",
            tries.load(Ordering::Relaxed),
            landed.load(Ordering::Relaxed),
            errnos.lock().unwrap()
        );

        assert_eq!(prepared_ok, 200);
        assert!(tries.load(Ordering::Relaxed) > 0, "the planter ran");
        assert_eq!(
            landed.load(Ordering::Relaxed),
            0,
            "the share's tree is read-only to the guest"
        );
        assert_eq!(
            listing(&outside),
            outside_before,
            "nothing outside created or changed"
        );
        assert_eq!(
            mount_lines_under(&outside),
            outside_mounts_before,
            "nothing outside (un)mounted"
        );
        assert_eq!(
            mount_lines_under(&paths.state_dir).len(),
            2,
            "only the share's own two mounts are left: {:?}",
            mount_lines_under(&paths.state_dir)
        );
        let errors = crate::sandbox::cleanup_state(&paths);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(mount_lines_under(&paths.state_dir).is_empty());
        assert!(!paths.state_dir.exists());
        nix::mount::umount2(&outside, nix::mount::MntFlags::empty()).unwrap();
    }
}
