//! The one place where containerd's CreateSandbox request (and the CRI
//! `PodSandboxConfig` it carries) becomes Ember's domain types: what VM to
//! boot ([`SandboxSetup`]), which host cgroup it is charged to, and what is
//! refused before anything boots (host network, host PID, bad `io.ember.*`
//! annotations, a pod larger than the host).

use std::collections::HashMap;
use std::path::PathBuf;

use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::sandbox_api::CreateSandboxRequest;
use ember_proto::cri_pod::{NamespaceMode, PodSandboxConfig};
use serde_json::{json, Value};

use crate::annotations;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::resources::port_forward;
use crate::resources::sizing::{check_fits_host, size_vm, HostResources, WorkloadLimits};
use crate::sandbox::SandboxSetup;
use crate::task::HOST_NETWORK_REFUSED;

/// Refusal of a pod that asks for the node's PID namespace.
pub const HOST_PID_REFUSED: &str = "host-PID pods are not supported by the Ember runtime: \
    each pod runs in its own VM, whose processes cannot see the node's; \
    run this pod with hostPID: false, or with a runc-based RuntimeClass";

/// What a CreateSandbox asks for, checked.
#[derive(Debug, Clone)]
pub struct PodRequest {
    pub setup: SandboxSetup,
    /// The host cgroup the VM is charged to, written as the CRI sandbox
    /// container's spec would name it (see `cgroup::pod_cgroup`).
    pub cgroup_spec: Value,
    /// `namespace/name` of the Kubernetes pod, for logs and status.
    pub pod_name: String,
    /// Ports `kubectl port-forward` may reach: the CRI port mappings and
    /// the pod's port-forward annotations.
    pub ports: Vec<u16>,
}

/// The CRI config in `req.options`: an `Any` of `runtime.v1.PodSandboxConfig`
/// from containerd's CRI, or nothing (a sandbox made by another client).
fn pod_config(req: &CreateSandboxRequest) -> Result<PodSandboxConfig> {
    let Some(any) = req.options.as_ref() else {
        return Ok(PodSandboxConfig::new());
    };
    if any.type_url.is_empty() && any.value.is_empty() {
        return Ok(PodSandboxConfig::new());
    }
    if !any.type_url.ends_with("PodSandboxConfig") {
        return Err(Error::invalid(format!(
            "CreateSandbox options of type {:?}: the Ember runtime reads only the CRI's runtime.v1.PodSandboxConfig",
            any.type_url
        )));
    }
    PodSandboxConfig::parse_from_bytes(&any.value).map_err(|e| {
        Error::invalid(format!(
            "CreateSandbox options: not a PodSandboxConfig: {e}"
        ))
    })
}

/// Checks a CreateSandbox request and turns it into what the pod's VM is
/// built from. Nothing is started here.
pub fn from_create_request(
    req: &CreateSandboxRequest,
    namespace: &str,
    config: &Config,
) -> Result<PodRequest> {
    let cri = pod_config(req)?;
    let linux = cri.linux.as_ref();
    let ns = linux
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref());
    if ns.is_some_and(|n| n.network.enum_value_or_default() == NamespaceMode::NODE) {
        return Err(Error::invalid(HOST_NETWORK_REFUSED));
    }
    if ns.is_some_and(|n| n.pid.enum_value_or_default() == NamespaceMode::NODE) {
        return Err(Error::invalid(HOST_PID_REFUSED));
    }
    // containerd merges the sandbox's annotations into the request's; the
    // CRI config's are the pod's own.
    let mut ann: HashMap<String, String> = req.annotations.clone();
    ann.extend(cri.annotations.iter().map(|(k, v)| (k.clone(), v.clone())));
    let overrides = annotations::pod_overrides(&ann, config)?;
    let resources = linux.and_then(|l| l.resources.as_ref());
    let positive = |v: i64| (v > 0).then_some(v);
    let limits = WorkloadLimits {
        memory_bytes: resources
            .and_then(|r| positive(r.memory_limit_in_bytes))
            .map(|v| v as u64),
        cpu_quota: resources.and_then(|r| positive(r.cpu_quota)),
        cpu_period: resources
            .and_then(|r| positive(r.cpu_period))
            .map(|v| v as u64),
    };
    if let Some(host) = HostResources::detect() {
        check_fits_host(&limits, &host)?;
    }
    let setup = SandboxSetup {
        namespace: namespace.to_string(),
        id: req.sandbox_id.clone(),
        size: size_vm(config, &limits, &overrides),
        kernel_params: overrides.kernel_params,
        netns: Some(req.netns_path.as_str())
            .filter(|p| !p.is_empty())
            .map(PathBuf::from),
        hostname: checked_hostname(&cri.hostname)?,
    };
    let parent = linux.map(|l| l.cgroup_parent.as_str()).unwrap_or_default();
    let metadata = cri.metadata.as_ref();
    let mut ports: Vec<u16> = cri
        .port_mappings
        .iter()
        .filter_map(|m| u16::try_from(m.container_port).ok())
        .filter(|p| *p != 0)
        .collect();
    ports.extend(port_forward::ports_of_annotations(&ann).map_err(Error::invalid)?);
    Ok(PodRequest {
        cgroup_spec: cgroup_spec(parent, &req.sandbox_id),
        pod_name: metadata
            .map(|m| format!("{}/{}", m.namespace, m.name))
            .unwrap_or_default(),
        ports,
        setup,
    })
}

