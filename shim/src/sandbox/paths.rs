//! Where a pod's state lives on the host: `<state_dir>/<namespace>/<pod>/`
//! with the VM's vsock socket, its console log and the virtio-fs share.
//!
//! The serving shim and a later `delete` (cleanup after a crash) compute
//! the same paths from the same inputs, so the cleanup finds everything.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Longest socket path we use: `sun_path` is 108 bytes including the NUL,
/// and the VMM appends `_<port>` (up to 11 bytes) for guest-initiated
/// connections.
const MAX_SOCKET_PATH: usize = 96;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPaths {
    /// `<state_dir>/<namespace>/<pod>`.
    pub state_dir: PathBuf,
    /// The hybrid vsock socket.
    pub vsock: PathBuf,
    /// The guest console (kernel log and the agent's console lines).
    pub console_log: PathBuf,
    /// The host directory served to the guest over virtio-fs.
    pub shared: PathBuf,
}

/// A name safe as one path component: ids that containerd validated pass
/// through (letters, digits, `_`, `.`, `-`; at most 76 bytes); anything
/// else (an `io.ember.group` value is free text) becomes a hash.
pub fn dir_name(id: &str) -> String {
    let ok = !id.is_empty()
        && id.len() <= 76
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
        && id.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        id.to_string()
    } else {
        format!("h-{}", short_hash(id))
    }
}

fn short_hash(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    digest[..12].iter().map(|b| format!("{b:02x}")).collect()
}

impl SandboxPaths {
    pub fn new(state_root: &Path, namespace: &str, pod_id: &str) -> Self {
        let state_dir = state_root.join(dir_name(namespace)).join(dir_name(pod_id));
        let mut vsock = state_dir.join("vsock.sock");
        if vsock.as_os_str().len() > MAX_SOCKET_PATH {
            // Long namespaces and ids: a short socket name of its own.
            vsock = state_root
                .join("vsock")
                .join(format!("{}.sock", short_hash(&state_dir.to_string_lossy())));
        }
        SandboxPaths {
            console_log: state_dir.join("console.log"),
            shared: state_dir.join("shared"),
            vsock,
            state_dir,
        }
    }

    /// Whether the socket lives outside the state directory (and so needs
    /// removing on its own).
    pub fn vsock_outside_state_dir(&self) -> bool {
        !self.vsock.starts_with(&self.state_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let p = SandboxPaths::new(Path::new("/run/ember"), "default", "pod1");
        assert_eq!(p.state_dir, PathBuf::from("/run/ember/default/pod1"));
        assert_eq!(p.vsock, PathBuf::from("/run/ember/default/pod1/vsock.sock"));
        assert_eq!(p.shared, PathBuf::from("/run/ember/default/pod1/shared"));
        assert_eq!(
            p.console_log,
            PathBuf::from("/run/ember/default/pod1/console.log")
        );
        assert!(!p.vsock_outside_state_dir());
    }

    #[test]
    fn free_text_ids_cannot_escape() {
        for id in ["../../etc", "a/b", "", ".hidden", "x y"] {
            let n = dir_name(id);
            assert!(n.starts_with("h-"), "{id:?} -> {n}");
            assert!(!n.contains('/'));
        }
        assert_eq!(dir_name("k8s.io"), "k8s.io");
        assert_ne!(dir_name("a/b"), dir_name("a/c"));
    }

    #[test]
    fn long_ids_get_a_short_socket() {
        let long = "x".repeat(76);
        let p = SandboxPaths::new(Path::new("/run/ember"), &long, &long);
        assert!(p.vsock.as_os_str().len() <= MAX_SOCKET_PATH);
        assert!(p.vsock_outside_state_dir());
        assert_eq!(p, SandboxPaths::new(Path::new("/run/ember"), &long, &long));
    }
}
