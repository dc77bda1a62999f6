//! vsock packet header (virtio spec 5.10.6) and moving packets between
//! descriptor chains and the backend.
//!
//! Chains are validated by the `virtio-vsock` crate's parser (direction of
//! every descriptor, header fits, `len` no larger than the buffer nor than
//! [`MAX_PKT_DATA`], every address inside guest memory). Everything read
//! from the guest is copied out once: the header into a plain [`Header`],
//! the payload into a bounded scratch buffer, so the guest cannot change
//! what we act on after we checked it.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{Bytes, GuestMemory};

use super::super::GuestMemoryMmap;

/// Size of the packet header on the wire.
pub const HDR_SIZE: usize = PKT_HEADER_SIZE;

/// The only socket type we support (`VIRTIO_VSOCK_TYPE_STREAM`).
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Largest payload we accept from, or put in, one packet (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_DATA: u32 = 64 * 1024;

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// A decoded packet header, in host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// Encodes the header as the 44 little-endian bytes of the wire format.
    pub fn to_bytes(self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Decodes the wire format.
    #[cfg(test)]
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// Why a descriptor chain could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("malformed descriptor chain: {0}")]
    Chain(virtio_vsock::packet::Error),
    #[error("guest memory access: {0}")]
    Memory(String),
    #[error("payload of {got} bytes, buffer holds {cap}")]
    TooBig { got: usize, cap: usize },
}

/// Reads one guest packet from a TX chain. The payload (at most
/// [`MAX_PKT_DATA`] bytes, enforced by the parser) is copied into
/// `scratch`; returns the header and the payload length.
pub fn read_tx<M>(
    mem: &GuestMemoryMmap,
    chain: &mut DescriptorChain<M>,
    scratch: &mut [u8],
) -> Result<(Header, usize), PacketError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let pkt =
        VsockPacket::from_tx_virtq_chain(mem, chain, MAX_PKT_DATA).map_err(PacketError::Chain)?;
    let hdr = Header {
        src_cid: pkt.src_cid(),
        dst_cid: pkt.dst_cid(),
        src_port: pkt.src_port(),
        dst_port: pkt.dst_port(),
        len: pkt.len(),
        type_: pkt.type_(),
        op: pkt.op(),
        flags: pkt.flags(),
        buf_alloc: pkt.buf_alloc(),
        fwd_cnt: pkt.fwd_cnt(),
    };
    let len = match pkt.data_slice() {
        None => 0,
        Some(slice) => {
            // The parser sized the slice to exactly `hdr.len` bytes.
            let len = slice.len();
            let cap = scratch.len();
            let dst = scratch
                .get_mut(..len)
                .ok_or(PacketError::TooBig { got: len, cap })?;
            let copied = slice.copy_to(dst);
            if copied != len {
                return Err(PacketError::Memory(format!(
                    "short copy of packet payload: {copied} of {len} bytes"
                )));
            }
            len
        }
    };
    Ok((hdr, len))
}

/// A guest RX buffer, validated and ready to receive one packet.
pub struct RxBuffer<'a> {
    pkt: VsockPacket<'a, ()>,
}

impl<'a> RxBuffer<'a> {
    /// Validates an RX chain (device-writable header and data buffers).
    pub fn parse<M>(
        mem: &'a GuestMemoryMmap,
        chain: &mut DescriptorChain<M>,
    ) -> Result<Self, PacketError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let pkt = VsockPacket::from_rx_virtq_chain(mem, chain, MAX_PKT_DATA)
            .map_err(PacketError::Chain)?;
        Ok(Self { pkt })
    }

    /// How many payload bytes this buffer can take.
    pub fn capacity(&self) -> usize {
        self.pkt
            .data_slice()
            .map_or(0, |s| s.len().min(MAX_PKT_DATA as usize))
    }

    /// Writes the packet; `hdr.len` must equal `data.len()`. Returns the
    /// number of bytes written to the chain (the used length).
    pub fn write(&mut self, hdr: &Header, data: &[u8]) -> Result<u32, PacketError> {
        if !data.is_empty() {
            let cap = self.capacity();
            if data.len() > cap {
                return Err(PacketError::TooBig {
                    got: data.len(),
                    cap,
                });
            }
            let slice = self.pkt.data_slice().ok_or(PacketError::TooBig {
                got: data.len(),
                cap: 0,
            })?;
            slice
                .write_slice(data, 0)
                .map_err(|e| PacketError::Memory(e.to_string()))?;
        }
        self.pkt
            .set_header_from_raw(&hdr.to_bytes())
            .map_err(PacketError::Chain)?;
        // Both terms are bounded: 44 + at most MAX_PKT_DATA.
        Ok((HDR_SIZE + data.len()) as u32)
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn header_roundtrip() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0xdead_beef,
            dst_port: 7,
            len: 9,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 3,
            buf_alloc: 1 << 18,
            fwd_cnt: 12345,
        };
        assert_eq!(Header::from_bytes(&h.to_bytes()), h);
    }
}
