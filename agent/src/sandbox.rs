//! Sandbox-wide setup: guest mounts (AddMounts, the shared virtio-fs
//! directory), hostname and DNS.

use std::path::Path;

use ember_proto::agent::Mount;
use nix::mount::MsFlags;
use ttrpc::Code;

use crate::container::{mountopts, spec};
use crate::service::rpc_error;

/// virtio-fs tag of the per-VM share the shim exports.
pub const SHARED_TAG: &str = "ember";

/// Mount `m` on `target` (created with its parents if missing). Bind
/// sources under `/run/ember/shared` are rewritten to `shared_dir`.
pub fn mount(m: &Mount, target: &Path, shared_dir: &Path) -> ttrpc::Result<()> {
    if !target.is_absolute() {
        return Err(rpc_error(
            Code::INVALID_ARGUMENT,
            format!("mount target {:?} must be absolute", m.target),
        ));
    }
    let opts = mountopts::parse(&m.options);
    let bind = m.fstype == "bind" || m.fstype == "rbind" || opts.bind;
    let source = if bind {
        spec::rewrite_shared(Path::new(&m.source), shared_dir)
    } else {
        Path::new(&m.source).to_path_buf()
    };
    if bind {
        // Bind targets mirror their source's type.
        if source.is_dir() || !source.exists() {
            std::fs::create_dir_all(target).ok();
        } else if !target.exists() {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).ok();
            }
            std::fs::File::create(target).ok();
        }
    } else {
        std::fs::create_dir_all(target).ok();
    }
    let fail = |what: &str, e: nix::Error| {
        rpc_error(
            Code::INTERNAL,
            format!(
                "{what} {} on {} (type {}): {e}",
                source.display(),
                target.display(),
                m.fstype
            ),
        )
    };
    if bind {
        let recursive = opts.recursive || m.fstype == "rbind" || !opts.bind;
        let mut flags = MsFlags::MS_BIND;
        if recursive {
            flags |= MsFlags::MS_REC;
        }
        nix::mount::mount(Some(&source), target, None::<&str>, flags, None::<&str>)
            .map_err(|e| fail("mount", e))?;
        if let Some(f) = mountopts::bind_remount_flags(&opts) {
            nix::mount::mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::from_bits_truncate(f),
                None::<&str>,
            )
            .map_err(|e| fail("remount", e))?;
        }
    } else {
        let data = (!opts.data.is_empty()).then_some(opts.data.as_str());
        nix::mount::mount(
            Some(&source),
            target,
            Some(m.fstype.as_str()),
            MsFlags::from_bits_truncate(opts.flags),
            data,
        )
        .map_err(|e| fail("mount", e))?;
    }
    for p in &opts.propagation {
        nix::mount::mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::from_bits_truncate(*p),
            None::<&str>,
        )
        .map_err(|e| fail("propagation of", e))?;
    }
    Ok(())
}

/// Mount the per-VM virtio-fs share at `dir` (best effort, at boot).
/// Brings the loopback interface up. Containers that keep the guest's root
/// network namespace (every container of a pod) expect 127.0.0.1 to work,
/// as it does in a pod's network namespace on a node. Best effort: logged.
pub fn loopback_up() {
    match set_interface_up("lo") {
        Ok(()) => tracing::info!("loopback interface up"),
        Err(e) => tracing::warn!("bringing up the loopback interface: {e}"),
    }
}

fn set_interface_up(name: &str) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the fd is checked and then owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the named interface's flags into `req`,
    // which outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads `req` (name and flags) only.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn mount_shared(dir: &Path) {
    let mut m = Mount::new();
    m.fstype = "virtiofs".into();
    m.source = SHARED_TAG.into();
    match mount(&m, dir, dir) {
        Ok(()) => tracing::info!("virtio-fs {SHARED_TAG:?} mounted on {}", dir.display()),
        Err(e) => tracing::info!(
            "no shared directory: {} (continuing; AddMounts can mount it later)",
            e.message()
        ),
    }
}

trait Message {
    fn message(&self) -> String;
}

impl Message for ttrpc::Error {
    fn message(&self) -> String {
        match self {
            ttrpc::Error::RpcStatus(s) => s.message().to_string(),
            other => other.to_string(),
        }
    }
}

/// Validate a hostname (RFC 1123-ish, at most 64 bytes).
pub fn validate_hostname(h: &str) -> ttrpc::Result<()> {
    let ok = !h.is_empty()
        && h.len() <= 64
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(rpc_error(
            Code::INVALID_ARGUMENT,
            format!("invalid hostname {h:?}"),
        ))
    }
}

/// resolv.conf content.
pub fn resolv_conf(
    nameservers: &[String],
    searches: &[String],
    options: &[String],
) -> ttrpc::Result<String> {
    let mut s = String::new();
    for n in nameservers {
        if n.parse::<std::net::IpAddr>().is_err() {
            return Err(rpc_error(
                Code::INVALID_ARGUMENT,
                format!("invalid nameserver {n:?}"),
            ));
        }
        s.push_str(&format!("nameserver {n}\n"));
    }
    let bad = |v: &String| v.is_empty() || v.contains(char::is_whitespace);
    if let Some(b) = searches.iter().chain(options).find(|v| bad(v)) {
        return Err(rpc_error(
            Code::INVALID_ARGUMENT,
            format!("invalid search/option {b:?}"),
        ));
    }
    if !searches.is_empty() {
        s.push_str(&format!("search {}\n", searches.join(" ")));
    }
    if !options.is_empty() {
        s.push_str(&format!("options {}\n", options.join(" ")));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_up(name: &str) -> bool {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // SAFETY: as in set_interface_up.
        let sock =
            unsafe { OwnedFd::from_raw_fd(libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0)) };
        // SAFETY: plain data.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        // SAFETY: reads flags into req.
        assert!(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } >= 0);
        // SAFETY: filled by SIOCGIFFLAGS.
        unsafe { req.ifr_ifru.ifru_flags & libc::IFF_UP as libc::c_short != 0 }
    }

    #[test]
    fn loopback_comes_up_in_a_fresh_network_namespace() {
        // A new network namespace starts with lo down, like a fresh guest.
        let res = std::thread::spawn(|| {
            // SAFETY: unshare affects only this short-lived thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return None; // not root / no namespaces: nothing to check
            }
            let before = is_up("lo");
            set_interface_up("lo").unwrap();
            Some((before, is_up("lo")))
        })
        .join()
        .unwrap();
        if let Some((before, after)) = res {
            assert!(!before, "lo starts down in a new netns");
            assert!(after, "lo is up afterwards");
        } else {
            eprintln!("SKIPPED: cannot create a network namespace here");
        }
        assert!(set_interface_up("no-such-if0").is_err());
        assert!(set_interface_up("a-name-much-too-long-for-ifreq").is_err());
    }

    #[test]
    fn dns_and_hostname() {
        let r = resolv_conf(
            &["10.0.0.1".into(), "fd00::1".into()],
            &["a.local".into()],
            &["ndots:5".into()],
        )
        .unwrap();
        assert_eq!(
            r,
            "nameserver 10.0.0.1\nnameserver fd00::1\nsearch a.local\noptions ndots:5\n"
        );
        assert!(resolv_conf(&["x".into()], &[], &[]).is_err());
        assert!(resolv_conf(&[], &["a b".into()], &[]).is_err());
        assert!(validate_hostname("pod-1.example").is_ok());
        assert!(validate_hostname("").is_err());
        assert!(validate_hostname("a b").is_err());
    }
}
