//! The tap backend and the [`NetBackend`] seam.
//!
//! A [`Tap`] is `/dev/net/tun` opened non-blocking with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, `TUNSETVNETHDRSZ 12` and
//! `TUNSETOFFLOAD 0`: every frame read or written carries a 12-byte
//! `virtio_net_hdr_v1` in front (the tap fills the first 10 bytes and skips
//! the last 2), and with no offloads enabled the kernel hands us only
//! complete, fully checksummed frames, so the header it writes has no GSO
//! type and no NEEDS_CSUM flag. The only header fields the device looks at
//! are single bytes, so the tap's vnet header endianness does not matter.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::{netns, NetError, VNET_HDR_LEN};

/// What the device reads frames from and writes frames to. Frames cross
/// this seam with the 12-byte vnet header in front (see the module docs).
pub trait NetBackend: Send {
    /// Reads one frame (vnet header included) into `buf`, without blocking.
    /// Returns the frame's full length, which is larger than `buf.len()` if
    /// the frame was truncated (the device then drops it).
    /// `ErrorKind::WouldBlock` when no frame is waiting; `Ok(0)` means the
    /// backend is gone for good.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame (vnet header included), without blocking.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// The descriptor the worker polls for readability.
    fn raw_fd(&self) -> RawFd;
    /// A name for log messages.
    fn name(&self) -> &str {
        "backend"
    }
}

/// `struct ifreq` with the `ifr_flags` member of its union.
#[repr(C)]
pub(crate) struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    pub(crate) flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    /// A zeroed request for `name`, which must have been validated.
    pub(crate) fn new(name: &str) -> Self {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // Validation keeps at least one trailing NUL.
        for (dst, &src) in req.name.iter_mut().zip(name.as_bytes()) {
            *dst = src as libc::c_char;
        }
        req
    }

    fn name(&self) -> String {
        let bytes: Vec<u8> = self
            .name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Checks `name` the way Linux's `dev_valid_name` does (a `%d` template
/// such as `tap%d` is allowed: the kernel picks the number).
pub(crate) fn validate_ifname(name: &str) -> Result<(), NetError> {
    let bad = name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if bad {
        Err(NetError::InvalidTapName(name.to_string()))
    } else {
        Ok(())
    }
}

/// A tap device opened for one virtio-net device. Closing it (dropping the
/// `Tap`) deletes the interface unless it was made persistent elsewhere
/// (e.g. `ip tuntap add`).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates the tap `name` in the calling thread's network namespace,
    /// or attaches to an existing persistent tap of that name (which must
    /// not be attached to another file: `EBUSY`). The interface is left
    /// administratively down: bring it up (netlink, or `set_link_up` in tests).
    pub fn open(name: &str) -> Result<Tap, NetError> {
        validate_ifname(name)?;
        let err = |op: &'static str| {
            move |source: io::Error| NetError::Tap {
                name: name.to_string(),
                op,
                source,
            }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(err("open /dev/net/tun"))?;
        let fd = file.as_raw_fd();

        let mut req = IfReq::new(name);
        req.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is an
        // initialized, correctly sized ifreq that outlives the call.
        let r = unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(err("TUNSETIFF (create or attach)")(
                io::Error::last_os_error(),
            ));
        }
        let actual = req.name();

        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points to a live local.
        let r = unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &hdr_len as *const libc::c_int) };
        if r < 0 {
            return Err(err("TUNSETVNETHDRSZ")(io::Error::last_os_error()));
        }
        // SAFETY: TUNSETOFFLOAD takes the offload flags as the argument
        // value itself (no memory is accessed).
        let r = unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, 0 as libc::c_ulong) };
        if r < 0 {
            return Err(err("TUNSETOFFLOAD")(io::Error::last_os_error()));
        }
        tracing::debug!(tap = %actual, "net: tap opened");
        Ok(Tap { file, name: actual })
    }

    /// [`Tap::open`] inside the network namespace at `netns` (e.g.
    /// `/var/run/netns/<name>` or `/proc/<pid>/ns/net`), from a short-lived
    /// thread; the calling thread's namespace is untouched. The returned
    /// descriptor keeps working from any namespace; the interface lives in
    /// `netns`.
    pub fn open_in_netns(netns: &Path, name: &str) -> Result<Tap, NetError> {
        validate_ifname(name)?;
        netns::in_netns(netns, || Tap::open(name)).map_err(|source| NetError::Netns {
            path: netns.display().to_string(),
            source,
        })?
    }

    /// The interface name given by the kernel.
    pub fn if_name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Not `Read::read`: tun reports the full length of a frame it had
        // to truncate, which would be larger than `buf`.
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`,
        // which is valid for writes of that length.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: the kernel reads at most `frame.len()` bytes from
        // `frame`, which is valid for reads of that length.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else if n as usize != frame.len() {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short tap write: {n} of {} bytes", frame.len()),
            ))
        } else {
            Ok(())
        }
    }

    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// Sets `IFF_UP` on the interface `name` of the calling thread's network
/// namespace (run it through [`netns::in_netns`] for another one). The
/// shim brings taps up with netlink; the device tests use this.
#[cfg(test)]
pub fn set_link_up(name: &str) -> io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    validate_ifname(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: plain socket creation; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq::new(name);
    // SAFETY: SIOCGIFFLAGS reads and writes a `struct ifreq`; `req` is an
    // initialized, correctly sized ifreq that outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req as *mut IfReq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    req.flags |= libc::IFF_UP as libc::c_short;
    // SAFETY: as above, for SIOCSIFFLAGS.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req as *mut IfReq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
