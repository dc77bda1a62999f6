//! A pod's sandbox: one microVM, its agent, and the containers in it.
//!
//! - [`boot`]: start a VM and wait for its agent (shared with
//!   `ember bench boot`);
//! - [`agent`]: typed agent calls with deadlines;
//! - [`container`], [`process`]: the registry of containers and processes;
//! - [`monitor`]: VM supervision, death signal, agent health;
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
pub mod monitor;
pub mod oom;
pub mod paths;
pub mod process;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskIO, TaskPaused, TaskResumed,
    TaskStart,
};
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::types::mount::Mount as ContainerdMount;
use ember_proto::agent::*;
use ember_vmm::{FsShareConfig, VmConfig, VsockConfig};
use serde_json::Value;
use tokio::task::JoinHandle;

use self::agent::Agent;
use self::boot::BootReport;
use self::container::Container;
use self::monitor::{DeathSignal, VmHandle};
use self::oom::{OomTracker, OOM_GRACE};
use self::paths::SandboxPaths;
use self::process::{Exit, Process, Status, UNKNOWN_EXIT_STATUS};

/// Exit status recorded for an exec whose start failed (the shell's
/// "command could not be run").
const EXEC_START_FAILED_STATUS: u32 = 127;
use crate::annotations;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::events::{self, EventSink};
use crate::io::{ProcessIo, StdioPaths};
use crate::resources::mount::{self, MountRequest};
use crate::resources::network::PodNetwork;
use crate::resources::port_forward::{self, PortForwarder};
use crate::resources::rootfs;
use crate::resources::sizing::VmSize;
use crate::resources::spec::{self as ocispec, SharePaths, GUEST_SHARED_DIR};

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
    vm: Arc<VmHandle>,
    background: Mutex<Vec<JoinHandle<()>>>,
    /// The pod's CNI network, wired to the VM.
    network: Option<PodNetwork>,
    /// `kubectl port-forward`: listeners in the pod's network namespace.
    port_forward: Option<PortForwarder>,
}

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

/// Removes everything of a pod from the host: detaches the share's two
/// mounts (and with them everything mounted below them), removes the
/// directory (only if nothing is mounted below it any more), and the
/// socket if it lives elsewhere. Used at teardown and by `delete` after a
/// crash. Blocking. Returns what failed.
///
/// Only mounts exactly at `shared/` and `mounts/` are unmounted: paths
/// deeper down may run through directories the guest can write (a
/// container's rootfs), so they are never resolved here; a lazy detach of
/// the top takes them along.
pub fn cleanup_state(paths: &SandboxPaths) -> Vec<anyhow::Error> {
    let mut errors = mount::detach_all_at(&paths.shared);
    errors.extend(mount::detach_all_at(&paths.mounts));
    if let Err(e) = rootfs::remove_dir_if_unmounted(&paths.state_dir) {
        errors.push(e);
    }
    if paths.vsock_outside_state_dir() {
        if let Err(e) = std::fs::remove_file(&paths.vsock) {
            if e.kind() != std::io::ErrorKind::NotFound {
                errors.push(anyhow::Error::from(e).context("removing the vsock socket"));
            }
        }
    }
    // The namespace directory, if this was its last pod.
    if let Some(ns_dir) = paths.state_dir.parent() {
        let _ = std::fs::remove_dir(ns_dir);
    }
    errors
}

async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(anyhow::anyhow!("{what}: {e}")))
}

