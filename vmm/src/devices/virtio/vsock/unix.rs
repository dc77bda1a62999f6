//! Host side Unix sockets: the device's listener and small syscall helpers.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::VsockError;

/// The device's listening socket. Removes its socket file when dropped, if
/// the file at the path is still the one it bound.
#[derive(Debug)]
pub(crate) struct HostListener {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file we created.
    ident: Option<(u64, u64)>,
}

impl HostListener {
    /// Binds `path`. A stale socket file (nobody accepts on it) is removed
    /// first; a live listener is `AddrInUse`; any other file is left alone.
    pub(crate) fn bind(path: &Path) -> Result<Self, VsockError> {
        if path.as_os_str().as_bytes().len() >= max_path_len() {
            return Err(VsockError::PathTooLong(path.to_path_buf()));
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) => {
                if !meta.file_type().is_socket() {
                    return Err(VsockError::NotASocket(path.to_path_buf()));
                }
                match connect_nonblocking(path) {
                    // Someone accepts (or at least queues) connections here.
                    Ok(_probe) => return Err(VsockError::AddrInUse(path.to_path_buf())),
                    // A full backlog also means a live listener.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Err(VsockError::AddrInUse(path.to_path_buf()))
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                        tracing::info!(path = %path.display(), "removing stale vsock socket");
                        std::fs::remove_file(path).map_err(|source| VsockError::Bind {
                            path: path.to_path_buf(),
                            source,
                        })?;
                    }
                    Err(source) => {
                        return Err(VsockError::Bind {
                            path: path.to_path_buf(),
                            source,
                        })
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(VsockError::Bind {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        let listener = UnixListener::bind(path).map_err(|source| {
            if source.kind() == io::ErrorKind::AddrInUse {
                VsockError::AddrInUse(path.to_path_buf())
            } else {
                VsockError::Bind {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| VsockError::Bind {
                path: path.to_path_buf(),
                source,
            })?;
        let ident = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            ident,
        })
    }

    /// Accepts one pending connection, as a non-blocking stream.
    pub(crate) fn accept(&self) -> io::Result<UnixStream> {
        let (stream, _) = self.listener.accept()?;
        stream.set_nonblocking(true)?;
        Ok(stream)
    }

    pub(crate) fn as_raw_fd(&self) -> i32 {
        self.listener.as_raw_fd()
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        let ours = match std::fs::symlink_metadata(&self.path) {
            Ok(m) => self.ident == Some((m.dev(), m.ino())),
            Err(_) => false,
        };
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), "cannot remove vsock socket: {e}");
            }
        }
    }
}

fn max_path_len() -> usize {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_path.len()
}

/// Connects to a Unix stream socket without ever blocking: a listener whose
/// backlog is full gives `WouldBlock` instead of stalling the caller.
pub(crate) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "invalid Unix socket path",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain syscall with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket() and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    loop {
        // SAFETY: `addr` is a valid, initialised sockaddr_un that outlives
        // the call and `len` does not exceed its size (checked above).
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                len as libc::socklen_t,
            )
        };
        if rc == 0 {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return Err(err);
    }
    Ok(UnixStream::from(fd))
}

/// `send(2)` with `MSG_NOSIGNAL`: a peer that went away gives `EPIPE`, never
/// a SIGPIPE that would kill the process.
pub(crate) fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid readable slice for `buf.len()` bytes and
        // the fd is owned by `stream`, alive for the call.
        let rc = unsafe {
            libc::send(
                stream.as_raw_fd(),
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Whether both directions of `stream` are shut (the peer closed it, or it
/// half-closed and we shut our write side): `POLLHUP` right now.
pub(crate) fn is_hung_up(stream: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd that outlives the call, the count
    // is 1 and the timeout 0, so poll does not block.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    rc > 0 && pfd.revents & libc::POLLHUP != 0
}
