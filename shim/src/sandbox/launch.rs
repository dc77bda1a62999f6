//! Bringing a pod's sandbox up: its state directory and share, the VM
//! (from a template or cold), the share mounted in the guest, the pod's
//! network attached, port forwarding, and the background tasks that watch
//! the VM (OOM events, agent health, the VM's death).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context;
use ember_proto::agent::AddMountsRequest;
use ember_vmm::{FsShareConfig, VmConfig, VsockConfig};

use super::agent::Agent;
use super::monitor::{self, DeathSignal};
use super::oom::{self, OomTracker};
use super::paths::SandboxPaths;
use super::process::UNKNOWN_EXIT_STATUS;
use super::teardown::cleanup_state;
use super::vm::VmLauncher;
use super::{blocking, boot, unknown_exit, Sandbox, SandboxSetup, GUEST_CID, SHARE_TAG};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::events::EventSink;
use crate::resources::mount;
use crate::resources::network::PodNetwork;
use crate::resources::port_forward::{self, PortForwarder};
use crate::resources::spec::{self as ocispec, SharePaths, GUEST_SHARED_DIR};

/// The VM config of a pod.
pub fn vm_config(config: &Config, paths: &SandboxPaths, setup: &SandboxSetup) -> VmConfig {
    let mut vm = VmConfig::new(&config.kernel);
    vm.initrd = Some(config.initrd.clone());
    vm.vcpus = setup.size.vcpus;
    vm.mem_mib = setup.size.mem_mib;
    vm.cpu_template = config.cpu_template;
    vm.cmdline_extra = [
        config.kernel_params.as_str(),
        setup.kernel_params.as_deref().unwrap_or(""),
    ]
    .iter()
    .map(|s| s.trim())
    .filter(|s| !s.is_empty())
    .collect::<Vec<_>>()
    .join(" ");
    vm.vsock = Some(VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: paths.vsock.clone(),
    });
    vm.fs_shares = vec![FsShareConfig {
        tag: SHARE_TAG.into(),
        shared_dir: paths.shared.clone(),
        limits: config.fs_limits(),
    }];
    vm.console_log = Some(paths.console_log.clone());
    vm.console_log_max_bytes = config.console_log_max_bytes;
    vm
}

/// Creates the pod's state directory (cleaning what a crashed shim may
/// have left there) and the pod's share: the host-only tree `mounts/`, a
/// shared mount of its own, and `shared/`, its read-only slave view that
/// virtio-fs serves (see "The pod's share" in shim/README.md). Blocking.
pub(crate) fn prepare_state_dir(paths: &SandboxPaths) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if std::fs::symlink_metadata(&paths.state_dir).is_ok() {
        tracing::warn!(
            "{} exists (left by a crashed shim?); cleaning it",
            paths.state_dir.display()
        );
        for e in cleanup_state(paths) {
            tracing::warn!("{e:#}");
        }
    }
    for dir in [&paths.mounts, &paths.shared] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    if let Some(dir) = paths.vsock.parent() {
        // The socket reaches the guest agent: only root may connect, so its
        // directory (the pod's, or `<state_dir>/vsock` for long ids) is 0700
        // whatever the umask.
        use std::os::unix::fs::PermissionsExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let tree = mount::make_own_shared_mount(&paths.mounts)
        .context("making the pod's mount tree a shared mount")?;
    if let Err(e) = mount::read_only_view(&paths.mounts, &paths.shared) {
        let _ = mount::unmount(&tree);
        return Err(e.context("binding the pod's share read-only"));
    }
    Ok(())
}