/// The pod's hostname as the guest's: what kubelet sends (an RFC 1123
/// name), checked here since the guest kernel is handed it as is.
fn checked_hostname(name: &str) -> Result<Option<String>> {
    if name.is_empty() {
        return Ok(None);
    }
    let ok = name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.']);
    if !ok {
        return Err(Error::invalid(format!(
            "pod hostname {name:?} is not a valid host name (at most 64 letters, digits, '-' and '.')"
        )));
    }
    Ok(Some(name.to_string()))
}

/// The cgroup part of the spec containerd's podsandbox controller gives a
/// pause container: `<parent>/<id>`, or systemd's
/// `<parent>:cri-containerd:<id>` under a `.slice` parent. Without a
/// parent the pod gets Ember's own (`cgroup_parent` in the config).
fn cgroup_spec(parent: &str, id: &str) -> Value {
    let path = if parent.is_empty() {
        String::new()
    } else if parent.ends_with(".slice") {
        format!("{parent}:cri-containerd:{id}")
    } else {
        format!("{}/{id}", parent.trim_end_matches('/'))
    };
    json!({
        "annotations": { annotations::CRI_CONTAINER_TYPE: "sandbox" },
        "linux": { "cgroupsPath": path },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::protobuf::well_known_types::any::Any;
    use containerd_shim_protos::protobuf::MessageField;
    use ember_proto::cri_pod::{
        LinuxContainerResources, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
        NamespaceOption, PodSandboxMetadata, PortMapping,
    };

    /// What containerd 2.1's CRI sends: the pod's config as an `Any`.
    fn request(cri: &PodSandboxConfig) -> CreateSandboxRequest {
        CreateSandboxRequest {
            sandbox_id: "sb1".into(),
            netns_path: "/var/run/netns/cni-1".into(),
            options: MessageField::some(Any {
                type_url: "runtime.v1.PodSandboxConfig".into(),
                value: cri.write_to_bytes().unwrap(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pod(network: NamespaceMode, pid: NamespaceMode) -> PodSandboxConfig {
        let mut cri = PodSandboxConfig::new();
        cri.metadata = MessageField::some(PodSandboxMetadata {
            name: "web".into(),
            namespace: "prod".into(),
            ..Default::default()
        });
        cri.hostname = "web-1".into();
        cri.port_mappings.push(PortMapping {
            container_port: 8080,
            ..Default::default()
        });
        cri.linux = MessageField::some(LinuxPodSandboxConfig {
            cgroup_parent: "/kubepods/burstable/pod-uid".into(),
            security_context: MessageField::some(LinuxSandboxSecurityContext {
                namespace_options: MessageField::some(NamespaceOption {
                    network: network.into(),
                    pid: pid.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            resources: MessageField::some(LinuxContainerResources {
                memory_limit_in_bytes: 512 << 20,
                cpu_quota: 200_000,
                cpu_period: 100_000,
                ..Default::default()
            }),
            ..Default::default()
        });
        cri
    }

    #[test]
    fn a_cri_pod_becomes_a_vm_of_its_size_in_its_cgroup() {
        let config = Config::default();
        let r = from_create_request(
            &request(&pod(NamespaceMode::POD, NamespaceMode::CONTAINER)),
            "k8s.io",
            &config,
        )
        .unwrap();
        assert_eq!(r.setup.id, "sb1");
        assert_eq!(r.setup.namespace, "k8s.io");
        assert_eq!(r.setup.size.vcpus, 2);
        assert_eq!(
            r.setup.size.mem_mib,
            512 + config.memory_overhead_mib,
            "the pod's memory plus the VM's overhead"
        );
        assert_eq!(r.setup.netns, Some(PathBuf::from("/var/run/netns/cni-1")));
        assert_eq!(
            r.cgroup_spec["linux"]["cgroupsPath"],
            "/kubepods/burstable/pod-uid/sb1"
        );
        assert_eq!(r.pod_name, "prod/web");
        assert_eq!(
            r.setup.hostname.as_deref(),
            Some("web-1"),
            "the guest's hostname"
        );
        let mut bad = pod(NamespaceMode::POD, NamespaceMode::CONTAINER);
        bad.hostname = "a;reboot".into();
        let e = from_create_request(&request(&bad), "k8s.io", &config).unwrap_err();
        assert!(e.to_string().contains("not a valid host name"), "{e}");
        assert_eq!(r.ports, [8080]);
        let mut annotated = pod(NamespaceMode::POD, NamespaceMode::CONTAINER);
        annotated
            .annotations
            .insert("io.ember.port_forward".into(), "9090".into());
        let r = from_create_request(&request(&annotated), "k8s.io", &config).unwrap();
        assert_eq!(r.ports, [8080, 9090], "mappings, then the annotation's");
        annotated
            .annotations
            .insert("io.ember.port_forward".into(), "not-a-port".into());
        let e = from_create_request(&request(&annotated), "k8s.io", &config).unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT, "{e}");
    }

    #[test]
    fn host_network_and_host_pid_are_refused_before_anything_boots() {
        let config = Config::default();
        for (cri, want) in [
            (
                pod(NamespaceMode::NODE, NamespaceMode::CONTAINER),
                "host-network",
            ),
            (pod(NamespaceMode::POD, NamespaceMode::NODE), "host-PID"),
        ] {
            let e = from_create_request(&request(&cri), "k8s.io", &config).unwrap_err();
            assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
            assert!(e.to_string().contains(want), "{e}");
        }
    }

    #[test]
    fn ember_annotations_go_through_the_allow_list() {
        let config = Config::default();
        let mut cri = pod(NamespaceMode::POD, NamespaceMode::CONTAINER);
        cri.annotations.insert("io.ember.vcpus".into(), "2".into());
        let e = from_create_request(&request(&cri), "k8s.io", &config).unwrap_err();
        assert!(e.to_string().contains("enable_annotations"), "{e}");
        cri.annotations.clear();
        cri.annotations
            .insert("io.ember.frobnicate".into(), "1".into());
        let e = from_create_request(&request(&cri), "k8s.io", &config).unwrap_err();
        assert!(e.to_string().contains("unknown Ember annotation"), "{e}");
    }

    #[test]
    fn options_of_another_type_or_garbage_are_refused() {
        let config = Config::default();
        let mut req = request(&pod(NamespaceMode::POD, NamespaceMode::POD));
        req.options.as_mut().unwrap().type_url = "runtime.v1.ContainerConfig".into();
        let e = from_create_request(&req, "k8s.io", &config).unwrap_err();
        assert!(e.to_string().contains("PodSandboxConfig"), "{e}");
        req.options.as_mut().unwrap().type_url = "runtime.v1.PodSandboxConfig".into();
        req.options.as_mut().unwrap().value = vec![0xff; 7];
        assert!(from_create_request(&req, "k8s.io", &config).is_err());
        // No options at all (not a CRI sandbox): defaults, no cgroup path.
        let bare = CreateSandboxRequest {
            sandbox_id: "x".into(),
            ..Default::default()
        };
        let r = from_create_request(&bare, "default", &config).unwrap();
        assert_eq!(r.setup.netns, None);
        assert_eq!(r.cgroup_spec["linux"]["cgroupsPath"], "");
    }

    #[test]
    fn systemd_parents_get_the_systemd_form() {
        let spec = cgroup_spec("kubepods-burstable-pod1.slice", "abc");
        assert_eq!(
            spec["linux"]["cgroupsPath"],
            "kubepods-burstable-pod1.slice:cri-containerd:abc"
        );
    }
}
