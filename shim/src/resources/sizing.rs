//! How big a pod's VM is.
//!
//! A VM is sized once, when it boots for the pod's first container (the
//! CRI sandbox container, or the first `ctr run` of a group): this VMM has
//! no CPU or memory hotplug, so containers created later run within that
//! size.
//!
//! - vCPUs: `io.ember.vcpus` if allowed; else the CPU quota / period of
//!   the workload, rounded up; else `default_vcpus`. Clamped to
//!   `1..=max_vcpus`.
//! - Memory: `io.ember.memory_mib` if allowed; else the workload's memory
//!   limit (rounded up to MiB) plus `memory_overhead_mib` (guest kernel,
//!   agent, page cache); else `default_memory_mib`. Clamped to
//!   `64..=max_memory_mib`.
//!
//! The workload's limits come from the pod-level CRI annotations when
//! containerd sets them (on the sandbox container:
//! `io.kubernetes.cri.sandbox-cpu-quota`, ...), else from the spec's
//! `linux.resources`. Guest memory is a memfd touched lazily, so a generous
//! size costs host memory only when the guest uses it.
//!
//! A workload asking for more memory or CPUs than the host has is refused
//! before anything boots ([`check_fits_host`]): no VM could honour it.

use ember_vmm::MIN_MEM_MIB;
use serde_json::Value;

use crate::annotations::{self, PodOverrides};
use crate::config::Config;
use crate::error::{Error, Result};

const MIB: u64 = 1 << 20;

/// CPU and memory limits a workload asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkloadLimits {
    pub memory_bytes: Option<u64>,
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
}

impl WorkloadLimits {
    /// Reads the limits of an OCI spec (pod-level CRI annotations first).
    pub fn from_spec(spec: &Value) -> Self {
        let ann = annotations::of_spec(spec);
        let num = |k: &str| ann.get(k).and_then(|v| v.trim().parse::<i64>().ok());
        let res = &spec["linux"]["resources"];
        let memory = num(annotations::CRI_SANDBOX_MEMORY)
            .or_else(|| res["memory"]["limit"].as_i64())
            .filter(|v| *v > 0)
            .map(|v| v as u64);
        let quota = num(annotations::CRI_SANDBOX_CPU_QUOTA)
            .or_else(|| res["cpu"]["quota"].as_i64())
            .filter(|v| *v > 0);
        let period = num(annotations::CRI_SANDBOX_CPU_PERIOD)
            .or_else(|| res["cpu"]["period"].as_i64())
            .filter(|v| *v > 0)
            .map(|v| v as u64);
        WorkloadLimits {
            memory_bytes: memory,
            cpu_quota: quota,
            cpu_period: period,
        }
    }
}

/// What the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostResources {
    pub memory_bytes: u64,
    pub cpus: u64,
}

impl HostResources {
    /// MemTotal from /proc/meminfo and the CPUs this process may use.
    pub fn detect() -> Option<Self> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let kib: u64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        let cpus = std::thread::available_parallelism().ok()?.get() as u64;
        Some(HostResources {
            memory_bytes: kib * 1024,
            cpus,
        })
    }
}

