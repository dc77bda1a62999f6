//! virtio-mmio transport (virtio spec 1.1 section 4.2.2, version 2 "modern").
//!
//! [`MmioTransport`] owns the register file of one device and is inserted on
//! the MMIO bus over [`MMIO_SIZE`] bytes. It keeps the queues' configuration
//! until the driver sets DRIVER_OK, then builds the `virtio_queue::Queue`s
//! and hands them, with clones of the per-queue notification eventfds and
//! the [`MmioInterrupt`], to [`VirtioDevice::activate`].
//!
//! Wiring by the VMM, for a transport inserted at `base` with GSI `gsi`:
//! - `bus.insert(Arc::new(Mutex::new(transport)), base, MMIO_SIZE)`;
//! - for each `(i, evt)` in `transport.queue_evts().iter().enumerate()`:
//!   `vm.register_ioevent(evt, &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET), i as u32)`
//!   (a 4-byte datamatch on the queue index). Without it, QueueNotify
//!   writes reach [`BusDevice::write`] and the transport writes the eventfd
//!   itself, so both paths wake the device the same way;
//! - `vm.register_irqfd(transport.interrupt().irqfd(), gsi)`;
//! - kernel command line: [`cmdline_device`]`(base, MMIO_SIZE, gsi)`;
//! - at teardown: `transport.device().lock()...shutdown()`.
//!
//! Everything the guest writes is untrusted: bad values, bad widths and
//! out-of-order status transitions are logged (rate-limited) and ignored.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{GuestMemoryMmap, VirtioDevice, VirtioInterrupt, VIRTIO_MMIO_INT_CONFIG};
use crate::bus::BusDevice;

/// Size of the MMIO window of one transport (registers + config space).
#[cfg(any(test, feature = "fuzzing"))]
pub const MMIO_SIZE: u64 = 0x1000;
/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Modern (non-legacy) virtio-mmio.
pub const MMIO_VERSION: u32 = 2;
/// "EMBM" in little endian.
pub const VENDOR_ID: u32 = 0x4d42_4d45;
/// Offset of QueueNotify: register the queue eventfds as ioeventfds at
/// `base + NOTIFY_REG_OFFSET`, 4 bytes, datamatch = queue index.
pub const NOTIFY_REG_OFFSET: u64 = regs::QUEUE_NOTIFY;
/// Start of the device-specific configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// Register offsets (virtio spec 4.2.2).
pub mod regs {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const QUEUE_RESET: u64 = 0x0c0;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// Device status bits (virtio spec 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 0x01;
    pub const DRIVER: u32 = 0x02;
    pub const DRIVER_OK: u32 = 0x04;
    pub const FEATURES_OK: u32 = 0x08;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// The legal device status values, in the order the driver sets them.
const STATUS_CHAIN: [u32; 5] = [
    0,
    status::ACKNOWLEDGE,
    status::ACKNOWLEDGE | status::DRIVER,
    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
];

/// Largest queue size allowed by the split-ring format.
const MAX_QUEUE_SIZE: u16 = 32768;

/// Guest-triggered warnings logged at `warn` level before switching to
/// `debug`, so a hostile guest cannot flood the host log.
const WARN_BUDGET: u32 = 64;

/// Formats the kernel command line fragment announcing a virtio-mmio
/// device, e.g. `virtio_mmio.device=4K@0xd0000000:5`.
pub fn cmdline_device(base: u64, size: u64, irq: u32) -> String {
    const K: u64 = 1 << 10;
    const M: u64 = 1 << 20;
    const G: u64 = 1 << 30;
    let size = match size {
        0 => "0".to_string(),
        s if s.is_multiple_of(G) => format!("{}G", s / G),
        s if s.is_multiple_of(M) => format!("{}M", s / M),
        s if s.is_multiple_of(K) => format!("{}K", s / K),
        s => s.to_string(),
    };
    format!("virtio_mmio.device={size}@{base:#x}:{irq}")
}

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("cannot create a queue eventfd: {0}")]
    EventFd(#[source] io::Error),
    #[error("device declares queue {index} with invalid maximum size {max_size}")]
    InvalidQueueMaxSize { index: usize, max_size: u16 },
    #[error("snapshot holds a device of type {found} where type {expected} is placed")]
    SnapshotMismatch { expected: u32, found: u32 },
    #[error("snapshot queue {index}: {why}")]
    SnapshotQueue { index: usize, why: String },
}

/// The interrupt of one virtio-mmio device: the InterruptStatus bits shared
/// with the transport, and an irqfd the VMM registers with `KVM_IRQFD` for
/// the device's GSI.
///
/// The GSI is edge-triggered: each irqfd write is one edge. A device that
/// sets bits between the driver's InterruptStatus read and its ACK has
/// written the irqfd again (an edge latched while the handler runs), but an
/// edge coalesced with an earlier pending one would be lost; so
/// [`MmioInterrupt::ack`] re-raises the irqfd whenever bits remain set after
/// an ACK. The worst case is one spurious interrupt the driver finds empty.
pub struct MmioInterrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    irqfd: EventFd,
}

impl MmioInterrupt {
    /// Creates the interrupt with a new non-blocking irqfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self::with_irqfd(EventFd::new(EFD_NONBLOCK)?))
    }

    /// Creates the interrupt around an existing irqfd.
    pub fn with_irqfd(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            irqfd,
        }
    }

    /// The eventfd to register with `KVM_IRQFD` for the device's GSI.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// Current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Current ConfigGeneration: bumped by every config-change interrupt.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears `bits`; re-raises the line if others remain.
    pub fn ack(&self, bits: u32) -> io::Result<()> {
        let remaining = self.status.fetch_and(!bits, Ordering::SeqCst) & !bits;
        if remaining != 0 {
            self.irqfd.write(1)?;
        }
        Ok(())
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// Restores InterruptStatus and ConfigGeneration from a snapshot and,
    /// if an interrupt was pending, raises the line again.
    fn restore(&self, status: u32, config_generation: u32) -> io::Result<()> {
        self.status.store(status, Ordering::SeqCst);
        self.config_generation
            .store(config_generation, Ordering::SeqCst);
        if status != 0 {
            self.irqfd.write(1)?;
        }
        Ok(())
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, status: u32) -> io::Result<()> {
        if status & VIRTIO_MMIO_INT_CONFIG != 0 {
            self.config_generation.fetch_add(1, Ordering::SeqCst);
        }
        self.status.fetch_or(status, Ordering::SeqCst);
        self.irqfd.write(1)
    }
}

