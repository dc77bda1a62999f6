//! The `ember.agent.v1.Agent` ttrpc service.
//!
//! Every method is implemented. Container methods live in
//! [`crate::container`], sandbox-wide ones in [`crate::sandbox`], the
//! network ones in [`crate::network`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use ember_proto::agent::*;
use ember_proto::agent_ttrpc::Agent;
use ttrpc::r#async::TtrpcContext;
use ttrpc::{Code, Error as TtrpcError};

use crate::container::stdio::Transport;
use crate::container::{Manager, Settings};
use crate::reaper::Reaper;

/// Environment overrides (test mode; `EMBER_AGENT_CGROUP_ROOT` also in
/// the VM).
pub const RUN_DIR_ENV: &str = "EMBER_AGENT_RUN_DIR";
pub const SHARED_DIR_ENV: &str = "EMBER_AGENT_SHARED_DIR";
pub const CGROUP_ROOT_ENV: &str = "EMBER_AGENT_CGROUP_ROOT";

/// Default parent of the container cgroups in the VM.
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup/ember";

/// Whether SetTime really sets the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockControl {
    /// `clock_settime(CLOCK_REALTIME)` (PID 1 in the VM).
    Real,
    /// Validate and log only (test mode: never touch the host's clock).
    DryRun,
}

/// Service configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub clock: ClockControl,
    /// How long after answering Shutdown the shutdown signal fires, so the
    /// reply can leave the guest first.
    pub shutdown_grace: Duration,
    /// Containers: state, shared and cgroup directories, stdio transport.
    pub containers: Settings,
    /// Whether SetHostname really sets the guest's hostname.
    pub hostname: ClockControl,
    /// File SetDns writes.
    pub resolv_conf: std::path::PathBuf,
    /// Whether UpdateInterfaces and UpdateRoutes really change the
    /// network (never the host's in test mode).
    pub network: ClockControl,
}

fn env_path(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(Into::into)
}

impl Config {
    /// Configuration for PID 1 in the VM.
    pub fn init() -> Config {
        Config {
            clock: ClockControl::Real,
            shutdown_grace: Duration::from_millis(200),
            containers: Settings {
                run_dir: "/run/ember".into(),
                shared_dir: crate::container::spec::CANONICAL_SHARED_DIR.into(),
                cgroup_root: Some(
                    env_path(CGROUP_ROOT_ENV).unwrap_or_else(|| DEFAULT_CGROUP_ROOT.into()),
                ),
                stdio: Transport::Vsock,
            },
            hostname: ClockControl::Real,
            resolv_conf: "/etc/resolv.conf".into(),
            network: ClockControl::Real,
        }
    }

    /// Configuration for host-side tests: state in `EMBER_AGENT_RUN_DIR`
    /// (default `<tmp>/ember-agent-<pid>`), shared directory
    /// `EMBER_AGENT_SHARED_DIR` (default `<run dir>/shared`), cgroups only
    /// under `EMBER_AGENT_CGROUP_ROOT` (none when unset), stdio on Unix
    /// sockets `<run dir>/stdio-<port>.sock`, hostname and clock untouched,
    /// DNS written to `<run dir>/resolv.conf`.
    pub fn test() -> Config {
        let run_dir = env_path(RUN_DIR_ENV).unwrap_or_else(|| {
            std::env::temp_dir().join(format!("ember-agent-{}", std::process::id()))
        });
        Config {
            clock: ClockControl::DryRun,
            shutdown_grace: Duration::from_millis(20),
            containers: Settings {
                shared_dir: env_path(SHARED_DIR_ENV).unwrap_or_else(|| run_dir.join("shared")),
                cgroup_root: env_path(CGROUP_ROOT_ENV),
                stdio: Transport::Unix(run_dir.clone()),
                run_dir: run_dir.clone(),
            },
            hostname: ClockControl::DryRun,
            resolv_conf: run_dir.join("resolv.conf"),
            network: ClockControl::DryRun,
        }
    }
}

struct State {
    config: Config,
    reaper: Reaper,
    containers: Manager,
    shutting_down: AtomicBool,
    shutdown_tx: tokio::sync::watch::Sender<bool>,
}

