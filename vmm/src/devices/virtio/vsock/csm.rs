//! Connection state machine: one host Unix stream <-> one guest stream
//! socket, with virtio-vsock credit accounting (virtio spec 5.10.6.3).
//!
//! Terms (from the device's side):
//! - guest -> host: bytes of RW packets are appended to `tx_buf` and written
//!   to the Unix stream. `recv_cnt` counts bytes received from the guest,
//!   `fwd_cnt` those written to the host; we advertise `buf_alloc =
//!   BUF_ALLOC`, so the guest may have at most `BUF_ALLOC` bytes in flight
//!   and `tx_buf` stays bounded. A guest that sends more has violated the
//!   protocol and is reset.
//! - host -> guest: we read from the Unix stream only as much as the guest
//!   has credit for (`peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`) and as fits
//!   the RX buffer at hand, straight into one packet: nothing is buffered on
//!   this side.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::packet::{
    Header, MAX_PKT_DATA, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST,
    OP_RW, OP_SHUTDOWN, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::unix::{is_hung_up, send_nosignal};
use super::{deadline, warn_rl, LogLimiter, VsockTimeouts, VSOCK_HOST_CID};

/// Receive buffer we advertise to the guest (`buf_alloc`), per connection.
pub(crate) const BUF_ALLOC: u32 = 256 * 1024;

/// Tell the guest about freed space once its view of our free space drops
/// below this.
const CREDIT_UPDATE_THRESHOLD: u32 = MAX_PKT_DATA;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest.
    LocalInit,
    Established,
    /// An RST is owed to the guest; the connection goes once it is sent.
    Killing,
    /// Finished; the muxer drops it (which closes the Unix stream).
    Dead,
}

/// What the stream's epoll event said.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct StreamEvent {
    pub readable: bool,
    pub writable: bool,
    /// The host closed both directions.
    pub hup: bool,
}

#[derive(Debug)]
pub(crate) struct Connection {
    stream: UnixStream,
    pub(crate) token: u64,
    pub(crate) local_port: u32,
    pub(crate) peer_port: u32,
    guest_cid: u64,
    state: State,
    /// Whether the guest has seen this connection (any packet sent).
    announced: bool,

    // Control packets owed to the guest.
    pend_request: bool,
    pend_response: bool,
    pend_credit_update: bool,
    /// Flags of a SHUTDOWN owed to the guest (0: none).
    pend_shutdown: u32,
    /// SHUTDOWN flags already sent to the guest.
    sent_shutdown: u32,

    // Host -> guest.
    readable: bool,
    host_eof: bool,
    host_hup: bool,
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,

    // Guest -> host.
    tx_buf: VecDeque<u8>,
    /// Leading bytes of `tx_buf` that are ours (the `OK` line), not guest
    /// data: they do not count in `fwd_cnt`.
    ctrl_prefix: usize,
    recv_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    host_write_shut: bool,

    /// LocalInit: deadline for the guest's RESPONSE. Established: deadline
    /// for the guest's RST after our SHUTDOWN, or for draining `tx_buf`
    /// after the guest's SHUTDOWN.
    expiry: Option<Instant>,
    /// Queued in the muxer's RX schedule.
    pub(crate) in_rxq: bool,
}

impl Connection {
    fn new(stream: UnixStream, token: u64, local_port: u32, peer_port: u32, cid: u64) -> Self {
        Self {
            stream,
            token,
            local_port,
            peer_port,
            guest_cid: cid,
            state: State::LocalInit,
            announced: false,
            pend_request: false,
            pend_response: false,
            pend_credit_update: false,
            pend_shutdown: 0,
            sent_shutdown: 0,
            readable: true,
            host_eof: false,
            host_hup: false,
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_buf: VecDeque::new(),
            ctrl_prefix: 0,
            recv_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_shutdown: 0,
            host_write_shut: false,
            expiry: None,
            in_rxq: false,
        }
    }

    /// A host-initiated connection (after `CONNECT <peer_port>`): a REQUEST
    /// is owed to the guest.
    pub(crate) fn new_local(
        stream: UnixStream,
        token: u64,
        local_port: u32,
        peer_port: u32,
        cid: u64,
    ) -> Self {
        let mut c = Self::new(stream, token, local_port, peer_port, cid);
        c.pend_request = true;
        c
    }

    /// A guest-initiated connection whose host side connected: a RESPONSE is
    /// owed to the guest, which is sent before any data.
    pub(crate) fn new_peer(stream: UnixStream, token: u64, hdr: &Header, cid: u64) -> Self {
        let mut c = Self::new(stream, token, hdr.dst_port, hdr.src_port, cid);
        c.state = State::Established;
        c.announced = true;
        c.pend_response = true;
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        c
    }

