//! The containerd Task service (task API v2) of the shim.
//!
//! Each method checks the request, finds the pod's sandbox and hands the
//! work to it, translating messages with [`convert`]; errors carry the codes containerd expects (see
//! [`crate::error`]). Calls that may take long (create boots the VM on this
//! pod's first container) run the work on their own task, so that a client
//! giving up on the call cannot leave a half-made container behind.

pub mod convert;
pub mod pod;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use containerd_shim::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
    CreateTaskResponse, DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest,
    PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest,
    StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::{ExitSignal, Task, TtrpcContext, TtrpcResult};

use self::pod::Pod;
use crate::annotations;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::events::EventSink;
use crate::resources::network;
use crate::resources::sizing::{check_fits_host, size_vm, HostResources, WorkloadLimits};
use crate::sandbox::SandboxSetup;

pub struct TaskService {
    pod: Arc<Pod>,
    exit: Arc<ExitSignal>,
}

impl TaskService {
    pub fn new(
        namespace: &str,
        pod_id: &str,
        config: Arc<Config>,
        events: EventSink,
        exit: Arc<ExitSignal>,
    ) -> Self {
        TaskService {
            pod: Arc::new(Pod::new(namespace, pod_id, config, events, exit.clone())),
            exit,
        }
    }

    /// The pod this service serves, shared with the Sandbox API service.
    pub fn pod(&self) -> Arc<Pod> {
        self.pod.clone()
    }

    /// The signal that ends the shim.
    pub fn exit_signal(&self) -> Arc<ExitSignal> {
        self.exit.clone()
    }
}

/// Reads a bundle's `config.json`.
pub async fn read_bundle_spec(bundle: &std::path::Path) -> Result<serde_json::Value> {
    let path = bundle.join("config.json");
    let data = tokio::fs::read(&path)
        .await
        .map_err(|e| Error::invalid(format!("reading {}: {e}", path.display())))?;
    serde_json::from_slice(&data)
        .map_err(|e| Error::invalid(format!("parsing {}: {e}", path.display())))
}

/// What a host-network pod is told.
pub const HOST_NETWORK_REFUSED: &str = "host-network pods are not supported by the Ember runtime: \
    each pod runs in its own VM, which cannot share the node's network namespace; \
    run this pod with hostNetwork: false (its network then comes from CNI), \
    or with a runc-based RuntimeClass";

/// A CRI pod sandbox without a network namespace of its own is a
/// host-network pod: refused before any VM boots (README, "Networking").
fn refuse_host_network(
    spec: &serde_json::Value,
    ann: &std::collections::HashMap<String, String>,
) -> Result<()> {
    let sandbox = ann.get(annotations::CRI_CONTAINER_TYPE).map(String::as_str) == Some("sandbox");
    if sandbox && !network::has_network_namespace(spec) {
        return Err(Error::invalid(HOST_NETWORK_REFUSED));
    }
    Ok(())
}

impl TaskService {
    async fn do_create(&self, req: CreateTaskRequest) -> Result<CreateTaskResponse> {
        if !req.checkpoint.is_empty() {
            return Err(Error::Unimplemented(
                "restoring from a checkpoint is not supported by the Ember runtime".into(),
            ));
        }
        let config = self.pod.config().clone();
        let spec = read_bundle_spec(Path::new(&req.bundle)).await?;
        let ann = annotations::of_spec(&spec);
        let overrides = annotations::pod_overrides(&ann, &config)?;
        let limits = WorkloadLimits::from_spec(&spec);
        // Refused before any VM boots.
        if let Some(host) = HostResources::detect() {
            check_fits_host(&limits, &host)?;
        }
        let size = size_vm(&config, &limits, &overrides);
        refuse_host_network(&spec, &ann)?;
        let setup = SandboxSetup {
            namespace: self.pod.namespace.clone(),
            id: self.pod.id.clone(),
            size,
            kernel_params: overrides.kernel_params,
            netns: network::netns_of_spec(&spec),
            hostname: None,
        };
        let new = convert::new_container(&req, spec);
        let started = Instant::now();
        let pod = self.pod.clone();
        // On its own task: containerd dropping the call must not cut a
        // create (and a VM boot) in half.
        let (_, container) = tokio::spawn(async move { pod.create(new, setup).await })
            .await
            .map_err(|e| Error::Internal(anyhow::anyhow!("create task failed: {e}")))??;
        tracing::info!(took = ?started.elapsed(), "Create done");
        Ok(CreateTaskResponse {
            pid: container.init.pid(),
            ..Default::default()
        })
    }

