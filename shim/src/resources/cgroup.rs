//! The pod's VM is charged to the pod on the host: the serving shim (the
//! VMM, every vCPU and device thread, guest RAM) joins one host cgroup per
//! pod, as Kata's `sandbox_cgroup_only`, so the pod's CPU and memory limits
//! hold on the host and kubelet reads real figures from the pod cgroup.
//!
//! Which cgroup ([`pod_cgroup`]):
//! - a CRI sandbox with `linux.cgroupsPath` (kubelet's pod cgroup parent
//!   plus the sandbox id, written by containerd): that path. The cgroupfs
//!   form (`/kubepods/burstable/pod<uid>/<id>`) is taken as is; the
//!   systemd form (`slice:prefix:name`) is expanded to the path systemd
//!   would use (`kubepods.slice/kubepods-burstable.slice/.../prefix-name.scope`),
//!   without registering a scope with systemd;
//! - anything else (`ctr run`, a CRI sandbox without a cgroup parent): a
//!   cgroup of its own, `<cgroup_parent>/<namespace>-<pod>` (config key
//!   `cgroup_parent`).
//!
//! Containers of the pod are not host cgroups: they live in the guest;
//! their `cgroupsPath` is ignored on the host.
//!
//! How ([`HostCgroup::join`]): cgroup v2 (unified) or v1. On v1 every
//! mounted hierarchy of cpu, cpuacct, cpuset, memory, pids, blkio, hugetlb
//! is joined; devices and freezer are left alone (the VMM needs `/dev/kvm`
//! and `/dev/net/tun`, and nothing here freezes a pod). A hybrid host is
//! treated as v1 (its v2 hierarchy has no controllers). The directory is
//! made component by component with `mkdirat`/`openat(O_NOFOLLOW)` from
//! the hierarchy's root; cpuset's `cpus` and `mems` are copied from the
//! parent where empty (v1 refuses tasks otherwise). Writing the shim's pid
//! to `cgroup.procs` moves every thread it has; threads made later (vCPUs,
//! device workers) inherit it.
//!
//! Cleanup: when the pod's VM is gone, the shim moves back to the cgroup it
//! came from and removes the pod's directory ([`HostCgroup::leave`]); if
//! the shim died instead, `<shim> delete` (run by containerd after the
//! shim exited) removes it ([`remove`], which waits a moment for the dead
//! shim's threads to leave: the kernel closes a killed process's socket
//! before its threads leave their cgroups). Only the pod's own directory is
//! removed, never a parent, and only when it is empty (rmdir fails
//! otherwise).

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::Value;

use crate::annotations;
use crate::sandbox::paths::dir_name;

/// v1 controllers whose hierarchies the pod's VM joins.
const V1_CONTROLLERS: &[&str] = &[
    "cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "hugetlb",
];
/// v2 controllers enabled for the children of a parent Ember made itself.
const V2_CONTROLLERS: &[&str] = &["cpu", "cpuset", "memory", "pids", "io", "hugetlb"];
/// A cgroup path deeper than this is refused.
const MAX_DEPTH: usize = 32;
const MAX_COMPONENT: usize = 255;

/// A checked cgroup path, relative to a hierarchy's root: non-empty
/// components, none `.` or `..`, no `/` or NUL inside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPath(Vec<String>);

impl CgroupPath {
    fn from_components(parts: Vec<String>, what: &str) -> anyhow::Result<Self> {
        if parts.is_empty() {
            bail!("{what} names the root cgroup, which a pod cannot own");
        }
        if parts.len() > MAX_DEPTH {
            bail!("{what} is deeper than {MAX_DEPTH} levels");
        }
        for p in &parts {
            if p == "." || p == ".." || p.contains('/') || p.contains('\0') {
                bail!("{what} has an invalid component {p:?}");
            }
            if p.len() > MAX_COMPONENT {
                bail!("{what} has a component longer than {MAX_COMPONENT} bytes");
            }
        }
        Ok(CgroupPath(parts))
    }

