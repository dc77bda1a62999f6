//! Binding the ttrpc server. The same code serves vsock in the VM and a
//! Unix socket in tests; only the listener differs.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use ttrpc::r#async::transport::Listener;
use ttrpc::r#async::Server;

use crate::service::AgentService;
use crate::transport::Coalescing;

/// `vsock://<any cid>:1024`, the address the agent serves in the VM.
pub fn vsock_address() -> String {
    format!("vsock://-1:{}", ember_proto::AGENT_VSOCK_PORT)
}

/// Wrap every connection `listener` accepts in [`Coalescing`] (one write
/// per ttrpc frame, buffered reads).
pub fn coalescing(listener: Listener) -> Listener {
    Listener::new(listener.map(|conn| conn.map(Coalescing::new)))
}

/// Build the server for `service` on `listener` (not started yet). Every
/// accepted connection is wrapped with [`coalescing`].
pub fn build(service: AgentService, listener: Listener) -> Server {
    Server::new()
        .register_service(ember_proto::agent_ttrpc::create_agent(Arc::new(service)))
        .add_listener(coalescing(listener))
}

/// Build and start the server; it accepts connections on spawned tasks.
pub async fn start(service: AgentService, listener: Listener) -> anyhow::Result<Server> {
    let mut server = build(service, listener);
    server.start().await.context("starting the ttrpc server")?;
    Ok(server)
}

/// Listen on vsock port 1024. Retries a few times, slowly, in case the
/// vsock transport is not registered yet.
pub async fn bind_vsock() -> anyhow::Result<Listener> {
    let addr = vsock_address();
    let mut attempt = 1;
    loop {
        match Listener::bind(&addr) {
            Ok(l) => return Ok(l),
            Err(e) if attempt < 5 => {
                tracing::warn!("binding {addr} (attempt {attempt}): {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                attempt += 1;
            }
            Err(e) => return Err(e).with_context(|| format!("binding {addr}")),
        }
    }
}

/// Listen on a Unix socket (test mode). A stale socket file at `path` is
/// removed first; any other kind of file there is an error.
pub fn bind_unix(path: &Path) -> anyhow::Result<Listener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        } else {
            anyhow::bail!("{} exists and is not a socket", path.display());
        }
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding unix socket {}", path.display()))?;
    Ok(Listener::from(listener))
}
