//! The virtio-net device (virtio spec 5.1, device id 1).
//!
//! Queues: 0 = receiveq (backend -> guest frames), 1 = transmitq (guest ->
//! backend frames), 256 entries each; no control queue, one queue pair.
//! Features: `VIRTIO_F_VERSION_1`, `VIRTIO_NET_F_MAC`, `VIRTIO_NET_F_STATUS`
//! (link always up), and `VIRTIO_NET_F_MTU` when [`Net::with_mtu`] set one
//! (the guest then uses that MTU, e.g. the pod's CNI MTU). No checksum/segmentation offloads, no mergeable RX
//! buffers: every frame is one chain with the 12-byte `virtio_net_hdr_v1`
//! in front, and the guest must post RX buffers that hold a whole frame
//! (Linux does: 1518 bytes plus header per buffer without offloads).
//! Config space: `mac` (6 bytes), `status` (le16), `max_virtqueue_pairs`
//! (le16, 1), `mtu` (le16, 0 when none was set).
//!
//! Threading: [`Net::activate`] starts one worker thread ("ember-net")
//! that owns the queues and the backend and epolls the two queue eventfds,
//! the backend descriptor and a kill eventfd. [`Net::shutdown`] and
//! [`Net::reset`] write the kill eventfd and join the thread; the backend
//! (the tap) outlives resets and is closed on shutdown or drop.
//!
//! Data path:
//! - TX: each chain (device-readable descriptors only) is copied into a
//!   bounded scratch buffer, its header replaced by a zero header (no
//!   offloads were negotiated), and written to the backend as one frame;
//!   the chain is returned with length 0.
//! - RX: frames are read from the backend (non-blocking, level-triggered
//!   epoll) and copied, behind a fresh header (`num_buffers = 1`), into
//!   one RX chain each. When the guest has no RX buffer left, the frame in
//!   hand is kept and the backend is removed from the epoll set until the
//!   guest notifies the RX queue, so the worker sleeps instead of spinning
//!   while the tap holds frames.
//!
//! The guest is untrusted: malformed chains (wrong descriptor direction,
//! addresses outside guest memory, chains cut short or looping, too short
//! or too long) are logged (rate-limited), counted and returned with
//! length 0; nothing the guest writes can make the device panic or hang.

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::super::device_worker::{check_activation, read_config_bytes, DeviceWorker};
use super::super::used_ring::{add_used, notify_used};
use super::super::{ActivateError, GuestMemoryMmap, VirtioDevice, VirtioInterrupt, TYPE_NET};
use super::tap::{NetBackend, Tap};
#[cfg(any(test, feature = "fuzzing"))]
use super::NetStats;
use super::{
    format_mac, net_warn_rl, LogLimiter, NetError, Stats, MAX_FRAME_LEN, MIN_FRAME_LEN,
    VNET_HDR_LEN,
};
use crate::confine::{self, Role};

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const VIRTIO_NET_F_MTU: u64 = 1 << 3;
const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// `flags` bit of the vnet header: the checksum is left to the receiver.
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;

/// Queue size offered for both queues.
pub const QUEUE_SIZE: u16 = 256;
const NUM_QUEUES: usize = 2;
const RXQ: usize = 0;
const TXQ: usize = 1;

/// `mac[6]`, `status: le16`, `max_virtqueue_pairs: le16`, `mtu: le16`.
const CONFIG_LEN: usize = 12;

/// Smallest MTU Linux accepts for Ethernet (IPv4 minimum).
pub const MIN_MTU: u16 = 68;
/// Ethernet header plus one VLAN tag: what a frame may add to the MTU.
const ETH_OVERHEAD: usize = 18;

/// Longest chain we walk (Linux uses at most about 20 descriptors); a
/// longer one, possible only through an indirect table, is malformed.
const MAX_CHAIN_DESCS: usize = 1024;

const TOKEN_KILL: u64 = 0;
const TOKEN_RXQ: u64 = 1;
const TOKEN_TXQ: u64 = 2;
const TOKEN_BACKEND: u64 = 3;

