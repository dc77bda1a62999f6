//! The virtio-vsock device (virtio spec 5.10, device id 19).
//!
//! Queues: 0 = RX (device -> guest packets), 1 = TX (guest -> device
//! packets), 2 = event. Config space: the guest CID as a little-endian u64.
//!
//! Threading: [`Vsock::activate`] starts one worker thread ("ember-vsock")
//! that owns the queues and the [`Muxer`] and epolls the three queue
//! eventfds, the Unix listener, every host stream, a command eventfd and a
//! kill eventfd. [`Vsock::shutdown`] and [`Vsock::reset`] write the kill
//! eventfd and join the thread. The Unix listener is bound in
//! [`Vsock::new`] and lives across resets; it goes (and its socket file is
//! removed) on shutdown or drop.

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::super::device_worker::{check_activation, read_config_bytes, DeviceWorker};
use super::super::used_ring::{add_used, notify_used};
use super::super::{ActivateError, GuestMemoryMmap, VirtioDevice, VirtioInterrupt, TYPE_VSOCK};
use super::muxer::Muxer;
use super::packet::{self, RxBuffer, EVENT_TRANSPORT_RESET, MAX_PKT_DATA};
use super::unix::HostListener;
use super::{warn_rl, LogLimiter, VsockError, VsockTimeouts};
use crate::confine::{self, Role};

/// `VIRTIO_F_VERSION_1`.
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Queue size offered for each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
const NUM_QUEUES: usize = 3;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;

const TOKEN_KILL: u64 = 0;
const TOKEN_RXQ: u64 = 1;
const TOKEN_TXQ: u64 = 2;
const TOKEN_EVQ: u64 = 3;
const TOKEN_CMD: u64 = 4;

/// The listener travels between the device and its worker through this
/// slot, so that a failed thread spawn or a reset gives it back.
type ListenerSlot = Arc<Mutex<Option<HostListener>>>;

fn lock(slot: &ListenerSlot) -> MutexGuard<'_, Option<HostListener>> {
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The virtio-vsock device with a hybrid Unix-socket backend.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    timeouts: VsockTimeouts,
    acked_features: u64,
    queue_sizes: [u16; NUM_QUEUES],
    listener: ListenerSlot,
    worker: Option<DeviceWorker>,
    /// Wakes the worker for [`Vsock::send_transport_reset`].
    cmd_evt: EventFd,
    reset_requested: Arc<AtomicBool>,
    shut_down: bool,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("uds_path", &self.uds_path)
            .field("active", &self.worker.is_some())
            .finish()
    }
}

