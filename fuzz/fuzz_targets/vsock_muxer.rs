//! The vsock muxer: sequences of guest packets (any op, ports, credit
//! fields, payload; the source CID mostly right), host clients on the
//! device's Unix socket (CONNECT lines, garbage, data, hang-ups), a host
//! service the guest can connect to (port 52), RX buffer fills of any size
//! and timeouts on a virtual clock. Everything stays in a private temp
//! directory; nothing reaches a real network.
//!
//! Input: operations `op: u8` followed by their arguments (see the match).
#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ember_fuzz::Input;
use ember_vmm::fuzzing::vsock::packet::{Header, MAX_PKT_DATA, OP_RST};
use ember_vmm::fuzzing::vsock::{MuxerHarness, VsockTimeouts};
use libfuzzer_sys::fuzz_target;

const GUEST_CID: u64 = 3;
const SERVICE_PORT: u32 = 52;
const MAX_OPS: usize = 256;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Kept for the whole run; removed with the process' temp files.
        tempfile::Builder::new()
            .prefix("ember-fuzz-vsock")
            .tempdir()
            .expect("temp dir")
            .keep()
    })
}

fn port(input: &mut Input<'_>) -> u32 {
    match input.u8() {
        0..=127 => SERVICE_PORT,
        128..=191 => 1024,
        b @ 192..=250 => u32::from(b),
        _ => input.u32(),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let uds = dir().join("v.sock");
    let service_path = dir().join(format!("v.sock_{SERVICE_PORT}"));
    let _ = std::fs::remove_file(&service_path);
    let service = UnixListener::bind(&service_path).expect("service socket");
    service.set_nonblocking(true).expect("nonblocking");
    let timeouts = VsockTimeouts {
        connect_line: Duration::from_millis(50),
        guest_response: Duration::from_millis(100),
        shutdown: Duration::from_millis(100),
    };
    let mut mux = MuxerHarness::new(GUEST_CID, uds.clone(), timeouts).expect("muxer");
    let mut now = Instant::now();
    // Host-side ends: clients of the device socket and accepted service
    // connections.
    let mut streams: Vec<UnixStream> = Vec::new();
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 8 {
            0 | 1 => {
                let flags = input.u8();
                let len = usize::from(input.u16() % 2048);
                let mut hdr = Header {
                    src_cid: if flags & 1 == 0 {
                        GUEST_CID
                    } else {
                        input.u64()
                    },
                    dst_cid: if flags & 2 == 0 { 2 } else { input.u64() },
                    src_port: port(&mut input),
                    dst_port: port(&mut input),
                    len: 0,
                    type_: if flags & 4 == 0 { 1 } else { input.u16() },
                    op: u16::from(input.u8() % 9),
                    flags: u32::from(input.u8() % 4),
                    buf_alloc: input.u32(),
                    fwd_cnt: input.u32(),
                };
                let payload = input.bytes(len);
                hdr.len = payload.len() as u32;
                mux.guest_packet(&hdr, payload, now);
            }
            2 => mux.poll_host(now),
            3 => {
                let cap = usize::from(input.u16()).clamp(1, MAX_PKT_DATA as usize);
                let write_fails = input.u8() == 0xee;
                if let Some((hdr, data)) = mux.fill_rx(cap, now) {
                    assert_eq!(
                        hdr.len as usize,
                        data.len(),
                        "RX header and payload disagree"
                    );
                    assert!(
                        data.len() <= cap,
                        "RX packet larger than the guest's buffer"
                    );
                    assert_eq!(hdr.dst_cid, GUEST_CID, "RX packet for another CID");
                    // An RST answers from wherever the guest sent to; any
                    // other packet comes from the host.
                    if hdr.op != OP_RST {
                        assert_eq!(hdr.src_cid, 2, "RX packet not from the host");
                    }
                    if write_fails {
                        mux.rx_write_failed(&hdr);
                    }
                }
            }
            4 => {
                now += Duration::from_millis(u64::from(input.u8()) * 4);
                mux.timeouts(now);
            }
            5 => {
                // A host client: connect, and send a line or bytes.
                if streams.len() < 16 {
                    if let Ok(s) = UnixStream::connect(&uds) {
                        let _ = s.set_nonblocking(true);
                        streams.push(s);
                    }
                }
                if let Ok(s) = service.accept() {
                    let _ = s.0.set_nonblocking(true);
                    streams.push(s.0);
                }
            }
            6 => {
                let i = usize::from(input.u8());
                let kind = input.u8();
                let len = usize::from(input.u8());
                let bytes: Vec<u8> = match kind % 3 {
                    0 => format!("CONNECT {}\n", port(&mut input)).into_bytes(),
                    _ => input.bytes(len).to_vec(),
                };
                if !streams.is_empty() {
                    let n = streams.len();
                    let _ = streams[i % n].write(&bytes);
                }
            }
            _ => {
                let i = usize::from(input.u8());
                if input.u8() == 0xff {
                    mux.reset_connections();
                } else if !streams.is_empty() {
                    let n = streams.len();
                    streams.swap_remove(i % n);
                }
            }
        }
    }
    // Drain what is left for the guest.
    for _ in 0..4096 {
        if mux.fill_rx(MAX_PKT_DATA as usize, now).is_none() {
            break;
        }
    }
});
