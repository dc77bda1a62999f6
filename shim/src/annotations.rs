//! OCI annotations the shim acts on: which pod (VM) a container belongs to,
//! and the gated `io.ember.*` per-pod overrides.

use std::collections::HashMap;

use ember_vmm::MIN_MEM_MIB;

use crate::config::Config;
use crate::error::{Error, Result};

/// CRI: the id of the pod sandbox a container belongs to (set on the
/// sandbox container itself too).
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// CRI: "sandbox" or "container".
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI: pod-level resources, on the sandbox container (containerd 1.6+).
pub const CRI_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const CRI_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const CRI_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// Ember: put containers with the same value into one VM (for `ctr run
/// --annotation io.ember.group=NAME` and tests; CRI pods group by
/// sandbox id on their own). Always allowed: it selects a VM, it does not
/// change one.
pub const GROUP: &str = "io.ember.group";
/// Ember: vCPUs of the pod's VM.
pub const VCPUS: &str = "io.ember.vcpus";
/// Ember: guest memory of the pod's VM, MiB.
pub const MEMORY_MIB: &str = "io.ember.memory_mib";
/// Ember: extra guest kernel parameters.
pub const KERNEL_PARAMS: &str = "io.ember.kernel_params";

/// The annotations that override per-pod settings; each must be listed in
/// `enable_annotations` to be accepted.
pub const OVERRIDABLE: &[&str] = &[VCPUS, MEMORY_MIB, KERNEL_PARAMS];
const PREFIX: &str = "io.ember.";

