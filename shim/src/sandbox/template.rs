//! Pod VMs from templates: [`boot_or_restore`] is how a pod's VM comes up.
//!
//! The first pod of an identity (kernel, initrd with the agent, VM shape;
//! [`TemplateStore::identity`]) boots cold ([`super::boot`]), and once its
//! agent answers the VM is snapshotted into the template store and this
//! pod's VM is restored from the new template (taking a snapshot ends the
//! VM). Later pods of that identity restore from the template, which takes
//! well under a second instead of a boot. A per-identity lock file keeps
//! concurrent first pods from all booting cold: the others wait for the
//! template.
//!
//! Every VM, restored or not, is then made the pod's own
//! ([`super::boot::personalize`]): clock, fresh entropy with a CRNG reseed,
//! hostname. The vsock device already reset the guest's transport at
//! restore, so no connection of the template survives.
//!
//! A template that cannot be used — another identity or format version,
//! truncated or corrupted, a restore that fails, an agent that does not
//! answer within `template_restore_timeout_secs`, or a guest that cannot be
//! made the pod's own — is logged, discarded, and the pod boots cold. A
//! template that cannot be written, or fails right after it was made, marks
//! its identity broken
//! (`.broken-<identity>` in the store, removed by `ember templates drop`),
//! so later pods boot cold instead of making it again.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use ember_vmm::snapshot::store::TemplateStore;
use ember_vmm::timing::fmt_duration;
use ember_vmm::{SnapshotFiles, Vm, VmConfig, VmError};

use super::boot::{self, await_agent, personalize, start_vm, BootError, BootReport, BootedVm};
use crate::config::Config;

/// Pause between attempts to take a busy template lock.
const LOCK_POLL: Duration = Duration::from_millis(500);

/// How the VM came to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Booted, templates off or unusable (the reason is logged).
    Cold,
    /// Restored from template `identity`; `created` when this pod booted
    /// the VM the template was made of.
    Restored { identity: String, created: bool },
}

/// How long each phase of bringing up a pod's VM took.
#[derive(Debug, Clone)]
pub struct LaunchReport {
    pub origin: Origin,
    /// Computing the template identity (hashing kernel and initrd unless
    /// their digests are cached).
    pub identity: Option<Duration>,
    /// Waiting for another pod making the same template.
    pub lock_wait: Option<Duration>,
    /// The cold boot, if there was one (the last one, after a fallback).
    pub cold: Option<BootReport>,
    /// Writing the template.
    pub snapshot: Option<Duration>,
    /// Restoring: VMM setup from the template files.
    pub restore: Option<Duration>,
    /// Restore start to the agent answering.
    pub restore_agent: Option<Duration>,
    /// Clock, entropy and hostname.
    pub personalize: Duration,
    /// Everything, from the call to a usable VM.
    pub total: Duration,
}

impl std::fmt::Display for LaunchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = |d: Option<Duration>| fmt_duration(d);
        match &self.origin {
            Origin::Cold => write!(f, "cold boot")?,
            Origin::Restored {
                identity,
                created: false,
            } => write!(f, "restored from template {identity}")?,
            Origin::Restored {
                identity,
                created: true,
            } => write!(f, "booted, made template {identity}, restored")?,
        }
        write!(f, ": total={}", d(Some(self.total)))?;
        if self.identity.is_some() {
            write!(f, " identity={}", d(self.identity))?;
        }
        if self.lock_wait.is_some() {
            write!(f, " template-lock-wait={}", d(self.lock_wait))?;
        }
        if let Some(cold) = &self.cold {
            write!(f, " [boot {cold}]")?;
        }
        if self.snapshot.is_some() {
            write!(f, " snapshot={}", d(self.snapshot))?;
        }
        if self.restore.is_some() {
            write!(
                f,
                " restore={} restore-to-agent={}",
                d(self.restore),
                d(self.restore_agent)
            )?;
        }
        write!(f, " personalize={}", d(Some(self.personalize)))
    }
}

/// A pod's VM, its agent answering, made the pod's own.
pub struct Launched {
    pub booted: BootedVm,
    pub report: LaunchReport,
}

