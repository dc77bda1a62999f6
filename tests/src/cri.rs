//! A CRI client for the end-to-end tests: the Kubernetes CRI (`runtime.v1`)
//! spoken over a harness containerd's gRPC socket, the way kubelet speaks it.
//!
//! [`Cri`] wraps k8s-cri's tonic `RuntimeServiceClient` and
//! `ImageServiceClient` on a channel whose connector dials the Unix socket,
//! behind a blocking API (its own tokio runtime), so tests read like
//! kubelet's sequence of calls. Every call carries a deadline (sent as
//! `grpc-timeout`, so containerd cancels server-side too, and enforced
//! locally); failures are [`CriError`]s carrying the gRPC code and message.
//!
//! Streaming Exec: the CRI `Exec` call only returns a URL on containerd's
//! streaming server; [`Cri::exec_stream`] / [`Cri::exec_session`] connect to
//! it with a websocket client speaking the Kubernetes remotecommand
//! `v4.channel.k8s.io` protocol (each binary message starts with a channel
//! byte: 0 stdin, 1 stdout, 2 stderr, 3 status, 4 resize), as `kubectl exec`
//! over websockets does. The exit code comes from the v4 status message.
//!
//! Port forwarding: [`Cri::port_forward`] connects to the URL the CRI
//! `PortForward` call returns with the `v4.channel.k8s.io` port-forward
//! protocol (per port a data and an error channel, each starting with the
//! port as a little-endian u16), as `kubectl port-forward` over websockets.
//!
//! Also here: builders for pod and container configs, the CRI container log
//! format parser (`<RFC3339Nano time> <stdout|stderr> <P|F> <text>`), and
//! [`CniNetwork`], a bridge + host-local CNI network for pod networking on a
//! private test subnet, handed to the harness through
//! [`crate::containerd::Options::cni`].

use std::collections::HashMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::containerd::{CniOptions, Containerd};

use api::image_service_client::ImageServiceClient;
use api::runtime_service_client::RuntimeServiceClient;
pub use k8s_cri::v1 as api;

/// Default deadline of a CRI call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline of RunPodSandbox: with a VM per pod, it boots the VM (1-2 min here).
pub const RUN_POD_TIMEOUT: Duration = Duration::from_secs(600);
/// Deadline of CreateContainer / StartContainer (the first may wait for a VM).
pub const CONTAINER_TIMEOUT: Duration = Duration::from_secs(300);
/// The namespace the CRI plugin keeps its containers in.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// Largest gRPC message accepted (ExecSync can return a lot of output).
const MAX_MESSAGE: usize = 64 << 20;

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// A failed CRI call: which call, the gRPC code and message, and how long it
/// took. `code == DeadlineExceeded` with `local_timeout` when our own
/// deadline fired first.
#[derive(Debug, Clone)]
pub struct CriError {
    pub call: String,
    pub code: tonic::Code,
    pub message: String,
    pub elapsed: Duration,
    pub local_timeout: bool,
}

impl std::fmt::Display for CriError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CRI {} failed after {:.2}s: {:?}: {}{}",
            self.call,
            self.elapsed.as_secs_f64(),
            self.code,
            self.message,
            if self.local_timeout {
                " (client-side deadline)"
            } else {
                ""
            }
        )
    }
}

impl std::error::Error for CriError {}

/// The [`CriError`] inside `e`, if it is one.
pub fn cri_error(e: &anyhow::Error) -> Option<&CriError> {
    e.downcast_ref::<CriError>()
}

fn request<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

// ---------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------

/// What ExecSync returned.
#[derive(Clone, Default)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
    pub duration: Duration,
}

impl std::fmt::Debug for ExecOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecOutput")
            .field("exit_code", &self.exit_code)
            .field("stdout", &clip(&self.stdout_str()))
            .field("stderr", &clip(&self.stderr_str()))
            .field("duration", &self.duration)
            .finish()
    }
}

impl ExecOutput {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// Fails unless the command exited 0.
    pub fn ok(&self) -> Result<&Self> {
        ensure!(
            self.exit_code == 0,
            "exit code {}; stdout {:?}; stderr {:?}",
            self.exit_code,
            clip(&self.stdout_str()),
            clip(&self.stderr_str())
        );
        Ok(self)
    }
}

fn clip(s: &str) -> String {
    if s.len() <= 2000 {
        return s.to_string();
    }
    let mut end = 2000;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &s[..end], s.len())
}

/// A blocking CRI client on a containerd socket.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    address: PathBuf,
}

