//! VM snapshots: a memory file plus a versioned, checksummed state file.
//!
//! Taking a snapshot pauses the vCPUs, saves their state and the VM's
//! (irqchip, PIT, clock), quiesces every virtio device (its worker stops;
//! vsock connections are dropped) and saves the transports, then writes
//! guest memory (sparse: only pages the guest touched) and the state file,
//! and ends the source VM. Restoring maps the memory file copy-on-write
//! (MAP_PRIVATE, nothing is copied up front, pages stay shared between VMs
//! restored from one file until written) and recreates the VM around it.
//!
//! State file layout: `EMBERSNP` magic, format version (u32 LE), payload
//! length (u64 LE), payload (bincode), SHA-256 of everything before it.
//! A file with another magic, version or a wrong checksum, or truncated, is
//! refused with [`SnapshotError`] before anything is created.

pub mod vcpu_state;
pub mod vm_state;

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::devices::virtio::mmio::MmioState;
pub use vcpu_state::VcpuState;
pub use vm_state::VmState;

const MAGIC: &[u8; 8] = b"EMBERSNP";
/// Bumped on any change of the state file's content (`SnapshotState`).
pub const FORMAT_VERSION: u32 = 1;
/// Refuse state files larger than this (they are a few hundred KiB).
const MAX_STATE_LEN: u64 = 64 << 20;

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot state file {0} is not an Ember snapshot (bad magic)")]
    BadMagic(PathBuf),
    #[error(
        "snapshot state file {path} has format version {found}, this VMM reads {FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("snapshot state file {0} is truncated or corrupted (checksum mismatch)")]
    Checksum(PathBuf),
    #[error("snapshot was taken for {found:?}, not for {expected:?}")]
    Identity { expected: String, found: String },
    #[error("snapshot memory file {path} has {found} bytes, expected {expected}")]
    MemorySize {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("snapshot: KVM {op}: {source}")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("snapshot: {0}")]
    Format(String),
    #[error("snapshot: vCPU {0} did not pause")]
    Pause(u8),
}

/// The serial console's registers (vm-superio's SerialState, which has no
/// serde support of its own).
#[derive(Clone, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialSnapshot {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for vm_superio::serial::SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Everything but guest memory.
#[derive(Serialize, Deserialize)]
pub struct SnapshotState {
    /// What the snapshot is valid for: the caller's identity string (e.g. a
    /// hash of kernel, initrd, agent and config) plus the VM's shape.
    pub identity: String,
    pub mem_size: u64,
    pub cmdline: String,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialSnapshot,
    /// One per virtio device, in placement order.
    pub devices: Vec<MmioState>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates (or truncates) `path` for writing, 0600 whatever the umask:
/// snapshot files hold guest memory and device state.
pub(crate) fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // `mode` applies only to a file this call created: fix an older one.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

impl SnapshotState {
    /// Writes the state file atomically (temp file + rename).
    pub fn write(&self, path: &Path) -> Result<(), SnapshotError> {
        let payload = bincode::serde::encode_to_vec(self, bincode::config::standard())
            .map_err(|e| SnapshotError::Format(format!("encoding state: {e}")))?;
        let mut bytes = Vec::with_capacity(payload.len() + 52);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&payload);
        let digest = Sha256::digest(&bytes);
        bytes.extend_from_slice(&digest);
        let tmp = path.with_extension("tmp");
        let mut f = create_private(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
        Ok(())
    }

    /// Reads and verifies a state file.
    pub fn read(path: &Path) -> Result<Self, SnapshotError> {
        let mut f = File::open(path).map_err(io_err(path))?;
        let len = f.metadata().map_err(io_err(path))?.len();
        if len > MAX_STATE_LEN {
            return Err(SnapshotError::Checksum(path.to_path_buf()));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        f.read_to_end(&mut bytes).map_err(io_err(path))?;
        Self::decode(&bytes, path)
    }

    fn decode(bytes: &[u8], path: &Path) -> Result<Self, SnapshotError> {
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Err(SnapshotError::BadMagic(path.to_path_buf()));
        }
        if bytes.len() < 20 + 32 {
            return Err(SnapshotError::Checksum(path.to_path_buf()));
        }
        let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::Version {
                path: path.to_path_buf(),
                found: version,
            });
        }
        let (body, digest) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != digest {
            return Err(SnapshotError::Checksum(path.to_path_buf()));
        }
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(&body[12..20]);
        let payload_len = u64::from_le_bytes(len_bytes);
        if payload_len != (body.len() - 20) as u64 {
            return Err(SnapshotError::Checksum(path.to_path_buf()));
        }
        // The limit makes bincode check every length it reads against
        // the bytes left before allocating: a state file that claims a
        // huge string or vector is an error, not an allocation failure.
        let config = bincode::config::standard().with_limit::<{ MAX_STATE_LEN as usize }>();
        let (state, _) = bincode::serde::decode_from_slice(&body[20..], config)
            .map_err(|e| SnapshotError::Format(format!("decoding {}: {e}", path.display())))?;
        Ok(state)
    }
}

/// Paths of a snapshot in a directory.
#[derive(Debug, Clone)]
pub struct SnapshotFiles {
    pub dir: PathBuf,
}

impl SnapshotFiles {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }
    pub fn memory(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }
}

