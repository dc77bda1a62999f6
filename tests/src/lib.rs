//! Shared helpers for the end-to-end tests: where the guest artifacts are,
//! booting a VM and waiting for its agent, and checking that a torn-down VM
//! left nothing behind in this process.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ember_proto::agent::{health_response::Status, HealthRequest};
use ember_proto::client::{self, AgentClient};
use ember_vmm::connect_hybrid_timeout;
use ember_vmm::timing::fmt_duration;
use ember_vmm::{CpuTemplate, Vm, VmConfig, VsockConfig};

/// The agent's vsock port.
pub const AGENT_PORT: u32 = 1024;

/// Guest kernel and initrd, from `EMBER_KERNEL` / `EMBER_INITRD` or the
/// paths deploy/build-kernel.sh and deploy/build-initrd.sh install to.
pub fn artifacts() -> (PathBuf, PathBuf) {
    let kernel = std::env::var_os("EMBER_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/lib/ember/vmlinux".into());
    let initrd = std::env::var_os("EMBER_INITRD")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/lib/ember/initrd.img".into());
    for (what, path, script) in [
        ("guest kernel", &kernel, "deploy/build-kernel.sh"),
        ("initrd", &initrd, "deploy/build-initrd.sh"),
    ] {
        assert!(
            path.exists(),
            "{what} {} not found: run {script} (or deploy/test.sh), or set EMBER_KERNEL/EMBER_INITRD",
            path.display()
        );
    }
    (kernel, initrd)
}

/// The CPU template tests use: `EMBER_CPU_TEMPLATE`, else detection.
pub fn cpu_template() -> CpuTemplate {
    std::env::var("EMBER_CPU_TEMPLATE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(CpuTemplate::Auto)
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info,ember_vmm=info".to_string()),
        )
        .with_test_writer()
        .try_init();
}

/// A VM config for tests, with its vsock socket and console log in `dir`.
pub fn vm_config(dir: &std::path::Path, cid: u32) -> VmConfig {
    let (kernel, initrd) = artifacts();
    let mut config = VmConfig::new(kernel);
    config.initrd = Some(initrd);
    config.vcpus = 2;
    config.mem_mib = 256;
    config.cpu_template = cpu_template();
    config.console_log = Some(dir.join("console.log"));
    config.vsock = Some(VsockConfig {
        guest_cid: cid,
        uds_path: dir.join("vsock.sock"),
    });
    config
}

/// Connects to the agent through the hybrid vsock, retrying while the
/// guest boots, until Health answers SERVING or `deadline` passes. Fails
/// early if the VM ends.
pub async fn wait_for_agent(vm: &Vm, deadline: Duration) -> Result<AgentClient> {
    let uds = vm
        .config()
        .vsock
        .as_ref()
        .map(|v| v.uds_path.clone())
        .context("VM has no vsock")?;
    let start = Instant::now();
    loop {
        if let Some(reason) = vm.exit_reason() {
            bail!("the VM ended before its agent answered: {reason}");
        }
        if start.elapsed() > deadline {
            bail!("agent not ready after {deadline:?}");
        }
        if let Ok(stream) = connect_hybrid_timeout(&uds, AGENT_PORT, Duration::from_secs(30)).await
        {
            let agent = AgentClient::from_stream(stream);
            let health = agent
                .health(
                    client::context(Duration::from_secs(30)),
                    &HealthRequest::new(),
                )
                .await;
            if let Ok(h) = health {
                if h.status.enum_value_or_default() == Status::SERVING {
                    return Ok(agent);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Prints a boot's phase durations (every VM boot in a test does).
pub fn print_phases(label: &str, vm: &Vm, agent_ready: Option<Duration>) {
    let t = vm.timings();
    println!(
        "[{label}] template={} vmm-setup={} kernel-to-init={} init-to-agent={} agent-ready(total)={}",
        vm.cpu_template(),
        fmt_duration(t.to_first_instruction),
        fmt_duration(t.kernel_to_init),
        fmt_duration(t.init_to_agent),
        fmt_duration(agent_ready),
    );
}

/// What a VM can leave behind in this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessResources {
    /// Threads the VMM names `ember-*` (vCPUs, device workers).
    pub vmm_threads: Vec<String>,
    pub open_fds: usize,
    /// Mappings of guest memory (the memfd is named `ember-guest-ram`).
    pub guest_mappings: usize,
}

impl ProcessResources {
    pub fn snapshot() -> Self {
        let mut vmm_threads = Vec::new();
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for t in tasks.flatten() {
                if let Ok(comm) = std::fs::read_to_string(t.path().join("comm")) {
                    let comm = comm.trim().to_string();
                    if comm.starts_with("ember-") {
                        vmm_threads.push(comm);
                    }
                }
            }
        }
        vmm_threads.sort();
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count())
            .unwrap_or(0);
        let guest_mappings = std::fs::read_to_string("/proc/self/maps")
            .map(|m| m.lines().filter(|l| l.contains("ember-guest-ram")).count())
            .unwrap_or(0);
        Self {
            vmm_threads,
            open_fds,
            guest_mappings,
        }
    }
}

pub use ember_vmm::process_memory::{process_rss, rss_of};

/// The message of a caught panic (`catch_unwind`), for a case report.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}
pub mod containerd;
pub mod cri;
pub mod image;

/// Why an end-to-end VM test cannot run on this machine (no `/dev/kvm`, no
/// guest kernel or initrd built), or `None` when it can.
pub fn vm_prerequisites_missing() -> Option<String> {
    let kernel = std::env::var_os("EMBER_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/lib/ember/vmlinux".into());
    let initrd = std::env::var_os("EMBER_INITRD")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/lib/ember/initrd.img".into());
    let mut missing = Vec::new();
    if !std::path::Path::new("/dev/kvm").exists() {
        missing.push("/dev/kvm is absent".to_string());
    }
    for p in [kernel, initrd] {
        if !p.exists() {
            missing.push(format!(
                "{} is missing (deploy/build-kernel.sh, deploy/build-initrd.sh)",
                p.display()
            ));
        }
    }
    (!missing.is_empty()).then(|| missing.join("; "))
}
