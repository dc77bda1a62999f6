//! Loading the guest: the ELF `vmlinux` (no bzImage: decompressing it is
//! far too slow on hosts whose KVM interprets ring 0), the initrd, the
//! command line and the zero page with its e820 map.

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{load_cmdline, Cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryRegion};

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START,
    ZERO_PAGE_START,
};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const E820_RAM: u32 = 1;
const PAGE_SIZE: u64 = 0x1000;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel {path}: {source}")]
    KernelOpen {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "kernel {path} is not a loadable x86_64 ELF vmlinux (a bzImage will not do): {source}"
    )]
    KernelLoad {
        path: String,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("initrd {path}: {source}")]
    InitrdOpen {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "guest memory too small: the kernel ends at {kernel_end:#x} and the {initrd_size}-byte \
         initrd needs room below {lowmem_end:#x}; give the VM more memory"
    )]
    InitrdDoesNotFit {
        kernel_end: u64,
        initrd_size: u64,
        lowmem_end: u64,
    },
    #[error("loading the initrd into guest memory: {0}")]
    InitrdLoad(#[source] vm_memory::GuestMemoryError),
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("writing the zero page: {0}")]
    ZeroPage(String),
}

/// Loads the ELF kernel at its physical load address.
pub fn load_kernel<M: GuestMemory>(mem: &M, path: &Path) -> Result<(u64, u64), BootError> {
    let display = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::KernelOpen {
        path: display.clone(),
        source,
    })?;
    let result =
        Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|source| {
            BootError::KernelLoad {
                path: display,
                source,
            }
        })?;
    Ok((result.kernel_load.raw_value(), result.kernel_end))
}

/// End of the RAM region that starts at 0 (the initrd goes at its top).
fn lowmem_end<M: GuestMemory>(mem: &M) -> u64 {
    mem.iter()
        .find(|r| r.start_addr().raw_value() == 0)
        .map(|r| r.len())
        .unwrap_or(0)
        .min(MMIO_GAP_START)
}

/// Loads the initrd at the top of low memory, page aligned, above the kernel.
pub fn load_initrd<M: GuestMemory>(
    mem: &M,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let display = path.display().to_string();
    let open_err = |source| BootError::InitrdOpen {
        path: display.clone(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    let top = lowmem_end(mem);
    let addr = top.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1));
    let addr = match addr {
        Some(a) if a >= kernel_end => a,
        _ => {
            return Err(BootError::InitrdDoesNotFit {
                kernel_end,
                initrd_size: size,
                lowmem_end: top,
            })
        }
    };
    let len = usize::try_from(size).map_err(|_| BootError::InitrdDoesNotFit {
        kernel_end,
        initrd_size: size,
        lowmem_end: top,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(BootError::InitrdLoad)?;
    Ok((addr, size))
}

/// Writes the command line and the zero page (boot_params with e820).
pub fn configure_system<M: GuestMemory>(
    mem: &M,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(format!("{e} (length {})", cmdline.len())))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;

    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let mut e820 = vec![(0u64, EBDA_START)];
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let end = start + region.len();
        if start == 0 {
            if end > HIMEM_START {
                e820.push((HIMEM_START, end.min(MMIO_GAP_START) - HIMEM_START));
            }
        } else if start >= MMIO_GAP_END {
            e820.push((start, region.len()));
        }
    }
    for (i, (addr, size)) in e820.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].type_ = E820_RAM;
    }
    params.e820_entries = e820.len() as u8;

    let bp = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<M>(&bp, mem)
        .map_err(|e| BootError::ZeroPage(e.to_string()))?;
    // The zero page must be readable back as what we wrote.
    let _: u16 = mem
        .read_obj(GuestAddress(ZERO_PAGE_START + 0x1fe))
        .map_err(|e| BootError::ZeroPage(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem(size: usize) -> vm_memory::GuestMemoryMmap<()> {
        vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    #[test]
    fn non_elf_kernel_is_a_clear_error() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"MZ this is not an ELF file at all").unwrap();
        let err = load_kernel(&mem(64 << 20), f.path()).unwrap_err();
        assert!(
            err.to_string().contains("not a loadable x86_64 ELF"),
            "{err}"
        );
        let err = load_kernel(&mem(64 << 20), Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }

    #[test]
    fn initrd_goes_on_top_of_low_memory_or_fails_clearly() {
        let m = mem(32 << 20);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![0xabu8; 10_000]).unwrap();
        let (addr, size) = load_initrd(&m, f.path(), 16 << 20).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + size <= 32 << 20);
        let b: u8 = m.read_obj(GuestAddress(addr + 9_999)).unwrap();
        assert_eq!(b, 0xab);
        let err = load_initrd(&m, f.path(), (32 << 20) - 100).unwrap_err();
        assert!(err.to_string().contains("memory too small"), "{err}");
        let err = load_initrd(&m, Path::new("/nonexistent/initrd"), 0).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/initrd"), "{err}");
    }

    #[test]
    fn zero_page_has_cmdline_and_e820() {
        let m = mem(64 << 20);
        configure_system(&m, "console=ttyS0 panic=1", Some((0x300_0000, 4096))).unwrap();
        let mut buf = [0u8; 21];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf, b"console=ttyS0 panic=1");
        let params: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.e820_entries }, 2);
        assert_eq!({ params.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ params.e820_table[1].size }, (64 << 20) - HIMEM_START);
        let long = "x".repeat(CMDLINE_MAX_SIZE + 1);
        assert!(configure_system(&m, &long, None).is_err());
    }
}
