//! The muxer: owns the Unix listener, the host-side handshakes and every
//! connection; routes guest packets to connections and decides which packet
//! goes into the next guest RX buffer.
//!
//! Everything the guest can make us hold is bounded: at most
//! [`MAX_CONNECTIONS`] connections plus pending handshakes, at most
//! [`MAX_PENDING_RST`] RSTs for unknown connections (when that queue is full
//! the device stops reading the TX queue until the guest gives RX buffers),
//! and per connection a few flags plus a `tx_buf` bounded by the credit we
//! advertised.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::csm::{Connection, StreamEvent};
use super::packet::{Header, MAX_PKT_DATA, OP_REQUEST, OP_RST, TYPE_STREAM};
use super::unix::{connect_nonblocking, HostListener};
use super::{deadline, warn_rl, LogLimiter, VsockTimeouts, VSOCK_HOST_CID};

/// Epoll token of the listener; tokens below [`FIRST_DYNAMIC_TOKEN`] are
/// reserved for the device.
pub(crate) const TOKEN_LISTENER: u64 = 8;
const FIRST_DYNAMIC_TOKEN: u64 = 16;

/// Connections plus pending handshakes.
pub(crate) const MAX_CONNECTIONS: usize = 1024;
/// RSTs for unknown connections waiting for an RX buffer.
pub(crate) const MAX_PENDING_RST: usize = 256;
/// Longest `CONNECT <port>` line (without the newline) we accept.
const MAX_CONNECT_LINE: usize = 32;
/// Host-allocated local ports for host-initiated connections start here.
pub(crate) const HOST_PORT_FIRST: u32 = 1 << 30;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct ConnKey {
    local_port: u32,
    peer_port: u32,
}

#[derive(Debug)]
enum RxItem {
    Conn(ConnKey),
    Rst(Header),
}

#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

pub(crate) struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    timeouts: VsockTimeouts,
    epoll: Epoll,
    listener: HostListener,
    conns: HashMap<ConnKey, Connection>,
    handshakes: HashMap<u64, Handshake>,
    tokens: HashMap<u64, ConnKey>,
    next_token: u64,
    next_port: u32,
    rxq: VecDeque<RxItem>,
    pending_rst: usize,
    scratch: Vec<u8>,
    log: LogLimiter,
}