impl fmt::Debug for MmioInterrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioInterrupt")
            .field("status", &self.status())
            .field("config_generation", &self.config_generation())
            .finish_non_exhaustive()
    }
}

/// What the driver wrote for one queue before DRIVER_OK.
#[derive(Debug, Clone)]
struct QueueConfig {
    max_size: u16,
    /// Raw QueueNum; validated when the queue is built.
    size: u32,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

/// The virtio-mmio register file of one device. See the module docs for
/// how the VMM wires it.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<MmioInterrupt>,
    // Cached at construction so register reads need not lock the device.
    device_type: u32,
    avail_features: u64,
    queues: Vec<QueueConfig>,
    queue_evts: Vec<EventFd>,

    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    shm_sel: u32,
    /// `activate` was called since the last successful reset (whether it
    /// succeeded or not), so a reset must go through the device.
    activate_called: bool,
    warn_budget: u32,
}

impl MmioTransport {
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: MmioInterrupt,
    ) -> Result<Self, MmioError> {
        let (device_type, avail_features, max_sizes) = {
            let dev = device.lock().unwrap_or_else(|p| p.into_inner());
            (
                dev.device_type(),
                dev.avail_features(),
                dev.queue_max_sizes().to_vec(),
            )
        };
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut queue_evts = Vec::with_capacity(max_sizes.len());
        for (index, &max_size) in max_sizes.iter().enumerate() {
            if max_size == 0 || !max_size.is_power_of_two() || max_size > MAX_QUEUE_SIZE {
                return Err(MmioError::InvalidQueueMaxSize { index, max_size });
            }
            queues.push(QueueConfig::new(max_size));
            queue_evts.push(EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?);
        }
        Ok(Self {
            mem,
            device,
            interrupt: Arc::new(interrupt),
            device_type,
            avail_features,
            queues,
            queue_evts,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            shm_sel: 0,
            activate_called: false,
            warn_budget: WARN_BUDGET,
        })
    }

    /// One eventfd per queue, in queue order. Register `queue_evts()[i]` as
    /// an ioeventfd at `base + NOTIFY_REG_OFFSET` with datamatch `i as u32`.
    /// The device receives clones of these at activation, so they stay valid
    /// across resets and re-activations.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's interrupt; register `interrupt().irqfd()` with
    /// `KVM_IRQFD` for the device's GSI.
    #[cfg(test)]
    pub fn interrupt(&self) -> &Arc<MmioInterrupt> {
        &self.interrupt
    }

    /// The device id reported in DeviceID.
    #[cfg(test)]
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// Current device status register.
    #[cfg(feature = "fuzzing")]
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device was activated and has not been reset since.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn is_activated(&self) -> bool {
        self.status & status::DRIVER_OK != 0
    }

    fn lock_device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        // A poisoned lock means a device thread panicked; keep serving the
        // guest on the device's last state rather than panic a vCPU.
        self.device.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Logs a guest-triggered anomaly at `warn` level while the budget
    /// lasts, then at `debug` level.
    fn guest_warn(&mut self, args: fmt::Arguments<'_>) {
        if self.warn_budget > 0 {
            self.warn_budget -= 1;
            tracing::warn!(device_type = self.device_type, "virtio-mmio: {args}");
            if self.warn_budget == 0 {
                tracing::warn!(
                    device_type = self.device_type,
                    "virtio-mmio: too many guest errors, further ones are logged at debug level"
                );
            }
        } else {
            tracing::debug!(device_type = self.device_type, "virtio-mmio: {args}");
        }
    }

    fn selected_queue(&self) -> Option<&QueueConfig> {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get(i))
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            regs::MAGIC_VALUE => MMIO_MAGIC,
            regs::VERSION => MMIO_VERSION,
            regs::DEVICE_ID => self.device_type,
            regs::VENDOR_ID => VENDOR_ID,
            regs::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            regs::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            regs::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            regs::INTERRUPT_STATUS => self.interrupt.status(),
            regs::STATUS => self.status,
            // No shared memory regions: length and base read as all ones.
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH | regs::SHM_BASE_LOW | regs::SHM_BASE_HIGH => {
                u32::MAX
            }
            regs::CONFIG_GENERATION => self.interrupt.config_generation(),
            // Write-only registers read as zero.
            regs::DEVICE_FEATURES_SEL
            | regs::DRIVER_FEATURES
            | regs::DRIVER_FEATURES_SEL
            | regs::QUEUE_SEL
            | regs::QUEUE_NUM
            | regs::QUEUE_NOTIFY
            | regs::INTERRUPT_ACK
            | regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_DRIVER_LOW
            | regs::QUEUE_DRIVER_HIGH
            | regs::QUEUE_DEVICE_LOW
            | regs::QUEUE_DEVICE_HIGH
            | regs::SHM_SEL
            | regs::QUEUE_RESET => 0,
            _ => {
                self.guest_warn(format_args!("read of unknown register {offset:#x}"));
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            regs::DRIVER_FEATURES => self.write_driver_features(v),
            regs::QUEUE_SEL => self.queue_sel = v,
            regs::QUEUE_NUM
            | regs::QUEUE_READY
            | regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_DRIVER_LOW
            | regs::QUEUE_DRIVER_HIGH
            | regs::QUEUE_DEVICE_LOW
            | regs::QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, v),
            regs::QUEUE_NOTIFY => self.notify(v),
            regs::INTERRUPT_ACK => {
                if let Err(e) = self.interrupt.ack(v) {
                    self.guest_warn(format_args!("cannot re-raise the irqfd after ACK: {e}"));
                }
            }
            regs::STATUS => self.set_status(v),
            regs::SHM_SEL => self.shm_sel = v,
            regs::QUEUE_RESET => {
                self.guest_warn(format_args!("QueueReset write ignored (not offered)"));
            }
            _ => self.guest_warn(format_args!(
                "write of {v:#x} to read-only or unknown register {offset:#x}"
            )),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status != status::ACKNOWLEDGE | status::DRIVER {
            let st = self.status;
            self.guest_warn(format_args!(
                "DriverFeatures write of {v:#x} in status {st:#x} ignored"
            ));
            return;
        }
        match self.driver_features_sel {
            0 => set_low(&mut self.acked_features, v),
            1 => set_high(&mut self.acked_features, v),
            sel => {
                if v != 0 {
                    self.guest_warn(format_args!(
                        "DriverFeatures write of {v:#x} with selector {sel} ignored"
                    ));
                }
            }
        }
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        if offset == regs::QUEUE_READY && v == 0 && self.selected_queue().is_none_or(|q| !q.ready) {
            // Linux deactivates its queues this way after a reset: a no-op.
            return;
        }
        let setup = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        if self.status != setup {
            let st = self.status;
            self.guest_warn(format_args!(
                "queue register {offset:#x} write in status {st:#x} ignored"
            ));
            return;
        }
        let sel = self.queue_sel;
        let Some(q) = usize::try_from(sel)
            .ok()
            .and_then(|i| self.queues.get_mut(i))
        else {
            self.guest_warn(format_args!(
                "queue register {offset:#x} write with out-of-range QueueSel {sel}"
            ));
            return;
        };
        if offset == regs::QUEUE_READY {
            // Un-readying before DRIVER_OK is harmless; allow it.
            q.ready = v == 1;
            if v > 1 {
                self.guest_warn(format_args!("QueueReady write of {v:#x} treated as 0"));
            }
            return;
        }
        if q.ready {
            self.guest_warn(format_args!(
                "queue {sel} register {offset:#x} write while the queue is ready ignored"
            ));
            return;
        }
        match offset {
            regs::QUEUE_NUM => q.size = v,
            regs::QUEUE_DESC_LOW => set_low(&mut q.desc, v),
            regs::QUEUE_DESC_HIGH => set_high(&mut q.desc, v),
            regs::QUEUE_DRIVER_LOW => set_low(&mut q.driver, v),
            regs::QUEUE_DRIVER_HIGH => set_high(&mut q.driver, v),
            regs::QUEUE_DEVICE_LOW => set_low(&mut q.device, v),
            regs::QUEUE_DEVICE_HIGH => set_high(&mut q.device, v),
            _ => {}
        }
    }

    fn notify(&mut self, v: u32) {
        // With VIRTIO_F_NOTIFICATION_DATA the upper half carries extra data;
        // the queue index is always the low 16 bits.
        let index = (v & 0xffff) as usize;
        match self.queue_evts.get(index) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    self.guest_warn(format_args!("cannot signal queue {index}: {e}"));
                }
            }
            None => self.guest_warn(format_args!("QueueNotify for unknown queue {v:#x}")),
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if v == old {
            return;
        }
        if v & status::FAILED != 0 {
            // The driver gave up on the device. Keep whatever else is set
            // (an active device keeps running until the driver resets it).
            self.status |= status::FAILED;
            return;
        }
        if old & (status::FAILED | status::DEVICE_NEEDS_RESET) != 0 {
            self.guest_warn(format_args!(
                "status write of {v:#x} in status {old:#x} ignored: needs reset"
            ));
            return;
        }
        let pos = |s: u32| STATUS_CHAIN.iter().position(|&c| c == s);
        let (Some(from), Some(to)) = (pos(old), pos(v)) else {
            self.guest_warn(format_args!(
                "invalid status {v:#x} (from {old:#x}) ignored"
            ));
            return;
        };
        if to < from {
            self.guest_warn(format_args!(
                "status write of {v:#x} clears bits of {old:#x}: ignored"
            ));
            return;
        }
        // Walk the chain one bit at a time, so a driver setting several
        // bits in one write still goes through negotiation and activation.
        for &next in &STATUS_CHAIN[from + 1..=to] {
            if next & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
                if !self.features_ok() {
                    return;
                }
            } else if next & status::DRIVER_OK != 0 {
                self.activate();
                return;
            }
            self.status = next;
        }
    }

    /// Checks the driver's features; on success forwards them to the device.
    fn features_ok(&mut self) -> bool {
        let acked = self.acked_features;
        let unoffered = acked & !self.avail_features;
        if unoffered != 0 {
            self.guest_warn(format_args!(
                "FEATURES_OK refused: driver acked unoffered features {unoffered:#x}"
            ));
            return false;
        }
        if self.avail_features & VIRTIO_F_VERSION_1 != 0 && acked & VIRTIO_F_VERSION_1 == 0 {
            self.guest_warn(format_args!(
                "FEATURES_OK refused: a version 2 transport requires VIRTIO_F_VERSION_1"
            ));
            return false;
        }
        self.lock_device().set_acked_features(acked);
        true
    }

    /// Builds the queue handed to the device. Queues the driver did not
    /// enable are passed as not ready (the device must not use them).
    fn build_queue(&self, cfg: &QueueConfig, event_idx: bool) -> Result<Queue, String> {
        let mut q = Queue::new(cfg.max_size).map_err(|e| format!("max size: {e}"))?;
        if !cfg.ready {
            return Ok(q);
        }
        let size = u16::try_from(cfg.size).map_err(|_| format!("size {}", cfg.size))?;
        q.try_set_size(size)
            .map_err(|e| format!("size {size} (max {}): {e}", cfg.max_size))?;
        q.try_set_desc_table_address(GuestAddress(cfg.desc))
            .map_err(|e| format!("descriptor table {:#x}: {e}", cfg.desc))?;
        q.try_set_avail_ring_address(GuestAddress(cfg.driver))
            .map_err(|e| format!("driver area {:#x}: {e}", cfg.driver))?;
        q.try_set_used_ring_address(GuestAddress(cfg.device))
            .map_err(|e| format!("device area {:#x}: {e}", cfg.device))?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        if !q.is_valid(&self.mem) {
            return Err(format!(
                "rings outside guest memory (desc {:#x}, driver {:#x}, device {:#x}, size {size})",
                cfg.desc, cfg.driver, cfg.device
            ));
        }
        Ok(q)
    }

    fn activate(&mut self) {
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        let mut failure = None;
        for (i, cfg) in self.queues.iter().enumerate() {
            match self.build_queue(cfg, event_idx) {
                Ok(q) => queues.push(q),
                Err(e) => {
                    failure = Some(format!("queue {i} invalid: {e}"));
                    break;
                }
            }
        }
        if let Some(msg) = failure {
            return self.fail_activation(format_args!("{msg}"));
        }
        let evts: io::Result<Vec<EventFd>> =
            self.queue_evts.iter().map(EventFd::try_clone).collect();
        let evts = match evts {
            Ok(evts) => evts,
            Err(e) => return self.fail_activation(format_args!("cannot clone eventfds: {e}")),
        };
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        self.activate_called = true;
        let res = self
            .lock_device()
            .activate(self.mem.clone(), interrupt, queues, evts);
        match res {
            Ok(()) => {
                self.status |= status::DRIVER_OK;
                tracing::debug!(
                    device_type = self.device_type,
                    "virtio-mmio: device activated"
                );
            }
            Err(e) => self.fail_activation(format_args!("device activation failed: {e}")),
        }
    }

    fn fail_activation(&mut self, why: fmt::Arguments<'_>) {
        self.guest_warn(why);
        self.status |= status::DEVICE_NEEDS_RESET;
        if let Err(e) = self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG) {
            self.guest_warn(format_args!("cannot raise the config interrupt: {e}"));
        }
    }

    fn reset(&mut self) {
        if self.activate_called {
            if !self.lock_device().reset() {
                self.guest_warn(format_args!("device reset failed"));
                self.status = status::DEVICE_NEEDS_RESET;
                return;
            }
            self.activate_called = false;
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.shm_sel = 0;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        // Drop notifications left over from the previous session; the
        // eventfds are non-blocking, so an empty one just returns EAGAIN.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.interrupt.clear();
    }
}

