//! A fake tap for the virtio-net targets: frames to hand the device come
//! from the fuzz input, frames the device sends are checked against what
//! the host side relies on (a whole Ethernet frame behind an all-zero vnet
//! header: no offload metadata from the guest ever reaches the tap).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ember_vmm::fuzzing::net::{NetBackend, MAX_FRAME_LEN, MIN_FRAME_LEN, VNET_HDR_LEN};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub struct FakeTap {
    /// Frames (vnet header included) the device will read.
    pub frames: VecDeque<Vec<u8>>,
    /// Frames the device wrote.
    pub sent: Arc<AtomicUsize>,
    evt: EventFd,
}

impl FakeTap {
    pub fn new(frames: VecDeque<Vec<u8>>) -> Self {
        Self {
            frames,
            sent: Arc::new(AtomicUsize::new(0)),
            evt: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        }
    }
}

impl NetBackend for FakeTap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(frame) = self.frames.pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        // Like a tap read into a short buffer: the full length.
        Ok(frame.len())
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        assert!(
            frame.len() >= VNET_HDR_LEN + MIN_FRAME_LEN,
            "runt frame of {} bytes sent to the tap",
            frame.len()
        );
        assert!(
            frame.len() <= VNET_HDR_LEN + MAX_FRAME_LEN,
            "{}-byte frame sent to the tap",
            frame.len()
        );
        assert!(
            frame[..VNET_HDR_LEN].iter().all(|&b| b == 0),
            "guest vnet header reached the tap: {:?}",
            &frame[..VNET_HDR_LEN]
        );
        self.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }

    fn name(&self) -> &str {
        "fake-tap"
    }
}
