//! A directory of VM templates: snapshots of freshly booted guests, one per
//! identity (a hash of the kernel, the initrd — which holds the agent —
//! and the VM's shape). Pods restore from a template instead of booting.
//!
//! Layout: `<dir>/<identity>/{state,memory}`. A template is created in
//! `<dir>/.tmp-<identity>-<pid>` and renamed into place, so a half-written
//! one is never used; concurrent creators race benignly (the first rename
//! wins, the loser's copy is dropped).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{
    create_private, create_private_dir, SnapshotError, SnapshotFiles, FORMAT_VERSION, MEMORY_FILE,
    STATE_FILE,
};
use crate::config::VmConfig;

/// One template on disk.
#[derive(Debug, Clone)]
pub struct TemplateInfo {
    pub identity: String,
    pub dir: PathBuf,
    /// Bytes actually allocated on disk (the memory file is sparse).
    pub disk_bytes: u64,
}

/// Directory of the store holding remembered file digests.
const DIGEST_CACHE: &str = ".digests";

pub struct TemplateStore {
    dir: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn file_digest(path: &Path) -> Result<[u8; 32], SnapshotError> {
    let mut h = Sha256::new();
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            return Ok(h.finalize().into());
        }
        h.update(&buf[..n]);
    }
}

/// What identifies a file's content without reading it, as git's index
/// does: path, device, inode, size, modification and change times. Any
/// rewrite or replacement of the file changes it.
fn stat_key(path: &Path) -> Result<String, SnapshotError> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(io_err(path))?;
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

/// The SHA-256 of a file's content, from `cache` (a directory of
/// `<stat key>` files holding digests) when the file is unchanged since it
/// was last hashed; hashing a kernel costs about a second on a slow host,
/// a restore well under one.
fn cached_digest(path: &Path, cache: Option<&Path>) -> Result<[u8; 32], SnapshotError> {
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
    // cache lives in the store, which must come out 0700 (see
    // `TemplateStore::create_dir`), whoever creates it first.
    let store = cache.parent().unwrap_or(cache);
    if create_private_dir(store).is_ok() && create_private_dir(cache).is_ok() {
        let tmp = cache.join(format!(".{key}.{}", std::process::id()));
        let written = create_private(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, hex(&digest).as_bytes()));
        if written.is_ok() && std::fs::rename(&tmp, &entry).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(digest)
}

fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_dir() {
        std::fs::read_dir(path)
            .map(|d| d.flatten().map(|e| disk_usage(&e.path())).sum())
            .unwrap_or(0)
    } else {
        meta.blocks() * 512
    }
}