    /// An absolute cgroupfs-style path (`/a/b/c`).
    pub fn parse_absolute(path: &str, what: &str) -> anyhow::Result<Self> {
        if !path.starts_with('/') {
            bail!("{what} {path:?} is not an absolute cgroup path");
        }
        let parts = path
            .split('/')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        Self::from_components(parts, &format!("{what} {path:?}"))
    }

    /// An OCI `linux.cgroupsPath` as containerd writes it: cgroupfs
    /// (`/a/b`) or systemd (`slice:prefix:name`).
    pub fn parse_oci(path: &str) -> anyhow::Result<Self> {
        let what = format!("cgroupsPath {path:?}");
        if path.starts_with('/') {
            return Self::parse_absolute(path, "cgroupsPath");
        }
        let fields: Vec<&str> = path.split(':').collect();
        let [slice, prefix, name] = fields[..] else {
            bail!("{what} is neither an absolute path nor systemd's slice:prefix:name");
        };
        let mut parts = expand_slice(slice).with_context(|| what.clone())?;
        if name.is_empty() {
            bail!("{what} has an empty unit name");
        }
        parts.push(if name.ends_with(".slice") {
            name.to_string()
        } else if prefix.is_empty() {
            format!("{name}.scope")
        } else {
            format!("{prefix}-{name}.scope")
        });
        Self::from_components(parts, &what)
    }

    pub fn child(&self, name: &str) -> anyhow::Result<Self> {
        let mut parts = self.0.clone();
        parts.push(name.to_string());
        Self::from_components(parts, "cgroup path")
    }

    fn relative(&self) -> PathBuf {
        self.0.iter().collect()
    }
}

impl std::fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for p in &self.0 {
            write!(f, "/{p}")?;
        }
        Ok(())
    }
}

/// systemd's slice nesting: `a-b-c.slice` lives in `a.slice/a-b.slice/`;
/// `-.slice` (or empty) is the root.
fn expand_slice(slice: &str) -> anyhow::Result<Vec<String>> {
    if slice.is_empty() || slice == "-.slice" {
        return Ok(Vec::new());
    }
    let Some(stem) = slice.strip_suffix(".slice") else {
        bail!("systemd slice {slice:?} does not end in .slice");
    };
    if stem.is_empty() || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
        bail!("invalid systemd slice name {slice:?}");
    }
    let mut parts = Vec::new();
    let mut prefix = String::new();
    for word in stem.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(word);
        parts.push(format!("{prefix}.slice"));
    }
    Ok(parts)
}

/// The host cgroup of a pod whose first container has `spec` (the CRI
/// sandbox's spec, or the first `ctr run` of a group). See the module docs.
pub fn pod_cgroup(
    parent: &str,
    namespace: &str,
    pod_id: &str,
    spec: &Value,
) -> anyhow::Result<CgroupPath> {
    let ann = annotations::of_spec(spec);
    let sandbox = ann.get(annotations::CRI_CONTAINER_TYPE).map(String::as_str) == Some("sandbox");
    let oci = spec
        .pointer("/linux/cgroupsPath")
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty());
    match oci {
        Some(p) if sandbox => CgroupPath::parse_oci(p),
        _ => CgroupPath::parse_absolute(parent, "cgroup_parent")?.child(&format!(
            "{}-{}",
            dir_name(namespace),
            dir_name(pod_id)
        )),
    }
}

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hierarchy {
    mount: PathBuf,
    /// v1: the controllers bound to it (the set `/proc/self/cgroup`
    /// names it by); v2: empty.
    controllers: BTreeSet<String>,
    v2: bool,
}