/// The header in front of every frame given to the guest: no flags, no
/// GSO, `num_buffers = 1` (le16).
const RX_HDR: [u8; VNET_HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

/// The backend travels between the device and its worker through this
/// slot, so that a reset gives it back for the next activation.
type BackendSlot = Arc<Mutex<Option<Box<dyn NetBackend>>>>;

fn lock(slot: &BackendSlot) -> MutexGuard<'_, Option<Box<dyn NetBackend>>> {
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn validate_mac(mac: &[u8; 6]) -> Result<(), NetError> {
    if *mac == [0; 6] || mac[0] & 1 != 0 {
        return Err(NetError::InvalidMac(format_mac(mac)));
    }
    Ok(())
}

/// The virtio-net device.
pub struct Net {
    mac: [u8; 6],
    mtu: Option<u16>,
    backend_name: String,
    acked_features: u64,
    queue_sizes: [u16; NUM_QUEUES],
    backend: BackendSlot,
    worker: Option<DeviceWorker>,
    stats: Arc<Stats>,
    shut_down: bool,
}

impl fmt::Debug for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Net")
            .field("mac", &format_mac(&self.mac))
            .field("backend", &self.backend_name)
            .field("active", &self.worker.is_some())
            .finish()
    }
}

impl Net {
    /// A device on an open tap; `mac` is the guest's address (a non-zero
    /// unicast MAC; in a Kubernetes pod, the CNI interface's MAC).
    pub fn new(tap: Tap, mac: [u8; 6]) -> Result<Self, NetError> {
        Self::with_backend(Box::new(tap), mac)
    }

    /// A device on any [`NetBackend`].
    pub fn with_backend(backend: Box<dyn NetBackend>, mac: [u8; 6]) -> Result<Self, NetError> {
        validate_mac(&mac)?;
        Ok(Self {
            mac,
            mtu: None,
            backend_name: backend.name().to_string(),
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
            backend: Arc::new(Mutex::new(Some(backend))),
            worker: None,
            stats: Arc::new(Stats::default()),
            shut_down: false,
        })
    }

    /// Creates (or attaches to) the tap `name` in the VMM's network
    /// namespace; see [`Tap::open`].
    pub fn open_tap(name: &str, mac: [u8; 6]) -> Result<Self, NetError> {
        validate_mac(&mac)?;
        Self::new(Tap::open(name)?, mac)
    }

    /// Creates (or attaches to) the tap `name` inside the network namespace
    /// at `netns` (`/var/run/netns/<name>`, `/proc/<pid>/ns/net`); see
    /// [`Tap::open_in_netns`]. The VMM keeps running in its own namespace.
    pub fn open_tap_in_netns(netns: &Path, name: &str, mac: [u8; 6]) -> Result<Self, NetError> {
        validate_mac(&mac)?;
        Self::new(Tap::open_in_netns(netns, name)?, mac)
    }

    /// Offers `VIRTIO_NET_F_MTU` with `mtu` in the config space, so the
    /// guest driver sets its interface to that MTU (use the MTU of the
    /// pod's CNI interface, and give the tap the same). Frames longer than
    /// `mtu` plus an Ethernet and a VLAN header are then not passed to a
    /// guest that accepted the feature. Call it before the device is
    /// handed to its transport (which caches the feature bits).
    pub fn with_mtu(mut self, mtu: u16) -> Result<Self, NetError> {
        if mtu < MIN_MTU {
            return Err(NetError::InvalidMtu(mtu));
        }
        self.mtu = Some(mtu);
        Ok(self)
    }

    #[cfg(test)]
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    #[cfg(test)]
    pub fn mtu(&self) -> Option<u16> {
        self.mtu
    }

    /// The backend's name (the tap's interface name).
    #[cfg(test)]
    pub fn backend_name(&self) -> &str {
        &self.backend_name
    }

    #[cfg(test)]
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// The device's counters (kept across resets).
    #[cfg(test)]
    pub fn stats(&self) -> NetStats {
        self.stats.snapshot()
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        c
    }

