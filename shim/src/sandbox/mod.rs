//! A pod's sandbox: one microVM, its agent, and the containers in it.
//!
//! `mod.rs` holds the [`Sandbox`] and its small types; its work is split
//! by responsibility:
//!
//! - `launch`: state directory, share, VM, network, background tasks;
//! - `containers`: create, delete, look up containers;
//! - `processes`: start, exec, exits, signals, stdin, terminal size;
//! - `operations`: pause, resume, pids, stats, update;
//! - `teardown`: shutdown, the host's cleanup.
//!
//! Beside them:
//!
//! - [`boot`]: start a VM and wait for its agent (shared with
//!   `ember bench boot`);
//! - [`agent`]: typed agent calls with deadlines;
//! - [`container`], [`process`]: the registry of containers and processes;
//! - [`vm`]: the VM boundary (launch, wait, stop, memory), with the KVM
//!   VMM behind it in [`kvm`];
//! - [`monitor`]: the VM's death signal, agent health;
//! - [`oom`]: the OOM event long poll;
//! - [`paths`]: the pod's state directory layout;
//! - [`crate::templates`] (not here): restore the VM from a template, or
//!   boot it cold.
//!
//! The sandbox owns the process lifecycle and publishes its events
//! (TaskCreate, TaskStart, TaskExecAdded, TaskExecStarted, TaskExit,
//! TaskOOM, TaskPaused, TaskResumed, TaskDelete), so their order follows
//! what actually happened.

pub mod agent;
pub mod boot;
pub mod container;
mod containers;
#[cfg(test)]
pub(crate) mod fake_vm;
pub mod kvm;
mod launch;
pub mod monitor;
pub mod oom;
mod operations;
pub mod paths;
pub mod process;
mod processes;
mod teardown;
pub mod vm;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::task::JoinHandle;

use self::agent::Agent;
use self::boot::BootReport;
use self::container::Container;
use self::monitor::DeathSignal;
use self::oom::OomTracker;
use self::paths::SandboxPaths;
use self::process::{Exit, UNKNOWN_EXIT_STATUS};
use self::vm::PodVm;
use crate::error::{Error, Result};
use crate::events::EventSink;
use crate::io::StdioPaths;
use crate::resources::mount::MountRequest;
use crate::resources::network::PodNetwork;
use crate::resources::port_forward::PortForwarder;
use crate::resources::sizing::VmSize;
use crate::resources::spec::SharePaths;

#[cfg(test)]
pub(crate) use self::launch::prepare_state_dir;
pub use self::launch::vm_config;
pub use self::teardown::cleanup_state;

/// Exit status recorded for an exec whose start failed (the shell's
/// "command could not be run").
const EXEC_START_FAILED_STATUS: u32 = 127;

/// The virtio-fs tag of the pod's share.
pub const SHARE_TAG: &str = "ember";
/// The guest's vsock CID. Every VM may use the same one: the vsock device
/// is this process' own, reached through a per-VM Unix socket (hybrid
/// vsock), not the host kernel's vhost-vsock, so CIDs never meet.
pub const GUEST_CID: u32 = 3;
/// SIGKILL.
const SIGKILL: u32 = 9;
/// How long the guest gets to power off after the agent's Shutdown.
const POWEROFF_GRACE: Duration = Duration::from_secs(10);
/// Deadline of the agent's Shutdown call.
const SHUTDOWN_CALL: Duration = Duration::from_secs(10);
/// How long output may still flow after the VM is gone.
const DEAD_VM_OUTPUT: Duration = Duration::from_secs(2);
/// How long deleting a container waits for its execs to exit (they die
/// with the container's init, as its pid namespace ends).
const EXEC_EXIT_GRACE: Duration = Duration::from_secs(10);

/// What the pod's VM is built from.
#[derive(Debug, Clone)]
pub struct SandboxSetup {
    pub namespace: String,
    pub id: String,
    pub size: VmSize,
    /// `io.ember.kernel_params`, if allowed and given.
    pub kernel_params: Option<String>,
    /// The pod's network namespace set up by CNI (the sandbox spec's
    /// network namespace path); none: the VM gets no network interface.
    pub netns: Option<PathBuf>,
    /// The guest's hostname (the CRI pod's, under the Sandbox API, where
    /// no pause container has a UTS namespace of its own); none: derived
    /// from the pod id.
    pub hostname: Option<String>,
}

/// A container to create.
#[derive(Debug, Clone)]
pub struct NewContainer {
    pub id: String,
    pub bundle: PathBuf,
    pub spec: Value,
    pub rootfs: Vec<MountRequest>,
    pub stdio: StdioPaths,
}

pub struct Sandbox {
    pub id: String,
    pub paths: SandboxPaths,
    pub share: SharePaths,
    pub boot: BootReport,
    agent: Agent,
    events: EventSink,
    containers: RwLock<HashMap<String, Arc<Container>>>,
    oom: Arc<OomTracker>,
    death: DeathSignal,
    stopping: Arc<AtomicBool>,
    vm: Arc<dyn PodVm>,
    background: Mutex<Vec<JoinHandle<()>>>,
    /// The pod's CNI network, wired to the VM.
    network: Option<PodNetwork>,
    /// `kubectl port-forward`: listeners in the pod's network namespace.
    port_forward: Option<PortForwarder>,
}

/// Runs blocking host work (mounts, directories) off the async threads.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(anyhow::anyhow!("{what}: {e}")))
}

impl Sandbox {
    /// Why the VM is unusable, if it is.
    pub fn dead(&self) -> Option<String> {
        self.death.reason()
    }

    /// Waits until the VM is unusable (it ended, or its agent is gone) and
    /// says why; a VM the shim stops itself, or that powers off at the
    /// shim's Shutdown, never gets here.
    pub async fn wait_dead(&self) -> String {
        self.death.wait_unexpected().await
    }

    fn ensure_alive(&self) -> Result<()> {
        match self.death.reason() {
            Some(r) => Err(Error::precondition(format!(
                "{r}; delete the pod's containers"
            ))),
            None => Ok(()),
        }
    }
}

/// The exit of a process whose real end is unknown (the VM or agent is
/// gone).
fn unknown_exit() -> Exit {
    Exit {
        status: UNKNOWN_EXIT_STATUS,
        at: SystemTime::now(),
    }
}

#[cfg(test)]
pub(crate) mod tests;