/// The agent service. Cheap to clone.
#[derive(Clone)]
pub struct AgentService {
    state: Arc<State>,
}

/// Resolves once Shutdown has been answered (plus the grace period).
pub struct ShutdownSignal {
    rx: tokio::sync::watch::Receiver<bool>,
}

impl ShutdownSignal {
    /// Wait for the shutdown request. Also returns if the service is gone.
    pub async fn requested(&mut self) {
        let _ = self.rx.wait_for(|v| *v).await;
    }
}

impl AgentService {
    pub fn new(config: Config, reaper: Reaper) -> (AgentService, ShutdownSignal) {
        let (shutdown_tx, rx) = tokio::sync::watch::channel(false);
        if let Err(e) = std::fs::create_dir_all(&config.containers.run_dir) {
            tracing::warn!("creating {}: {e}", config.containers.run_dir.display());
        }
        let containers = Manager::new(config.containers.clone(), reaper.clone());
        let svc = AgentService {
            state: Arc::new(State {
                config,
                containers,
                reaper,
                shutting_down: AtomicBool::new(false),
                shutdown_tx,
            }),
        };
        (svc, ShutdownSignal { rx })
    }

    /// The child reaper shared with the service (for process methods).
    pub fn reaper(&self) -> &Reaper {
        &self.state.reaper
    }

    pub fn is_shutting_down(&self) -> bool {
        self.state.shutting_down.load(Ordering::SeqCst)
    }
}

/// A ttrpc error status.
pub fn rpc_error(code: Code, msg: impl ToString) -> TtrpcError {
    TtrpcError::RpcStatus(ttrpc::get_status(code, msg))
}

/// `uname -r`, read once.
pub fn kernel_release() -> &'static str {
    static RELEASE: OnceLock<String> = OnceLock::new();
    RELEASE.get_or_init(|| {
        let mut uts = std::mem::MaybeUninit::<libc::utsname>::zeroed();
        // SAFETY: uname fills the struct; on failure we do not read it.
        if unsafe { libc::uname(uts.as_mut_ptr()) } != 0 {
            return String::from("unknown");
        }
        // SAFETY: initialised by a successful uname.
        let uts = unsafe { uts.assume_init() };
        // SAFETY: the kernel NUL-terminates the field within its length.
        let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) };
        release.to_string_lossy().into_owned()
    })
}

/// Validate a SetTime request: the time as (seconds, nanos) since the epoch.
/// Largest SeedEntropy request (the proto's limit).
const MAX_SEED_BYTES: usize = 4096;