    /// Signals the worker to stop and joins it. Returns false if it had
    /// panicked or could not be signalled.
    fn stop_worker(&mut self) -> bool {
        self.worker.take().is_none_or(DeviceWorker::stop)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn avail_features(&self) -> u64 {
        let mtu = if self.mtu.is_some() {
            VIRTIO_NET_F_MTU
        } else {
            0
        };
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | mtu
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is writable only through the legacy interface.
        tracing::debug!(offset, len = data.len(), "net: ignoring a config write");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        check_activation(
            self.worker.is_some(),
            self.shut_down,
            NUM_QUEUES,
            &queues,
            &queue_evts,
        )?;
        if self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            // The transport is modern-only; we use the VERSION_1 header
            // layout whatever the driver said.
            tracing::warn!("net: the driver did not accept VIRTIO_F_VERSION_1");
        }
        let Some(backend_fd) = lock(&self.backend).as_ref().map(|b| b.raw_fd()) else {
            return Err(ActivateError::Backend(
                "the backend is gone (an earlier worker panicked)".into(),
            ));
        };

        let epoll = Epoll::new().map_err(ActivateError::Worker)?;
        let (kill, kill_worker) = DeviceWorker::kill_pair()?;
        let mut evts = queue_evts.into_iter();
        let mut qs = queues.into_iter();
        let (Some(rx_evt), Some(tx_evt), Some(rxq), Some(txq)) =
            (evts.next(), evts.next(), qs.next(), qs.next())
        else {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: 0,
            });
        };
        for (fd, token) in [
            (std::os::fd::AsRawFd::as_raw_fd(&kill_worker), TOKEN_KILL),
            (std::os::fd::AsRawFd::as_raw_fd(&rx_evt), TOKEN_RXQ),
            (std::os::fd::AsRawFd::as_raw_fd(&tx_evt), TOKEN_TXQ),
            (backend_fd, TOKEN_BACKEND),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(ActivateError::Worker)?;
        }

        // The guest sized its buffers for the MTU it accepted.
        let rx_max_frame = match self.mtu {
            Some(mtu) if self.acked_features & VIRTIO_NET_F_MTU != 0 => {
                (usize::from(mtu) + ETH_OVERHEAD).min(MAX_FRAME_LEN)
            }
            _ => MAX_FRAME_LEN,
        };
        let slot = self.backend.clone();
        let stats = self.stats.clone();
        let worker = DeviceWorker::spawn("ember-net", kill, move || {
            if let Err(e) = confine::thread(Role::NetWorker) {
                tracing::error!("net: cannot confine the worker thread, not serving: {e}");
                return;
            }
            let Some(backend) = lock(&slot).take() else {
                tracing::error!("net: worker started without a backend");
                return;
            };
            let mut worker = Worker {
                mem,
                interrupt,
                queues: [rxq, txq],
                rx_evt,
                tx_evt,
                kill: kill_worker,
                epoll,
                backend,
                backend_fd,
                backend_armed: true,
                backend_failed: false,
                rx_buf: vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN],
                rx_pending: None,
                rx_max_frame,
                tx_buf: vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN],
                segs: Vec::new(),
                tx_more: false,
                rx_more: false,
                stats,
                log: LogLimiter::new(),
            };
            worker.run();
            *lock(&slot) = Some(worker.backend);
        })?;
        self.worker = Some(worker);
        tracing::debug!(backend = %self.backend_name, mac = %format_mac(&self.mac), "net: activated");
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if self.shut_down {
            return false;
        }
        let ok = self.stop_worker();
        self.acked_features = 0;
        ok && lock(&self.backend).is_some()
    }

    fn shutdown(&mut self) {
        self.stop_worker();
        // Closing the tap deletes it unless it is persistent.
        lock(&self.backend).take();
        self.shut_down = true;
    }
}

/// Why a TX chain was rejected.
#[derive(Debug, thiserror::Error)]
enum TxChainError {
    #[error("device-writable descriptor in a TX chain")]
    WriteOnly,
    #[error("chain is cut short (bad next index, descriptor loop or unreadable descriptor)")]
    Truncated,
    #[error("chain has more than {MAX_CHAIN_DESCS} descriptors")]
    TooManyDescriptors,
    #[error("frame longer than {MAX_FRAME_LEN} bytes")]
    TooLong,
    #[error("{0} bytes: shorter than a header and an Ethernet header")]
    TooShort(usize),
    #[error("cannot read {len} bytes at guest address {addr:#x}: {msg}")]
    Memory { addr: u64, len: usize, msg: String },
}

