//! Watching a pod's VM: its end (expected or not) and its agent's health.
//!
//! When the guest ends on its own (reset, panic, vCPU failure) its
//! [`PodVm`] is released at once, and the end is announced on the pod's
//! death signal, which every process waiter watches: their tasks then exit
//! with status 255. A VM the shim stops itself is not a death.
//!
//! A VM whose agent stops answering is as good as dead: a periodic probe
//! declares it so after [`HEALTH_FAILURES`] misses and stops the VM. The
//! probe is SetTime: besides proving the agent answers, it keeps the guest
//! clock with the host's (without paravirtual clocks, e.g. on hosts
//! without VT-x, the guest clock falls behind by minutes, and exit times
//! the agent reports come from it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ember_vmm::ExitReason;
use tokio::sync::watch;

use super::agent::Agent;
use super::vm::PodVm;

/// Interval between agent probes (clock syncs).
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(30);
/// Deadline of one probe. Generous: on hosts without VT-x the guest kernel
/// is emulated and a busy guest answers slowly.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// Consecutive failed probes after which the agent counts as gone.
pub const HEALTH_FAILURES: u32 = 3;

/// Why a pod's VM is unusable; set once.
#[derive(Clone)]
pub struct DeathSignal(watch::Sender<Option<Death>>);

#[derive(Clone)]
struct Death {
    reason: String,
    /// The end of a shutdown the shim asked for, not a failure.
    expected: bool,
}

impl Default for DeathSignal {
    fn default() -> Self {
        DeathSignal(watch::channel(None).0)
    }
}

impl DeathSignal {
    /// Records the reason (the first one wins). Returns whether this call
    /// recorded it.
    pub fn declare(&self, reason: impl Into<String>) -> bool {
        self.record(reason.into(), false)
    }

    /// Records the end of a shutdown the shim asked for (the first one
    /// wins): the VM is as unusable, but [`DeathSignal::wait_unexpected`]
    /// does not return for it.
    pub fn declare_expected(&self, reason: impl Into<String>) -> bool {
        self.record(reason.into(), true)
    }

    fn record(&self, reason: String, expected: bool) -> bool {
        self.0.send_if_modified(|cur| {
            if cur.is_none() {
                *cur = Some(Death { reason, expected });
                true
            } else {
                false
            }
        })
    }

    pub fn reason(&self) -> Option<String> {
        self.0.borrow().as_ref().map(|d| d.reason.clone())
    }

    /// Resolves once the VM is declared dead, expectedly or not.
    pub async fn wait(&self) -> String {
        self.wait_death().await.reason
    }

    /// Resolves once the VM is declared dead without the shim asking for
    /// it; never for the end of a shutdown.
    pub async fn wait_unexpected(&self) -> String {
        let death = self.wait_death().await;
        if death.expected {
            std::future::pending::<()>().await;
        }
        death.reason
    }

    async fn wait_death(&self) -> Death {
        let mut rx = self.0.subscribe();
        let death = rx.wait_for(Option::is_some).await.map(|d| d.clone());
        match death {
            Ok(Some(d)) => d,
            _ => std::future::pending().await,
        }
    }
}

/// Waits for the VM's end. An end the host did not ask for (the guest
/// reset, powered off, panicked, or a vCPU failed) is declared on `death`,
/// as expected if `expected` is set by then (a shutdown under way: the
/// agent's Shutdown powers the guest off). A VM the host stopped is not
/// declared: whoever stopped it knows.
pub async fn watch_vm(
    vm: Arc<dyn PodVm>,
    death: DeathSignal,
    expected: Arc<AtomicBool>,
    console: String,
) {
    let reason = vm.wait().await;
    if reason == ExitReason::Stopped {
        return;
    }
    let why = format!("the pod's VM ended: {reason}");
    if expected.load(Ordering::SeqCst) {
        tracing::info!("pod VM ended: {reason}");
        death.declare_expected(why);
    } else {
        tracing::error!("pod VM ended unexpectedly: {reason} (guest console: {console})");
        death.declare(why);
    }
}

/// Probes the agent until the VM is gone; declares it dead (and stops the
/// VM) after too many misses.
pub async fn watch_agent_health(agent: Agent, death: DeathSignal, vm: Arc<dyn PodVm>) {
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

    #[tokio::test]
    async fn the_end_of_a_shutdown_is_a_death_but_not_an_unexpected_one() {
        let d = DeathSignal::default();
        assert!(d.declare_expected("powered off"));
        assert!(!d.declare("b"), "the first reason wins");
        assert_eq!(d.wait().await, "powered off");
        let unexpected = tokio::time::timeout(Duration::from_millis(50), d.wait_unexpected()).await;
        assert!(
            unexpected.is_err(),
            "a shutdown's end is not reported as a death"
        );
    }
}
