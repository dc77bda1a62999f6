//! The pod this shim serves: its sandbox is booted by the first create and
//! torn down after the last delete.
//!
//! Boot and teardown are serialized by one lock, so a create that arrives
//! while the previous VM is being torn down waits and boots a fresh one.
//! Ids being created are reserved first, so a concurrent delete of the last
//! other container does not tear the VM down under a create.
//!
//! A create can outlive its caller: kubelet gives RunPodSandbox two
//! minutes, a VM boot on a slow host may take longer, and containerd then
//! gives up. Its cleanup sends Delete for the id being created (then
//! Shutdown). Such a create is *abandoned*: it finishes the step it is in,
//! undoes what it made (the container, the VM if nothing else uses it) and
//! fails; if that leaves the pod empty, the shim exits, as the Shutdown
//! containerd already sent asked.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::events::EventSink;
use crate::resources::cgroup::{self, HostCgroup};
use crate::resources::hooks::PodHooks;
use crate::sandbox::container::Container;
use crate::sandbox::kvm::KvmLauncher;
use crate::sandbox::vm::VmLauncher;
use crate::sandbox::{NewContainer, Sandbox, SandboxSetup};
use containerd_shim::ExitSignal;

pub struct Pod {
    pub namespace: String,
    pub id: String,
    config: Arc<Config>,
    events: EventSink,
    slot: Mutex<Slot>,
    lifecycle: tokio::sync::Mutex<()>,
    exit: Arc<ExitSignal>,
    /// Brings the pod's VM up: KVM, or a fake hypervisor in unit tests.
    launcher: Arc<dyn VmLauncher>,
    /// The host cgroup joined while a VM runs (only for a launcher whose
    /// VM runs in the shim).
    host_cgroup: Mutex<Option<HostCgroup>>,
    /// The containers' OCI hooks, run on the host.
    pub hooks: PodHooks,
}

#[derive(Default)]
struct Slot {
    sandbox: Option<Arc<Sandbox>>,
    /// containerd's Sandbox API holds the VM (CreateSandbox to
    /// StopSandbox): it stays while no container is in it.
    held: bool,
    reserved: HashSet<String>,
    /// Reserved ids whose caller gave up (see the module docs).
    abandoned: HashSet<String>,
}

/// Releases a reserved id when the create ends, however it ends.
struct Reservation<'a> {
    pod: &'a Pod,
    id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut slot = self.pod.slot();
        slot.reserved.remove(&self.id);
        slot.abandoned.remove(&self.id);
    }
}

impl Pod {
    /// A pod whose VM runs on KVM. `exit` ends the shim; the pod fires it
    /// itself only after undoing an abandoned create (otherwise the task
    /// service's Shutdown does).
    pub fn new(
        namespace: &str,
        id: &str,
        config: Arc<Config>,
        events: EventSink,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Self::with_launcher(namespace, id, config, events, exit, Arc::new(KvmLauncher))
    }