/// The hierarchies a pod joins, from `/proc/self/mountinfo` text.
fn hierarchies(mountinfo: &str) -> anyhow::Result<Vec<Hierarchy>> {
    let mut v1: Vec<Hierarchy> = Vec::new();
    let mut v2: Vec<Hierarchy> = Vec::new();
    for line in mountinfo.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source super-options
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        let (root, mount) = (l[3], unescape_mountinfo(l[4]));
        if root != "/" {
            // A bind of a sub-cgroup (or a cgroup namespace's view):
            // absolute cgroup paths do not resolve there.
            continue;
        }
        match r[0] {
            "cgroup2" => v2.push(Hierarchy {
                mount: PathBuf::from(mount),
                controllers: BTreeSet::new(),
                v2: true,
            }),
            "cgroup" => {
                let controllers: BTreeSet<String> = r[2]
                    .split(',')
                    .filter(|o| V1_CONTROLLERS.contains(o))
                    .map(str::to_string)
                    .collect();
                // The same hierarchy may be mounted twice.
                if !controllers.is_empty() && !v1.iter().any(|h| h.controllers == controllers) {
                    v1.push(Hierarchy {
                        mount: PathBuf::from(mount),
                        controllers,
                        v2: false,
                    });
                }
            }
            _ => {}
        }
    }
    if !v1.is_empty() {
        return Ok(v1);
    }
    // Prefer the usual mount point if the hierarchy is mounted twice.
    v2.sort_by_key(|h| h.mount != Path::new("/sys/fs/cgroup"));
    v2.truncate(1);
    if v2.is_empty() {
        bail!("no cgroup hierarchy is mounted (read /proc/self/mountinfo)");
    }
    Ok(v2)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup of `h` a process is in, from `/proc/<pid>/cgroup` text.
fn current_cgroup(proc_cgroup: &str, h: &Hierarchy) -> Option<PathBuf> {
    proc_cgroup.lines().find_map(|line| {
        let mut f = line.splitn(3, ':');
        let (_, names, path) = (f.next()?, f.next()?, f.next()?);
        let matches = if h.v2 {
            names.is_empty()
        } else {
            names
                .split(',')
                .filter(|n| V1_CONTROLLERS.contains(n))
                .map(str::to_string)
                .collect::<BTreeSet<_>>()
                == h.controllers
        };
        matches.then(|| PathBuf::from(path.trim_start_matches('/')))
    })
}

fn read_proc(path: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {path}"))
}

fn detect() -> anyhow::Result<Vec<Hierarchy>> {
    hierarchies(&read_proc("/proc/self/mountinfo")?)
}

fn cstr(s: &str) -> anyhow::Result<CString> {
    CString::new(s).map_err(|_| anyhow!("{s:?} contains NUL"))
}

fn open_dir_at(dir: Option<&OwnedFd>, name: &str) -> std::io::Result<OwnedFd> {
    let c = CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let at = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: `c` is a NUL-terminated string alive for the call; `at` is an
    // open descriptor (or AT_FDCWD); the returned fd is checked.
    let fd = unsafe {
        libc::openat(
            at,
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates `rel` under the hierarchy's root, one component at a time,
/// never following a symlink. Returns the directories it created (parents
/// first).
fn make_dirs(h: &Hierarchy, rel: &CgroupPath) -> anyhow::Result<Vec<PathBuf>> {
    let root = h.mount.to_string_lossy();
    let mut dir = open_dir_at(None, &root).with_context(|| format!("opening {root}"))?;
    let mut path = h.mount.clone();
    let mut created = Vec::new();
    for name in &rel.0 {
        path.push(name);
        let c = cstr(name)?;
        // SAFETY: `dir` is an open directory and `c` a NUL-terminated name.
        let r = unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755) };
        if r == 0 {
            created.push(path.clone());
        } else {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(e).with_context(|| format!("creating cgroup {}", path.display()));
            }
        }
        let next = open_dir_at(Some(&dir), name)
            .with_context(|| format!("opening cgroup {} (no symlinks)", path.display()))?;
        if h.controllers.contains("cpuset") {
            inherit_cpuset(&dir, &next).with_context(|| format!("cpuset of {}", path.display()))?;
        }
        dir = next;
    }
    Ok(created)
}

