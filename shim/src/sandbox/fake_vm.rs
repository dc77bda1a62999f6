//! A fake hypervisor for unit tests: it fakes the VM boundary
//! ([`super::vm`]) so that a sandbox's launch, death and teardown run
//! without KVM. A launch connects to an agent on a Unix socket (the tests'
//! mock agent) through a link the fake VM owns: when the VM ends, by
//! itself or stopped, the link is cut, as a real VM's end cuts every vsock
//! stream. The guest "ends on its own" when a test says so
//! ([`FakeVm::die`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use async_trait::async_trait;
use ember_proto::client::AgentClient;
use ember_vmm::{ExitReason, VmConfig};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::boot::BootReport;
use super::vm::{GuestMemory, LaunchedVm, PodVm, VmLauncher};
use crate::config::Config;

/// What happened to the fake VMs and their agent, in order.
pub(crate) type Journal = Arc<Mutex<Vec<String>>>;

pub(crate) fn note(journal: &Journal, what: impl Into<String>) {
    journal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(what.into());
}

/// A VM that runs until a test ends it or the sandbox stops it.
pub(crate) struct FakeVm {
    ended: watch::Sender<Option<ExitReason>>,
    stops: AtomicUsize,
    journal: Journal,
    /// The agent connection's link; aborted when the VM ends.
    link: Mutex<Option<JoinHandle<()>>>,
    /// The directory the VM's virtio-fs share would serve.
    shared_dir: Option<PathBuf>,
    /// Whether that directory still existed when the VM was stopped.
    share_at_stop: Mutex<Option<bool>>,
    mem_mib: u64,
}

impl FakeVm {
    fn end(&self, reason: ExitReason) {
        let recorded = self.ended.send_if_modified(|cur| {
            if cur.is_none() {
                *cur = Some(reason.clone());
                true
            } else {
                false
            }
        });
        if recorded {
            note(&self.journal, format!("vm ended: {reason}"));
        }
        self.cut_agent();
    }

    /// The guest ends on its own (reset, panic, vCPU failure).
    pub(crate) fn die(&self, reason: ExitReason) {
        self.end(reason);
    }

    /// The agent's connection breaks while the VM runs on.
    pub(crate) fn cut_agent(&self) {
        if let Some(link) = self.link.lock().unwrap_or_else(|p| p.into_inner()).take() {
            link.abort();
        }
    }

    /// How often the VM was asked to stop.
    pub(crate) fn stops(&self) -> usize {
        self.stops.load(Ordering::SeqCst)
    }

    /// Whether the pod's share still existed when the VM was stopped (none:
    /// never stopped).
    pub(crate) fn share_at_stop(&self) -> Option<bool> {
        *self.share_at_stop.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn has_ended(&self) -> bool {
        self.ended.borrow().is_some()
    }
}

#[async_trait]
impl PodVm for FakeVm {
    async fn wait(&self) -> ExitReason {
        let mut rx = self.ended.subscribe();
        let reason = rx.wait_for(Option::is_some).await.map(|r| r.clone());
        reason.ok().flatten().unwrap_or(ExitReason::Stopped)
    }

    async fn stop(&self) -> ExitReason {
        self.stops.fetch_add(1, Ordering::SeqCst);
        let share = self.shared_dir.as_ref().map(|d| d.is_dir());
        *self.share_at_stop.lock().unwrap_or_else(|p| p.into_inner()) = share;
        note(&self.journal, "vm stop");
        self.end(ExitReason::Stopped);
        self.wait().await
    }

    fn memory(&self) -> Option<GuestMemory> {
        if self.has_ended() {
            return None;
        }
        Some(GuestMemory {
            size: self.mem_mib << 20,
            host_bytes: 0,
        })
    }
}

/// Launches [`FakeVm`]s whose agent is the one listening on `agent_socket`.
pub(crate) struct FakeLauncher {
    agent_socket: PathBuf,
    pub(crate) journal: Journal,
    /// If set, every launch fails with this message (after the wait).
    pub(crate) fail: Mutex<Option<String>>,
    /// If set, a launch waits for a notification first (a slow boot).
    pub(crate) gate: Option<Arc<Notify>>,
    pub(crate) in_shim: bool,
    /// `/proc/self/cgroup` when the last launch began.
    cgroup_at_launch: Mutex<Option<String>>,
    launches: AtomicUsize,
    vms: Mutex<Vec<Arc<FakeVm>>>,
}

impl FakeLauncher {
    pub(crate) fn new(agent_socket: PathBuf, journal: Journal) -> Self {
        FakeLauncher {
            agent_socket,
            journal,
            fail: Mutex::new(None),
            gate: None,
            in_shim: false,
            cgroup_at_launch: Mutex::new(None),
            launches: AtomicUsize::new(0),
            vms: Mutex::new(Vec::new()),
        }
    }

    /// How many launches were asked for.
    pub(crate) fn launches(&self) -> usize {
        self.launches.load(Ordering::SeqCst)
    }

    /// The cgroups of this process when the last launch began.
    pub(crate) fn cgroup_at_launch(&self) -> Option<String> {
        self.cgroup_at_launch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The VM launched last.
    pub(crate) fn last_vm(&self) -> Option<Arc<FakeVm>> {
        self.vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .cloned()
    }
}

#[async_trait]
impl VmLauncher for FakeLauncher {
    async fn launch(
        &self,
        _config: &Config,
        vm: VmConfig,
        hostname: &str,
    ) -> anyhow::Result<LaunchedVm> {
        self.launches.fetch_add(1, Ordering::SeqCst);
        *self
            .cgroup_at_launch
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = std::fs::read_to_string("/proc/self/cgroup").ok();
        if let Some(gate) = &self.gate {
            gate.notified().await;
        }
        let failure = self.fail.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(message) = failure {
            note(&self.journal, "launch failed");
            anyhow::bail!("{message}");
        }
        let (client_end, link_end) = tokio::net::UnixStream::pair()?;
        let mut upstream = tokio::net::UnixStream::connect(&self.agent_socket)
            .await
            .with_context(|| format!("connecting to {}", self.agent_socket.display()))?;
        let link = tokio::spawn(async move {
            let mut link_end = link_end;
            let _ = tokio::io::copy_bidirectional(&mut link_end, &mut upstream).await;
        });
        let fake = Arc::new(FakeVm {
            ended: watch::channel(None).0,
            stops: AtomicUsize::new(0),
            journal: self.journal.clone(),
            link: Mutex::new(Some(link)),
            shared_dir: vm.fs_shares.first().map(|s| s.shared_dir.clone()),
            share_at_stop: Mutex::new(None),
            mem_mib: u64::from(vm.mem_mib),
        });
        self.vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(fake.clone());
        note(&self.journal, format!("vm launched: {hostname}"));
        Ok(LaunchedVm {
            vm: fake,
            agent: AgentClient::from_stream(client_end),
            boot: BootReport {
                cpu_template: ember_vmm::CpuTemplate::Auto,
                timings: Default::default(),
                agent_ready: std::time::Duration::ZERO,
            },
            summary: "fake VM".into(),
        })
    }

    fn runs_in_shim(&self) -> bool {
        self.in_shim
    }
}
