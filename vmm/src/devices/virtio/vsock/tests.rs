//! Device tests.
//!
//! [`Guest`] below FAKES THE GUEST'S virtio-vsock DRIVER: it lays out the
//! three split virtqueues in guest memory with
//! `virtio_queue::mock::MockSplitQueue`, offers RX buffers, writes TX
//! packets and reads the used rings, as the Linux driver would, while the
//! device runs for real on its worker thread. Remember the directions: the
//! device PUTS packets for the guest into the RX queue and READS the
//! guest's packets from the TX queue. The host side is plain Unix sockets.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::super::test_driver::{DriverQueue, Next, UsedChain, F_WRITE, QSIZE};
use super::super::test_utils::CountingInterrupt;
use super::super::{GuestMemoryMmap, VirtioDevice, TYPE_VSOCK};
use super::csm::BUF_ALLOC;
use super::muxer::HOST_PORT_FIRST;
use super::packet::*;
use super::{connect_hybrid_timeout, ConnectError, Vsock, VsockError, VsockTimeouts};

const CID: u64 = 42;
const MEM_SIZE: usize = 16 << 20;
const RX_DATA: u32 = 4096;
const WAIT: Duration = Duration::from_secs(3);

type Vq = DriverQueue;

/// The fake guest driver.
struct Guest {
    mem: &'static GuestMemoryMmap,
    rx: Vq,
    tx: Vq,
    ev: Vq,
    kicks: Vec<EventFd>,
    irq: Arc<CountingInterrupt>,
    inbox: VecDeque<(Header, Vec<u8>)>,
    /// Re-offer an RX buffer for each one consumed.
    refill: bool,
}