/// Brings up a pod's VM from its template, making the template first if
/// there is none, or boots it cold (templates off, or the template is
/// unusable). Only a failed cold boot is an error.
pub async fn boot_or_restore(
    config: &Config,
    vm_config: VmConfig,
    hostname: &str,
) -> Result<Launched, BootError> {
    let started = Instant::now();
    let mut report = LaunchReport {
        origin: Origin::Cold,
        identity: None,
        lock_wait: None,
        cold: None,
        snapshot: None,
        restore: None,
        restore_agent: None,
        personalize: Duration::ZERO,
        total: Duration::ZERO,
    };
    let booted = if config.templates {
        from_template(config, vm_config, hostname, &mut report).await?
    } else {
        cold(config, vm_config, hostname, &mut report).await?
    };
    report.total = started.elapsed();
    Ok(Launched { booted, report })
}

/// A cold boot, personalized (failures there are logged: a cold-booted
/// guest has its own entropy anyway).
async fn cold(
    config: &Config,
    vm_config: VmConfig,
    hostname: &str,
    report: &mut LaunchReport,
) -> Result<BootedVm, BootError> {
    let booted = start_vm(vm_config, config.boot_timeout()).await?;
    report.cold = Some(booted.report);
    report.origin = Origin::Cold;
    let t = Instant::now();
    for e in personalize(&booted.agent, Some(hostname)).await {
        tracing::warn!("{e:#}");
    }
    report.personalize = t.elapsed();
    Ok(booted)
}

async fn from_template(
    config: &Config,
    vm_config: VmConfig,
    hostname: &str,
    report: &mut LaunchReport,
) -> Result<BootedVm, BootError> {
    let t = Instant::now();
    let cfg = vm_config.clone();
    let dir = config.template_dir.clone();
    let identity =
        match tokio::task::spawn_blocking(move || TemplateStore::new(dir).cached_identity(&cfg))
            .await
        {
            Ok(Ok(id)) => id,
            Ok(Err(e)) => {
                tracing::warn!("no VM template (cannot compute its identity: {e}); booting cold");
                return cold(config, vm_config, hostname, report).await;
            }
            Err(e) => {
                tracing::warn!("no VM template (identity task: {e}); booting cold");
                return cold(config, vm_config, hostname, report).await;
            }
        };
    report.identity = Some(t.elapsed());
    let store = TemplateStore::new(&config.template_dir);

    // The usual case: the template exists.
    if let Some(files) = store.get(&identity) {
        match restore(config, &vm_config, files, &identity, hostname, report).await {
            Ok(booted) => {
                report.origin = Origin::Restored {
                    identity,
                    created: false,
                };
                return Ok(booted);
            }
            Err(e) => {
                if !refuse(&store, &identity, &e) {
                    return cold(config, vm_config, hostname, report).await;
                }
            }
        }
    }
    if broken_marker(&store, &identity).exists() {
        tracing::info!(
            template = %identity,
            "a template of this identity failed right after it was made; booting cold \
             (`ember templates drop` lets pods try again)"
        );
        return cold(config, vm_config, hostname, report).await;
    }

    // Make the template, one pod at a time.
    let t = Instant::now();
    let lock = match lock(&store, &identity, config.boot_timeout()).await {
        Ok(lock) => lock,
        Err(e) => {
            tracing::warn!(template = %identity, "no VM template: {e:#}; booting cold");
            return cold(config, vm_config, hostname, report).await;
        }
    };
    if t.elapsed() > LOCK_POLL {
        report.lock_wait = Some(t.elapsed());
    }
    if let Some(files) = store.get(&identity) {
        // Another pod made it while this one waited.
        drop(lock);
        return match restore(config, &vm_config, files, &identity, hostname, report).await {
            Ok(booted) => {
                report.origin = Origin::Restored {
                    identity,
                    created: false,
                };
                Ok(booted)
            }
            Err(e) => {
                refuse(&store, &identity, &e);
                cold(config, vm_config, hostname, report).await
            }
        };
    }

    let booted = start_vm(vm_config.clone(), config.boot_timeout()).await?;
    report.cold = Some(booted.report);
    // The template gets the host's clock and entropy now, so its guest
    // never waits for either; every restore refreshes both.
    for e in personalize(&booted.agent, None).await {
        tracing::warn!("{e:#}");
    }
    let files = match make_template(&store, &identity, booted, report).await {
        Ok(files) => files,
        Err(e) => {
            // Taking a snapshot ends the VM: boot again. Mark the identity
            // broken, or every first pod would boot twice.
            tracing::error!(
                template = %identity,
                "making the VM template failed: {e:#}; booting this pod cold, marking the \
                 identity broken (later pods boot cold until `ember templates drop`)"
            );
            if let Err(e) = mark_broken(&store, &identity) {
                tracing::warn!("marking template {identity} broken: {e}");
            }
            drop(lock);
            return cold(config, vm_config, hostname, report).await;
        }
    };
    drop(lock);
    match restore(config, &vm_config, files, &identity, hostname, report).await {
        Ok(booted) => {
            report.origin = Origin::Restored {
                identity,
                created: true,
            };
            Ok(booted)
        }
        Err(e) => {
            if refuse(&store, &identity, &e) {
                tracing::error!(
                    template = %identity,
                    "the template was made moments ago: marking its identity broken, \
                     later pods boot cold until `ember templates drop`"
                );
                if let Err(e) = mark_broken(&store, &identity) {
                    tracing::warn!("marking template {identity} broken: {e}");
                }
            }
            cold(config, vm_config, hostname, report).await
        }
    }
}