/// One queue of a transport in a snapshot.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MmioQueueState {
    pub max_size: u16,
    pub size: u32,
    pub ready: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
    /// Ring positions: the device had consumed and completed everything up
    /// to the used index when it was quiesced.
    pub next_avail: u16,
    pub next_used: u16,
}

/// A transport in a snapshot.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MmioState {
    pub device_type: u32,
    pub status: u32,
    pub acked_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<MmioQueueState>,
}

impl MmioTransport {
    /// Quiesces the device (its worker stops and drops what it held, as on
    /// a reset) and returns the transport's state. The device is unusable
    /// afterwards: this is for a snapshot that ends the VM.
    ///
    /// Queue positions come from the used rings in guest memory: the
    /// devices complete every chain they pop before popping the next, so
    /// once the worker has stopped, `next_avail == next_used == used.idx`.
    pub fn save_state(&mut self) -> MmioState {
        if self.activate_called {
            let _ = self.lock_device().reset();
        }
        let queues = self
            .queues
            .iter()
            .map(|q| {
                let used_idx: u16 = if q.ready {
                    use vm_memory::Bytes;
                    self.mem
                        .read_obj(GuestAddress(q.device.wrapping_add(2)))
                        .unwrap_or(0)
                } else {
                    0
                };
                MmioQueueState {
                    max_size: q.max_size,
                    size: q.size,
                    ready: q.ready,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                    next_avail: used_idx,
                    next_used: used_idx,
                }
            })
            .collect();
        MmioState {
            device_type: self.device_type,
            status: self.status,
            acked_features: self.acked_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
            queues,
        }
    }

