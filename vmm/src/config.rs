//! The typed description of a microVM.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::cpuid::CpuTemplate;
use crate::arch::x86_64::mptable::MAX_VCPUS;
pub use crate::devices::legacy::console_log::DEFAULT_MAX_BYTES as DEFAULT_CONSOLE_LOG_MAX_BYTES;
use crate::memory::MIN_MEM_MIB;

/// Lowest CID a guest may have (0-2 are reserved: hypervisor, local, host).
pub const MIN_GUEST_CID: u32 = 3;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context id.
    pub guest_cid: u32,
    /// Host side of the hybrid vsock: connect here and write
    /// `CONNECT <port>\n`; guest connections to host port P go to
    /// `<uds_path>_P`.
    pub uds_path: PathBuf,
}

/// A host directory served to the guest over virtio-fs, in this process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FsShareConfig {
    /// The virtio-fs tag the guest mounts (`mount -t virtiofs <tag> <dir>`).
    pub tag: String,
    /// The host directory; the guest cannot reach outside it.
    pub shared_dir: PathBuf,
    /// Caps on the host resources the share may hold for the guest.
    #[serde(default)]
    pub limits: FsLimits,
}

/// Caps on what one virtio-fs share keeps on the host for its guest (see
/// `devices::virtio::fs`). Past a cap the guest's request fails with
/// `ENFILE` (inodes) or `EMFILE` (open files); nothing else is affected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FsLimits {
    /// Inodes the guest holds (looked up and not forgotten); each keeps an
    /// `O_PATH` descriptor and a table entry on the host.
    pub max_inodes: u64,
    /// Files and directories the guest holds open; each keeps a descriptor.
    pub max_handles: u64,
    /// Host inodes the backend remembers a nodeid for: every inode the
    /// guest looked up since it mounted the share, forgotten or not.
    pub max_known_inodes: u64,
}

impl Default for FsLimits {
    fn default() -> Self {
        Self {
            max_inodes: 262_144,
            max_handles: 65_536,
            max_known_inodes: 4_194_304,
        }
    }
}

/// A virtio-net interface backed by a tap device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetConfig {
    /// Tap name (created if missing; `tap%d` templates work).
    pub tap: String,
    /// Open the tap inside this network namespace (e.g. a CNI pod netns);
    /// none: the VMM's own namespace.
    pub netns: Option<PathBuf>,
    /// The guest interface's MAC.
    pub mac: [u8; 6],
    /// Offered to the guest (VIRTIO_NET_F_MTU) when set.
    pub mtu: Option<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmConfig {
    pub vcpus: u8,
    pub mem_mib: u32,
    /// Uncompressed ELF `vmlinux`.
    pub kernel: PathBuf,
    /// Uncompressed newc cpio.
    pub initrd: Option<PathBuf>,
    /// Appended to the kernel command line the VMM builds.
    #[serde(default)]
    pub cmdline_extra: String,
    pub vsock: Option<VsockConfig>,
    /// virtio-fs shares, one device each.
    #[serde(default)]
    pub fs_shares: Vec<FsShareConfig>,
    /// virtio-net interfaces, one device each.
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// Guest console output goes here (appended); none: discarded.
    pub console_log: Option<PathBuf>,
    /// Cap of the console log file: past it, the log is rotated to
    /// `<console_log>.1`, so the console takes at most twice this on the
    /// host (raised to 4 KiB if smaller).
    #[serde(default = "default_console_log_max_bytes")]
    pub console_log_max_bytes: u64,
    #[serde(default)]
    pub cpu_template: CpuTemplate,
}

fn default_console_log_max_bytes() -> u64 {
    DEFAULT_CONSOLE_LOG_MAX_BYTES
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("vcpus must be between 1 and {MAX_VCPUS}, not {0}")]
    Vcpus(u8),
    #[error("guest memory of {0} MiB is too small (at least {MIN_MEM_MIB} MiB)")]
    MemTooSmall(u32),
    #[error("guest memory of {0} MiB is more than this VMM supports (1 TiB)")]
    MemTooLarge(u32),
    #[error("vsock guest CID {0} is reserved (use {MIN_GUEST_CID} or more)")]
    Cid(u32),
}

impl VmConfig {
    /// A config with the usual defaults: 1 vCPU, 128 MiB, auto template.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            vcpus: 1,
            mem_mib: 128,
            kernel: kernel.into(),
            initrd: None,
            cmdline_extra: String::new(),
            vsock: None,
            fs_shares: Vec::new(),
            net: Vec::new(),
            console_log: None,
            console_log_max_bytes: DEFAULT_CONSOLE_LOG_MAX_BYTES,
            cpu_template: CpuTemplate::Auto,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if self.mem_mib < MIN_MEM_MIB {
            return Err(ConfigError::MemTooSmall(self.mem_mib));
        }
        if self.mem_mib > 1 << 20 {
            return Err(ConfigError::MemTooLarge(self.mem_mib));
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < MIN_GUEST_CID {
                return Err(ConfigError::Cid(v.guest_cid));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_problem() {
        let mut c = VmConfig::new("/k");
        assert!(c.validate().is_ok());
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(0)));
        c.vcpus = 2;
        c.mem_mib = 8;
        assert!(c.validate().unwrap_err().to_string().contains("too small"));
        c.mem_mib = 128;
        c.vsock = Some(VsockConfig {
            guest_cid: 2,
            uds_path: "/tmp/x".into(),
        });
        assert_eq!(c.validate(), Err(ConfigError::Cid(2)));
    }
}
