//! Rewriting a container's OCI spec from host terms into guest terms.
//!
//! The spec containerd wrote names host paths and host namespaces. Inside
//! the VM:
//! - bind mounts of host paths (volumes, `/etc/hosts`, ...) are bound on
//!   the host into the pod's virtio-fs share, at
//!   `<share>/<container>/mounts/<n>`, and the spec's source becomes the
//!   same path as the guest sees it (`/run/ember/shared/<container>/mounts/<n>`);
//!   other mounts (proc, tmpfs, devpts, ...) are the guest's own and stay;
//! - namespaces joined by path are rewritten to the pod's sandbox container
//!   in the guest (`/proc/<guest pid>/ns/<type>`), except the network
//!   namespace: a path there names a host netns, so the entry is removed
//!   and the container shares the guest's root network namespace (the VM
//!   is the pod's network boundary). So does a container whose
//!   `createRuntime`/`prestart` hooks set its network up (nerdctl): what
//!   they configure on the host becomes the VM's interfaces, in the guest's
//!   root namespace, so its new-namespace entry is removed too;
//! - `linux.cgroupsPath` is removed (the agent places containers in its own
//!   cgroup tree; a host path such as a systemd slice means nothing there).
//!   On the host the whole VM is one unit in the pod's cgroup, taken from
//!   the sandbox's spec by [`crate::resources::cgroup`];
//! - `hooks` are removed: they name host binaries, which do not exist in
//!   the guest; the shim runs them on the host ([`crate::resources::hooks`]).
//!
//! The spec is handled as JSON, not as a typed struct, so that every field
//! this code does not touch reaches the agent exactly as containerd wrote
//! it.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// Where the guest mounts the pod's virtio-fs share.
pub const GUEST_SHARED_DIR: &str = "/run/ember/shared";

/// The pod's share, as the host and the guest see it.
#[derive(Debug, Clone)]
pub struct SharePaths {
    /// The host-only tree where the shim makes the containers' mount
    /// points (`<state>/<ns>/<pod>/mounts`). The guest sees it through a
    /// read-only view (`shared/`) and can write none of its directories,
    /// so paths below it (up to a mount point) are the shim's alone.
    pub host: PathBuf,
    pub guest: String,
}

/// Checks a container id (or a namespace) against containerd's rules
/// before it becomes part of any host path.
pub fn check_id(what: &str, id: &str) -> Result<()> {
    if crate::sandbox::paths::is_valid_id(id) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{what} {id:?} is not a valid identifier: letters and digits, single `.`, `_` or `-` between them, at most {} characters",
            crate::sandbox::paths::MAX_ID_LEN
        )))
    }
}

impl SharePaths {
    pub fn new(host: PathBuf) -> Self {
        SharePaths {
            host,
            guest: GUEST_SHARED_DIR.to_string(),
        }
    }

    /// A container's directory in the host-only tree. `container_id` must
    /// have passed [`check_id`].
    pub fn container_host(&self, container_id: &str) -> PathBuf {
        debug_assert!(crate::sandbox::paths::is_valid_id(container_id));
        self.host.join(container_id)
    }

    /// The same directory in the guest.
    pub fn container_guest(&self, container_id: &str) -> String {
        format!("{}/{container_id}", self.guest)
    }
}

/// A host path to bind into the share before the container is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    pub source: PathBuf,
    /// Under the share; created as a file or directory like `source`.
    pub target: PathBuf,
    pub readonly: bool,
}

#[derive(Debug)]
pub struct GuestSpec {
    pub spec: Value,
    /// In the order of the spec's mounts.
    pub binds: Vec<HostBind>,
}

fn is_bind(mount: &Value) -> bool {
    let typ = mount.get("type").and_then(Value::as_str).unwrap_or("");
    typ == "bind" || options(mount).iter().any(|o| *o == "bind" || *o == "rbind")
}

