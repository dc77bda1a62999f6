//! OOM kills: one GetOOMEvent long poll per VM publishes TaskOOM as soon
//! as the agent reports one, and lets exits wait briefly for it.
//!
//! Kubernetes reports a container as OOMKilled only if containerd saw
//! TaskOOM before the TaskExit of the killed process (a well-known gap in
//! VM runtimes). The OOM killer's SIGKILL and the agent's two answers race,
//! so a process that died of SIGKILL (status 137) which this shim did not
//! send waits up to [`OOM_GRACE`] for the OOM event of its container
//! before its exit is published.
//!
//! The agent is not trusted: an OOM event is believed only for a container
//! of this pod that exists (created and not yet deleted). Others are
//! dropped with a rate-limited warning and leave no trace; at most
//! [`MAX_EVENTS_PER_SEC`] events a second are published, and the count a
//! container keeps waiting for exits is capped at [`MAX_PENDING`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::agent::Agent;
use crate::error::Error;
use crate::events::{self, EventSink};

/// How long an exit by SIGKILL waits for an OOM event of its container.
pub const OOM_GRACE: Duration = Duration::from_secs(1);
/// Pause after an unexpected GetOOMEvent error before polling again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// OOM events of one pod published per second at most; more are dropped.
pub const MAX_EVENTS_PER_SEC: u32 = 20;
/// OOM events one container keeps for exits to come, at most.
pub const MAX_PENDING: u32 = 64;
/// Characters of a refused container id quoted in the log.
const QUOTED_ID: usize = 80;

/// The containers of the pod and the OOM events seen and not yet matched
/// with an exit, per container: only tracked containers have an entry.
#[derive(Default)]
pub struct OomTracker {
    pending: Mutex<HashMap<String, u32>>,
    changed: watch::Sender<u64>,
}

/// Why an OOM event from the agent was not believed.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not a container of this pod (never created, or already deleted).
    Unknown,
    /// More than [`MAX_EVENTS_PER_SEC`] in a second.
    TooMany,
}

