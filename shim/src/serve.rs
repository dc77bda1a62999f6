//! The serving shim's ttrpc server: containerd's Task service and its
//! Sandbox API service on one socket, for one pod. The task service
//! answers under task API v2's name and v3's.
//!
//! containerd-shim 0.11's `run` registers the task service only, so the
//! serving path is Ember's own (as `start` is, see [`crate::start`]); the
//! crate still parses the flags and runs `delete`. What it keeps from the
//! crate's serving path: the socket given by `-socket` (an "address in use"
//! that answers means another instance serves: this one leaves), stdout
//! closed once the server listens (which tells `start` the shim is up),
//! SIGTERM and SIGINT logged and otherwise ignored (containerd ends a shim
//! through Shutdown), and the socket removed on exit.

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Flags, Shim};
use containerd_shim_protos::sandbox_async::create_sandbox;
use containerd_shim_protos::shim_async::create_task;
use containerd_shim_protos::ttrpc::r#async::transport::Listener;
use containerd_shim_protos::ttrpc::r#async::{Server, Service};
use tokio::signal::unix::{signal, SignalKind};

use crate::sandbox_service::SandboxService;
use crate::shim::{shim_config, EmberShim};

/// The path of a `unix://` socket address.
fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

/// Binds the shim's socket. `None`: another shim already serves there.
async fn listen(address: &str) -> anyhow::Result<Option<tokio::net::UnixListener>> {
    let path = Path::new(socket_path(address));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    match tokio::net::UnixListener::bind(path) {
        Ok(l) => Ok(Some(l)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Ok(None);
            }
            // A stale socket of a shim that died: take its place.
            remove_socket(address);
            Ok(Some(tokio::net::UnixListener::bind(path).with_context(
                || format!("listening on {}", path.display()),
            )?))
        }
        Err(e) => Err(e).with_context(|| format!("listening on {}", path.display())),
    }
}

fn remove_socket(address: &str) {
    let path = Path::new(socket_path(address));
    if path
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_socket())
    {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!("removing the shim's socket {}: {e}", path.display());
        }
    }
}

/// Closes the pipe `start` reads: stdout becomes stderr (containerd's log
/// fifo, or /dev/null).
fn signal_server_started() -> anyhow::Result<()> {
    // SAFETY: dup2 on the process' own standard descriptors.
    if unsafe { libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO) } < 0 {
        bail!("dup2: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The task service under task API v3's name: v3 is v2's service and
/// messages in the package `containerd.task.v3` (same fields, same wire
/// form), so only the service name differs. `start` answers version 3 to
/// a containerd that says it speaks it ([`crate::start::Reply`]).
fn task_api_v3(v2: HashMap<String, Service>) -> HashMap<String, Service> {
    v2.into_iter()
        .map(|(name, service)| (name.replace(TASK_V2_PACKAGE, TASK_V3_PACKAGE), service))
        .collect()
}

const TASK_V2_PACKAGE: &str = "containerd.task.v2.";
const TASK_V3_PACKAGE: &str = "containerd.task.v3.";

/// Serves the pod until the shim is told to exit.
pub async fn serve(runtime_id: &str, flags: Flags) -> anyhow::Result<()> {
    let ttrpc_address =
        std::env::var("TTRPC_ADDRESS").context("TTRPC_ADDRESS (containerd's event socket)")?;
    let mut terms = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut ints = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = terms.recv() => tracing::debug!("SIGTERM received; the shim ends through Shutdown"),
                _ = ints.recv() => tracing::debug!("SIGINT received; the shim ends through Shutdown"),
            }
        }
    });
    let mut config = shim_config();
    let mut shim = EmberShim::new(runtime_id, &flags, &mut config).await;
    let Some(listener) = listen(&flags.socket).await? else {
        tracing::info!(socket = %flags.socket, "another shim already serves this socket");
        std::fs::write("address", &flags.socket).context("writing the address file")?;
        return signal_server_started();
    };
    let publisher = RemotePublisher::new(&ttrpc_address)
        .await
        .context("connecting to containerd's event socket")?;
    let task = shim.create_task_service(publisher).await;
    let sandbox = SandboxService::new(task.pod(), task.exit_signal());
    let listener = Listener::try_from(listener.into_std().context("listener")?)
        .context("creating the ttrpc listener")?;
    let task = Arc::new(task);
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(create_task(task.clone()))
        .register_service(task_api_v3(create_task(task)))
        .register_service(create_sandbox(Arc::new(sandbox)));
    server.start().await.context("starting the ttrpc server")?;
    signal_server_started()?;
    tracing::info!("Shim successfully started, waiting for exit signal...");
    shim.wait().await;
    tracing::info!("Shutting down shim instance");
    if let Err(e) = server.shutdown().await {
        tracing::debug!("ttrpc server shutdown: {e}");
    }
    remove_socket(&flags.socket);
    Ok(())
}
