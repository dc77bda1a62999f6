//! Child reaping for PID 1, without stealing exit statuses.
//!
//! As PID 1 the agent inherits every orphan of its pid namespace and must
//! reap them, which means `waitpid(-1)`. That would race with code that
//! waits for a specific child of its own, so in the agent ONLY the reaper
//! calls `wait*`: it reaps every child and hands the exit of a child the
//! agent owns to whoever registered it.
//!
//! Rules for the rest of the agent:
//! - spawn children through [`Reaper::spawn_owned`] (the registry lock is
//!   held across the fork, so the exit cannot be reaped before the pid is
//!   registered), or register a pid forked elsewhere with [`Reaper::claim`]
//!   (exits of unregistered pids are kept for a while so a late claim still
//!   gets its status);
//! - never use `tokio::process` or `std::process::Child::wait` in the agent
//!   (they wait on their own and would race with the reaper).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How many exits of unregistered pids are remembered for late claims.
pub const UNCLAIMED_CAPACITY: usize = 256;

/// The exit of a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub pid: i32,
    /// Exit code, or 128 + signal number if killed by a signal.
    pub status: u32,
    pub exited_at: SystemTime,
}

impl Exit {
    /// The exit described by a wait status, if it is one (not a stop).
    pub fn from_wait_status(ws: WaitStatus, exited_at: SystemTime) -> Option<Exit> {
        match ws {
            WaitStatus::Exited(pid, code) => Some(Exit {
                pid: pid.as_raw(),
                status: code as u32 & 0xff,
                exited_at,
            }),
            WaitStatus::Signaled(pid, sig, _core) => Some(Exit {
                pid: pid.as_raw(),
                status: 128 + sig as u32,
                exited_at,
            }),
            _ => None,
        }
    }
}

#[derive(Default)]
struct Registry {
    owned: HashMap<i32, oneshot::Sender<Exit>>,
    unclaimed: VecDeque<Exit>,
}

/// Shared handle to the reaper's registry. Cheap to clone.
#[derive(Clone, Default)]
pub struct Reaper {
    registry: Arc<Mutex<Registry>>,
}

impl Reaper {
    pub fn new() -> Reaper {
        Reaper::default()
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves the registry consistent
        // enough (plain inserts/removes); keep going.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Install the SIGCHLD handler and spawn the reaping task on the
    /// current tokio runtime. Reaps once right away for children that
    /// exited before the handler existed.
    pub fn start(&self) -> io::Result<tokio::task::JoinHandle<()>> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = self.clone();
        reaper.reap_all();
        Ok(tokio::spawn(async move {
            while sigchld.recv().await.is_some() {
                reaper.reap_all();
            }
        }))
    }

    /// Spawn a child with the registry locked and register its pid.
    /// `spawn` forks (e.g. `Command::spawn`) and returns its result plus the
    /// child's pid. The receiver yields the child's exit.
    pub fn spawn_owned<T>(
        &self,
        spawn: impl FnOnce() -> io::Result<(T, i32)>,
    ) -> io::Result<(T, oneshot::Receiver<Exit>)> {
        let mut reg = self.lock();
        let (value, pid) = spawn()?;
        let (tx, rx) = oneshot::channel();
        reg.owned.insert(pid, tx);
        Ok((value, rx))
    }