fn options(mount: &Value) -> Vec<&str> {
    mount
        .get("options")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The guest's init (the agent): whose IPC and UTS namespaces containers
/// join when the VM itself is the sandbox (containerd's Sandbox API).
pub const GUEST_INIT_PID: u32 = 1;

/// The file under /proc/<pid>/ns/ of an OCI namespace type.
fn ns_file(typ: &str) -> Option<&'static str> {
    Some(match typ {
        "pid" => "pid",
        "network" => "net",
        "mount" => "mnt",
        "ipc" => "ipc",
        "uts" => "uts",
        "user" => "user",
        "cgroup" => "cgroup",
        "time" => "time",
        _ => return None,
    })
}

/// Whether `path` is `/proc/<number>/ns/<name>`: what containerd builds
/// from a task pid, and task pids this shim reports are guest pids.
fn is_proc_ns_path(path: &str) -> bool {
    let mut parts = path.split('/');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(""), Some("proc"), Some(pid), Some("ns"), Some(name), None)
            if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) && !name.is_empty()
    )
}

/// Rewrites `spec` for the guest. `bundle` resolves relative bind
/// sources; `sandbox_pid` is the guest pid of the pod's sandbox container
/// when this container joins it (CRI), else `None`.
pub fn rewrite(
    spec: &Value,
    container_id: &str,
    bundle: &Path,
    share: &SharePaths,
    sandbox_pid: Option<u32>,
) -> Result<GuestSpec> {
    check_id("container id", container_id)?;
    let mut spec = spec.clone();
    let obj = spec
        .as_object_mut()
        .ok_or_else(|| Error::invalid("the OCI spec is not a JSON object"))?;
    let mut binds = Vec::new();

    if let Some(mounts) = obj.get_mut("mounts").and_then(Value::as_array_mut) {
        for mount in mounts.iter_mut() {
            if !is_bind(mount) {
                continue;
            }
            let source = mount.get("source").and_then(Value::as_str).ok_or_else(|| {
                Error::invalid(format!(
                    "bind mount to {} has no source",
                    mount
                        .get("destination")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                ))
            })?;
            let source = if Path::new(source).is_absolute() {
                PathBuf::from(source)
            } else {
                bundle.join(source)
            };
            let n = binds.len();
            let readonly = options(mount).contains(&"ro");
            binds.push(HostBind {
                source,
                target: share
                    .container_host(container_id)
                    .join("mounts")
                    .join(n.to_string()),
                readonly,
            });
            mount["source"] = Value::String(format!(
                "{}/mounts/{n}",
                share.container_guest(container_id)
            ));
        }
    }

    let network_from_hooks = ["createRuntime", "prestart"].iter().any(|k| {
        obj.get("hooks")
            .and_then(|h| h.get(*k))
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
    });
    obj.remove("hooks");
    if let Some(linux) = obj.get_mut("linux").and_then(Value::as_object_mut) {
        if let Some(path) = linux.remove("cgroupsPath") {
            tracing::debug!(container = %container_id, cgroups_path = %path, "cgroupsPath not used in the guest; the pod's VM is one host cgroup");
        }
        if let Some(namespaces) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
            let mut kept = Vec::with_capacity(namespaces.len());
            for mut ns in namespaces.drain(..) {
                let typ = ns
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let path = ns
                    .get("path")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                if typ == "network" && (network_from_hooks || !path.is_empty()) {
                    continue;
                }
                if path.is_empty() {
                    kept.push(ns);
                    continue;
                }
                let file = ns_file(&typ).ok_or_else(|| {
                    Error::invalid(format!("unknown namespace type {typ:?} with path {path}"))
                })?;
                if sandbox_pid == Some(GUEST_INIT_PID) && typ == "pid" {
                    // The guest's init is the agent: a pod sharing its
                    // process namespace gets one of its own, not the agent's.
                    tracing::info!(container = %container_id, "pid namespace: the container's own (the VM is the sandbox; its init is the agent)");
                    if let Some(o) = ns.as_object_mut() {
                        o.remove("path");
                    }
                    kept.push(ns);
                    continue;
                }
                let guest_path = match sandbox_pid {
                    Some(pid) => format!("/proc/{pid}/ns/{file}"),
                    None if is_proc_ns_path(&path) => path,
                    None => {
                        return Err(Error::invalid(format!(
                            "{typ} namespace path {path} names a host namespace, which a container in a VM cannot join"
                        )))
                    }
                };
                ns["path"] = Value::String(guest_path);
                kept.push(ns);
            }
            *namespaces = kept;
        }
    }
    Ok(GuestSpec { spec, binds })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn share() -> SharePaths {
        SharePaths::new("/run/ember/default/pod/mounts".into())
    }

    fn spec() -> Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/"},
            "root": {"path": "rootfs"},
            "hooks": {"prestart": [{"path": "/usr/bin/host-hook"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
                {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "ro"]},
                {"destination": "/etc/hosts", "type": "none", "source": "/var/lib/x/hosts", "options": ["bind", "rw"]},
                {"destination": "/rel", "source": "relative/dir", "options": ["rbind"]}
            ],
            "linux": {
                "cgroupsPath": "/default/c1",
                "namespaces": [
                    {"type": "pid"},
                    {"type": "network", "path": "/var/run/netns/cni-1234"},
                    {"type": "ipc", "path": "/proc/4242/ns/ipc"},
                    {"type": "uts", "path": "/proc/4242/ns/uts"},
                    {"type": "mount"}
                ],
                "resources": {"memory": {"limit": 1048576}}
            },
            "annotations": {"x": "y"},
            "someFutureField": {"kept": true}
        })
    }

    #[test]
    fn bind_mounts_move_into_the_share() {
        let g = rewrite(&spec(), "c1", Path::new("/bundle/c1"), &share(), Some(7)).unwrap();
        let mounts = g.spec["mounts"].as_array().unwrap();
        assert_eq!(mounts[0]["source"], "proc");
        assert_eq!(mounts[1]["source"], "tmpfs");
        assert_eq!(mounts[2]["source"], "/run/ember/shared/c1/mounts/0");
        assert_eq!(mounts[2]["options"], json!(["rbind", "ro"]));
        assert_eq!(mounts[3]["source"], "/run/ember/shared/c1/mounts/1");
        assert_eq!(mounts[4]["source"], "/run/ember/shared/c1/mounts/2");
        assert_eq!(
            g.binds,
            vec![
                HostBind {
                    source: "/srv/data".into(),
                    target: "/run/ember/default/pod/mounts/c1/mounts/0".into(),
                    readonly: true,
                },
                HostBind {
                    source: "/var/lib/x/hosts".into(),
                    target: "/run/ember/default/pod/mounts/c1/mounts/1".into(),
                    readonly: false,
                },
                HostBind {
                    source: "/bundle/c1/relative/dir".into(),
                    target: "/run/ember/default/pod/mounts/c1/mounts/2".into(),
                    readonly: false,
                },
            ]
        );
    }

    #[test]
    fn container_ids_are_checked_before_any_path_is_built() {
        for bad in [
            "../../../../etc",
            "a/b",
            "..",
            ".",
            "",
            "-x",
            "a..b",
            &"c".repeat(77),
        ] {
            let e = rewrite(&spec(), bad, Path::new("/b"), &share(), None).unwrap_err();
            assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT, "{bad:?}");
            assert!(e.to_string().contains("not a valid identifier"), "{e}");
        }
        assert!(rewrite(&spec(), "a.b-c_d", Path::new("/b"), &share(), None).is_ok());
    }

    #[test]
    fn namespaces_point_at_the_sandbox_in_the_guest() {
        let g = rewrite(&spec(), "c1", Path::new("/b"), &share(), Some(7)).unwrap();
        assert_eq!(
            g.spec["linux"]["namespaces"],
            json!([
                {"type": "pid"},
                {"type": "ipc", "path": "/proc/7/ns/ipc"},
                {"type": "uts", "path": "/proc/7/ns/uts"},
                {"type": "mount"}
            ])
        );
        // Without a known sandbox, /proc/<pid>/ns paths (built by
        // containerd from the guest pids this shim reports) are kept.
        let g = rewrite(&spec(), "c1", Path::new("/b"), &share(), None).unwrap();
        assert_eq!(
            g.spec["linux"]["namespaces"][1]["path"],
            "/proc/4242/ns/ipc"
        );
        // A host namespace file cannot be joined from the guest.
        let mut s = spec();
        s["linux"]["namespaces"] = json!([{"type": "ipc", "path": "/run/ipcns/x"}]);
        let e = rewrite(&s, "c1", Path::new("/b"), &share(), None).unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
    }

    #[test]
    fn when_the_vm_is_the_sandbox_containers_join_the_guests_namespaces_but_not_its_init() {
        // containerd's Sandbox API: paths name the shim's pid on the host.
        let mut s = spec();
        s["linux"]["namespaces"] = json!([
            {"type": "pid", "path": "/proc/31342/ns/pid"},
            {"type": "ipc", "path": "/proc/31342/ns/ipc"},
            {"type": "uts", "path": "/proc/31342/ns/uts"},
            {"type": "network", "path": "/var/run/netns/cni-1"}
        ]);
        let g = rewrite(&s, "c1", Path::new("/b"), &share(), Some(GUEST_INIT_PID)).unwrap();
        assert_eq!(
            g.spec["linux"]["namespaces"],
            json!([
                {"type": "pid"},
                {"type": "ipc", "path": "/proc/1/ns/ipc"},
                {"type": "uts", "path": "/proc/1/ns/uts"}
            ])
        );
    }

    #[test]
    fn host_only_fields_go_and_the_rest_stays() {
        let g = rewrite(&spec(), "c1", Path::new("/b"), &share(), None).unwrap();
        assert!(g.spec.get("hooks").is_none());
        assert!(g.spec["linux"].get("cgroupsPath").is_none());
        assert_eq!(g.spec["linux"]["resources"]["memory"]["limit"], 1048576);
        assert_eq!(g.spec["someFutureField"], json!({"kept": true}));
        assert_eq!(g.spec["process"]["args"], json!(["sh"]));
    }

    #[test]
    fn a_network_set_up_by_hooks_is_the_guests_root_namespace() {
        let mut s = spec();
        s["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "network"}]);
        // prestart hooks (as in spec()): the VM's interfaces are the network.
        let g = rewrite(&s, "c1", Path::new("/b"), &share(), None).unwrap();
        assert_eq!(g.spec["linux"]["namespaces"], json!([{"type": "pid"}]));
        // Without hooks, a new namespace stays new (loopback only).
        s["hooks"] = json!({"poststop": [{"path": "/bin/true"}]});
        let g = rewrite(&s, "c1", Path::new("/b"), &share(), None).unwrap();
        assert_eq!(
            g.spec["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "network"}])
        );
    }

    #[test]
    fn proc_ns_paths_are_recognised() {
        assert!(is_proc_ns_path("/proc/1/ns/net"));
        assert!(!is_proc_ns_path("/proc/self/ns/net"));
        assert!(!is_proc_ns_path("/proc/1/ns/"));
        assert!(!is_proc_ns_path("/proc/1/ns/net/x"));
        assert!(!is_proc_ns_path("/var/run/netns/x"));
    }

    #[test]
    fn malformed_specs_are_refused() {
        assert!(rewrite(&json!([1]), "c", Path::new("/b"), &share(), None).is_err());
        let s = json!({"mounts": [{"destination": "/x", "type": "bind"}]});
        assert!(rewrite(&s, "c", Path::new("/b"), &share(), None).is_err());
    }
}