/// Why an RX chain could not take the frame.
#[derive(Debug, thiserror::Error)]
enum RxChainError {
    #[error("device-readable descriptor in an RX chain")]
    ReadOnly,
    #[error("chain is cut short (bad next index, descriptor loop or unreadable descriptor)")]
    Truncated,
    #[error("chain has more than {MAX_CHAIN_DESCS} descriptors")]
    TooManyDescriptors,
    #[error("buffer of {len} bytes at guest address {addr:#x} is outside guest memory")]
    BadAddress { addr: u64, len: usize },
    #[error("chain holds {0} bytes: too small for any frame")]
    NoRoom(usize),
    /// Well-formed, but smaller than this frame: the frame is dropped and
    /// the chain kept for the next one.
    #[error("chain holds {0} bytes")]
    TooSmall(usize),
    #[error("writing to guest memory: {0}")]
    Memory(String),
}

/// Copies a TX chain into `buf`; returns the length (header included).
fn read_tx_chain<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    buf: &mut [u8],
) -> Result<usize, TxChainError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let mut total = 0usize;
    let mut count = 0usize;
    let mut last_has_next = true;
    for d in chain {
        count += 1;
        if count > MAX_CHAIN_DESCS {
            return Err(TxChainError::TooManyDescriptors);
        }
        last_has_next = d.has_next();
        if d.is_write_only() {
            return Err(TxChainError::WriteOnly);
        }
        let len = d.len() as usize;
        let dst = total
            .checked_add(len)
            .and_then(|end| buf.get_mut(total..end))
            .ok_or(TxChainError::TooLong)?;
        mem.read_slice(dst, d.addr())
            .map_err(|e| TxChainError::Memory {
                addr: d.addr().0,
                len,
                msg: e.to_string(),
            })?;
        total += len;
    }
    // The iterator stops early, on a descriptor still flagged NEXT, when
    // the chain loops or points outside the table.
    if last_has_next {
        return Err(TxChainError::Truncated);
    }
    if total < VNET_HDR_LEN + MIN_FRAME_LEN {
        return Err(TxChainError::TooShort(total));
    }
    Ok(total)
}

/// Validates an RX chain and writes `frame` (header included) into it.
fn write_rx_chain<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    segs: &mut Vec<(GuestAddress, usize)>,
    frame: &[u8],
) -> Result<(), RxChainError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    segs.clear();
    let mut cap = 0usize;
    let mut last_has_next = true;
    for d in chain {
        if segs.len() >= MAX_CHAIN_DESCS {
            return Err(RxChainError::TooManyDescriptors);
        }
        last_has_next = d.has_next();
        if !d.is_write_only() {
            return Err(RxChainError::ReadOnly);
        }
        let len = d.len() as usize;
        if !mem.check_range(d.addr(), len) {
            return Err(RxChainError::BadAddress {
                addr: d.addr().0,
                len,
            });
        }
        segs.push((d.addr(), len));
        cap = cap.saturating_add(len);
    }
    if last_has_next {
        return Err(RxChainError::Truncated);
    }
    if cap < VNET_HDR_LEN + MIN_FRAME_LEN {
        return Err(RxChainError::NoRoom(cap));
    }
    if cap < frame.len() {
        return Err(RxChainError::TooSmall(cap));
    }
    let mut rest = frame;
    for &(addr, len) in segs.iter() {
        if rest.is_empty() {
            break;
        }
        let (now, later) = rest.split_at(len.min(rest.len()));
        mem.write_slice(now, addr)
            .map_err(|e| RxChainError::Memory(e.to_string()))?;
        rest = later;
    }
    Ok(())
}

/// What one read from the backend gave.
enum RxRead {
    /// A frame of this length (header included) is in `rx_buf`.
    Frame(usize),
    /// A frame was read and dropped, or the read was interrupted.
    Again,
    /// Nothing to read (or the backend failed).
    Empty,
}

