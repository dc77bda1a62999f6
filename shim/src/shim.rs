//! The shim binary's containerd-facing entry points
//! (`containerd_shim::asynchronous::Shim`).
//!
//! - `start`: containerd runs the binary once per container. Containers of
//!   one pod share one long-lived shim (and so one VM): the grouping id is
//!   the CRI sandbox id, else the `io.ember.group` annotation, else the
//!   container id. If the pod's shim already serves, its address is
//!   returned; else a new shim is spawned. Handled in [`crate::start`],
//!   before containerd-shim sees the command line (containerd 2.x stdin).
//! - `delete`: containerd runs it when a shim's connection closed (after
//!   every normal task deletion too, in containerd 1.6). If the pod's shim
//!   still serves, there is nothing to do; if it is gone (crashed), what it
//!   mounted and its state directory are removed.
//! - the serving shim: the Task service ([`crate::task`]), confined by
//!   [`confine_if_serving`] before its runtime starts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::api::DeleteResponse;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{
    Config as ShimConfig, Error as ShimError, ExitSignal, Flags, Shim, StartOpts,
};
use containerd_shim_protos::protobuf::MessageField;

use ember_vmm::confine;

use crate::annotations;
use crate::config::{Config, Source};
use crate::events::{self, EventSink};
use crate::logging;
use crate::resources::{cgroup, mount};
use crate::sandbox::paths::SandboxPaths;
use crate::sandbox::process::UNKNOWN_EXIT_STATUS;
use crate::task::TaskService;

/// Passes the pod (grouping) id from `start` to the shim it spawns.
pub const POD_ID_ENV: &str = "EMBER_POD_ID";

/// How containerd-shim is set up for Ember: logging is ours (tracing into
/// containerd's log fifo), and the serving shim neither reaps children nor
/// is a subreaper: it runs no child processes (the VMM is in-process, and
/// mounts are syscalls), and containerd-shim's reaper would `waitpid(-1)`.
pub fn shim_config() -> ShimConfig {
    ShimConfig {
        no_setup_logger: true,
        default_log_level: "info".into(),
        no_reaper: true,
        no_sub_reaper: true,
    }
}

/// Confines the process if it is the long-lived serving shim (no action,
/// a socket to serve on): RLIMIT_NOFILE (`max_open_files`), the control
/// plane's capabilities and seccomp deny-list on every thread, and per-role
/// filters for the VMM's guest-driven threads (see `ember_vmm::confine`).
/// `start` and `delete` are short-lived, run by containerd, and never touch
/// a guest: they stay as containerd started them.
///
/// Must run before any other thread exists. A forbidden system call is
/// reported on containerd's log fifo (the serving shim's stderr is
/// /dev/null); a shim that cannot be confined does not serve.
pub fn confine_if_serving() {
    // The hook runner this binary also is (see its docs) never returns.
    crate::resources::hooks::runner::serve_if_runner();
    let args: Vec<_> = std::env::args_os().collect();
    let Ok(flags) = containerd_shim::parse(args.get(1..).unwrap_or_default()) else {
        // containerd_shim reports bad arguments itself.
        return;
    };
    if !flags.action.is_empty() || flags.socket.is_empty() || flags.version || flags.info {
        return;
    }
    if let Ok(file) = logging::open_log_fifo() {
        // Kept open for the life of the process: the SIGSYS handler
        // writes its line there.
        confine::sigsys::set_report_fd(std::os::fd::IntoRawFd::into_raw_fd(file));
    }
    let pod = std::env::var(POD_ID_ENV).unwrap_or_else(|_| flags.id.clone());
    confine::sigsys::set_label(&format!("{}/{pod}", flags.namespace));
    // A panic is reported as one line in containerd's log, without the
    // default hook's backtrace: capturing one opens files, which the
    // seccomp filters of vCPU and device threads forbid (the report would
    // become a SIGSYS that hides the panic).
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let line = format!(
            "ember: panic in thread {} at {at}: {payload}\n",
            thread.name().unwrap_or("?")
        );
        // SAFETY: write(2) of a live buffer to the log descriptor this
        // process keeps open for its whole life.
        unsafe {
            libc::write(
                confine::sigsys::report_fd(),
                line.as_ptr().cast(),
                line.len(),
            )
        };
    }));
    // A broken config is reported by `new`; the defaults bound us meanwhile.
    let max_open_files = Config::load()
        .map(|(c, _)| c.max_open_files)
        .unwrap_or_else(|_| Config::default().max_open_files);
    // Forked while the process is single-threaded and unconfined: the
    // confined shim cannot exec hooks itself.
    if let Err(e) = crate::resources::hooks::runner::start() {
        refuse_to_serve(&format!("cannot start the hook runner of pod {pod}"), &e);
    }
    if let Err(e) = confine::process(confine::ProcessLimits { max_open_files }) {
        refuse_to_serve(&format!("cannot confine the shim of pod {pod}"), &e);
    }
}

