//! FAKES THE GUEST'S SIDE OF A SPLIT VIRTQUEUE for device unit tests: a
//! [`DriverQueue`] lays out one queue in guest memory, writes descriptor
//! chains, makes them available and reads the used ring, as a guest driver
//! would, while the device under test runs for real on its worker thread.
//!
//! The descriptor table is written through `MockSplitQueue`, but the
//! available and used rings are placed and accessed here: the mock's own
//! layout (virtio-queue 0.17) puts the used ring right after the first
//! `len` *bytes* of the available ring, so the two overlap once more than
//! half the queue has been made available.

use std::collections::HashMap;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::GuestMemoryMmap;

pub(crate) const F_NEXT: u16 = 1;
pub(crate) const F_WRITE: u16 = 2;
/// The size of every test queue.
pub(crate) const QSIZE: u16 = 64;

/// Where a descriptor of a hand-made chain points next.
#[derive(Clone, Copy)]
pub(crate) enum Next {
    /// The next descriptor of the list (or none for the last one).
    Follow,
    /// No NEXT flag.
    End,
    /// NEXT to the descriptor at this position of the list (loops).
    To(usize),
    /// NEXT to this raw table index.
    Raw(u16),
}

/// One descriptor of a hand-made chain: (explicit address or the slot's
/// buffer, len, flags without NEXT, where it points next).
pub(crate) type Part = (Option<u64>, u32, u16, Next);

/// A chain the device returned.
#[derive(Debug)]
pub(crate) struct UsedChain {
    /// Its descriptor indices (empty if the device returned an id that was
    /// not a published head).
    pub descs: Vec<u16>,
    /// (addr, len) of each descriptor.
    pub segs: Vec<(u64, u32)>,
    /// The used length the device reported.
    pub len: u32,
}

/// Descriptor indices and (addr, len) of each descriptor of a chain.
type ChainInfo = (Vec<u16>, Vec<(u64, u32)>);

/// One virtqueue seen from the driver; descriptor `i` owns the buffer at
/// `buf_base + i * slot`.
pub(crate) struct DriverQueue {
    q: MockSplitQueue<'static, GuestMemoryMmap>,
    mem: &'static GuestMemoryMmap,
    avail_addr: u64,
    used_addr: u64,
    buf_base: u64,
    slot: u64,
    free: Vec<u16>,
    /// head -> (descriptor indices, (addr, len) of each descriptor)
    chains: HashMap<u16, ChainInfo>,
    last_used: u16,
}

impl DriverQueue {
    pub(crate) fn new(mem: &'static GuestMemoryMmap, addr: u64, buf_base: u64, slot: u64) -> Self {
        let q = MockSplitQueue::create(mem, GuestAddress(addr), QSIZE);
        let avail_addr = addr + 16 * u64::from(QSIZE);
        let used_addr = avail_addr + 0x400;
        Self {
            q,
            mem,
            avail_addr,
            used_addr,
            buf_base,
            slot,
            free: (0..QSIZE).rev().collect(),
            chains: HashMap::new(),
            last_used: 0,
        }
    }

    /// How many descriptors are free.
    pub(crate) fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// The buffer of descriptor `desc`.
    pub(crate) fn buf(&self, desc: u16) -> u64 {
        self.buf_base + u64::from(desc) * self.slot
    }

    /// The queue as the transport hands it to the device.
    pub(crate) fn queue(&self) -> Queue {
        let mut q: Queue = self.q.create_queue().unwrap();
        q.set_avail_ring_address(Some(self.avail_addr as u32), Some(0));
        q.set_used_ring_address(Some(self.used_addr as u32), Some(0));
        q
    }

    /// Writes a chain's descriptors without making it available. Returns
    /// the descriptor indices, or None if the table is full.
    pub(crate) fn reserve(&mut self, parts: &[Part]) -> Option<Vec<u16>> {
        if self.free.len() < parts.len() {
            return None;
        }
        let idx: Vec<u16> = (0..parts.len()).filter_map(|_| self.free.pop()).collect();
        let mut segs = Vec::new();
        for (i, &(addr, len, flags, next)) in parts.iter().enumerate() {
            let addr = addr.unwrap_or(self.buf(idx[i]));
            let (flags, next) = match next {
                Next::Follow if i + 1 < parts.len() => (flags | F_NEXT, idx[i + 1]),
                Next::Follow | Next::End => (flags, 0),
                Next::To(k) => (flags | F_NEXT, idx[k]),
                Next::Raw(n) => (flags | F_NEXT, n),
            };
            self.q
                .desc_table()
                .store(
                    idx[i],
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next)),
                )
                .unwrap();
            segs.push((addr, len));
        }
        self.chains.insert(idx[0], (idx.clone(), segs));
        Some(idx)
    }

    /// [`Self::reserve`] for a plain linked chain of (address, len, flags).
    pub(crate) fn reserve_linked(&mut self, parts: &[(Option<u64>, u32, u16)]) -> Option<Vec<u16>> {
        let parts: Vec<Part> = parts
            .iter()
            .map(|&(addr, len, flags)| (addr, len, flags, Next::Follow))
            .collect();
        self.reserve(&parts)
    }

    /// Reserves a linked chain and makes it available.
    pub(crate) fn publish(&mut self, parts: &[(Option<u64>, u32, u16)]) -> Option<Vec<u16>> {
        let idx = self.reserve_linked(parts)?;
        self.push_avail(idx[0]);
        Some(idx)
    }

    /// Puts `head` on the available ring (any index, also invalid ones).
    pub(crate) fn push_avail(&mut self, head: u16) {
        let idx_addr = GuestAddress(self.avail_addr + 2);
        let i: u16 = self.mem.read_obj(idx_addr).unwrap();
        let slot = self.avail_addr + 4 + 2 * u64::from(i % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        fence(Ordering::SeqCst);
        self.mem.write_obj(i.wrapping_add(1), idx_addr).unwrap();
        fence(Ordering::SeqCst);
    }

    /// The chains the device returned since the last call; their
    /// descriptors are free again.
    pub(crate) fn take_used(&mut self) -> Vec<UsedChain> {
        fence(Ordering::SeqCst);
        let idx: u16 = self.mem.read_obj(GuestAddress(self.used_addr + 2)).unwrap();
        fence(Ordering::SeqCst);
        let mut out = Vec::new();
        while self.last_used != idx {
            let e = self.used_addr + 4 + 8 * u64::from(self.last_used % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            self.last_used = self.last_used.wrapping_add(1);
            let (descs, segs) = self.chains.remove(&(id as u16)).unwrap_or_default();
            self.free.extend(descs.iter().copied());
            out.push(UsedChain { descs, segs, len });
        }
        out
    }
}
