//! A synchronous handle on the vsock [`Muxer`] for the fuzz targets
//! (feature `fuzzing`): the device worker drives the muxer from its epoll
//! loop on its own thread; this runs the same calls in the caller's thread,
//! so a fuzz input maps to one deterministic sequence of guest packets,
//! host socket events, timeouts and RX fills.

use std::path::PathBuf;
use std::time::Instant;

use vmm_sys_util::epoll::{Epoll, EpollEvent, EventSet};

use super::muxer::Muxer;
use super::packet::Header;
use super::unix::HostListener;
use super::{VsockError, VsockTimeouts};

/// The muxer of one device, with its host listener bound at `uds_path`.
pub struct MuxerHarness {
    muxer: Muxer,
    events: Vec<EpollEvent>,
}

impl MuxerHarness {
    /// Binds the listener at `uds_path` (a guest connecting to host port
    /// `P` reaches `<uds_path>_P`) and builds the muxer.
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        timeouts: VsockTimeouts,
    ) -> Result<Self, VsockError> {
        let listener = HostListener::bind(&uds_path)?;
        let epoll = Epoll::new().map_err(VsockError::Setup)?;
        let muxer = Muxer::new(guest_cid, uds_path, timeouts, epoll, listener)
            .map_err(|(e, _)| VsockError::Setup(e))?;
        Ok(Self {
            muxer,
            events: vec![EpollEvent::default(); 64],
        })
    }

    /// A packet from the guest's TX queue, as the worker passes it.
    pub fn guest_packet(&mut self, hdr: &Header, data: &[u8], now: Instant) {
        if self.muxer.can_accept_tx() {
            self.muxer.on_guest_packet(hdr, data, now);
        }
    }

    /// Handles the host socket events that are ready now (no waiting).
    pub fn poll_host(&mut self, now: Instant) {
        let n = self.muxer.epoll().wait(0, &mut self.events).unwrap_or(0);
        let ready: Vec<(u64, u32)> = self
            .events
            .iter()
            .take(n)
            .map(|e| (e.data(), e.events()))
            .collect();
        for (token, events) in ready {
            self.muxer
                .handle_event(token, EventSet::from_bits_truncate(events), now);
        }
    }

    /// Expires what is due at `now`.
    pub fn timeouts(&mut self, now: Instant) {
        self.muxer.process_timeouts(now);
    }

    /// Fills one guest RX buffer of `cap` payload bytes, as the worker
    /// does; returns the header and payload the guest would receive.
    pub fn fill_rx(&mut self, cap: usize, now: Instant) -> Option<(Header, Vec<u8>)> {
        if !self.muxer.has_rx() {
            return None;
        }
        self.muxer
            .fill_rx(cap, now)
            .map(|(hdr, data)| (hdr, data.to_vec()))
    }

    /// Writing a filled packet to guest memory failed.
    pub fn rx_write_failed(&mut self, hdr: &Header) {
        self.muxer.rx_write_failed(hdr);
    }

    /// A transport reset (snapshot restore).
    pub fn reset_connections(&mut self) {
        self.muxer.reset_connections();
    }

    /// The muxer's next deadline, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.muxer.next_deadline()
    }
}
