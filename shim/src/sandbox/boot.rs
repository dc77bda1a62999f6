//! Boot a microVM and wait until its agent answers: the one path used both
//! by the shim (a pod's first container) and by `ember bench boot`, so the
//! benchmark measures exactly what a pod start costs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use ember_proto::agent::{
    health_response::Status, HealthRequest, SeedEntropyRequest, SetHostnameRequest, SetTimeRequest,
};
use ember_proto::client::{self, AgentClient};
use ember_proto::AGENT_VSOCK_PORT;
use ember_vmm::connect_hybrid_timeout;
use ember_vmm::timing::{fmt_duration, BootTimings};
use ember_vmm::{CpuTemplate, Vm, VmConfig};

/// How long one connection attempt to the agent may take. Until the
/// guest's vsock driver is up the device holds a CONNECT until the guest
/// answers, so this bounds one attempt, not the boot.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(15);
/// Deadline of the first Health call on a fresh connection.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between attempts while the guest boots.
const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// Random bytes given to the guest's entropy pool at boot.
const ENTROPY_BYTES: usize = 256;
/// Lines of the guest console quoted in a boot error.
const CONSOLE_TAIL_LINES: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("starting the VM: {0}")]
    Start(#[from] ember_vmm::VmError),
    #[error("the VM config has no vsock device")]
    NoVsock,
    #[error("the VM ended before its agent answered ({reason}){console}")]
    VmEnded { reason: String, console: String },
    #[error("the agent did not answer within {timeout:?}{console}")]
    Timeout { timeout: Duration, console: String },
}

/// How long each boot phase took.
#[derive(Debug, Clone, Copy)]
pub struct BootReport {
    pub cpu_template: CpuTemplate,
    /// From the VMM's marks: setup to first guest instruction, kernel to
    /// `/init`, `/init` to the agent's first console line.
    pub timings: BootTimings,
    /// From `Vm::start` to the agent answering Health.
    pub agent_ready: Duration,
}

impl std::fmt::Display for BootReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "template={} vmm-setup={} kernel-to-init={} init-to-agent={} agent-ready={}",
            self.cpu_template,
            fmt_duration(self.timings.to_first_instruction),
            fmt_duration(self.timings.kernel_to_init),
            fmt_duration(self.timings.init_to_agent),
            fmt_duration(Some(self.agent_ready)),
        )
    }
}

/// A VM whose agent answered.
pub struct BootedVm {
    pub vm: Vm,
    pub agent: AgentClient,
    pub report: BootReport,
}

fn host_random(n: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// The last lines of a console log, for error messages.
pub fn console_tail(path: Option<&Path>) -> String {
    let Some(path) = path else {
        return String::new();
    };
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..];
    if tail.is_empty() {
        return format!("; the guest console ({}) is empty", path.display());
    }
    format!(
        "; last guest console lines ({}):\n{}",
        path.display(),
        tail.join("\n")
    )
}

/// Starts a VM, waits (at most `timeout`) for its agent to answer Health,
/// and sets the guest clock and seeds its entropy. On failure the VM is
/// torn down.
pub async fn boot_vm(config: VmConfig, timeout: Duration) -> Result<BootedVm, BootError> {
    let booted = start_vm(config, timeout).await?;
    for e in personalize(&booted.agent, None).await {
        tracing::warn!("{e:#}");
    }
    Ok(booted)
}

/// Starts a VM and waits (at most `timeout`) for its agent to answer
/// Health; nothing more. On failure the VM is torn down.
pub async fn start_vm(config: VmConfig, timeout: Duration) -> Result<BootedVm, BootError> {
    let uds = vsock_path(&config)?;
    let console = config.console_log.clone();
    let started = Instant::now();
    let vm = Vm::start(config).await?;
    let (vm, agent) = await_agent(vm, &uds, console.as_deref(), started, timeout).await?;
    let report = BootReport {
        cpu_template: vm.cpu_template(),
        timings: vm.timings(),
        agent_ready: started.elapsed(),
    };
    Ok(BootedVm { vm, agent, report })
}

/// The host end of the VM's vsock device.
pub(crate) fn vsock_path(config: &VmConfig) -> Result<PathBuf, BootError> {
    config
        .vsock
        .as_ref()
        .map(|v| v.uds_path.clone())
        .ok_or(BootError::NoVsock)
}

