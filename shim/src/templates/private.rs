//! Files and directories of the template store are root's alone: templates
//! hold guest memory. These create them 0600 / 0700 whatever the umask, and
//! fix the mode of ones an older version left readable.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates directory `path` (and missing parents, 0700 too) and makes it
/// 0700 whatever the umask or its mode before.
pub(super) fn create_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

/// Creates (or truncates) `path` for writing, 0600 whatever the umask.
pub(super) fn create_file(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // `mode` applies only to a file this call created: fix an older one.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

/// Opens `path` for writing without truncating it (lock files, marks),
/// created 0600 whatever the umask.
pub(super) fn open_marker(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
}