/// Writes `data` into the kernel's pool: credited with RNDADDENTROPY (one
/// ioctl), or only mixed in by writing /dev/urandom; then forces a CRNG
/// reseed (RNDRESEEDCRNG). Without the reseed the kernel keeps generating
/// from its current key for up to a minute, so two guests restored from
/// one template would hand out the same /dev/urandom bytes.
fn add_entropy(data: &[u8], credit: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    /// _IOW('R', 0x03, int[2]).
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    /// _IO('R', 0x07).
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let mut urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    if credit {
        // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
        let mut info = Vec::with_capacity(8 + data.len());
        info.extend_from_slice(&((data.len() * 8) as i32).to_ne_bytes());
        info.extend_from_slice(&(data.len() as i32).to_ne_bytes());
        info.extend_from_slice(data);
        // SAFETY: `info` is a complete rand_pool_info (header then buf_size
        // bytes) that outlives the call; the fd is open for writing.
        let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
    } else {
        urandom.write_all(data)?;
    }
    // SAFETY: RNDRESEEDCRNG takes no argument; the fd is open.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG, 0) };
    if rc < 0 {
        return Err(std::io::Error::other(format!(
            "RNDRESEEDCRNG: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

pub fn validate_time(req: &SetTimeRequest) -> ttrpc::Result<(i64, i32)> {
    let ts = req
        .time
        .as_ref()
        .ok_or_else(|| rpc_error(Code::INVALID_ARGUMENT, "SetTime: time is missing"))?;
    if ts.seconds < 0 || !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(rpc_error(
            Code::INVALID_ARGUMENT,
            format!(
                "SetTime: invalid time {}s {}ns (need seconds >= 0, 0 <= nanos < 1e9)",
                ts.seconds, ts.nanos
            ),
        ));
    }
    Ok((ts.seconds, ts.nanos))
}

/// Signed difference `new - old` in seconds.
fn offset_secs(new: SystemTime, old: SystemTime) -> f64 {
    match new.duration_since(old) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

#[ember_proto::async_trait]
impl Agent for AgentService {
    async fn health(
        &self,
        _ctx: &TtrpcContext,
        _req: HealthRequest,
    ) -> ttrpc::Result<HealthResponse> {
        let mut r = HealthResponse::new();
        r.status = if self.is_shutting_down() {
            health_response::Status::NOT_SERVING
        } else {
            health_response::Status::SERVING
        }
        .into();
        Ok(r)
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: VersionRequest,
    ) -> ttrpc::Result<VersionResponse> {
        let mut r = VersionResponse::new();
        r.agent_version = crate::AGENT_VERSION.to_string();
        r.protocol_version = ember_proto::PROTOCOL_VERSION;
        r.kernel_release = kernel_release().to_string();
        Ok(r)
    }

    async fn set_time(&self, _ctx: &TtrpcContext, req: SetTimeRequest) -> ttrpc::Result<Empty> {
        let (secs, nanos) = validate_time(&req)?;
        let new = SystemTime::UNIX_EPOCH + Duration::new(secs as u64, nanos as u32);
        let before = SystemTime::now();
        match self.state.config.clock {
            ClockControl::Real => {
                let ts = nix::sys::time::TimeSpec::new(secs, nanos as i64);
                nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(|e| {
                    tracing::error!("clock_settime: {e}");
                    rpc_error(Code::INTERNAL, format!("SetTime: clock_settime: {e}"))
                })?;
                tracing::info!(
                    "clock set to {secs}.{nanos:09} (guest was {:+.3} s off)",
                    offset_secs(before, new)
                );
            }
            ClockControl::DryRun => tracing::info!(
                "test mode: would set clock to {secs}.{nanos:09} ({:+.3} s from now)",
                offset_secs(new, before)
            ),
        }
        Ok(Empty::new())
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        if self.state.shutting_down.swap(true, Ordering::SeqCst) {
            tracing::info!("Shutdown: already shutting down");
            return Ok(Empty::new());
        }
        tracing::info!("Shutdown requested");
        // Answer first: fire the signal on a task after a grace period, so
        // the reply is written to the connection before the VM goes away.
        let state = self.state.clone();
        tokio::spawn(async move {
            tokio::time::sleep(state.config.shutdown_grace).await;
            let _ = state.shutdown_tx.send(true);
        });
        Ok(Empty::new())
    }

    // ---- containers ----

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        self.state.containers.create(req).await
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: StartContainerRequest,
    ) -> ttrpc::Result<StartContainerResponse> {
        self.state.containers.start(req).await
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        self.state.containers.exec(req).await
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.state
            .containers
            .signal(req)
            .await
            .map(|()| Empty::new())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        self.state.containers.wait(req).await
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: StatsContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        self.state.containers.stats(req).await
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.state
            .containers
            .update(req)
            .await
            .map(|()| Empty::new())
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: PauseContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.state
            .containers
            .freeze(&req.container_id, true)
            .await
            .map(|()| Empty::new())
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: ResumeContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.state
            .containers
            .freeze(&req.container_id, false)
            .await
            .map(|()| Empty::new())
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.state
            .containers
            .remove(req)
            .await
            .map(|()| Empty::new())
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: ListProcessesRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        self.state.containers.list(req).await
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        self.state
            .containers
            .resize_pty(req)
            .await
            .map(|()| Empty::new())
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: CloseStdinRequest,
    ) -> ttrpc::Result<Empty> {
        self.state
            .containers
            .close_stdin(req)
            .await
            .map(|()| Empty::new())
    }

    async fn get_oom_event(
        &self,
        _ctx: &TtrpcContext,
        _req: GetOOMEventRequest,
    ) -> ttrpc::Result<OOMEvent> {
        self.state.containers.oom_event().await
    }

    // ---- sandbox ----

    async fn set_dns(&self, _ctx: &TtrpcContext, req: SetDnsRequest) -> ttrpc::Result<Empty> {
        let content = crate::sandbox::resolv_conf(&req.nameservers, &req.searches, &req.options)?;
        let path = &self.state.config.resolv_conf;
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(path, content).map_err(|e| {
            rpc_error(
                Code::INTERNAL,
                format!("SetDns: write {}: {e}", path.display()),
            )
        })?;
        Ok(Empty::new())
    }

    async fn set_hostname(
        &self,
        _ctx: &TtrpcContext,
        req: SetHostnameRequest,
    ) -> ttrpc::Result<Empty> {
        crate::sandbox::validate_hostname(&req.hostname)?;
        match self.state.config.hostname {
            ClockControl::Real => nix::unistd::sethostname(&req.hostname)
                .map_err(|e| rpc_error(Code::INTERNAL, format!("SetHostname: sethostname: {e}")))?,
            ClockControl::DryRun => {
                tracing::info!("test mode: would set hostname to {:?}", req.hostname)
            }
        }
        Ok(Empty::new())
    }

    async fn add_mounts(&self, _ctx: &TtrpcContext, req: AddMountsRequest) -> ttrpc::Result<Empty> {
        let shared = &self.state.config.containers.shared_dir;
        for m in &req.mounts {
            crate::sandbox::mount(m, std::path::Path::new(&m.target), shared)?;
        }
        Ok(Empty::new())
    }

    async fn update_interfaces(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateInterfacesRequest,
    ) -> ttrpc::Result<Empty> {
        match self.state.config.network {
            ClockControl::Real => crate::network::update_interfaces(&req).await?,
            ClockControl::DryRun => {
                tracing::info!("test mode: would configure {:?}", req.interfaces)
            }
        }
        Ok(Empty::new())
    }

    async fn update_routes(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateRoutesRequest,
    ) -> ttrpc::Result<Empty> {
        match self.state.config.network {
            ClockControl::Real => crate::network::update_routes(&req).await?,
            ClockControl::DryRun => tracing::info!("test mode: would add routes {:?}", req.routes),
        }
        Ok(Empty::new())
    }

    /// Mixes host randomness into the guest pool. A VM restored from a
    /// template starts with the template's pool state, so the host hands
    /// every restored guest fresh bytes before anything else runs there.
    async fn seed_entropy(
        &self,
        _ctx: &TtrpcContext,
        req: SeedEntropyRequest,
    ) -> ttrpc::Result<Empty> {
        if req.data.is_empty() || req.data.len() > MAX_SEED_BYTES {
            return Err(rpc_error(
                Code::INVALID_ARGUMENT,
                format!(
                    "SeedEntropy: {} bytes given, 1 to {MAX_SEED_BYTES} accepted",
                    req.data.len()
                ),
            ));
        }
        match self.state.config.clock {
            ClockControl::Real => add_entropy(&req.data, req.credit).map_err(|e| {
                tracing::error!("SeedEntropy: {e}");
                rpc_error(Code::INTERNAL, format!("SeedEntropy: {e}"))
            })?,
            ClockControl::DryRun => tracing::info!(
                "test mode: would mix {} bytes into the entropy pool",
                req.data.len()
            ),
        }
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(seconds: i64, nanos: i32) -> SetTimeRequest {
        let mut ts = Timestamp::new();
        ts.seconds = seconds;
        ts.nanos = nanos;
        let mut r = SetTimeRequest::new();
        r.time = Some(ts).into();
        r
    }

    #[test]
    fn set_time_validation() {
        assert_eq!(
            validate_time(&req(1_700_000_000, 5)).unwrap(),
            (1_700_000_000, 5)
        );
        assert!(validate_time(&req(-1, 0)).is_err());
        assert!(validate_time(&req(0, 1_000_000_000)).is_err());
        assert!(validate_time(&req(0, -1)).is_err());
        assert!(validate_time(&SetTimeRequest::new()).is_err());
    }

    #[test]
    fn kernel_release_is_nonempty() {
        assert!(!kernel_release().is_empty());
    }
}
