//! The virtio-mmio register file: any sequence of guest reads and writes,
//! of any width at any offset of the 4 KiB window (registers and config
//! space), against a transport whose device records what it was asked
//! (`test_utils::DummyDevice`), plus snapshot save/restore round trips.
//!
//! Input: `dev: u8` (bit 0: activation fails, bit 1: reset fails), then
//! operations `op: u8, offset: u16, value: u64`: `op & 7` is 0-3 a read of
//! 1/2/4/8 bytes, 4-6 a write of 1/2/4 bytes, 7 a 4-byte register write of
//! a value steered to the driver's usual path (status bits, QueueReady),
//! and `op == 0xff` a save/restore of the transport.
#![no_main]

use std::sync::{Arc, Mutex};

use ember_fuzz::Input;
use ember_vmm::fuzzing::mmio::{regs, MmioInterrupt, MmioTransport, MMIO_SIZE};
use ember_vmm::fuzzing::{BusDevice, DummyDevice, GuestMemoryMmap, VirtioDevice};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;

const MAX_OPS: usize = 512;
/// Registers a driver writes during setup, for op 7.
const SETUP_REGS: [u64; 12] = [
    regs::STATUS,
    regs::DRIVER_FEATURES,
    regs::DRIVER_FEATURES_SEL,
    regs::QUEUE_SEL,
    regs::QUEUE_NUM,
    regs::QUEUE_READY,
    regs::QUEUE_DESC_LOW,
    regs::QUEUE_DRIVER_LOW,
    regs::QUEUE_DEVICE_LOW,
    regs::QUEUE_NOTIFY,
    regs::INTERRUPT_ACK,
    regs::DEVICE_FEATURES_SEL,
];

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("memory");
    let knobs = input.u8();
    let mut dummy = DummyDevice::new();
    dummy.fail_activate = knobs & 1 != 0;
    dummy.reset_ok = knobs & 2 == 0;
    let dev = Arc::new(Mutex::new(dummy));
    let dyn_dev: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
    let mut t = MmioTransport::new(mem.clone(), dyn_dev, MmioInterrupt::new().expect("eventfd"))
        .expect("transport");
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        let offset = u64::from(input.u16()) % MMIO_SIZE;
        let value = input.u64();
        if op == 0xff {
            let state = t.save_state();
            let dyn_dev: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
            match MmioTransport::restore(
                mem.clone(),
                dyn_dev,
                MmioInterrupt::new().expect("eventfd"),
                &state,
            ) {
                Ok(restored) => t = restored,
                Err(_) => {
                    // Only a device that refuses activation or reset may fail a
                    // restore of a state its transport just saved.
                    assert!(knobs & 3 != 0, "restore of a saved state failed");
                }
            }
            continue;
        }
        match op & 7 {
            w @ 0..=3 => {
                let mut buf = vec![0xa5u8; 1 << w];
                t.read(offset, &mut buf);
                if offset == regs::STATUS && w == 2 {
                    assert_eq!(u32::from_le_bytes(buf[..4].try_into().unwrap()), t.status());
                }
            }
            w @ 4..=6 => {
                let bytes = value.to_le_bytes();
                t.write(offset, &bytes[..1 << (w - 4)]);
            }
            _ => {
                let reg = SETUP_REGS[usize::from(op >> 3) % SETUP_REGS.len()];
                t.write(reg, &(value as u32).to_le_bytes());
            }
        }
        // The transport reports DRIVER_OK only for an activated device.
        if t.is_activated() {
            assert!(
                dev.lock().unwrap().active,
                "DRIVER_OK without an active device"
            );
        }
    }
});