impl Guest {
    /// Lays out the queues and activates `dev` with them.
    fn start(dev: &mut Vsock) -> Guest {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        // Leaked so the mock queues can borrow it for 'static (tests only).
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(mem));
        let rx = Vq::new(mem, 0x0, 0x10_0000, 0x1100);
        let tx = Vq::new(mem, 0x4000, 0x20_0000, 0x1_0100);
        let ev = Vq::new(mem, 0x8000, 0xF0_0000, 0x100);
        let queues: Vec<Queue> = [&rx, &tx, &ev].iter().map(|v| v.queue()).collect();
        let kicks: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let dev_evts = kicks.iter().map(|e| e.try_clone().unwrap()).collect();
        let irq = CountingInterrupt::new();
        dev.activate(mem.clone(), irq.clone(), queues, dev_evts)
            .unwrap();
        Guest {
            mem,
            rx,
            tx,
            ev,
            kicks,
            irq,
            inbox: VecDeque::new(),
            refill: true,
        }
    }

    fn add_rx(&mut self, n: usize) {
        for _ in 0..n {
            self.rx
                .publish(&[(None, HDR_SIZE as u32, F_WRITE), (None, RX_DATA, F_WRITE)])
                .expect("free RX descriptors");
        }
        self.kicks[0].write(1).unwrap();
    }

    fn hdr(&self, op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: 2,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0,
        }
    }

    fn reclaim_tx(&mut self) {
        self.tx.take_used();
    }

    /// Sends a packet on the TX queue (`hdr.len` is set from `data`).
    fn send(&mut self, mut hdr: Header, data: &[u8]) {
        hdr.len = data.len() as u32;
        self.send_raw_hdr(hdr, data);
    }

    /// Sends without touching `hdr.len`.
    fn send_raw_hdr(&mut self, hdr: Header, data: &[u8]) {
        let parts: Vec<(Option<u64>, u32, u16)> = if data.is_empty() {
            vec![(None, HDR_SIZE as u32, 0)]
        } else {
            vec![(None, HDR_SIZE as u32, 0), (None, data.len() as u32, 0)]
        };
        let idx = self.reserve_tx(&parts);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(self.tx.buf(idx[0])))
            .unwrap();
        if !data.is_empty() {
            self.mem
                .write_slice(data, GuestAddress(self.tx.buf(idx[1])))
                .unwrap();
        }
        self.tx.push_avail(idx[0]);
        self.kicks[1].write(1).unwrap();
    }

    /// Reserves TX descriptors, waiting for the device to return some.
    fn reserve_tx(&mut self, parts: &[(Option<u64>, u32, u16)]) -> Vec<u16> {
        let deadline = Instant::now() + WAIT;
        loop {
            self.reclaim_tx();
            if let Some(idx) = self.tx.reserve_linked(parts) {
                return idx;
            }
            assert!(
                Instant::now() < deadline,
                "device does not return TX chains"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Publishes a raw TX chain (for malformed-chain tests) and kicks;
    /// `hdr` goes into the first descriptor's buffer (no stale header from
    /// an earlier packet must be replayed).
    fn send_chain(&mut self, hdr: Header, parts: &[(Option<u64>, u32, u16)]) -> Vec<u16> {
        let idx = self.reserve_tx(parts);
        // At most 44 bytes into the slot of the first descriptor (slots are
        // larger than that whatever the descriptor's len says).
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(self.tx.buf(idx[0])))
            .unwrap();
        self.tx.push_avail(idx[0]);
        self.kicks[1].write(1).unwrap();
        idx
    }

    fn poll_rx(&mut self) {
        let used = self.rx.take_used();
        let mut consumed = 0;
        for UsedChain {
            descs: chain, len, ..
        } in used
        {
            consumed += 1;
            if len == 0 || chain.len() != 2 {
                continue;
            }
            let mut hb = [0u8; HDR_SIZE];
            self.mem
                .read_slice(&mut hb, GuestAddress(self.rx.buf(chain[0])))
                .unwrap();
            let hdr = Header::from_bytes(&hb);
            let n = (len as usize).saturating_sub(HDR_SIZE);
            assert_eq!(n, hdr.len as usize, "used len matches header len");
            let mut data = vec![0u8; n];
            self.mem
                .read_slice(&mut data, GuestAddress(self.rx.buf(chain[1])))
                .unwrap();
            self.inbox.push_back((hdr, data));
        }
        if self.refill && consumed > 0 {
            self.add_rx(consumed);
        }
    }

    fn try_recv(&mut self) -> Option<(Header, Vec<u8>)> {
        if self.inbox.is_empty() {
            self.poll_rx();
        }
        self.inbox.pop_front()
    }

    fn recv_within(&mut self, d: Duration) -> Option<(Header, Vec<u8>)> {
        let deadline = Instant::now() + d;
        loop {
            if let Some(p) = self.try_recv() {
                return Some(p);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn recv(&mut self) -> (Header, Vec<u8>) {
        self.recv_within(WAIT).expect("packet from the device")
    }

    fn expect_op(&mut self, op: u16) -> (Header, Vec<u8>) {
        let (h, d) = self.recv();
        assert_eq!(h.op, op, "unexpected packet {h:?}");
        assert_eq!(h.src_cid, 2);
        assert_eq!(h.dst_cid, CID);
        assert_eq!(h.type_, TYPE_STREAM);
        (h, d)
    }

    /// Nothing arrives for `d`.
    fn expect_silence(&mut self, d: Duration) {
        if let Some(p) = self.recv_within(d) {
            panic!("unexpected packet {p:?}");
        }
    }
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn fast_timeouts() -> VsockTimeouts {
    VsockTimeouts {
        connect_line: Duration::from_millis(150),
        guest_response: Duration::from_millis(150),
        shutdown: Duration::from_millis(150),
    }
}

fn device(dir: &Path) -> (Vsock, PathBuf) {
    let path = dir.join("v.sock");
    let dev = Vsock::with_timeouts(CID, path.clone(), fast_timeouts()).unwrap();
    (dev, path)
}

fn host_stream(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        let n = s.read(&mut b).unwrap();
        if n == 0 || b[0] == b'\n' {
            return String::from_utf8(line).unwrap();
        }
        line.push(b[0]);
    }
}

/// The next read gives EOF (or a reset); panics on data or timeout.
fn expect_eof(s: &mut UnixStream) {
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("expected EOF, got {n} bytes"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected EOF, got {e}"),
    }
}

/// Host connects with `CONNECT port`, guest answers: returns the host
/// stream (after `OK`) and the device's local port.
fn establish_host_initiated(g: &mut Guest, path: &Path, port: u32) -> (UnixStream, u32) {
    let mut s = host_stream(path);
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let (req, _) = g.expect_op(OP_REQUEST);
    assert_eq!(req.dst_port, port);
    assert!(req.src_port >= HOST_PORT_FIRST);
    g.send(g.hdr(OP_RESPONSE, port, req.src_port), &[]);
    assert_eq!(read_line(&mut s), format!("OK {}", req.src_port));
    (s, req.src_port)
}

#[test]
fn config_space_and_features() {
    let dir = tmp();
    let (mut dev, _) = device(dir.path());
    assert_eq!(dev.device_type(), TYPE_VSOCK);
    assert_eq!(dev.avail_features(), 1 << 32);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    let mut b = [0u8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), CID);
    let mut b = [0xffu8; 4];
    dev.read_config(4, &mut b);
    assert_eq!(b, [0, 0, 0, 0]);
    let mut b = [0xffu8; 4];
    dev.read_config(6, &mut b);
    assert_eq!(b, [0; 4], "partly out of range reads are zeroed");
    dev.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0; 4]);
    dev.write_config(0, &[1, 2, 3]);
    dev.read_config(0, &mut b);
    assert_eq!(b, [42, 0, 0, 0]);
    assert!(matches!(
        Vsock::new(2, dir.path().join("x")),
        Err(VsockError::InvalidCid(2))
    ));
}

#[test]
fn host_connect_request_response_and_data() {
    let dir = tmp();
    let (mut dev, path) = device(dir.path());
    let mut g = Guest::start(&mut dev);
    g.add_rx(8);
    let (mut s, local) = establish_host_initiated(&mut g, &path, 1234);

    // Host -> guest.
    s.write_all(b"hello guest").unwrap();
    let (h, d) = g.expect_op(OP_RW);
    assert_eq!((h.src_port, h.dst_port), (local, 1234));
    assert_eq!(d, b"hello guest");
    // Guest -> host.
    g.send(g.hdr(OP_RW, 1234, local), b"hello host");
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");
    assert!(g.irq.count() > 0, "guest was interrupted");

    // A second host connection gets another local port.
    let (_s2, local2) = establish_host_initiated(&mut g, &path, 1234);
    assert_ne!(local, local2);
}

#[test]
fn host_connect_waits_for_rx_buffers() {
    let dir = tmp();
    let (mut dev, path) = device(dir.path());
    let mut g = Guest::start(&mut dev);
    let mut s = host_stream(&path);
    s.write_all(b"CONNECT 7\n").unwrap();
    g.expect_silence(Duration::from_millis(50));
    g.add_rx(1);
    let (req, _) = g.expect_op(OP_REQUEST);
    assert_eq!(req.dst_port, 7);
}

#[test]
fn guest_rst_to_request_closes_host_stream() {
    let dir = tmp();
    let (mut dev, path) = device(dir.path());
    let mut g = Guest::start(&mut dev);
    g.add_rx(4);
    let mut s = host_stream(&path);
    s.write_all(b"CONNECT 99\n").unwrap();
    let (req, _) = g.expect_op(OP_REQUEST);
    g.send(g.hdr(OP_RST, 99, req.src_port), &[]);
    expect_eof(&mut s);
}

#[test]
fn guest_not_answering_request_times_out() {
    let dir = tmp();
    let (mut dev, path) = device(dir.path());
    let mut g = Guest::start(&mut dev);
    g.add_rx(4);
    let mut s = host_stream(&path);
    s.write_all(b"CONNECT 99\n").unwrap();
    let (req, _) = g.expect_op(OP_REQUEST);
    let (rst, _) = g.expect_op(OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (req.src_port, 99));
    expect_eof(&mut s);
}

#[test]
fn malformed_or_slow_connect_line_closes_stream() {
    let dir = tmp();
    let (mut dev, path) = device(dir.path());
    let mut g = Guest::start(&mut dev);
    g.add_rx(4);
    for bad in [
        &b"HELLO\n"[..],
        b"CONNECT x\n",
        b"CONNECT 99999999999\n",
        &[b'A'; 100],
    ] {
        let mut s = host_stream(&path);
        s.write_all(bad).unwrap();
        expect_eof(&mut s);
    }
    // Never finished: closed after the connect-line timeout.
    let started = Instant::now();
    let mut s = host_stream(&path);
    s.write_all(b"CONN").unwrap();
    expect_eof(&mut s);
    assert!(started.elapsed() >= Duration::from_millis(100));
    g.expect_silence(Duration::from_millis(20));
    // The device still works.
    establish_host_initiated(&mut g, &path, 5);
}

#[test]
fn guest_connect_with_and_without_host_listener() {
    let dir = tmp();
    let (mut dev, path) = device(dir.path());
    let mut g = Guest::start(&mut dev);
    g.add_rx(8);

    // Nobody listens on <uds>_5000.
    g.send(g.hdr(OP_REQUEST, 3000, 5000), &[]);
    let (rst, _) = g.expect_op(OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (5000, 3000));

    // A listener on <uds>_5001.
    let lpath = PathBuf::from(format!("{}_5001", path.display()));
    let listener = UnixListener::bind(&lpath).unwrap();
    g.send(g.hdr(OP_REQUEST, 3001, 5001), &[]);
    let (resp, _) = g.expect_op(OP_RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (5001, 3001));
    assert_eq!(resp.buf_alloc, BUF_ALLOC);
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    g.send(g.hdr(OP_RW, 3001, 5001), b"from guest");
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"from guest");
    s.write_all(b"from host").unwrap();
    let (h, d) = g.expect_op(OP_RW);
    assert_eq!((h.src_port, h.dst_port), (5001, 3001));
    assert_eq!(d, b"from host");

    // The guest closes: SHUTDOWN both -> RST from the device, EOF on the host.
    let mut sh = g.hdr(OP_SHUTDOWN, 3001, 5001);
    sh.flags = SHUTDOWN_BOTH;
    g.send(sh, &[]);
    let (rst, _) = g.expect_op(OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (5001, 3001));
    expect_eof(&mut s);
}

