//! Watching a pod's VM: its end (expected or not) and its agent's health.
//!
//! A supervisor task owns the `Vm`: when the guest ends on its own (reset,
//! panic, vCPU failure), or the shim asks it to stop, it releases the VM
//! (`Vm::shutdown`: threads, fds, guest memory) at once. An unexpected end
//! is announced on the pod's death signal, which every process waiter
//! watches: their tasks then exit with status 255.
//!
//! A VM whose agent stops answering is as good as dead: a periodic probe
//! declares it so after [`HEALTH_FAILURES`] misses and stops the VM. The
//! probe is SetTime: besides proving the agent answers, it keeps the guest
//! clock with the host's (without paravirtual clocks, e.g. on hosts
//! without VT-x, the guest clock falls behind by minutes, and exit times
//! the agent reports come from it).

use std::sync::Mutex;
use std::time::Duration;

use ember_vmm::timing::BootClock;
use ember_vmm::{ExitReason, Vm};
use tokio::sync::{oneshot, watch};

use super::agent::Agent;

/// Interval between agent probes (clock syncs).
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(30);
/// Deadline of one probe. Generous: on hosts without VT-x the guest kernel
/// is emulated and a busy guest answers slowly.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// Consecutive failed probes after which the agent counts as gone.
pub const HEALTH_FAILURES: u32 = 3;

/// Why a pod's VM is unusable; set once.
#[derive(Clone)]
pub struct DeathSignal(watch::Sender<Option<String>>);

impl Default for DeathSignal {
    fn default() -> Self {
        DeathSignal(watch::channel(None).0)
    }
}

impl DeathSignal {
    /// Records the reason (the first one wins). Returns whether this call
    /// recorded it.
    pub fn declare(&self, reason: impl Into<String>) -> bool {
        let reason = reason.into();
        self.0.send_if_modified(|cur| {
            if cur.is_none() {
                *cur = Some(reason);
                true
            } else {
                false
            }
        })
    }

    pub fn reason(&self) -> Option<String> {
        self.0.borrow().clone()
    }

    /// Resolves once the VM is declared dead.
    pub async fn wait(&self) -> String {
        let mut rx = self.0.subscribe();
        let reason = rx.wait_for(Option::is_some).await.map(|r| r.clone());
        match reason {
            Ok(r) => r.unwrap_or_default(),
            Err(_) => std::future::pending().await,
        }
    }
}

/// Control of a supervised VM.
pub struct VmHandle {
    stop: Mutex<Option<oneshot::Sender<()>>>,
    done: watch::Receiver<Option<ExitReason>>,
    clock: BootClock,
}

impl VmHandle {
    /// Boot phase marks of the VM.
    pub fn clock(&self) -> &BootClock {
        &self.clock
    }

    /// Stops the VM (if it still runs) and waits until it is released.
    /// Idempotent.
    pub async fn stop(&self) -> ExitReason {
        if let Some(tx) = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(());
        }
        let mut done = self.done.clone();
        let reason = done.wait_for(Option::is_some).await.map(|r| r.clone());
        reason.ok().flatten().unwrap_or(ExitReason::Stopped)
    }

    /// Tests: a handle with no VM behind it.
    #[cfg(test)]
    pub(crate) fn detached() -> VmHandle {
        let (_tx, done) = watch::channel(Some(ExitReason::Stopped));
        VmHandle {
            stop: Mutex::new(None),
            done,
            clock: BootClock::default(),
        }
    }

    /// Waits (at most `limit`) for the VM to end by itself; true if it did.
    pub async fn wait_ended(&self, limit: Duration) -> bool {
        let mut done = self.done.clone();
        let ended = tokio::time::timeout(limit, async move {
            let _ = done.wait_for(Option::is_some).await;
        })
        .await;
        ended.is_ok()
    }
}

/// Hands `vm` to a supervisor task. An end the shim did not ask for is
/// declared on `death` with `expected` telling whether a shutdown is under
/// way (then it is only logged at info level).
pub fn supervise(
    vm: Vm,
    death: DeathSignal,
    expected: std::sync::Arc<std::sync::atomic::AtomicBool>,
    console: String,
) -> VmHandle {
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (done_tx, done_rx) = watch::channel(None);
    let clock = vm.clock().clone();
    let supervisor = move || async move {
        let ended = tokio::select! {
            r = vm.wait() => Some(r),
            _ = stop_rx => None,
        };
        if let Some(reason) = &ended {
            if expected.load(std::sync::atomic::Ordering::SeqCst) {
                tracing::info!("pod VM ended: {reason}");
            } else {
                tracing::error!("pod VM ended unexpectedly: {reason} (guest console: {console})");
            }
            death.declare(format!("the pod's VM ended: {reason}"));
        }
        let reason = vm.shutdown().await;
        tracing::info!("pod VM released ({reason})");
        let _ = done_tx.send(Some(ended.unwrap_or(reason)));
    };
    // `Vm` is not `Sync`, so a future borrowing it across an await cannot
    // run on the multi-threaded runtime: the supervisor gets a thread and
    // a single-threaded runtime of its own (it sleeps in epoll; no
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
    VmHandle {
        stop: Mutex::new(Some(stop_tx)),
        done: done_rx,
        clock,
    }
}

/// Probes the agent until the VM is gone; declares it dead (and stops the
/// VM) after too many misses.
pub async fn watch_agent_health(agent: Agent, death: DeathSignal, vm: std::sync::Arc<VmHandle>) {
    let mut failures = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
            _ = death.wait() => return,
        }
        match agent.sync_clock(HEALTH_TIMEOUT).await {
            Ok(_) => failures = 0,
            Err(e) => {
                if death.reason().is_some() {
                    return;
                }
                failures += 1;
                tracing::warn!(failures, "agent health probe failed: {e}");
                if failures >= HEALTH_FAILURES {
                    tracing::error!("the agent stopped answering; stopping the pod's VM");
                    death.declare(format!("the pod's agent stopped answering ({e})"));
                    vm.stop().await;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_death_reason_wins() {
        let d = DeathSignal::default();
        assert!(d.reason().is_none());
        let w = {
            let d = d.clone();
            tokio::spawn(async move { d.wait().await })
        };
        assert!(d.declare("a"));
        assert!(!d.declare("b"));
        assert_eq!(w.await.unwrap(), "a");
        assert_eq!(d.reason().as_deref(), Some("a"));
    }
}