/// Snapshots a freshly booted VM (ending it) into the store.
async fn make_template(
    store: &TemplateStore,
    identity: &str,
    booted: BootedVm,
    report: &mut LaunchReport,
) -> anyhow::Result<SnapshotFiles> {
    let t = Instant::now();
    let BootedVm { vm, agent, .. } = booted;
    // The guest's end of this connection dies with the transport reset of
    // every restore.
    drop(agent);
    let staged = match store.staging(identity) {
        Ok(s) => s,
        Err(e) => {
            vm.shutdown().await;
            return Err(e).context("creating the template's staging directory");
        }
    };
    let staged_dir = staged.dir.clone();
    if let Err(e) = vm.snapshot(staged.clone(), identity.to_string()).await {
        let _ = std::fs::remove_dir_all(&staged_dir);
        return Err(e).context("writing the snapshot");
    }
    let files = store
        .commit(identity, staged)
        .context("moving the template into place")?;
    report.snapshot = Some(t.elapsed());
    tracing::info!(
        template = %identity,
        dir = %files.dir.display(),
        took = %fmt_duration(report.snapshot),
        "VM template written"
    );
    Ok(files)
}

/// Why a restore failed.
#[derive(Debug)]
enum RestoreError {
    /// The template, or the guest in it, is unusable: discard it.
    Template(anyhow::Error),
    /// This pod's own host resources (socket, share, tap, console log) or
    /// the host's KVM: the template is not at fault and is kept.
    Pod(anyhow::Error),
}

impl std::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestoreError::Template(e) | RestoreError::Pod(e) => write!(f, "{e:#}"),
        }
    }
}

impl From<VmError> for RestoreError {
    fn from(e: VmError) -> Self {
        let pod_side = matches!(
            e,
            VmError::Config(_)
                | VmError::Kvm(_)
                | VmError::ConsoleLog { .. }
                | VmError::Vsock(_)
                | VmError::Net { .. }
                | VmError::Fs { .. }
                | VmError::OutOfIrqs
                | VmError::Io { .. }
                | VmError::Join(_)
        );
        let e = anyhow::Error::from(e).context("restoring the VM");
        if pod_side {
            RestoreError::Pod(e)
        } else {
            RestoreError::Template(e)
        }
    }
}

/// Logs why a template could not be used and discards it if it is at
/// fault. Returns whether it was discarded.
fn refuse(store: &TemplateStore, identity: &str, e: &RestoreError) -> bool {
    match e {
        RestoreError::Template(_) => {
            tracing::error!(
                template = %identity,
                "VM template refused: {e}; discarding it and booting this pod cold"
            );
            discard(store, identity);
            true
        }
        RestoreError::Pod(_) => {
            tracing::error!(
                template = %identity,
                "restoring the pod's VM from its template failed on the pod's own resources: {e}; \
                 booting cold (the template is kept)"
            );
            false
        }
    }
}