/// Moves 1 MiB each way with a guest that advertises only 64 KiB, so both
/// directions need several credit updates.
#[test]
fn bulk_data_both_ways_respects_credit() {
    const TOTAL: usize = 1 << 20;
    const GUEST_BUF: u32 = 64 * 1024;
    let pattern = |i: usize, salt: usize| ((i * 31 + salt) % 251) as u8;

    let dir = tmp();
    let (mut dev, path) = device(dir.path());
    let mut g = Guest::start(&mut dev);
    g.add_rx(32);
    let (s, local) = establish_host_initiated(&mut g, &path, 77);
    let port = 77;

    let mut writer_s = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let data: Vec<u8> = (0..TOTAL).map(|i| pattern(i, 1)).collect();
        writer_s.write_all(&data).unwrap();
    });
    let mut reader_s = s;
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; TOTAL];
        reader_s.read_exact(&mut got).unwrap();
        // Kept open until the end: closing it would (rightly) make the
        // device send SHUTDOWN.
        (got, reader_s)
    });

    let mut hdr = g.hdr(OP_RW, port, local);
    hdr.buf_alloc = GUEST_BUF;
    let mut received: Vec<u8> = Vec::with_capacity(TOTAL);
    let mut guest_fwd: u32 = 0;
    // Highest fwd_cnt the guest has told the device.
    let mut advertised: u32 = 0;
    let mut sent = 0usize;
    let mut dev_fwd: u32 = 0;
    let mut dev_buf = BUF_ALLOC;
    let deadline = Instant::now() + Duration::from_secs(20);
    while received.len() < TOTAL || sent < TOTAL {
        assert!(
            Instant::now() < deadline,
            "bulk transfer stalled: rx {} tx {}",
            received.len(),
            sent
        );
        let mut progress = false;
        while let Some((h, d)) = g.try_recv() {
            progress = true;
            dev_fwd = h.fwd_cnt;
            dev_buf = h.buf_alloc;
            match h.op {
                OP_RW => {
                    // The device never exceeds the credit we gave.
                    let in_flight = (received.len() + d.len()) as u32 - advertised;
                    assert!(in_flight <= GUEST_BUF, "credit exceeded: {in_flight}");
                    received.extend_from_slice(&d);
                    // The guest application reads at once.
                    guest_fwd = received.len() as u32;
                }
                OP_CREDIT_UPDATE => {}
                op => panic!("unexpected op {op}"),
            }
        }
        if guest_fwd - advertised >= GUEST_BUF / 2 {
            let mut cu = hdr;
            cu.op = OP_CREDIT_UPDATE;
            cu.fwd_cnt = guest_fwd;
            g.send(cu, &[]);
            advertised = guest_fwd;
            progress = true;
        }
        let credit = dev_buf as usize - (sent - dev_fwd as usize);
        if sent < TOTAL && credit > 0 && g.tx.free_descriptors() >= 2 {
            let n = credit.min(16 * 1024).min(TOTAL - sent);
            let chunk: Vec<u8> = (sent..sent + n).map(|i| pattern(i, 2)).collect();
            let mut h = hdr;
            h.fwd_cnt = guest_fwd;
            g.send(h, &chunk);
            advertised = guest_fwd;
            sent += n;
            progress = true;
        }
        g.reclaim_tx();
        if !progress {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    writer.join().unwrap();
    let (got, _keep) = reader.join().unwrap();
    assert!(received
        .iter()
        .enumerate()
        .all(|(i, b)| *b == pattern(i, 1)));
    assert!(got.iter().enumerate().all(|(i, b)| *b == pattern(i, 2)));
}

#[test]
fn host_half_close_then_close() {
    let dir = tmp();
    let (mut dev, path) = device(dir.path());
    let mut g = Guest::start(&mut dev);
    g.add_rx(8);
    let (mut s, local) = establish_host_initiated(&mut g, &path, 10);
    s.write_all(b"last words").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (_, d) = g.expect_op(OP_RW);
    assert_eq!(d, b"last words");
    let (sh, _) = g.expect_op(OP_SHUTDOWN);
    assert_eq!(sh.flags, SHUTDOWN_SEND, "half close: host sends no more");
    // The guest can still talk to the host.
    g.send(g.hdr(OP_RW, 10, local), b"still here");
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still here");
    // Full close: SHUTDOWN both, the guest answers RST, the connection goes.
    drop(s);
    let (sh, _) = g.expect_op(OP_SHUTDOWN);
    assert_eq!(sh.flags, SHUTDOWN_BOTH);
    g.send(g.hdr(OP_RST, 10, local), &[]);
    g.expect_silence(Duration::from_millis(250));
    // Gone: data for it is answered with RST.
    g.send(g.hdr(OP_RW, 10, local), b"x");
    g.expect_op(OP_RST);
}

#[test]
fn host_close_without_guest_answer_forces_rst() {
    let dir = tmp();
    let (mut dev, path) = device(dir.path());
    let mut g = Guest::start(&mut dev);
    g.add_rx(8);
    let (s, local) = establish_host_initiated(&mut g, &path, 11);
    drop(s);
    let (sh, _) = g.expect_op(OP_SHUTDOWN);
    assert_eq!(sh.flags, SHUTDOWN_BOTH);
    let started = Instant::now();
    let (rst, _) = g.expect_op(OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (local, 11));
    assert!(started.elapsed() >= Duration::from_millis(100));
}

#[test]
fn guest_rst_closes_host_stream() {
    let dir = tmp();
    let (mut dev, path) = device(dir.path());
    let mut g = Guest::start(&mut dev);
    g.add_rx(8);
    let (mut s, local) = establish_host_initiated(&mut g, &path, 12);
    g.send(g.hdr(OP_RST, 12, local), &[]);
    expect_eof(&mut s);
    g.expect_silence(Duration::from_millis(20));
}

#[test]
fn guest_half_close_reaches_host_as_eof() {
    let dir = tmp();
    let (mut dev, path) = device(dir.path());
    let mut g = Guest::start(&mut dev);
    g.add_rx(8);
    let (mut s, local) = establish_host_initiated(&mut g, &path, 13);
    g.send(g.hdr(OP_RW, 13, local), b"bye");
    let mut sh = g.hdr(OP_SHUTDOWN, 13, local);
    sh.flags = SHUTDOWN_SEND;
    g.send(sh, &[]);
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"bye");
    // The host can still answer.
    s.write_all(b"ok").unwrap();
    let (_, d) = g.expect_op(OP_RW);
    assert_eq!(d, b"ok");
}

