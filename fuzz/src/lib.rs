//! Shared pieces of Ember's fuzz targets: a reader that turns the fuzzer's
//! bytes into numbers without ever failing ([`Input`]), a guest memory with
//! one split virtqueue laid out from those bytes ([`queue`]), and the jail
//! the virtio-fs target serves its requests in ([`jail`]).
//!
//! Every target is a thin adapter: it decodes the input into what a hostile
//! guest (or agent) could send, calls the real code, and checks the
//! invariants the host relies on (no panic, bounded lengths, used ring
//! entries that make sense).

pub mod fake_tap;
pub mod jail;
pub mod queue;

/// The fuzzer's bytes, read front to back. Reads past the end give zeros,
/// so every input decodes to something.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}
