//! `kubectl port-forward` for a pod: `localhost:<port>` in the pod's network
//! namespace on the host reaches `<port>` on the guest's loopback.
//!
//! containerd implements CRI PortForward by entering the pod's network
//! namespace on the host and dialing `localhost:<port>` there (tcp4 first,
//! then tcp6). With Ember nothing listens in that namespace: its only
//! interface besides `lo` is CNI's veth, whose frames tc redirects into the
//! VM. So the shim listens there itself, on 127.0.0.1 and ::1 for every
//! forwarded port, and carries each accepted connection to the agent over a
//! vsock stream of its own (protocol: [`ember_proto::port_forward`]). The
//! agent connects to the port on the guest's loopback and answers; if
//! nothing listens there, the shim resets the client's connection (an
//! RST, so containerd reports an error at once instead of an empty stream).
//!
//! Which ports: TCP listening cannot be lazy (a connection is only seen
//! once something accepted it), so the shim listens on the ports it knows
//! of: `port_forward_ports` of the config, the `io.ember.port_forward`
//! annotation (`8080,9090`) of the pod or a container, and the container
//! ports kubelet records in `io.kubernetes.container.ports` (when
//! containerd passes that annotation, see README). Ports are added as
//! containers are created and kept until the pod ends.
//!
//! The sockets are created by a short-lived thread that entered the pod's
//! network namespace (`setns`); a socket stays in the namespace it was
//! created in, so the shim's own threads never change namespace.
//!
//! The guest is not trusted. A hostile agent can only: refuse (the client
//! gets a reset), stay silent (the reply is awaited [`Limits::connect_timeout`],
//! then the client gets a reset), or move bytes at its own pace through a
//! connection a client opened (two fixed buffers of [`BUF`] bytes per
//! connection, backpressure otherwise). At most
//! [`Limits::max_connections`] connections are forwarded at once per pod;
//! more are reset at once. The shim only ever connects to the pod's own
//! hybrid-vsock socket; nothing the guest sends names a host address.
//! [`PortForwarder::close`] (pod teardown) stops the listeners and ends
//! every forwarded connection.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_proto::port_forward::{Family, Reply, Request, VSOCK_PORT};
use ember_vmm::net::in_netns;
use ember_vmm::{connect_hybrid_timeout, ConnectError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

/// Ember annotation: ports to forward, comma-separated (`8080,9090`).
pub const PORTS_ANNOTATION: &str = "io.ember.port_forward";
/// kubelet's record of a container's ports (JSON list of `ContainerPort`).
pub const KUBELET_PORTS_ANNOTATION: &str = "io.kubernetes.container.ports";
/// Ports one pod may forward (each is up to two listening sockets).
pub const MAX_PORTS: usize = 64;
/// Copy buffer per direction and connection.
pub const BUF: usize = 64 * 1024;
/// Default [`Limits::connect_timeout`]: the guest stream and the agent's
/// reply (a loopback connect in the guest) take well under a second even
/// on a slow guest.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed accept (EMFILE: let connections end first).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Bounds of one pod's port forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections forwarded at once; more are reset.
    pub max_connections: usize,
    /// How long opening the guest stream and the agent's reply may take.
    pub connect_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum PortForwardError {
    #[error("{0}")]
    Vsock(#[from] ConnectError),
    #[error("port-forward stream: {0}")]
    Io(#[from] io::Error),
    #[error("nothing listens on port {0} in the pod")]
    Refused(u16),
    #[error("the guest could not connect to port {0}")]
    Failed(u16),
    #[error("the agent answered {0:#04x}, not a port-forward reply")]
    BadReply(u8),
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
}

/// The ports of an `io.ember.port_forward` value (`8080, 9090`).
pub fn parse_ports(value: &str) -> Result<Vec<u16>, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("{p:?} is not a TCP port (1-65535)")),
            Ok(n) => Ok(n),
        })
        .collect()
}