/// Restores a VM from `files`, waits for its agent and makes it the pod's
/// own. Anything short of a usable guest is an error, and the VM is gone.
async fn restore(
    config: &Config,
    vm_config: &VmConfig,
    files: SnapshotFiles,
    identity: &str,
    hostname: &str,
    report: &mut LaunchReport,
) -> Result<BootedVm, RestoreError> {
    let uds = boot::vsock_path(vm_config).map_err(|e| RestoreError::Pod(e.into()))?;
    let console = vm_config.console_log.clone();
    let started = Instant::now();
    let vm = Vm::restore(vm_config.clone(), files, identity.to_string()).await?;
    report.restore = Some(started.elapsed());
    let (vm, agent) = await_agent(
        vm,
        &uds,
        console.as_deref(),
        started,
        config.template_restore_timeout(),
    )
    .await
    .map_err(|e| {
        RestoreError::Template(anyhow::Error::from(e).context("the restored guest's agent"))
    })?;
    let agent_ready = started.elapsed();
    report.restore_agent = Some(agent_ready);
    let t = Instant::now();
    let errors = personalize(&agent, Some(hostname)).await;
    report.personalize = t.elapsed();
    if let Some(first) = errors.into_iter().next() {
        // A restored guest that did not take fresh entropy would share its
        // random stream with every other pod of the template.
        drop(agent);
        vm.shutdown().await;
        return Err(RestoreError::Template(
            first.context("making the restored guest the pod's own"),
        ));
    }
    let booted_report = BootReport {
        cpu_template: vm.cpu_template(),
        timings: vm.timings(),
        agent_ready,
    };
    Ok(BootedVm {
        vm,
        agent,
        report: booted_report,
    })
}

fn discard(store: &TemplateStore, identity: &str) {
    if let Err(e) = store.discard(identity) {
        tracing::error!(template = %identity, "discarding the VM template: {e}");
    }
}

fn broken_marker(store: &TemplateStore, identity: &str) -> PathBuf {
    store.dir().join(format!(".broken-{identity}"))
}

/// Files of the store are 0600 whatever the umask, as its templates are.
fn private_file() -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    o.create(true).truncate(false).write(true).mode(0o600);
    o
}

fn mark_broken(store: &TemplateStore, identity: &str) -> std::io::Result<File> {
    private_file().open(broken_marker(store, identity))
}

/// An exclusive flock on `<store>/.lock-<identity>`, released on drop (and
/// by the kernel if this process dies).
struct TemplateLock {
    _file: File,
}

fn try_flock(path: &Path) -> anyhow::Result<Option<TemplateLock>> {
    use std::os::fd::AsRawFd;
    let file = private_file()
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
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

async fn lock(
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

    #[test]
    fn only_template_faults_discard_the_template() {
        use ember_vmm::snapshot::SnapshotError;
        let bad = VmError::Snapshot(SnapshotError::Checksum("/t/state".into()));
        assert!(matches!(RestoreError::from(bad), RestoreError::Template(_)));
        let pod = VmError::Net {
            tap: "tap0".into(),
            source: ember_vmm::devices::virtio::net::NetError::InvalidMtu(1),
        };
        let e = RestoreError::from(pod);
        assert!(matches!(e, RestoreError::Pod(_)));
        assert!(e.to_string().contains("tap0"), "{e}");
    }

    #[test]
    fn the_report_names_the_origin_and_phases() {
        let mut r = LaunchReport {
            origin: Origin::Restored {
                identity: "0123abcd".into(),
                created: false,
            },
            identity: Some(Duration::from_millis(80)),
            lock_wait: None,
            cold: None,
            snapshot: None,
            restore: Some(Duration::from_millis(30)),
            restore_agent: Some(Duration::from_millis(700)),
            personalize: Duration::from_millis(40),
            total: Duration::from_millis(850),
        };
        let s = r.to_string();
        assert!(s.starts_with("restored from template 0123abcd"), "{s}");
        assert!(s.contains("restore=") && s.contains("personalize="), "{s}");
        assert!(!s.contains("snapshot="), "{s}");
        r.origin = Origin::Cold;
        r.restore = None;
        assert!(r.to_string().starts_with("cold boot"));
    }
}
