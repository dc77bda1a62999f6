//! Virtio devices and their MMIO transport.
//!
//! The seam between a device and its transport is [`VirtioDevice`]: the
//! transport owns the registers and the queues' configuration; when the
//! driver sets DRIVER_OK it hands the queues to the device with
//! [`VirtioDevice::activate`]. An activated device runs its own worker
//! thread (epoll over its queue eventfds and backend fds), so a slow or
//! hostile guest on one device cannot stall another one or a vCPU.

mod device_worker;
pub mod fs;
mod log_limit;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub(crate) mod test_driver;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod test_utils;
mod used_ring;
pub mod vsock;

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// The guest memory type used by every device.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Bits of the virtio-mmio InterruptStatus register.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x01;
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x02;

/// Virtio device ids (virtio spec 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_VSOCK: u32 = 19;
pub const TYPE_FS: u32 = 26;

/// How a device signals the guest. The transport implements it with an
/// irqfd; unit tests implement it with a counter.
pub trait VirtioInterrupt: Send + Sync {
    /// Sets `status` bits in InterruptStatus and raises the device's IRQ.
    fn trigger(&self, status: u32) -> std::io::Result<()>;
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("wrong number of queues: expected {expected}, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("device is already active")]
    AlreadyActive,
    #[error("cannot start the device worker: {0}")]
    Worker(#[source] std::io::Error),
    #[error("device backend: {0}")]
    Backend(String),
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (`TYPE_*`).
    fn device_type(&self) -> u32;
    /// Feature bits offered to the driver (including VIRTIO_F_VERSION_1).
    fn avail_features(&self) -> u64;
    /// Feature bits the driver accepted; only called before activation.
    fn set_acked_features(&mut self, features: u64);
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration space. Out-of-range reads
    /// must leave `data` zeroed, never panic.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space; out-of-range writes
    /// are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device: `queues[i]` is signalled by `queue_evts[i]`.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError>;
    /// Stops the worker and returns to the pre-activation state. Returns
    /// false if the device cannot be reset (the transport then marks
    /// itself as needing reset).
    fn reset(&mut self) -> bool;
    /// Stops the device worker for good (VM teardown). Must join every
    /// thread the device started. Idempotent.
    fn shutdown(&mut self);
}