/// The TCP ports of kubelet's `io.kubernetes.container.ports` JSON
/// (`[{"containerPort":80,"protocol":"TCP"}]`); unreadable entries and
/// other protocols are skipped.
pub fn kubelet_ports(json: &str) -> Vec<u16> {
    let Ok(serde_json::Value::Array(list)) = serde_json::from_str(json) else {
        return Vec::new();
    };
    list.iter()
        .filter(|p| {
            p.get("protocol")
                .and_then(serde_json::Value::as_str)
                .is_none_or(|proto| proto.eq_ignore_ascii_case("TCP"))
        })
        .filter_map(|p| p.get("containerPort")?.as_u64())
        .filter_map(|p| u16::try_from(p).ok().filter(|p| *p != 0))
        .collect()
}

/// The ports a container's (or the sandbox's) annotations ask for. A bad
/// `io.ember.port_forward` is an error; kubelet's list is read leniently.
pub fn ports_of_annotations(ann: &HashMap<String, String>) -> Result<Vec<u16>, String> {
    let mut ports = match ann.get(PORTS_ANNOTATION) {
        Some(v) => parse_ports(v).map_err(|e| format!("annotation {PORTS_ANNOTATION}: {e}"))?,
        None => Vec::new(),
    };
    if let Some(v) = ann.get(KUBELET_PORTS_ANNOTATION) {
        ports.extend(kubelet_ports(v));
    }
    Ok(ports)
}

/// Listening sockets of one port, created in the pod's network namespace.
struct PortListeners {
    port: u16,
    sockets: Vec<(Family, std::net::TcpListener)>,
}

/// Bind `127.0.0.1:<port>` and `[::1]:<port>` for each port, in the
/// network namespace `netns`. ::1 is skipped if the namespace has no IPv6;
/// a port that cannot be bound at all is reported and skipped.
fn bind_in_netns(netns: &Path, ports: &[u16]) -> io::Result<Vec<PortListeners>> {
    let ports = ports.to_vec();
    in_netns(netns, move || {
        ports
            .iter()
            .filter_map(|&port| {
                let mut sockets = Vec::new();
                let v4: SocketAddr = (Ipv4Addr::LOCALHOST, port).into();
                let v6: SocketAddr = (Ipv6Addr::LOCALHOST, port).into();
                for (family, addr) in [(Family::V4, v4), (Family::V6, v6)] {
                    match std::net::TcpListener::bind(addr) {
                        Ok(l) => sockets.push((family, l)),
                        Err(e) => tracing::debug!("port-forward: binding {addr}: {e}"),
                    }
                }
                if sockets.is_empty() {
                    tracing::warn!(
                        "port-forward: cannot listen on port {port} in the pod's network \
                         namespace; kubectl port-forward to it will fail"
                    );
                    return None;
                }
                Some(PortListeners { port, sockets })
            })
            .collect()
    })
}

/// A connection the shim gives up on: reset, so the client sees an error
/// at once rather than an empty stream.
fn reset(tcp: TcpStream) {
    let _ = tcp.set_zero_linger();
    drop(tcp);
}

/// Open the guest stream for `req`: the hybrid-vsock handshake, the
/// request, and the agent's one-byte reply, all within `timeout`.
pub async fn open_guest(
    vsock: &Path,
    req: Request,
    timeout: Duration,
) -> Result<UnixStream, PortForwardError> {
    let handshake = async {
        let mut s = connect_hybrid_timeout(vsock, VSOCK_PORT, timeout).await?;
        s.write_all(&req.encode()).await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        match Reply::from_byte(b[0]) {
            Some(Reply::Connected) => Ok(s),
            Some(Reply::Refused) => Err(PortForwardError::Refused(req.port)),
            Some(Reply::Failed) => Err(PortForwardError::Failed(req.port)),
            None => Err(PortForwardError::BadReply(b[0])),
        }
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| PortForwardError::Timeout(timeout))?
}