#[test]
fn credit_request_is_answered() {
    let dir = tmp();
    let (mut dev, path) = device(dir.path());
    let mut g = Guest::start(&mut dev);
    g.add_rx(8);
    let (_s, local) = establish_host_initiated(&mut g, &path, 14);
    g.send(g.hdr(OP_CREDIT_REQUEST, 14, local), &[]);
    let (cu, _) = g.expect_op(OP_CREDIT_UPDATE);
    assert_eq!(cu.buf_alloc, BUF_ALLOC);
}

#[test]
fn guest_exceeding_credit_is_reset() {
    let dir = tmp();
    let (mut dev, path) = device(dir.path());
    let mut g = Guest::start(&mut dev);
    g.add_rx(8);
    // The host never reads, the guest ignores our credit.
    let (_s, local) = establish_host_initiated(&mut g, &path, 15);
    let chunk = vec![7u8; 60 * 1024];
    for _ in 0..60 {
        g.send(g.hdr(OP_RW, 15, local), &chunk);
        while let Some((h, _)) = g.try_recv() {
            if h.op == OP_RST {
                return;
            }
            assert_eq!(h.op, OP_CREDIT_UPDATE);
        }
    }
    loop {
        let (h, _) = g.recv();
        if h.op == OP_RST {
            return;
        }
        assert_eq!(h.op, OP_CREDIT_UPDATE);
    }
}

