//! From the OCI runtime spec to a [`ChildPlan`]: everything is validated
//! and allocated here, in the agent, before the process is cloned.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use libc::c_ulong;
use oci_spec::runtime::{
    Capability, LinuxDeviceType, LinuxNamespaceType, Mount as OciMount, PosixRlimitType, Process,
    Spec,
};

use super::child::{Caps, ChildPlan, DeviceNode, MountStep, RootfsPlan};
use super::mountopts;

/// Default PATH for the executable lookup when the spec's env has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where spec mount sources under the shared directory are expected (the
/// shim's view); rewritten to the agent's configured shared directory.
pub const CANONICAL_SHARED_DIR: &str = "/run/ember/shared";

pub fn cstring(s: impl AsRef<[u8]>) -> Result<CString, String> {
    CString::new(s.as_ref().to_vec()).map_err(|_| "string contains a NUL byte".to_string())
}

pub fn path_cstring(p: &Path) -> Result<CString, String> {
    cstring(p.as_os_str().as_bytes())
}

/// `root` + `dest` (absolute inside the container), rejecting `..`.
pub fn join_in_root(root: &Path, dest: &Path) -> Result<PathBuf, String> {
    let mut out = root.to_path_buf();
    for c in dest.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("path {} must not contain \"..\"", dest.display()))
            }
        }
    }
    Ok(out)
}

/// Directories between `root` (exclusive) and `path` (exclusive), top-down.
pub fn parents_between(root: &Path, path: &Path) -> Result<Vec<CString>, String> {
    let mut v = Vec::new();
    let mut p = path.parent();
    while let Some(d) = p {
        if d == root || !d.starts_with(root) {
            break;
        }
        v.push(path_cstring(d)?);
        p = d.parent();
    }
    v.reverse();
    Ok(v)
}

/// Rewrite a source under [`CANONICAL_SHARED_DIR`] to `shared_dir`.
pub fn rewrite_shared(source: &Path, shared_dir: &Path) -> PathBuf {
    match source.strip_prefix(CANONICAL_SHARED_DIR) {
        Ok(rest) if shared_dir != Path::new(CANONICAL_SHARED_DIR) => shared_dir.join(rest),
        _ => source.to_path_buf(),
    }
}

/// Capability number of an OCI capability.
pub fn cap_number(c: &Capability) -> Option<u32> {
    const NAMES: &[&str] = &[
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    let name = serde_json::to_value(c).ok()?;
    let name = name.as_str()?.strip_prefix("CAP_")?.to_string();
    NAMES.iter().position(|n| *n == name).map(|i| i as u32)
}

/// Highest capability number the kernel knows.
pub fn last_cap() -> u32 {
    static LAST: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *LAST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40)
    })
}

fn rlimit_resource(t: PosixRlimitType) -> libc::c_int {
    use PosixRlimitType::*;
    (match t {
        RlimitCpu => libc::RLIMIT_CPU,
        RlimitFsize => libc::RLIMIT_FSIZE,
        RlimitData => libc::RLIMIT_DATA,
        RlimitStack => libc::RLIMIT_STACK,
        RlimitCore => libc::RLIMIT_CORE,
        RlimitRss => libc::RLIMIT_RSS,
        RlimitNproc => libc::RLIMIT_NPROC,
        RlimitNofile => libc::RLIMIT_NOFILE,
        RlimitMemlock => libc::RLIMIT_MEMLOCK,
        RlimitAs => libc::RLIMIT_AS,
        RlimitLocks => libc::RLIMIT_LOCKS,
        RlimitSigpending => libc::RLIMIT_SIGPENDING,
        RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        RlimitNice => libc::RLIMIT_NICE,
        RlimitRtprio => libc::RLIMIT_RTPRIO,
        RlimitRttime => libc::RLIMIT_RTTIME,
    }) as libc::c_int
}

/// The clone flag of a namespace type.
pub fn ns_flag(t: LinuxNamespaceType) -> libc::c_int {
    match t {
        LinuxNamespaceType::Mount => libc::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => libc::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => libc::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => libc::CLONE_NEWIPC,
        LinuxNamespaceType::User => libc::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => libc::CLONE_NEWPID,
        LinuxNamespaceType::Network => libc::CLONE_NEWNET,
        LinuxNamespaceType::Time => libc::CLONE_NEWTIME,
    }
}

