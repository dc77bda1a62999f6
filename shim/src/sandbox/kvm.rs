//! The KVM VMM behind the VM boundary ([`super::vm`]): pod VMs are
//! `ember_vmm::Vm`s in this process, brought up by
//! [`templates::boot_or_restore`] and each owned by a supervisor that
//! releases it (`Vm::shutdown`: threads, fds, guest memory) as soon as it
//! ends, on its own or when stopped.

use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use ember_vmm::{ExitReason, Vm, VmConfig};
use tokio::sync::{oneshot, watch};

use super::vm::{GuestMemory, LaunchedVm, PodVm, VmLauncher};
use crate::config::Config;
use crate::templates;

/// Launches pod VMs on KVM, from templates when they can be used.
#[derive(Debug, Default, Clone, Copy)]
pub struct KvmLauncher;

#[async_trait]
impl VmLauncher for KvmLauncher {
    async fn launch(
        &self,
        config: &Config,
        vm: VmConfig,
        hostname: &str,
    ) -> anyhow::Result<LaunchedVm> {
        let launched = templates::boot_or_restore(config, vm, hostname).await?;
        Ok(LaunchedVm {
            vm: Arc::new(KvmVm::supervise(launched.booted.vm)),
            agent: launched.booted.agent,
            boot: launched.booted.report,
            summary: launched.report.to_string(),
        })
    }

    fn runs_in_shim(&self) -> bool {
        true
    }
}

/// A running `Vm` and its supervisor.
pub struct KvmVm {
    /// The VM while it runs, for its memory figures; taken at release.
    vm: Arc<RwLock<Option<Arc<Vm>>>>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    /// Set once the VM is released, to why it ended.
    done: watch::Receiver<Option<ExitReason>>,
}

impl KvmVm {
    /// Hands `vm` to a supervisor that releases it when it ends or is
    /// stopped.
    pub fn supervise(vm: Vm) -> KvmVm {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = watch::channel(None);
        let vm = Arc::new(vm);
        let slot = Arc::new(RwLock::new(Some(vm.clone())));
        let held = slot.clone();
        let supervisor = move || async move {
            let ended = tokio::select! {
                r = vm.wait() => Some(r),
                _ = stop_rx => None,
            };
            held.write().unwrap_or_else(|p| p.into_inner()).take();
            let reason = match Arc::try_unwrap(vm) {
                Ok(vm) => vm.shutdown().await,
                Err(vm) => {
                    // Not expected: the slot held the only other
                    // reference. Stop the vCPUs; the last reference's
                    // drop tears the rest down.
                    tracing::warn!("pod VM still referenced at release; stopping it");
                    vm.stop();
                    ExitReason::Stopped
                }
            };
            tracing::info!("pod VM released ({reason})");
            let _ = done_tx.send(Some(ended.unwrap_or(reason)));
        };
        // The supervisor gets a thread and a single-threaded runtime of its
        // own, apart from the shim's runtime (it sleeps in epoll; no
        // polling).
        let thread = std::thread::Builder::new()
            .name("ember-vm-watch".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(supervisor()),
                    Err(e) => tracing::error!("cannot run the VM supervisor: {e}"),
                }
            });
        if let Err(e) = thread {
            tracing::error!("cannot start the VM supervisor thread: {e}");
        }
        KvmVm {
            vm: slot,
            stop: Mutex::new(Some(stop_tx)),
            done: done_rx,
        }
    }

    async fn released(&self) -> ExitReason {
        let mut done = self.done.clone();
        let reason = done.wait_for(Option::is_some).await.map(|r| r.clone());
        reason.ok().flatten().unwrap_or(ExitReason::Stopped)
    }
}

#[async_trait]
impl PodVm for KvmVm {
    async fn wait(&self) -> ExitReason {
        self.released().await
    }

    async fn stop(&self) -> ExitReason {
        if let Some(tx) = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(());
        }
        self.released().await
    }

    fn memory(&self) -> Option<GuestMemory> {
        let vm = self.vm.read().unwrap_or_else(|p| p.into_inner());
        let (size, host_bytes) = vm.as_ref()?.guest_memory_usage()?;
        Some(GuestMemory { size, host_bytes })
    }
}