/// The annotations of an OCI spec (empty if there are none).
pub fn of_spec(spec: &serde_json::Value) -> HashMap<String, String> {
    spec.get("annotations")
        .and_then(|a| a.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// The id of the shim (and VM) a container belongs to: the CRI sandbox
/// id, else `io.ember.group`, else the container's own id.
pub fn grouping_id(annotations: &HashMap<String, String>, container_id: &str) -> String {
    for key in [CRI_SANDBOX_ID, GROUP] {
        if let Some(v) = annotations.get(key) {
            let v = v.trim();
            if !v.is_empty() {
                return v.to_string();
            }
        }
    }
    container_id.to_string()
}

/// Per-pod settings requested through annotations, already checked against
/// the config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodOverrides {
    pub vcpus: Option<u8>,
    pub memory_mib: Option<u32>,
    pub kernel_params: Option<String>,
}

/// Reads the `io.ember.*` annotations: unknown names and names not listed
/// in `enable_annotations` are refused with an error that says what to do.
pub fn pod_overrides(
    annotations: &HashMap<String, String>,
    config: &Config,
) -> Result<PodOverrides> {
    let mut out = PodOverrides::default();
    let mut names: Vec<&String> = annotations
        .keys()
        .filter(|k| k.starts_with(PREFIX))
        .collect();
    names.sort();
    for name in names {
        let value = annotations[name].trim();
        if name == GROUP {
            continue;
        }
        if name == crate::resources::port_forward::PORTS_ANNOTATION {
            // Always allowed: it only listens in the pod's own namespace.
            crate::resources::port_forward::parse_ports(value)
                .map_err(|e| Error::invalid(format!("annotation {name}: {e}")))?;
            continue;
        }
        if !OVERRIDABLE.contains(&name.as_str()) {
            return Err(Error::invalid(format!(
                "unknown Ember annotation {name} (known: {GROUP}, {}, {})",
                crate::resources::port_forward::PORTS_ANNOTATION,
                OVERRIDABLE.join(", ")
            )));
        }
        if !config.annotation_enabled(name) {
            return Err(Error::precondition(format!(
                "annotation {name} is not enabled: add it to enable_annotations in the Ember config to allow it"
            )));
        }
        let bad = |why: String| Error::invalid(format!("annotation {name}={value:?}: {why}"));
        match name.as_str() {
            VCPUS => {
                let v: u8 = value.parse().map_err(|_| bad("not a vCPU count".into()))?;
                if v == 0 || v > config.max_vcpus {
                    return Err(bad(format!(
                        "must be between 1 and max_vcpus ({})",
                        config.max_vcpus
                    )));
                }
                out.vcpus = Some(v);
            }
            MEMORY_MIB => {
                let v: u32 = value.parse().map_err(|_| bad("not a MiB count".into()))?;
                if v < MIN_MEM_MIB || v > config.max_memory_mib {
                    return Err(bad(format!(
                        "must be between {MIN_MEM_MIB} and max_memory_mib ({})",
                        config.max_memory_mib
                    )));
                }
                out.memory_mib = Some(v);
            }
            KERNEL_PARAMS => {
                if value.contains(['\n', '\0']) {
                    return Err(bad("must be one line".into()));
                }
                out.kernel_params = Some(value.to_string());
            }
            _ => unreachable!("checked against OVERRIDABLE above"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn grouping_prefers_the_cri_sandbox_then_the_ember_group() {
        assert_eq!(grouping_id(&ann(&[]), "c1"), "c1");
        assert_eq!(grouping_id(&ann(&[(GROUP, "g")]), "c1"), "g");
        assert_eq!(
            grouping_id(&ann(&[(GROUP, "g"), (CRI_SANDBOX_ID, "sb")]), "c1"),
            "sb"
        );
        assert_eq!(grouping_id(&ann(&[(GROUP, "  ")]), "c1"), "c1");
    }

    #[test]
    fn annotations_are_read_from_the_spec() {
        let spec = serde_json::json!({"annotations": {"a": "1", "n": 2}});
        assert_eq!(of_spec(&spec), ann(&[("a", "1")]));
        assert!(of_spec(&serde_json::json!({})).is_empty());
    }

    #[test]
    fn overrides_are_gated() {
        let mut config = Config::default();
        let a = ann(&[(VCPUS, "2"), (GROUP, "g"), ("other.key", "x")]);
        let e = pod_overrides(&a, &config).unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::FAILED_PRECONDITION);
        assert!(e.to_string().contains("enable_annotations"), "{e}");

        config.enable_annotations = vec![VCPUS.into(), MEMORY_MIB.into(), KERNEL_PARAMS.into()];
        assert_eq!(
            pod_overrides(&a, &config).unwrap(),
            PodOverrides {
                vcpus: Some(2),
                ..Default::default()
            }
        );
        let all = ann(&[(VCPUS, "3"), (MEMORY_MIB, "512"), (KERNEL_PARAMS, "quiet")]);
        let o = pod_overrides(&all, &config).unwrap();
        assert_eq!(o.memory_mib, Some(512));
        assert_eq!(o.kernel_params.as_deref(), Some("quiet"));
    }

    #[test]
    fn bad_values_and_unknown_names_are_refused() {
        let config = Config {
            enable_annotations: OVERRIDABLE.iter().map(|s| s.to_string()).collect(),
            ..Config::default()
        };
        for (k, v) in [
            (VCPUS, "0"),
            (VCPUS, "99"),
            (VCPUS, "two"),
            (MEMORY_MIB, "1"),
            (MEMORY_MIB, "99999999"),
            (KERNEL_PARAMS, "a\nb"),
        ] {
            let e = pod_overrides(&ann(&[(k, v)]), &config).unwrap_err();
            assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT, "{k}={v}");
        }
        let e = pod_overrides(&ann(&[("io.ember.vcpu", "2")]), &config).unwrap_err();
        assert!(e
            .to_string()
            .contains("unknown Ember annotation io.ember.vcpu"));
    }

    #[test]
    fn port_forward_needs_no_enabling_but_must_name_ports() {
        use crate::resources::port_forward::PORTS_ANNOTATION;
        let config = Config::default();
        let ok = pod_overrides(&ann(&[(PORTS_ANNOTATION, "8080, 9090")]), &config).unwrap();
        assert_eq!(ok, PodOverrides::default());
        let e = pod_overrides(&ann(&[(PORTS_ANNOTATION, "8080,http")]), &config).unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
        assert!(e.to_string().contains(PORTS_ANNOTATION), "{e}");
    }
}
