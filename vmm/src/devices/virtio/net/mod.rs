//! virtio-net device (virtio spec 5.1, device id 1) with a tap backend.
//!
//! Layout:
//! - [`device`]: the [`Net`] virtio device (features, config space, the
//!   worker thread and its data path);
//! - [`tap`]: the [`Tap`] backend (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI |
//!   IFF_VNET_HDR`, 12-byte vnet header, no offloads) and the small
//!   [`NetBackend`] trait the device drives, so tests (or other backends)
//!   can stand in for a tap;
//! - [`netns`]: [`in_netns`], to run code (open a tap, configure links)
//!   inside another network namespace from a short-lived thread.
//!
//! Frames cross the [`NetBackend`] seam with the 12-byte
//! `virtio_net_hdr_v1` in front, exactly as a tap opened with
//! `IFF_VNET_HDR` and `TUNSETVNETHDRSZ 12` reads and writes them. No
//! offloads are negotiated with the guest nor enabled on the tap, so every
//! header the device sends either way is all zeros (plus `num_buffers = 1`
//! towards the guest).

pub mod device;
pub mod netns;
pub mod tap;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};

pub use device::Net;
#[cfg(any(test, feature = "fuzzing"))]
pub use device::MIN_MTU;
pub use netns::in_netns;
#[cfg(test)]
pub use tap::set_link_up;
pub use tap::{NetBackend, Tap};

/// Length of the `virtio_net_hdr_v1` in front of every frame (VERSION_1:
/// always 12 bytes, `num_buffers` included).
pub const VNET_HDR_LEN: usize = 12;

/// Largest Ethernet frame (without the vnet header) moved either way: a
/// 65535-byte MTU plus Ethernet and VLAN headers, rounded up. Without GSO
/// no frame can be larger.
pub const MAX_FRAME_LEN: usize = 65_560;

/// Shortest frame passed on: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;

/// Errors building the network device or its tap.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The MAC is all zeros or a multicast address.
    #[error("invalid guest MAC address {0}: must be a non-zero unicast address")]
    InvalidMac(String),
    /// The MTU is below the IPv4 minimum (68).
    #[error("invalid MTU {0}: at least 68")]
    InvalidMtu(u16),
    /// The tap name is empty, too long (15 bytes at most) or has a
    /// character Linux refuses in interface names.
    #[error("invalid tap name {0:?}")]
    InvalidTapName(String),
    /// Opening `/dev/net/tun` or configuring the tap failed.
    #[error("tap {name}: {op}: {source}")]
    Tap {
        name: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Entering the network namespace failed (the message names the path).
    #[error("{source}")]
    Netns {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = *mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// Counters of one device, kept across resets.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub tx_bad_chains: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub rx_dropped: AtomicU64,
    pub rx_bad_chains: AtomicU64,
    pub worker_wakeups: AtomicU64,
}

impl Stats {
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(c: &AtomicU64, n: usize) {
        c.fetch_add(n as u64, Ordering::Relaxed);
    }

    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn snapshot(&self) -> NetStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            tx_frames: l(&self.tx_frames),
            tx_bytes: l(&self.tx_bytes),
            tx_dropped: l(&self.tx_dropped),
            tx_bad_chains: l(&self.tx_bad_chains),
            rx_frames: l(&self.rx_frames),
            rx_bytes: l(&self.rx_bytes),
            rx_dropped: l(&self.rx_dropped),
            rx_bad_chains: l(&self.rx_bad_chains),
            worker_wakeups: l(&self.worker_wakeups),
        }
    }
}

/// A snapshot of a device's counters (see `Net::stats`, tests and fuzz
/// targets only). Bytes count Ethernet frames without the vnet header.
#[cfg(any(test, feature = "fuzzing"))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Guest frames written to the backend.
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Well-formed guest frames the backend refused (e.g. tap down).
    pub tx_dropped: u64,
    /// Malformed TX chains (returned to the guest unused).
    pub tx_bad_chains: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Backend frames not delivered: larger than the guest's buffer or
    /// than [`MAX_FRAME_LEN`], runts, or carrying offload metadata.
    pub rx_dropped: u64,
    /// Malformed RX chains (returned to the guest with length 0).
    pub rx_bad_chains: u64,
    /// Times the worker woke from `epoll_wait` (a busy loop shows here).
    pub worker_wakeups: u64,
}

pub(crate) use super::log_limit::warn_rl as net_warn_rl;
pub(crate) use super::log_limit::LogLimiter;