/// Refuses limits the host cannot possibly meet, with a message that
/// names the resource.
pub fn check_fits_host(limits: &WorkloadLimits, host: &HostResources) -> Result<()> {
    if let Some(mem) = limits.memory_bytes {
        if mem > host.memory_bytes {
            return Err(Error::invalid(format!(
                "the workload asks for {} MiB of memory, more than this host has ({} MiB)",
                mem.div_ceil(MIB),
                host.memory_bytes / MIB
            )));
        }
    }
    if let Some(quota) = limits.cpu_quota {
        let period = limits.cpu_period.unwrap_or(100_000);
        let cpus = (quota as u64).div_ceil(period);
        if cpus > host.cpus {
            return Err(Error::invalid(format!(
                "the workload asks for {cpus} CPUs (quota {quota} / period {period}), more than this host has ({})",
                host.cpus
            )));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u8,
    pub mem_mib: u32,
}

pub fn size_vm(config: &Config, limits: &WorkloadLimits, overrides: &PodOverrides) -> VmSize {
    let max_vcpus = config.max_vcpus.max(1);
    let vcpus = match (overrides.vcpus, limits.cpu_quota, limits.cpu_period) {
        (Some(v), _, _) => u64::from(v),
        (None, Some(quota), Some(period)) => (quota as u64).div_ceil(period),
        (None, Some(quota), None) => (quota as u64).div_ceil(100_000),
        _ => u64::from(config.default_vcpus),
    }
    .clamp(1, u64::from(max_vcpus)) as u8;

    let max_mem = config.max_memory_mib.max(MIN_MEM_MIB);
    let mem_mib = match (overrides.memory_mib, limits.memory_bytes) {
        (Some(m), _) => u64::from(m),
        (None, Some(bytes)) => bytes.div_ceil(MIB) + u64::from(config.memory_overhead_mib),
        _ => u64::from(config.default_memory_mib),
    }
    .clamp(u64::from(MIN_MEM_MIB), u64::from(max_mem)) as u32;
    VmSize { vcpus, mem_mib }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn size(spec: Value) -> VmSize {
        size_vm(
            &Config::default(),
            &WorkloadLimits::from_spec(&spec),
            &PodOverrides::default(),
        )
    }

    #[test]
    fn no_limits_means_the_defaults() {
        let c = Config::default();
        assert_eq!(
            size(json!({})),
            VmSize {
                vcpus: c.default_vcpus,
                mem_mib: c.default_memory_mib
            }
        );
    }

    #[test]
    fn limits_size_the_vm() {
        let s = size(json!({"linux": {"resources": {
            "memory": {"limit": 300 * MIB + 1},
            "cpu": {"quota": 150000, "period": 100000}
        }}}));
        assert_eq!(
            s,
            VmSize {
                vcpus: 2,
                mem_mib: 301 + 128
            }
        );
        // An unlimited quota (-1) is no limit.
        let s = size(json!({"linux": {"resources": {"cpu": {"quota": -1, "period": 100000}}}}));
        assert_eq!(s.vcpus, 1);
    }

    #[test]
    fn pod_annotations_win_over_the_container_spec() {
        let s = size(json!({
            "annotations": {
                "io.kubernetes.cri.sandbox-memory": "1073741824",
                "io.kubernetes.cri.sandbox-cpu-quota": "400000",
                "io.kubernetes.cri.sandbox-cpu-period": "100000"
            },
            "linux": {"resources": {"memory": {"limit": 1048576}}}
        }));
        assert_eq!(
            s,
            VmSize {
                vcpus: 4,
                mem_mib: 1024 + 128
            }
        );
    }

    #[test]
    fn results_are_clamped_to_the_config() {
        let c = Config {
            max_vcpus: 2,
            max_memory_mib: 512,
            ..Config::default()
        };
        let limits = WorkloadLimits {
            memory_bytes: Some(64 << 30),
            cpu_quota: Some(1_600_000),
            cpu_period: Some(100_000),
        };
        assert_eq!(
            size_vm(&c, &limits, &PodOverrides::default()),
            VmSize {
                vcpus: 2,
                mem_mib: 512
            }
        );
        let tiny = WorkloadLimits {
            memory_bytes: Some(1),
            ..Default::default()
        };
        let c = Config {
            memory_overhead_mib: 0,
            ..Config::default()
        };
        assert_eq!(
            size_vm(&c, &tiny, &PodOverrides::default()).mem_mib,
            MIN_MEM_MIB
        );
    }

    #[test]
    fn more_than_the_host_has_is_refused() {
        let host = HostResources {
            memory_bytes: 8 << 30,
            cpus: 2,
        };
        let ok = WorkloadLimits {
            memory_bytes: Some(8 << 30),
            cpu_quota: Some(200_000),
            cpu_period: Some(100_000),
        };
        check_fits_host(&ok, &host).unwrap();
        check_fits_host(&WorkloadLimits::default(), &host).unwrap();
        let e = check_fits_host(
            &WorkloadLimits {
                memory_bytes: Some(32 << 30),
                ..ok
            },
            &host,
        )
        .unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
        assert!(e.to_string().contains("32768 MiB of memory"), "{e}");
        let e = check_fits_host(
            &WorkloadLimits {
                cpu_quota: Some(250_000),
                ..ok
            },
            &host,
        )
        .unwrap_err();
        assert!(e.to_string().contains("3 CPUs"), "{e}");
        assert!(HostResources::detect().is_some_and(|h| h.cpus >= 1 && h.memory_bytes > 0));
    }

    #[test]
    fn overrides_win() {
        let o = PodOverrides {
            vcpus: Some(3),
            memory_mib: Some(700),
            kernel_params: None,
        };
        let limits = WorkloadLimits {
            memory_bytes: Some(MIB),
            cpu_quota: Some(100_000),
            cpu_period: Some(100_000),
        };
        assert_eq!(
            size_vm(&Config::default(), &limits, &o),
            VmSize {
                vcpus: 3,
                mem_mib: 700
            }
        );
    }
}
