//! A directory of VM templates: snapshots of freshly booted guests, one per
//! identity ([`super::identity`]). Pods restore from a template instead of
//! booting.
//!
//! Layout: `<dir>/<identity>/{state,memory}` (the VMM's
//! [`SnapshotFiles`]). A template is created in
//! `<dir>/.tmp-<identity>-<pid>` and renamed into place, so a half-written
//! one is never used; concurrent creators race benignly (the first rename
//! wins, the loser's copy is dropped). Beside the templates, names starting
//! with a dot: `.digests/` (see [`super::identity`]), `.lock-<identity>`
//! (see [`super::lock`]) and `.broken-<identity>`, the mark of an identity
//! whose template failed right after it was made.

use std::path::{Path, PathBuf};

use ember_vmm::{SnapshotFiles, VmConfig};

use super::identity::{identity_with, DIGEST_CACHE};
use super::private;

/// A file of the store could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("VM template store {}: {source}", path.display())]
pub struct StoreError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl StoreError {
    pub(super) fn at(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
        move |source| StoreError {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// One template on disk.
#[derive(Debug, Clone)]
pub struct TemplateInfo {
    pub identity: String,
    pub dir: PathBuf,
    /// Bytes actually allocated on disk (the memory file is sparse).
    pub disk_bytes: u64,
}

pub struct TemplateStore {
    dir: PathBuf,
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

fn is_complete(files: &SnapshotFiles) -> bool {
    files.state().is_file() && files.memory().is_file()
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
    pub fn create_dir(&self) -> Result<(), StoreError> {
        private::create_dir(&self.dir).map_err(StoreError::at(&self.dir))
    }

    /// [`super::identity`], reusing the content digests of kernel and
    /// initrd remembered in this store (`.digests/`) while the files are
    /// unchanged.
    pub fn cached_identity(&self, config: &VmConfig) -> Result<String, StoreError> {
        identity_with(config, Some(&self.dir.join(DIGEST_CACHE)))
    }

    /// The template for `identity`, if a complete one exists.
    pub fn get(&self, identity: &str) -> Option<SnapshotFiles> {
        let files = SnapshotFiles::new(self.dir.join(identity));
        is_complete(&files).then_some(files)
    }

    /// Where to write a new template; pass the result to [`Self::commit`].
    pub fn staging(&self, identity: &str) -> Result<SnapshotFiles, StoreError> {
        self.create_dir()?;
        let dir = self
            .dir
            .join(format!(".tmp-{identity}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        private::create_dir(&dir).map_err(StoreError::at(&dir))?;
        Ok(SnapshotFiles::new(dir))
    }

    /// Moves a written staging snapshot into place.
    pub fn commit(
        &self,
        identity: &str,
        staged: SnapshotFiles,
    ) -> Result<SnapshotFiles, StoreError> {
        let target = self.dir.join(identity);
        match std::fs::rename(&staged.dir, &target) {
            Ok(()) => Ok(SnapshotFiles::new(target)),
            Err(_) if self.get(identity).is_some() => {
                // Another process committed the same template first.
                let _ = std::fs::remove_dir_all(&staged.dir);
                Ok(SnapshotFiles::new(target))
            }
            Err(e) => Err(StoreError::at(&target)(e)),
        }
    }

    /// Removes a template that failed to restore (corrupted, truncated).
    pub fn discard(&self, identity: &str) -> Result<(), StoreError> {
        let dir = self.dir.join(identity);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::at(&dir)(e)),
        }
    }

    fn broken_mark(&self, identity: &str) -> PathBuf {
        self.dir.join(format!(".broken-{identity}"))
    }

    /// Whether a template of `identity` failed right after it was made:
    /// its pods boot cold instead of making it again.
    pub fn is_broken(&self, identity: &str) -> bool {
        self.broken_mark(identity).exists()
    }

    /// Marks `identity` broken (see [`Self::is_broken`]).
    pub fn mark_broken(&self, identity: &str) -> Result<(), StoreError> {
        let path = self.broken_mark(identity);
        private::open_marker(&path)
            .map(drop)
            .map_err(StoreError::at(&path))
    }

    /// Lets pods of `identity` make its template again.
    pub fn unmark_broken(&self, identity: &str) -> Result<(), StoreError> {
        let path = self.broken_mark(identity);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::at(&path)(e)),
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
                is_complete(&SnapshotFiles::new(&dir)).then(|| TemplateInfo {
                    identity: name,
                    disk_bytes: disk_usage(&dir),
                    dir,
                })
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// Removes every template (and leftover staging directories, marks and
    /// locks).
    pub fn clear(&self) -> Result<usize, StoreError> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(0);
        };
        let mut n = 0;
        for e in entries.flatten() {
            let path = e.path();
            std::fs::remove_dir_all(&path).map_err(StoreError::at(&path))?;
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
    use std::os::unix::fs::PermissionsExt;

    use super::*;

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

    #[test]
    fn a_broken_mark_is_per_identity_and_not_a_template() {
        let dir = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(dir.path().join("templates"));
        store.create_dir().unwrap();
        assert!(!store.is_broken("abc"));
        store.mark_broken("abc").unwrap();
        store.mark_broken("abc").unwrap();
        assert!(store.is_broken("abc"));
        assert!(!store.is_broken("def"));
        assert!(store.list().is_empty(), "a mark is not a template");
        store.unmark_broken("abc").unwrap();
        assert!(!store.is_broken("abc"));
        store.unmark_broken("abc").unwrap();
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

    /// Templates hold guest memory: whatever the umask, and whoever
    /// creates the store first (the digest cache or a snapshot), the store,
    /// its digest cache and each template directory are 0700, cache
    /// entries and marks 0600 (the VMM makes the snapshot files 0600).
    #[test]
    fn the_store_is_private_whatever_the_umask() {
        let _umask = Umask::set(0);
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"kernel").unwrap();
        let store = TemplateStore::new(dir.path().join("templates"));
        // The digest cache is what creates the store on a fresh host.
        store.cached_identity(&VmConfig::new(&kernel)).unwrap();
        assert_eq!(mode(store.dir()), 0o700);
        let digests = store.dir().join(DIGEST_CACHE);
        assert_eq!(mode(&digests), 0o700);
        for e in std::fs::read_dir(&digests).unwrap() {
            assert_eq!(mode(&e.unwrap().path()), 0o600);
        }
        // A store left 0755 by an older version is fixed.
        std::fs::set_permissions(store.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let staged = store.staging("abc").unwrap();
        assert_eq!(mode(store.dir()), 0o700);
        assert_eq!(mode(&staged.dir), 0o700);
        std::fs::write(staged.state(), b"s").unwrap();
        std::fs::write(staged.memory(), b"m").unwrap();
        let files = store.commit("abc", staged).unwrap();
        assert_eq!(mode(&files.dir), 0o700);
        store.mark_broken("abc").unwrap();
        assert_eq!(mode(&store.broken_mark("abc")), 0o600);
    }
}