/// State owned by the worker thread.
struct Worker {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: [Queue; NUM_QUEUES],
    rx_evt: EventFd,
    tx_evt: EventFd,
    kill: EventFd,
    epoll: Epoll,
    backend: Box<dyn NetBackend>,
    backend_fd: RawFd,
    /// The backend is in the epoll set.
    backend_armed: bool,
    /// Reading the backend failed for good; it is out of the epoll set.
    backend_failed: bool,
    rx_buf: Vec<u8>,
    /// Length of the frame in `rx_buf` waiting for an RX buffer.
    rx_pending: Option<usize>,
    /// Longest frame (without header) passed to the guest.
    rx_max_frame: usize,
    tx_buf: Vec<u8>,
    segs: Vec<(GuestAddress, usize)>,
    /// The TX (RX) pass stopped on its budget: run again without waiting.
    tx_more: bool,
    rx_more: bool,
    stats: Arc<Stats>,
    log: LogLimiter,
}

impl Worker {
    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            let timeout_ms = if self.tx_more || self.rx_more { 0 } else { -1 };
            let n = match self.epoll.wait(timeout_ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("net: epoll_wait failed, stopping the device: {e}");
                    return;
                }
            };
            Stats::inc(&self.stats.worker_wakeups);
            let mut rx_kick = false;
            let mut tx_kick = false;
            let mut backend_ready = false;
            for ev in events.iter().take(n) {
                match ev.data() {
                    TOKEN_KILL => {
                        let _ = self.kill.read();
                        return;
                    }
                    TOKEN_RXQ => {
                        let _ = self.rx_evt.read();
                        rx_kick = true;
                    }
                    TOKEN_TXQ => {
                        let _ = self.tx_evt.read();
                        tx_kick = true;
                    }
                    TOKEN_BACKEND => backend_ready = true,
                    _ => {}
                }
            }
            if rx_kick {
                // The guest posted RX buffers: listen to the backend again.
                self.arm_backend();
            }
            let mut notify = [false; NUM_QUEUES];
            if tx_kick || self.tx_more {
                notify[TXQ] |= self.process_tx();
            }
            if rx_kick || backend_ready || self.rx_more {
                notify[RXQ] |= self.process_rx();
            }
            self.signal(notify);
        }
    }

    fn arm_backend(&mut self) {
        if self.backend_armed || self.backend_failed {
            return;
        }
        let ev = EpollEvent::new(EventSet::IN, TOKEN_BACKEND);
        match self.epoll.ctl(ControlOperation::Add, self.backend_fd, ev) {
            Ok(()) => self.backend_armed = true,
            Err(e) => {
                tracing::error!(backend = %self.backend.name(), "net: cannot poll the backend, no more frames will be received: {e}");
                self.backend_failed = true;
            }
        }
    }

    fn disarm_backend(&mut self) {
        if !self.backend_armed {
            return;
        }
        let ev = EpollEvent::new(EventSet::IN, TOKEN_BACKEND);
        match self
            .epoll
            .ctl(ControlOperation::Delete, self.backend_fd, ev)
        {
            Ok(()) => self.backend_armed = false,
            Err(e) => net_warn_rl!(self.log, "net: cannot stop polling the backend: {e}"),
        }
    }

    fn fail_backend(&mut self) {
        self.disarm_backend();
        self.backend_failed = true;
    }

    /// Reads the next frame from the backend into `rx_buf`, checking it
    /// and putting the guest's header in front.
    fn read_frame(&mut self) -> RxRead {
        let cap = self.rx_buf.len();
        match self.backend.recv(&mut self.rx_buf) {
            Ok(0) => {
                tracing::error!(backend = %self.backend.name(), "net: the backend was closed, no more frames will be received");
                self.fail_backend();
                RxRead::Empty
            }
            Ok(n) if n > cap || n.saturating_sub(VNET_HDR_LEN) > self.rx_max_frame => {
                net_warn_rl!(
                    self.log,
                    "net: dropping a {}-byte frame from the backend: longer than {} bytes",
                    n.saturating_sub(VNET_HDR_LEN),
                    self.rx_max_frame
                );
                Stats::inc(&self.stats.rx_dropped);
                RxRead::Again
            }
            Ok(n) if n < VNET_HDR_LEN + MIN_FRAME_LEN => {
                net_warn_rl!(
                    self.log,
                    "net: dropping a {n}-byte runt frame from the backend"
                );
                Stats::inc(&self.stats.rx_dropped);
                RxRead::Again
            }
            Ok(n) => {
                let (flags, gso) = (self.rx_buf[0], self.rx_buf[1]);
                if gso != VIRTIO_NET_HDR_GSO_NONE || flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
                    // Impossible with offloads off on the tap; the guest
                    // accepted no offloads either.
                    net_warn_rl!(
                        self.log,
                        "net: dropping a frame with offload metadata (flags {flags:#x}, gso {gso})"
                    );
                    Stats::inc(&self.stats.rx_dropped);
                    return RxRead::Again;
                }
                self.rx_buf[..VNET_HDR_LEN].copy_from_slice(&RX_HDR);
                RxRead::Frame(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => RxRead::Empty,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => RxRead::Again,
            Err(e) => {
                tracing::error!(backend = %self.backend.name(), "net: reading the backend failed, no more frames will be received: {e}");
                self.fail_backend();
                RxRead::Empty
            }
        }
    }

    /// Moves frames from the backend to the guest. Returns whether chains
    /// were used.
    fn process_rx(&mut self) -> bool {
        self.rx_more = false;
        let mut used = false;
        // Every step reads a frame or consumes a chain; bound both so TX
        // gets its turn.
        let budget = 2 * usize::from(self.queues[RXQ].size().max(1));
        let mut steps = 0usize;
        loop {
            if steps >= budget {
                self.rx_more = true;
                break;
            }
            steps += 1;
            let len = match self.rx_pending {
                Some(len) => len,
                None => {
                    if self.backend_failed {
                        break;
                    }
                    match self.read_frame() {
                        RxRead::Frame(len) => len,
                        RxRead::Again => continue,
                        RxRead::Empty => break,
                    }
                }
            };
            self.rx_pending = Some(len);
            let mem = &self.mem;
            let Some(chain) = self.queues[RXQ].pop_descriptor_chain(mem) else {
                // No buffer: keep the frame and stop listening to the
                // backend until the guest posts buffers (RX notification).
                self.disarm_backend();
                break;
            };
            let head = chain.head_index();
            let frame = self.rx_buf.get(..len).unwrap_or(&[]);
            match write_rx_chain(mem, chain, &mut self.segs, frame) {
                Ok(()) => {
                    self.rx_pending = None;
                    // len <= VNET_HDR_LEN + MAX_FRAME_LEN fits in u32.
                    used |= add_used(
                        &mut self.queues[RXQ],
                        mem,
                        head,
                        len as u32,
                        &mut self.log,
                        "net",
                    );
                    Stats::inc(&self.stats.rx_frames);
                    Stats::add(&self.stats.rx_bytes, len - VNET_HDR_LEN);
                }
                Err(RxChainError::TooSmall(cap)) => {
                    net_warn_rl!(
                        self.log,
                        "net: dropping a {}-byte frame: the guest's RX buffer holds {cap} bytes",
                        len - VNET_HDR_LEN
                    );
                    Stats::inc(&self.stats.rx_dropped);
                    self.rx_pending = None;
                    // The chain is fine: keep it for the next frame.
                    self.queues[RXQ].go_to_previous_position();
                }
                Err(e) => {
                    net_warn_rl!(self.log, "net: bad RX chain {head}: {e}");
                    Stats::inc(&self.stats.rx_bad_chains);
                    used |= add_used(&mut self.queues[RXQ], mem, head, 0, &mut self.log, "net");
                }
            }
        }
        used
    }

    /// Moves guest frames to the backend. Returns whether chains were used.
    fn process_tx(&mut self) -> bool {
        self.tx_more = false;
        let mut used = false;
        let budget = self.queues[TXQ].size().max(1);
        let mut done = 0u16;
        loop {
            if done >= budget {
                self.tx_more = true;
                break;
            }
            let mem = &self.mem;
            let Some(chain) = self.queues[TXQ].pop_descriptor_chain(mem) else {
                break;
            };
            done += 1;
            let head = chain.head_index();
            match read_tx_chain(mem, chain, &mut self.tx_buf) {
                Ok(len) => {
                    let frame = self.tx_buf.get_mut(..len).unwrap_or(&mut []);
                    // No offloads were negotiated: whatever the guest put
                    // in the header, the backend gets a plain one.
                    if let Some(hdr) = frame.get_mut(..VNET_HDR_LEN) {
                        hdr.fill(0);
                    }
                    match self.backend.send(frame) {
                        Ok(()) => {
                            Stats::inc(&self.stats.tx_frames);
                            Stats::add(&self.stats.tx_bytes, len - VNET_HDR_LEN);
                        }
                        Err(e) => {
                            net_warn_rl!(
                                self.log,
                                "net: dropping a {}-byte guest frame: backend {}: {e}",
                                len - VNET_HDR_LEN,
                                self.backend.name()
                            );
                            Stats::inc(&self.stats.tx_dropped);
                        }
                    }
                }
                Err(e) => {
                    net_warn_rl!(self.log, "net: bad TX chain {head}: {e}");
                    Stats::inc(&self.stats.tx_bad_chains);
                }
            }
            used |= add_used(&mut self.queues[TXQ], mem, head, 0, &mut self.log, "net");
        }
        used
    }

    fn signal(&mut self, notify: [bool; NUM_QUEUES]) {
        notify_used(
            &mut self.queues,
            &notify,
            &self.mem,
            self.interrupt.as_ref(),
            &mut self.log,
            "net",
        );
    }
}