impl Vsock {
    /// Creates the device and binds the host listener at `uds_path` now, so
    /// a path in use fails at VM build time. A stale socket file (nobody
    /// listening) is replaced; a live listener gives
    /// [`VsockError::AddrInUse`].
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        Self::with_timeouts(guest_cid, uds_path, VsockTimeouts::default())
    }

    /// [`Vsock::new`] with explicit timeouts.
    pub fn with_timeouts(
        guest_cid: u64,
        uds_path: PathBuf,
        timeouts: VsockTimeouts,
    ) -> Result<Self, VsockError> {
        if guest_cid <= 2 || guest_cid == u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let cmd_evt = EventFd::new(EFD_NONBLOCK).map_err(VsockError::Setup)?;
        let listener = HostListener::bind(&uds_path)?;
        tracing::debug!(guest_cid, path = %uds_path.display(), "vsock: listening");
        Ok(Self {
            guest_cid,
            uds_path,
            timeouts,
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
            listener: Arc::new(Mutex::new(Some(listener))),
            worker: None,
            cmd_evt,
            reset_requested: Arc::new(AtomicBool::new(false)),
            shut_down: false,
        })
    }

    #[cfg(test)]
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// Drops every connection and queues a `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`
    /// event for the guest (used after a snapshot restore). If the device is
    /// not active yet, it is sent right after activation.
    pub fn send_transport_reset(&self) -> Result<(), VsockError> {
        if self.shut_down {
            return Err(VsockError::ShutDown);
        }
        self.reset_requested.store(true, Ordering::SeqCst);
        self.cmd_evt.write(1).map_err(VsockError::Setup)
    }

    /// Signals the worker to stop and joins it. Returns false if it had
    /// panicked.
    fn stop_worker(&mut self) -> bool {
        self.worker.take().is_none_or(DeviceWorker::stop)
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(offset, len = data.len(), "vsock: ignoring a config write");
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
        if lock(&self.listener).is_none() {
            return Err(ActivateError::Backend(
                "the host listener is gone (an earlier worker failed)".into(),
            ));
        }

        let epoll = Epoll::new().map_err(ActivateError::Worker)?;
        let (kill, kill_worker) = DeviceWorker::kill_pair()?;
        let cmd = self.cmd_evt.try_clone().map_err(ActivateError::Worker)?;
        let mut evts = queue_evts.into_iter();
        let (Some(rx_evt), Some(tx_evt), Some(ev_evt)) = (evts.next(), evts.next(), evts.next())
        else {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: 0,
            });
        };
        for (fd, token) in [
            (kill_worker.as_raw_fd(), TOKEN_KILL),
            (rx_evt.as_raw_fd(), TOKEN_RXQ),
            (tx_evt.as_raw_fd(), TOKEN_TXQ),
            (ev_evt.as_raw_fd(), TOKEN_EVQ),
            (cmd.as_raw_fd(), TOKEN_CMD),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(ActivateError::Worker)?;
        }
        let mut qs = queues.into_iter();
        let (Some(rxq), Some(txq), Some(evq)) = (qs.next(), qs.next(), qs.next()) else {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: 0,
            });
        };

        let slot = self.listener.clone();
        let guest_cid = self.guest_cid;
        let uds_path = self.uds_path.clone();
        let timeouts = self.timeouts;
        let reset_requested = self.reset_requested.clone();
        let worker = DeviceWorker::spawn("ember-vsock", kill, move || {
            if let Err(e) = confine::thread(Role::VsockWorker) {
                tracing::error!("vsock: cannot confine the worker thread, not serving: {e}");
                return;
            }
            let Some(listener) = lock(&slot).take() else {
                tracing::error!("vsock: worker started without a listener");
                return;
            };
            let muxer = match Muxer::new(guest_cid, uds_path, timeouts, epoll, listener) {
                Ok(m) => m,
                Err((e, listener)) => {
                    tracing::error!("vsock: cannot watch the host listener: {e}");
                    *lock(&slot) = Some(listener);
                    return;
                }
            };
            let mut worker = Worker {
                mem,
                interrupt,
                queues: [rxq, txq, evq],
                rx_evt,
                tx_evt,
                ev_evt,
                kill: kill_worker,
                cmd,
                muxer,
                reset_requested,
                reset_event_pending: false,
                tx_scratch: vec![0u8; MAX_PKT_DATA as usize],
                tx_more: false,
                rx_more: false,
                log: LogLimiter::new(),
            };
            worker.run();
            *lock(&slot) = Some(worker.muxer.into_listener());
        })?;
        self.worker = Some(worker);
        tracing::debug!(guest_cid = self.guest_cid, "vsock: activated");
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if self.shut_down {
            return false;
        }
        let ok = self.stop_worker();
        self.acked_features = 0;
        ok && lock(&self.listener).is_some()
    }

    fn shutdown(&mut self) {
        self.stop_worker();
        // Dropping the listener removes the socket file.
        lock(&self.listener).take();
        self.shut_down = true;
    }
}

/// State owned by the worker thread.
struct Worker {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: [Queue; NUM_QUEUES],
    rx_evt: EventFd,
    tx_evt: EventFd,
    ev_evt: EventFd,
    kill: EventFd,
    cmd: EventFd,
    muxer: Muxer,
    reset_requested: Arc<AtomicBool>,
    reset_event_pending: bool,
    tx_scratch: Vec<u8>,
    /// The TX (RX) pass stopped on its budget: run again without waiting.
    tx_more: bool,
    rx_more: bool,
    log: LogLimiter,
}

impl Worker {
    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        // A transport reset requested before activation.
        if self.reset_requested.swap(false, Ordering::SeqCst) {
            self.reset_event_pending = true;
        }
        loop {
            let timeout_ms = if self.tx_more || self.rx_more {
                0
            } else {
                self.deadline_timeout()
            };
            let n = match self.muxer.epoll().wait(timeout_ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("vsock: epoll_wait failed, stopping the device: {e}");
                    return;
                }
            };
            let now = Instant::now();
            let mut tx_kick = false;
            let mut ev_kick = false;
            for ev in events.iter().take(n) {
                match ev.data() {
                    TOKEN_KILL => {
                        let _ = self.kill.read();
                        return;
                    }
                    TOKEN_RXQ => {
                        let _ = self.rx_evt.read();
                    }
                    TOKEN_TXQ => {
                        let _ = self.tx_evt.read();
                        tx_kick = true;
                    }
                    TOKEN_EVQ => {
                        let _ = self.ev_evt.read();
                        ev_kick = true;
                    }
                    TOKEN_CMD => {
                        let _ = self.cmd.read();
                        if self.reset_requested.swap(false, Ordering::SeqCst) {
                            tracing::info!("vsock: transport reset");
                            self.muxer.reset_connections();
                            self.reset_event_pending = true;
                        }
                    }
                    token => self.muxer.handle_event(
                        token,
                        EventSet::from_bits_truncate(ev.events()),
                        now,
                    ),
                }
            }
            self.muxer.process_timeouts(Instant::now());

