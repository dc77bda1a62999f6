//! Emulated devices: legacy PC devices on port I/O, virtio devices on MMIO.

pub mod legacy;
pub mod virtio;