fn read_at(dir: &OwnedFd, name: &str) -> std::io::Result<String> {
    std::fs::read_to_string(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()))
}

fn write_at(dir: &OwnedFd, name: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()), value)
}

/// v1 cpuset: a new cgroup starts with no CPUs and no memory nodes and
/// takes no task until they are set; copy the parent's.
fn inherit_cpuset(parent: &OwnedFd, child: &OwnedFd) -> anyhow::Result<()> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        if read_at(child, file)?.trim().is_empty() {
            let v = read_at(parent, file)?;
            write_at(child, file, v.trim()).with_context(|| format!("writing {file}"))?;
        }
    }
    Ok(())
}

/// v2: let the children of a parent Ember made use the controllers it
/// has (best effort: accounting of cpu.stat works without).
fn enable_v2_controllers(dir: &Path) {
    let Ok(avail) = std::fs::read_to_string(dir.join("cgroup.controllers")) else {
        return;
    };
    let want: Vec<String> = avail
        .split_whitespace()
        .filter(|c| V2_CONTROLLERS.contains(c))
        .map(|c| format!("+{c}"))
        .collect();
    if want.is_empty() {
        return;
    }
    if let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), want.join(" ")) {
        tracing::debug!(dir = %dir.display(), "enabling controllers {want:?}: {e}");
    }
}

fn move_pid(dir: &Path, pid: u32) -> anyhow::Result<()> {
    std::fs::write(dir.join("cgroup.procs"), pid.to_string())
        .with_context(|| format!("moving pid {pid} into {}", dir.display()))
}

/// Removes `dir` now (no waiting for tasks to leave).
fn remove_dir(dir: &Path) -> anyhow::Result<()> {
    remove_when_empty(dir, Instant::now())
}

/// What a pod's VM uses on the host ([`HostCgroup::usage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_usec: u64,
    pub memory_bytes: u64,
    pub pids: u64,
}

/// One hierarchy the shim joined.
#[derive(Debug)]
struct Joined {
    dir: PathBuf,
    /// Where the shim was before (to go back at [`HostCgroup::leave`]).
    origin: Option<PathBuf>,
}

/// The pod's host cgroup, joined by this (serving shim) process.
#[derive(Debug)]
pub struct HostCgroup {
    path: CgroupPath,
    joined: Vec<Joined>,
}

impl HostCgroup {
    /// Creates `path` in every hierarchy and moves this process (all its
    /// threads) into it. On error, what was joined is left again.
    pub fn join(path: &CgroupPath) -> anyhow::Result<HostCgroup> {
        let pid = std::process::id();
        let own = read_proc("/proc/self/cgroup")?;
        let mut cg = HostCgroup {
            path: path.clone(),
            joined: Vec::new(),
        };
        for h in detect()? {
            let dir = h.mount.join(path.relative());
            let r = (|| {
                let created = make_dirs(&h, path)?;
                if h.v2 {
                    // Directories Ember made above the pod's own (never a
                    // parent someone else owns): their children may use
                    // the controllers.
                    for d in created.iter().filter(|d| **d != dir) {
                        enable_v2_controllers(d);
                    }
                }
                move_pid(&dir, pid)
            })();
            let origin = current_cgroup(&own, &h).map(|o| h.mount.join(o));
            match r {
                Ok(()) => cg.joined.push(Joined { dir, origin }),
                Err(e) => {
                    for err in cg.leave() {
                        tracing::warn!("undoing a partial cgroup join: {err:#}");
                    }
                    return Err(e.context(format!("placing the pod's VM in cgroup {path}")));
                }
            }
        }
        tracing::info!(cgroup = %path, hierarchies = ?cg.joined.iter().map(|j| j.dir.display().to_string()).collect::<Vec<_>>(), "the shim joined the pod's host cgroup");
        Ok(cg)
    }

    pub fn path(&self) -> &CgroupPath {
        &self.path
    }

