//! VM templates, policy and store in one place: [`boot_or_restore`] is how
//! a pod's VM comes up; [`TemplateStore`] is the directory of templates
//! (`template_dir`) that it and `ember templates` use.
//!
//! The first pod of an identity (kernel, initrd with the agent, VM shape;
//! [`identity()`]) boots cold ([`crate::sandbox::boot`]), and once its
//! agent answers the VM is snapshotted into the template store and this
//! pod's VM is restored from the new template (taking a snapshot ends the
//! VM). Later pods of that identity restore from the template, which takes
//! well under a second instead of a boot. A per-identity lock file keeps
//! concurrent first pods from all booting cold: the others wait for the
//! template.
//!
//! Every VM, restored or not, is then made the pod's own
//! ([`crate::sandbox::boot::personalize`]): clock, fresh entropy with a
//! CRNG reseed, hostname. The vsock device already reset the guest's
//! transport at restore, so no connection of the template survives.
//!
//! A template that cannot be used — another identity or format version,
//! truncated or corrupted, a restore that fails, an agent that does not
//! answer within `template_restore_timeout_secs`, or a guest that cannot be
//! made the pod's own — is logged, discarded, and the pod boots cold. A
//! template that cannot be written, or fails right after it was made, marks
//! its identity broken
//! (`.broken-<identity>` in the store, removed by `ember templates drop`),
//! so later pods boot cold instead of making it again.
//!
//! The VMM only snapshots a VM into [`SnapshotFiles`] and restores one from
//! them (checking its own format and checksums); which template a pod
//! uses, and when one is made or thrown away, is decided here:
//! - `identity.rs`: what a template is valid for ([`identity()`]);
//! - `store.rs`: the directory, staging and commit, broken marks
//!   ([`TemplateStore`]);
//! - `lock.rs`: one pod at a time makes a template;
//! - `fault.rs`: whether a failed restore is the template's fault;
//! - `report.rs`: what a launch did, phase by phase ([`LaunchReport`]);
//! - `private.rs`: the store's files are root's alone.

mod fault;
mod identity;
mod lock;
mod private;
mod report;
mod store;

use std::time::{Duration, Instant};

use anyhow::Context;
use ember_vmm::timing::fmt_duration;
use ember_vmm::{SnapshotFiles, Vm, VmConfig};

pub use self::identity::identity;
pub use self::report::{LaunchReport, Origin};
pub use self::store::{StoreError, TemplateInfo, TemplateStore};

use self::fault::RestoreError;
use self::lock::{lock, LOCK_POLL};
use crate::config::Config;
use crate::sandbox::boot::{
    self, await_agent, personalize, start_vm, BootError, BootReport, BootedVm,
};

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
    if store.is_broken(&identity) {
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
            if let Err(e) = store.mark_broken(&identity) {
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
                if let Err(e) = store.mark_broken(&identity) {
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
