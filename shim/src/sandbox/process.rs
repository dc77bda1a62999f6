//! One process of a container (its init or an exec): state as containerd
//! sees it, its exit, and its stdio copies.

use std::sync::Mutex;
use std::time::SystemTime;

use containerd_shim_protos::api::Status as TaskStatus;
use tokio::sync::watch;

use crate::io::{OutputCopies, ProcessIo, StdinForwarder, StdioPaths};

/// Exit status used when the VM or its agent is gone and the real status
/// cannot be known: 255, what containerd itself reports for a task whose
/// shim died. (137 = 128+SIGKILL would claim a kill, or an OOM kill, that
/// did not necessarily happen.)
pub const UNKNOWN_EXIT_STATUS: u32 = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

impl Status {
    pub fn to_task_status(self) -> TaskStatus {
        match self {
            Status::Created => TaskStatus::CREATED,
            Status::Running => TaskStatus::RUNNING,
            Status::Paused => TaskStatus::PAUSED,
            Status::Stopped => TaskStatus::STOPPED,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, or 128 + signal.
    pub status: u32,
    pub at: SystemTime,
}

#[derive(Debug)]
struct State {
    pid: u32,
    status: Status,
    /// We delivered SIGKILL: an exit by SIGKILL is then ours, not the OOM
    /// killer's, and need not wait for an OOM event.
    killed_by_us: bool,
    /// A task waits for this process' exit.
    waiter: bool,
}

pub struct Process {
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
    pub stdio: StdioPaths,
    /// The OCI `process` (JSON) of an exec, sent to the agent at start.
    pub spec: Option<Vec<u8>>,
    state: Mutex<State>,
    exit: watch::Sender<Option<Exit>>,
    outputs: Mutex<Option<OutputCopies>>,
    stdin: Mutex<Option<StdinForwarder>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Process {
    pub fn new(
        container_id: &str,
        exec_id: &str,
        stdio: StdioPaths,
        spec: Option<Vec<u8>>,
    ) -> Self {
        Process {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            stdio,
            spec,
            state: Mutex::new(State {
                pid: 0,
                status: Status::Created,
                killed_by_us: false,
                waiter: false,
            }),
            exit: watch::channel(None).0,
            outputs: Mutex::new(None),
            stdin: Mutex::new(None),
        }
    }

    /// `container` or `container/exec` for logs and messages.
    pub fn label(&self) -> String {
        if self.exec_id.is_empty() {
            self.container_id.clone()
        } else {
            format!("{}/{}", self.container_id, self.exec_id)
        }
    }

    /// The id containerd uses for this process in events (`TaskExit.id`).
    pub fn event_id(&self) -> &str {
        if self.exec_id.is_empty() {
            &self.container_id
        } else {
            &self.exec_id
        }
    }

    pub fn is_init(&self) -> bool {
        self.exec_id.is_empty()
    }

    pub fn pid(&self) -> u32 {
        lock(&self.state).pid
    }

    pub fn status(&self) -> Status {
        lock(&self.state).status
    }

    pub fn exit(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    pub fn set_pid(&self, pid: u32) {
        lock(&self.state).pid = pid;
    }

    /// Moves Created → Running (with the pid the agent reported, if any).
    pub fn set_running(&self, pid: u32) {
        let mut s = lock(&self.state);
        if pid != 0 {
            s.pid = pid;
        }
        if s.status != Status::Stopped {
            s.status = Status::Running;
        }
    }

    /// Running ↔ Paused. Returns false if the process has stopped.
    pub fn set_paused(&self, paused: bool) -> bool {
        let mut s = lock(&self.state);
        if s.status == Status::Stopped {
            return false;
        }
        s.status = if paused {
            Status::Paused
        } else {
            Status::Running
        };
        true
    }

    /// Whether this shim is sending (or sent) the process a SIGKILL.
    pub fn set_sigkill(&self, sent: bool) {
        lock(&self.state).killed_by_us = sent;
    }

    pub fn killed_by_us(&self) -> bool {
        lock(&self.state).killed_by_us
    }

    /// Claims the right to watch this process' exit; false if someone
    /// already does (or it has exited).
    pub fn claim_waiter(&self) -> bool {
        let mut s = lock(&self.state);
        if s.waiter || s.status == Status::Stopped {
            return false;
        }
        s.waiter = true;
        true
    }

    pub fn has_waiter(&self) -> bool {
        lock(&self.state).waiter
    }

    /// Records the exit (the first one wins) and wakes `wait()`ers.
    /// Returns whether this call recorded it.
    pub fn record_exit(&self, exit: Exit) -> bool {
        {
            let mut s = lock(&self.state);
            if s.status == Status::Stopped {
                return false;
            }
            s.status = Status::Stopped;
        }
        self.exit.send_replace(Some(exit));
        true
    }

    /// Waits for the exit.
    pub async fn wait(&self) -> Exit {
        let mut rx = self.exit.subscribe();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                // The sender lives in `self`; this cannot happen while we
                // hold `&self`, but never hang on it.
                return Exit {
                    status: UNKNOWN_EXIT_STATUS,
                    at: SystemTime::now(),
                };
            }
        }
    }

    pub fn attach_io(&self, io: ProcessIo) {
        *lock(&self.outputs) = Some(io.outputs);
        *lock(&self.stdin) = io.stdin;
    }

    pub fn take_outputs(&self) -> Option<OutputCopies> {
        lock(&self.outputs).take()
    }

    pub fn take_stdin(&self) -> Option<StdinForwarder> {
        lock(&self.stdin).take()
    }

    /// Stops stdin forwarding (the process is gone).
    pub fn stop_stdin(&self) {
        if let Some(s) = self.take_stdin() {
            s.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn lifecycle_and_wait() {
        let p = std::sync::Arc::new(Process::new("c", "", StdioPaths::default(), None));
        assert_eq!(p.status(), Status::Created);
        assert_eq!(p.event_id(), "c");
        p.set_pid(42);
        p.set_running(0);
        assert_eq!((p.pid(), p.status()), (42, Status::Running));
        assert!(p.set_paused(true));
        assert_eq!(p.status(), Status::Paused);
        assert!(p.set_paused(false));

        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.wait().await })
        };
        assert!(p.claim_waiter());
        assert!(!p.claim_waiter());
        let exit = Exit {
            status: 137,
            at: SystemTime::now(),
        };
        assert!(p.record_exit(exit));
        assert!(!p.record_exit(Exit { status: 0, ..exit }));
        let got = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, exit);
        assert_eq!(p.status(), Status::Stopped);
        assert!(!p.set_paused(true));
        assert_eq!(p.wait().await, exit);
        assert_eq!(p.status().to_task_status(), TaskStatus::STOPPED);
    }

    #[test]
    fn exec_labels() {
        let p = Process::new("c", "x1", StdioPaths::default(), Some(b"{}".to_vec()));
        assert_eq!(p.label(), "c/x1");
        assert_eq!(p.event_id(), "x1");
        assert!(!p.is_init());
    }
}