/// Copies the data extents of `src` (a memfd) into a new sparse file.
pub fn write_memory_file(src: &File, size: u64, path: &Path) -> Result<(), SnapshotError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let tmp = path.with_extension("tmp");
    let mut buf = vec![0u8; 1 << 20];
    let dst = create_private(&tmp).map_err(io_err(&tmp))?;
    dst.set_len(size).map_err(io_err(&tmp))?;
    let sfd = src.as_raw_fd();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        // SAFETY: plain lseek on an fd we own; errors are checked.
        let data = unsafe { libc::lseek(sfd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no more data
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(sfd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { size as i64 } else { hole };
        // copy_file_range does not cross file systems (the memfd is on
        // tmpfs), so copy the extent through a buffer.
        let mut off = data as u64;
        let end_u = end as u64;
        while off < end_u {
            let n = ((end_u - off) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], off)
                .map_err(io_err(&tmp))?;
            dst.write_all_at(&buf[..n], off).map_err(io_err(&tmp))?;
            off += n as u64;
        }
        pos = end;
    }
    dst.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn sample() -> SnapshotState {
        SnapshotState {
            identity: "test".into(),
            mem_size: 1 << 20,
            cmdline: "console=ttyS0".into(),
            vcpus: Vec::new(),
            vm: VmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            serial: SerialSnapshot::from(vm_superio::serial::SerialState::default()),
            devices: Vec::new(),
        }
    }

    /// Fuzzing finding (snapshot_state target): a state file with a valid
    /// header and checksum whose payload claims a string of 2^62 bytes made
    /// the decoder allocate that much (a capacity-overflow panic, or an
    /// abort for lengths the allocator refuses).
    #[test]
    fn huge_lengths_in_the_payload_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        for claimed in [1u64 << 62, 1 << 40, u64::MAX] {
            // bincode varint: 0xfd, then the length as a little-endian u64.
            let mut payload = vec![0xfd];
            payload.extend_from_slice(&claimed.to_le_bytes());
            let mut bytes = Vec::new();
            bytes.extend_from_slice(MAGIC);
            bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            bytes.extend_from_slice(&payload);
            let digest = Sha256::digest(&bytes);
            bytes.extend_from_slice(&digest);
            std::fs::write(&path, &bytes).unwrap();
            assert!(matches!(
                SnapshotState::read(&path),
                Err(SnapshotError::Format(_))
            ));
        }
    }

    #[test]
    fn round_trip_and_corruption_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        sample().write(&path).unwrap();
        let back = SnapshotState::read(&path).unwrap();
        assert_eq!(back.identity, "test");
        assert_eq!(back.mem_size, 1 << 20);

        let good = std::fs::read(&path).unwrap();
        // Flip a payload byte: checksum mismatch.
        let mut bad = good.clone();
        bad[25] ^= 0xff;
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(
            SnapshotState::read(&path),
            Err(SnapshotError::Checksum(_))
        ));
        // Truncated.
        std::fs::write(&path, &good[..good.len() - 10]).unwrap();
        assert!(matches!(
            SnapshotState::read(&path),
            Err(SnapshotError::Checksum(_))
        ));
        // Another format version.
        let mut v2 = good.clone();
        v2[8] = 2;
        std::fs::write(&path, &v2).unwrap();
        assert!(matches!(
            SnapshotState::read(&path),
            Err(SnapshotError::Version { found: 2, .. })
        ));
        // Not a snapshot at all.
        std::fs::write(&path, b"hello").unwrap();
        assert!(matches!(
            SnapshotState::read(&path),
            Err(SnapshotError::BadMagic(_))
        ));
        std::fs::write(&path, b"").unwrap();
        assert!(SnapshotState::read(&path).is_err());
    }

    #[test]
    fn memory_file_is_sparse_copy() {
        use std::io::{Seek, SeekFrom};
        let dir = tempfile::tempdir().unwrap();
        let mut src = tempfile::tempfile().unwrap();
        src.set_len(8 << 20).unwrap();
        src.seek(SeekFrom::Start(4 << 20)).unwrap();
        src.write_all(b"guest data").unwrap();
        let path = dir.path().join("memory");
        write_memory_file(&src, 8 << 20, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 8 << 20);
        assert_eq!(&bytes[4 << 20..(4 << 20) + 10], b"guest data");
        use std::os::unix::fs::MetadataExt;
        assert!(
            std::fs::metadata(&path).unwrap().blocks() * 512 < 8 << 20,
            "sparse"
        );
    }

    /// Restores the umask it replaced when dropped.
    struct Umask(libc::mode_t);

    impl Umask {
        fn set(mask: libc::mode_t) -> Self {
            // SAFETY: umask only swaps the process' file mode mask.
            Umask(unsafe { libc::umask(mask) })
        }
    }

    impl Drop for Umask {
        fn drop(&mut self) {
            // SAFETY: as above.
            unsafe { libc::umask(self.0) };
        }
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().mode() & 0o777
    }

    /// Snapshots hold guest memory: whatever the umask, the state and
    /// memory files are 0600, and rewriting an older, readable file makes
    /// it private too.
    #[test]
    fn snapshot_files_are_private_whatever_the_umask() {
        let _umask = Umask::set(0);
        let dir = tempfile::tempdir().unwrap();
        let files = SnapshotFiles::new(dir.path());
        sample().write(&files.state()).unwrap();
        let src = tempfile::tempfile().unwrap();
        src.set_len(1 << 20).unwrap();
        write_memory_file(&src, 1 << 20, &files.memory()).unwrap();
        assert_eq!(mode(&files.state()), 0o600);
        assert_eq!(mode(&files.memory()), 0o600);
        for path in [files.state(), files.memory()] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        sample().write(&files.state()).unwrap();
        write_memory_file(&src, 1 << 20, &files.memory()).unwrap();
        assert_eq!(mode(&files.state()), 0o600);
        assert_eq!(mode(&files.memory()), 0o600);
    }
}