            let mut notify = [false; NUM_QUEUES];
            if tx_kick || self.tx_more {
                notify[TXQ] |= self.process_tx();
            }
            notify[RXQ] |= self.process_rx();
            // TX may have stalled on a full RST queue that RX just drained.
            if !self.tx_more && self.muxer.can_accept_tx() && self.tx_has_work() {
                notify[TXQ] |= self.process_tx();
                notify[RXQ] |= self.process_rx();
            }
            if self.reset_event_pending || ev_kick {
                notify[EVQ] |= self.process_evq();
            }
            self.signal(notify);
        }
    }

    fn deadline_timeout(&self) -> i32 {
        match self.muxer.next_deadline() {
            None => -1,
            Some(d) => {
                let ms = d.saturating_duration_since(Instant::now()).as_millis();
                // Round up so we do not wake just before the deadline.
                i32::try_from(ms.saturating_add(1)).unwrap_or(i32::MAX)
            }
        }
    }

    /// Whether the TX queue holds chains we have not looked at.
    fn tx_has_work(&self) -> bool {
        let q = &self.queues[TXQ];
        match q.avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire) {
            Ok(idx) => idx.0 != q.next_avail(),
            Err(_) => false,
        }
    }

    /// Reads guest packets from the TX queue. Returns whether chains were
    /// used.
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
            if !self.muxer.can_accept_tx() {
                // Resumed once the guest gives RX buffers for the RSTs.
                break;
            }
            let mem = &self.mem;
            let Some(mut chain) = self.queues[TXQ].pop_descriptor_chain(mem) else {
                break;
            };
            done += 1;
            let head = chain.head_index();
            match packet::read_tx(mem, &mut chain, &mut self.tx_scratch) {
                Ok((hdr, len)) => {
                    let data = self.tx_scratch.get(..len).unwrap_or(&[]);
                    self.muxer.on_guest_packet(&hdr, data, Instant::now());
                }
                Err(e) => {
                    warn_rl!(self.log, "vsock: dropping a bad TX chain: {e}");
                }
            }
            if let Err(e) = self.queues[TXQ].add_used(mem, head, 0) {
                warn_rl!(self.log, "vsock: cannot return a TX chain: {e}");
            }
            used = true;
        }
        used
    }

    /// Fills guest RX buffers with what the muxer has. Returns whether
    /// chains were used.
    fn process_rx(&mut self) -> bool {
        self.rx_more = false;
        let mut used = false;
        let budget = self.queues[RXQ].size().max(1);
        let mut done = 0u16;
        while self.muxer.has_rx() {
            if done >= budget {
                self.rx_more = true;
                break;
            }
            let mem = &self.mem;
            let Some(mut chain) = self.queues[RXQ].pop_descriptor_chain(mem) else {
                break;
            };
            done += 1;
            let head = chain.head_index();
            let mut buf = match RxBuffer::parse(mem, &mut chain) {
                Ok(b) if b.capacity() > 0 => b,
                Ok(_) => {
                    warn_rl!(self.log, "vsock: RX chain without room for data");
                    used |= add_used(&mut self.queues[RXQ], mem, head, 0, &mut self.log, "vsock");
                    continue;
                }
                Err(e) => {
                    warn_rl!(self.log, "vsock: dropping a bad RX chain: {e}");
                    used |= add_used(&mut self.queues[RXQ], mem, head, 0, &mut self.log, "vsock");
                    continue;
                }
            };
            let Some((hdr, data)) = self.muxer.fill_rx(buf.capacity(), Instant::now()) else {
                // Nothing after all: give the chain back to the queue.
                self.queues[RXQ].go_to_previous_position();
                break;
            };
            let len = match buf.write(&hdr, data) {
                Ok(len) => len,
                Err(e) => {
                    tracing::error!("vsock: cannot write a packet to guest memory: {e}");
                    self.muxer.rx_write_failed(&hdr);
                    0
                }
            };
            used |= add_used(
                &mut self.queues[RXQ],
                mem,
                head,
                len,
                &mut self.log,
                "vsock",
            );
        }
        used
    }

    /// Delivers a pending transport-reset event. Returns whether chains
    /// were used.
    fn process_evq(&mut self) -> bool {
        let mut used = false;
        while self.reset_event_pending {
            let mem = &self.mem;
            let Some(mut chain) = self.queues[EVQ].pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let written = match chain.next() {
                Some(d) if d.is_write_only() && d.len() >= 4 => mem
                    .write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr())
                    .is_ok(),
                _ => false,
            };
            if written {
                self.reset_event_pending = false;
            } else {
                warn_rl!(self.log, "vsock: bad event queue buffer");
            }
            used |= add_used(
                &mut self.queues[EVQ],
                mem,
                head,
                if written { 4 } else { 0 },
                &mut self.log,
                "vsock",
            );
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
            "vsock",
        );
    }
}
