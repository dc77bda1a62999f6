//! One pod at a time makes a template: an exclusive flock on
//! `<store>/.lock-<identity>`. Concurrent first pods of an identity wait
//! for it instead of all booting cold; the kernel releases the lock if the
//! holder dies.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::private;
use super::store::TemplateStore;

/// Pause between attempts to take a busy template lock.
pub(super) const LOCK_POLL: Duration = Duration::from_millis(500);

/// The lock of one identity, released on drop.
pub(super) struct TemplateLock {
    _file: File,
}

fn try_flock(path: &Path) -> anyhow::Result<Option<TemplateLock>> {
    use std::os::fd::AsRawFd;
    let file = private::open_marker(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on an fd this function owns; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(TemplateLock { _file: file }));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(e).with_context(|| format!("locking {}", path.display()))
    }
}

/// Takes the lock of `identity`, waiting up to `timeout` for another pod
/// making the template.
pub(super) async fn lock(
    store: &TemplateStore,
    identity: &str,
    timeout: Duration,
) -> anyhow::Result<TemplateLock> {
    // Templates hold guest memory: only root reads them (0700 whatever
    // the umask, and an older 0755 store is fixed).
    store
        .create_dir()
        .with_context(|| format!("creating {}", store.dir().display()))?;
    let path = store.dir().join(format!(".lock-{identity}"));
    let deadline = Instant::now() + timeout;
    let mut logged = false;
    loop {
        if let Some(lock) = try_flock(&path)? {
            return Ok(lock);
        }
        if !logged {
            tracing::info!(template = %identity, "another pod is making this VM template; waiting for it");
            logged = true;
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "{} still locked after {timeout:?} (another pod making the template)",
                path.display()
            );
        }
        tokio::time::sleep(LOCK_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_template_lock_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(dir.path().join("templates"));
        let held = lock(&store, "abc", Duration::from_secs(1)).await.unwrap();
        let err = lock(&store, "abc", Duration::from_millis(10))
            .await
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("still locked"), "{err:#}");
        // Another identity has its own lock.
        let _other = lock(&store, "def", Duration::from_secs(1)).await.unwrap();
        drop(held);
        lock(&store, "abc", Duration::from_secs(1)).await.unwrap();
        assert!(store.list().is_empty(), "lock files are not templates");
    }
}
