//! Port-I/O and MMIO buses: route a guest access at an address to the device
//! that owns the range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reached through a bus. `offset` is relative to the start of the
/// range the device was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("bus range of zero length at {0:#x}")]
    ZeroLength(u64),
}

#[derive(Clone)]
struct BusEntry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A sorted map of non-overlapping ranges. Cloning shares the devices, so
/// every vCPU thread can hold its own copy.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, BusEntry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        if let Some((&b, e)) = self.ranges.range(..end).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, BusEntry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &BusEntry)> {
        let (&base, entry) = self.ranges.range(..=addr).next_back()?;
        (addr - base < entry.len).then_some((addr - base, entry))
    }

    /// Returns false when no device owns `addr` (reads then return zeroes).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, entry)) => {
                // A poisoned lock means a device thread panicked: keep the
                // VM going on the device's last state rather than panic too.
                let mut dev = entry.device.lock().unwrap_or_else(|p| p.into_inner());
                dev.read(offset, data);
                true
            }
            None => {
                data.fill(0);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, entry)) => {
                let mut dev = entry.device.lock().unwrap_or_else(|p| p.into_inner());
                dev.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlap() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Reg(10))), 0x100, 0x10)
            .unwrap();
        bus.insert(Arc::new(Mutex::new(Reg(20))), 0x110, 0x10)
            .unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Reg(0))), 0x10f, 2).is_err());
        assert!(bus
            .insert(Arc::new(Mutex::new(Reg(0))), 0xf0, 0x11)
            .is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x103, &mut b));
        assert_eq!(b[0], 13);
        assert!(bus.write(0x110, &[50]));
        assert!(bus.read(0x111, &mut b));
        assert_eq!(b[0], 51);
        assert!(!bus.read(0x120, &mut b));
        assert_eq!(b[0], 0);
    }
}
