//! The guest console's log file, capped and rotated: the guest decides
//! what it prints, and the log often lives on a tmpfs (host RAM), so it
//! must not grow without bound.
//!
//! `console.log` grows to `max_bytes`, then its content moves to
//! `console.log.1` (replacing the previous one) and `console.log` starts
//! empty again. A pod's
//! console therefore never takes more than twice `max_bytes` on the host,
//! and the newest output is always kept. Rotation cuts at the byte where
//! the cap is reached, so a line may be split across the two files.
//! Both files are created 0600: the console may show whatever the guest
//! holds.
//!
//! Writes happen on a vCPU thread, whose seccomp filter allows no open or
//! rename (`crate::confine`): both files are opened when the log is, and
//! rotation only reads, writes, seeks and truncates those two descriptors.

use std::ffi::OsString;
use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Default cap of one console log file: 1 MiB (the pod's console takes at
/// most 2 MiB with the rotated file).
pub const DEFAULT_MAX_BYTES: u64 = 1 << 20;
/// Smallest cap accepted: a kernel panic's backtrace must fit.
pub const MIN_MAX_BYTES: u64 = 4096;

/// An append-only log file of at most `max_bytes`, with one rotated file.
pub struct CappedLog {
    max_bytes: u64,
    /// `console.log`, read and append.
    file: File,
    /// `console.log.1`, read and write.
    rotated: File,
    size: u64,
}

fn open_private(path: &Path, append: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(append)
        .write(!append)
        .mode(0o600)
        .open(path)?;
    // `mode` applies only to a file this call created: fix an older one.
    file.set_permissions(Permissions::from_mode(0o600))?;
    Ok(file)
}

/// `<path>.1`.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut s: OsString = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

impl CappedLog {
    /// Opens (appending to) `path`; `max_bytes` is raised to
    /// [`MIN_MAX_BYTES`] if smaller. A file already over the cap is
    /// rotated at the next write.
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<Self> {
        let file = open_private(path, true)?;
        let rotated = open_private(&rotated_path(path), false)?;
        let size = file.metadata()?.len();
        Ok(Self {
            max_bytes: max_bytes.max(MIN_MAX_BYTES),
            file,
            rotated,
            size,
        })
    }

    /// Moves the content of `console.log` into `console.log.1` and empties
    /// `console.log`, through the two open descriptors only.
    fn rotate(&mut self) -> io::Result<()> {
        self.rotated.set_len(0)?;
        self.rotated.seek(SeekFrom::Start(0))?;
        self.file.seek(SeekFrom::Start(0))?;
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = self.file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            self.rotated.write_all(&buf[..n])?;
        }
        // Appends go to the end, which is now 0.
        self.file.set_len(0)?;
        self.size = 0;
        Ok(())
    }
}

impl Write for CappedLog {
    /// Takes all of `buf` (or fails): bytes beyond what two files can hold
    /// would be rotated away at once, so only the newest `max_bytes` of a
    /// huge `buf` are written.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let skip = buf
            .len()
            .saturating_sub(usize::try_from(self.max_bytes).unwrap_or(usize::MAX));
        let mut rest = &buf[skip..];
        while !rest.is_empty() {
            if self.size >= self.max_bytes {
                self.rotate()?;
            }
            let room = usize::try_from(self.max_bytes - self.size).unwrap_or(usize::MAX);
            let (now, later) = rest.split_at(rest.len().min(room));
            self.file.write_all(now)?;
            self.size += now.len() as u64;
            rest = later;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn sizes(path: &Path) -> (u64, u64) {
        let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        (len(path), len(&rotated_path(path)))
    }

    #[test]
    fn rotates_at_the_cap_and_keeps_the_newest_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let cap = MIN_MAX_BYTES;
        let mut log = CappedLog::open(&path, cap).unwrap();
        // Lines of 100 bytes, the last one partial: 10 caps' worth.
        let mut written = Vec::new();
        for i in 0..(10 * cap / 100) {
            let line = format!("{i:>99}\n");
            let part = if i % 7 == 3 { &line[..40] } else { &line[..] };
            // Byte by byte, as the UART hands them over, for some lines.
            if i % 5 == 0 {
                for b in part.bytes() {
                    log.write_all(&[b]).unwrap();
                }
            } else {
                log.write_all(part.as_bytes()).unwrap();
            }
            written.extend_from_slice(part.as_bytes());
            let (cur, old) = sizes(&path);
            assert!(cur <= cap && old <= cap, "{cur} {old} over the cap {cap}");
        }
        let (cur, old) = sizes(&path);
        assert_eq!(old, cap, "a full rotated file");
        let mut kept = std::fs::read(rotated_path(&path)).unwrap();
        kept.extend(std::fs::read(&path).unwrap());
        assert_eq!(kept.len() as u64, cap + cur);
        assert!(
            written.ends_with(&kept),
            "the two files hold the newest bytes, in order"
        );
    }

    #[test]
    fn one_write_larger_than_the_cap_keeps_its_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let cap = MIN_MAX_BYTES;
        let mut log = CappedLog::open(&path, cap).unwrap();
        log.write_all(b"old\n").unwrap();
        let big: Vec<u8> = (0..(cap * 5 + 17)).map(|i| (i % 251) as u8).collect();
        assert_eq!(log.write(&big).unwrap(), big.len());
        let (cur, old) = sizes(&path);
        assert!(cur <= cap && old <= cap, "{cur} {old}");
        let mut kept = std::fs::read(rotated_path(&path)).unwrap();
        kept.extend(std::fs::read(&path).unwrap());
        let tail = &big[big.len() - cap as usize..];
        assert!(
            kept.ends_with(tail),
            "the last cap's worth of the write is kept"
        );
    }

    #[test]
    fn a_reopened_log_counts_what_is_there_and_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, vec![b'x'; MIN_MAX_BYTES as usize - 10]).unwrap();
        std::fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        let mut log = CappedLog::open(&path, 0).unwrap();
        log.write_all(&[b'y'; 20]).unwrap();
        let (cur, old) = sizes(&path);
        assert_eq!(
            (cur, old),
            (10, MIN_MAX_BYTES),
            "the cap is raised to the minimum"
        );
        for p in [path.clone(), rotated_path(&path)] {
            assert_eq!(
                std::fs::metadata(&p).unwrap().mode() & 0o777,
                0o600,
                "{p:?}"
            );
        }
    }
}