    /// Recreates a transport from a snapshot and, if the driver had
    /// activated the device, activates it again with the saved rings.
    pub fn restore(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: MmioInterrupt,
        state: &MmioState,
    ) -> Result<Self, MmioError> {
        let mut t = Self::new(mem, device, interrupt)?;
        if state.device_type != t.device_type || state.queues.len() != t.queues.len() {
            return Err(MmioError::SnapshotMismatch {
                expected: t.device_type,
                found: state.device_type,
            });
        }
        t.acked_features = state.acked_features;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.queue_sel = state.queue_sel;
        for (cfg, q) in t.queues.iter_mut().zip(&state.queues) {
            cfg.size = q.size;
            cfg.ready = q.ready;
            cfg.desc = q.desc;
            cfg.driver = q.driver;
            cfg.device = q.device;
        }
        t.status = state.status & !status::DRIVER_OK;
        if state.status & status::DRIVER_OK != 0 {
            t.activate_restored(state)?;
        }
        t.interrupt
            .restore(state.interrupt_status, state.config_generation)
            .map_err(MmioError::EventFd)?;
        Ok(t)
    }

    fn activate_restored(&mut self, state: &MmioState) -> Result<(), MmioError> {
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, (cfg, qs)) in self.queues.iter().zip(&state.queues).enumerate() {
            let mut q = self
                .build_queue(cfg, event_idx)
                .map_err(|why| MmioError::SnapshotQueue { index: i, why })?;
            q.set_next_avail(qs.next_avail);
            q.set_next_used(qs.next_used);
            queues.push(q);
        }
        let evts = self
            .queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<io::Result<Vec<_>>>()
            .map_err(MmioError::EventFd)?;
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        self.activate_called = true;
        self.lock_device()
            .activate(self.mem.clone(), interrupt, queues, evts)
            .map_err(|e| MmioError::SnapshotQueue {
                index: 0,
                why: format!("device activation: {e}"),
            })?;
        self.status |= status::DRIVER_OK;
        Ok(())
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            data.fill(0);
            self.lock_device()
                .read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            let len = data.len();
            self.guest_warn(format_args!(
                "{len}-byte read at register offset {offset:#x} ignored"
            ));
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.lock_device()
                .write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let v = match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset.is_multiple_of(4) => u32::from_le_bytes(bytes),
            _ => {
                let len = data.len();
                self.guest_warn(format_args!(
                    "{len}-byte write at register offset {offset:#x} ignored"
                ));
                return;
            }
        };
        self.write_reg(offset, v);
    }
}