    /// What the pod's VM uses on the host, read from the directories
    /// joined (cgroup v2 or v1 file names); a figure no hierarchy has is 0.
    pub fn usage(&self) -> Usage {
        let read = |name: &str| {
            self.joined
                .iter()
                .find_map(|j| std::fs::read_to_string(j.dir.join(name)).ok())
        };
        let number = |text: Option<String>| text.and_then(|t| t.trim().parse::<u64>().ok());
        let cpu_usec = read("cpu.stat")
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())
            })
            .or_else(|| number(read("cpuacct.usage")).map(|ns| ns / 1000))
            .unwrap_or(0);
        Usage {
            cpu_usec,
            memory_bytes: number(read("memory.current"))
                .or_else(|| number(read("memory.usage_in_bytes")))
                .unwrap_or(0),
            pids: number(read("pids.current")).unwrap_or(0),
        }
    }

    /// Moves this process back where it came from and removes the pod's
    /// directory (it must hold nothing else by now).
    pub fn leave(&mut self) -> Vec<anyhow::Error> {
        let pid = std::process::id();
        let mut errors = Vec::new();
        for j in self.joined.drain(..) {
            if let Some(origin) = &j.origin {
                if let Err(e) = move_pid(origin, pid) {
                    errors.push(e);
                    continue;
                }
            }
            if let Err(e) = remove_dir(&j.dir) {
                errors.push(e);
            }
        }
        errors
    }
}

/// How long [`remove`] waits for the dead shim's threads to leave the
/// pod's cgroup. containerd gives `<shim> delete` 5 s in all (its
/// `io.containerd.timeout.shim.cleanup`).
pub const REMOVE_WAIT: Duration = Duration::from_secs(3);

/// Removes the pod's directory in every hierarchy, if it is there: cleanup
/// by `<shim> delete` after the serving shim died.
///
/// containerd runs `delete` as soon as the shim's socket closes, and a
/// killed process closes its files before its threads leave their cgroups
/// (`exit_files` comes before `cgroup_exit` in the kernel's `do_exit`), so
/// the directory can still be busy for a moment: `rmdir` is tried again
/// until `wait` has passed. A cgroup that stays busy (a live process in
/// it) is an error naming its tasks, and is left alone.
pub fn remove(path: &CgroupPath, wait: Duration) -> Vec<anyhow::Error> {
    let hs = match detect() {
        Ok(hs) => hs,
        Err(e) => return vec![e],
    };
    let deadline = Instant::now() + wait;
    hs.iter()
        .filter_map(|h| remove_when_empty(&h.mount.join(path.relative()), deadline).err())
        .collect()
}

