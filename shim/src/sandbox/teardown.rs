//! Ending a pod: the guest powers off (or is stopped), the network and
//! background tasks go, and every trace of the pod leaves the host
//! (`cleanup_state`, also used by `delete` after a crashed shim).

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::paths::SandboxPaths;
use super::{blocking, Sandbox, POWEROFF_GRACE, SHUTDOWN_CALL};
use crate::resources::{mount, rootfs};

/// Removes everything of a pod from the host: detaches the share's two
/// mounts (and with them everything mounted below them), removes the
/// directory (only if nothing is mounted below it any more), and the
/// socket if it lives elsewhere. Used at teardown and by `delete` after a
/// crash. Blocking. Returns what failed.
///
/// Only mounts exactly at `shared/` and `mounts/` are unmounted: paths
/// deeper down may run through directories the guest can write (a
/// container's rootfs), so they are never resolved here; a lazy detach of
/// the top takes them along.
pub fn cleanup_state(paths: &SandboxPaths) -> Vec<anyhow::Error> {
    let mut errors = mount::detach_all_at(&paths.shared);
    errors.extend(mount::detach_all_at(&paths.mounts));
    if let Err(e) = rootfs::remove_dir_if_unmounted(&paths.state_dir) {
        errors.push(e);
    }
    if paths.vsock_outside_state_dir() {
        if let Err(e) = std::fs::remove_file(&paths.vsock) {
            if e.kind() != std::io::ErrorKind::NotFound {
                errors.push(anyhow::Error::from(e).context("removing the vsock socket"));
            }
        }
    }
    // The namespace directory, if this was its last pod.
    if let Some(ns_dir) = paths.state_dir.parent() {
        let _ = std::fs::remove_dir(ns_dir);
    }
    errors
}

impl Sandbox {
    /// Ends the pod: the guest powers off (agent Shutdown, then the VM is
    /// released), and everything on the host goes: mounts, state directory.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(pf) = &self.port_forward {
            pf.close();
        }
        let started = Instant::now();
        // Read while the VM still runs, for the log line at the end.
        let memory = self.vm.memory();
        if self.death.reason().is_none() {
            match self.agent.shutdown(SHUTDOWN_CALL).await {
                Ok(_) => {
                    if tokio::time::timeout(POWEROFF_GRACE, self.vm.wait())
                        .await
                        .is_err()
                    {
                        tracing::info!(
                            "the guest did not power off within {POWEROFF_GRACE:?}; stopping it"
                        );
                    }
                }
                Err(e) => tracing::info!("agent Shutdown: {e}; stopping the VM"),
            }
        }
        let reason = self.vm.stop().await;
        if let Some(net) = &self.network {
            net.disconnect().await;
        }
        for t in self
            .background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
        let paths = self.paths.clone();
        match blocking("removing the state directory", move || {
            cleanup_state(&paths)
        })
        .await
        {
            Ok(errors) => {
                for e in errors {
                    tracing::warn!("pod cleanup: {e:#}");
                }
            }
            Err(e) => tracing::warn!("pod cleanup: {e}"),
        }
        tracing::info!(
            pod = %self.id,
            took = ?started.elapsed(),
            guest_mem_mib = memory.map(|m| m.size >> 20),
            host_mem_mib = memory.map(|m| m.host_bytes >> 20),
            "pod VM shut down ({reason})"
        );
    }
}