#[test]
fn vanished_host_peer_gives_rst() {
    let dir = tmp();
    let (mut dev, path) = device(dir.path());
    let mut g = Guest::start(&mut dev);
    g.add_rx(8);
    let lpath = PathBuf::from(format!("{}_6000", path.display()));
    let listener = UnixListener::bind(&lpath).unwrap();
    g.send(g.hdr(OP_REQUEST, 4000, 6000), &[]);
    g.expect_op(OP_RESPONSE);
    let (s, _) = listener.accept().unwrap();
    drop(s);
    // Writing to the vanished peer fails (EPIPE): RST, no panic. The
    // device may first notice the hang-up and send SHUTDOWN.
    let mut saw_rst = false;
    for _ in 0..3 {
        g.send(g.hdr(OP_RW, 4000, 6000), b"anyone?");
        if let Some((h, _)) = g.recv_within(Duration::from_millis(500)) {
            if h.op == OP_RST {
                saw_rst = true;
                break;
            }
            assert_eq!(h.op, OP_SHUTDOWN);
        }
    }
    assert!(saw_rst);
    // Later RWs for the dead connection got their own RSTs.
    while let Some((h, _)) = g.recv_within(Duration::from_millis(50)) {
        assert_eq!(h.op, OP_RST);
    }
    // Still serving.
    establish_host_initiated(&mut g, &path, 1);
}