impl Cri {
    /// Connects to the CRI services on the containerd gRPC socket `address`.
    pub fn connect(address: &Path) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cri-client")
            .enable_all()
            .build()
            .context("tokio runtime for the CRI client")?;
        let path = address.to_path_buf();
        let channel = rt.block_on(async {
            let p = path.clone();
            Endpoint::try_from("http://[::]:50051")?
                    .connect_timeout(Duration::from_secs(10))
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let p = p.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?))
                        }
                    }))
                    .await
        });
        let channel =
            channel.with_context(|| format!("connecting to CRI at {}", address.display()))?;
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE),
            images: ImageServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE),
            rt,
            address: path,
        })
    }

    /// Connects to a harness containerd.
    pub fn for_containerd(ctrd: &Containerd) -> Result<Self> {
        Self::connect(ctrd.address())
    }

    pub fn address(&self) -> &Path {
        &self.address
    }

    /// Runs one RuntimeService call with `timeout`.
    fn rpc<T, F, Fut>(&self, call: &str, timeout: Duration, f: F) -> Result<T>
    where
        F: FnOnce(RuntimeServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.runtime.clone();
        self.finish(call, timeout, f(client))
    }

    /// Runs one ImageService call with `timeout`.
    fn image_rpc<T, F, Fut>(&self, call: &str, timeout: Duration, f: F) -> Result<T>
    where
        F: FnOnce(ImageServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.images.clone();
        self.finish(call, timeout, f(client))
    }

    fn finish<T>(
        &self,
        call: &str,
        timeout: Duration,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T> {
        let t0 = Instant::now();
        let _rt = self.rt.enter();
        // A little slack: let containerd's own deadline (grpc-timeout) fire first.
        let r = self
            .rt
            .block_on(tokio::time::timeout(timeout + Duration::from_secs(5), fut));
        let elapsed = t0.elapsed();
        match r {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(CriError {
                call: call.to_string(),
                code: status.code(),
                message: status.message().to_string(),
                elapsed,
                local_timeout: false,
            }
            .into()),
            Err(_) => Err(CriError {
                call: call.to_string(),
                code: tonic::Code::DeadlineExceeded,
                message: format!("no answer within {timeout:?}"),
                elapsed,
                local_timeout: true,
            }
            .into()),
        }
    }

    // -- runtime info ---------------------------------------------------------

    pub fn version(&self) -> Result<api::VersionResponse> {
        self.rpc("Version", CALL_TIMEOUT, |mut c| async move {
            c.version(request(api::VersionRequest::default(), CALL_TIMEOUT))
                .await
        })
    }

    /// The runtime's conditions (`RuntimeReady`, `NetworkReady`) and, with
    /// `verbose`, containerd's config dump in `info`.
    pub fn status(&self, verbose: bool) -> Result<api::StatusResponse> {
        self.rpc("Status", CALL_TIMEOUT, |mut c| async move {
            c.status(request(api::StatusRequest { verbose }, CALL_TIMEOUT))
                .await
        })
    }

    /// Waits until RuntimeReady (and NetworkReady when `network`) are true.
    pub fn wait_ready(&self, network: bool, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let st = self.status(false)?;
            let conds = st.status.map(|s| s.conditions).unwrap_or_default();
            let ready = |t: &str| conds.iter().any(|c| c.r#type == t && c.status);
            if ready("RuntimeReady") && (!network || ready("NetworkReady")) {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!("CRI not ready after {timeout:?}: {conds:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // -- images ----------------------------------------------------------------

    /// The image `name` as the CRI image service sees it, if present.
    pub fn image_status(&self, name: &str) -> Result<Option<api::Image>> {
        let req = api::ImageStatusRequest {
            image: Some(image_spec(name)),
            verbose: false,
        };
        Ok(self
            .image_rpc("ImageStatus", CALL_TIMEOUT, |mut c| async move {
                c.image_status(request(req, CALL_TIMEOUT)).await
            })?
            .image)
    }

    pub fn list_images(&self) -> Result<Vec<api::Image>> {
        Ok(self
            .image_rpc("ListImages", CALL_TIMEOUT, |mut c| async move {
                c.list_images(request(api::ListImagesRequest::default(), CALL_TIMEOUT))
                    .await
            })?
            .images)
    }

    // -- pods ------------------------------------------------------------------

    /// RunPodSandbox with runtime handler `handler` (the RuntimeClass
    /// handler), [`RUN_POD_TIMEOUT`]. Returns the pod sandbox id.
    pub fn run_pod(&self, config: &api::PodSandboxConfig, handler: &str) -> Result<String> {
        self.run_pod_timeout(config, handler, RUN_POD_TIMEOUT)
    }

    pub fn run_pod_timeout(
        &self,
        config: &api::PodSandboxConfig,
        handler: &str,
        timeout: Duration,
    ) -> Result<String> {
        let req = api::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.to_string(),
        };
        Ok(self
            .rpc("RunPodSandbox", timeout, |mut c| async move {
                c.run_pod_sandbox(request(req, timeout)).await
            })?
            .pod_sandbox_id)
    }

    /// PodSandboxStatus (with containerd's verbose `info` when `verbose`).
    pub fn pod_status_full(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<api::PodSandboxStatusResponse> {
        let req = api::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose,
        };
        self.rpc("PodSandboxStatus", CALL_TIMEOUT, |mut c| async move {
            c.pod_sandbox_status(request(req, CALL_TIMEOUT)).await
        })
    }

    pub fn pod_status(&self, id: &str) -> Result<api::PodSandboxStatus> {
        self.pod_status_full(id, false)?
            .status
            .context("PodSandboxStatus without status")
    }

    /// The pod's IP (empty for host-network pods).
    pub fn pod_ip(&self, id: &str) -> Result<String> {
        Ok(self
            .pod_status(id)?
            .network
            .map(|n| n.ip)
            .unwrap_or_default())
    }

    pub fn list_pods(&self) -> Result<Vec<api::PodSandbox>> {
        Ok(self
            .rpc("ListPodSandbox", CALL_TIMEOUT, |mut c| async move {
                c.list_pod_sandbox(request(api::ListPodSandboxRequest::default(), CALL_TIMEOUT))
                    .await
            })?
            .items)
    }

    /// StopPodSandbox: stops every container, the sandbox, tears the network down.
    pub fn stop_pod(&self, id: &str) -> Result<()> {
        let req = api::StopPodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.rpc("StopPodSandbox", CONTAINER_TIMEOUT, |mut c| async move {
            c.stop_pod_sandbox(request(req, CONTAINER_TIMEOUT)).await
        })?;
        Ok(())
    }

    pub fn remove_pod(&self, id: &str) -> Result<()> {
        let req = api::RemovePodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.rpc("RemovePodSandbox", CONTAINER_TIMEOUT, |mut c| async move {
            c.remove_pod_sandbox(request(req, CONTAINER_TIMEOUT)).await
        })?;
        Ok(())
    }

    /// Stop then remove, as kubelet does.
    pub fn stop_and_remove_pod(&self, id: &str) -> Result<()> {
        self.stop_pod(id)?;
        self.remove_pod(id)
    }

    // -- containers ------------------------------------------------------------

    /// CreateContainer in pod `pod_id` (whose config was `pod`); returns the
    /// container id.
    pub fn create_container(
        &self,
        pod_id: &str,
        config: &api::ContainerConfig,
        pod: &api::PodSandboxConfig,
    ) -> Result<String> {
        let req = api::CreateContainerRequest {
            pod_sandbox_id: pod_id.to_string(),
            config: Some(config.clone()),
            sandbox_config: Some(pod.clone()),
        };
        Ok(self
            .rpc("CreateContainer", CONTAINER_TIMEOUT, |mut c| async move {
                c.create_container(request(req, CONTAINER_TIMEOUT)).await
            })?
            .container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<()> {
        let req = api::StartContainerRequest {
            container_id: id.to_string(),
        };
        self.rpc("StartContainer", CONTAINER_TIMEOUT, |mut c| async move {
            c.start_container(request(req, CONTAINER_TIMEOUT)).await
        })?;
        Ok(())
    }

    /// Create + start; returns the container id.
    pub fn run_container(
        &self,
        pod_id: &str,
        config: &api::ContainerConfig,
        pod: &api::PodSandboxConfig,
    ) -> Result<String> {
        let id = self.create_container(pod_id, config, pod)?;
        self.start_container(&id)?;
        Ok(id)
    }

    /// StopContainer: SIGTERM (or the image's StopSignal), SIGKILL after
    /// `grace_secs`.
    pub fn stop_container(&self, id: &str, grace_secs: i64) -> Result<()> {
        let req = api::StopContainerRequest {
            container_id: id.to_string(),
            timeout: grace_secs,
        };
        let t = CALL_TIMEOUT + Duration::from_secs(grace_secs.max(0) as u64);
        self.rpc("StopContainer", t, |mut c| async move {
            c.stop_container(request(req, t)).await
        })?;
        Ok(())
    }

    pub fn remove_container(&self, id: &str) -> Result<()> {
        let req = api::RemoveContainerRequest {
            container_id: id.to_string(),
        };
        self.rpc("RemoveContainer", CALL_TIMEOUT, |mut c| async move {
            c.remove_container(request(req, CALL_TIMEOUT)).await
        })?;
        Ok(())
    }

    /// Containers, all or those of pod `pod_id`.
    pub fn list_containers(&self, pod_id: Option<&str>) -> Result<Vec<api::Container>> {
        let req = api::ListContainersRequest {
            filter: pod_id.map(|p| api::ContainerFilter {
                pod_sandbox_id: p.to_string(),
                ..Default::default()
            }),
        };
        Ok(self
            .rpc("ListContainers", CALL_TIMEOUT, |mut c| async move {
                c.list_containers(request(req, CALL_TIMEOUT)).await
            })?
            .containers)
    }

    pub fn container_status(&self, id: &str) -> Result<api::ContainerStatus> {
        let req = api::ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: false,
        };
        self.rpc("ContainerStatus", CALL_TIMEOUT, |mut c| async move {
            c.container_status(request(req, CALL_TIMEOUT)).await
        })?
        .status
        .context("ContainerStatus without status")
    }

    /// The container's state (CREATED, RUNNING, EXITED, UNKNOWN).
    pub fn container_state(&self, id: &str) -> Result<api::ContainerState> {
        Ok(state_of(&self.container_status(id)?))
    }

    /// Polls ContainerStatus until the container is in `want`.
    pub fn wait_container_state(
        &self,
        id: &str,
        want: api::ContainerState,
        timeout: Duration,
    ) -> Result<api::ContainerStatus> {
        let start = Instant::now();
        loop {
            let st = self.container_status(id)?;
            if state_of(&st) == want {
                return Ok(st);
            }
            if start.elapsed() > timeout {
                bail!(
                    "container {id} is {:?}, not {want:?}, after {timeout:?} (reason {:?}, message {:?})",
                    state_of(&st),
                    st.reason,
                    st.message
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    // -- exec ------------------------------------------------------------------

    /// ExecSync with `timeout` (0: none; the call's deadline is then
    /// [`CALL_TIMEOUT`]).
    pub fn exec_sync(&self, id: &str, cmd: &[&str], timeout: Duration) -> Result<ExecOutput> {
        let req = api::ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout.as_secs() as i64,
        };
        let deadline = if timeout.is_zero() {
            CALL_TIMEOUT
        } else {
            timeout + Duration::from_secs(30)
        };
        let t0 = Instant::now();
        let r = self.rpc("ExecSync", deadline, |mut c| async move {
            c.exec_sync(request(req, deadline)).await
        })?;
        Ok(ExecOutput {
            stdout: r.stdout,
            stderr: r.stderr,
            exit_code: r.exit_code,
            duration: t0.elapsed(),
        })
    }

    /// The CRI Exec call: returns the streaming server URL for `req`.
    pub fn exec_url(&self, req: &api::ExecRequest) -> Result<String> {
        let req = req.clone();
        Ok(self
            .rpc("Exec", CALL_TIMEOUT, |mut c| async move {
                c.exec(request(req, CALL_TIMEOUT)).await
            })?
            .url)
    }

    /// Streaming Exec: runs `cmd` through the URL the CRI Exec call returns,
    /// writes `stdin` (if any) and collects stdout, stderr and the exit code
    /// until the stream ends or `timeout` passes.
    pub fn exec_stream(
        &self,
        id: &str,
        cmd: &[&str],
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<StreamOutput> {
        let session = self.exec_session(id, cmd, false, stdin.is_some())?;
        if let Some(data) = stdin {
            session.send(data)?;
        }
        session.wait(timeout)
    }

    /// Starts a streaming Exec session (stdout always; stderr unless `tty`).
    pub fn exec_session(
        &self,
        id: &str,
        cmd: &[&str],
        tty: bool,
        stdin: bool,
    ) -> Result<ExecSession<'_>> {
        let url = self.exec_url(&api::ExecRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            tty,
            stdin,
            stdout: true,
            stderr: !tty,
        })?;
        ExecSession::connect(self, &url)
    }

    // -- stats -----------------------------------------------------------------

    pub fn container_stats(&self, id: &str) -> Result<api::ContainerStats> {
        let req = api::ContainerStatsRequest {
            container_id: id.to_string(),
        };
        self.rpc("ContainerStats", CALL_TIMEOUT, |mut c| async move {
            c.container_stats(request(req, CALL_TIMEOUT)).await
        })?
        .stats
        .context("ContainerStats without stats")
    }

    /// ListContainerStats, all or those of pod `pod_id`.
    pub fn list_container_stats(&self, pod_id: Option<&str>) -> Result<Vec<api::ContainerStats>> {
        let req = api::ListContainerStatsRequest {
            filter: pod_id.map(|p| api::ContainerStatsFilter {
                pod_sandbox_id: p.to_string(),
                ..Default::default()
            }),
        };
        Ok(self
            .rpc("ListContainerStats", CALL_TIMEOUT, |mut c| async move {
                c.list_container_stats(request(req, CALL_TIMEOUT)).await
            })?
            .stats)
    }
}

/// A container status's state as the enum.
pub fn state_of(st: &api::ContainerStatus) -> api::ContainerState {
    api::ContainerState::try_from(st.state).unwrap_or(api::ContainerState::ContainerUnknown)
}

/// (working set bytes, usage bytes, cpu core-nanoseconds) of a stats entry;
/// 0 where absent.
pub fn stats_figures(s: &api::ContainerStats) -> (u64, u64, u64) {
    let mem = s.memory.as_ref();
    (
        mem.and_then(|m| m.working_set_bytes.as_ref())
            .map_or(0, |v| v.value),
        mem.and_then(|m| m.usage_bytes.as_ref())
            .map_or(0, |v| v.value),
        s.cpu
            .as_ref()
            .and_then(|c| c.usage_core_nano_seconds.as_ref())
            .map_or(0, |v| v.value),
    )
}

// ---------------------------------------------------------------------------
// Streaming exec over websocket (remotecommand v4.channel.k8s.io)
// ---------------------------------------------------------------------------

/// The websocket subprotocol spoken to the streaming server.
pub const EXEC_PROTOCOL: &str = "v4.channel.k8s.io";

const CH_STDIN: u8 = 0;
const CH_STDOUT: u8 = 1;
const CH_STDERR: u8 = 2;
const CH_STATUS: u8 = 3;
const CH_RESIZE: u8 = 4;

/// What a streaming exec produced.
#[derive(Clone, Default)]
pub struct StreamOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// From the v4 status message: 0 on `Success`, the `ExitCode` cause on
    /// `NonZeroExitCode`; None if no status arrived.
    pub exit_code: Option<i32>,
    /// The raw status message (a Kubernetes `metav1.Status` in JSON).
    pub status: Option<String>,
    /// Whether the server closed the stream.
    pub closed: bool,
}

impl std::fmt::Debug for StreamOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamOutput")
            .field("exit_code", &self.exit_code)
            .field("stdout", &clip(&self.stdout_str()))
            .field("stderr", &clip(&self.stderr_str()))
            .field("status", &self.status)
            .field("closed", &self.closed)
            .finish()
    }
}

impl StreamOutput {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Parses a v4 status message into an exit code.
pub fn exit_code_from_status(json: &str) -> Option<i32> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    match v.get("status")?.as_str()? {
        "Success" => Some(0),
        _ => v
            .get("details")?
            .get("causes")?
            .as_array()?
            .iter()
            .find(|c| c.get("reason").and_then(|r| r.as_str()) == Some("ExitCode"))?
            .get("message")?
            .as_str()?
            .parse()
            .ok(),
    }
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
type WsSink = futures_util::stream::SplitSink<WsStream, tokio_tungstenite::tungstenite::Message>;

/// Opens the CRI streaming server's WebSocket at `url` (http(s) becomes
/// ws(s)) with the sub-protocol `protocol`, within 30 s.
fn connect_websocket(cri: &Cri, url: &str, protocol: &str, what: &str) -> Result<WsStream> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let ws_url = if let Some(rest) = url.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        url.to_string()
    };
    let mut req = ws_url
        .as_str()
        .into_client_request()
        .with_context(|| format!("{what} URL {url:?}"))?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse()?);
    let _rt = cri.rt.enter();
    let (ws, _resp) = cri
        .rt
        .block_on(tokio::time::timeout(
            Duration::from_secs(30),
            tokio_tungstenite::connect_async(req),
        ))
        .with_context(|| format!("websocket connect to {ws_url} timed out"))?
        .with_context(|| format!("websocket connect to {ws_url}"))?;
    Ok(ws)
}

/// A streaming exec in progress: what arrived so far is collected in the
/// background; stdin and terminal resizes go out on demand.
pub struct ExecSession<'a> {
    cri: &'a Cri,
    sink: Arc<tokio::sync::Mutex<WsSink>>,
    out: Arc<Mutex<StreamOutput>>,
    reader: Option<tokio::task::JoinHandle<()>>,
    pub url: String,
}

