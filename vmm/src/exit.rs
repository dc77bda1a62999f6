//! Why a VM stopped, and how the parts of the VMM tell each other to stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset itself (reboot, power off through the i8042, or a
    /// kernel panic with `panic=1`, which the console shows).
    GuestReset,
    /// The guest kernel panicked; the console's panic line is kept.
    GuestPanic(String),
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// KVM could not run the guest (an emulation failure we cannot fix up,
    /// an unexpected exit); the detail is logged and kept here.
    VcpuFailure(String),
    /// The host asked the VM to stop.
    Stopped,
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::GuestReset => f.write_str("guest reset"),
            ExitReason::GuestPanic(msg) => write!(f, "guest kernel panic: {msg}"),
            ExitReason::TripleFault => f.write_str("guest triple fault"),
            ExitReason::VcpuFailure(msg) => write!(f, "vCPU failure: {msg}"),
            ExitReason::Stopped => f.write_str("stopped by the host"),
        }
    }
}

/// Shared by the vCPU threads, the devices that can end the VM (i8042) and
/// the async side that waits for the end. The first reason recorded wins.
#[derive(Clone)]
pub struct ExitSignal {
    stop: Arc<AtomicBool>,
    tx: Arc<watch::Sender<Option<ExitReason>>>,
    panic_line: Arc<Mutex<Option<String>>>,
}

impl Default for ExitSignal {
    fn default() -> Self {
        Self::new()
    }
}

impl ExitSignal {
    pub fn new() -> Self {
        let (tx, _rx) = watch::channel(None);
        Self {
            stop: Arc::new(AtomicBool::new(false)),
            tx: Arc::new(tx),
            panic_line: Arc::new(Mutex::new(None)),
        }
    }

    /// Records `reason` (unless one is already recorded) and tells every
    /// vCPU to stop. A reset after a kernel panic seen on the console is
    /// recorded as that panic.
    pub fn exit(&self, reason: ExitReason) {
        let reason = match reason {
            ExitReason::GuestReset => match self.panic_line.lock() {
                Ok(p) => p
                    .clone()
                    .map_or(ExitReason::GuestReset, ExitReason::GuestPanic),
                Err(_) => ExitReason::GuestReset,
            },
            other => other,
        };
        self.stop.store(true, Ordering::SeqCst);
        self.tx.send_if_modified(|cur| {
            if cur.is_none() {
                *cur = Some(reason);
                true
            } else {
                false
            }
        });
    }

    /// Notes a kernel panic line from the console (the reset follows).
    pub fn note_panic(&self, line: &str) {
        if let Ok(mut p) = self.panic_line.lock() {
            p.get_or_insert_with(|| line.trim().to_string());
        }
    }

    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.tx.borrow().clone()
    }

    /// Waits until the VM has ended.
    pub async fn wait(&self) -> ExitReason {
        let mut rx = self.tx.subscribe();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                return ExitReason::Stopped;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_reason_wins_and_waiters_see_it() {
        let sig = ExitSignal::new();
        let waiter = {
            let sig = sig.clone();
            tokio::spawn(async move { sig.wait().await })
        };
        assert!(!sig.should_stop());
        sig.exit(ExitReason::GuestReset);
        sig.exit(ExitReason::Stopped);
        assert!(sig.should_stop());
        assert_eq!(waiter.await.unwrap(), ExitReason::GuestReset);
        let sig = ExitSignal::new();
        sig.note_panic("Kernel panic - not syncing: oops\n");
        sig.exit(ExitReason::GuestReset);
        assert_eq!(
            sig.reason(),
            Some(ExitReason::GuestPanic(
                "Kernel panic - not syncing: oops".into()
            ))
        );
    }
}