#[test]
fn malformed_chains_and_garbage_headers() {
    let dir = tmp();
    let (mut dev, path) = device(dir.path());
    let mut g = Guest::start(&mut dev);
    g.add_rx(8);
    let (mut s, local) = establish_host_initiated(&mut g, &path, 20);

    // Every malformed chain carries a header for the live connection: were
    // it accepted, its bytes would reach the host and break the check below.
    let mut rw = g.hdr(OP_RW, 20, local);
    rw.len = 64;
    // Write-only header descriptor.
    g.send_chain(rw, &[(None, HDR_SIZE as u32, F_WRITE), (None, 64, 0)]);
    // Header descriptor too short.
    g.send_chain(rw, &[(None, 10, 0), (None, 64, 0)]);
    // Addresses outside guest memory.
    g.send_chain(
        rw,
        &[(Some(0xffff_0000_0000), HDR_SIZE as u32, 0), (None, 64, 0)],
    );
    g.send_chain(
        rw,
        &[(None, HDR_SIZE as u32, 0), (Some(u64::MAX - 8), 64, 0)],
    );
    // Data descriptor that is device-writable.
    g.send_chain(rw, &[(None, HDR_SIZE as u32, 0), (None, 64, F_WRITE)]);
    // Header without its data descriptor.
    g.send_chain(rw, &[(None, HDR_SIZE as u32, 0)]);
    // Header says 1000 bytes, data buffer holds 10.
    let mut h = g.hdr(OP_RW, 20, local);
    h.len = 1000;
    let idx = g.reserve_tx(&[(None, HDR_SIZE as u32, 0), (None, 10, 0)]);
    g.mem
        .write_slice(&h.to_bytes(), GuestAddress(g.tx.buf(idx[0])))
        .unwrap();
    g.tx.push_avail(idx[0]);
    g.kicks[1].write(1).unwrap();
    // Huge len.
    let mut h = g.hdr(OP_RW, 20, local);
    h.len = u32::MAX;
    g.send_raw_hdr(h, b"tiny");
    // A descriptor loop: a -> b -> a.
    {
        let idx =
            g.tx.reserve(&[
                (None, HDR_SIZE as u32, 0, Next::Follow),
                (None, 4, 0, Next::To(0)),
            ])
            .unwrap();
        let mut hl = g.hdr(OP_RW, 20, local);
        hl.len = 8;
        g.mem
            .write_slice(&hl.to_bytes(), GuestAddress(g.tx.buf(idx[0])))
            .unwrap();
        g.tx.push_avail(idx[0]);
        g.kicks[1].write(1).unwrap();
    }
    // A head index out of the table.
    g.tx.push_avail(QSIZE + 5);
    g.kicks[1].write(1).unwrap();

    // None of that reached the host.
    g.send(g.hdr(OP_RW, 20, local), b"fine");
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"fine");

    // Garbage headers: unknown op on a live connection resets it...
    g.send(g.hdr(99, 20, local), &[]);
    g.expect_op(OP_RST);
    expect_eof(&mut s);
    // ...on an unknown one gets an RST; wrong type gets RST; wrong source
    // CID is dropped.
    g.send(g.hdr(OP_RW, 1, 2), b"??");
    let (r, _) = g.expect_op(OP_RST);
    assert_eq!((r.src_port, r.dst_port), (2, 1));
    let mut h = g.hdr(OP_REQUEST, 1, 2);
    h.type_ = 2;
    g.send(h, &[]);
    g.expect_op(OP_RST);
    let mut h = g.hdr(OP_REQUEST, 1, 2);
    h.src_cid = 7;
    g.send(h, &[]);
    // An RST for nothing gets no answer.
    g.send(g.hdr(OP_RST, 1, 2), &[]);
    // Another host on an unknown destination CID.
    let mut h = g.hdr(OP_REQUEST, 1, 2);
    h.dst_cid = 9;
    g.send(h, &[]);
    let (r, _) = g.recv();
    assert_eq!((r.op, r.src_cid), (OP_RST, 9));
    g.expect_silence(Duration::from_millis(30));

    // The device still works for new connections.
    let (mut s2, local2) = establish_host_initiated(&mut g, &path, 21);
    s2.write_all(b"alive").unwrap();
    let (h, d) = g.expect_op(OP_RW);
    assert_eq!((h.src_port, d.as_slice()), (local2, &b"alive"[..]));
}