impl<'a> ExecSession<'a> {
    fn connect(cri: &'a Cri, url: &str) -> Result<Self> {
        use tokio_tungstenite::tungstenite::Message;
        let ws = connect_websocket(cri, url, EXEC_PROTOCOL, "exec")?;
        let (sink, mut stream) = ws.split();
        let out = Arc::new(Mutex::new(StreamOutput::default()));
        let o = out.clone();
        let reader = cri.rt.spawn(async move {
            while let Some(msg) = stream.next().await {
                let data: Vec<u8> = match msg {
                    Ok(Message::Binary(b)) => b.to_vec(),
                    Ok(Message::Text(t)) => t.as_bytes().to_vec(),
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => continue,
                };
                let Some((&ch, rest)) = data.split_first() else {
                    continue;
                };
                let mut o = o.lock().unwrap();
                match ch {
                    CH_STDOUT => o.stdout.extend_from_slice(rest),
                    CH_STDERR => o.stderr.extend_from_slice(rest),
                    CH_STATUS if !rest.is_empty() => {
                        let s = String::from_utf8_lossy(rest).into_owned();
                        o.exit_code = exit_code_from_status(&s);
                        o.status = Some(s);
                    }
                    _ => {}
                }
            }
            o.lock().unwrap().closed = true;
        });
        Ok(Self {
            cri,
            sink: Arc::new(tokio::sync::Mutex::new(sink)),
            out,
            reader: Some(reader),
            url: url.to_string(),
        })
    }

