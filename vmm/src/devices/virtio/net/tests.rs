//! Device tests.
//!
//! [`Guest`] below FAKES THE GUEST'S virtio-net DRIVER: it lays out the RX
//! and TX split virtqueues in guest memory with
//! `virtio_queue::mock::MockSplitQueue`, posts RX buffers, writes TX
//! frames and reads the used rings, as the Linux driver would, while the
//! device runs for real on its worker thread.
//!
//! Two backends stand behind the device:
//! - a Unix datagram socket pair ([`SockBackend`]): deterministic, used for
//!   the data path details and the malformed-chain cases;
//! - real taps, created in fresh network namespaces (one per test, made by
//!   `unshare(CLONE_NEWNET)` on a throwaway thread and held by an open
//!   namespace file), observed from inside the namespace with an
//!   `AF_PACKET` socket bound to the tap: what the guest transmits is what
//!   the tap's interface receives, and what the socket sends out of the
//!   interface is what the guest must receive. These tests need root; they
//!   are skipped (with a message) where namespaces or /dev/net/tun are
//!   unavailable.

use std::collections::VecDeque;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::super::test_driver::{DriverQueue, Next, Part, UsedChain, F_WRITE};
use super::super::test_utils::CountingInterrupt;
use super::super::{ActivateError, GuestMemoryMmap, VirtioDevice, TYPE_NET};
use super::*;