#[test]
fn malformed_rx_buffers_are_skipped() {
    let dir = tmp();
    let (mut dev, path) = device(dir.path());
    let mut g = Guest::start(&mut dev);
    // Read-only, too short, outside guest memory: returned empty, skipped.
    g.rx.publish(&[(None, HDR_SIZE as u32, 0), (None, RX_DATA, 0)]);
    g.rx.publish(&[(None, 8, F_WRITE)]);
    g.rx.publish(&[
        (Some(0xffff_0000_0000), HDR_SIZE as u32, F_WRITE),
        (None, RX_DATA, F_WRITE),
    ]);
    g.rx.publish(&[(None, HDR_SIZE as u32, F_WRITE), (None, 0, F_WRITE)]);
    g.refill = false;
    g.add_rx(2);
    let (mut s, local) = establish_host_initiated(&mut g, &path, 22);
    s.write_all(b"alive").unwrap();
    let (h, d) = g.expect_op(OP_RW);
    assert_eq!((h.src_port, d.as_slice()), (local, &b"alive"[..]));
}

#[test]
fn path_in_use_and_stale_socket() {
    let dir = tmp();
    let (dev, path) = device(dir.path());
    match Vsock::new(CID, path.clone()) {
        Err(e @ VsockError::AddrInUse(_)) => {
            assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        }
        other => panic!("expected AddrInUse, got {other:?}"),
    }
    drop(dev);
    assert!(!path.exists(), "socket file removed on drop");

    // A stale socket file (its listener is gone) is replaced.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let dev = Vsock::new(CID, stale.clone()).unwrap();
    assert!(UnixStream::connect(&stale).is_ok());
    drop(dev);

    // A regular file is not ours to remove.
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        Vsock::new(CID, file.clone()),
        Err(VsockError::NotASocket(_))
    ));
    assert!(file.exists());
}

