//! `ember check`: is this host ready to run Ember pods? KVM, the guest
//! kernel and initrd, the CPU template it resolves to, the state dir, and
//! how containerd's config registers Ember (a section containerd ignores
//! at the file's version is a failure that names the fix).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use ember_shim::config::Config;

/// KVM_GET_API_VERSION = _IO(KVMIO, 0x00).
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;

fn check_kvm() -> Result<String> {
    use std::os::fd::AsRawFd;
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .context("opening /dev/kvm")?;
    // SAFETY: a KVM ioctl without arguments on an fd we own.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if version != 12 {
        bail!("/dev/kvm answers API version {version}, expected 12");
    }
    Ok("/dev/kvm usable (API 12)".into())
}

fn check_file(what: &str, path: &Path, elf: bool) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("{what} {}", path.display()))?;
    let len = f.metadata()?.len();
    if elf {
        let mut magic = [0u8; 4];
        f.read_exact(&mut magic)
            .with_context(|| format!("reading {}", path.display()))?;
        if &magic != b"\x7fELF" {
            bail!(
                "{what} {} is not an uncompressed ELF vmlinux",
                path.display()
            );
        }
    }
    Ok(format!(
        "{what} {} ({:.1} MiB)",
        path.display(),
        len as f64 / (1 << 20) as f64
    ))
}

fn check_state_dir(dir: &Path) -> Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let probe = dir.join(format!(".ember-check-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| format!("writing in {}", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(format!("state dir {} writable", dir.display()))
}

/// Where containerd's config registers Ember (CONTAINERD_CONFIG, default
/// /etc/containerd/config.toml): a section containerd ignores at the
/// file's version, or a drop-in newer than the root config, fails.
fn check_containerd_config() -> Result<String> {
    let path = std::env::var_os("CONTAINERD_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/containerd/config.toml"));
    if !path.exists() {
        return Ok(format!(
            "no {} (containerd defaults: `ctr run --runtime {}` works, no CRI handler)",
            path.display(),
            ember_shim::RUNTIME_ID
        ));
    }
    let found = ember_shim::containerd_config::check(&path)?;
    if !found.problems.is_empty() {
        bail!("{}", found.problems.join("; "));
    }
    if found.handlers.is_empty() {
        return Ok(format!(
            "{} registers no CRI handler for Ember (deploy/containerd/register.sh adds `ember`)",
            path.display()
        ));
    }
    Ok(format!("CRI handlers: {}", found.handlers.join(", ")))
}

pub fn run() -> Result<ExitCode> {
    let (config, source) = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL config: {e:#}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let template = config.cpu_template.resolve();
    let checks: Vec<(&str, Result<String>)> = vec![
        ("config", Ok(format!("{source}"))),
        ("kvm", check_kvm()),
        ("kernel", check_file("guest kernel", &config.kernel, true)),
        ("initrd", check_file("initrd", &config.initrd, false)),
        (
            "cpu",
            Ok(format!(
                "CPU template {} resolves to {template}{}",
                config.cpu_template,
                if template == ember_vmm::CpuTemplate::Emulated {
                    " (no VT-x/AMD-V: guest kernel emulated, boots take minutes)"
                } else {
                    ""
                }
            )),
        ),
        ("state", check_state_dir(&config.state_dir)),
        ("cri", check_containerd_config()),
    ];
    let mut failed = false;
    for (name, r) in checks {
        match r {
            Ok(msg) => println!("ok   {name:<7} {msg}"),
            Err(e) => {
                failed = true;
                println!("FAIL {name:<7} {e:#}");
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        std::fs::write(&k, b"\x7fELF....").unwrap();
        assert!(check_file("guest kernel", &k, true).is_ok());
        std::fs::write(&k, b"MZ......").unwrap();
        assert!(check_file("guest kernel", &k, true).is_err());
        assert!(check_file("initrd", &dir.path().join("none"), false).is_err());
        assert!(check_state_dir(&dir.path().join("state")).is_ok());
    }
}
