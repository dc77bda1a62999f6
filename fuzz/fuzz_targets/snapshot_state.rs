//! Snapshot state files: decoding (`SnapshotState::read`: magic, version,
//! length, checksum, bincode payload) and then what a restore does with
//! the decoded state short of KVM: recreating every virtio-mmio transport
//! (re-activating devices whose driver had) and the serial UART.
//!
//! Input: `mode: u8`; bit 1 set: the rest describes a state (transports
//! with any registers and queues, serial registers) that is written with
//! `SnapshotState::write` first, so restores see every field combination;
//! else bit 0 set: the rest is the whole file as is (header and checksum
//! paths); clear: the rest is the bincode payload, wrapped in a valid
//! header and checksum so the decoder gets to it.
//!
//! With `EMBER_FUZZ_DUMP_STATE=<dir>`, the payloads of synthesized states
//! are saved there as wrapped-mode inputs (how the corpus seeds of that
//! mode were made).
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use ember_fuzz::Input;
use ember_vmm::fuzzing::mmio::{MmioInterrupt, MmioQueueState, MmioState, MmioTransport};
use ember_vmm::fuzzing::snapshot::{SerialSnapshot, SnapshotState, VmState, FORMAT_VERSION};
use ember_vmm::fuzzing::{DummyDevice, GuestMemoryMmap, VirtioDevice};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use vm_memory::GuestAddress;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

struct NoIrq;

impl Trigger for NoIrq {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fn state_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("ember-fuzz-snapshot")
            .tempdir()
            .expect("temp dir")
            .keep();
        dir.join("state")
    })
}

/// A stable name for a dumped seed.
fn short_digest(bytes: &[u8]) -> u64 {
    let digest = Sha256::digest(bytes);
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

fn wrap(payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(payload.len() + 52);
    bytes.extend_from_slice(b"EMBERSNP");
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(payload);
    let digest = Sha256::digest(&bytes);
    bytes.extend_from_slice(&digest);
    bytes
}

/// A state from the input (see the module docs).
fn synthesize(input: &mut Input<'_>) -> SnapshotState {
    let id_len = usize::from(input.u8() % 64);
    let identity = String::from_utf8_lossy(input.bytes(id_len)).into_owned();
    let mem_size = input.u64();
    let ndev = input.u8() % 4;
    let devices = (0..ndev)
        .map(|_| {
            let device_type = [1, 19, 26, 0x42][usize::from(input.u8() % 4)];
            let mut st = MmioState {
                device_type,
                status: input.u32(),
                acked_features: input.u64(),
                device_features_sel: input.u32(),
                driver_features_sel: input.u32(),
                queue_sel: input.u32(),
                interrupt_status: input.u32(),
                config_generation: input.u32(),
                queues: Vec::new(),
            };
            let nq = input.u8() % 4;
            st.queues = (0..nq)
                .map(|_| MmioQueueState {
                    max_size: input.u16(),
                    size: input.u32(),
                    ready: input.u8() & 1 == 1,
                    desc: input.u64(),
                    driver: input.u64(),
                    device: input.u64(),
                    next_avail: input.u16(),
                    next_used: input.u16(),
                })
                .collect();
            st
        })
        .collect();
    let regs = input.bytes(9).to_vec();
    let reg = |i: usize| regs.get(i).copied().unwrap_or(0);
    let in_len = usize::from(input.u8());
    let serial = SerialSnapshot {
        baud_divisor_low: reg(0),
        baud_divisor_high: reg(1),
        interrupt_enable: reg(2),
        interrupt_identification: reg(3),
        line_control: reg(4),
        line_status: reg(5),
        modem_control: reg(6),
        modem_status: reg(7),
        scratch: reg(8),
        in_buffer: input.bytes(in_len).to_vec(),
    };
    SnapshotState {
        identity,
        mem_size,
        cmdline: "console=ttyS0".into(),
        vcpus: Vec::new(),
        vm: VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        serial,
        devices,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mode = input.u8();
    let path = state_path();
    if mode & 2 == 2 {
        let state = synthesize(&mut input);
        state.write(path).expect("write a synthesized state");
        if let Some(dir) = std::env::var_os("EMBER_FUZZ_DUMP_STATE") {
            let file = std::fs::read(path).expect("read back");
            let mut seed = vec![0u8];
            seed.extend_from_slice(&file[20..file.len() - 32]);
            let name = format!("synth-{:016x}", short_digest(&seed));
            std::fs::write(PathBuf::from(dir).join(name), seed).expect("dump");
        }
    } else {
        let rest = input.rest();
        let file = if mode & 1 == 1 {
            rest.to_vec()
        } else {
            wrap(rest)
        };
        std::fs::write(path, &file).expect("write the state file");
    }
    let Ok(state) = SnapshotState::read(path) else {
        return;
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("memory");
    for dev_state in state.devices.iter().take(8) {
        let mut dummy = DummyDevice::new();
        dummy.device_type = dev_state.device_type;
        dummy.queue_max_sizes = dev_state
            .queues
            .iter()
            .take(8)
            .map(|q| q.max_size)
            .collect();
        let dev: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(dummy));
        let irq = MmioInterrupt::new().expect("eventfd");
        let _ = MmioTransport::restore(mem.clone(), dev, irq, dev_state);
    }
    let serial_state = SerialState::from(&state.serial);
    if let Ok(mut serial) = Serial::from_state(&serial_state, NoIrq, NoEvents, std::io::sink()) {
        for offset in 0..8u8 {
            let _ = serial.read(offset);
        }
        let _ = serial.write(0, b'x');
    }
});
