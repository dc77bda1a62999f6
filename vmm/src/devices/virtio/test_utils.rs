//! Test doubles for the transport/device seam: a [`DummyDevice`] that records
//! what the transport asked of it, and a [`CountingInterrupt`] that records
//! what a device signalled.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, GuestMemoryMmap, VirtioDevice, VirtioInterrupt};

/// VIRTIO_F_VERSION_1.
pub const FEATURE_VERSION_1: u64 = 1 << 32;

/// A [`VirtioInterrupt`] that counts triggers and accumulates status bits.
#[derive(Default)]
pub struct CountingInterrupt {
    count: AtomicUsize,
    status: AtomicU32,
}

impl CountingInterrupt {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Number of `trigger` calls so far.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// OR of every status passed to `trigger`.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, status: u32) -> std::io::Result<()> {
        self.status.fetch_or(status, Ordering::SeqCst);
        self.count.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A [`VirtioDevice`] with no worker: it stores what `activate` handed it and
/// counts calls, so a test holding an `Arc<Mutex<DummyDevice>>` can inspect
/// it after coercing a clone to `Arc<Mutex<dyn VirtioDevice>>`.
pub struct DummyDevice {
    pub device_type: u32,
    pub avail_features: u64,
    pub acked_features: Option<u64>,
    pub queue_max_sizes: Vec<u16>,
    pub config: Vec<u8>,
    /// When set, `activate` fails with `ActivateError::Backend`.
    pub fail_activate: bool,
    /// What `reset` returns.
    pub reset_ok: bool,
    pub activate_calls: usize,
    pub reset_calls: usize,
    pub shutdown_calls: usize,
    pub active: bool,
    pub queues: Vec<Queue>,
    pub queue_evts: Vec<EventFd>,
    pub interrupt: Option<Arc<dyn VirtioInterrupt>>,
}

impl DummyDevice {
    /// A device of type 0x42 with two queues (max sizes 16 and 8), an 8-byte
    /// config space `0..8`, offering VERSION_1 and feature bit 0.
    pub fn new() -> Self {
        Self {
            device_type: 0x42,
            avail_features: FEATURE_VERSION_1 | 1,
            acked_features: None,
            queue_max_sizes: vec![16, 8],
            config: (0u8..8).collect(),
            fail_activate: false,
            reset_ok: true,
            activate_calls: 0,
            reset_calls: 0,
            shutdown_calls: 0,
            active: false,
            queues: Vec::new(),
            queue_evts: Vec::new(),
            interrupt: None,
        }
    }
}

impl Default for DummyDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioDevice for DummyDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = Some(features);
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::device_worker::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        let Some(end) = start.checked_add(data.len()) else {
            return;
        };
        if let Some(dst) = self.config.get_mut(start..end) {
            dst.copy_from_slice(data);
        }
    }

    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        self.activate_calls += 1;
        if self.active {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != self.queue_max_sizes.len() || queue_evts.len() != queues.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_max_sizes.len(),
                got: queues.len(),
            });
        }
        if self.fail_activate {
            return Err(ActivateError::Backend("dummy activation failure".into()));
        }
        self.queues = queues;
        self.queue_evts = queue_evts;
        self.interrupt = Some(interrupt);
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.reset_calls += 1;
        if self.reset_ok {
            self.active = false;
            self.queues.clear();
            self.queue_evts.clear();
            self.interrupt = None;
        }
        self.reset_ok
    }

    fn shutdown(&mut self) {
        self.shutdown_calls += 1;
        self.active = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counting_interrupt_counts_and_accumulates() {
        let irq = CountingInterrupt::new();
        irq.trigger(1).unwrap();
        irq.trigger(2).unwrap();
        assert_eq!(irq.count(), 2);
        assert_eq!(irq.status(), 3);
    }

    #[test]
    fn dummy_config_is_bounds_checked() {
        let mut dev = DummyDevice::new();
        let mut b = [0xffu8; 4];
        dev.read_config(6, &mut b);
        assert_eq!(b, [0; 4]);
        dev.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
        dev.write_config(u64::MAX, &[1]);
        dev.write_config(1, &[9]);
        dev.read_config(0, &mut b);
        assert_eq!(b, [0, 9, 2, 3]);
    }
}