/// `/proc/<pid>/ns/<name>` name of a namespace type.
pub fn ns_name(t: LinuxNamespaceType) -> &'static str {
    match t {
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Time => "time",
    }
}

/// The process part of a plan: user, capabilities, rlimits, env, args,
/// executable candidates. Descriptors and namespaces are filled by the
/// caller.
pub fn process_plan(p: &Process) -> Result<ChildPlan, String> {
    let args = p.args().clone().unwrap_or_default();
    let Some(arg0) = args.first() else {
        return Err("process.args must not be empty".into());
    };
    if arg0.is_empty() {
        return Err("process.args[0] must not be empty".into());
    }
    let mut env: Vec<String> = p.env().clone().unwrap_or_default();
    let user = p.user();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(
            if user.uid() == 0 {
                "HOME=/root"
            } else {
                "HOME=/"
            }
            .to_string(),
        );
    }
    let path_var = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    let candidates: Vec<CString> = if arg0.contains('/') {
        vec![cstring(arg0)?]
    } else {
        path_var
            .split(':')
            .map(|d| {
                let d = if d.is_empty() { "." } else { d };
                cstring(format!("{d}/{arg0}"))
            })
            .collect::<Result<_, _>>()?
    };
    let cwd = p.cwd().as_os_str().as_bytes();
    let cwd = if cwd.is_empty() { b"/".as_slice() } else { cwd };

    let caps = match p.capabilities() {
        None => None,
        Some(c) => {
            let mask = |set: &Option<oci_spec::runtime::Capabilities>| -> u64 {
                set.iter()
                    .flatten()
                    .filter_map(cap_number)
                    .fold(0u64, |m, n| m | (1u64 << n))
            };
            let bounding = mask(c.bounding());
            let last = last_cap();
            Some(Caps {
                bounding_drop: (0..=last)
                    .filter(|n| bounding & (1u64 << n) == 0)
                    .map(|n| n as c_ulong)
                    .collect(),
                effective: mask(c.effective()),
                permitted: mask(c.permitted()),
                inheritable: mask(c.inheritable()),
                ambient: c
                    .ambient()
                    .iter()
                    .flatten()
                    .filter_map(cap_number)
                    .map(|n| n as c_ulong)
                    .collect(),
            })
        }
    };
    let rlimits = p
        .rlimits()
        .iter()
        .flatten()
        .map(|r| (rlimit_resource(r.typ()), r.soft(), r.hard()))
        .collect();
    let mut groups: Vec<libc::gid_t> = user.additional_gids().clone().unwrap_or_default();
    groups.dedup();

    let mut plan = ChildPlan {
        sigmask: 0,
        setns: Vec::new(),
        cgroup_procs: -1,
        root_fd: -1,
        new_cgroupns: false,
        oom_score_adj: p.oom_score_adj().map(|v| v.to_string().into_bytes()),
        stdio: [-1; 3],
        terminal: false,
        keep: Vec::new(),
        report: -1,
        start: -1,
        rootfs: None,
        hostname: None,
        rlimits,
        umask: user.umask(),
        uid: user.uid(),
        gid: user.gid(),
        groups,
        caps,
        no_new_privs: p.no_new_privileges().unwrap_or(false),
        seccomp: None,
        cwd: cstring(cwd)?,
        candidates,
        argv: args.iter().map(cstring).collect::<Result<_, _>>()?,
        envp: env.iter().map(cstring).collect::<Result<_, _>>()?,
        argv_ptrs: Vec::new(),
        envp_ptrs: Vec::new(),
    };
    plan.finish_pointers();
    Ok(plan)
}

/// How a `cgroup` mount is done.
pub enum CgroupMount<'a> {
    /// New cgroup namespace: mount cgroup2.
    Namespaced,
    /// No cgroup namespace: bind the container's cgroup directory.
    Bind(&'a Path),
    /// No cgroups (test mode without a cgroup root): skip.
    Skip,
}

