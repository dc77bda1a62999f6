//! Copies a FUSE request out of guest memory exactly once.
//!
//! Guest memory is shared with the guest's vCPUs, which may rewrite a
//! request while the device works on it. Screening one read of the bytes
//! and letting the library parse a second read would let a racing vCPU swap
//! a screened request for one the screening refuses (a device-node MKNOD,
//! an `O_TRUNC` OPEN on a read-only share). So the readable part of a chain
//! is copied into a host buffer first, and both the screening and the FUSE
//! server read that copy only; replies still go to the chain's writable
//! part. The copy is bounded by the largest request the server accepts
//! (1 MiB of WRITE data plus a 4 KiB header area), and a chain whose
//! readable part disagrees with the header's `len` is refused before
//! anything is copied beyond the header.

use std::io::Read;
use std::mem::size_of;

use fuse_backend_rs::abi::fuse_abi::InHeader;
use fuse_backend_rs::api::server::MAX_BUFFER_SIZE;
use fuse_backend_rs::transport::Reader;
use virtio_queue::DescriptorChain;
use vm_memory::ByteValued;

use crate::devices::virtio::GuestMemoryMmap;

/// The largest request copied: the server's data limit plus its header
/// area (what `Server::handle_message` itself accepts).
pub(super) const MAX_REQUEST_LEN: usize = MAX_BUFFER_SIZE as usize + 0x1000;

const HEADER_LEN: usize = size_of::<InHeader>();

/// Why a chain's request could not be copied.
#[derive(Debug)]
pub(super) enum CopyError {
    /// Nothing can be answered: the readable part is unreadable or holds
    /// no FUSE header.
    Drop(String),
    /// The header is readable (so the request can get an error reply) but
    /// its `len` does not describe the chain, or is too large.
    Refuse(InHeader, String),
}

/// A host buffer holding one request at a time, reused across requests
/// (it grows to the largest request seen, at most [`MAX_REQUEST_LEN`]).
#[derive(Default)]
pub(super) struct RequestBuf {
    buf: Vec<u8>,
}

impl RequestBuf {
    /// Copies the readable part of `chain` (header and body) into the
    /// buffer; returns the header, parsed from the copy. The request is
    /// then [`Self::request`]`(header.len)`.
    pub(super) fn copy_in(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<InHeader, CopyError> {
        let mut guest = Reader::from_descriptor_chain(mem, chain)
            .map_err(|e| CopyError::Drop(format!("dropping unreadable descriptor chain: {e}")))?;
        let readable = guest.available_bytes();
        if readable < HEADER_LEN {
            return Err(CopyError::Drop(format!(
                "dropping chain: {readable} readable bytes hold no FUSE header"
            )));
        }
        if self.buf.len() < HEADER_LEN {
            self.buf.resize(HEADER_LEN, 0);
        }
        guest
            .read_exact(&mut self.buf[..HEADER_LEN])
            .map_err(|e| CopyError::Drop(format!("dropping chain: reading its header: {e}")))?;
        let mut header = InHeader::default();
        header
            .as_mut_slice()
            .copy_from_slice(&self.buf[..HEADER_LEN]);

        let len = header.len as usize;
        if len < HEADER_LEN || len != readable {
            return Err(CopyError::Refuse(
                header,
                format!(
                    "opcode {}: header len {len} does not match the {readable} readable bytes",
                    header.opcode
                ),
            ));
        }
        if len > MAX_REQUEST_LEN {
            return Err(CopyError::Refuse(
                header,
                format!(
                    "opcode {}: request of {len} bytes exceeds the {MAX_REQUEST_LEN}-byte maximum",
                    header.opcode
                ),
            ));
        }
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        guest
            .read_exact(&mut self.buf[HEADER_LEN..len])
            .map_err(|e| CopyError::Refuse(header, format!("reading the request body: {e}")))?;
        Ok(header)
    }

    /// The first `len` bytes of the last request copied.
    pub(super) fn request(&mut self, len: usize) -> &mut [u8] {
        let len = len.min(self.buf.len());
        &mut self.buf[..len]
    }

    /// The body (after the header) of the last request copied.
    pub(super) fn body(&self, len: usize) -> &[u8] {
        let len = len.min(self.buf.len());
        self.buf.get(HEADER_LEN..len).unwrap_or(&[])
    }
}
