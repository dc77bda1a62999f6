//! containerd's Sandbox API (`containerd.runtime.sandbox.v1.Sandbox`) on
//! the shim's ttrpc server, next to the task service: with a runtime
//! registered with `sandboxer = "shim"` (containerd 2.x), the pod's VM *is*
//! the sandbox. CreateSandbox boots (or restores) it from the CRI
//! `PodSandboxConfig` and the netns containerd set up, before any
//! container and without a pause container; containers then arrive through
//! the task service and join it; StopSandbox tears it down.
//!
//! Each method is a thin translation: the request is checked and converted
//! in [`pod_config`], the work is done by the shared [`Pod`]. A sandbox id
//! other than this shim's pod is NOT_FOUND, as containerd expects from a
//! shim that does not know it.

pub mod pod_config;

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};
use containerd_shim_protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics, PidsStat};
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::sandbox_api::{
    CreateSandboxRequest, CreateSandboxResponse, PingRequest, PingResponse, PlatformRequest,
    PlatformResponse, SandboxMetricsRequest, SandboxMetricsResponse, SandboxStatusRequest,
    SandboxStatusResponse, ShutdownSandboxRequest, ShutdownSandboxResponse, StartSandboxRequest,
    StartSandboxResponse, StopSandboxRequest, StopSandboxResponse, WaitSandboxRequest,
    WaitSandboxResponse,
};
use containerd_shim_protos::sandbox_async::Sandbox as SandboxApi;
use containerd_shim_protos::types::platform::Platform;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::events;
use crate::metrics;
use crate::task::pod::Pod;

/// containerd's CRI reads these states (`runtime.v1.PodSandboxState`).
const READY: &str = "SANDBOX_READY";
const NOT_READY: &str = "SANDBOX_NOTREADY";
/// The exit status of a sandbox whose VM ended without being asked to.
const VM_DIED: u32 = 255;

/// How the sandbox ended.
#[derive(Debug, Clone, Copy)]
struct Ended {
    status: u32,
    at: SystemTime,
}

/// What the Sandbox API knows of this shim's sandbox.
struct Record {
    created_at: SystemTime,
    pod_name: String,
    hostname: String,
    /// The pod's network namespace on the host (CNI's), if any.
    netns: Option<std::path::PathBuf>,
    /// Set once, when the VM is gone (StopSandbox, or a VM death).
    ended: watch::Sender<Option<Ended>>,
}

pub struct SandboxService {
    pod: Arc<Pod>,
    exit: Arc<ExitSignal>,
    record: Mutex<Option<Arc<Record>>>,
}

impl SandboxService {
    pub fn new(pod: Arc<Pod>, exit: Arc<ExitSignal>) -> Self {
        SandboxService {
            pod,
            exit,
            record: Mutex::new(None),
        }
    }

