//! Guest memory: one memfd holding all guest RAM, mapped shared into the
//! VMM. A file backing (rather than anonymous memory) is what lets a later
//! snapshot write the memory out and restored VMs map it copy-on-write.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, FileOffset, GuestAddress, GuestMemory, GuestMemoryRegion};

use crate::arch::x86_64::layout::ram_regions;
use crate::devices::virtio::GuestMemoryMmap;

/// Smallest guest the VMM accepts: the kernel is loaded at 16 MiB and needs
/// room above it to run.
pub const MIN_MEM_MIB: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB is too small (at least {MIN_MEM_MIB} MiB)")]
    TooSmall(u32),
    #[error("memfd_create for guest memory: {0}")]
    Memfd(#[source] std::io::Error),
    #[error("sizing guest memory to {size} bytes: {source}")]
    Truncate {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping guest memory: {0}")]
    Mmap(#[source] vm_memory::mmap::FromRangesError),
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot}: {source}")]
    Register {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// What backs guest RAM.
pub enum RamBacking {
    /// A fresh VM: a memfd, mapped shared.
    Memfd,
    /// A VM restored from a snapshot: the snapshot's memory file, mapped
    /// private (copy-on-write; pages stay shared between VMs restored from
    /// the same file until the guest writes them).
    SnapshotFile(std::path::PathBuf),
}

/// Guest RAM and the file behind it.
pub struct GuestRam {
    pub mem: GuestMemoryMmap,
    pub file: Arc<File>,
    pub size: u64,
    pub backing: RamBacking,
}

fn memfd(name: &str) -> Result<File, MemoryError> {
    let cname = CString::new(name).map_err(|e| MemoryError::Memfd(std::io::Error::other(e)))?;
    // SAFETY: cname is a valid NUL-terminated string; the returned fd is
    // checked and then owned by the File.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a freshly created, valid file descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

impl GuestRam {
    /// Creates `mem_mib` MiB of guest RAM laid out around the MMIO gap.
    pub fn new(mem_mib: u32) -> Result<Self, MemoryError> {
        if mem_mib < MIN_MEM_MIB {
            return Err(MemoryError::TooSmall(mem_mib));
        }
        let size = u64::from(mem_mib) << 20;
        let file = Arc::new(memfd("ember-guest-ram")?);
        file.set_len(size)
            .map_err(|source| MemoryError::Truncate { size, source })?;
        let mut offset = 0u64;
        let ranges: Vec<(GuestAddress, usize, Option<FileOffset>)> = ram_regions(size)
            .into_iter()
            .map(|(start, len)| {
                let r = (
                    GuestAddress(start),
                    len as usize,
                    Some(FileOffset::from_arc(file.clone(), offset)),
                );
                offset += len;
                r
            })
            .collect();
        let mem = GuestMemoryMmap::from_ranges_with_files(ranges).map_err(MemoryError::Mmap)?;
        Ok(Self {
            mem,
            file,
            size,
            backing: RamBacking::Memfd,
        })
    }

    /// Maps a snapshot's memory file copy-on-write as the RAM of a guest of
    /// `size` bytes. Nothing is read up front: pages fault in on access.
    pub fn from_snapshot(path: &std::path::Path, size: u64) -> Result<Self, MemoryError> {
        use vm_memory::mmap::{GuestRegionMmap, MmapRegionBuilder};
        let file = Arc::new(File::open(path).map_err(MemoryError::Memfd)?);
        let mut regions = Vec::new();
        let mut offset = 0u64;
        for (start, len) in ram_regions(size) {
            let region = MmapRegionBuilder::new(len as usize)
                .with_file_offset(FileOffset::from_arc(file.clone(), offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| MemoryError::Mmap(vm_memory::mmap::FromRangesError::MmapRegion(e)))?;
            let region = GuestRegionMmap::new(region, GuestAddress(start)).ok_or(
                MemoryError::Mmap(vm_memory::mmap::FromRangesError::InvalidGuestRegion),
            )?;
            regions.push(region);
            offset += len;
        }
        let mem =
            GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Mmap(e.into()))?;
        Ok(Self {
            mem,
            file,
            size,
            backing: RamBacking::SnapshotFile(path.to_path_buf()),
        })
    }

    /// Registers every region with KVM, one slot each.
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        for (slot, region) in self.mem.iter().enumerate() {
            let slot = slot as u32;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| MemoryError::Register {
                    slot,
                    source: kvm_ioctls::Error::new(
                        std::io::Error::other(e)
                            .raw_os_error()
                            .unwrap_or(libc::EINVAL),
                    ),
                })?;
            let region_desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is a live mapping owned by self.mem,
            // which outlives the VM fd (the Vm drops the VmFd first).
            unsafe { vm.set_user_memory_region(region_desc) }
                .map_err(|source| MemoryError::Register { slot, source })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn memory_is_file_backed_and_split() {
        let ram = GuestRam::new(64).unwrap();
        assert_eq!(ram.size, 64 << 20);
        assert_eq!(ram.file.metadata().unwrap().len(), 64 << 20);
        ram.mem.write_obj(0x1234u32, GuestAddress(0x1000)).unwrap();
        let v: u32 = ram.mem.read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(v, 0x1234);
        assert!(matches!(GuestRam::new(16), Err(MemoryError::TooSmall(16))));
    }
}