/// Waits until the agent of a started (or restored) VM answers Health,
/// `timeout` after `started` at most. On failure the VM is torn down and
/// the error quotes the end of the guest console.
pub(crate) async fn await_agent(
    vm: Vm,
    uds: &Path,
    console: Option<&Path>,
    started: Instant,
    timeout: Duration,
) -> Result<(Vm, AgentClient), BootError> {
    // Retry while the guest boots. The VM is checked between attempts
    // rather than awaited; an attempt is bounded, so an ended VM is
    // noticed within one attempt.
    let deadline = started + timeout;
    let mut attempts = 0u32;
    loop {
        let end = match vm.exit_reason() {
            Some(reason) => Some(Some(reason.to_string())),
            None if Instant::now() >= deadline => Some(None),
            None => None,
        };
        if let Some(end) = end {
            let console = console_tail(console);
            vm.shutdown().await;
            return Err(match end {
                Some(reason) => BootError::VmEnded { reason, console },
                None => BootError::Timeout { timeout, console },
            });
        }
        attempts += 1;
        let attempt = CONNECT_ATTEMPT.min(deadline.saturating_duration_since(Instant::now()));
        if let Some(agent) = try_agent(uds, attempt).await {
            tracing::debug!(attempts, "agent is serving");
            return Ok((vm, agent));
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// Makes the guest this pod's own: the host's clock (the guest has no
/// trustworthy one, and a restored guest's stops at the snapshot), fresh
/// entropy with a CRNG reseed (without it `getrandom()` can block early
/// on, and guests restored from one template would share their random
/// stream), and the hostname if given. Returns what failed.
pub async fn personalize(agent: &AgentClient, hostname: Option<&str>) -> Vec<anyhow::Error> {
    let mut errors = Vec::new();
    let mut req = SetTimeRequest::new();
    req.time = Some(ember_proto::time::to_timestamp(SystemTime::now())).into();
    if let Err(e) = agent
        .set_time(client::context(client::DEFAULT_TIMEOUT), &req)
        .await
    {
        errors.push(anyhow::anyhow!("setting the guest clock: {e}"));
    }
    match host_random(ENTROPY_BYTES) {
        Ok(data) => {
            let mut req = SeedEntropyRequest::new();
            req.data = data;
            req.credit = true;
            if let Err(e) = agent
                .seed_entropy(client::context(client::DEFAULT_TIMEOUT), &req)
                .await
            {
                errors.push(anyhow::anyhow!("seeding the guest's entropy: {e}"));
            }
        }
        Err(e) => errors.push(anyhow::anyhow!("reading host randomness: {e}")),
    }
    if let Some(name) = hostname {
        let mut req = SetHostnameRequest::new();
        req.hostname = name.to_string();
        if let Err(e) = agent
            .set_hostname(client::context(client::DEFAULT_TIMEOUT), &req)
            .await
        {
            errors.push(anyhow::anyhow!("setting the guest hostname {name:?}: {e}"));
        }
    }
    errors
}

/// The guest hostname of a pod: its id with anything but ASCII letters,
/// digits, `-` and `.` replaced by `-`, at most 63 bytes.
pub fn pod_hostname(pod: &str) -> String {
    let name: String = pod
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let name = name.trim_matches(|c| c == '-' || c == '.');
    if name.is_empty() {
        "ember".into()
    } else {
        name.to_string()
    }
}

/// One attempt to reach the agent: connect through the hybrid vsock and
/// ask Health. `Some` once it answers SERVING.
async fn try_agent(uds: &Path, attempt: Duration) -> Option<AgentClient> {
    match connect_hybrid_timeout(uds, AGENT_VSOCK_PORT, attempt).await {
        Ok(stream) => {
            let agent = AgentClient::from_stream(stream);
            match agent
                .health(client::context(HEALTH_TIMEOUT), &HealthRequest::new())
                .await
            {
                Ok(h) if h.status.enum_value_or_default() == Status::SERVING => Some(agent),
                Ok(h) => {
                    tracing::debug!(status = ?h.status, "agent not serving yet");
                    None
                }
                Err(e) => {
                    tracing::debug!("agent health: {e}");
                    None
                }
            }
        }
        Err(e) => {
            tracing::trace!("agent not reachable yet: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_tail_quotes_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        let text: String = (0..40).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, text).unwrap();
        let t = console_tail(Some(&p));
        assert!(t.contains("line 39") && t.contains("line 25") && !t.contains("line 24\n"));
        assert_eq!(console_tail(None), "");
        assert_eq!(console_tail(Some(&dir.path().join("missing"))), "");
    }

    #[test]
    fn pod_hostnames_are_valid() {
        assert_eq!(pod_hostname("web-1"), "web-1");
        assert_eq!(pod_hostname("ns/pod_a"), "ns-pod-a");
        assert_eq!(pod_hostname("__"), "ember");
        assert_eq!(pod_hostname(&"a".repeat(80)).len(), 63);
    }
}