    fn record(&self) -> Option<Arc<Record>> {
        self.record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The record of `id`, NOT_FOUND for any other id or before create.
    fn known(&self, id: &str) -> Result<Arc<Record>> {
        match self.record() {
            Some(r) if id == self.pod.id => Ok(r),
            _ => Err(Error::not_found(format!("sandbox {id} does not exist"))),
        }
    }

    async fn create(&self, req: CreateSandboxRequest) -> Result<()> {
        if req.sandbox_id != self.pod.id {
            return Err(Error::invalid(format!(
                "sandbox {} sent to the shim of pod {}",
                req.sandbox_id, self.pod.id
            )));
        }
        if self.record().is_some() {
            return Err(Error::AlreadyExists(format!(
                "sandbox {} already exists",
                req.sandbox_id
            )));
        }
        let asked = pod_config::from_create_request(&req, &self.pod.namespace, self.pod.config())?;
        tracing::info!(
            sandbox = %req.sandbox_id,
            pod = %asked.pod_name,
            vcpus = asked.setup.size.vcpus,
            mem_mib = asked.setup.size.mem_mib,
            netns = ?asked.setup.netns,
            "CreateSandbox: booting the pod's VM"
        );
        let pod = self.pod.clone();
        let (setup, cgroup_spec) = (asked.setup, asked.cgroup_spec);
        let hostname = setup.hostname.clone().unwrap_or_default();
        let netns = setup.netns.clone();
        // On its own task: containerd dropping the call must not cut a
        // boot in half.
        let sandbox = tokio::spawn(async move { pod.boot_held(setup, &cgroup_spec).await })
            .await
            .map_err(|e| Error::Internal(anyhow::anyhow!("CreateSandbox task failed: {e}")))??;
        // kubectl port-forward: the ports the pod declares.
        sandbox.forward_ports(&asked.ports).await;
        let record = Arc::new(Record {
            created_at: SystemTime::now(),
            pod_name: asked.pod_name,
            hostname,
            netns,
            ended: watch::channel(None).0,
        });
        *self.record.lock().unwrap_or_else(|p| p.into_inner()) = Some(record.clone());
        // A VM that ends by itself ends the sandbox (WaitSandbox returns).
        let watched = record.clone();
        tokio::spawn(async move {
            let reason = sandbox.wait_dead().await;
            if watched.ended.borrow().is_none() {
                tracing::error!("the sandbox's VM ended: {reason}");
                watched.ended.send_replace(Some(Ended {
                    status: VM_DIED,
                    at: SystemTime::now(),
                }));
            }
        });
        Ok(())
    }

    /// Tears the VM down (once) and records the end.
    async fn stop(&self, record: &Record) {
        self.pod.stop_held().await;
        record.ended.send_if_modified(|e| {
            if e.is_none() {
                *e = Some(Ended {
                    status: 0,
                    at: SystemTime::now(),
                });
                true
            } else {
                false
            }
        });
    }

    /// The VM's host cgroup figures, as containerd's cgroup v2 metrics.
    fn metrics(&self) -> SandboxMetricsResponse {
        let usage = self.pod.host_cgroup_usage().unwrap_or_default();
        let m = Metrics {
            cpu: MessageField::some(CPUStat {
                usage_usec: usage.cpu_usec,
                ..Default::default()
            }),
            memory: MessageField::some(MemoryStat {
                usage: usage.memory_bytes,
                ..Default::default()
            }),
            pids: MessageField::some(PidsStat {
                current: usage.pids,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut resp = SandboxMetricsResponse::default();
        // (The `Metric` type is not exported by containerd-shim-protos.)
        let metric = resp.metrics.mut_or_insert_default();
        metric.timestamp = MessageField::some(events::timestamp(SystemTime::now()));
        metric.id = self.pod.id.clone();
        metric.data = metrics::to_any(&m).ok().into();
        resp
    }
}

#[async_trait]
impl SandboxApi for SandboxService {
    #[tracing::instrument(skip_all, fields(sandbox = %req.sandbox_id))]
    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> TtrpcResult<CreateSandboxResponse> {
        self.create(req).await?;
        Ok(CreateSandboxResponse::default())
    }

    #[tracing::instrument(skip_all, fields(sandbox = %req.sandbox_id))]
    async fn start_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: StartSandboxRequest,
    ) -> TtrpcResult<StartSandboxResponse> {
        let r = self.known(&req.sandbox_id)?;
        if r.ended.borrow().is_some() {
            return Err(
                Error::precondition(format!("sandbox {} has ended", req.sandbox_id)).into(),
            );
        }
        // The VM runs inside this process: its pid is the shim's.
        Ok(StartSandboxResponse {
            pid: std::process::id(),
            created_at: MessageField::some(events::timestamp(r.created_at)),
            ..Default::default()
        })
    }

    async fn platform(
        &self,
        _ctx: &TtrpcContext,
        req: PlatformRequest,
    ) -> TtrpcResult<PlatformResponse> {
        self.known(&req.sandbox_id)?;
        Ok(PlatformResponse {
            platform: MessageField::some(Platform {
                os: "linux".into(),
                architecture: "amd64".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    #[tracing::instrument(skip_all, fields(sandbox = %req.sandbox_id))]
    async fn stop_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: StopSandboxRequest,
    ) -> TtrpcResult<StopSandboxResponse> {
        let r = self.known(&req.sandbox_id)?;
        self.stop(&r).await;
        Ok(StopSandboxResponse::default())
    }

    async fn wait_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: WaitSandboxRequest,
    ) -> TtrpcResult<WaitSandboxResponse> {
        let r = self.known(&req.sandbox_id)?;
        let mut rx = r.ended.subscribe();
        let ended = match rx.wait_for(Option::is_some).await {
            Ok(e) => (*e).unwrap_or(Ended {
                status: VM_DIED,
                at: SystemTime::now(),
            }),
            Err(_) => Ended {
                status: VM_DIED,
                at: SystemTime::now(),
            },
        };
        Ok(WaitSandboxResponse {
            exit_status: ended.status,
            exited_at: MessageField::some(events::timestamp(ended.at)),
            ..Default::default()
        })
    }

    async fn sandbox_status(
        &self,
        _ctx: &TtrpcContext,
        req: SandboxStatusRequest,
    ) -> TtrpcResult<SandboxStatusResponse> {
        let r = self.known(&req.sandbox_id)?;
        let ended = *r.ended.borrow();
        let mut info = std::collections::HashMap::new();
        if req.verbose {
            // `crictl inspectp` shows the `info` key as JSON, as
            // containerd's own sandboxes have it.
            let detail = serde_json::json!({
                "pid": std::process::id(),
                "pod": r.pod_name,
                "hostname": r.hostname,
                "runtimeType": crate::RUNTIME_ID,
                "netNamespacePath": r.netns.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            });
            info.insert("info".to_string(), detail.to_string());
        }
        Ok(SandboxStatusResponse {
            sandbox_id: req.sandbox_id,
            pid: std::process::id(),
            state: if ended.is_some() { NOT_READY } else { READY }.into(),
            info,
            created_at: MessageField::some(events::timestamp(r.created_at)),
            exited_at: ended.map(|e| events::timestamp(e.at)).into(),
            ..Default::default()
        })
    }

    async fn ping_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: PingRequest,
    ) -> TtrpcResult<PingResponse> {
        let r = self.known(&req.sandbox_id)?;
        if r.ended.borrow().is_some() {
            return Err(Error::Unavailable(format!("sandbox {} has ended", req.sandbox_id)).into());
        }
        Ok(PingResponse::default())
    }

    #[tracing::instrument(skip_all, fields(sandbox = %req.sandbox_id))]
    async fn shutdown_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: ShutdownSandboxRequest,
    ) -> TtrpcResult<ShutdownSandboxResponse> {
        match self.known(&req.sandbox_id) {
            Ok(r) => self.stop(&r).await,
            // containerd's cleanup after a CreateSandbox that failed (a
            // refused config, a boot that failed): nothing was made, and
            // a shim left here would serve nothing forever.
            Err(_) if req.sandbox_id == self.pod.id => {
                if !self.pod.teardown_if_unused().await {
                    tracing::warn!("ShutdownSandbox before any sandbox, with containers in the pod: the shim stays");
                    return Ok(ShutdownSandboxResponse::default());
                }
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!("ShutdownSandbox: the shim exits");
        self.exit.signal();
        Ok(ShutdownSandboxResponse::default())
    }

    async fn sandbox_metrics(
        &self,
        _ctx: &TtrpcContext,
        req: SandboxMetricsRequest,
    ) -> TtrpcResult<SandboxMetricsResponse> {
        self.known(&req.sandbox_id)?;
        Ok(self.metrics())
    }
}

#[cfg(test)]
mod tests;