/// The worker's TX and RX passes, run synchronously for the fuzz targets
/// (feature `fuzzing`): the same [`Worker`] the device thread runs, built
/// the way [`Net::activate`] builds it, without the thread and its epoll
/// loop, so a fuzz input maps to one deterministic sequence of passes.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// A device worker over `queues` (receiveq, transmitq) and `backend`.
    pub struct NetHarness {
        worker: Worker,
    }

    impl NetHarness {
        /// `mtu`: the MTU the driver accepted (`None`: no MTU feature).
        pub fn new(
            mem: GuestMemoryMmap,
            interrupt: Arc<dyn VirtioInterrupt>,
            rxq: Queue,
            txq: Queue,
            backend: Box<dyn NetBackend>,
            mtu: Option<u16>,
        ) -> io::Result<Self> {
            let epoll = Epoll::new()?;
            let backend_fd = backend.raw_fd();
            epoll.ctl(
                ControlOperation::Add,
                backend_fd,
                EpollEvent::new(EventSet::IN, TOKEN_BACKEND),
            )?;
            let rx_max_frame = mtu.map_or(MAX_FRAME_LEN, |m| {
                (usize::from(m) + ETH_OVERHEAD).min(MAX_FRAME_LEN)
            });
            Ok(Self {
                worker: Worker {
                    mem,
                    interrupt,
                    queues: [rxq, txq],
                    rx_evt: EventFd::new(EFD_NONBLOCK)?,
                    tx_evt: EventFd::new(EFD_NONBLOCK)?,
                    kill: EventFd::new(EFD_NONBLOCK)?,
                    epoll,
                    backend,
                    backend_fd,
                    backend_armed: true,
                    backend_failed: false,
                    rx_buf: vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN],
                    rx_pending: None,
                    rx_max_frame,
                    tx_buf: vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN],
                    segs: Vec::new(),
                    tx_more: false,
                    rx_more: false,
                    stats: Arc::new(Stats::default()),
                    log: LogLimiter::new(),
                },
            })
        }

        /// One TX pass (a guest TX notification); returns whether chains
        /// were used, and whether the pass stopped on its budget.
        pub fn process_tx(&mut self) -> (bool, bool) {
            let used = self.worker.process_tx();
            (used, self.worker.tx_more)
        }

        /// One RX pass (backend readable or guest RX notification).
        pub fn process_rx(&mut self) -> (bool, bool) {
            self.worker.arm_backend();
            let used = self.worker.process_rx();
            (used, self.worker.rx_more)
        }

        /// Interrupts the guest for the used chains, as after each pass.
        pub fn signal(&mut self, tx: bool, rx: bool) {
            let mut notify = [false; NUM_QUEUES];
            notify[TXQ] = tx;
            notify[RXQ] = rx;
            self.worker.signal(notify);
        }

        pub fn stats(&self) -> NetStats {
            self.worker.stats.snapshot()
        }

        /// The queues (receiveq, transmitq), to check ring positions.
        pub fn queues(&self) -> &[Queue; NUM_QUEUES] {
            &self.worker.queues
        }
    }
}