    /// Register a child forked elsewhere. If it has exited and been reaped
    /// already (and is still remembered), the receiver is ready at once.
    pub fn claim(&self, pid: i32) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        let mut reg = self.lock();
        if let Some(i) = reg.unclaimed.iter().position(|e| e.pid == pid) {
            let exit = reg.unclaimed.remove(i).expect("index from position");
            let _ = tx.send(exit);
        } else {
            reg.owned.insert(pid, tx);
        }
        rx
    }

    /// Number of registered, not yet exited children.
    pub fn owned_count(&self) -> usize {
        self.lock().owned.len()
    }

    /// Reap every child that has exited; returns how many were reaped.
    pub fn reap_all(&self) -> usize {
        let mut n = 0;
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(ws) => {
                    if let Some(exit) = Exit::from_wait_status(ws, SystemTime::now()) {
                        self.deliver(exit);
                        n += 1;
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!("waitpid: {e}");
                    break;
                }
            }
        }
        n
    }

    /// Hand an exit to its owner, or remember it as unclaimed.
    fn deliver(&self, exit: Exit) {
        let mut reg = self.lock();
        if let Some(tx) = reg.owned.remove(&exit.pid) {
            tracing::debug!("child {} exited with {}", exit.pid, exit.status);
            // The receiver may be gone (nobody waits any more): fine.
            let _ = tx.send(exit);
        } else {
            tracing::debug!("reaped orphan {} (status {})", exit.pid, exit.status);
            if reg.unclaimed.len() >= UNCLAIMED_CAPACITY {
                reg.unclaimed.pop_front();
            }
            reg.unclaimed.push_back(exit);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::time::Duration;

    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn exit_statuses() {
        use nix::sys::signal::Signal;
        use nix::unistd::Pid;
        let t = SystemTime::now();
        let e = Exit::from_wait_status(WaitStatus::Exited(Pid::from_raw(7), 3), t).unwrap();
        assert_eq!((e.pid, e.status), (7, 3));
        let e = Exit::from_wait_status(
            WaitStatus::Signaled(Pid::from_raw(8), Signal::SIGKILL, false),
            t,
        )
        .unwrap();
        assert_eq!((e.pid, e.status), (8, 137));
        assert!(Exit::from_wait_status(WaitStatus::StillAlive, t).is_none());
    }

    // One test drives all real children, so that no other test's children
    // get reaped by this one's waitpid(-1).
    #[test]
    fn reaps_owned_and_unclaimed_children() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let reaper = Reaper::new();
            let task = reaper.start().unwrap();
            let wait = |rx: oneshot::Receiver<Exit>| async move {
                tokio::time::timeout(Duration::from_secs(10), rx)
                    .await
                    .expect("exit not delivered in time")
                    .expect("sender dropped")
            };

            // Owned child with an exit code.
            let (child, rx) = reaper
                .spawn_owned(|| {
                    let c = sh("exit 3").spawn()?;
                    let pid = c.id() as i32;
                    Ok((c, pid))
                })
                .unwrap();
            let exit = wait(rx).await;
            assert_eq!(exit.pid, child.id() as i32);
            assert_eq!(exit.status, 3);

            // Owned child killed by a signal.
            let (_child, rx) = reaper
                .spawn_owned(|| {
                    let c = sh("kill -9 $$").spawn()?;
                    let pid = c.id() as i32;
                    Ok((c, pid))
                })
                .unwrap();
            assert_eq!(wait(rx).await.status, 137);

            // Unregistered child: reaped as an orphan, then claimed late.
            // (The reaper, not Child::wait, collects it.)
            #[allow(clippy::zombie_processes)]
            let child = sh("exit 5").spawn().unwrap();
            let pid = child.id() as i32;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                if reaper.lock().unclaimed.iter().any(|e| e.pid == pid) {
                    break;
                }
                assert!(tokio::time::Instant::now() < deadline, "orphan not reaped");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let exit = wait(reaper.claim(pid)).await;
            assert_eq!((exit.pid, exit.status), (pid, 5));
            assert_eq!(reaper.owned_count(), 0);
            task.abort();
        });
    }

    #[test]
    fn unclaimed_is_bounded() {
        let reaper = Reaper::new();
        for pid in 0..(UNCLAIMED_CAPACITY as i32 + 10) {
            reaper.deliver(Exit {
                pid: 100_000 + pid,
                status: 0,
                exited_at: SystemTime::now(),
            });
        }
        assert_eq!(reaper.lock().unclaimed.len(), UNCLAIMED_CAPACITY);
        // The oldest were dropped.
        assert!(!reaper.lock().unclaimed.iter().any(|e| e.pid == 100_000));
    }
}