impl Sandbox {
    /// Boots the pod's VM and connects to its agent. Everything created on
    /// the way is undone on failure.
    pub async fn launch(
        config: Arc<Config>,
        events: EventSink,
        setup: SandboxSetup,
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
        let booted = match crate::templates::boot_or_restore(&config, vm_config, &hostname).await {
            Ok(launched) => {
                tracing::info!(pod = %setup.id, "pod VM ready: {}", launched.report);
                launched.booted
            }
            Err(e) => {
                let p = paths.clone();
                let _ = blocking("cleaning up", move || cleanup_state(&p)).await;
                return Err(Error::Internal(
                    anyhow::Error::from(e).context("booting the pod's VM"),
                ));
            }
        };

        let agent = Agent::new(booted.agent, config.agent_timeout());
        let death = DeathSignal::default();
        let stopping = Arc::new(AtomicBool::new(false));
        let vm = Arc::new(monitor::supervise(
            booted.vm,
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
            boot: booted.report,
            agent,
            events,
            containers: RwLock::new(HashMap::new()),
            oom: Arc::new(OomTracker::default()),
            death,
            stopping,
            vm,
            background: Mutex::new(Vec::new()),
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

    fn start_background(self: &Arc<Self>) {
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

    /// Why the VM is unusable, if it is.
    pub fn dead(&self) -> Option<String> {
        self.death.reason()
    }

    /// Tests: declares the VM dead, as its supervisor would.
    #[cfg(test)]
    pub(crate) fn declare_dead(&self, reason: &str) {
        self.death.declare(reason);
    }

    /// Waits until the VM is unusable (it ended, or its agent is gone) and
    /// says why; a VM the shim stops itself never gets here.
    pub async fn wait_dead(&self) -> String {
        self.death.wait().await
    }

    fn ensure_alive(&self) -> Result<()> {
        match self.death.reason() {
            Some(r) => Err(Error::precondition(format!(
                "{r}; delete the pod's containers"
            ))),
            None => Ok(()),
        }
    }

    pub fn containers(&self) -> Vec<Arc<Container>> {
        let c = self.containers.read().unwrap_or_else(|p| p.into_inner());
        c.values().cloned().collect()
    }

    pub fn container_count(&self) -> usize {
        self.containers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    pub fn has_container(&self, id: &str) -> bool {
        self.containers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
    }

    pub fn container(&self, id: &str) -> Result<Arc<Container>> {
        self.containers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("container {id} does not exist")))
    }

    pub fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>> {
        self.container(id)?.process(exec_id)
    }

    // ---- create ----

    pub async fn create_container(self: &Arc<Self>, new: NewContainer) -> Result<Arc<Container>> {
        self.ensure_alive()?;
        if self.has_container(&new.id) {
            return Err(Error::AlreadyExists(format!(
                "container {} already exists",
                new.id
            )));
        }
        let id = new.id.clone();
        let ann = annotations::of_spec(&new.spec);
        match port_forward::ports_of_annotations(&ann) {
            Ok(ports) => self.forward_ports(&ports).await,
            Err(e) => tracing::warn!("container {id}: {e}; no port forwarding for it"),
        }
        // A CRI container joins its sandbox container's namespaces; under
        // containerd's Sandbox API there is no sandbox container: the VM is
        // the sandbox, and its namespaces are the guest's own.
        let sandbox_pid = match ann
            .get(annotations::CRI_SANDBOX_ID)
            .filter(|sid| **sid != id)
        {
            Some(sid) => match self.container(sid) {
                Ok(c) => Some(c.init.pid()).filter(|pid| *pid != 0),
                Err(_) if *sid == self.id => Some(ocispec::GUEST_INIT_PID),
                Err(_) => None,
            },
            None => None,
        };
        let guest = ocispec::rewrite(&new.spec, &id, &new.bundle, &self.share, sandbox_pid)?;
        let rootfs_dir = rootfs::bundle_rootfs(&new.bundle, new.spec["root"]["path"].as_str());

        let (cid, share, mounts, binds) = (
            id.clone(),
            self.share.clone(),
            new.rootfs.clone(),
            guest.binds.clone(),
        );
        let mut prepared = blocking("preparing the rootfs", move || {
            rootfs::prepare(&cid, &rootfs_dir, &mounts, &share, &binds)
        })
        .await?
        .map_err(|e| Error::Internal(e.context(format!("preparing the rootfs of {id}"))))?;

        let undo_host = |mut prepared: rootfs::PreparedContainer| async move {
            let _ = blocking("undoing the rootfs", move || {
                for e in rootfs::cleanup(&mut prepared) {
                    tracing::warn!("{e:#}");
                }
            })
            .await;
        };

        let mut req = CreateContainerRequest::new();
        req.container_id = id.clone();
        req.oci_spec = serde_json::to_vec(&guest.spec)
            .map_err(|e| Error::Internal(anyhow::Error::from(e).context("encoding the spec")))?;
        req.rootfs
            .push(rootfs::guest_rootfs_mount(&self.share, &id));
        req.stdio = MessageField::some(new.stdio.request());
        let started = Instant::now();
        let resp = match self.agent.create_container(&req).await {
            Ok(r) => r,
            Err(e) => {
                undo_host(std::mem::take(&mut prepared)).await;
                return Err(e);
            }
        };

        let init = Arc::new(Process::new(&id, "", new.stdio.clone(), None));
        init.set_pid(resp.pid);
        match ProcessIo::connect(
            &self.paths.vsock,
            &new.stdio,
            resp.stdio_ports.get_or_default(),
            self.agent.timeout(),
            id.clone(),
        )
        .await
        {
            Ok(io) => init.attach_io(io),
            Err(e) => {
                // The guest has the container but we cannot talk to its
                // stdio: take it down again.
                let _ = self.signal(&id, "", SIGKILL, true).await;
                let mut rm = RemoveContainerRequest::new();
                rm.container_id = id.clone();
                let _ = self.agent.remove_container(&rm).await;
                undo_host(std::mem::take(&mut prepared)).await;
                return Err(e);
            }
        }
        tracing::info!(container = %id, pid = resp.pid, took = ?started.elapsed(), "container created");

        let container = Arc::new(Container::new(
            &id,
            new.bundle.clone(),
            new.rootfs.clone(),
            init.clone(),
            prepared,
        ));
        self.containers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), container.clone());
        self.oom.track(&id);

        self.events
            .publish(TaskCreate {
                container_id: id.clone(),
                bundle: new.bundle.display().to_string(),
                rootfs: new
                    .rootfs
                    .iter()
                    .map(|m| ContainerdMount {
                        type_: m.fstype.clone(),
                        source: m.source.clone(),
                        options: m.options.clone(),
                        ..Default::default()
                    })
                    .collect(),
                io: MessageField::some(TaskIO {
                    stdin: new.stdio.stdin.clone(),
                    stdout: new.stdio.stdout.clone(),
                    stderr: new.stdio.stderr.clone(),
                    terminal: new.stdio.terminal,
                    ..Default::default()
                }),
                pid: resp.pid,
                ..Default::default()
            })
            .await;
        Ok(container)
    }

    // ---- start, exec ----

    /// Starts a container's init (`exec_id` empty) or an exec; returns the
    /// guest pid.
    pub async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32> {
        self.ensure_alive()?;
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        match p.status() {
            Status::Created => {}
            Status::Stopped => {
                return Err(Error::precondition(format!(
                    "process {} has already exited",
                    p.label()
                )))
            }
            _ => {
                return Err(Error::precondition(format!(
                    "process {} is already started",
                    p.label()
                )))
            }
        }
        if p.is_init() {
            let mut req = StartContainerRequest::new();
            req.container_id = id.to_string();
            let resp = self.agent.start_container(&req).await?;
            p.set_running(resp.pid);
            self.events
                .publish(TaskStart {
                    container_id: id.to_string(),
                    pid: p.pid(),
                    ..Default::default()
                })
                .await;
        } else {
            if c.init.status() == Status::Stopped {
                return Err(Error::precondition(format!(
                    "cannot start exec {exec_id}: container {id} has stopped"
                )));
            }
            let mut req = ExecProcessRequest::new();
            req.container_id = id.to_string();
            req.exec_id = exec_id.to_string();
            req.process = p.spec.clone().unwrap_or_default();
            req.stdio = MessageField::some(p.stdio.request());
            let resp = match self.agent.exec_process(&req).await {
                Ok(resp) => resp,
                Err(e) => {
                    // An exec that never started has ended as far as
                    // containerd is concerned: its Wait and Delete must
                    // return at once (runc's shim closes its wait block
                    // the same way). 127: the command could not be run.
                    p.record_exit(Exit {
                        status: EXEC_START_FAILED_STATUS,
                        at: SystemTime::now(),
                    });
                    return Err(e);
                }
            };
            p.set_pid(resp.pid);
            let io = ProcessIo::connect(
                &self.paths.vsock,
                &p.stdio,
                resp.stdio_ports.get_or_default(),
                self.agent.timeout(),
                p.label(),
            )
            .await;
            p.set_running(resp.pid);
            match io {
                Ok(io) => p.attach_io(io),
                Err(e) => {
                    // Running without stdio is not what was asked for.
                    p.set_sigkill(true);
                    let _ = self.signal(id, exec_id, SIGKILL, false).await;
                    self.spawn_waiter(p.clone());
                    return Err(e);
                }
            }
            self.events
                .publish(TaskExecStarted {
                    container_id: id.to_string(),
                    exec_id: exec_id.to_string(),
                    pid: p.pid(),
                    ..Default::default()
                })
                .await;
        }
        tracing::info!(process = %p.label(), pid = p.pid(), "started");
        self.spawn_waiter(p.clone());
        Ok(p.pid())
    }

    /// Registers an exec; it runs at `start`.
    pub async fn add_exec(
        &self,
        id: &str,
        exec_id: &str,
        stdio: StdioPaths,
        spec: Vec<u8>,
    ) -> Result<()> {
        self.ensure_alive()?;
        let c = self.container(id)?;
        c.add_exec(Arc::new(Process::new(id, exec_id, stdio, Some(spec))))?;
        self.events
            .publish(TaskExecAdded {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                ..Default::default()
            })
            .await;
        Ok(())
    }

    // ---- exits ----

    fn spawn_waiter(self: &Arc<Self>, p: Arc<Process>) {
        if !p.claim_waiter() {
            return;
        }
        let sb = self.clone();
        tokio::spawn(async move { sb.watch_exit(p).await });
    }

    /// Waits for a process' exit, its output, and (for a SIGKILL nobody
    /// here sent) a possible OOM event, then records and publishes it.
    async fn watch_exit(self: Arc<Self>, p: Arc<Process>) {
        let waited = tokio::select! {
            r = self.agent.wait_process(&p.container_id, &p.exec_id) => r.map_err(|e| e.to_string()),
            reason = self.death.wait() => Err(reason),
        };
        let (exit, vm_alive) = match waited {
            Ok(r) => (
                Exit {
                    status: r.exit_status,
                    at: r
                        .exited_at
                        .as_ref()
                        .and_then(ember_proto::time::from_timestamp)
                        .unwrap_or_else(SystemTime::now),
                },
                true,
            ),
            Err(why) => {
                let alive = self.death.reason().is_none();
                if alive {
                    tracing::error!(process = %p.label(), "waiting for the exit failed: {why}; reporting status {UNKNOWN_EXIT_STATUS}");
                } else {
                    tracing::warn!(process = %p.label(), "{why}");
                }
                (unknown_exit(), alive)
            }
        };
        if let Some(out) = p.take_outputs() {
            out.wait((!vm_alive).then_some(DEAD_VM_OUTPUT)).await;
        }
        p.stop_stdin();
        if exit.status == 128 + SIGKILL && vm_alive && !p.killed_by_us() {
            let oom = self.oom.wait_for(&p.container_id, OOM_GRACE).await;
            tracing::debug!(process = %p.label(), oom, "exit by SIGKILL");
        }
        self.finish(&p, exit).await;
    }

    async fn finish(&self, p: &Process, exit: Exit) {
        if p.record_exit(exit) {
            tracing::info!(process = %p.label(), pid = p.pid(), status = exit.status, "exited");
            self.events
                .publish(events::task_exit(
                    &p.container_id,
                    p.event_id(),
                    p.pid(),
                    exit.status,
                    exit.at,
                ))
                .await;
        }
    }

    // ---- signals ----

    async fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let mut req = SignalProcessRequest::new();
        req.container_id = id.to_string();
        req.exec_id = exec_id.to_string();
        req.signal = signal;
        req.all = all;
        self.agent.signal_process(&req).await.map(|_| ())
    }

