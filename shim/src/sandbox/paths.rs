//! Where a pod's state lives on the host: `<state_dir>/<namespace>/<pod>/`
//! with the VM's vsock socket, its console log, the host-only tree of
//! mount points (`mounts/`) and its read-only view served to the guest
//! over virtio-fs (`shared/`); see "The pod's share" in shim/README.md.
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
    /// The host-only tree where the shim makes every mount point of the
    /// pod's containers (a shared mount; never served to the guest).
    pub mounts: PathBuf,
    /// The directory served to the guest over virtio-fs: a read-only slave
    /// bind of `mounts`, so the containers' mounts appear in it but the
    /// guest cannot change its tree of directories.
    pub shared: PathBuf,
}

/// Longest identifier containerd accepts.
pub const MAX_ID_LEN: usize = 76;

/// Whether `id` is an identifier by containerd's rules (its
/// `identifiers.Validate`): `^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$`, at
/// most 76 bytes. Such an id is one plain path component: no `/`, not `.`
/// or `..`, no leading `-`, `.` or `_`.
pub fn is_valid_id(id: &str) -> bool {
    let b = id.as_bytes();
    if b.is_empty() || b.len() > MAX_ID_LEN {
        return false;
    }
    let sep = |c: u8| c == b'.' || c == b'_' || c == b'-';
    b.iter().all(|c| c.is_ascii_alphanumeric() || sep(*c))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && !b.windows(2).any(|w| sep(w[0]) && sep(w[1]))
}

/// A name safe as one path component: valid containerd ids pass through;
/// anything else (an `io.ember.group` value is free text) becomes `_` and a
/// hash. No valid id starts with `_`, so a hashed name never equals the
/// name of a real id.
pub fn dir_name(id: &str) -> String {
    if is_valid_id(id) {
        id.to_string()
    } else {
        format!("_{}", short_hash(id))
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
            mounts: state_dir.join("mounts"),
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
        assert_eq!(p.mounts, PathBuf::from("/run/ember/default/pod1/mounts"));
        assert_eq!(
            p.console_log,
            PathBuf::from("/run/ember/default/pod1/console.log")
        );
        assert!(!p.vsock_outside_state_dir());
    }

    #[test]
    fn free_text_ids_cannot_escape() {
        for id in [
            "../../etc",
            "a/b",
            "",
            ".hidden",
            "x y",
            "..",
            "a..b",
            "a-",
            "-a",
        ] {
            let n = dir_name(id);
            assert!(n.starts_with('_'), "{id:?} -> {n}");
            assert!(!n.contains('/'));
            assert!(!is_valid_id(&n), "a hashed name is never a valid id: {n}");
        }
        assert_eq!(dir_name("k8s.io"), "k8s.io");
        assert_ne!(dir_name("a/b"), dir_name("a/c"));
    }

    #[test]
    fn ids_follow_containerd_rules() {
        for ok in ["a", "k8s.io", "c1", "A-b_c.d", &"x".repeat(76)] {
            assert!(is_valid_id(ok), "{ok}");
            assert_eq!(dir_name(ok), ok);
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a..b",
            "a.-b",
            "-a",
            "a-",
            "_a",
            "a b",
            "é",
            &"x".repeat(77),
        ] {
            assert!(!is_valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_hashed_name_cannot_be_taken_by_a_real_id() {
        // Before: "h-<hash>" was itself a valid id, so a pod named so
        // shared the state directory of the free-text group it hashes.
        let hashed = dir_name("my group");
        assert!(!is_valid_id(&hashed));
        let valid_lookalike = format!("h-{}", &hashed[1..]);
        assert!(is_valid_id(&valid_lookalike));
        assert_ne!(dir_name(&valid_lookalike), hashed);
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