/// One line in containerd's log (the SIGSYS report descriptor), then exit
/// 1: a shim that cannot be set up safely does not serve.
fn refuse_to_serve(what: &str, e: &dyn std::fmt::Display) -> ! {
    let line = format!("ember: {what}, not serving: {e}\n");
    // SAFETY: write(2) of a live buffer to an fd we hold.
    unsafe {
        libc::write(
            confine::sigsys::report_fd(),
            line.as_ptr().cast(),
            line.len(),
        )
    };
    std::process::exit(1);
}

pub struct EmberShim {
    id: String,
    namespace: String,
    address: String,
    bundle: PathBuf,
    config: Result<Arc<Config>, String>,
    exit: Arc<ExitSignal>,
}

fn shim_error(msg: impl Into<String>) -> ShimError {
    ShimError::Other(msg.into())
}

/// Whether a shim answers at `address` (`unix://path`).
pub(crate) fn shim_alive(address: &str) -> bool {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// The bundle's config.json, if it can be read (else JSON null).
fn bundle_spec(bundle: &std::path::Path) -> serde_json::Value {
    std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|d| serde_json::from_slice::<serde_json::Value>(&d).ok())
        .unwrap_or_default()
}

/// The annotations in the bundle's config.json, if it can be read.
pub(crate) fn bundle_annotations(
    bundle: &std::path::Path,
) -> std::collections::HashMap<String, String> {
    annotations::of_spec(&bundle_spec(bundle))
}

#[async_trait]
impl Shim for EmberShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut ShimConfig) -> Self {
        let loaded = Config::load();
        let level = match &loaded {
            Ok((c, _)) => c.log_level.clone(),
            Err(_) => "info".into(),
        };
        logging::init_shim(&args.action, args.debug, &level);
        let config = match loaded {
            Ok((c, source)) => {
                match &source {
                    Source::File(p) => tracing::debug!("config from {}", p.display()),
                    Source::Defaults(_) => tracing::debug!("config: {source}"),
                }
                Ok(Arc::new(c))
            }
            Err(e) => {
                tracing::error!("{e:#}");
                Err(format!("{e:#}"))
            }
        };
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        EmberShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            address: args.address.clone(),
            bundle,
            config,
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, _opts: StartOpts) -> Result<String, ShimError> {
        // issue 10: `start` never reaches containerd-shim: main.rs hands it
        // to crate::start (stdin of every containerd version, its reply).
        Err(shim_error("start is handled by ember_shim::start"))
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, ShimError> {
        let ann = bundle_annotations(&self.bundle);
        let pod = annotations::grouping_id(&ann, &self.id);
        // issue 10: the socket `start` recorded (containerd 2.3 may have
        // put it under its own socket_dir).
        let address = crate::start::recorded_address(&self.bundle).unwrap_or_else(|| {
            containerd_shim::socket_address(&self.address, &self.namespace, &pod)
        });
        if shim_alive(&address) {
            // The pod's shim runs (containerd calls delete after every
            // deletion): it cleans up after itself.
            tracing::debug!(container = %self.id, %pod, "the pod's shim is alive; nothing to clean");
        } else {
            let config = self.config.clone().unwrap_or_default();
            let paths = SandboxPaths::new(&config.state_dir, &self.namespace, &pod);
            let mut errors = crate::sandbox::cleanup_state(&paths);
            errors.extend(mount::detach_all_at(&self.bundle.join("rootfs")));
            // The pod's host cgroup, now that the shim has left it (the
            // sandbox's bundle names it; other bundles find nothing).
            match cgroup::pod_cgroup(
                &config.cgroup_parent,
                &self.namespace,
                &pod,
                &bundle_spec(&self.bundle),
            ) {
                Ok(path) => errors.extend(cgroup::remove(&path, cgroup::REMOVE_WAIT)),
                Err(e) => tracing::debug!(container = %self.id, "no pod cgroup to remove: {e:#}"),
            }
            for e in errors {
                tracing::warn!(container = %self.id, "cleanup after the shim: {e:#}");
            }
        }
        Ok(DeleteResponse {
            pid: 0,
            exit_status: UNKNOWN_EXIT_STATUS,
            exited_at: MessageField::some(events::timestamp(SystemTime::now())),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let pod = std::env::var(POD_ID_ENV).unwrap_or_else(|_| self.id.clone());
        let config = match &self.config {
            Ok(c) => c.clone(),
            Err(e) => {
                tracing::error!("invalid config ({e}); using the defaults");
                Arc::new(Config::default())
            }
        };
        tracing::info!(%pod, namespace = %self.namespace, version = crate::VERSION, "Ember shim serving");
        TaskService::new(
            &self.namespace,
            &pod,
            config,
            EventSink::new(publisher, &self.namespace),
            self.exit.clone(),
        )
    }
}
