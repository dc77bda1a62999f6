//! A small guest memory holding one split virtqueue, written the way a
//! hostile guest driver could write it: descriptor tables, available rings
//! and buffers come from the fuzz input (addresses inside and outside guest
//! memory, any lengths, any flags and next indices, loops, indirect
//! tables), and the device code under test pops chains from it with the
//! real `virtio-queue` parser.
//!
//! Layout (guest physical): descriptor table at [`DESC_TABLE`], available
//! ring at [`AVAIL_RING`], used ring at [`USED_RING`], buffers in the data
//! region from [`DATA_BASE`] to [`MEM_SIZE`].

use ember_vmm::fuzzing::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::Input;

/// Queue size of every fuzzed queue (descriptor indices above it are
/// invalid, and the input can name them).
pub const QSIZE: u16 = 32;
pub const MEM_SIZE: u64 = 0x4_0000;
pub const DESC_TABLE: u64 = 0x1000;
pub const AVAIL_RING: u64 = 0x2000;
pub const USED_RING: u64 = 0x3000;
/// Rings of [`GuestQueue::idle_queue`].
pub const IDLE_RINGS: u64 = 0x8000;
pub const DATA_BASE: u64 = 0x1_0000;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// One queue in a fresh, zeroed guest memory.
pub struct GuestQueue {
    pub mem: GuestMemoryMmap,
    published: u16,
    next_desc: u16,
    next_data: u64,
}

impl Default for GuestQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl GuestQueue {
    pub fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("cannot map the fuzz guest memory");
        Self {
            mem,
            published: 0,
            next_desc: 0,
            next_data: DATA_BASE,
        }
    }

    /// Writes descriptor `index` (any index: the table has room for
    /// [`QSIZE`] entries; writes past guest memory are ignored).
    pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC_TABLE + 16 * u64::from(index);
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let _ = self.mem.write_slice(&raw, GuestAddress(at));
    }

    /// Makes `head` available (any value, also invalid indices).
    pub fn publish(&mut self, head: u16) {
        let slot = AVAIL_RING + 4 + 2 * u64::from(self.published % QSIZE);
        let _ = self.mem.write_obj(head.to_le(), GuestAddress(slot));
        self.published = self.published.wrapping_add(1);
        let _ = self
            .mem
            .write_obj(self.published.to_le(), GuestAddress(AVAIL_RING + 2));
    }

    /// Copies `bytes` into the data region and returns their address
    /// (wrapping to the start of the region when it is full).
    pub fn alloc(&mut self, bytes: &[u8]) -> u64 {
        let len = bytes.len() as u64;
        if self.next_data + len > MEM_SIZE {
            self.next_data = DATA_BASE;
        }
        let addr = self.next_data;
        let _ = self.mem.write_slice(bytes, GuestAddress(addr));
        self.next_data = (addr + len + 7) & !7;
        addr
    }

    /// Reserves `len` zeroed bytes of the data region.
    pub fn alloc_zeroed(&mut self, len: usize) -> u64 {
        self.alloc(&vec![0u8; len])
    }

    /// Writes a well-formed chain of (address, length, device-writable)
    /// parts on fresh descriptors and makes it available; returns its head.
    pub fn push_chain(&mut self, parts: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc % QSIZE;
        for (i, &(addr, len, write)) in parts.iter().enumerate() {
            let index = (self.next_desc % QSIZE) as u16;
            self.next_desc = self.next_desc.wrapping_add(1);
            let last = i + 1 == parts.len();
            let mut flags = if write { F_WRITE } else { 0 };
            if !last {
                flags |= F_NEXT;
            }
            self.write_desc(index, addr, len, flags, (index + 1) % QSIZE);
        }
        self.publish(head);
        head
    }

    /// The queue as the transport hands it to a device after DRIVER_OK.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).expect("queue size");
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        q.set_used_ring_address(Some(USED_RING as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(&self.mem), "fuzz queue layout is invalid");
        q
    }

    /// A second, valid queue in the same memory with nothing available
    /// (its rings live between the main queue's and the data region).
    pub fn idle_queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).expect("queue size");
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(IDLE_RINGS as u32), Some(0));
        q.set_avail_ring_address(Some((IDLE_RINGS + 0x1000) as u32), Some(0));
        q.set_used_ring_address(Some((IDLE_RINGS + 0x2000) as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(&self.mem), "fuzz idle queue layout is invalid");
        q
    }

    /// The used ring entries (id, len) written so far.
    pub fn used(&self) -> Vec<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap_or(0);
        (0..idx)
            .map(|i| {
                let e = USED_RING + 4 + 8 * u64::from(i % QSIZE);
                let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap_or(u32::MAX);
                let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap_or(u32::MAX);
                (id, len)
            })
            .collect()
    }

    /// How many chains were made available.
    pub fn published(&self) -> u16 {
        self.published
    }

    /// Lays out a queue from the input, as a hostile driver could:
    ///
    /// `ndesc: u8`, then `ndesc` descriptors of 6 bytes (`addr_sel: u16`,
    /// `len_sel: u16`, `flags: u8`, `next: u8`), then `nheads: u8` and that
    /// many heads (`u8`, may exceed the queue size), then the bytes of the
    /// data region (buffers, indirect tables).
    ///
    /// `addr_sel` below 0xff00 is an offset into the data region; above,
    /// it picks an address the guest should not be able to use: the rings
    /// themselves, the end of guest memory, or far outside it. `len_sel`
    /// 0xffff and 0xfffe stand for 4 GiB - 1 and 2 GiB.
    pub fn from_input(input: &mut Input<'_>) -> Self {
        let mut gq = Self::new();
        let ndesc = u16::from(input.u8()) % (QSIZE + 1);
        for index in 0..ndesc {
            let addr = decode_addr(input.u16());
            let len = match input.u16() {
                0xffff => u32::MAX,
                0xfffe => 0x8000_0000,
                l => u32::from(l),
            };
            let flags = u16::from(input.u8());
            let next = u16::from(input.u8());
            gq.write_desc(index, addr, len, flags, next);
        }
        let nheads = input.u8() % 64;
        for _ in 0..nheads {
            let head = u16::from(input.u8());
            gq.publish(head);
        }
        let data = input.bytes((MEM_SIZE - DATA_BASE) as usize);
        let _ = gq.mem.write_slice(data, GuestAddress(DATA_BASE));
        gq
    }
}

/// See [`GuestQueue::from_input`].
pub fn decode_addr(sel: u16) -> u64 {
    if sel < 0xff00 {
        return DATA_BASE + u64::from(sel);
    }
    let k = u64::from(sel & 0xff);
    match k % 8 {
        0 => DESC_TABLE,
        1 => AVAIL_RING,
        2 => USED_RING,
        3 => MEM_SIZE - 1 - (k >> 3),
        4 => MEM_SIZE + (k >> 3),
        5 => u64::MAX - (k >> 3),
        6 => 0,
        _ => 0x8000_0000_0000_0000 + k,
    }
}