impl fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device_type)
            .field("status", &self.status)
            .field("acked_features", &self.acked_features)
            .field("queues", &self.queues)
            .field("interrupt", &self.interrupt)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use crate::devices::virtio::test_utils::{DummyDevice, FEATURE_VERSION_1};
    use crate::devices::virtio::VIRTIO_MMIO_INT_VRING;

    const MEM_SIZE: u64 = 0x10_0000;
    const SETUP: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    const RUNNING: u32 = SETUP | status::DRIVER_OK;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    fn transport_with(dev: DummyDevice) -> (MmioTransport, Arc<Mutex<DummyDevice>>) {
        let dev = Arc::new(Mutex::new(dev));
        let dyn_dev: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
        let t = MmioTransport::new(mem(), dyn_dev, MmioInterrupt::new().unwrap()).unwrap();
        (t, dev)
    }

    fn transport() -> (MmioTransport, Arc<Mutex<DummyDevice>>) {
        transport_with(DummyDevice::new())
    }

    fn rd(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0xffu8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    /// Eventfd counter, 0 when empty (the fds are non-blocking).
    fn count(evt: &EventFd) -> u64 {
        evt.read().unwrap_or(0)
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        wr(t, regs::STATUS, status::ACKNOWLEDGE);
        wr(t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, regs::DRIVER_FEATURES_SEL, 0);
        wr(t, regs::DRIVER_FEATURES, features as u32);
        wr(t, regs::DRIVER_FEATURES_SEL, 1);
        wr(t, regs::DRIVER_FEATURES, (features >> 32) as u32);
        wr(t, regs::STATUS, SETUP);
    }

    /// Queue `i` rings at 0x1000 * (3i + 1 ..).
    fn setup_queue(t: &mut MmioTransport, i: u32, size: u32) {
        let base = 0x1000 * (3 * u64::from(i) + 1);
        wr(t, regs::QUEUE_SEL, i);
        wr(t, regs::QUEUE_NUM, size);
        wr(t, regs::QUEUE_DESC_LOW, base as u32);
        wr(t, regs::QUEUE_DESC_HIGH, 0);
        wr(t, regs::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        wr(t, regs::QUEUE_DRIVER_HIGH, 0);
        wr(t, regs::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        wr(t, regs::QUEUE_DEVICE_HIGH, 0);
        wr(t, regs::QUEUE_READY, 1);
    }

    fn bring_up(t: &mut MmioTransport) {
        negotiate(t, FEATURE_VERSION_1);
        assert_eq!(rd(t, regs::STATUS), SETUP);
        setup_queue(t, 0, 16);
        setup_queue(t, 1, 8);
        wr(t, regs::STATUS, RUNNING);
    }

    #[test]
    fn identification_registers() {
        let mut dev = DummyDevice::new();
        dev.avail_features = FEATURE_VERSION_1 | (1 << 40) | 0x5;
        let (mut t, _dev) = transport_with(dev);
        assert_eq!(rd(&mut t, regs::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(rd(&mut t, regs::VERSION), 2);
        assert_eq!(rd(&mut t, regs::DEVICE_ID), 0x42);
        assert_eq!(rd(&mut t, regs::VENDOR_ID), VENDOR_ID);
        assert_ne!(VENDOR_ID, 0);
        assert_eq!(rd(&mut t, regs::DEVICE_FEATURES), 0x5);
        wr(&mut t, regs::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, regs::DEVICE_FEATURES), 0x101);
        wr(&mut t, regs::DEVICE_FEATURES_SEL, 2);
        assert_eq!(rd(&mut t, regs::DEVICE_FEATURES), 0);
        assert_eq!(rd(&mut t, regs::QUEUE_NUM_MAX), 16);
        wr(&mut t, regs::QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, regs::QUEUE_NUM_MAX), 8);
        assert_eq!(rd(&mut t, regs::QUEUE_READY), 0);
        assert_eq!(rd(&mut t, regs::STATUS), 0);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), 0);
        assert_eq!(rd(&mut t, regs::CONFIG_GENERATION), 0);
        assert_eq!(rd(&mut t, regs::SHM_LEN_LOW), u32::MAX);
        assert_eq!(rd(&mut t, regs::SHM_LEN_HIGH), u32::MAX);
        // Write-only and unknown registers read as zero.
        assert_eq!(rd(&mut t, regs::QUEUE_NOTIFY), 0);
        assert_eq!(rd(&mut t, 0x0e0), 0);
        assert_eq!(t.device_type(), 0x42);
    }

    #[test]
    fn reached_through_the_bus() {
        let (t, _dev) = transport();
        let evt = t.queue_evts()[1].try_clone().unwrap();
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(t)), 0xd000_0000, MMIO_SIZE)
            .unwrap();
        let mut b = [0u8; 4];
        assert!(bus.read(0xd000_0000, &mut b));
        assert_eq!(u32::from_le_bytes(b), MMIO_MAGIC);
        assert!(bus.write(0xd000_0000 + NOTIFY_REG_OFFSET, &1u32.to_le_bytes()));
        assert_eq!(count(&evt), 1);
    }

    #[test]
    fn full_handshake_activates_with_queues_and_eventfd_clones() {
        let mut dev = DummyDevice::new();
        dev.avail_features |= VIRTIO_RING_F_EVENT_IDX;
        let (mut t, dev) = transport_with(dev);
        negotiate(&mut t, FEATURE_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 1);
        assert_eq!(rd(&mut t, regs::STATUS), SETUP);
        assert_eq!(
            dev.lock().unwrap().acked_features,
            Some(FEATURE_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 1)
        );
        setup_queue(&mut t, 0, 16);
        setup_queue(&mut t, 1, 4);
        assert_eq!(rd(&mut t, regs::QUEUE_READY), 1);
        assert!(!t.is_activated());
        wr(&mut t, regs::STATUS, RUNNING);
        assert_eq!(rd(&mut t, regs::STATUS), RUNNING);
        assert!(t.is_activated());

        let d = dev.lock().unwrap();
        assert_eq!(d.activate_calls, 1);
        assert!(d.active);
        assert_eq!(d.queues.len(), 2);
        assert_eq!(d.queue_evts.len(), 2);
        let q0 = &d.queues[0];
        assert!(q0.ready());
        assert_eq!(q0.size(), 16);
        assert_eq!(q0.desc_table(), 0x1000);
        assert_eq!(q0.avail_ring(), 0x2000);
        assert_eq!(q0.used_ring(), 0x3000);
        assert!(q0.event_idx_enabled());
        let q1 = &d.queues[1];
        assert_eq!(q1.size(), 4);
        assert_eq!(q1.desc_table(), 0x4000);
        assert_eq!(q1.max_size(), 8);

        // The device got clones: a notification through the bus path and one
        // through the VMM's copy (as KVM's ioeventfd would) both reach it.
        let dev_evts: Vec<EventFd> = d
            .queue_evts
            .iter()
            .map(|e| e.try_clone().unwrap())
            .collect();
        let irq = d.interrupt.clone().unwrap();
        drop(d);
        wr(&mut t, regs::QUEUE_NOTIFY, 1);
        assert_eq!(count(&dev_evts[1]), 1);
        assert_eq!(count(&dev_evts[0]), 0);
        t.queue_evts()[0].write(1).unwrap();
        assert_eq!(count(&dev_evts[0]), 1);

        // The interrupt the device got is the transport's.
        irq.trigger(VIRTIO_MMIO_INT_VRING).unwrap();
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        assert_eq!(count(t.interrupt().irqfd()), 1);

        // Queue registers are frozen once running.
        wr(&mut t, regs::QUEUE_SEL, 0);
        wr(&mut t, regs::QUEUE_READY, 0);
        assert_eq!(rd(&mut t, regs::QUEUE_READY), 1);
        // Writing DRIVER_OK again is a no-op.
        wr(&mut t, regs::STATUS, RUNNING);
        assert_eq!(dev.lock().unwrap().activate_calls, 1);
    }

    #[test]
    fn status_bits_in_one_write_still_negotiate_and_activate() {
        let (mut t, dev) = transport();
        wr(&mut t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        assert_eq!(
            rd(&mut t, regs::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
        // Clearing bits is not a valid transition.
        wr(&mut t, regs::STATUS, status::ACKNOWLEDGE);
        assert_eq!(
            rd(&mut t, regs::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
        // Skipping a bit is not either.
        wr(
            &mut t,
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert_eq!(
            rd(&mut t, regs::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
        wr(&mut t, regs::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, regs::DRIVER_FEATURES, 1);
        // FEATURES_OK|DRIVER_OK at once: queues are not ready, so they are
        // handed over unready and activation still happens.
        wr(&mut t, regs::STATUS, RUNNING);
        assert_eq!(rd(&mut t, regs::STATUS), RUNNING);
        let d = dev.lock().unwrap();
        assert_eq!(d.acked_features, Some(FEATURE_VERSION_1));
        assert_eq!(d.activate_calls, 1);
        assert!(d.queues.iter().all(|q| !q.ready()));
    }

    #[test]
    fn feature_negotiation_refuses_unoffered_features() {
        let (mut t, dev) = transport();
        // Not writable before DRIVER.
        wr(&mut t, regs::DRIVER_FEATURES, 1);
        wr(&mut t, regs::STATUS, status::ACKNOWLEDGE);
        wr(&mut t, regs::DRIVER_FEATURES, 1);
        wr(&mut t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        // Bit 2 is not offered.
        wr(&mut t, regs::DRIVER_FEATURES_SEL, 0);
        wr(&mut t, regs::DRIVER_FEATURES, 0x4 | 1);
        wr(&mut t, regs::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, regs::DRIVER_FEATURES, 1);
        // Selector 2 writes are ignored.
        wr(&mut t, regs::DRIVER_FEATURES_SEL, 2);
        wr(&mut t, regs::DRIVER_FEATURES, u32::MAX);
        wr(&mut t, regs::STATUS, SETUP);
        assert_eq!(
            rd(&mut t, regs::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
        assert_eq!(dev.lock().unwrap().acked_features, None);

        // Without VERSION_1: refused as well.
        wr(&mut t, regs::DRIVER_FEATURES_SEL, 0);
        wr(&mut t, regs::DRIVER_FEATURES, 1);
        wr(&mut t, regs::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, regs::DRIVER_FEATURES, 0);
        wr(&mut t, regs::STATUS, SETUP);
        assert_eq!(
            rd(&mut t, regs::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );

        // The driver may retry with a valid set.
        wr(&mut t, regs::DRIVER_FEATURES, 1);
        wr(&mut t, regs::STATUS, SETUP);
        assert_eq!(rd(&mut t, regs::STATUS), SETUP);
        assert_eq!(
            dev.lock().unwrap().acked_features,
            Some(FEATURE_VERSION_1 | 1)
        );

        // Features are frozen after FEATURES_OK.
        wr(&mut t, regs::DRIVER_FEATURES_SEL, 0);
        wr(&mut t, regs::DRIVER_FEATURES, 0);
        wr(&mut t, regs::STATUS, RUNNING);
        assert_eq!(
            dev.lock().unwrap().acked_features,
            Some(FEATURE_VERSION_1 | 1)
        );
    }

    #[test]
    fn reset_clears_state_and_allows_reactivation() {
        let (mut t, dev) = transport();
        let dev_side = t.queue_evts()[0].try_clone().unwrap();
        bring_up(&mut t);
        assert!(t.is_activated());
        t.interrupt().trigger(VIRTIO_MMIO_INT_VRING).unwrap();
        wr(&mut t, regs::QUEUE_NOTIFY, 0);

        wr(&mut t, regs::STATUS, 0);
        assert_eq!(rd(&mut t, regs::STATUS), 0);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), 0);
        assert_eq!(count(&dev_side), 0, "stale notifications are dropped");
        {
            let d = dev.lock().unwrap();
            assert_eq!(d.reset_calls, 1);
            assert!(!d.active);
        }
        for i in 0..2 {
            wr(&mut t, regs::QUEUE_SEL, i);
            assert_eq!(rd(&mut t, regs::QUEUE_READY), 0);
        }

        // A fresh handshake activates again with the same eventfds.
        bring_up(&mut t);
        assert_eq!(rd(&mut t, regs::STATUS), RUNNING);
        assert_eq!(dev.lock().unwrap().activate_calls, 2);
        wr(&mut t, regs::QUEUE_NOTIFY, 0);
        assert_eq!(count(&dev_side), 1);

        // Resetting a never-activated transport does not call the device.
        let (mut t2, dev2) = transport();
        wr(&mut t2, regs::STATUS, status::ACKNOWLEDGE);
        wr(&mut t2, regs::STATUS, 0);
        assert_eq!(rd(&mut t2, regs::STATUS), 0);
        assert_eq!(dev2.lock().unwrap().reset_calls, 0);
    }

    #[test]
    fn failed_device_reset_sets_needs_reset() {
        let (mut t, dev) = transport();
        bring_up(&mut t);
        dev.lock().unwrap().reset_ok = false;
        wr(&mut t, regs::STATUS, 0);
        assert_eq!(rd(&mut t, regs::STATUS), status::DEVICE_NEEDS_RESET);
        // Nothing but a reset is accepted now.
        wr(
            &mut t,
            regs::STATUS,
            status::DEVICE_NEEDS_RESET | status::ACKNOWLEDGE,
        );
        assert_eq!(rd(&mut t, regs::STATUS), status::DEVICE_NEEDS_RESET);
        dev.lock().unwrap().reset_ok = true;
        wr(&mut t, regs::STATUS, 0);
        assert_eq!(rd(&mut t, regs::STATUS), 0);
        assert_eq!(dev.lock().unwrap().reset_calls, 2);
        bring_up(&mut t);
        assert_eq!(rd(&mut t, regs::STATUS), RUNNING);
    }

    #[test]
    fn failed_status_is_sticky_until_reset() {
        let (mut t, _dev) = transport();
        wr(&mut t, regs::STATUS, status::ACKNOWLEDGE);
        wr(&mut t, regs::STATUS, status::ACKNOWLEDGE | status::FAILED);
        assert_eq!(
            rd(&mut t, regs::STATUS),
            status::ACKNOWLEDGE | status::FAILED
        );
        wr(
            &mut t,
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FAILED,
        );
        assert_eq!(
            rd(&mut t, regs::STATUS),
            status::ACKNOWLEDGE | status::FAILED
        );
        wr(&mut t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        assert_eq!(
            rd(&mut t, regs::STATUS),
            status::ACKNOWLEDGE | status::FAILED
        );
        wr(&mut t, regs::STATUS, 0);
        assert_eq!(rd(&mut t, regs::STATUS), 0);
    }

    #[test]
    fn wrong_width_register_accesses_are_ignored() {
        let (mut t, _dev) = transport();
        let mut b2 = [0xffu8; 2];
        t.read(regs::MAGIC_VALUE, &mut b2);
        assert_eq!(b2, [0, 0]);
        let mut b8 = [0xffu8; 8];
        t.read(regs::MAGIC_VALUE, &mut b8);
        assert_eq!(b8, [0; 8]);
        let mut b0 = [0u8; 0];
        t.read(regs::STATUS, &mut b0);
        // Unaligned 4-byte read.
        assert_eq!(rd(&mut t, 0x2), 0);
        t.write(regs::STATUS, &[status::ACKNOWLEDGE as u8]);
        t.write(regs::STATUS, &[1, 0]);
        t.write(regs::STATUS, &[]);
        t.write(regs::STATUS + 1, &1u32.to_le_bytes());
        assert_eq!(rd(&mut t, regs::STATUS), 0);
        wr(&mut t, regs::STATUS, status::ACKNOWLEDGE);
        assert_eq!(rd(&mut t, regs::STATUS), status::ACKNOWLEDGE);
    }

    #[test]
    fn out_of_range_queue_sel() {
        let (mut t, dev) = transport();
        negotiate(&mut t, FEATURE_VERSION_1);
        for sel in [2, 1000, u32::MAX] {
            wr(&mut t, regs::QUEUE_SEL, sel);
            assert_eq!(rd(&mut t, regs::QUEUE_NUM_MAX), 0);
            assert_eq!(rd(&mut t, regs::QUEUE_READY), 0);
            wr(&mut t, regs::QUEUE_NUM, 8);
            wr(&mut t, regs::QUEUE_DESC_LOW, 0x1000);
            wr(&mut t, regs::QUEUE_READY, 1);
            assert_eq!(rd(&mut t, regs::QUEUE_READY), 0);
        }
        // Notifications for queues that do not exist are dropped.
        wr(&mut t, regs::QUEUE_NOTIFY, 2);
        wr(&mut t, regs::QUEUE_NOTIFY, u32::MAX);
        assert_eq!(count(&t.queue_evts()[0]), 0);
        assert_eq!(count(&t.queue_evts()[1]), 0);
        // The in-range queues are untouched and activation still works.
        wr(&mut t, regs::STATUS, RUNNING);
        assert_eq!(rd(&mut t, regs::STATUS), RUNNING);
        assert!(dev.lock().unwrap().queues.iter().all(|q| !q.ready()));
    }

    #[test]
    fn queue_notify_writes_the_eventfd() {
        let (mut t, _dev) = transport();
        wr(&mut t, regs::QUEUE_NOTIFY, 0);
        wr(&mut t, regs::QUEUE_NOTIFY, 0);
        wr(&mut t, regs::QUEUE_NOTIFY, 1);
        // Upper half (notification data) does not change the queue index.
        wr(&mut t, regs::QUEUE_NOTIFY, 0x0005_0001);
        assert_eq!(count(&t.queue_evts()[0]), 2);
        assert_eq!(count(&t.queue_evts()[1]), 2);
        assert_eq!(NOTIFY_REG_OFFSET, 0x50);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let (mut t, _dev) = transport();
        let irq = t.interrupt().clone();
        irq.trigger(VIRTIO_MMIO_INT_VRING).unwrap();
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        assert_eq!(count(irq.irqfd()), 1);
        irq.trigger(VIRTIO_MMIO_INT_CONFIG).unwrap();
        assert_eq!(
            rd(&mut t, regs::INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
        );
        assert_eq!(count(irq.irqfd()), 1);
        // The ACK leaves CONFIG set: the (edge-triggered) line is raised again.
        wr(&mut t, regs::INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(count(irq.irqfd()), 1);
        // Nothing left: no new edge.
        wr(&mut t, regs::INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG | 0xf0);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), 0);
        assert_eq!(count(irq.irqfd()), 0);
        // InterruptStatus is read-only.
        wr(&mut t, regs::INTERRUPT_STATUS, 3);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn config_space_and_generation() {
        let (mut t, dev) = transport();
        assert_eq!(
            rd(&mut t, CONFIG_SPACE_OFFSET),
            u32::from_le_bytes([0, 1, 2, 3])
        );
        let mut b = [0u8; 1];
        t.read(CONFIG_SPACE_OFFSET + 5, &mut b);
        assert_eq!(b, [5]);
        let mut b8 = [0u8; 8];
        t.read(CONFIG_SPACE_OFFSET, &mut b8);
        assert_eq!(b8, [0, 1, 2, 3, 4, 5, 6, 7]);
        t.write(CONFIG_SPACE_OFFSET + 2, &[0xaa, 0xbb]);
        assert_eq!(dev.lock().unwrap().config[2..4], [0xaa, 0xbb]);
        let mut b2 = [0u8; 2];
        t.read(CONFIG_SPACE_OFFSET + 2, &mut b2);
        assert_eq!(b2, [0xaa, 0xbb]);
        // Out of the device's config: zeroes, and writes are dropped.
        assert_eq!(rd(&mut t, CONFIG_SPACE_OFFSET + 6), 0);
        assert_eq!(rd(&mut t, MMIO_SIZE - 4), 0);
        t.write(CONFIG_SPACE_OFFSET + 7, &[1, 2, 3, 4]);
        assert_eq!(dev.lock().unwrap().config[7], 7);

        let gen0 = rd(&mut t, regs::CONFIG_GENERATION);
        t.interrupt().trigger(VIRTIO_MMIO_INT_VRING).unwrap();
        assert_eq!(rd(&mut t, regs::CONFIG_GENERATION), gen0);
        t.interrupt().trigger(VIRTIO_MMIO_INT_CONFIG).unwrap();
        assert_eq!(rd(&mut t, regs::CONFIG_GENERATION), gen0.wrapping_add(1));
    }

    #[test]
    fn activation_failure_sets_needs_reset() {
        let mut dev = DummyDevice::new();
        dev.fail_activate = true;
        let (mut t, dev) = transport_with(dev);
        bring_up(&mut t);
        assert_eq!(rd(&mut t, regs::STATUS), SETUP | status::DEVICE_NEEDS_RESET);
        assert!(!t.is_activated());
        assert_eq!(dev.lock().unwrap().activate_calls, 1);
        assert_ne!(
            rd(&mut t, regs::INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG,
            0
        );
        assert_eq!(count(t.interrupt().irqfd()), 1);
        // Only a reset gets out of it; it goes through the device.
        wr(&mut t, regs::STATUS, RUNNING);
        assert_eq!(rd(&mut t, regs::STATUS), SETUP | status::DEVICE_NEEDS_RESET);
        wr(&mut t, regs::STATUS, 0);
        assert_eq!(rd(&mut t, regs::STATUS), 0);
        assert_eq!(dev.lock().unwrap().reset_calls, 1);
        dev.lock().unwrap().fail_activate = false;
        bring_up(&mut t);
        assert_eq!(rd(&mut t, regs::STATUS), RUNNING);
    }

    /// Sets up queue 0 with `f`, the rest valid, and checks that DRIVER_OK
    /// is refused without calling the device.
    fn assert_refused(f: impl FnOnce(&mut MmioTransport)) {
        let (mut t, dev) = transport();
        negotiate(&mut t, FEATURE_VERSION_1);
        setup_queue(&mut t, 1, 8);
        f(&mut t);
        wr(&mut t, regs::STATUS, RUNNING);
        assert_eq!(rd(&mut t, regs::STATUS), SETUP | status::DEVICE_NEEDS_RESET);
        assert_eq!(dev.lock().unwrap().activate_calls, 0);
        assert_ne!(
            rd(&mut t, regs::INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG,
            0
        );
        wr(&mut t, regs::STATUS, 0);
        assert_eq!(rd(&mut t, regs::STATUS), 0);
        assert_eq!(dev.lock().unwrap().reset_calls, 0);
    }

    #[test]
    fn invalid_queues_are_refused() {
        // Size not a power of two.
        assert_refused(|t| setup_queue(t, 0, 3));
        // Size above the maximum, zero, or beyond u16.
        assert_refused(|t| setup_queue(t, 0, 32));
        assert_refused(|t| setup_queue(t, 0, 0));
        assert_refused(|t| setup_queue(t, 0, 0x1_0000));
    }

    #[test]
    fn queue_addresses_outside_memory_or_misaligned_are_refused() {
        let cases: [(u64, u64); 4] = [
            (regs::QUEUE_DESC_HIGH, 1),
            (regs::QUEUE_DRIVER_LOW, MEM_SIZE - 2),
            (regs::QUEUE_DEVICE_HIGH, 0xffff_ffff),
            // Descriptor table must be 16-byte aligned.
            (regs::QUEUE_DESC_LOW, 0x1008),
        ];
        for (reg, value) in cases {
            assert_refused(|t| {
                wr(t, regs::QUEUE_SEL, 0);
                wr(t, regs::QUEUE_NUM, 16);
                wr(t, regs::QUEUE_DESC_LOW, 0x1000);
                wr(t, regs::QUEUE_DRIVER_LOW, 0x2000);
                wr(t, regs::QUEUE_DEVICE_LOW, 0x3000);
                wr(t, reg, value as u32);
                wr(t, regs::QUEUE_READY, 1);
            });
        }
    }

    #[test]
    fn queue_writes_only_during_setup_and_while_not_ready() {
        let (mut t, dev) = transport();
        // Before FEATURES_OK: ignored.
        wr(&mut t, regs::STATUS, status::ACKNOWLEDGE);
        wr(&mut t, regs::QUEUE_READY, 1);
        assert_eq!(rd(&mut t, regs::QUEUE_READY), 0);
        wr(&mut t, regs::STATUS, 0);
        negotiate(&mut t, FEATURE_VERSION_1);
        setup_queue(&mut t, 0, 16);
        // Ready: size and addresses are frozen.
        wr(&mut t, regs::QUEUE_SEL, 0);
        wr(&mut t, regs::QUEUE_NUM, 3);
        wr(&mut t, regs::QUEUE_DESC_LOW, 0xdead_0000);
        // Un-ready, fix, re-ready is allowed before DRIVER_OK.
        wr(&mut t, regs::QUEUE_READY, 0);
        assert_eq!(rd(&mut t, regs::QUEUE_READY), 0);
        wr(&mut t, regs::QUEUE_NUM, 8);
        wr(&mut t, regs::QUEUE_READY, 1);
        wr(&mut t, regs::STATUS, RUNNING);
        assert_eq!(rd(&mut t, regs::STATUS), RUNNING);
        let d = dev.lock().unwrap();
        assert_eq!(d.queues[0].size(), 8);
        assert_eq!(d.queues[0].desc_table(), 0x1000);
        assert!(!d.queues[1].ready());
    }

    #[test]
    fn hostile_register_storm_never_panics() {
        let (mut t, _dev) = transport();
        let mut x: u64 = 0x1234_5678_9abc_def0;
        let mut next = || {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..20_000 {
            if i % 1000 == 0 {
                // Also storm a running device.
                wr(&mut t, regs::STATUS, 0);
                bring_up(&mut t);
                assert!(t.is_activated());
            }
            let r = next();
            let offset = r % (MMIO_SIZE + 0x10);
            let len = [0usize, 1, 2, 4, 8][(r >> 20) as usize % 5];
            let value = next();
            // Bias toward the status register so the state machine moves.
            let offset = if r >> 60 == 0 { regs::STATUS } else { offset };
            if (r >> 40) % 2 == 0 {
                let mut buf = [0u8; 8];
                t.read(offset, &mut buf[..len]);
            } else {
                t.write(offset, &value.to_le_bytes()[..len]);
            }
        }
        // Still a sane device afterwards.
        wr(&mut t, regs::STATUS, 0);
        bring_up(&mut t);
        assert_eq!(rd(&mut t, regs::MAGIC_VALUE), MMIO_MAGIC);
    }

    #[test]
    fn new_rejects_invalid_queue_max_sizes() {
        for bad in [0u16, 3, 1000] {
            let mut dev = DummyDevice::new();
            dev.queue_max_sizes = vec![16, bad];
            let dev: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(dev));
            let err = MmioTransport::new(mem(), dev, MmioInterrupt::new().unwrap()).unwrap_err();
            assert!(matches!(
                err,
                MmioError::InvalidQueueMaxSize { index: 1, .. }
            ));
        }
    }

    #[test]
    fn cmdline_fragment() {
        assert_eq!(
            cmdline_device(0xd000_0000, 0x1000, 5),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(
            cmdline_device(0xd000_1000, 2 << 20, 12),
            "virtio_mmio.device=2M@0xd0001000:12"
        );
        assert_eq!(
            cmdline_device(0x1000, 0x200, 7),
            "virtio_mmio.device=512@0x1000:7"
        );
        assert_eq!(
            cmdline_device(0x1000, 1 << 30, 7),
            "virtio_mmio.device=1G@0x1000:7"
        );
    }
}
