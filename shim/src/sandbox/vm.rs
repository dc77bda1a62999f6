//! The VM boundary: what a sandbox needs from its pod's VM, and nothing
//! more, so that launch, death and teardown can be tested without KVM.
//!
//! A [`VmLauncher`] brings a VM up (restored from a template or booted
//! cold) with its agent answering; the [`PodVm`] it hands back is waited
//! for, stopped, and asked for its memory figures. The KVM implementation
//! is [`super::kvm`]; unit tests use a fake hypervisor (`fake_vm.rs`).
//! The shape follows Kata's `Hypervisor` trait (start, stop, wait) reduced
//! to what Ember's in-process VMM and its callers use.

use std::sync::Arc;

use async_trait::async_trait;
use ember_proto::client::AgentClient;
use ember_vmm::{ExitReason, VmConfig};

use super::boot::BootReport;
use crate::config::Config;

/// Brings up pod VMs.
#[async_trait]
pub trait VmLauncher: Send + Sync {
    /// Brings up the VM `vm` describes, waits until its agent answers and
    /// makes the guest the pod's own (clock, entropy, `hostname`). A
    /// failure leaves no VM behind.
    async fn launch(
        &self,
        config: &Config,
        vm: VmConfig,
        hostname: &str,
    ) -> anyhow::Result<LaunchedVm>;

    /// Whether the VM runs inside this process (its threads and guest
    /// memory are the shim's), so the shim must join the pod's host cgroup
    /// before launching for the VM to be charged there.
    fn runs_in_shim(&self) -> bool;
}

/// A launched VM whose agent answers.
pub struct LaunchedVm {
    pub vm: Arc<dyn PodVm>,
    /// A connection to the agent.
    pub agent: AgentClient,
    /// How long the boot phases took.
    pub boot: BootReport,
    /// One line on how the VM came up (restored, cold, timings), for the
    /// log.
    pub summary: String,
}

/// Guest memory of a VM, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestMemory {
    /// The guest's RAM size.
    pub size: u64,
    /// Host memory the guest's RAM uses: pages a booted VM touched, or
    /// pages a restored VM wrote (the others are shared with the template).
    pub host_bytes: u64,
}

/// A running pod VM.
#[async_trait]
pub trait PodVm: Send + Sync {
    /// Waits until the VM has ended and its resources are released, and
    /// says why: the guest's own end (reset, power off, panic, vCPU
    /// failure), or [`ExitReason::Stopped`] after [`PodVm::stop`].
    async fn wait(&self) -> ExitReason;

    /// Stops the VM if it still runs and waits until it is released;
    /// returns why it ended. Idempotent: later calls return at once.
    async fn stop(&self) -> ExitReason;

    /// Its guest memory figures; none once the VM is released.
    fn memory(&self) -> Option<GuestMemory>;
}