    async fn do_delete(&self, req: &DeleteRequest) -> Result<DeleteResponse> {
        // containerd deletes an id whose create it gave up on (its caller's
        // deadline passed during a VM boot): that create undoes itself.
        if req.exec_id.is_empty() && self.pod.abandon(&req.id) {
            tracing::warn!(container = %req.id, "Delete during its create: the create is abandoned and will be undone");
            return Err(Error::not_found(format!(
                "container {} is still being created; its create is now abandoned",
                req.id
            )));
        }
        let sb = self.pod.find(&req.id)?;
        let (pid, exit) = if req.exec_id.is_empty() {
            let sb2 = sb.clone();
            let id = req.id.clone();
            let r = tokio::spawn(async move { sb2.delete_container(&id).await })
                .await
                .map_err(|e| Error::Internal(anyhow::anyhow!("delete task failed: {e}")))??;
            // The last container of the pod takes the VM with it; the
            // shim itself exits at containerd's Shutdown call. Its
            // poststop hooks run after the VM is gone.
            let vm_gone = sb.container_count() == 0 && self.pod.teardown_if_unused().await;
            if !vm_gone {
                self.pod.hooks.poststop(&req.id).await;
            }
            r
        } else {
            sb.delete_exec(&req.id, &req.exec_id)?
        };
        Ok(convert::delete_response(pid, exit))
    }

    async fn do_state(&self, req: &StateRequest) -> Result<StateResponse> {
        let (_, c) = self.pod.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        Ok(convert::state_response(&c, &p, &req.exec_id))
    }

    async fn do_pids(&self, req: &PidsRequest) -> Result<PidsResponse> {
        let sb = self.pod.find(&req.id)?;
        convert::pids_response(sb.pids(&req.id).await?)
    }

    async fn do_stats(&self, req: &StatsRequest) -> Result<StatsResponse> {
        let sb = self.pod.find(&req.id)?;
        convert::stats_response(&sb.stats(&req.id).await?)
    }
}