impl Muxer {
    /// Takes the listener and registers it in `epoll` (the device registers
    /// its own fds with tokens below 16).
    pub(crate) fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        timeouts: VsockTimeouts,
        epoll: Epoll,
        listener: HostListener,
    ) -> Result<Self, (io::Error, HostListener)> {
        if let Err(e) = epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TOKEN_LISTENER),
        ) {
            return Err((e, listener));
        }
        Ok(Self {
            guest_cid,
            uds_path,
            timeouts,
            epoll,
            listener,
            conns: HashMap::new(),
            handshakes: HashMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_DYNAMIC_TOKEN,
            next_port: HOST_PORT_FIRST,
            rxq: VecDeque::new(),
            pending_rst: 0,
            scratch: vec![0u8; MAX_PKT_DATA as usize],
            log: LogLimiter::new(),
        })
    }

    pub(crate) fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    /// Gives the listener back (connections are closed).
    pub(crate) fn into_listener(self) -> HostListener {
        self.listener
    }

    /// Whether the RX side can take what a TX packet may produce.
    pub(crate) fn can_accept_tx(&self) -> bool {
        self.pending_rst < MAX_PENDING_RST
    }

    pub(crate) fn has_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    /// Drops every connection (the hosts see EOF) and everything queued for
    /// the guest. Pending handshakes stay.
    pub(crate) fn reset_connections(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove_conn(key);
        }
        self.rxq.clear();
        self.pending_rst = 0;
    }

    fn alloc_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(FIRST_DYNAMIC_TOKEN);
        t
    }

    fn live(&self) -> usize {
        self.conns.len() + self.handshakes.len()
    }

    /// An epoll event for a token the muxer owns.
    pub(crate) fn handle_event(&mut self, token: u64, events: EventSet, now: Instant) {
        if token == TOKEN_LISTENER {
            self.accept_all(now);
        } else if self.handshakes.contains_key(&token) {
            self.read_handshake(token);
        } else if let Some(key) = self.tokens.get(&token).copied() {
            let ev = StreamEvent {
                readable: events.intersects(
                    EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
                ),
                writable: events.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP),
                hup: events.contains(EventSet::HANG_UP),
            };
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.on_stream_event(ev, now, &self.timeouts, &mut self.log);
            }
            self.after_update(key);
        }
        // Anything else is a stale event for a closed stream.
    }

    fn accept_all(&mut self, now: Instant) {
        loop {
            let stream = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn_rl!(self.log, "vsock: accept on the host socket failed: {e}");
                    return;
                }
            };
            if self.live() >= MAX_CONNECTIONS {
                warn_rl!(
                    self.log,
                    "vsock: too many connections, refusing a host connection"
                );
                continue;
            }
            let token = self.alloc_token();
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(
                    EventSet::IN | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED,
                    token,
                ),
            ) {
                warn_rl!(self.log, "vsock: cannot watch a host connection: {e}");
                continue;
            }
            self.handshakes.insert(
                token,
                Handshake {
                    stream,
                    line: Vec::with_capacity(MAX_CONNECT_LINE),
                    deadline: deadline(now, self.timeouts.connect_line),
                },
            );
            // Edge-triggered: read what is already there.
            self.read_handshake(token);
        }
    }

    /// Reads the `CONNECT <port>\n` line byte by byte, so nothing after the
    /// newline is consumed.
    fn read_handshake(&mut self, token: u64) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        let port = loop {
            let mut b = [0u8; 1];
            match (&hs.stream).read(&mut b) {
                Ok(0) => {
                    tracing::debug!("vsock: host client closed before CONNECT");
                    self.drop_handshake(token);
                    return;
                }
                Ok(_) => {
                    if b[0] == b'\n' {
                        match parse_connect(&hs.line) {
                            Some(port) => break port,
                            None => {
                                warn_rl!(
                                    self.log,
                                    line = %String::from_utf8_lossy(&hs.line),
                                    "vsock: malformed CONNECT line from a host client"
                                );
                                self.drop_handshake(token);
                                return;
                            }
                        }
                    }
                    if hs.line.len() >= MAX_CONNECT_LINE {
                        warn_rl!(self.log, "vsock: CONNECT line too long from a host client");
                        self.drop_handshake(token);
                        return;
                    }
                    hs.line.push(b[0]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::debug!("vsock: host client handshake failed: {e}");
                    self.drop_handshake(token);
                    return;
                }
            }
        };
        let Some(hs) = self.handshakes.remove(&token) else {
            return;
        };
        let Some(local_port) = self.alloc_port() else {
            warn_rl!(self.log, "vsock: no free host port");
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                hs.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            return;
        };
        // Same token; now also watch writability for the data phase.
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Modify,
            hs.stream.as_raw_fd(),
            EpollEvent::new(conn_events(), token),
        ) {
            warn_rl!(self.log, "vsock: cannot watch a host connection: {e}");
            return;
        }
        tracing::debug!(port, local_port, "vsock: host connection request");
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let conn = Connection::new_local(hs.stream, token, local_port, port, self.guest_cid);
        self.tokens.insert(token, key);
        self.conns.insert(key, conn);
        self.after_update(key);
    }

    fn drop_handshake(&mut self, token: u64) {
        if let Some(hs) = self.handshakes.remove(&token) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                hs.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// A local port unique among live connections, from 2^30 upwards.
    fn alloc_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_port;
            self.next_port = if p == u32::MAX {
                HOST_PORT_FIRST
            } else {
                p + 1
            };
            if !self.conns.keys().any(|k| k.local_port == p) {
                return Some(p);
            }
        }
        None
    }

    /// Re-schedules or removes a connection after anything happened to it.
    fn after_update(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.is_dead() {
            self.remove_conn(key);
        } else if conn.wants_rx() && !conn.in_rxq {
            conn.in_rxq = true;
            self.rxq.push_back(RxItem::Conn(key));
        }
    }

    fn remove_conn(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            self.tokens.remove(&conn.token);
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream().as_raw_fd(),
                EpollEvent::default(),
            );
            tracing::debug!(
                local = key.local_port,
                peer = key.peer_port,
                "vsock: connection closed"
            );
        }
    }

    fn queue_rst(&mut self, hdr: &Header) {
        if self.pending_rst >= MAX_PENDING_RST {
            warn_rl!(self.log, "vsock: too many pending resets, dropping one");
            return;
        }
        self.pending_rst += 1;
        self.rxq.push_back(RxItem::Rst(Header {
            src_cid: hdr.dst_cid,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }));
    }

    /// A packet from the guest's TX queue (`data` is its payload).
    pub(crate) fn on_guest_packet(&mut self, hdr: &Header, data: &[u8], now: Instant) {
        if hdr.src_cid != self.guest_cid {
            warn_rl!(
                self.log,
                src_cid = hdr.src_cid,
                "vsock: dropping a guest packet with a wrong source CID"
            );
            return;
        }
        if hdr.dst_cid != VSOCK_HOST_CID || hdr.type_ != TYPE_STREAM {
            warn_rl!(
                self.log,
                dst_cid = hdr.dst_cid,
                type_ = hdr.type_,
                "vsock: unsupported destination or socket type"
            );
            if hdr.op != OP_RST {
                self.queue_rst(hdr);
            }
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.on_guest(hdr, data, now, &self.timeouts, &mut self.log);
            self.after_update(key);
            return;
        }
        match hdr.op {
            OP_REQUEST => self.guest_connect(hdr),
            OP_RST => {}
            op => {
                tracing::debug!(
                    op,
                    local = key.local_port,
                    peer = key.peer_port,
                    "vsock: packet for an unknown connection"
                );
                self.queue_rst(hdr);
            }
        }
    }

    /// The guest connects to host port `hdr.dst_port`: connect to
    /// `<uds_path>_<port>`.
    fn guest_connect(&mut self, hdr: &Header) {
        if self.live() >= MAX_CONNECTIONS {
            warn_rl!(
                self.log,
                "vsock: too many connections, refusing a guest connection"
            );
            self.queue_rst(hdr);
            return;
        }
        let mut path: OsString = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        let path = PathBuf::from(path);
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(
                    path = %path.display(),
                    "vsock: guest connection refused: {e}"
                );
                self.queue_rst(hdr);
                return;
            }
        };
        let token = self.alloc_token();
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(conn_events(), token),
        ) {
            warn_rl!(self.log, "vsock: cannot watch a host connection: {e}");
            self.queue_rst(hdr);
            return;
        }
        tracing::debug!(
            port = hdr.dst_port,
            guest_port = hdr.src_port,
            "vsock: guest connected to the host"
        );
        let conn = Connection::new_peer(stream, token, hdr, self.guest_cid);
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        self.tokens.insert(token, key);
        self.conns.insert(key, conn);
        self.after_update(key);
    }

    /// The next packet for a guest RX buffer with room for `cap` (> 0)
    /// payload bytes, or None when nothing is ready.
    pub(crate) fn fill_rx(&mut self, cap: usize, now: Instant) -> Option<(Header, &[u8])> {
        while let Some(item) = self.rxq.pop_front() {
            match item {
                RxItem::Rst(hdr) => {
                    self.pending_rst = self.pending_rst.saturating_sub(1);
                    return Some((hdr, &[]));
                }
                RxItem::Conn(key) => {
                    let Some(conn) = self.conns.get_mut(&key) else {
                        continue;
                    };
                    conn.in_rxq = false;
                    let out =
                        conn.fill_rx(cap, &mut self.scratch, now, &self.timeouts, &mut self.log);
                    if conn.is_dead() {
                        self.remove_conn(key);
                    } else if out.is_some() && conn.wants_rx() {
                        conn.in_rxq = true;
                        self.rxq.push_back(RxItem::Conn(key));
                    }
                    if let Some(hdr) = out {
                        let len = (hdr.len as usize).min(self.scratch.len());
                        return Some((hdr, &self.scratch[..len]));
                    }
                }
            }
        }
        None
    }

    /// Writing a packet into guest memory failed after it was produced:
    /// the connection's byte stream is broken, reset it.
    pub(crate) fn rx_write_failed(&mut self, hdr: &Header) {
        let key = ConnKey {
            local_port: hdr.src_port,
            peer_port: hdr.dst_port,
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.kill();
        }
        self.after_update(key);
    }

    /// Called when a guest packet (credit update, ...) may have unblocked
    /// connections, and after timeouts.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let hs = self.handshakes.values().map(|h| h.deadline).min();
        let cs = self.conns.values().filter_map(|c| c.expiry()).min();
        match (hs, cs) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub(crate) fn process_timeouts(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in expired {
            warn_rl!(self.log, "vsock: host client did not send CONNECT in time");
            self.drop_handshake(token);
        }
        let due: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.expiry().is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.check_expiry(now, &mut self.log);
            }
            self.after_update(key);
        }
    }
}

fn conn_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

/// Parses `CONNECT <port>` (an optional trailing `\r` is tolerated).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(b"CONNECT ")?;
    if rest.is_empty() || !rest.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(rest).ok()?.parse().ok()
}

#[cfg(test)]
mod unit {
    use super::parse_connect;

    #[test]
    fn connect_line() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"CONNECT "), None);
        assert_eq!(parse_connect(b"connect 5"), None);
        assert_eq!(parse_connect(b"CONNECT 5 6"), None);
    }
}
