//! Host-side helper: open a hybrid-vsock connection to a guest port through
//! the device's Unix socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Longest reply line we accept (`OK 4294967295` is 13 bytes).
const MAX_REPLY_LINE: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The device's Unix socket could not be reached (VM not running?).
    #[error("cannot connect to vsock socket {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The device closed the stream without `OK`: the guest answered the
    /// connection request with a reset.
    #[error("no listener on guest vsock port {port}")]
    NoListener { port: u32 },
    /// The handshake failed with an I/O error.
    #[error("hybrid vsock handshake for guest port {port} failed: {source}")]
    Io {
        port: u32,
        #[source]
        source: std::io::Error,
    },
    /// The device answered something that is not `OK <port>`.
    #[error("unexpected hybrid vsock reply for guest port {port}: {line:?}")]
    BadReply { port: u32, line: String },
    #[error("timed out after {timeout:?} connecting to guest vsock port {port}")]
    Timeout { port: u32, timeout: Duration },
}

/// Connects to guest vsock `port` through the device's Unix socket
/// `uds_path`: writes `CONNECT <port>\n`, reads the `OK <hostport>\n` reply
/// byte by byte (nothing of the data stream is consumed) and returns the
/// stream, which then carries the connection's bytes.
///
/// Waits as long as the guest takes; see [`connect_hybrid_timeout`].
pub async fn connect_hybrid(uds_path: &Path, port: u32) -> Result<UnixStream, ConnectError> {
    let mut stream =
        UnixStream::connect(uds_path)
            .await
            .map_err(|source| ConnectError::Connect {
                path: uds_path.to_path_buf(),
                source,
            })?;
    let io_err = |source| ConnectError::Io { port, source };
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(io_err)?;
    let mut line = Vec::with_capacity(MAX_REPLY_LINE);
    loop {
        let mut b = [0u8; 1];
        let n = match stream.read(&mut b).await {
            Ok(n) => n,
            // The device drops the stream when the guest refuses.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(e) => return Err(io_err(e)),
        };
        if n == 0 {
            if line.is_empty() {
                return Err(ConnectError::NoListener { port });
            }
            return Err(ConnectError::BadReply {
                port,
                line: String::from_utf8_lossy(&line).into_owned(),
            });
        }
        if b[0] == b'\n' {
            break;
        }
        if line.len() >= MAX_REPLY_LINE {
            return Err(ConnectError::BadReply {
                port,
                line: String::from_utf8_lossy(&line).into_owned(),
            });
        }
        line.push(b[0]);
    }
    let ok = line
        .strip_prefix(b"OK ")
        .and_then(|rest| std::str::from_utf8(rest).ok())
        .and_then(|rest| rest.trim_end_matches('\r').parse::<u32>().ok());
    match ok {
        Some(_host_port) => Ok(stream),
        None => Err(ConnectError::BadReply {
            port,
            line: String::from_utf8_lossy(&line).into_owned(),
        }),
    }
}

/// [`connect_hybrid`] with a deadline for the whole handshake.
pub async fn connect_hybrid_timeout(
    uds_path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, ConnectError> {
    match tokio::time::timeout(timeout, connect_hybrid(uds_path, port)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout { port, timeout }),
    }
}