    fn send_channel(&self, ch: u8, data: &[u8]) -> Result<()> {
        use tokio_tungstenite::tungstenite::Message;
        let mut frame = Vec::with_capacity(data.len() + 1);
        frame.push(ch);
        frame.extend_from_slice(data);
        let sink = self.sink.clone();
        self.cri
            .rt
            .block_on(async move { sink.lock().await.send(Message::binary(frame)).await })
            .context("websocket send")
    }

    /// Writes to the process's stdin.
    pub fn send(&self, data: &[u8]) -> Result<()> {
        self.send_channel(CH_STDIN, data)
    }

    /// Sets the terminal size (tty sessions).
    pub fn resize(&self, cols: u16, rows: u16) -> Result<()> {
        let msg = serde_json::json!({ "Width": cols, "Height": rows }).to_string();
        self.send_channel(CH_RESIZE, msg.as_bytes())
    }

    /// What arrived so far.
    pub fn output(&self) -> StreamOutput {
        self.out.lock().unwrap().clone()
    }

    /// Waits until stdout after byte `from` contains `needle`; returns the
    /// end offset of the match.
    pub fn expect_from(&self, from: usize, needle: &str, timeout: Duration) -> Result<usize> {
        let start = Instant::now();
        loop {
            let (found, closed) = {
                let o = self.out.lock().unwrap();
                let hay = o.stdout.get(from..).unwrap_or_default();
                (
                    hay.windows(needle.len().max(1))
                        .position(|w| w == needle.as_bytes())
                        .map(|i| from + i + needle.len()),
                    o.closed,
                )
            };
            if let Some(end) = found {
                return Ok(end);
            }
            if closed || start.elapsed() > timeout {
                bail!(
                    "{needle:?} not seen on the exec stream within {:?}{}; stdout so far: {:?}",
                    start.elapsed(),
                    if closed { " (stream closed)" } else { "" },
                    self.output().stdout_str()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the stream to end (the process exited); returns everything.
    pub fn wait(mut self, timeout: Duration) -> Result<StreamOutput> {
        let start = Instant::now();
        while !self.out.lock().unwrap().closed {
            if start.elapsed() > timeout {
                bail!(
                    "exec stream still open after {timeout:?}; so far: {:?}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(r) = self.reader.take() {
            let _ = self.cri.rt.block_on(r);
        }
        Ok(self.output())
    }
}

impl Drop for ExecSession<'_> {
    fn drop(&mut self) {
        if let Some(r) = self.reader.take() {
            r.abort();
        }
    }
}

// ---------------------------------------------------------------------------
// Port forwarding
// ---------------------------------------------------------------------------

/// The WebSocket subprotocol of the CRI streaming server's port forwarding
/// (containerd `pkg/cri/streaming/portforward/websocket.go`): binary
/// messages, the first byte the channel. Port `i` of the request has the
/// data channel `2i` (both ways) and the error channel `2i + 1` (server to
/// client); the server's first bytes on each channel are the port, a
/// little-endian u16.
pub const PORT_FORWARD_PROTOCOL: &str = "v4.channel.k8s.io";
/// Largest data message the client sends.
const PORT_FORWARD_CHUNK: usize = 32 * 1024;

/// What arrived on one port's channels.
#[derive(Debug, Default, Clone)]
pub struct ForwardedPort {
    pub data: Vec<u8>,
    pub error: Vec<u8>,
    /// Port-header bytes still expected on the data and error channels.
    header_left: [usize; 2],
    header: [Vec<u8>; 2],
}

#[derive(Debug, Default)]
struct PortForwardState {
    ports: Vec<ForwardedPort>,
    closed: bool,
    /// A message the protocol does not allow (unknown channel, wrong port).
    protocol_error: Option<String>,
}

impl Cri {
    /// The CRI PortForward call: the streaming server URL for `ports` of
    /// the pod.
    pub fn port_forward_url(&self, pod_id: &str, ports: &[u16]) -> Result<String> {
        let req = api::PortForwardRequest {
            pod_sandbox_id: pod_id.to_string(),
            port: ports.iter().map(|p| i32::from(*p)).collect(),
        };
        Ok(self
            .rpc("PortForward", CALL_TIMEOUT, |mut c| async move {
                c.port_forward(request(req, CALL_TIMEOUT)).await
            })?
            .url)
    }

    /// Starts port forwarding to `ports` of the pod, as `kubectl
    /// port-forward` does over WebSockets.
    pub fn port_forward(&self, pod_id: &str, ports: &[u16]) -> Result<PortForwardSession<'_>> {
        let url = self.port_forward_url(pod_id, ports)?;
        PortForwardSession::connect(self, &url, ports)
    }
}

/// A port-forward stream in progress: what arrives is collected in the
/// background; data goes out on demand.
pub struct PortForwardSession<'a> {
    cri: &'a Cri,
    ports: Vec<u16>,
    sink: Arc<tokio::sync::Mutex<WsSink>>,
    state: Arc<Mutex<PortForwardState>>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl<'a> PortForwardSession<'a> {
    fn connect(cri: &'a Cri, url: &str, ports: &[u16]) -> Result<Self> {
        use tokio_tungstenite::tungstenite::Message;
        let ws = connect_websocket(cri, url, PORT_FORWARD_PROTOCOL, "port-forward")?;
        let (sink, mut stream) = ws.split();
        let state = Arc::new(Mutex::new(PortForwardState {
            ports: ports
                .iter()
                .map(|_| ForwardedPort {
                    header_left: [2, 2],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }));
        let st = state.clone();
        let expected: Vec<u16> = ports.to_vec();
        let reader = cri.rt.spawn(async move {
            while let Some(msg) = stream.next().await {
                let data: Vec<u8> = match msg {
                    Ok(Message::Binary(b)) => b.to_vec(),
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => continue,
                };
                let Some((&ch, mut rest)) = data.split_first() else {
                    continue;
                };
                let mut st = st.lock().unwrap();
                let (index, kind) = (usize::from(ch / 2), usize::from(ch % 2));
                let Some(port) = st.ports.get_mut(index) else {
                    st.protocol_error = Some(format!("message on unknown channel {ch}"));
                    continue;
                };
                let take = port.header_left[kind].min(rest.len());
                port.header[kind].extend_from_slice(&rest[..take]);
                port.header_left[kind] -= take;
                rest = &rest[take..];
                if take > 0 && port.header_left[kind] == 0 {
                    let got = u16::from_le_bytes([port.header[kind][0], port.header[kind][1]]);
                    if got != expected[index] {
                        st.protocol_error = Some(format!(
                            "channel {ch} names port {got}, expected {}",
                            expected[index]
                        ));
                        continue;
                    }
                }
                if kind == 0 {
                    port.data.extend_from_slice(rest);
                } else {
                    port.error.extend_from_slice(rest);
                }
            }
            st.lock().unwrap().closed = true;
        });
        Ok(Self {
            cri,
            ports: ports.to_vec(),
            sink: Arc::new(tokio::sync::Mutex::new(sink)),
            state,
            reader: Some(reader),
        })
    }

    fn index(&self, port: u16) -> Result<usize> {
        self.ports
            .iter()
            .position(|p| *p == port)
            .with_context(|| format!("port {port} is not part of this port-forward session"))
    }

    /// Sends `data` to `port` (in messages of at most 32 KiB).
    pub fn send(&self, port: u16, data: &[u8]) -> Result<()> {
        use tokio_tungstenite::tungstenite::Message;
        let ch = u8::try_from(self.index(port)? * 2).context("too many ports")?;
        let sink = self.sink.clone();
        let frames: Vec<Vec<u8>> = data
            .chunks(PORT_FORWARD_CHUNK)
            .map(|c| {
                let mut f = Vec::with_capacity(c.len() + 1);
                f.push(ch);
                f.extend_from_slice(c);
                f
            })
            .collect();
        self.cri
            .rt
            .block_on(async move {
                let mut sink = sink.lock().await;
                for f in frames {
                    sink.send(Message::binary(f)).await?;
                }
                Ok::<_, tokio_tungstenite::tungstenite::Error>(())
            })
            .context("websocket send")
    }

    /// What arrived so far for `port`.
    pub fn port(&self, port: u16) -> Result<ForwardedPort> {
        let i = self.index(port)?;
        let st = self.state.lock().unwrap();
        if let Some(e) = &st.protocol_error {
            bail!("port-forward protocol error: {e}");
        }
        Ok(st.ports[i].clone())
    }

    /// Whether the server closed the stream.
    pub fn closed(&self) -> bool {
        self.state.lock().unwrap().closed
    }

    /// Waits until `pred` holds for `port`'s channels; fails at `timeout`
    /// or when the stream closed first.
    pub fn wait_for(
        &self,
        port: u16,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&ForwardedPort) -> bool,
    ) -> Result<ForwardedPort> {
        let start = Instant::now();
        loop {
            let p = self.port(port)?;
            if pred(&p) {
                return Ok(p);
            }
            let closed = self.closed();
            if closed || start.elapsed() > timeout {
                bail!(
                    "port {port}: {what} not seen within {:?}{}: {} data bytes, error {:?}",
                    start.elapsed(),
                    if closed { " (stream closed)" } else { "" },
                    p.data.len(),
                    String::from_utf8_lossy(&p.error)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the server to close the stream.
    pub fn wait_closed(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while !self.closed() {
            ensure!(
                start.elapsed() < timeout,
                "the port-forward stream is still open after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for PortForwardSession<'_> {
    fn drop(&mut self) {
        if let Some(r) = self.reader.take() {
            r.abort();
        }
        let sink = self.sink.clone();
        let _ = self.cri.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(5), async move {
                sink.lock().await.close().await
            })
            .await
        });
    }
}

// ---------------------------------------------------------------------------
// Configs
// ---------------------------------------------------------------------------

/// The pod's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodNetwork {
    /// `hostNetwork: true`: the node's network namespace, no CNI.
    Node,
    /// A network namespace of its own, set up by CNI.
    Pod,
}

pub fn image_spec(name: &str) -> api::ImageSpec {
    api::ImageSpec {
        image: name.to_string(),
        ..Default::default()
    }
}

/// A pod config like kubelet's: metadata, log directory, labels, Linux
/// namespaces (network per `net`, PID per container, IPC per pod).
pub fn pod_config(
    name: &str,
    namespace: &str,
    uid: &str,
    log_dir: &Path,
    net: PodNetwork,
) -> api::PodSandboxConfig {
    let network = match net {
        PodNetwork::Node => api::NamespaceMode::Node,
        PodNetwork::Pod => api::NamespaceMode::Pod,
    };
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: name.to_string(),
            uid: uid.to_string(),
            namespace: namespace.to_string(),
            attempt: 0,
        }),
        hostname: if net == PodNetwork::Pod {
            name.to_string()
        } else {
            String::new()
        },
        log_directory: log_dir.display().to_string(),
        labels: HashMap::from([
            ("io.kubernetes.pod.name".to_string(), name.to_string()),
            (
                "io.kubernetes.pod.namespace".to_string(),
                namespace.to_string(),
            ),
            ("io.kubernetes.pod.uid".to_string(), uid.to_string()),
        ]),
        linux: Some(api::LinuxPodSandboxConfig {
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(api::NamespaceOption {
                    network: network as i32,
                    pid: api::NamespaceMode::Container as i32,
                    ipc: api::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container config: `image`, `command` (replacing the image's
/// entrypoint), log file `<name>_<attempt>.log` in the pod's log directory,
/// namespaces following the pod's (kubelet repeats the pod's network mode
/// in each container's security context; containerd reads it there).
pub fn container_config(
    name: &str,
    attempt: u32,
    image: &str,
    command: &[&str],
    pod: &api::PodSandboxConfig,
) -> api::ContainerConfig {
    let pod_ns = pod
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default();
    api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: name.to_string(),
            attempt,
        }),
        image: Some(image_spec(image)),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: container_log_name(name, attempt),
        labels: HashMap::from([("io.kubernetes.container.name".to_string(), name.to_string())]),
        linux: Some(api::LinuxContainerConfig {
            resources: Some(api::LinuxContainerResources::default()),
            security_context: Some(api::LinuxContainerSecurityContext {
                namespace_options: Some(api::NamespaceOption {
                    network: pod_ns.network,
                    pid: pod_ns.pid,
                    ipc: pod_ns.ipc,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// The log file name [`container_config`] uses, relative to the pod's log dir.
pub fn container_log_name(name: &str, attempt: u32) -> String {
    format!("{name}_{attempt}.log")
}

/// Adds a bind mount of host `host_path` at `container_path`.
pub fn add_mount(c: &mut api::ContainerConfig, host_path: &Path, container_path: &str, ro: bool) {
    c.mounts.push(api::Mount {
        container_path: container_path.to_string(),
        host_path: host_path.display().to_string(),
        readonly: ro,
        ..Default::default()
    });
}

/// The container's Linux resources (created if absent).
pub fn resources_mut(c: &mut api::ContainerConfig) -> &mut api::LinuxContainerResources {
    c.linux
        .get_or_insert_with(Default::default)
        .resources
        .get_or_insert_with(Default::default)
}

/// Sets a memory limit (and the same memory+swap limit, as kubelet does).
pub fn set_memory_limit(c: &mut api::ContainerConfig, bytes: i64) {
    let r = resources_mut(c);
    r.memory_limit_in_bytes = bytes;
    r.memory_swap_limit_in_bytes = bytes;
}

/// Sets a CPU limit of `millicpus` (CFS quota over a 100 ms period).
pub fn set_cpu_limit(c: &mut api::ContainerConfig, millicpus: i64) {
    let r = resources_mut(c);
    r.cpu_period = 100_000;
    r.cpu_quota = millicpus * 100;
    r.cpu_shares = (millicpus * 1024 / 1000).max(2);
}

// ---------------------------------------------------------------------------
// Container logs
// ---------------------------------------------------------------------------

/// One line of a CRI container log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// RFC 3339 with nanoseconds.
    pub time: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// `P`: a partial line (split at the maximum line size), continued by
    /// the next line of the same stream; `F`: the line's last piece.
    pub partial: bool,
    pub text: String,
}

/// Parses one CRI log line `<time> <stream> <P|F> <text>`.
pub fn parse_log_line(line: &str) -> Option<LogLine> {
    let mut it = line.splitn(4, ' ');
    let time = it.next()?;
    let stream = it.next()?;
    let tag = it.next()?;
    let text = it.next().unwrap_or("");
    if !(stream == "stdout" || stream == "stderr") {
        return None;
    }
    let partial = match tag.split(':').next()? {
        "P" => true,
        "F" => false,
        _ => return None,
    };
    if !time.contains('T') {
        return None;
    }
    Some(LogLine {
        time: time.to_string(),
        stream: stream.to_string(),
        partial,
        text: text.to_string(),
    })
}

/// Reads a CRI log file; fails on a line not in the CRI format.
pub fn read_log(path: &Path) -> Result<Vec<LogLine>> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = String::from_utf8_lossy(&text);
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| parse_log_line(l).with_context(|| format!("not a CRI log line: {l:?}")))
        .collect()
}

/// The text of `stream` in `lines`, partial lines joined, one `\n` per
/// full line.
pub fn log_text(lines: &[LogLine], stream: &str) -> String {
    let mut s = String::new();
    for l in lines.iter().filter(|l| l.stream == stream) {
        s.push_str(&l.text);
        if !l.partial {
            s.push('\n');
        }
    }
    s
}

/// Waits until the log at `path` satisfies `pred`; returns its lines.
pub fn wait_log(
    path: &Path,
    timeout: Duration,
    pred: impl Fn(&[LogLine]) -> bool,
) -> Result<Vec<LogLine>> {
    let start = Instant::now();
    loop {
        let lines = read_log(path).unwrap_or_default();
        if pred(&lines) {
            return Ok(lines);
        }
        if start.elapsed() > timeout {
            let raw = std::fs::read(path)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_else(|e| format!("<{e}>"));
            bail!(
                "log {} did not show what was expected within {timeout:?}; it holds:\n{}",
                path.display(),
                clip(&raw)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------
// CNI: a bridge network on a private test subnet
// ---------------------------------------------------------------------------

/// A CNI bridge network (`bridge` + `host-local` IPAM, `isGateway`, no
/// masquerading, no iptables) on a private subnet inside this machine.
/// host-local keeps its allocations in a temp dir of ours.
///
/// Several test runs may share the machine: each network holds an
/// exclusive lock on its bridge name (`/run/lock/ember-e2e-cni-<bridge>.lock`)
/// for its lifetime, so two runs never share a bridge or hand out the same
/// addresses; [`CniNetwork::pick`] takes the first free slot. On drop the
/// bridge is deleted (no other run can be using it: we hold its lock).
pub struct CniNetwork {
    pub name: String,
    pub bridge: String,
    pub subnet: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub bin_dir: PathBuf,
    data_dir: tempfile::TempDir,
    /// Held (flock) while the network exists; None in unit tests.
    lock: Option<std::fs::File>,
}

/// Whether network interface `name` exists.
pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

impl CniNetwork {
    /// The first free of `slots` networks: bridge `<bridge_base><i>` on
    /// the /24 `subnet_base` + i (third octet), i = 0.., e.g. `ember-cni0`
    /// on 10.88.77.0/24, `ember-cni1` on 10.88.78.0/24, ...
    pub fn pick(name: &str, bridge_base: &str, subnet_base: Ipv4Addr, slots: u8) -> Result<Self> {
        let mut why = Vec::new();
        for i in 0..slots {
            let [a, b, c, _] = subnet_base.octets();
            let Some(c) = c.checked_add(i) else { break };
            let subnet = Ipv4Addr::new(a, b, c, 0);
            match Self::bridge(name, &format!("{bridge_base}{i}"), subnet, 24) {
                Ok(n) => return Ok(n),
                Err(e) => why.push(format!("{e:#}")),
            }
        }
        bail!("no free CNI test network: {}", why.join("; "))
    }

    /// `name` (the CNI network name), `bridge` (the host bridge it creates),
    /// `subnet`/`prefix`; the gateway (bridge address) is the subnet's .1.
    /// Fails if the CNI plugins are missing, another run holds the bridge,
    /// or the subnet is routed elsewhere.
    pub fn bridge(name: &str, bridge: &str, subnet: Ipv4Addr, prefix: u8) -> Result<Self> {
        let bin_dir = std::env::var_os("EMBER_CNI_BIN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/usr/lib/cni".into());
        for plugin in ["bridge", "host-local", "loopback"] {
            ensure!(
                bin_dir.join(plugin).exists(),
                "CNI plugin {} missing (apt-get install containernetworking-plugins)",
                bin_dir.join(plugin).display()
            );
        }
        ensure!((8..=30).contains(&prefix), "prefix /{prefix}");
        let gateway = Ipv4Addr::from(u32::from(subnet) + 1);
        let lock_dir = Path::new("/run/lock");
        let lock_path = if lock_dir.is_dir() {
            lock_dir.join(format!("ember-e2e-cni-{bridge}.lock"))
        } else {
            std::env::temp_dir().join(format!("ember-e2e-cni-{bridge}.lock"))
        };
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        // SAFETY: flock on an fd we own.
        let rc = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        ensure!(
            rc == 0,
            "bridge {bridge} is in use by another test run ({} is locked)",
            lock_path.display()
        );
        // Someone else's route to this subnet would make the test lie.
        let routes = std::process::Command::new("ip")
            .args(["-4", "route", "show", "to", "match", &gateway.to_string()])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        // An existing bridge of that name may be a run's that takes no lock
        // (an older version of this code) or a crashed run's: not ours to
        // reuse or delete.
        ensure!(
            !link_exists(bridge),
            "bridge {bridge} already exists (another test run's?)"
        );
        for l in routes.lines() {
            ensure!(
                l.starts_with("default"),
                "subnet {subnet}/{prefix} is already routed on this host: {l:?}"
            );
        }
        let data_dir = tempfile::Builder::new()
            .prefix("ember-cni-ipam-")
            .tempdir_in("/tmp")?;
        Ok(Self {
            name: name.to_string(),
            bridge: bridge.to_string(),
            subnet,
            prefix,
            gateway,
            bin_dir,
            data_dir,
            lock: Some(lock),
        })
    }

    /// The conflist containerd reads.
    pub fn conflist(&self) -> String {
        serde_json::to_string_pretty(&serde_json::json!({
            "cniVersion": "0.4.0",
            "name": self.name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": self.data_dir.path().display().to_string(),
                        "ranges": [[{
                            "subnet": format!("{}/{}", self.subnet, self.prefix),
                            "gateway": self.gateway.to_string(),
                        }]],
                        "routes": [{ "dst": "0.0.0.0/0" }],
                    },
                },
            ],
        }))
        .expect("static JSON")
    }

    /// For [`crate::containerd::Options::cni`].
    pub fn options(&self) -> CniOptions {
        CniOptions {
            bin_dir: self.bin_dir.clone(),
            conflists: vec![(format!("10-{}.conflist", self.name), self.conflist())],
        }
    }

    /// Whether `ip` is in the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        (u32::from(ip) & mask) == (u32::from(self.subnet) & mask)
    }

    /// Addresses host-local has handed out and not released.
    pub fn allocated(&self) -> Vec<String> {
        let dir = self.data_dir.path().join(&self.name);
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<Ipv4Addr>().is_ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for CniNetwork {
    fn drop(&mut self) {
        if self.lock.is_some() && link_exists(&self.bridge) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &self.bridge])
                .status();
        }
        // The lock goes with the file.
        self.lock = None;
    }
}

/// Network namespaces containerd's CRI created (`/var/run/netns/cni-*`).
pub fn cni_netns() -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("cni-"))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines() {
        let l = parse_log_line("2026-11-26T10:00:00.123456789Z stdout F hello world").unwrap();
        assert_eq!(l.stream, "stdout");
        assert!(!l.partial);
        assert_eq!(l.text, "hello world");
        let p = parse_log_line("2026-11-26T10:00:00.1Z stderr P abc").unwrap();
        assert!(p.partial);
        let e = parse_log_line("2026-11-26T10:00:00.1Z stdout F ").unwrap();
        assert_eq!(e.text, "");
        assert!(parse_log_line("garbage").is_none());
        let lines = vec![
            p,
            parse_log_line("2026-11-26T10:00:00.2Z stderr F def").unwrap(),
            l,
        ];
        assert_eq!(log_text(&lines, "stderr"), "abcdef\n");
        assert_eq!(log_text(&lines, "stdout"), "hello world\n");
    }

    #[test]
    fn exec_status() {
        assert_eq!(
            exit_code_from_status(r#"{"metadata":{},"status":"Success"}"#),
            Some(0)
        );
        let failure = r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: error executing command [sh -c exit 3], exit code 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#;
        assert_eq!(exit_code_from_status(failure), Some(3));
        assert_eq!(exit_code_from_status("nonsense"), None);
    }

    #[test]
    fn concurrent_networks_never_share_a_slot() {
        if !Path::new("/usr/lib/cni/bridge").exists() {
            return;
        }
        let base: Ipv4Addr = "10.88.200.0".parse().unwrap();
        let a = CniNetwork::pick("t", "ember-cnit", base, 4).unwrap();
        let b = CniNetwork::pick("t", "ember-cnit", base, 4).unwrap();
        assert_ne!(a.bridge, b.bridge);
        assert_ne!(a.subnet, b.subnet);
        drop(a);
        // The freed slot is taken again.
        let c = CniNetwork::pick("t", "ember-cnit", base, 4).unwrap();
        assert_ne!(c.bridge, b.bridge);
    }

    #[test]
    fn cni_subnet() {
        let n = CniNetwork {
            name: "t".into(),
            bridge: "t0".into(),
            subnet: "10.88.77.0".parse().unwrap(),
            prefix: 24,
            gateway: "10.88.77.1".parse().unwrap(),
            bin_dir: "/usr/lib/cni".into(),
            data_dir: tempfile::tempdir().unwrap(),
            lock: None,
        };
        assert!(n.contains("10.88.77.9".parse().unwrap()));
        assert!(!n.contains("10.88.78.9".parse().unwrap()));
        let v: serde_json::Value = serde_json::from_str(&n.conflist()).unwrap();
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert_eq!(
            v["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.88.77.0/24"
        );
    }
}