    /// Kill, as runc's shim answers it: a process that has exited is
    /// NOT_FOUND "process already finished".
    pub async fn kill(
        self: &Arc<Self>,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        if p.status() == Status::Stopped || self.death.reason().is_some() {
            return Err(Error::not_found("process already finished"));
        }
        // Noted before sending: the exit can be reported before the
        // agent's answer to the signal arrives.
        let targets: Vec<Arc<Process>> = if all && p.is_init() {
            std::iter::once(p.clone()).chain(c.all_execs()).collect()
        } else {
            vec![p.clone()]
        };
        if signal == SIGKILL {
            for t in &targets {
                t.set_sigkill(true);
            }
        }
        let sent = self.signal(id, exec_id, signal, all).await;
        if sent.is_err() && signal == SIGKILL {
            for t in &targets {
                t.set_sigkill(false);
            }
        }
        match sent {
            Ok(()) => {}
            Err(Error::Agent {
                code: ttrpc::Code::NOT_FOUND,
                ..
            }) => return Err(Error::not_found("process already finished")),
            Err(e) => return Err(e),
        }
        // A created (never started) process dies too: watch for it.
        if p.status() == Status::Created {
            self.spawn_waiter(p);
        }
        Ok(())
    }

    // ---- delete ----

    /// Deletes an exec; returns its pid and exit.
    pub fn delete_exec(&self, id: &str, exec_id: &str) -> Result<(u32, Exit)> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        if matches!(p.status(), Status::Running | Status::Paused) {
            return Err(Error::precondition("cannot delete a running process"));
        }
        c.remove_exec(exec_id);
        p.stop_stdin();
        let exit = p.exit().unwrap_or(Exit {
            status: 0,
            at: SystemTime::UNIX_EPOCH,
        });
        Ok((p.pid(), exit))
    }

    /// Deletes a container whose init has exited (or never started): the
    /// guest side, then the host mounts. Never fails because of the guest:
    /// a dead VM, or an agent that cannot remove the container, must not
    /// keep containerd from deleting the task.
    pub async fn delete_container(self: &Arc<Self>, id: &str) -> Result<(u32, Exit)> {
        let c = self.container(id)?;
        let p = c.init.clone();
        match p.status() {
            Status::Running | Status::Paused => {
                return Err(Error::precondition("cannot delete a running task"))
            }
            Status::Created => self.kill_created(&p).await,
            Status::Stopped => {}
        }
        let alive = self.death.reason().is_none();
        for x in c.all_execs() {
            if x.status() != Status::Stopped && x.has_waiter() && alive {
                let _ = tokio::time::timeout(EXEC_EXIT_GRACE, x.wait()).await;
            }
            x.stop_stdin();
        }
        p.stop_stdin();
        if alive {
            self.remove_in_guest(id).await;
        }

        if let Some(mut prepared) = c.take_prepared() {
            let label = id.to_string();
            let errors = blocking("removing the rootfs", move || {
                rootfs::cleanup(&mut prepared)
            })
            .await?;
            for e in errors {
                tracing::warn!(container = %label, "host cleanup: {e:#}");
            }
        }
        self.containers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.oom.forget(id);

        let exit = p.exit().unwrap_or_else(unknown_exit);
        self.events
            .publish(TaskDelete {
                container_id: id.to_string(),
                id: id.to_string(),
                pid: p.pid(),
                exit_status: exit.status,
                exited_at: MessageField::some(events::timestamp(exit.at)),
                ..Default::default()
            })
            .await;
        tracing::info!(container = %id, "container deleted");
        Ok((p.pid(), exit))
    }

    /// Kills a created-but-never-started init and waits for its exit.
    async fn kill_created(self: &Arc<Self>, p: &Arc<Process>) {
        if self.death.reason().is_none() {
            match self.signal(&p.container_id, "", SIGKILL, true).await {
                Ok(()) => {
                    p.set_sigkill(true);
                    self.spawn_waiter(p.clone());
                    if tokio::time::timeout(self.agent.timeout(), p.wait())
                        .await
                        .is_ok()
                    {
                        return;
                    }
                    tracing::warn!(process = %p.label(), "no exit after SIGKILL");
                }
                Err(e) => tracing::warn!(process = %p.label(), "killing the created process: {e}"),
            }
        }
        self.finish(p, unknown_exit()).await;
    }

    async fn remove_in_guest(&self, id: &str) {
        let mut req = RemoveContainerRequest::new();
        req.container_id = id.to_string();
        let mut r = self.agent.remove_container(&req).await;
        if let Err(Error::Agent {
            code: ttrpc::Code::FAILED_PRECONDITION,
            ..
        }) = &r
        {
            // Something still runs in the container: kill it all, retry.
            let _ = self.signal(id, "", SIGKILL, true).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            r = self.agent.remove_container(&req).await;
        }
        if let Err(e) = r {
            tracing::warn!(container = %id, "removing the container in the guest: {e} (its leftovers go with the VM)");
        }
    }

    // ---- the rest of the task API ----

    pub async fn pause(&self, id: &str) -> Result<()> {
        self.ensure_alive()?;
        let p = self.container(id)?.init.clone();
        if p.status() != Status::Running {
            return Err(Error::precondition(format!(
                "container {id} is not running"
            )));
        }
        let mut req = PauseContainerRequest::new();
        req.container_id = id.to_string();
        self.agent.pause_container(&req).await?;
        if p.set_paused(true) {
            self.events
                .publish(TaskPaused {
                    container_id: id.to_string(),
                    ..Default::default()
                })
                .await;
        }
        Ok(())
    }

    pub async fn resume(&self, id: &str) -> Result<()> {
        self.ensure_alive()?;
        let p = self.container(id)?.init.clone();
        if p.status() != Status::Paused {
            return Err(Error::precondition(format!("container {id} is not paused")));
        }
        let mut req = ResumeContainerRequest::new();
        req.container_id = id.to_string();
        self.agent.resume_container(&req).await?;
        if p.set_paused(false) {
            self.events
                .publish(TaskResumed {
                    container_id: id.to_string(),
                    ..Default::default()
                })
                .await;
        }
        Ok(())
    }

    /// Guest pids of the container's processes, with the exec id of those
    /// that are execs.
    pub async fn pids(&self, id: &str) -> Result<Vec<(u32, Option<String>)>> {
        self.ensure_alive()?;
        let c = self.container(id)?;
        let mut req = ListProcessesRequest::new();
        req.container_id = id.to_string();
        let resp = self.agent.list_processes(&req).await?;
        let execs: HashMap<u32, String> = c
            .all_execs()
            .into_iter()
            .filter(|x| x.pid() != 0 && x.status() != Status::Stopped)
            .map(|x| (x.pid(), x.exec_id.clone()))
            .collect();
        Ok(resp
            .pids
            .into_iter()
            .map(|pid| (pid, execs.get(&pid).cloned()))
            .collect())
    }

    pub async fn stats(&self, id: &str) -> Result<StatsContainerResponse> {
        self.ensure_alive()?;
        self.container(id)?;
        let mut req = StatsContainerRequest::new();
        req.container_id = id.to_string();
        self.agent.stats_container(&req).await
    }

    /// `resources`: an OCI `linux.resources` object as JSON.
    pub async fn update(&self, id: &str, resources: Vec<u8>) -> Result<()> {
        self.ensure_alive()?;
        self.container(id)?;
        let mut req = UpdateContainerRequest::new();
        req.container_id = id.to_string();
        req.resources = resources;
        self.agent.update_container(&req).await.map(|_| ())
    }

    pub async fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        self.ensure_alive()?;
        let p = self.process(id, exec_id)?;
        if p.status() == Status::Stopped {
            return Err(Error::not_found("process already finished"));
        }
        let mut req = ResizePtyRequest::new();
        req.container_id = id.to_string();
        req.exec_id = exec_id.to_string();
        req.cols = width;
        req.rows = height;
        self.agent.resize_pty(&req).await.map(|_| ())
    }

    /// Closes a process' stdin. With a stdin stream, the stream is drained
    /// to EOF and half-closed (the guest sees EOF after the last byte; a
    /// CloseStdin call could overtake bytes still in flight); without one,
    /// the agent is asked to close it.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let p = self.process(id, exec_id)?;
        if let Some(fwd) = p.take_stdin() {
            fwd.close().await;
            return Ok(());
        }
        if p.status() == Status::Stopped || self.death.reason().is_some() {
            return Ok(());
        }
        let mut req = CloseStdinRequest::new();
        req.container_id = id.to_string();
        req.exec_id = exec_id.to_string();
        self.agent.close_stdin(&req).await.map(|_| ())
    }

    // ---- teardown ----

    /// Ends the pod: the guest powers off (agent Shutdown, then the VM is
    /// released), and everything on the host goes: mounts, state directory.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(pf) = &self.port_forward {
            pf.close();
        }
        let started = Instant::now();
        if self.death.reason().is_none() {
            match self.agent.shutdown(SHUTDOWN_CALL).await {
                Ok(_) => {
                    if !self.vm.wait_ended(POWEROFF_GRACE).await {
                        tracing::info!(
                            "the guest did not power off within {POWEROFF_GRACE:?}; stopping it"
                        );
                    }
                }
                Err(e) => tracing::info!("agent Shutdown: {e}; stopping the VM"),
            }
        }
        let reason = self.vm.stop().await;
        if let Some(net) = &self.network {
            net.disconnect().await;
        }
        for t in self
            .background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
        let paths = self.paths.clone();
        match blocking("removing the state directory", move || {
            cleanup_state(&paths)
        })
        .await
        {
            Ok(errors) => {
                for e in errors {
                    tracing::warn!("pod cleanup: {e:#}");
                }
            }
            Err(e) => tracing::warn!("pod cleanup: {e}"),
        }
        tracing::info!(pod = %self.id, took = ?started.elapsed(), "pod VM shut down ({reason})");
    }
}

/// Tests: a sandbox around an agent connection, without a VM.
#[cfg(test)]
impl Sandbox {
    pub(crate) fn for_tests(paths: SandboxPaths, agent: Agent, events: EventSink) -> Arc<Sandbox> {
        let sandbox = Arc::new(Sandbox {
            id: "test-pod".into(),
            share: SharePaths::new(paths.mounts.clone()),
            paths,
            boot: BootReport {
                cpu_template: ember_vmm::CpuTemplate::Auto,
                timings: Default::default(),
                agent_ready: Duration::ZERO,
            },
            agent,
            events,
            containers: RwLock::new(HashMap::new()),
            oom: Arc::new(OomTracker::default()),
            death: DeathSignal::default(),
            stopping: Arc::new(AtomicBool::new(false)),
            vm: Arc::new(VmHandle::detached()),
            background: Mutex::new(Vec::new()),
            network: None,
            port_forward: None,
        });
        sandbox.start_background();
        sandbox
    }
}

fn unknown_exit() -> Exit {
    Exit {
        status: UNKNOWN_EXIT_STATUS,
        at: SystemTime::now(),
    }
}

#[cfg(test)]
pub(crate) mod tests;