const MAC: [u8; 6] = [0x02, 0xe0, 0x00, 0x00, 0x00, 0x01];
const PEER_MAC: [u8; 6] = [0x02, 0xe0, 0x00, 0x00, 0x00, 0x02];
const BROADCAST: [u8; 6] = [0xff; 6];
/// IEEE "local experimental" EtherType: nothing else on the test links
/// uses it.
const ETHERTYPE: u16 = 0x88b5;
const MEM_SIZE: usize = 16 << 20;
/// What Linux posts per RX buffer without offloads: header + 1518.
const RX_BUF: u32 = (VNET_HDR_LEN + 1518) as u32;
const SLOT: u64 = 0x1000;
/// A region for explicit buffers, away from the per-descriptor slots.
const SCRATCH: u64 = 0x40_0000;
const WAIT: Duration = Duration::from_secs(3);
/// The header the device must put in front of every RX frame.
const RX_HDR: [u8; VNET_HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

type Vq = DriverQueue;

/// The fake guest driver.
struct Guest {
    mem: &'static GuestMemoryMmap,
    rx: Vq,
    tx: Vq,
    kicks: Vec<EventFd>,
    irq: Arc<CountingInterrupt>,
    /// RX used entries taken by [`Guest::recv`] and not returned yet.
    inbox: VecDeque<(Vec<u8>, u32)>,
}

impl Guest {
    /// Lays out the queues and activates `dev` with them.
    fn start(dev: &mut Net) -> Guest {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        // Leaked so the mock queues can borrow it for 'static (tests only).
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(mem));
        let rx = Vq::new(mem, 0x0, 0x10_0000, SLOT);
        let tx = Vq::new(mem, 0x4000, 0x20_0000, SLOT);
        let queues = vec![rx.queue(), tx.queue()];
        let kicks: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let dev_evts = kicks.iter().map(|e| e.try_clone().unwrap()).collect();
        let irq = CountingInterrupt::new();
        dev.set_acked_features(dev.avail_features());
        dev.activate(mem.clone(), irq.clone(), queues, dev_evts)
            .unwrap();
        Guest {
            mem,
            rx,
            tx,
            kicks,
            irq,
            inbox: VecDeque::new(),
        }
    }

    fn kick_rx(&self) {
        self.kicks[0].write(1).unwrap();
    }

    fn kick_tx(&self) {
        self.kicks[1].write(1).unwrap();
    }

    /// Posts `n` Linux-style RX buffers (one descriptor each) and kicks.
    fn add_rx(&mut self, n: usize) {
        for _ in 0..n {
            let idx = self
                .rx
                .reserve(&[(None, RX_BUF, F_WRITE, Next::End)])
                .expect("free RX descriptors");
            self.rx.push_avail(idx[0]);
        }
        self.kick_rx();
    }

    /// Posts one hand-made RX chain (without kicking).
    fn add_rx_chain(&mut self, parts: &[Part]) {
        let idx = self.rx.reserve(parts).expect("free RX descriptors");
        self.rx.push_avail(idx[0]);
    }

    /// Transmits `hdr` + `frame`, in one descriptor or two.
    fn send_with_hdr(&mut self, hdr: [u8; VNET_HDR_LEN], frame: &[u8], split: bool) {
        let mut data = hdr.to_vec();
        data.extend_from_slice(frame);
        let parts: Vec<Part> = if split {
            vec![
                (None, VNET_HDR_LEN as u32, 0, Next::Follow),
                (None, frame.len() as u32, 0, Next::End),
            ]
        } else {
            vec![(None, data.len() as u32, 0, Next::End)]
        };
        let idx = self.reserve_tx(&parts);
        if split {
            self.write(self.tx.buf(idx[0]), &hdr);
            self.write(self.tx.buf(idx[1]), frame);
        } else {
            self.write(self.tx.buf(idx[0]), &data);
        }
        self.tx.push_avail(idx[0]);
        self.kick_tx();
    }

    fn send(&mut self, frame: &[u8]) {
        self.send_with_hdr([0; VNET_HDR_LEN], frame, false);
    }

    /// Reserves TX descriptors, reclaiming used ones while the table is
    /// full (only bursts fill it).
    fn reserve_tx(&mut self, parts: &[Part]) -> Vec<u16> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(idx) = self.tx.reserve(parts) {
                return idx;
            }
            self.tx.take_used();
            assert!(Instant::now() < deadline, "device returns no TX chains");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Publishes a hand-made TX chain and kicks.
    fn send_chain(&mut self, parts: &[Part]) {
        let idx = self.tx.reserve(parts).expect("free TX descriptors");
        self.tx.push_avail(idx[0]);
        self.kick_tx();
    }

    fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    /// Waits for `n` more TX used entries; returns their lengths.
    fn wait_tx_used(&mut self, n: usize) -> Vec<u32> {
        let deadline = Instant::now() + WAIT;
        let mut out = Vec::new();
        while out.len() < n {
            out.extend(self.tx.take_used().into_iter().map(|u| u.len));
            assert!(
                Instant::now() < deadline,
                "device returned {} of {n} TX chains",
                out.len()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        out
    }

    /// Waits for `n` more RX used entries: (bytes written, used len).
    fn wait_rx_used(&mut self, n: usize) -> Vec<(Vec<u8>, u32)> {
        let deadline = Instant::now() + WAIT;
        let mut out = Vec::new();
        while out.len() < n {
            for UsedChain { segs, len, .. } in self.rx.take_used() {
                let mut data = Vec::new();
                let mut left = len as usize;
                for (addr, seg_len) in segs {
                    let take = left.min(seg_len as usize);
                    let mut buf = vec![0u8; take];
                    self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
                    data.extend_from_slice(&buf);
                    left -= take;
                }
                assert_eq!(left, 0, "used len larger than the chain");
                out.push((data, len));
            }
            assert!(
                Instant::now() < deadline,
                "device filled {} of {n} RX chains",
                out.len()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        out
    }

    /// The next received frame with our EtherType (others, e.g. IPv6
    /// neighbour discovery on a real tap, are skipped); each consumed
    /// buffer is re-posted. Returns (header, frame).
    fn recv(&mut self) -> (Vec<u8>, Vec<u8>) {
        loop {
            if self.inbox.is_empty() {
                let got = self.wait_rx_used(1);
                self.add_rx(got.len());
                self.inbox.extend(got);
            }
            let Some((data, len)) = self.inbox.pop_front() else {
                continue;
            };
            assert!(
                len as usize >= VNET_HDR_LEN + MIN_FRAME_LEN,
                "used len {len}"
            );
            let (hdr, frame) = data.split_at(VNET_HDR_LEN);
            if ethertype(frame) == ETHERTYPE {
                return (hdr.to_vec(), frame.to_vec());
            }
        }
    }

    /// No RX used entry appears for `d`.
    fn expect_no_rx(&mut self, d: Duration) {
        std::thread::sleep(d);
        let used = self.rx.take_used();
        assert!(used.is_empty(), "unexpected RX used entries: {used:?}");
    }
}

fn ethertype(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[12], frame[13]])
}

fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

fn with_hdr(hdr: [u8; VNET_HDR_LEN], frame: &[u8]) -> Vec<u8> {
    let mut v = hdr.to_vec();
    v.extend_from_slice(frame);
    v
}

/// Waits until `cond` holds on the device's stats.
fn wait_stats(dev: &Net, what: &str, cond: impl Fn(&NetStats) -> bool) -> NetStats {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = dev.stats();
        if cond(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: stats {s:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

// ---------------------------------------------------------------------------
// A socket pair standing in for the tap.

/// The device's end of a Unix datagram pair: one datagram = one frame with
/// its vnet header, like a tap with IFF_VNET_HDR. `dropped` is set when
/// the device lets go of it (a closed peer is no proof: a process forked
/// by another test may hold a copy of the descriptor for a while).
struct SockBackend(UnixDatagram, Arc<AtomicBool>);

impl Drop for SockBackend {
    fn drop(&mut self) {
        self.1.store(true, Ordering::SeqCst);
    }
}

impl NetBackend for SockBackend {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`;
        // MSG_TRUNC makes it return the datagram's full length, like tun.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.0.send(frame).map(|_| ())
    }

    fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    fn name(&self) -> &str {
        "sockpair"
    }
}

/// A device on a socket pair, and the host's end of the pair.
fn sock_device() -> (Net, UnixDatagram) {
    let (dev, host, _) = sock_device_flagged();
    (dev, host)
}

/// [`sock_device`] and the backend's dropped flag.
fn sock_device_flagged() -> (Net, UnixDatagram, Arc<AtomicBool>) {
    let (dev_end, host) = UnixDatagram::pair().unwrap();
    dev_end.set_nonblocking(true).unwrap();
    host.set_read_timeout(Some(WAIT)).unwrap();
    let dropped = Arc::new(AtomicBool::new(false));
    let backend = SockBackend(dev_end, dropped.clone());
    let dev = Net::with_backend(Box::new(backend), MAC).unwrap();
    (dev, host, dropped)
}

/// The next datagram the device wrote.
fn host_recv(host: &UnixDatagram) -> Vec<u8> {
    let mut buf = vec![0u8; 128 * 1024];
    let n = host.recv(&mut buf).expect("a frame from the device");
    buf.truncate(n);
    buf
}

fn host_expect_nothing(host: &UnixDatagram, d: Duration) {
    host.set_read_timeout(Some(d)).unwrap();
    let mut buf = vec![0u8; 128 * 1024];
    match host.recv(&mut buf) {
        Ok(n) => panic!("unexpected {n}-byte frame from the device"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e}"
        ),
    }
    host.set_read_timeout(Some(WAIT)).unwrap();
}

// ---------------------------------------------------------------------------
// Device basics.

#[test]
fn config_space_and_features() {
    let (mut dev, _host) = sock_device();
    assert_eq!(dev.device_type(), TYPE_NET);
    assert_eq!(dev.queue_max_sizes(), &[256, 256]);
    let f = dev.avail_features();
    assert_ne!(f & (1 << 32), 0, "VERSION_1");
    assert_ne!(f & (1 << 5), 0, "MAC");
    assert_ne!(f & (1 << 16), 0, "STATUS");
    // No offloads, no mergeable buffers, no control queue, no multiqueue.
    for bit in [0, 1, 7, 8, 11, 12, 15, 17, 22] {
        assert_eq!(f & (1 << bit), 0, "feature bit {bit}");
    }

    let mut cfg = [0xaau8; 12];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "LINK_UP");
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1, "one queue pair");
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 0, "no MTU");
    assert_eq!(f & (1 << 3), 0, "no MTU feature without an MTU");
    let mut b = [0u8; 1];
    for (i, &m) in MAC.iter().enumerate() {
        dev.read_config(i as u64, &mut b);
        assert_eq!(b[0], m);
    }
    // Out of range: zeros, no panic.
    for (off, len) in [(10u64, 4usize), (12, 1), (0x100, 4), (u64::MAX, 2)] {
        let mut d = vec![0xffu8; len];
        dev.read_config(off, &mut d);
        assert!(d.iter().all(|&x| x == 0), "offset {off}");
    }
    // Config writes are ignored (the MAC is not writable in VERSION_1).
    dev.write_config(0, &[1, 2, 3, 4, 5, 6]);
    dev.write_config(u64::MAX, &[1]);
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(dev.mac(), MAC);
    assert_eq!(dev.backend_name(), "sockpair");
}

#[test]
fn mtu_is_offered_and_enforced() {
    let (dev, host) = sock_device();
    assert!(matches!(
        dev.with_mtu(MIN_MTU - 1),
        Err(NetError::InvalidMtu(67))
    ));
    drop(host);
    let (dev, host) = sock_device();
    let mut dev = dev.with_mtu(1450).unwrap();
    assert_eq!(dev.mtu(), Some(1450));
    assert_ne!(dev.avail_features() & (1 << 3), 0);
    let mut b = [0u8; 2];
    dev.read_config(10, &mut b);
    assert_eq!(u16::from_le_bytes(b), 1450);

    // The fake guest accepts every offered feature, MTU included.
    let mut g = Guest::start(&mut dev);
    g.add_rx(4);
    // Ethernet + VLAN header on top of the MTU is the limit.
    let fits = frame(MAC, PEER_MAC, &payload(1450 + 4, 1));
    let too_long = frame(MAC, PEER_MAC, &payload(1450 + 5, 2));
    host.send(&with_hdr([0; VNET_HDR_LEN], &too_long)).unwrap();
    host.send(&with_hdr([0; VNET_HDR_LEN], &fits)).unwrap();
    let got = g.wait_rx_used(1);
    assert_eq!(got[0].0, with_hdr(RX_HDR, &fits));
    let s = dev.stats();
    assert_eq!((s.rx_frames, s.rx_dropped), (1, 1));
}

#[test]
fn invalid_macs_are_refused() {
    for mac in [[0u8; 6], [0x01, 0, 0x5e, 0, 0, 1], BROADCAST] {
        let (a, _b) = UnixDatagram::pair().unwrap();
        let backend = SockBackend(a, Arc::new(AtomicBool::new(false)));
        let err = Net::with_backend(Box::new(backend), mac).unwrap_err();
        assert!(matches!(err, NetError::InvalidMac(_)), "{err}");
    }
}

#[test]
fn activate_checks_queue_count() {
    let (mut dev, _host) = sock_device();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let q = Queue::new(16).unwrap();
    let evt = EventFd::new(EFD_NONBLOCK).unwrap();
    let err = dev
        .activate(mem, CountingInterrupt::new(), vec![q], vec![evt])
        .unwrap_err();
    assert!(
        matches!(
            err,
            ActivateError::QueueCount {
                expected: 2,
                got: 1
            }
        ),
        "{err}"
    );
    assert!(!dev.is_active());
}

// ---------------------------------------------------------------------------
// Data path over the socket pair.

#[test]
fn tx_frames_reach_the_backend_with_a_plain_header() {
    let (mut dev, host) = sock_device();
    let mut g = Guest::start(&mut dev);

    let f1 = frame(BROADCAST, MAC, &payload(100, 1));
    g.send(&f1);
    assert_eq!(host_recv(&host), with_hdr([0; VNET_HDR_LEN], &f1));

    // Offload bits the guest has no right to set (NEEDS_CSUM, GSO TCPv4)
    // do not reach the tap; header and frame in separate descriptors.
    let f2 = frame(PEER_MAC, MAC, &payload(1500, 2));
    let junk = [1, 1, 0x36, 0, 0xa8, 0x05, 34, 0, 16, 0, 9, 9];
    g.send_with_hdr(junk, &f2, true);
    assert_eq!(host_recv(&host), with_hdr([0; VNET_HDR_LEN], &f2));

    // A minimal frame: just an Ethernet header.
    let f3 = frame(PEER_MAC, MAC, &[]);
    g.send(&f3);
    assert_eq!(host_recv(&host), with_hdr([0; VNET_HDR_LEN], &f3));

    assert_eq!(g.wait_tx_used(3), vec![0, 0, 0]);
    assert!(g.irq.count() > 0);
    let s = dev.stats();
    assert_eq!(s.tx_frames, 3);
    assert_eq!(s.tx_bytes, (f1.len() + f2.len() + f3.len()) as u64);
    assert_eq!(s.tx_bad_chains + s.tx_dropped, 0);
}

#[test]
fn rx_frames_reach_the_guest_with_num_buffers_1() {
    let (mut dev, host) = sock_device();
    let mut g = Guest::start(&mut dev);
    g.add_rx(4);

    // The tap's DATA_VALID flag and whatever is in its last two bytes are
    // replaced by the guest's header.
    let f1 = frame(MAC, PEER_MAC, &payload(64, 3));
    host.send(&with_hdr([2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 7], &f1))
        .unwrap();
    let got = g.wait_rx_used(1);
    assert_eq!(got[0].1 as usize, VNET_HDR_LEN + f1.len());
    assert_eq!(got[0].0, with_hdr(RX_HDR, &f1));

    // A full-size frame fills a Linux-size buffer exactly.
    let f2 = frame(MAC, PEER_MAC, &payload(1504, 4));
    assert_eq!(VNET_HDR_LEN + f2.len(), RX_BUF as usize);
    host.send(&with_hdr([0; VNET_HDR_LEN], &f2)).unwrap();
    let got = g.wait_rx_used(1);
    assert_eq!(got[0].0, with_hdr(RX_HDR, &f2));

    // Scattered over three descriptors: header, 10 bytes, the rest.
    g.add_rx_chain(&[
        (None, VNET_HDR_LEN as u32, F_WRITE, Next::Follow),
        (None, 10, F_WRITE, Next::Follow),
        (None, 3000, F_WRITE, Next::End),
    ]);
    // Drain the two plain buffers first.
    let f3 = frame(MAC, PEER_MAC, &payload(200, 5));
    let f4 = frame(MAC, PEER_MAC, &payload(201, 6));
    let f5 = frame(MAC, PEER_MAC, &payload(2000, 7));
    for f in [&f3, &f4, &f5] {
        host.send(&with_hdr([0; VNET_HDR_LEN], f)).unwrap();
    }
    g.kick_rx();
    let got = g.wait_rx_used(3);
    assert_eq!(got[0].0, with_hdr(RX_HDR, &f3));
    assert_eq!(got[1].0, with_hdr(RX_HDR, &f4));
    assert_eq!(got[2].0, with_hdr(RX_HDR, &f5));
    assert_eq!(got[2].1 as usize, VNET_HDR_LEN + f5.len());

    assert!(g.irq.count() > 0);
    let s = dev.stats();
    assert_eq!(s.rx_frames, 5);
    assert_eq!(
        s.rx_bytes,
        [&f1, &f2, &f3, &f4, &f5]
            .iter()
            .map(|f| f.len() as u64)
            .sum::<u64>()
    );
    assert_eq!(s.rx_dropped + s.rx_bad_chains, 0);
}

#[test]
fn malformed_tx_chains_are_returned_unused() {
    let (mut dev, host) = sock_device();
    let mut g = Guest::start(&mut dev);
    let good = frame(PEER_MAC, MAC, &payload(60, 9));
    let good_len = (VNET_HDR_LEN + good.len()) as u32;
    // Every bad chain below points at a buffer holding a valid frame, so
    // only the chain's shape can make the device refuse it.
    g.write(SCRATCH, &with_hdr([0; VNET_HDR_LEN], &good));
    let outside = MEM_SIZE as u64 + 0x1000;
    let bad: Vec<Vec<Part>> = vec![
        // Device-writable descriptor in a TX chain.
        vec![(Some(SCRATCH), good_len, F_WRITE, Next::End)],
        // Shorter than header + Ethernet header.
        vec![(Some(SCRATCH), 20, 0, Next::End)],
        // Outside guest memory.
        vec![(Some(outside), good_len, 0, Next::End)],
        // Straddling the end of guest memory.
        vec![(Some(MEM_SIZE as u64 - 8), good_len, 0, Next::End)],
        // A descriptor loop.
        vec![
            (Some(SCRATCH), 30, 0, Next::Follow),
            (Some(SCRATCH), 30, 0, Next::To(0)),
        ],
        // NEXT past the end of the table.
        vec![(Some(SCRATCH), good_len, 0, Next::Raw(1000))],
        // Longer than any frame: 3 x 30000 bytes.
        vec![
            (Some(SCRATCH), 30_000, 0, Next::Follow),
            (Some(SCRATCH), 30_000, 0, Next::Follow),
            (Some(SCRATCH), 30_000, 0, Next::End),
        ],
        // Absurd lengths that would overflow a 32-bit sum.
        vec![
            (Some(SCRATCH), u32::MAX, 0, Next::Follow),
            (Some(SCRATCH), u32::MAX, 0, Next::End),
        ],
    ];
    for chain in &bad {
        g.send_chain(chain);
    }
    assert_eq!(g.wait_tx_used(bad.len()), vec![0; bad.len()]);
    host_expect_nothing(&host, Duration::from_millis(50));
    let s = wait_stats(&dev, "bad TX chains counted", |s| {
        s.tx_bad_chains == bad.len() as u64
    });
    assert_eq!(s.tx_frames, 0);

    // The device still works.
    g.send(&good);
    assert_eq!(host_recv(&host), with_hdr([0; VNET_HDR_LEN], &good));
    assert_eq!(g.wait_tx_used(1), vec![0]);
    assert_eq!(dev.stats().tx_frames, 1);
}

#[test]
fn malformed_rx_chains_are_returned_with_length_0() {
    let (mut dev, host) = sock_device();
    let mut g = Guest::start(&mut dev);
    let bad: Vec<Vec<Part>> = vec![
        // Device-readable descriptor.
        vec![(None, RX_BUF, 0, Next::End)],
        // Writable header, readable data.
        vec![
            (None, VNET_HDR_LEN as u32, F_WRITE, Next::Follow),
            (None, 1518, 0, Next::End),
        ],
        // Outside guest memory.
        vec![(Some(MEM_SIZE as u64 + 0x1000), RX_BUF, F_WRITE, Next::End)],
        // Too small for any frame.
        vec![(None, 20, F_WRITE, Next::End)],
        // A descriptor loop.
        vec![
            (None, 100, F_WRITE, Next::Follow),
            (None, 100, F_WRITE, Next::To(0)),
        ],
        // NEXT past the end of the table.
        vec![(None, RX_BUF, F_WRITE, Next::Raw(5000))],
    ];
    for chain in &bad {
        g.add_rx_chain(chain);
    }
    g.add_rx(1);
    let f = frame(MAC, PEER_MAC, &payload(300, 11));
    host.send(&with_hdr([0; VNET_HDR_LEN], &f)).unwrap();
    let got = g.wait_rx_used(bad.len() + 1);
    for (i, (_, len)) in got.iter().take(bad.len()).enumerate() {
        assert_eq!(*len, 0, "bad chain {i}");
    }
    let (data, len) = got.last().unwrap();
    assert_eq!(*len as usize, VNET_HDR_LEN + f.len());
    assert_eq!(data, &with_hdr(RX_HDR, &f));
    let s = dev.stats();
    assert_eq!(s.rx_bad_chains, bad.len() as u64);
    assert_eq!((s.rx_frames, s.rx_dropped), (1, 0));
}

#[test]
fn frames_the_guest_cannot_take_are_dropped_and_counted() {
    let (mut dev, host) = sock_device();
    let mut g = Guest::start(&mut dev);
    // One small buffer: header + 100 bytes.
    g.add_rx_chain(&[(None, VNET_HDR_LEN as u32 + 100, F_WRITE, Next::End)]);
    g.kick_rx();

    let big = frame(MAC, PEER_MAC, &payload(500, 1));
    host.send(&with_hdr([0; VNET_HDR_LEN], &big)).unwrap();
    wait_stats(&dev, "frame larger than the buffer dropped", |s| {
        s.rx_dropped == 1
    });
    // Frames the device refuses whatever the buffer: longer than
    // MAX_FRAME_LEN (truncated by the read), runts, offload metadata.
    let huge = frame(MAC, PEER_MAC, &payload(MAX_FRAME_LEN + 100, 2));
    host.send(&with_hdr([0; VNET_HDR_LEN], &huge)).unwrap();
    host.send(&with_hdr([0; VNET_HDR_LEN], &[1, 2, 3])).unwrap();
    let small = frame(MAC, PEER_MAC, &payload(40, 3));
    let gso_tcpv4 = [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let needs_csum = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    host.send(&with_hdr(gso_tcpv4, &small)).unwrap();
    host.send(&with_hdr(needs_csum, &small)).unwrap();
    wait_stats(&dev, "bad backend frames dropped", |s| s.rx_dropped == 5);
    g.expect_no_rx(Duration::from_millis(30));

    // The buffer was kept for a frame that fits.
    host.send(&with_hdr([0; VNET_HDR_LEN], &small)).unwrap();
    let got = g.wait_rx_used(1);
    assert_eq!(got[0].0, with_hdr(RX_HDR, &small));
    let s = dev.stats();
    assert_eq!((s.rx_frames, s.rx_dropped, s.rx_bad_chains), (1, 5, 0));
}

#[test]
fn no_rx_buffers_parks_the_backend_without_spinning() {
    let (mut dev, host) = sock_device();
    let mut g = Guest::start(&mut dev);
    let frames: Vec<Vec<u8>> = (0..5)
        .map(|i| frame(MAC, PEER_MAC, &payload(100 + i, i as u8)))
        .collect();
    for f in &frames {
        host.send(&with_hdr([0; VNET_HDR_LEN], f)).unwrap();
    }
    // The frames wait in the backend; a level-triggered worker that kept
    // the backend in its epoll set would wake continuously.
    std::thread::sleep(Duration::from_millis(300));
    let idle = dev.stats();
    assert!(
        idle.worker_wakeups <= 3,
        "worker woke {} times without RX buffers",
        idle.worker_wakeups
    );
    assert_eq!(idle.rx_frames, 0);

    // Buffers posted: every frame arrives, in order.
    g.add_rx(8);
    let got = g.wait_rx_used(5);
    for (f, (data, _)) in frames.iter().zip(&got) {
        assert_eq!(data, &with_hdr(RX_HDR, f));
    }
    // Quiet again afterwards.
    let before = dev.stats().worker_wakeups;
    std::thread::sleep(Duration::from_millis(200));
    assert!(dev.stats().worker_wakeups <= before + 1);

    // Buffers run out again in the middle of a burst.
    for f in &frames {
        host.send(&with_hdr([0; VNET_HDR_LEN], f)).unwrap();
    }
    let got = g.wait_rx_used(3);
    assert_eq!(got.len(), 3);
    std::thread::sleep(Duration::from_millis(200));
    let parked = dev.stats().worker_wakeups;
    std::thread::sleep(Duration::from_millis(200));
    assert!(dev.stats().worker_wakeups <= parked + 1);
    g.add_rx(2);
    let got = g.wait_rx_used(2);
    assert_eq!(got[0].0, with_hdr(RX_HDR, &frames[3]));
    assert_eq!(got[1].0, with_hdr(RX_HDR, &frames[4]));
}

#[test]
fn reset_keeps_the_backend_for_the_next_activation() {
    let (mut dev, host) = sock_device();
    let mut g = Guest::start(&mut dev);
    let f = frame(PEER_MAC, MAC, &payload(80, 1));
    g.send(&f);
    assert_eq!(host_recv(&host), with_hdr([0; VNET_HDR_LEN], &f));

    assert!(dev.reset());
    assert!(!dev.is_active());
    // Nothing is read while inactive; the frame waits in the backend.
    let f2 = frame(MAC, PEER_MAC, &payload(90, 2));
    host.send(&with_hdr([0; VNET_HDR_LEN], &f2)).unwrap();

    let mut g = Guest::start(&mut dev);
    assert!(dev.is_active());
    g.add_rx(2);
    let got = g.wait_rx_used(1);
    assert_eq!(got[0].0, with_hdr(RX_HDR, &f2));
    g.send(&f);
    assert_eq!(host_recv(&host), with_hdr([0; VNET_HDR_LEN], &f));
}

#[test]
fn shutdown_joins_the_worker_and_closes_the_backend() {
    let (mut dev, host, dropped) = sock_device_flagged();
    let mut g = Guest::start(&mut dev);
    g.add_rx(2);
    assert!(!dropped.load(Ordering::SeqCst));
    dev.shutdown();
    assert!(!dev.is_active());
    // The worker gave the backend back when it ended (the thread was
    // joined) and shutdown closed it.
    assert!(dropped.load(Ordering::SeqCst));
    host.send(&with_hdr([0; VNET_HDR_LEN], &frame(MAC, PEER_MAC, &[])))
        .ok();
    dev.shutdown();
    assert!(!dev.reset());
    let err = dev
        .activate(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
            CountingInterrupt::new(),
            vec![Queue::new(16).unwrap(), Queue::new(16).unwrap()],
            vec![
                EventFd::new(EFD_NONBLOCK).unwrap(),
                EventFd::new(EFD_NONBLOCK).unwrap(),
            ],
        )
        .unwrap_err();
    assert!(matches!(err, ActivateError::Backend(_)), "{err}");
    g.expect_no_rx(Duration::from_millis(20));
}

#[test]
fn drop_stops_the_worker() {
    let (mut dev, _host, dropped) = sock_device_flagged();
    let _g = Guest::start(&mut dev);
    drop(dev);
    assert!(dropped.load(Ordering::SeqCst));
}

// ---------------------------------------------------------------------------
// Network namespaces and real taps.

/// A fresh network namespace, held by an open namespace file; None (the
/// caller skips) where this process may not create one.
fn new_netns() -> Option<File> {
    std::thread::spawn(|| {
        // SAFETY: unshare moves only this throwaway thread.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "SKIPPED: cannot create a network namespace: {}",
                io::Error::last_os_error()
            );
            return None;
        }
        Some(File::open("/proc/thread-self/ns/net").unwrap())
    })
    .join()
    .unwrap()
}

fn ns_path(ns: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", ns.as_raw_fd()))
}

fn can_use_taps() -> bool {
    if Path::new("/dev/net/tun").exists() {
        true
    } else {
        eprintln!("SKIPPED: no /dev/net/tun");
        false
    }
}

fn if_index(name: &str) -> u32 {
    let c = CString::new(name).unwrap();
    // SAFETY: `c` is a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

fn netns_inode(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

/// An AF_PACKET socket on one interface, for our EtherType only.
struct PacketSock(OwnedFd);

impl PacketSock {
    /// Opens it in the calling thread's namespace (use through in_netns).
    fn open(ifname: &str) -> io::Result<PacketSock> {
        let proto = ETHERTYPE.to_be();
        // SAFETY: plain socket creation; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let index = if_index(ifname);
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        // SAFETY: `sll` is a valid sockaddr_ll of the given length.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PacketSock(fd))
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: the kernel reads `frame.len()` bytes from `frame`.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "{}", io::Error::last_os_error());
    }

    /// The next frame the interface received, within `d`.
    fn recv(&self, d: Duration) -> Option<Vec<u8>> {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, d.as_millis() as i32) };
        if r <= 0 {
            return None;
        }
        let mut buf = vec![0u8; 65536];
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        assert!(n >= 0, "{}", io::Error::last_os_error());
        buf.truncate(n as usize);
        Some(buf)
    }
}

/// In the namespace: keeps IPv6 quiet on `ifname` (best effort), brings it
/// up and opens a packet socket on it.
fn bring_up(netns: &Path, ifname: &str) -> PacketSock {
    in_netns(netns, || {
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"),
            "1",
        );
        set_link_up(ifname)?;
        PacketSock::open(ifname)
    })
    .unwrap()
    .unwrap()
}

#[test]
fn in_netns_runs_the_closure_in_the_namespace_only() {
    let Some(ns) = new_netns() else { return };
    let path = ns_path(&ns);
    let target = ns.metadata().unwrap().ino();
    let own = netns_inode(Path::new("/proc/thread-self/ns/net"));
    assert_ne!(target, own);

    // Borrowing from the caller works (scoped thread).
    let label = String::from("inside");
    let (inode, l) = in_netns(&path, || {
        (
            netns_inode(Path::new("/proc/thread-self/ns/net")),
            label.clone(),
        )
    })
    .unwrap();
    assert_eq!(inode, target);
    assert_eq!(l, "inside");
    assert_eq!(netns_inode(Path::new("/proc/thread-self/ns/net")), own);

    // A panic comes back as an error.
    let err = in_netns(&path, || panic!("boom")).unwrap_err();
    assert!(err.to_string().contains("panicked"), "{err}");

    let err = in_netns(Path::new("/nonexistent/netns"), || ()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    // A namespace file of another type.
    let err = in_netns(Path::new("/proc/self/ns/uts"), || ()).unwrap_err();
    assert!(err.to_string().contains("setns"), "{err}");
}

#[test]
fn tap_in_a_netns_carries_frames_both_ways() {
    if !can_use_taps() {
        return;
    }
    let Some(ns) = new_netns() else { return };
    let path = ns_path(&ns);
    let mut dev = Net::open_tap_in_netns(&path, "embt0", MAC).unwrap();
    assert_eq!(dev.backend_name(), "embt0");
    // The interface lives in the pod namespace, not ours.
    assert_eq!(if_index("embt0"), 0);
    assert_ne!(in_netns(&path, || if_index("embt0")).unwrap(), 0);

    let mut g = Guest::start(&mut dev);
    g.add_rx(16);

    // Link still down: the tap refuses the frame; it is counted and the
    // chain returned.
    let early = frame(BROADCAST, MAC, &payload(50, 1));
    g.send(&early);
    assert_eq!(g.wait_tx_used(1), vec![0]);
    wait_stats(&dev, "TX on a down tap dropped", |s| s.tx_dropped == 1);

    let sock = bring_up(&path, "embt0");

    // Guest -> tap: the interface receives exactly the guest's frame.
    for (i, n) in [46usize, 1000, 1500].into_iter().enumerate() {
        let f = frame(BROADCAST, MAC, &payload(n, i as u8));
        g.send(&f);
        assert_eq!(sock.recv(WAIT).expect("frame on the tap"), f);
    }

    // Tap -> guest: a frame sent out of the interface reaches the guest
    // with the plain header.
    for (i, n) in [46usize, 700, 1500].into_iter().enumerate() {
        let f = frame(MAC, PEER_MAC, &payload(n, 10 + i as u8));
        sock.send(&f);
        let (hdr, got) = g.recv();
        assert_eq!(hdr, RX_HDR);
        assert_eq!(got, f);
    }
    let s = dev.stats();
    assert_eq!((s.tx_frames, s.tx_dropped, s.tx_bad_chains), (3, 1, 0));
    assert!(s.rx_frames >= 3);

    // The tap is ours: closing the device deletes it (soon: a process
    // forked meanwhile by another test may hold the descriptor briefly).
    drop(dev);
    let deadline = Instant::now() + WAIT;
    while in_netns(&path, || if_index("embt0")).unwrap() != 0 {
        assert!(Instant::now() < deadline, "tap still there");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn tap_bursts_both_ways() {
    if !can_use_taps() {
        return;
    }
    let Some(ns) = new_netns() else { return };
    let path = ns_path(&ns);
    let mut dev = Net::open_tap_in_netns(&path, "embt3", MAC).unwrap();
    let sock = bring_up(&path, "embt3");
    let mut g = Guest::start(&mut dev);
    g.add_rx(48);
    const N: usize = 300;
    // Guest -> tap, more frames than the queue has descriptors, read in
    // batches so the packet socket's buffer does not overflow.
    for batch in 0..N / 30 {
        let sent: Vec<Vec<u8>> = (0..30)
            .map(|i| frame(BROADCAST, MAC, &payload(1000, (batch * 30 + i) as u8)))
            .collect();
        for f in &sent {
            g.send(f);
        }
        for f in &sent {
            assert_eq!(&sock.recv(WAIT).expect("frame on the tap"), f);
        }
    }
    // Tap -> guest, likewise.
    for batch in 0..N / 30 {
        let sent: Vec<Vec<u8>> = (0..30)
            .map(|i| frame(MAC, PEER_MAC, &payload(1200, (batch * 30 + i) as u8)))
            .collect();
        for f in &sent {
            sock.send(f);
        }
        for f in &sent {
            let (_, got) = g.recv();
            assert_eq!(&got, f);
        }
    }
    let s = dev.stats();
    assert_eq!(
        (s.tx_frames, s.tx_dropped, s.tx_bad_chains),
        (N as u64, 0, 0)
    );
    assert_eq!((s.rx_dropped, s.rx_bad_chains), (0, 0));
}

/// Creates a persistent tap `name` (plain IFF_TAP | IFF_NO_PI) in the
/// calling thread's namespace and closes it.
fn make_persistent_tap(name: &str) -> io::Result<()> {
    use super::tap::IfReq;
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq::new(name);
    req.flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq, which outlives the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETPERSIST takes its flag as the argument value.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn attaches_to_a_persistent_tap() {
    if !can_use_taps() {
        return;
    }
    let Some(ns) = new_netns() else { return };
    let path = ns_path(&ns);
    // As `ip tuntap add dev embp0 mode tap` would create it beforehand
    // (without IFF_VNET_HDR); done in-process, as forking here would hand
    // copies of other tests' descriptors to a child.
    in_netns(&path, || make_persistent_tap("embp0"))
        .unwrap()
        .unwrap();
    let mut dev = Net::open_tap_in_netns(&path, "embp0", MAC).unwrap();
    let sock = bring_up(&path, "embp0");
    let mut g = Guest::start(&mut dev);
    g.add_rx(4);
    let f = frame(BROADCAST, MAC, &payload(300, 1));
    g.send(&f);
    assert_eq!(sock.recv(WAIT).expect("frame on the tap"), f);
    let f = frame(MAC, PEER_MAC, &payload(300, 2));
    sock.send(&f);
    assert_eq!(g.recv().1, f);
    // Persistent: it outlives the device.
    drop(dev);
    assert_ne!(in_netns(&path, || if_index("embp0")).unwrap(), 0);
}

#[test]
fn tap_without_rx_buffers_does_not_spin() {
    if !can_use_taps() {
        return;
    }
    let Some(ns) = new_netns() else { return };
    let path = ns_path(&ns);
    let mut dev = Net::open_tap_in_netns(&path, "embt1", MAC).unwrap();
    let sock = bring_up(&path, "embt1");
    let mut g = Guest::start(&mut dev);
    let frames: Vec<Vec<u8>> = (0..20)
        .map(|i| frame(MAC, PEER_MAC, &payload(200, i)))
        .collect();
    for f in &frames {
        sock.send(f);
    }
    std::thread::sleep(Duration::from_millis(300));
    let w = dev.stats().worker_wakeups;
    assert!(w <= 3, "worker woke {w} times without RX buffers");

    g.add_rx(32);
    for f in &frames {
        let (_, got) = g.recv();
        assert_eq!(&got, f);
    }
}

#[test]
fn tap_open_errors() {
    for name in ["", "sixteen-chars-xx", "a/b", "a b", "a:1", ".", ".."] {
        let err = Tap::open(name).unwrap_err();
        assert!(
            matches!(err, NetError::InvalidTapName(_)),
            "{name:?}: {err}"
        );
        let err = Net::open_tap(name, MAC).unwrap_err();
        assert!(
            matches!(err, NetError::InvalidTapName(_)),
            "{name:?}: {err}"
        );
    }
    let err = Net::open_tap("embtx", [1, 0, 0, 0, 0, 1]).unwrap_err();
    assert!(matches!(err, NetError::InvalidMac(_)), "{err}");
    let err = Net::open_tap_in_netns(Path::new("/nonexistent/ns"), "embtx", MAC).unwrap_err();
    assert!(matches!(err, NetError::Netns { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/ns"), "{err}");

    if !can_use_taps() {
        return;
    }
    let Some(ns) = new_netns() else { return };
    let path = ns_path(&ns);
    let tap = Tap::open_in_netns(&path, "embt2").unwrap();
    assert_eq!(tap.if_name(), "embt2");
    // A non-multiqueue tap takes one file only.
    let err = Tap::open_in_netns(&path, "embt2").unwrap_err();
    match &err {
        NetError::Tap { source, .. } => {
            assert_eq!(source.raw_os_error(), Some(libc::EBUSY), "{err}")
        }
        other => panic!("{other}"),
    }
    // A name template: the kernel picks the number.
    let t = Tap::open_in_netns(&path, "embq%d").unwrap();
    assert_eq!(t.if_name(), "embq0");
    drop(tap);
}