/// The root file system plan of an init process.
pub fn rootfs_plan(
    spec: &Spec,
    root: &Path,
    shared_dir: &Path,
    cgroup: CgroupMount<'_>,
) -> Result<RootfsPlan, String> {
    let linux = spec.linux().clone().unwrap_or_default();
    let mut mounts = Vec::new();
    let mut setup_dev = false;
    for m in spec.mounts().iter().flatten() {
        if let Some(step) = mount_step(m, root, shared_dir, &cgroup, &mut setup_dev)? {
            mounts.push(step);
        }
    }
    let mut devices = Vec::new();
    let mut add_dev = |path: &str,
                       kind: u32,
                       major: u64,
                       minor: u64,
                       mode: u32,
                       uid: u32,
                       gid: u32|
     -> Result<(), String> {
        let full = join_in_root(root, Path::new(path))?;
        devices.push(DeviceNode {
            parents: parents_between(root, &full)?,
            path: path_cstring(&full)?,
            mode: kind | (mode & 0o7777),
            dev: libc::makedev(major as u32, minor as u32),
            uid,
            gid,
        });
        Ok(())
    };
    let mut symlinks = Vec::new();
    if setup_dev {
        for (name, minor) in [
            ("null", 3),
            ("zero", 5),
            ("full", 7),
            ("random", 8),
            ("urandom", 9),
        ] {
            add_dev(
                &format!("/dev/{name}"),
                libc::S_IFCHR,
                1,
                minor,
                0o666,
                0,
                0,
            )?;
        }
        add_dev("/dev/tty", libc::S_IFCHR, 5, 0, 0o666, 0, 0)?;
        for (target, link) in [
            ("/proc/self/fd", "/dev/fd"),
            ("/proc/self/fd/0", "/dev/stdin"),
            ("/proc/self/fd/1", "/dev/stdout"),
            ("/proc/self/fd/2", "/dev/stderr"),
            ("pts/ptmx", "/dev/ptmx"),
            ("/proc/kcore", "/dev/core"),
        ] {
            symlinks.push((
                cstring(target)?,
                path_cstring(&join_in_root(root, Path::new(link))?)?,
            ));
        }
    }
    for d in linux.devices().iter().flatten() {
        let kind = match d.typ() {
            LinuxDeviceType::C | LinuxDeviceType::U => libc::S_IFCHR,
            LinuxDeviceType::B => libc::S_IFBLK,
            LinuxDeviceType::P => libc::S_IFIFO,
            LinuxDeviceType::A => {
                return Err(format!(
                    "device {}: type \"a\" is not a device",
                    d.path().display()
                ))
            }
        };
        let path = d.path().to_str().ok_or("device path is not UTF-8")?;
        if !path.starts_with("/dev/") {
            return Err(format!("device path {path} is not under /dev"));
        }
        add_dev(
            path,
            kind,
            d.major().max(0) as u64,
            d.minor().max(0) as u64,
            d.file_mode().unwrap_or(0o666),
            d.uid().unwrap_or(0),
            d.gid().unwrap_or(0),
        )?;
    }
    let mut sysctls = Vec::new();
    if let Some(s) = linux.sysctl() {
        let mut keys: Vec<&String> = s.keys().collect();
        keys.sort();
        for k in keys {
            if k.contains('/') || k.split('.').any(|c| c.is_empty() || c == "..") {
                return Err(format!("invalid sysctl {k:?}"));
            }
            sysctls.push((
                cstring(format!("/proc/sys/{}", k.replace('.', "/")))?,
                s[k].clone().into_bytes(),
            ));
        }
    }
    let abs = |v: &Option<Vec<String>>| -> Result<Vec<CString>, String> {
        v.iter()
            .flatten()
            .map(|p| {
                if !p.starts_with('/') {
                    return Err(format!("path {p:?} must be absolute"));
                }
                cstring(p)
            })
            .collect()
    };
    let final_propagation = match linux.rootfs_propagation().as_deref() {
        None | Some("") => None,
        Some(p) => Some(
            mountopts::propagation(p).ok_or_else(|| format!("invalid rootfsPropagation {p:?}"))?,
        ),
    };
    Ok(RootfsPlan {
        root: path_cstring(root)?,
        root_propagation: libc::MS_SLAVE | libc::MS_REC,
        mounts,
        devices,
        symlinks,
        sysctls,
        masked: abs(linux.masked_paths())?,
        readonly_paths: abs(linux.readonly_paths())?,
        final_propagation,
        readonly: spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false),
    })
}

