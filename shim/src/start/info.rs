//! `containerd-shim-ember-v2 -info`: containerd 2.2+ runs it for runtimes
//! that are not runc and reads a `containerd.types.RuntimeInfo` (protobuf)
//! from stdout. Ember describes itself: its name, version, and the OCI
//! features its guest agent implements. Works with or without containerd's
//! environment; stdin (runtime options) is read only when it is not a
//! terminal and never makes `-info` fail.

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::types::introspection::{RuntimeInfo, RuntimeVersion};

/// The type URL containerd expects for OCI features (as runc's shim sends).
pub const FEATURES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// The OCI runtime features (runtime-spec `features.md`) of Ember's agent:
/// what a container spec may ask for and get honoured inside the guest.
pub fn oci_features() -> serde_json::Value {
    serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.1.0",
        "hooks": [],
        "mountOptions": [
            "ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec",
            "bind", "rbind", "private", "rprivate", "shared", "rshared",
            "slave", "rslave", "relatime", "norelatime", "strictatime", "noatime"
        ],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
            "capabilities": caps(),
            "cgroup": { "v1": false, "v2": true, "systemd": false, "systemdUser": false },
            "seccomp": { "enabled": true },
            "apparmor": { "enabled": false },
            "selinux": { "enabled": false }
        },
        "annotations": {
            "io.ember.runtime": "containerd-shim-ember-v2",
            "io.ember.vm": "one KVM microVM per pod"
        }
    })
}

fn caps() -> Vec<&'static str> {
    vec![
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_LINUX_IMMUTABLE",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_BROADCAST",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_IPC_LOCK",
        "CAP_IPC_OWNER",
        "CAP_SYS_MODULE",
        "CAP_SYS_RAWIO",
        "CAP_SYS_CHROOT",
        "CAP_SYS_PTRACE",
        "CAP_SYS_PACCT",
        "CAP_SYS_ADMIN",
        "CAP_SYS_BOOT",
        "CAP_SYS_NICE",
        "CAP_SYS_RESOURCE",
        "CAP_SYS_TIME",
        "CAP_SYS_TTY_CONFIG",
        "CAP_MKNOD",
        "CAP_LEASE",
        "CAP_AUDIT_WRITE",
        "CAP_AUDIT_CONTROL",
        "CAP_SETFCAP",
        "CAP_MAC_OVERRIDE",
        "CAP_MAC_ADMIN",
        "CAP_SYSLOG",
        "CAP_WAKE_ALARM",
        "CAP_BLOCK_SUSPEND",
        "CAP_AUDIT_READ",
        "CAP_PERFMON",
        "CAP_BPF",
        "CAP_CHECKPOINT_RESTORE",
    ]
}

/// Ember's `RuntimeInfo`. `options` (what containerd sent on stdin) is
/// echoed back, as containerd's own shims do.
pub fn runtime_info(options: Option<Any>) -> RuntimeInfo {
    RuntimeInfo {
        name: crate::RUNTIME_ID.to_string(),
        version: MessageField::some(RuntimeVersion {
            version: crate::VERSION.to_string(),
            revision: String::new(),
            ..Default::default()
        }),
        options: options.into(),
        features: MessageField::some(Any {
            type_url: FEATURES_TYPE_URL.to_string(),
            value: serde_json::to_vec(&oci_features()).unwrap_or_default(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `-info`: reads options from stdin when it is a pipe or file, writes the
/// `RuntimeInfo` to stdout. Returns the exit code.
pub fn run() -> i32 {
    use std::io::{IsTerminal, Read, Write};
    let mut stdin = std::io::stdin();
    let mut data = Vec::new();
    if !stdin.is_terminal() {
        // Bounded: this is containerd's small options message.
        let _ = stdin.by_ref().take(1 << 20).read_to_end(&mut data);
    }
    let options = Any::parse_from_bytes(&data)
        .ok()
        .filter(|a| !a.type_url.is_empty());
    let bytes = match runtime_info(options).write_to_bytes() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{}: encoding RuntimeInfo: {e}", crate::RUNTIME_ID);
            return 1;
        }
    };
    let mut out = std::io::stdout().lock();
    match out.write_all(&bytes).and_then(|_| out.flush()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{}: writing RuntimeInfo: {e}", crate::RUNTIME_ID);
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_names_ember_and_carries_features() {
        let info = runtime_info(None);
        let bytes = info.write_to_bytes().unwrap();
        let back = RuntimeInfo::parse_from_bytes(&bytes).unwrap();
        assert_eq!(back.name, "io.containerd.ember.v2");
        assert_eq!(back.version.version, crate::VERSION);
        assert_eq!(back.features.type_url, FEATURES_TYPE_URL);
        let f: serde_json::Value = serde_json::from_slice(&back.features.value).unwrap();
        let ns = f["linux"]["namespaces"].as_array().unwrap();
        assert!(
            !ns.iter().any(|n| n == "user"),
            "user namespaces are not supported"
        );
        assert!(ns.iter().any(|n| n == "pid"));
    }
}