    pub(crate) fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.state == State::Dead
    }

    pub(crate) fn expiry(&self) -> Option<Instant> {
        match self.state {
            State::LocalInit | State::Established => self.expiry,
            State::Killing | State::Dead => None,
        }
    }

    /// Free space the guest told us it has for our data.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && !self.pend_response
            && self.readable
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// Whether the connection has a packet for the guest.
    pub(crate) fn wants_rx(&self) -> bool {
        match self.state {
            State::Killing => true,
            State::Dead => false,
            State::LocalInit => self.pend_request,
            State::Established => {
                self.pend_response
                    || self.pend_shutdown != 0
                    || self.pend_credit_update
                    || self.can_send_data()
            }
        }
    }

    /// Ends the connection with an RST to the guest (if the guest knows of
    /// it), closing the host stream.
    pub(crate) fn kill(&mut self) {
        // The host sees EOF now, even if the RST waits for an RX buffer.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.state = if self.announced {
            State::Killing
        } else {
            State::Dead
        };
    }

    /// A packet from the guest for this connection.
    pub(crate) fn on_guest(
        &mut self,
        hdr: &Header,
        data: &[u8],
        now: Instant,
        t: &VsockTimeouts,
        log: &mut LogLimiter,
    ) {
        if matches!(self.state, State::Killing | State::Dead) {
            return;
        }
        // Every packet carries the sender's credit.
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);

        if hdr.op == OP_RST {
            tracing::debug!(
                local = self.local_port,
                peer = self.peer_port,
                "vsock: guest reset the connection"
            );
            self.state = State::Dead;
            return;
        }

        if self.state == State::LocalInit {
            if hdr.op == OP_RESPONSE && !self.pend_request {
                self.state = State::Established;
                self.expiry = None;
                let line = format!("OK {}\n", self.local_port);
                self.ctrl_prefix = line.len();
                self.tx_buf.extend(line.as_bytes());
                self.flush(log);
                self.reevaluate(now, t);
            } else {
                warn_rl!(
                    log,
                    op = hdr.op,
                    local = self.local_port,
                    peer = self.peer_port,
                    "vsock: unexpected packet while connecting, resetting"
                );
                self.kill();
            }
            return;
        }

        // Established.
        match hdr.op {
            OP_RW => self.on_guest_data(data, now, t, log),
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.pend_credit_update = true,
            OP_SHUTDOWN => {
                self.peer_shutdown |= hdr.flags & SHUTDOWN_BOTH;
                self.reevaluate(now, t);
            }
            op => {
                warn_rl!(
                    log,
                    op,
                    local = self.local_port,
                    peer = self.peer_port,
                    "vsock: unexpected op on an established connection, resetting"
                );
                self.kill();
            }
        }
    }

    fn on_guest_data(
        &mut self,
        data: &[u8],
        now: Instant,
        t: &VsockTimeouts,
        log: &mut LogLimiter,
    ) {
        if data.is_empty() {
            return;
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 || self.pend_response {
            warn_rl!(
                log,
                local = self.local_port,
                peer = self.peer_port,
                "vsock: guest sent data it may not send, resetting"
            );
            self.kill();
            return;
        }
        let in_flight = u64::from((self.recv_cnt - self.fwd_cnt).0);
        if in_flight + data.len() as u64 > u64::from(BUF_ALLOC) {
            warn_rl!(
                log,
                local = self.local_port,
                peer = self.peer_port,
                in_flight,
                len = data.len(),
                "vsock: guest exceeded the credit we gave it, resetting"
            );
            self.kill();
            return;
        }
        // `data.len()` is at most MAX_PKT_DATA, so it fits in u32.
        self.recv_cnt += Wrapping(data.len() as u32);
        self.tx_buf.extend(data);
        self.flush(log);
        self.reevaluate(now, t);
    }

    /// Writes as much of `tx_buf` to the host as it takes now.
    fn flush(&mut self, log: &mut LogLimiter) {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match send_nosignal(&self.stream, front) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    let ctrl = n.min(self.ctrl_prefix);
                    self.ctrl_prefix -= ctrl;
                    // n - ctrl <= front.len() <= BUF_ALLOC + a short line.
                    self.fwd_cnt += Wrapping((n - ctrl) as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn_rl!(
                        log,
                        local = self.local_port,
                        peer = self.peer_port,
                        "vsock: host peer went away ({e}), resetting"
                    );
                    self.kill();
                    return;
                }
            }
        }
        let guest_view_used = (self.recv_cnt - self.last_fwd_cnt_sent).0;
        let guest_view_free = BUF_ALLOC.saturating_sub(guest_view_used);
        if self.fwd_cnt != self.last_fwd_cnt_sent && guest_view_free < CREDIT_UPDATE_THRESHOLD {
            self.pend_credit_update = true;
        }
    }

    /// Applies the shutdown rules after any change.
    fn reevaluate(&mut self, now: Instant, t: &VsockTimeouts) {
        if self.state != State::Established {
            return;
        }
        // Guest -> host direction.
        if self.tx_buf.is_empty() {
            if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
                // The host may already be gone; nothing to do about it then.
                let _ = self.stream.shutdown(std::net::Shutdown::Write);
                self.host_write_shut = true;
            }
            if self.peer_shutdown == SHUTDOWN_BOTH {
                // The guest closed: everything it sent is delivered, answer
                // with RST (virtio spec: the receiver of a full SHUTDOWN
                // sends RST when done).
                self.kill();
                return;
            }
        } else if self.peer_shutdown == SHUTDOWN_BOTH && self.expiry.is_none() {
            self.expiry = Some(deadline(now, t.shutdown));
        }
        // Host -> guest direction.
        let host_done = self.host_eof || (self.host_hup && self.peer_shutdown & SHUTDOWN_RCV != 0);
        if host_done {
            let want = if self.host_hup {
                SHUTDOWN_BOTH
            } else {
                SHUTDOWN_SEND
            };
            if want & !self.sent_shutdown != 0 {
                self.pend_shutdown = want;
            }
        }
    }

    /// An epoll event on the host stream.
    pub(crate) fn on_stream_event(
        &mut self,
        ev: StreamEvent,
        now: Instant,
        t: &VsockTimeouts,
        log: &mut LogLimiter,
    ) {
        self.readable |= ev.readable;
        self.host_hup |= ev.hup;
        match self.state {
            State::LocalInit => {
                if ev.hup {
                    tracing::debug!(
                        local = self.local_port,
                        peer = self.peer_port,
                        "vsock: host client left before the guest answered"
                    );
                    self.kill();
                }
            }
            State::Established => {
                if ev.writable && !self.tx_buf.is_empty() {
                    self.flush(log);
                }
                self.reevaluate(now, t);
            }
            State::Killing | State::Dead => {}
        }
    }

    /// The deadline passed?
    pub(crate) fn check_expiry(&mut self, now: Instant, log: &mut LogLimiter) {
        let Some(deadline) = self.expiry() else {
            return;
        };
        if now < deadline {
            return;
        }
        if self.state == State::LocalInit {
            warn_rl!(
                log,
                local = self.local_port,
                peer = self.peer_port,
                "vsock: guest did not answer a connection request in time"
            );
        } else {
            tracing::debug!(
                local = self.local_port,
                peer = self.peer_port,
                "vsock: shutdown timed out, resetting"
            );
        }
        self.kill();
    }

    /// A guest RX buffer of `cap` (> 0) payload bytes is available: produce
    /// the next packet for the guest, payload in `buf[..hdr.len]`.
    pub(crate) fn fill_rx(
        &mut self,
        cap: usize,
        buf: &mut [u8],
        now: Instant,
        t: &VsockTimeouts,
        log: &mut LogLimiter,
    ) -> Option<Header> {
        let hdr = match self.state {
            State::Dead => return None,
            State::Killing => {
                self.state = State::Dead;
                Some(self.header(OP_RST, 0, 0))
            }
            State::LocalInit => {
                if self.pend_request {
                    self.pend_request = false;
                    self.announced = true;
                    self.expiry = Some(deadline(now, t.guest_response));
                    Some(self.header(OP_REQUEST, 0, 0))
                } else {
                    None
                }
            }
            State::Established => self.fill_established(cap, buf, now, t, log),
        };
        if let Some(h) = &hdr {
            self.last_fwd_cnt_sent = Wrapping(h.fwd_cnt);
            self.pend_credit_update = false;
        }
        hdr
    }

    fn fill_established(
        &mut self,
        cap: usize,
        buf: &mut [u8],
        now: Instant,
        t: &VsockTimeouts,
        log: &mut LogLimiter,
    ) -> Option<Header> {
        if self.pend_response {
            self.pend_response = false;
            return Some(self.header(OP_RESPONSE, 0, 0));
        }
        if self.can_send_data() {
            let max = cap
                .min(buf.len())
                .min(self.peer_credit() as usize)
                .min(MAX_PKT_DATA as usize);
            if max > 0 {
                loop {
                    match (&self.stream).read(&mut buf[..max]) {
                        Ok(0) => {
                            self.host_eof = true;
                            self.readable = false;
                            // Half or full close? The epoll event telling
                            // may not have been processed yet.
                            self.host_hup |= is_hung_up(&self.stream);
                            self.reevaluate(now, t);
                            break;
                        }
                        Ok(n) => {
                            // n <= MAX_PKT_DATA.
                            self.rx_cnt += Wrapping(n as u32);
                            return Some(self.header(OP_RW, 0, n as u32));
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.readable = false;
                            break;
                        }
                        Err(e) => {
                            warn_rl!(
                                log,
                                local = self.local_port,
                                peer = self.peer_port,
                                "vsock: reading from the host peer failed ({e}), resetting"
                            );
                            self.state = State::Dead;
                            return Some(self.header(OP_RST, 0, 0));
                        }
                    }
                }
            }
        }
        if self.state == State::Killing {
            self.state = State::Dead;
            return Some(self.header(OP_RST, 0, 0));
        }
        if self.pend_shutdown != 0 {
            let flags = self.pend_shutdown;
            self.pend_shutdown = 0;
            self.sent_shutdown |= flags;
            if flags == SHUTDOWN_BOTH {
                // The guest should answer with RST; if not, we send one.
                self.expiry = Some(deadline(now, t.shutdown));
            }
            return Some(self.header(OP_SHUTDOWN, flags, 0));
        }
        if self.pend_credit_update {
            return Some(self.header(OP_CREDIT_UPDATE, 0, 0));
        }
        None
    }

    fn header(&self, op: u16, flags: u32, len: u32) -> Header {
        Header {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }
}
