//! The guest end of `kubectl port-forward` (protocol:
//! `ember_proto::port_forward`).
//!
//! A listener on vsock port 1025 (a Unix socket `<run dir>/port-forward.sock`
//! in host test mode). Each stream the shim opens names a TCP port; the
//! agent connects to it on the guest's loopback (127.0.0.1 or ::1, the
//! family the client used on the host), answers with one reply byte, then
//! copies bytes both ways until either side closes. Containers share the
//! guest's root network namespace, so the loopback here is the pod's.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] streams at once (more are answered
//! `Failed`), the request must arrive within [`REQUEST_TIMEOUT`] and the
//! connect finish within [`CONNECT_TIMEOUT`], and each stream holds two
//! fixed buffers of [`BUF`] bytes.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ember_proto::port_forward::{Family, Reply, Request, REQUEST_LEN, VSOCK_PORT};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

/// Streams forwarded at once; the shim has its own, usually lower, limit.
pub const MAX_CONNECTIONS: usize = 256;
/// How long the shim has to send its request once connected.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to the guest port may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Copy buffer per direction: large, because every guest syscall is slow.
pub const BUF: usize = 128 * 1024;

/// Where the port-forward streams come from.
pub enum Listener {
    /// vsock port [`VSOCK_PORT`], any CID (the VM).
    Vsock(tokio_vsock::VsockListener),
    /// A Unix socket (host test mode).
    Unix(tokio::net::UnixListener),
}

impl Listener {
    /// Listen on vsock port [`VSOCK_PORT`].
    pub fn bind_vsock() -> io::Result<Listener> {
        tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
            tokio_vsock::VMADDR_CID_ANY,
            VSOCK_PORT,
        ))
        .map(Listener::Vsock)
    }

    /// Listen on the Unix socket `path` (a stale one is replaced).
    pub fn bind_unix(path: &Path) -> io::Result<Listener> {
        let _ = std::fs::remove_file(path);
        tokio::net::UnixListener::bind(path).map(Listener::Unix)
    }
}

/// Accept streams for the life of the agent; each is served on a task of
/// its own. A failed accept (EMFILE, ...) is logged and retried after a
/// pause, so a burst of streams never ends port forwarding for good.
pub async fn serve(listener: Listener) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = match &listener {
            Listener::Vsock(l) => l.accept().await.map(|(s, _)| spawn(s, &slots)),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| spawn(s, &slots)),
        };
        if let Err(e) = accepted {
            tracing::warn!("port-forward listener: accept: {e}");
            tokio::time::sleep(ACCEPT_BACKOFF).await;
        }
    }
}

fn spawn<S>(mut stream: S, slots: &Arc<Semaphore>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let permit = slots.clone().try_acquire_owned();
    tokio::spawn(async move {
        match permit {
            Ok(_permit) => forward(stream).await,
            Err(_) => {
                tracing::warn!("port-forward: {MAX_CONNECTIONS} streams open; refusing another");
                let _ = stream.write_all(&[Reply::Failed as u8]).await;
            }
        }
    });
}

/// The guest address of a request.
pub fn target(req: &Request) -> SocketAddr {
    match req.family {
        Family::V4 => (Ipv4Addr::LOCALHOST, req.port).into(),
        Family::V6 => (Ipv6Addr::LOCALHOST, req.port).into(),
    }
}

/// Serve one stream: read the request, connect, reply, copy.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn forward<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let mut raw = [0u8; REQUEST_LEN];
    let req = match tokio::time::timeout(REQUEST_TIMEOUT, stream.read_exact(&mut raw)).await {
        Ok(Ok(_)) => Request::decode(&raw),
        Ok(Err(e)) => Err(format!("reading the request: {e}")),
        Err(_) => Err(format!("no request within {REQUEST_TIMEOUT:?}")),
    };
    let req = match req {
        Ok(r) => r,
        Err(why) => {
            tracing::warn!("port-forward: bad request: {why}");
            let _ = stream.write_all(&[Reply::Failed as u8]).await;
            return;
        }
    };
    let addr = target(&req);
    let tcp =
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                let reply = if e.kind() == io::ErrorKind::ConnectionRefused {
                    Reply::Refused
                } else {
                    Reply::Failed
                };
                tracing::debug!("port-forward to {addr}: {e}");
                let _ = stream.write_all(&[reply as u8]).await;
                return;
            }
            Err(_) => {
                tracing::debug!("port-forward to {addr}: no connection within {CONNECT_TIMEOUT:?}");
                let _ = stream.write_all(&[Reply::Failed as u8]).await;
                return;
            }
        };
    let _ = tcp.set_nodelay(true);
    if stream.write_all(&[Reply::Connected as u8]).await.is_err() {
        return;
    }
    let mut tcp = tcp;
    match tokio::io::copy_bidirectional_with_sizes(&mut stream, &mut tcp, BUF, BUF).await {
        Ok((up, down)) => tracing::debug!("port-forward to {addr} done: {up} bytes in, {down} out"),
        Err(e) => tracing::debug!("port-forward to {addr} ended: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn reply_to(req: &[u8]) -> (u8, tokio::io::DuplexStream) {
        let (mut host, guest) = tokio::io::duplex(1 << 20);
        tokio::spawn(forward(guest));
        host.write_all(req).await.unwrap();
        let mut b = [0u8; 1];
        host.read_exact(&mut b).await.unwrap();
        (b[0], host)
    }

    /// A port nothing listens on (bound, then closed).
    fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn connects_and_copies_both_ways() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let echo = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let (mut r, mut w) = s.split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
        });
        let req = Request {
            family: Family::V4,
            port,
        };
        let (reply, mut host) = reply_to(&req.encode()).await;
        assert_eq!(reply, Reply::Connected as u8);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = tokio::io::split(&mut host);
        let send = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let recv = r.read_to_end(&mut got);
        let (_, n) = tokio::join!(send, recv);
        n.unwrap();
        assert_eq!(got, data);
        echo.await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_port_without_listener_is_refused() {
        let req = Request {
            family: Family::V4,
            port: free_port(),
        };
        let (reply, mut host) = reply_to(&req.encode()).await;
        assert_eq!(reply, Reply::Refused as u8);
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the stream ends after the reply");
    }

    /// The listener as the test-mode agent binds it: each stream served.
    #[tokio::test(flavor = "current_thread")]
    async fn the_listener_serves_every_stream() {
        let dir = std::env::temp_dir().join(format!("ember-pf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("port-forward.sock");
        let listener = Listener::bind_unix(&path).unwrap();
        let server = tokio::spawn(serve(listener));
        let req = Request {
            family: Family::V4,
            port: free_port(),
        };
        for _ in 0..3 {
            let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
            s.write_all(&req.encode()).await.unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            assert_eq!(b[0], Reply::Refused as u8);
        }
        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_bad_request_fails() {
        let (reply, _) = reply_to(b"GET ").await;
        assert_eq!(reply, Reply::Failed as u8);
    }
}