fn lock(m: &Mutex<HashMap<String, u32>>) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl OomTracker {
    /// A container of the pod now exists: OOM events for it are believed
    /// until [`Self::forget`].
    pub fn track(&self, container_id: &str) {
        lock(&self.pending)
            .entry(container_id.to_string())
            .or_default();
    }

    /// Whether `container_id` is a container of the pod.
    pub fn is_tracked(&self, container_id: &str) -> bool {
        lock(&self.pending).contains_key(container_id)
    }

    /// Remembers an OOM event of a tracked container for its exit; returns
    /// false (and remembers nothing) for any other id.
    pub fn record(&self, container_id: &str) -> bool {
        {
            let mut p = lock(&self.pending);
            let Some(n) = p.get_mut(container_id) else {
                return false;
            };
            *n = (*n + 1).min(MAX_PENDING);
        }
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
        true
    }

    fn take(&self, container_id: &str) -> bool {
        let mut p = lock(&self.pending);
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

    /// Forgets a deleted container: later OOM events for it are dropped.
    pub fn forget(&self, container_id: &str) {
        lock(&self.pending).remove(container_id);
    }
}

/// Counts events and warnings in one-second windows.
struct Window {
    start: Instant,
    events: u32,
    warnings: u32,
    suppressed: u64,
}

impl Window {
    const WARNINGS_PER_SEC: u32 = 5;

    fn new() -> Self {
        Window {
            start: Instant::now(),
            events: 0,
            warnings: 0,
            suppressed: 0,
        }
    }

    fn roll(&mut self) {
        if self.start.elapsed() >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                tracing::warn!(
                    "{} more OOM events from the agent were dropped",
                    self.suppressed
                );
            }
            *self = Window::new();
        }
    }

    /// Whether one more event may be published now.
    fn admit(&mut self) -> bool {
        self.roll();
        self.events += 1;
        self.events <= MAX_EVENTS_PER_SEC
    }

    /// Whether one more warning may be logged now (else it is counted).
    fn warn(&mut self) -> bool {
        self.roll();
        self.warnings += 1;
        if self.warnings <= Self::WARNINGS_PER_SEC {
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// Believes, or not, one OOM event from the agent: publishes TaskOOM and
/// remembers it for the container's exit.
async fn accept(
    tracker: &OomTracker,
    events: &EventSink,
    window: &mut Window,
    container_id: &str,
) -> Result<(), Refused> {
    if !tracker.is_tracked(container_id) {
        return Err(Refused::Unknown);
    }
    if !window.admit() {
        return Err(Refused::TooMany);
    }
    tracing::warn!(container = %container_id, "OOM kill in the guest");
    // Publish first, then record: an exit waiting for this event
    // publishes after it, so TaskOOM precedes TaskExit.
    events.publish(events::task_oom(container_id)).await;
    if !tracker.record(container_id) {
        // Deleted meanwhile: nothing waits for it.
        tracing::debug!(container = %container_id, "OOM event of a container deleted meanwhile");
    }
    Ok(())
}

/// The long poll; runs until the VM is gone or the agent has no OOM events.
pub async fn poll_oom_events(agent: Agent, tracker: std::sync::Arc<OomTracker>, events: EventSink) {
    let mut window = Window::new();
    loop {
        match agent.get_oom_event().await {
            Ok(ev) => {
                let id = &ev.container_id;
                if let Err(why) = accept(&tracker, &events, &mut window, id).await {
                    if window.warn() {
                        let quoted: String = id.chars().take(QUOTED_ID).collect();
                        tracing::warn!(
                            container = ?quoted,
                            id_len = id.len(),
                            "OOM event from the agent dropped: {}",
                            match why {
                                Refused::Unknown => "no such container in this pod",
                                Refused::TooMany => "too many OOM events",
                            }
                        );
                    }
                }
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
        t.track("c1");
        t.track("c2");
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
        t.track("c1");
        let start = std::time::Instant::now();
        assert!(!t.wait_for("c1", Duration::from_millis(50)).await);
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert!(t.record("c1"));
        t.forget("c1");
        assert!(!t.wait_for("c1", Duration::ZERO).await);
    }

    /// An event for a container the pod does not have (never created,
    /// deleted, another pod's) is dropped: nothing published, nothing
    /// remembered.
    #[tokio::test]
    async fn an_event_for_an_unknown_container_is_dropped_and_forgotten() {
        let t = OomTracker::default();
        t.track("c1");
        let (sink, recorded) = EventSink::recording();
        let mut w = Window::new();
        assert_eq!(
            accept(&t, &sink, &mut w, "other-pods-container").await,
            Err(Refused::Unknown)
        );
        assert!(!t.record("other-pods-container"));
        assert!(!t.is_tracked("other-pods-container"));
        assert!(!t.wait_for("other-pods-container", Duration::ZERO).await);
        assert!(recorded.lock().unwrap().is_empty(), "nothing published");
        assert_eq!(accept(&t, &sink, &mut w, "c1").await, Ok(()));
        assert_eq!(recorded.lock().unwrap().len(), 1);
        assert!(t.wait_for("c1", Duration::ZERO).await);
    }

    #[tokio::test]
    async fn a_flood_for_a_known_container_is_capped() {
        let t = OomTracker::default();
        t.track("c1");
        let (sink, recorded) = EventSink::recording();
        let mut w = Window::new();
        let mut refused = 0;
        for _ in 0..(3 * MAX_EVENTS_PER_SEC) {
            if accept(&t, &sink, &mut w, "c1").await == Err(Refused::TooMany) {
                refused += 1;
            }
        }
        assert_eq!(refused, 2 * MAX_EVENTS_PER_SEC);
        assert_eq!(recorded.lock().unwrap().len(), MAX_EVENTS_PER_SEC as usize);
        for _ in 0..(2 * MAX_PENDING) {
            t.record("c1");
        }
        let mut kept = 0;
        while t.wait_for("c1", Duration::ZERO).await {
            kept += 1;
        }
        assert_eq!(kept, MAX_PENDING);
    }
}