/// Forward one accepted connection to the guest until either side closes.
#[tracing::instrument(level = "debug", skip(tcp, vsock, limits))]
async fn forward(mut tcp: TcpStream, vsock: PathBuf, req: Request, limits: Limits) {
    let mut guest = match open_guest(&vsock, req, limits.connect_timeout).await {
        Ok(g) => g,
        Err(e) => {
            tracing::debug!("port-forward refused: {e}");
            reset(tcp);
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    match tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut guest, BUF, BUF).await {
        Ok((up, down)) => {
            tracing::debug!("port-forward done: {up} bytes to the guest, {down} back")
        }
        Err(e) => tracing::debug!("port-forward ended: {e}"),
    }
}

/// Accept on one listening socket until aborted; dropping this task (abort)
/// drops its connections' tasks too.
async fn accept_loop(
    listener: TcpListener,
    req: Request,
    vsock: PathBuf,
    slots: Arc<Semaphore>,
    limits: Limits,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => match slots.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let vsock = vsock.clone();
                        conns.spawn(async move {
                            let _permit = permit;
                            forward(tcp, vsock, req, limits).await;
                        });
                    }
                    Err(_) => {
                        tracing::warn!(
                            port = req.port,
                            "port-forward: {} connections already forwarded; resetting another",
                            limits.max_connections
                        );
                        reset(tcp);
                    }
                },
                Err(e) => {
                    tracing::warn!(port = req.port, "port-forward: accept: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

#[derive(Default)]
struct State {
    ports: BTreeSet<u16>,
    tasks: Vec<JoinHandle<()>>,
    closed: bool,
}

/// One pod's port forwarding: listeners in its network namespace, and the
/// connections they carry to its guest.
pub struct PortForwarder {
    netns: PathBuf,
    vsock: PathBuf,
    limits: Limits,
    slots: Arc<Semaphore>,
    state: Mutex<State>,
}

impl PortForwarder {
    /// Forwarding for the pod whose network namespace is `netns` and whose
    /// guest is reached through the hybrid-vsock socket `vsock`. Listens on
    /// nothing until [`Self::add_ports`].
    pub fn new(netns: PathBuf, vsock: PathBuf, limits: Limits) -> Self {
        PortForwarder {
            netns,
            vsock,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ports listened on.
    pub fn ports(&self) -> Vec<u16> {
        self.state().ports.iter().copied().collect()
    }

    /// Listen on the ports of `ports` not listened on yet (past
    /// [`MAX_PORTS`], the rest are reported and ignored). Must run inside
    /// the tokio runtime; the sockets are made on a blocking thread.
    pub async fn add_ports(&self, ports: &[u16]) -> io::Result<()> {
        let new: Vec<u16> = {
            let st = self.state();
            if st.closed {
                return Ok(());
            }
            let mut new: Vec<u16> = ports
                .iter()
                .copied()
                .filter(|p| !st.ports.contains(p))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let room = MAX_PORTS.saturating_sub(st.ports.len());
            if new.len() > room {
                tracing::warn!(
                    "port-forward: a pod forwards at most {MAX_PORTS} ports; not listening on {:?}",
                    &new[room..]
                );
                new.truncate(room);
            }
            new
        };
        if new.is_empty() {
            return Ok(());
        }
        let netns = self.netns.clone();
        let bound = tokio::task::spawn_blocking(move || bind_in_netns(&netns, &new))
            .await
            .map_err(io::Error::other)??;
        let mut st = self.state();
        if st.closed {
            return Ok(());
        }
        for PortListeners { port, sockets } in bound {
            // Another add_ports may have raced us to this port: the later
            // bind failed then, or both hold sockets; keep the first.
            if !st.ports.insert(port) {
                continue;
            }
            for (family, socket) in sockets {
                socket.set_nonblocking(true)?;
                let listener = TcpListener::from_std(socket)?;
                let req = Request { family, port };
                st.tasks.push(tokio::spawn(accept_loop(
                    listener,
                    req,
                    self.vsock.clone(),
                    self.slots.clone(),
                    self.limits,
                )));
            }
            tracing::info!(
                port,
                "port-forward: listening in the pod's network namespace"
            );
        }
        Ok(())
    }

    /// Stop listening and end every forwarded connection (pod teardown).
    /// Later [`Self::add_ports`] do nothing.
    pub fn close(&self) {
        let mut st = self.state();
        st.closed = true;
        for t in st.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for PortForwarder {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests;