impl TemplateStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the store's directory (and missing parents) 0700, and makes
    /// an existing one 0700: templates hold guest memory, only root may
    /// read them.
    pub fn create_dir(&self) -> Result<(), SnapshotError> {
        create_private_dir(&self.dir).map_err(io_err(&self.dir))
    }

    /// The identity of VMs built from `config`: what a template must match.
    /// Host-side paths (sockets, shares, logs) do not count; the guest's
    /// view (kernel, initrd, command line, vCPUs, memory, CPU template,
    /// device list) does, and so does the snapshot format version.
    pub fn identity(config: &VmConfig) -> Result<String, SnapshotError> {
        Self::identity_with(config, None)
    }

    /// [`Self::identity`], reusing the content digests of kernel and initrd
    /// remembered in this store (`.digests/`) while the files are
    /// unchanged.
    pub fn cached_identity(&self, config: &VmConfig) -> Result<String, SnapshotError> {
        Self::identity_with(config, Some(&self.dir.join(DIGEST_CACHE)))
    }

    fn identity_with(config: &VmConfig, cache: Option<&Path>) -> Result<String, SnapshotError> {
        let mut h = Sha256::new();
        h.update(FORMAT_VERSION.to_le_bytes());
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
        Ok(digest.iter().take(12).map(|b| format!("{b:02x}")).collect())
    }

    /// The template for `identity`, if a complete one exists.
    pub fn get(&self, identity: &str) -> Option<SnapshotFiles> {
        let files = SnapshotFiles::new(self.dir.join(identity));
        (files.state().is_file() && files.memory().is_file()).then_some(files)
    }

    /// Where to write a new template; pass the result to [`Self::commit`].
    pub fn staging(&self, identity: &str) -> Result<SnapshotFiles, SnapshotError> {
        self.create_dir()?;
        let dir = self
            .dir
            .join(format!(".tmp-{identity}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        create_private_dir(&dir).map_err(io_err(&dir))?;
        Ok(SnapshotFiles::new(dir))
    }

    /// Moves a written staging snapshot into place.
    pub fn commit(
        &self,
        identity: &str,
        staged: SnapshotFiles,
    ) -> Result<SnapshotFiles, SnapshotError> {
        let target = self.dir.join(identity);
        match std::fs::rename(&staged.dir, &target) {
            Ok(()) => Ok(SnapshotFiles::new(target)),
            Err(_) if self.get(identity).is_some() => {
                // Another process committed the same template first.
                let _ = std::fs::remove_dir_all(&staged.dir);
                Ok(SnapshotFiles::new(target))
            }
            Err(e) => Err(io_err(&target)(e)),
        }
    }

    /// Removes a template that failed to restore (corrupted, truncated).
    pub fn discard(&self, identity: &str) -> Result<(), SnapshotError> {
        let dir = self.dir.join(identity);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&dir)(e)),
        }
    }

    /// Every complete template.
    pub fn list(&self) -> Vec<TemplateInfo> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<TemplateInfo> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with('.') {
                    return None;
                }
                let dir = e.path();
                (dir.join(STATE_FILE).is_file() && dir.join(MEMORY_FILE).is_file()).then(|| {
                    TemplateInfo {
                        identity: name,
                        disk_bytes: disk_usage(&dir),
                        dir,
                    }
                })
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// Removes every template (and leftover staging directories).
    pub fn clear(&self) -> Result<usize, SnapshotError> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(0);
        };
        let mut n = 0;
        for e in entries.flatten() {
            std::fs::remove_dir_all(e.path()).map_err(io_err(&e.path()))?;
            n += 1;
        }
        Ok(n)
    }

    /// Bytes the whole store uses on disk.
    pub fn disk_bytes(&self) -> u64 {
        disk_usage(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_follows_the_guest_view_not_host_paths() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"kernel v1").unwrap();
        let mut a = VmConfig::new(&kernel);
        a.cpu_template = crate::CpuTemplate::Host;
        let mut b = a.clone();
        b.console_log = Some("/elsewhere/console.log".into());
        assert_eq!(
            TemplateStore::identity(&a).unwrap(),
            TemplateStore::identity(&b).unwrap()
        );
        b.mem_mib = 512;
        assert_ne!(
            TemplateStore::identity(&a).unwrap(),
            TemplateStore::identity(&b).unwrap()
        );
        let id1 = TemplateStore::identity(&a).unwrap();
        std::fs::write(&kernel, b"kernel v2").unwrap();
        assert_ne!(
            id1,
            TemplateStore::identity(&a).unwrap(),
            "kernel content counts"
        );
        a.kernel = dir.path().join("missing");
        assert!(TemplateStore::identity(&a).is_err());
    }

    #[test]
    fn the_cached_identity_follows_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"kernel v1").unwrap();
        let mut config = VmConfig::new(&kernel);
        config.cpu_template = crate::CpuTemplate::Host;
        let store = TemplateStore::new(dir.path().join("templates"));
        let plain = TemplateStore::identity(&config).unwrap();
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
        assert_eq!(changed, TemplateStore::identity(&config).unwrap());
        // A corrupted cache entry is recomputed.
        for e in std::fs::read_dir(dir.path().join("templates/.digests")).unwrap() {
            std::fs::write(e.unwrap().path(), b"zz").unwrap();
        }
        assert_eq!(store.cached_identity(&config).unwrap(), changed);
    }

    #[test]
    fn staging_commit_list_discard() {
        let dir = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(dir.path().join("templates"));
        assert!(store.get("abc").is_none());
        let staged = store.staging("abc").unwrap();
        std::fs::write(staged.state(), b"s").unwrap();
        std::fs::write(staged.memory(), b"m").unwrap();
        assert!(store.list().is_empty(), "staging is not listed");
        let files = store.commit("abc", staged).unwrap();
        assert!(store.get("abc").is_some());
        assert_eq!(files.dir, dir.path().join("templates/abc"));
        let list = store.list();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].identity, "abc");
        assert!(store.disk_bytes() > 0);
        store.discard("abc").unwrap();
        assert!(store.get("abc").is_none());
        store.discard("abc").unwrap();
        assert_eq!(store.clear().unwrap(), 0);
    }
}