fn mount_step(
    m: &OciMount,
    root: &Path,
    shared_dir: &Path,
    cgroup: &CgroupMount<'_>,
    setup_dev: &mut bool,
) -> Result<Option<MountStep>, String> {
    let dest = m.destination();
    if !dest.is_absolute() {
        return Err(format!(
            "mount destination {} must be absolute",
            dest.display()
        ));
    }
    let target = join_in_root(root, dest)?;
    let typ = m.typ().clone().unwrap_or_default();
    let opts = mountopts::parse(m.options().as_deref().unwrap_or(&[]));
    let parents = parents_between(root, &target)?;
    let mut source = m.source().as_ref().map(|s| rewrite_shared(s, shared_dir));
    let mut fstype = Some(typ.clone());
    let mut bind = typ == "bind" || opts.bind;
    let mut flags = opts.flags;
    let mut data = opts.data.clone();
    if typ == "cgroup" || typ == "cgroup2" {
        match cgroup {
            CgroupMount::Namespaced => {
                fstype = Some("cgroup2".into());
                source = Some("cgroup2".into());
                data.clear();
            }
            CgroupMount::Bind(dir) => {
                bind = true;
                source = Some(dir.to_path_buf());
            }
            CgroupMount::Skip => {
                tracing::info!("no cgroups: mount of {} skipped", dest.display());
                return Ok(None);
            }
        }
    }
    let mut remount = None;
    if bind {
        fstype = None;
        remount = mountopts::bind_remount_flags(&opts);
        flags = libc::MS_BIND | if opts.recursive { libc::MS_REC } else { 0 };
        data.clear();
        if source.is_none() {
            return Err(format!("bind mount on {} has no source", dest.display()));
        }
    } else if dest == Path::new("/dev") {
        *setup_dev = true;
    }
    if source.is_none() {
        source = Some(PathBuf::from(&typ));
    }
    Ok(Some(MountStep {
        source: source.map(|s| path_cstring(&s)).transpose()?,
        target: path_cstring(&target)?,
        fstype: fstype.filter(|f| !f.is_empty()).map(cstring).transpose()?,
        flags,
        data: if data.is_empty() {
            None
        } else {
            Some(cstring(&data)?)
        },
        bind,
        remount,
        propagation: opts.propagation.clone(),
        parents,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let root = Path::new("/r");
        assert_eq!(
            join_in_root(root, Path::new("/a/b")).unwrap(),
            Path::new("/r/a/b")
        );
        assert!(join_in_root(root, Path::new("/a/../../etc")).is_err());
        let p = parents_between(root, Path::new("/r/a/b/c")).unwrap();
        assert_eq!(
            p,
            vec![cstring("/r/a").unwrap(), cstring("/r/a/b").unwrap()]
        );
        assert_eq!(
            rewrite_shared(
                Path::new("/run/ember/shared/c1/rootfs"),
                Path::new("/tmp/s")
            ),
            Path::new("/tmp/s/c1/rootfs")
        );
        assert_eq!(
            rewrite_shared(Path::new("/other"), Path::new("/tmp/s")),
            Path::new("/other")
        );
    }

    #[test]
    fn default_spec_plans() {
        let spec = Spec::default();
        let p = process_plan(spec.process().as_ref().unwrap()).unwrap();
        assert_eq!(p.argv[0].to_str().unwrap(), "sh");
        assert!(p
            .candidates
            .iter()
            .any(|c| c.to_str().unwrap() == "/bin/sh"));
        assert_eq!(p.argv_ptrs.len(), p.argv.len() + 1);
        let caps = p.caps.unwrap();
        assert_eq!(
            caps.effective & (1 << 0),
            0,
            "CAP_CHOWN not in the default set"
        );
        assert_ne!(caps.effective & (1 << 5), 0, "CAP_KILL");
        assert!(caps.bounding_drop.contains(&21), "CAP_SYS_ADMIN dropped");
        let r = rootfs_plan(&spec, Path::new("/r"), Path::new("/s"), CgroupMount::Skip).unwrap();
        assert!(r
            .mounts
            .iter()
            .any(|m| m.target.to_str().unwrap() == "/r/proc"));
        assert!(r
            .devices
            .iter()
            .any(|d| d.path.to_str().unwrap() == "/r/dev/null"));
        assert!(r
            .masked
            .iter()
            .any(|m| m.to_str().unwrap() == "/proc/kcore"));
    }
}
