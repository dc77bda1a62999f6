//! OOM kills: one GetOOMEvent long poll per VM publishes TaskOOM as soon
//! as the agent reports one, and lets exits wait briefly for it.
//!
//! Kubernetes reports a container as OOMKilled only if containerd saw
//! TaskOOM before the TaskExit of the killed process (a well-known gap in
//! VM runtimes). The OOM killer's SIGKILL and the agent's two answers race,
//! so a process that died of SIGKILL (status 137) which this shim did not
//! send waits up to [`OOM_GRACE`] for the OOM event of its container
//! before its exit is published.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

use super::agent::Agent;
use crate::error::Error;
use crate::events::{self, EventSink};

/// How long an exit by SIGKILL waits for an OOM event of its container.
pub const OOM_GRACE: Duration = Duration::from_secs(1);
/// Pause after an unexpected GetOOMEvent error before polling again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// OOM events seen and not yet matched with an exit, per container.
#[derive(Default)]
pub struct OomTracker {
    pending: Mutex<HashMap<String, u32>>,
    changed: watch::Sender<u64>,
}

impl OomTracker {
    pub fn record(&self, container_id: &str) {
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            *p.entry(container_id.to_string()).or_default() += 1;
        }
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    fn take(&self, container_id: &str) -> bool {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match p.get_mut(container_id) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    /// Whether an OOM event for `container_id` arrives within `grace`
    /// (consumes it).
    pub async fn wait_for(&self, container_id: &str, grace: Duration) -> bool {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            if self.take(container_id) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return self.take(container_id),
            }
        }
    }

    /// Forgets a deleted container.
    pub fn forget(&self, container_id: &str) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.remove(container_id);
    }
}

/// The long poll; runs until the VM is gone or the agent has no OOM events.
pub async fn poll_oom_events(agent: Agent, tracker: std::sync::Arc<OomTracker>, events: EventSink) {
    loop {
        match agent.get_oom_event().await {
            Ok(ev) => {
                tracing::warn!(container = %ev.container_id, "OOM kill in the guest");
                // Publish first, then record: an exit waiting for this
                // event publishes after it, so TaskOOM precedes TaskExit.
                events.publish(events::task_oom(&ev.container_id)).await;
                tracker.record(&ev.container_id);
            }
            Err(Error::Agent { code, message, .. })
                if code == ttrpc::Code::UNIMPLEMENTED || code == ttrpc::Code::NOT_FOUND =>
            {
                tracing::info!("the agent reports no OOM events ({message}); OOM kills will show as exit 137 only");
                return;
            }
            Err(e) if e.is_unavailable() => {
                tracing::debug!("OOM event poll ends: {e}");
                return;
            }
            Err(e) => {
                tracing::warn!("GetOOMEvent: {e}");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn an_exit_waits_for_a_late_oom_event() {
        let t = Arc::new(OomTracker::default());
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move { t.wait_for("c1", Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        t.record("c2");
        t.record("c1");
        assert!(waiter.await.unwrap());
        // Consumed: the next exit does not see it again.
        assert!(!t.wait_for("c1", Duration::from_millis(10)).await);
        // c2's event is still pending.
        assert!(t.wait_for("c2", Duration::ZERO).await);
    }

    #[tokio::test]
    async fn no_event_means_no_oom_after_the_grace() {
        let t = OomTracker::default();
        let start = std::time::Instant::now();
        assert!(!t.wait_for("c1", Duration::from_millis(50)).await);
        assert!(start.elapsed() >= Duration::from_millis(50));
        t.record("c1");
        t.forget("c1");
        assert!(!t.wait_for("c1", Duration::ZERO).await);
    }
}