impl Sandbox {
    /// Brings the pod's VM up with `launcher` and connects to its agent.
    /// Everything created on the way is undone on failure.
    pub async fn launch(
        config: Arc<Config>,
        events: EventSink,
        setup: SandboxSetup,
        launcher: &dyn VmLauncher,
    ) -> Result<Arc<Sandbox>> {
        ocispec::check_id("namespace", &setup.namespace)?;
        let paths = SandboxPaths::new(&config.state_dir, &setup.namespace, &setup.id);
        let p = paths.clone();
        blocking("preparing the state directory", move || {
            prepare_state_dir(&p)
        })
        .await?
        .map_err(|e| Error::Internal(e.context("preparing the pod's state directory")))?;

        // Read before booting: a namespace CNI left empty is refused at once.
        let network = match &setup.netns {
            Some(ns) => match PodNetwork::inspect(ns).await {
                Ok(n) => Some(n),
                Err(e) => {
                    let p = paths.clone();
                    let _ = blocking("cleaning up", move || cleanup_state(&p)).await;
                    return Err(Error::precondition(format!("pod network: {e}")));
                }
            },
            None => None,
        };
        let mut vm_config = vm_config(&config, &paths, &setup);
        vm_config.net = network.iter().flat_map(PodNetwork::net_configs).collect();
        tracing::info!(
            pod = %setup.id,
            vcpus = vm_config.vcpus,
            mem_mib = vm_config.mem_mib,
            state = %paths.state_dir.display(),
            "booting the pod's VM"
        );
        let hostname = setup
            .hostname
            .clone()
            .unwrap_or_else(|| boot::pod_hostname(&setup.id));
        let launched = match launcher.launch(&config, vm_config, &hostname).await {
            Ok(launched) => {
                tracing::info!(pod = %setup.id, "pod VM ready: {}", launched.summary);
                launched
            }
            Err(e) => {
                let p = paths.clone();
                let _ = blocking("cleaning up", move || cleanup_state(&p)).await;
                return Err(Error::Internal(e.context("booting the pod's VM")));
            }
        };

        let agent = Agent::new(launched.agent, config.agent_timeout());
        let death = DeathSignal::default();
        let stopping = Arc::new(AtomicBool::new(false));
        // From now on the VM's own end is the pod's death.
        let vm_watch = tokio::spawn(monitor::watch_vm(
            launched.vm.clone(),
            death.clone(),
            stopping.clone(),
            paths.console_log.display().to_string(),
        ));
        let port_forward = setup.netns.clone().map(|netns| {
            PortForwarder::new(
                netns,
                paths.vsock.clone(),
                port_forward::Limits {
                    max_connections: config.port_forward_max_connections as usize,
                    connect_timeout: port_forward::CONNECT_TIMEOUT,
                },
            )
        });
        let sandbox = Arc::new(Sandbox {
            id: setup.id.clone(),
            share: SharePaths::new(paths.mounts.clone()),
            paths,
            boot: launched.boot,
            agent,
            events,
            containers: RwLock::new(HashMap::new()),
            oom: Arc::new(OomTracker::default()),
            death,
            stopping,
            vm: launched.vm,
            background: Mutex::new(vec![vm_watch]),
            network,
            port_forward,
        });
        if let Err(e) = sandbox.mount_share().await {
            sandbox.shutdown().await;
            return Err(e);
        }
        if let Some(net) = &sandbox.network {
            if let Err(e) = net.attach(&sandbox.agent).await {
                sandbox.shutdown().await;
                return Err(e);
            }
        }
        sandbox.forward_ports(&config.port_forward_ports).await;
        sandbox.start_background();
        Ok(sandbox)
    }

    /// Listens for `kubectl port-forward` on `ports` (best effort: a port
    /// that cannot be listened on is logged, the pod runs on).
    pub async fn forward_ports(&self, ports: &[u16]) {
        if let (Some(pf), false) = (&self.port_forward, ports.is_empty()) {
            if let Err(e) = pf.add_ports(ports).await {
                tracing::warn!("port-forward: listening on {ports:?}: {e}");
            }
        }
    }

    /// Mounts the pod's virtio-fs share in the guest.
    async fn mount_share(&self) -> Result<()> {
        let mut m = ember_proto::agent::Mount::new();
        m.fstype = "virtiofs".into();
        m.source = SHARE_TAG.into();
        m.target = GUEST_SHARED_DIR.into();
        let mut req = AddMountsRequest::new();
        req.mounts.push(m);
        match self.agent.add_mounts(&req).await {
            Ok(_) => Ok(()),
            Err(Error::Agent { code, message, .. })
                if code == ttrpc::Code::UNIMPLEMENTED || code == ttrpc::Code::NOT_FOUND =>
            {
                // An agent without AddMounts cannot create containers
                // either; let CreateContainer report that.
                tracing::warn!("the agent cannot mount the pod's share yet: {message}");
                Ok(())
            }
            // The agent mounts the share by itself at boot when it can; a
            // second virtio-fs mount of the same tag is EBUSY.
            Err(Error::Agent { message, .. }) if message.contains("EBUSY") => {
                tracing::debug!("the pod's share is already mounted in the guest");
                Ok(())
            }
            Err(e) => Err(e.context(format!(
                "mounting the pod's virtio-fs share ({SHARE_TAG}) at {GUEST_SHARED_DIR} in the guest"
            ))),
        }
    }

    pub(super) fn start_background(self: &Arc<Self>) {
        let oom = tokio::spawn(oom::poll_oom_events(
            self.agent.clone(),
            self.oom.clone(),
            self.events.clone(),
        ));
        let health = tokio::spawn(monitor::watch_agent_health(
            self.agent.clone(),
            self.death.clone(),
            self.vm.clone(),
        ));
        // Processes nobody waits for (created, never started) get their
        // exit from here when the VM dies.
        let weak = Arc::downgrade(self);
        let death = self.death.clone();
        let reaper = tokio::spawn(async move {
            let reason = death.wait().await;
            if let Some(sb) = weak.upgrade() {
                sb.on_death(&reason).await;
            }
        });
        let mut bg = self.background.lock().unwrap_or_else(|p| p.into_inner());
        bg.extend([oom, health, reaper]);
    }

    async fn on_death(&self, reason: &str) {
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        tracing::error!(pod = %self.id, "{reason}; every task of the pod exits with status {UNKNOWN_EXIT_STATUS}");
        for c in self.containers() {
            for p in std::iter::once(c.init.clone()).chain(c.all_execs()) {
                if !p.has_waiter() {
                    self.finish(&p, unknown_exit()).await;
                }
            }
        }
    }
}
