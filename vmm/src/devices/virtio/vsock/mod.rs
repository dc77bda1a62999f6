//! virtio-vsock device, Firecracker-style hybrid Unix-socket backend.
//!
//! Layout (modelled on Firecracker's `devices/virtio/vsock/`):
//! - [`device`]: the [`Vsock`] virtio device (queues, config space, worker
//!   thread and its epoll loop);
//! - [`muxer`]: routes guest packets to connections, accepts host
//!   connections on the Unix listener, schedules what goes to the guest;
//! - [`csm`]: the per-connection state machine and credit accounting;
//! - [`packet`]: the packet header and reading/writing packets from/to
//!   descriptor chains (parsing through the `virtio-vsock` crate);
//! - [`unix`]: the host-side Unix listener and socket helpers;
//! - [`client`]: the async host-side helper [`connect_hybrid`].
//!
//! Hybrid vsock: a host process connects to the device's Unix socket
//! `uds_path` and writes `CONNECT <port>\n`; once the guest accepted, the
//! device answers `OK <hostport>\n` and the stream carries the connection's
//! bytes. A guest connecting to host CID 2 port `P` is connected to the Unix
//! socket `<uds_path>_P`.

pub mod client;
mod csm;
pub mod device;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod muxer;
pub mod packet;
mod unix;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

pub use client::{connect_hybrid, connect_hybrid_timeout, ConnectError};
pub use device::Vsock;

/// The host's CID (virtio spec 5.10: CID 2 is the host).
pub const VSOCK_HOST_CID: u64 = 2;

/// Errors building or controlling the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved (0, 1, 2 and `u32::MAX` are not usable).
    #[error("invalid guest CID {0}: CIDs 0, 1, 2 and 0xffffffff are reserved")]
    InvalidCid(u64),
    /// A live listener already answers on the socket path.
    #[error("vsock socket path {} is already in use by a live listener", .0.display())]
    AddrInUse(PathBuf),
    /// Something that is not a socket is in the way at the socket path.
    #[error("vsock socket path {} exists and is not a Unix socket", .0.display())]
    NotASocket(PathBuf),
    /// The path does not fit in a `sockaddr_un`.
    #[error("vsock socket path {} is too long for a Unix socket", .0.display())]
    PathTooLong(PathBuf),
    /// Binding (or cleaning a stale socket before binding) failed.
    #[error("cannot bind vsock socket {}: {source}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Creating an eventfd or epoll instance failed.
    #[error("vsock device setup: {0}")]
    Setup(#[source] std::io::Error),
    /// The device has been shut down for good.
    #[error("the vsock device has been shut down")]
    ShutDown,
}

/// Timeouts of the hybrid backend. The defaults follow Firecracker where it
/// has one; tests shorten them.
#[derive(Clone, Copy, Debug)]
pub struct VsockTimeouts {
    /// How long a host client may take to send its whole `CONNECT <port>\n`
    /// line after connecting to the Unix socket.
    pub connect_line: Duration,
    /// How long the guest has to answer a host-initiated REQUEST (counted
    /// from the moment the REQUEST was put in the guest's RX queue).
    pub guest_response: Duration,
    /// How long the guest has to answer our SHUTDOWN with RST (and how long
    /// buffered guest data may take to drain to a host that stopped
    /// reading when the guest asked to close) before we force an RST.
    pub shutdown: Duration,
}

impl Default for VsockTimeouts {
    fn default() -> Self {
        Self {
            connect_line: Duration::from_secs(5),
            // Generous: a guest whose ring 0 is emulated can take seconds to
            // answer while it is busy booting.
            guest_response: Duration::from_secs(10),
            shutdown: Duration::from_secs(2),
        }
    }
}

/// `now + d`, saturating far in the future instead of panicking on an
/// absurd timeout.
pub(crate) fn deadline(now: std::time::Instant, d: Duration) -> std::time::Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

pub(crate) use super::log_limit::{warn_rl, LogLimiter};
