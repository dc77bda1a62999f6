//! What a template is valid for: its identity, a hash of the guest's view
//! of a VM (kernel and initrd content, command line, vCPUs, memory, CPU
//! template, device list) and of the VMM's snapshot format version. Host
//! paths (sockets, shares, logs) do not count, so every pod of one shape
//! shares one template.
//!
//! Hashing a kernel costs about a second on a slow host, a restore well
//! under one: the store remembers content digests in `.digests/`, keyed by
//! what identifies a file's content without reading it.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use ember_vmm::{VmConfig, SNAPSHOT_FORMAT_VERSION};
use sha2::{Digest, Sha256};

use super::private;
use super::store::StoreError;

/// Directory of the store holding remembered file digests.
pub(super) const DIGEST_CACHE: &str = ".digests";

/// The identity of VMs built from `config`: what a template must match.
pub fn identity(config: &VmConfig) -> Result<String, StoreError> {
    identity_with(config, None)
}

/// [`identity`], reusing the content digests remembered in `cache` (a
/// directory of `<stat key>` files) while the files are unchanged.
pub(super) fn identity_with(config: &VmConfig, cache: Option<&Path>) -> Result<String, StoreError> {
    let mut h = Sha256::new();
    h.update(SNAPSHOT_FORMAT_VERSION.to_le_bytes());
    h.update(cached_digest(&config.kernel, cache)?);
    if let Some(initrd) = &config.initrd {
        h.update(cached_digest(initrd, cache)?);
    }
    h.update(config.cmdline_extra.as_bytes());
    h.update([config.vcpus]);
    h.update(config.mem_mib.to_le_bytes());
    h.update(config.cpu_template.resolve().to_string().as_bytes());
    h.update([u8::from(config.vsock.is_some())]);
    for share in &config.fs_shares {
        h.update(share.tag.as_bytes());
        h.update([0]);
    }
    h.update((config.net.len() as u32).to_le_bytes());
    let digest = h.finalize();
    Ok(hex(&digest[..12]))
}

fn file_digest(path: &Path) -> Result<[u8; 32], StoreError> {
    let mut h = Sha256::new();
    let mut f = File::open(path).map_err(StoreError::at(path))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(StoreError::at(path))?;
        if n == 0 {
            return Ok(h.finalize().into());
        }
        h.update(&buf[..n]);
    }
}

/// What identifies a file's content without reading it, as git's index
/// does: path, device, inode, size, modification and change times. Any
/// rewrite or replacement of the file changes it.
fn stat_key(path: &Path) -> Result<String, StoreError> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(StoreError::at(path))?;
    let mut h = Sha256::new();
    h.update(path.as_os_str().as_encoded_bytes());
    for v in [m.dev(), m.ino(), m.size()] {
        h.update(v.to_le_bytes());
    }
    for v in [m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()] {
        h.update(v.to_le_bytes());
    }
    Ok(hex(&h.finalize()[..16]))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of a file's content, from `cache` when the file is
/// unchanged since it was last hashed.
fn cached_digest(path: &Path, cache: Option<&Path>) -> Result<[u8; 32], StoreError> {
    let Some(cache) = cache else {
        return file_digest(path);
    };
    let key = stat_key(path)?;
    let entry = cache.join(&key);
    if let Ok(text) = std::fs::read_to_string(&entry) {
        let bytes: Option<Vec<u8>> = (0..text.len() / 2)
            .map(|i| {
                text.get(2 * i..2 * i + 2)
                    .and_then(|b| u8::from_str_radix(b, 16).ok())
            })
            .collect();
        if let Some(Ok(digest)) = bytes.map(<[u8; 32]>::try_from) {
            return Ok(digest);
        }
    }
    let digest = file_digest(path)?;
    // Best effort: a cache that cannot be written only costs time. The
    // cache lives in the store, which must come out 0700 whoever creates
    // it first.
    let store = cache.parent().unwrap_or(cache);
    if private::create_dir(store).is_ok() && private::create_dir(cache).is_ok() {
        let tmp = cache.join(format!(".{key}.{}", std::process::id()));
        let written = private::create_file(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, hex(&digest).as_bytes()));
        if written.is_ok() && std::fs::rename(&tmp, &entry).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::TemplateStore;
    use ember_vmm::CpuTemplate;

    #[test]
    fn identity_follows_the_guest_view_not_host_paths() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"kernel v1").unwrap();
        let mut a = VmConfig::new(&kernel);
        a.cpu_template = CpuTemplate::Host;
        let mut b = a.clone();
        b.console_log = Some("/elsewhere/console.log".into());
        assert_eq!(identity(&a).unwrap(), identity(&b).unwrap());
        b.mem_mib = 512;
        assert_ne!(identity(&a).unwrap(), identity(&b).unwrap());
        let id1 = identity(&a).unwrap();
        std::fs::write(&kernel, b"kernel v2").unwrap();
        assert_ne!(id1, identity(&a).unwrap(), "kernel content counts");
        a.kernel = dir.path().join("missing");
        assert!(identity(&a).is_err());
    }

    #[test]
    fn the_cached_identity_follows_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"kernel v1").unwrap();
        let mut config = VmConfig::new(&kernel);
        config.cpu_template = CpuTemplate::Host;
        let store = TemplateStore::new(dir.path().join("templates"));
        let plain = identity(&config).unwrap();
        assert_eq!(store.cached_identity(&config).unwrap(), plain);
        assert_eq!(
            store.cached_identity(&config).unwrap(),
            plain,
            "from the cache"
        );
        assert!(
            store.list().is_empty(),
            "the digest cache is not a template"
        );
        // A rewrite of the same size changes the change time at least.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&kernel, b"kernel v2").unwrap();
        let changed = store.cached_identity(&config).unwrap();
        assert_ne!(changed, plain);
        assert_eq!(changed, identity(&config).unwrap());
        // A corrupted cache entry is recomputed.
        for e in std::fs::read_dir(dir.path().join("templates").join(DIGEST_CACHE)).unwrap() {
            std::fs::write(e.unwrap().path(), b"zz").unwrap();
        }
        assert_eq!(store.cached_identity(&config).unwrap(), changed);
    }
}