fn remove_when_empty(dir: &Path, deadline: Instant) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => {
                if started.elapsed() > Duration::from_millis(1) {
                    tracing::debug!(
                        dir = %dir.display(),
                        waited_ms = started.elapsed().as_millis() as u64,
                        "cgroup removed once its last task had left"
                    );
                }
                return Ok(());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                let tasks = std::fs::read_to_string(dir.join("cgroup.procs"))
                    .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
                    .unwrap_or_default();
                return Err(e).with_context(|| {
                    format!(
                        "removing cgroup {} (after {} ms; processes in it: [{tasks}])",
                        dir.display(),
                        started.elapsed().as_millis()
                    )
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cgroupfs_paths_are_checked() {
        let p = CgroupPath::parse_oci("/kubepods/burstable/pod1/abc").unwrap();
        assert_eq!(p.to_string(), "/kubepods/burstable/pod1/abc");
        assert_eq!(
            CgroupPath::parse_oci("//a///b/").unwrap().to_string(),
            "/a/b"
        );
        for bad in ["/a/../b", "/a/./b", "/", "", "a/b", "/a\0b"] {
            assert!(CgroupPath::parse_oci(bad).is_err(), "{bad:?} accepted");
        }
        let deep = "/x".repeat(MAX_DEPTH + 1);
        assert!(CgroupPath::parse_oci(&deep).is_err());
    }

    #[test]
    fn systemd_paths_expand_like_systemd() {
        let p = CgroupPath::parse_oci("kubepods-burstable-pod12.slice:cri-containerd:abc").unwrap();
        assert_eq!(
            p.to_string(),
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice/cri-containerd-abc.scope"
        );
        assert_eq!(
            CgroupPath::parse_oci("system.slice::x")
                .unwrap()
                .to_string(),
            "/system.slice/x.scope"
        );
        assert_eq!(
            CgroupPath::parse_oci("-.slice:p:x").unwrap().to_string(),
            "/p-x.scope"
        );
        for bad in [
            "kubepods:cri:x",
            "a--b.slice:p:x",
            "a.slice:p:",
            "a.slice:p/q:x",
            "a.slice:x",
            "a.slice:p:x/y",
        ] {
            assert!(CgroupPath::parse_oci(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn cri_sandboxes_use_their_cgroups_path_everything_else_the_parent() {
        let sandbox = json!({
            "annotations": {"io.kubernetes.cri.container-type": "sandbox"},
            "linux": {"cgroupsPath": "/kubepods/pod1/sb1"}
        });
        assert_eq!(
            pod_cgroup("/ember", "k8s.io", "sb1", &sandbox)
                .unwrap()
                .to_string(),
            "/kubepods/pod1/sb1"
        );
        // ctr run writes /<namespace>/<id>: not a pod cgroup.
        let ctr = json!({"linux": {"cgroupsPath": "/default/c1"}});
        assert_eq!(
            pod_cgroup("/ember", "default", "c1", &ctr)
                .unwrap()
                .to_string(),
            "/ember/default-c1"
        );
        // A CRI sandbox without a cgroup parent, and a free-text group.
        let bare = json!({"annotations": {"io.kubernetes.cri.container-type": "sandbox"}});
        assert_eq!(
            pod_cgroup("/x/y", "k8s.io", "sb", &bare)
                .unwrap()
                .to_string(),
            "/x/y/k8s.io-sb"
        );
        let p = pod_cgroup("/ember", "default", "../../etc", &Value::Null).unwrap();
        assert!(p.to_string().starts_with("/ember/default-_"), "{p}");
        let evil = json!({
            "annotations": {"io.kubernetes.cri.container-type": "sandbox"},
            "linux": {"cgroupsPath": "/kubepods/../../x"}
        });
        assert!(pod_cgroup("/ember", "k8s.io", "sb", &evil).is_err());
    }

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset,clone_children
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:32 /sub /mnt/memsub rw,relatime - cgroup cgroup rw,memory
51 23 0:32 / /mnt/mem\\040again rw,relatime - cgroup cgroup rw,memory
";

    #[test]
    fn v1_hierarchies_are_found_once_each_without_devices_or_systemd() {
        let hs = hierarchies(HYBRID).unwrap();
        let mounts: Vec<_> = hs.iter().map(|h| h.mount.display().to_string()).collect();
        assert_eq!(
            mounts,
            [
                "/sys/fs/cgroup/cpu,cpuacct",
                "/sys/fs/cgroup/cpuset",
                "/sys/fs/cgroup/memory"
            ]
        );
        assert!(hs.iter().all(|h| !h.v2));
        let own = "12:cpu,cpuacct:/a\n3:cpuset:/\n4:memory:/m/n\n0::/u\n";
        assert_eq!(current_cgroup(own, &hs[0]), Some(PathBuf::from("a")));
        assert_eq!(current_cgroup(own, &hs[2]), Some(PathBuf::from("m/n")));
    }

    #[test]
    fn a_unified_host_is_v2() {
        let info = "\
25 18 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
60 18 0:22 / /mnt/cg rw - cgroup2 cgroup2 rw
";
        let hs = hierarchies(info).unwrap();
        assert_eq!(hs.len(), 1);
        assert!(hs[0].v2);
        assert_eq!(hs[0].mount, PathBuf::from("/sys/fs/cgroup"));
        assert_eq!(
            current_cgroup("0::/system.slice/containerd.service\n", &hs[0]),
            Some(PathBuf::from("system.slice/containerd.service"))
        );
        assert!(hierarchies("").is_err());
    }

    #[test]
    fn dirs_are_made_beneath_the_root_without_following_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let h = Hierarchy {
            mount: root.path().to_path_buf(),
            controllers: BTreeSet::new(),
            v2: true,
        };
        let p = CgroupPath::parse_absolute("/ember/default-pod", "test").unwrap();
        let made = make_dirs(&h, &p).unwrap();
        assert_eq!(
            made,
            [
                root.path().join("ember"),
                root.path().join("ember/default-pod")
            ]
        );
        // Existing directories are fine (mkdir -p).
        assert!(make_dirs(&h, &p).unwrap().is_empty());
        std::os::unix::fs::symlink(outside.path(), root.path().join("link")).unwrap();
        let through = CgroupPath::parse_absolute("/link/pod", "test").unwrap();
        let err = make_dirs(&h, &through).unwrap_err();
        assert!(format!("{err:#}").contains("no symlinks"), "{err:#}");
        assert!(!outside.path().join("pod").exists());
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape_mountinfo("/plain\\04"), "/plain\\04");
    }

    /// A cgroup of its own in every hierarchy holding `child`.
    fn cgroup_holding(name: &str, child: u32) -> CgroupPath {
        let path = CgroupPath::parse_absolute(
            &format!("/ember-unit-{name}-{}", std::process::id()),
            "test",
        )
        .unwrap();
        for h in detect().unwrap() {
            make_dirs(&h, &path).unwrap();
            move_pid(&h.mount.join(path.relative()), child).unwrap();
        }
        path
    }

    /// A process that holds 64 MiB it has touched, so that its exit
    /// (unmapping that memory) is not instantaneous.
    fn busy_child() -> std::process::Child {
        std::process::Command::new("dd")
            .args(["if=/dev/zero", "of=/dev/null", "bs=64M", "count=100000000"])
            .spawn()
            .unwrap()
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn the_cgroup_of_a_process_killed_a_moment_ago_is_removed() {
        if !is_root() {
            return eprintln!("skipped: cgroups need root");
        }
        // What containerd does: SIGKILL (or a crash), then `<shim> delete`
        // at once. Each round is a fresh race with the child's exit.
        for round in 0..5 {
            let mut child = busy_child();
            std::thread::sleep(Duration::from_millis(200));
            let path = cgroup_holding(&format!("killed{round}"), child.id());
            child.kill().unwrap();
            let errors = remove(&path, REMOVE_WAIT);
            let _ = child.wait();
            if !errors.is_empty() {
                remove(&path, REMOVE_WAIT);
                panic!("round {round}: {errors:?}");
            }
            for h in detect().unwrap() {
                assert!(!h.mount.join(path.relative()).exists());
            }
        }
    }

    #[test]
    fn a_cgroup_with_a_live_process_is_left_with_an_error_naming_it() {
        if !is_root() {
            return eprintln!("skipped: cgroups need root");
        }
        let mut child = busy_child();
        let path = cgroup_holding("live", child.id());
        let errors = remove(&path, Duration::from_millis(100));
        let pid = child.id().to_string();
        let exists: Vec<bool> = detect()
            .unwrap()
            .iter()
            .map(|h| h.mount.join(path.relative()).exists())
            .collect();
        child.kill().unwrap();
        let _ = child.wait();
        let cleaned = remove(&path, REMOVE_WAIT);
        assert!(!errors.is_empty());
        for e in &errors {
            let text = format!("{e:#}");
            assert!(text.contains(&pid), "{text}");
        }
        assert!(exists.iter().all(|e| *e), "a busy cgroup was removed");
        assert!(cleaned.is_empty(), "{cleaned:?}");
    }
}