#[async_trait]
impl Task for TaskService {
    #[tracing::instrument(name = "Create", level = "info", skip_all, fields(container = %req.id, bundle = %req.bundle, terminal = req.terminal))]
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        Ok(self.do_create(req).await?)
    }

    #[tracing::instrument(name = "Start", level = "info", skip_all, fields(container = %req.id, exec = %req.exec_id))]
    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let sb = self.pod.find(&req.id)?;
        let (id, exec_id) = (req.id.clone(), req.exec_id.clone());
        let pid = tokio::spawn(async move { sb.start(&id, &exec_id).await })
            .await
            .map_err(|e| Error::Internal(anyhow::anyhow!("start task failed: {e}")))??;
        if req.exec_id.is_empty() {
            self.pod.hooks.poststart(&req.id).await;
        }
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    #[tracing::instrument(name = "Exec", level = "info", skip_all, fields(container = %req.id, exec = %req.exec_id, terminal = req.terminal))]
    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        let sb = self.pod.find(&req.id)?;
        let spec = convert::any_json(&req.spec, "the exec process spec")?;
        let stdio = convert::stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        sb.add_exec(&req.id, &req.exec_id, stdio, spec).await?;
        Ok(Empty::default())
    }

    #[tracing::instrument(name = "Kill", level = "info", skip_all, fields(container = %req.id, exec = %req.exec_id, signal = req.signal, all = req.all))]
    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        let sb = self.pod.find(&req.id)?;
        sb.kill(&req.id, &req.exec_id, req.signal, req.all).await?;
        Ok(Empty::default())
    }

    #[tracing::instrument(name = "Wait", level = "debug", skip_all, fields(container = %req.id, exec = %req.exec_id))]
    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let p = self.pod.find(&req.id)?.process(&req.id, &req.exec_id)?;
        Ok(convert::wait_response(p.wait().await))
    }

    #[tracing::instrument(name = "Delete", level = "info", skip_all, fields(container = %req.id, exec = %req.exec_id))]
    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        Ok(self.do_delete(&req).await?)
    }

    #[tracing::instrument(name = "State", level = "debug", skip_all, fields(container = %req.id, exec = %req.exec_id))]
    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        Ok(self.do_state(&req).await?)
    }

    #[tracing::instrument(name = "Pids", level = "debug", skip_all, fields(container = %req.id))]
    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        Ok(self.do_pids(&req).await?)
    }

    #[tracing::instrument(name = "Pause", level = "info", skip_all, fields(container = %req.id))]
    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        self.pod.find(&req.id)?.pause(&req.id).await?;
        Ok(Empty::default())
    }

    #[tracing::instrument(name = "Resume", level = "info", skip_all, fields(container = %req.id))]
    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        self.pod.find(&req.id)?.resume(&req.id).await?;
        Ok(Empty::default())
    }

    #[tracing::instrument(name = "Update", level = "info", skip_all, fields(container = %req.id))]
    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let sb = self.pod.find(&req.id)?;
        let resources = convert::any_json(&req.resources, "the resources")?;
        sb.update(&req.id, resources).await?;
        Ok(Empty::default())
    }

    #[tracing::instrument(name = "Stats", level = "debug", skip_all, fields(container = %req.id))]
    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        Ok(self.do_stats(&req).await?)
    }

    #[tracing::instrument(name = "ResizePty", level = "debug", skip_all, fields(container = %req.id, exec = %req.exec_id, width = req.width, height = req.height))]
    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        self.pod
            .find(&req.id)?
            .resize_pty(&req.id, &req.exec_id, req.width, req.height)
            .await?;
        Ok(Empty::default())
    }

    #[tracing::instrument(name = "CloseIO", level = "debug", skip_all, fields(container = %req.id, exec = %req.exec_id, stdin = req.stdin))]
    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        if req.stdin {
            self.pod
                .find(&req.id)?
                .close_stdin(&req.id, &req.exec_id)
                .await?;
        }
        Ok(Empty::default())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        tracing::info!(container = %req.id, "Checkpoint (not supported)");
        Err(Error::Unimplemented(
            "checkpointing a task is not supported by the Ember runtime".into(),
        )
        .into())
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let task_pid = self
            .pod
            .container(&req.id)
            .map(|(_, c)| c.init.pid())
            .unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: crate::VERSION.to_string(),
            ..Default::default()
        })
    }

    #[tracing::instrument(name = "Shutdown", level = "info", skip_all, fields(container = %req.id, now = req.now))]
    async fn shutdown(&self, _ctx: &TtrpcContext, req: ShutdownRequest) -> TtrpcResult<Empty> {
        if self.pod.teardown_if_unused().await {
            tracing::info!(after = %req.id, "no containers left; the shim exits");
            self.exit.signal();
        } else {
            tracing::debug!(after = %req.id, "the pod still has containers (or its sandbox); the shim stays");
        }
        Ok(Empty::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> TaskService {
        let config = Config {
            state_dir: std::env::temp_dir().join("ember-task-test"),
            ..Config::default()
        };
        TaskService::new(
            "default",
            "pod",
            Arc::new(config),
            EventSink::disabled(),
            Arc::new(ExitSignal::default()),
        )
    }

    fn code<T: std::fmt::Debug>(r: TtrpcResult<T>) -> ttrpc::Code {
        match r.unwrap_err() {
            ttrpc::Error::RpcStatus(s) => s.code(),
            e => panic!("not a status: {e:?}"),
        }
    }

    fn ctx() -> TtrpcContext {
        TtrpcContext {
            mh: Default::default(),
            metadata: Default::default(),
            timeout_nano: 0,
        }
    }

    #[tokio::test]
    async fn unknown_tasks_are_not_found() {
        let s = service();
        let c = ctx();
        assert_eq!(
            code(
                s.state(
                    &c,
                    StateRequest {
                        id: "x".into(),
                        ..Default::default()
                    }
                )
                .await
            ),
            ttrpc::Code::NOT_FOUND
        );
        assert_eq!(
            code(
                s.delete(
                    &c,
                    DeleteRequest {
                        id: "x".into(),
                        ..Default::default()
                    }
                )
                .await
            ),
            ttrpc::Code::NOT_FOUND
        );
        assert_eq!(
            code(
                s.kill(
                    &c,
                    KillRequest {
                        id: "x".into(),
                        signal: 9,
                        ..Default::default()
                    }
                )
                .await
            ),
            ttrpc::Code::NOT_FOUND
        );
        assert_eq!(
            code(
                s.wait(
                    &c,
                    WaitRequest {
                        id: "x".into(),
                        ..Default::default()
                    }
                )
                .await
            ),
            ttrpc::Code::NOT_FOUND
        );
        assert_eq!(
            code(s.checkpoint(&c, CheckpointTaskRequest::default()).await),
            ttrpc::Code::UNIMPLEMENTED
        );
        let r = s
            .connect(
                &c,
                ConnectRequest {
                    id: "x".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(r.shim_pid, std::process::id());
        assert_eq!(r.task_pid, 0);
    }

    #[tokio::test]
    async fn create_refuses_bad_bundles_and_checkpoints() {
        let s = service();
        let c = ctx();
        let dir = tempfile::tempdir().unwrap();
        let req = CreateTaskRequest {
            id: "c1".into(),
            bundle: dir.path().display().to_string(),
            ..Default::default()
        };
        assert_eq!(
            code(s.create(&c, req.clone()).await),
            ttrpc::Code::INVALID_ARGUMENT
        );
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"annotations": {"io.ember.vcpus": "2"}}"#,
        )
        .unwrap();
        // Not in enable_annotations.
        assert_eq!(
            code(s.create(&c, req.clone()).await),
            ttrpc::Code::FAILED_PRECONDITION
        );
        // More memory than the host has: refused before any boot.
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"linux": {"resources": {"memory": {"limit": 9223372036854775807}}}}"#,
        )
        .unwrap();
        match s.create(&c, req.clone()).await {
            Err(ttrpc::Error::RpcStatus(st)) => {
                assert_eq!(st.code(), ttrpc::Code::INVALID_ARGUMENT);
                assert!(st.message().contains("memory"), "{}", st.message());
            }
            other => panic!("{other:?}"),
        }
        let cp = CreateTaskRequest {
            checkpoint: "/cp".into(),
            ..req
        };
        assert_eq!(code(s.create(&c, cp).await), ttrpc::Code::UNIMPLEMENTED);
    }

    #[tokio::test]
    async fn shutdown_of_an_empty_shim_exits() {
        let s = service();
        s.shutdown(&ctx(), ShutdownRequest::default())
            .await
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), s.exit.wait())
            .await
            .expect("exit signalled");
    }

    #[test]
    fn host_network_sandboxes_are_refused() {
        let sandbox: std::collections::HashMap<String, String> = [(
            annotations::CRI_CONTAINER_TYPE.to_string(),
            "sandbox".to_string(),
        )]
        .into();
        let host = serde_json::json!({"linux": {"namespaces": [{"type": "pid"}]}});
        let e = refuse_host_network(&host, &sandbox).unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
        assert!(e.to_string().contains("hostNetwork: false"), "{e}");
        let cni = serde_json::json!({"linux": {"namespaces": [
            {"type": "network", "path": "/var/run/netns/cni-1"}]}});
        assert!(refuse_host_network(&cni, &sandbox).is_ok());
        // Not a CRI sandbox (ctr run --net-host, an app container): runs
        // without a network interface in the guest, as before.
        assert!(refuse_host_network(&host, &Default::default()).is_ok());
    }
}