#[test]
fn shutdown_joins_worker_and_removes_socket() {
    let dir = tmp();
    let (mut dev, path) = device(dir.path());
    let mut g = Guest::start(&mut dev);
    g.add_rx(4);
    let (mut s, _) = establish_host_initiated(&mut g, &path, 30);
    assert!(dev.is_active());
    dev.shutdown();
    assert!(!dev.is_active());
    assert!(!path.exists());
    expect_eof(&mut s);
    assert!(UnixStream::connect(&path).is_err());
    dev.shutdown(); // idempotent
    assert!(!dev.reset());
}

#[test]
fn reset_returns_to_pre_activation() {
    let dir = tmp();
    let (mut dev, path) = device(dir.path());
    let mut g = Guest::start(&mut dev);
    g.add_rx(4);
    let (mut s, _) = establish_host_initiated(&mut g, &path, 31);
    assert!(dev.reset());
    assert!(!dev.is_active());
    assert!(path.exists(), "the listener survives a reset");
    expect_eof(&mut s);
    // Activate again with fresh queues.
    let mut g = Guest::start(&mut dev);
    g.add_rx(4);
    establish_host_initiated(&mut g, &path, 31);
}

#[test]
fn transport_reset_event() {
    let dir = tmp();
    let (mut dev, path) = device(dir.path());
    let mut g = Guest::start(&mut dev);
    g.add_rx(4);
    let (mut s, _) = establish_host_initiated(&mut g, &path, 40);
    let idx = g.ev.publish(&[(None, 4, F_WRITE)]).unwrap();
    g.mem
        .write_obj(0xffff_ffffu32, GuestAddress(g.ev.buf(idx[0])))
        .unwrap();
    g.kicks[2].write(1).unwrap();
    dev.send_transport_reset().unwrap();
    expect_eof(&mut s);
    let deadline = Instant::now() + WAIT;
    loop {
        let used = g.ev.take_used();
        if let Some(UsedChain {
            descs: chain, len, ..
        }) = used.first()
        {
            assert_eq!(*len, 4);
            let id: u32 = g.mem.read_obj(GuestAddress(g.ev.buf(chain[0]))).unwrap();
            assert_eq!(id, EVENT_TRANSPORT_RESET);
            break;
        }
        assert!(Instant::now() < deadline, "no transport reset event");
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn client_helper() {
    let dir = tmp();
    let (mut dev, path) = device(dir.path());
    let mut g = Guest::start(&mut dev);
    g.add_rx(8);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // Accepted: the stream carries data, nothing was over-read.
    let p = path.clone();
    let client = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = connect_hybrid_timeout(&p, 50, WAIT).await.unwrap();
            let mut b = [0u8; 5];
            s.read_exact(&mut b).await.unwrap();
            s.write_all(b"pong").await.unwrap();
            b
        })
    });
    let (req, _) = g.expect_op(OP_REQUEST);
    g.send(g.hdr(OP_RESPONSE, 50, req.src_port), &[]);
    g.send(g.hdr(OP_RW, 50, req.src_port), b"ping!");
    assert_eq!(&client.join().unwrap(), b"ping!");
    let (_, d) = g.expect_op(OP_RW);
    assert_eq!(d, b"pong");
    // The client closed: SHUTDOWN (SEND, then both); the guest answers RST.
    loop {
        let (h, _) = g.expect_op(OP_SHUTDOWN);
        if h.flags == SHUTDOWN_BOTH {
            g.send(g.hdr(OP_RST, 50, h.src_port), &[]);
            break;
        }
    }

    // Refused by the guest.
    let p = path.clone();
    let client = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(connect_hybrid_timeout(&p, 51, WAIT))
            .map(|_| ())
    });
    let (req, _) = g.expect_op(OP_REQUEST);
    g.send(g.hdr(OP_RST, 51, req.src_port), &[]);
    let err = client.join().unwrap().unwrap_err();
    assert!(
        matches!(err, ConnectError::NoListener { port: 51 }),
        "{err}"
    );
    assert_eq!(err.to_string(), "no listener on guest vsock port 51");

    // The guest sees the request but never answers: the client gives up
    // first (the device would reset it after 150 ms).
    g.refill = false;
    let err = rt
        .block_on(connect_hybrid_timeout(&path, 52, Duration::from_millis(50)))
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(err, ConnectError::Timeout { port: 52, .. }),
        "{err}"
    );

    // No device at all.
    let err = rt
        .block_on(connect_hybrid_timeout(&dir.path().join("none"), 1, WAIT))
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, ConnectError::Connect { .. }), "{err}");
}
