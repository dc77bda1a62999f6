//! The containers of a sandbox: looking them up, creating one (rootfs into
//! the share, the spec in guest terms, the agent's CreateContainer, its
//! stdio) and deleting one (guest side, then host mounts), each undone on
//! failure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_shim_protos::events::task::{TaskCreate, TaskDelete, TaskIO};
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::types::mount::Mount as ContainerdMount;
use ember_proto::agent::{CreateContainerRequest, RemoveContainerRequest};

use super::container::Container;
use super::process::{Exit, Process, Status};
use super::{blocking, unknown_exit, NewContainer, Sandbox, EXEC_EXIT_GRACE, SIGKILL};
use crate::annotations;
use crate::error::{Error, Result};
use crate::events;
use crate::io::ProcessIo;
use crate::resources::port_forward;
use crate::resources::rootfs;
use crate::resources::spec as ocispec;

impl Sandbox {
    // ---- lookup ----

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

    // ---- delete ----

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
}