    /// A pod whose VMs come from `launcher`.
    pub fn with_launcher(
        namespace: &str,
        id: &str,
        config: Arc<Config>,
        events: EventSink,
        exit: Arc<ExitSignal>,
        launcher: Arc<dyn VmLauncher>,
    ) -> Self {
        Pod {
            namespace: namespace.to_string(),
            id: id.to_string(),
            config,
            events,
            slot: Mutex::new(Slot::default()),
            lifecycle: tokio::sync::Mutex::new(()),
            exit,
            launcher,
            host_cgroup: Mutex::new(None),
            hooks: PodHooks::default(),
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    pub fn sandbox(&self) -> Option<Arc<Sandbox>> {
        self.slot().sandbox.clone()
    }

    /// The sandbox holding container `id`.
    pub fn find(&self, id: &str) -> Result<Arc<Sandbox>> {
        match self.sandbox() {
            Some(sb) if sb.has_container(id) => Ok(sb),
            _ => Err(Error::not_found(format!("container {id} does not exist"))),
        }
    }

    /// The sandbox and container `id`.
    pub fn container(&self, id: &str) -> Result<(Arc<Sandbox>, Arc<Container>)> {
        let sb = self.find(id)?;
        let c = sb.container(id)?;
        Ok((sb, c))
    }

    fn reserve(&self, id: &str) -> Result<Reservation<'_>> {
        let mut slot = self.slot();
        let exists = slot.reserved.contains(id)
            || slot.sandbox.as_ref().is_some_and(|s| s.has_container(id));
        if exists {
            return Err(Error::AlreadyExists(format!(
                "container {id} already exists"
            )));
        }
        slot.reserved.insert(id.to_string());
        Ok(Reservation {
            pod: self,
            id: id.to_string(),
        })
    }

    /// Whether container `id` is being created right now.
    pub fn is_being_created(&self, id: &str) -> bool {
        self.slot().reserved.contains(id)
    }

    /// Marks the create of `id` as abandoned by its caller; `false` if no
    /// create of `id` is in progress.
    pub fn abandon(&self, id: &str) -> bool {
        let mut slot = self.slot();
        if !slot.reserved.contains(id) {
            return false;
        }
        slot.abandoned.insert(id.to_string());
        true
    }

    fn is_abandoned(&self, id: &str) -> bool {
        self.slot().abandoned.contains(id)
    }

    fn abandoned_error(id: &str) -> Error {
        Error::precondition(format!(
            "the create of {id} was abandoned by containerd (its caller gave up) and has been undone"
        ))
    }

    /// Creates a container, booting the pod's VM first if needed (sized
    /// by `setup`). If the create fails and the pod has nothing else, the
    /// VM goes again; if it was abandoned and the pod is now empty, the
    /// shim exits.
    pub async fn create(
        &self,
        new: NewContainer,
        mut setup: SandboxSetup,
    ) -> Result<(Arc<Sandbox>, Arc<Container>)> {
        let id = new.id.clone();
        let reservation = self.reserve(&id)?;
        let result = async {
            // A namespace the hooks configured is the pod's network if the
            // spec names none (nerdctl's createRuntime hook runs CNI).
            let hook_netns = self
                .hooks
                .before_create(&id, &new.bundle, &new.spec, setup.netns.as_deref())
                .await?;
            if setup.netns.is_none() {
                setup.netns = hook_netns;
            }
            let sb = self.ensure_sandbox(setup, &new.spec).await?;
            if self.is_abandoned(&id) {
                return Err(Self::abandoned_error(&id));
            }
            let c = sb.create_container(new).await?;
            if self.is_abandoned(&id) {
                if let Err(e) = sb.delete_container(&id).await {
                    tracing::warn!(container = %id, "undoing an abandoned create: {e}");
                }
                return Err(Self::abandoned_error(&id));
            }
            Ok((sb, c))
        }
        .await;
        let abandoned = self.is_abandoned(&id);
        drop(reservation);
        if result.is_err() {
            let empty = self.teardown_if_unused().await;
            if !empty {
                self.hooks.poststop(&id).await;
            }
            if abandoned && empty {
                tracing::info!(container = %id, "abandoned create undone; nothing left, the shim exits");
                self.exit.signal();
            }
        }
        result
    }

    async fn ensure_sandbox(
        &self,
        setup: SandboxSetup,
        spec: &serde_json::Value,
    ) -> Result<Arc<Sandbox>> {
        let _lifecycle = self.lifecycle.lock().await;
        if let Some(sb) = self.sandbox() {
            return Ok(sb);
        }
        self.join_host_cgroup(spec).await?;
        let sb = Sandbox::launch(
            self.config.clone(),
            self.events.clone(),
            setup,
            self.launcher.as_ref(),
        )
        .await?;
        self.slot().sandbox = Some(sb.clone());
        Ok(sb)
    }

    /// Boots the pod's VM for containerd's Sandbox API (CreateSandbox),
    /// before any container, and holds it until [`Pod::stop_held`].
    /// `cgroup_spec` names the pod's host cgroup the way a CRI sandbox
    /// container's spec would (see [`cgroup::pod_cgroup`]).
    pub async fn boot_held(
        &self,
        setup: SandboxSetup,
        cgroup_spec: &serde_json::Value,
    ) -> Result<Arc<Sandbox>> {
        {
            let mut slot = self.slot();
            if slot.held || slot.sandbox.is_some() {
                return Err(Error::AlreadyExists(format!(
                    "sandbox {} already exists",
                    self.id
                )));
            }
            slot.held = true;
        }
        match self.ensure_sandbox(setup, cgroup_spec).await {
            Ok(sb) => Ok(sb),
            Err(e) => {
                self.slot().held = false;
                self.teardown_if_unused().await;
                Err(e)
            }
        }
    }

    /// Whether the Sandbox API holds the VM.
    pub fn is_held(&self) -> bool {
        self.slot().held
    }

    /// Ends the Sandbox API's hold and tears the VM down, whatever is
    /// still in it (its tasks then exit with status 255, as on a VM
    /// death). containerd stops the containers before it stops the sandbox.
    pub async fn stop_held(&self) {
        let sb = {
            let _lifecycle = self.lifecycle.lock().await;
            let mut slot = self.slot();
            slot.held = false;
            slot.sandbox.take()
        };
        if let Some(sb) = sb {
            sb.shutdown().await;
        }
        self.leave_host_cgroup().await;
        self.hooks.vm_gone().await;
    }

    /// The figures of the pod's host cgroup (the VM's CPU, memory, pids),
    /// if the pod has joined one.
    pub fn host_cgroup_usage(&self) -> Option<cgroup::Usage> {
        self.host_cgroup().as_ref().map(HostCgroup::usage)
    }

    /// Tears the VM down if no container is in it or being created.
    /// Returns whether the pod is now empty (no VM left).
    pub async fn teardown_if_unused(&self) -> bool {
        // Without waiting for a boot in progress (it holds the lock): a
        // create in flight keeps the pod anyway.
        if !self.slot().reserved.is_empty() {
            return false;
        }
        let _lifecycle = self.lifecycle.lock().await;
        let sb = {
            let mut slot = self.slot();
            if !slot.reserved.is_empty() {
                return false;
            }
            match &slot.sandbox {
                Some(sb) if sb.container_count() > 0 || slot.held => return false,
                _ => slot.sandbox.take(),
            }
        };
        if let Some(sb) = sb {
            sb.shutdown().await;
        }
        self.leave_host_cgroup().await;
        self.hooks.vm_gone().await;
        true
    }

    /// Before the VM exists: the shim (so every VMM thread and guest RAM
    /// to come) joins the pod's host cgroup, from the spec of the pod's
    /// first container (the CRI sandbox).
    async fn join_host_cgroup(&self, spec: &serde_json::Value) -> Result<()> {
        if !self.launcher.runs_in_shim() || self.host_cgroup().is_some() {
            return Ok(());
        }
        let path = cgroup::pod_cgroup(&self.config.cgroup_parent, &self.namespace, &self.id, spec)
            .map_err(|e| Error::invalid(format!("{e:#}")))?;
        let joined = tokio::task::spawn_blocking(move || HostCgroup::join(&path))
            .await
            .map_err(|e| Error::Internal(anyhow::anyhow!("joining the pod's cgroup: {e}")))?
            .map_err(Error::Internal)?;
        *self.host_cgroup() = Some(joined);
        Ok(())
    }

    /// After the VM is gone: back to the shim's own cgroup; the pod's is
    /// removed.
    async fn leave_host_cgroup(&self) {
        let Some(mut cg) = self.host_cgroup().take() else {
            return;
        };
        let path = cg.path().clone();
        let errors = tokio::task::spawn_blocking(move || cg.leave())
            .await
            .unwrap_or_default();
        for e in errors {
            tracing::warn!(cgroup = %path, "leaving the pod's cgroup: {e:#}");
        }
    }

    fn host_cgroup(&self) -> std::sync::MutexGuard<'_, Option<HostCgroup>> {
        self.host_cgroup.lock().unwrap_or_else(|p| p.into_inner())
    }
}
