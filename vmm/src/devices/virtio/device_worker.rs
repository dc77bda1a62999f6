//! What every device with a worker thread shares: the thread's lifecycle
//! (a kill eventfd it polls, spawn, signal-and-join), the checks at
//! activation, and reads of a byte-array config space.

use std::thread::JoinHandle;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::ActivateError;
use crate::confine;

/// A device's running worker thread.
pub struct DeviceWorker {
    /// Written to stop the worker; the worker polls a clone of it.
    kill: EventFd,
    thread: JoinHandle<()>,
    name: &'static str,
}

impl DeviceWorker {
    /// The kill eventfd: the first half stays with the device, the second
    /// goes to the worker's epoll.
    pub fn kill_pair() -> Result<(EventFd, EventFd), ActivateError> {
        let kill = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let worker_end = kill.try_clone().map_err(ActivateError::Worker)?;
        Ok((kill, worker_end))
    }

    /// Starts thread `name` running `run`; `kill` is the device's half of
    /// [`Self::kill_pair`].
    pub fn spawn(
        name: &'static str,
        kill: EventFd,
        run: impl FnOnce() + Send + 'static,
    ) -> Result<Self, ActivateError> {
        // Through the spawner: `activate` runs on a (confined) vCPU thread.
        let thread = confine::spawn(name, run).map_err(ActivateError::Worker)?;
        Ok(DeviceWorker { kill, thread, name })
    }

    /// Signals the worker to stop and joins it. Returns false if it could
    /// not be signalled (then it is not joined: the join could hang) or
    /// had panicked.
    pub fn stop(self) -> bool {
        if let Err(e) = self.kill.write(1) {
            tracing::error!(worker = self.name, "cannot signal the worker to stop: {e}");
            return false;
        }
        if self.thread.join().is_err() {
            tracing::error!(worker = self.name, "the worker thread panicked");
            return false;
        }
        true
    }
}

/// The checks every `activate` starts with: not active yet, not shut
/// down, and as many queues and queue eventfds as the device has.
pub fn check_activation(
    active: bool,
    shut_down: bool,
    expected: usize,
    queues: &[Queue],
    queue_evts: &[EventFd],
) -> Result<(), ActivateError> {
    if active {
        return Err(ActivateError::AlreadyActive);
    }
    if shut_down {
        return Err(ActivateError::Backend("the device was shut down".into()));
    }
    for got in [queues.len(), queue_evts.len()] {
        if got != expected {
            return Err(ActivateError::QueueCount { expected, got });
        }
    }
    Ok(())
}

/// A driver's read of `data.len()` bytes at `offset` of a config space
/// held as bytes; a read outside it gives zeros.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let range = usize::try_from(offset)
        .ok()
        .and_then(|start| Some(start..start.checked_add(data.len())?));
    match range.and_then(|r| config.get(r)) {
        Some(src) => data.copy_from_slice(src),
        None => data.fill(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use virtio_queue::QueueT;
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

    #[test]
    fn config_reads_inside_and_outside() {
        let cfg = [1u8, 2, 3, 4];
        let mut b = [9u8; 2];
        read_config_bytes(&cfg, 1, &mut b);
        assert_eq!(b, [2, 3]);
        read_config_bytes(&cfg, 3, &mut b);
        assert_eq!(b, [0, 0], "straddling the end");
        read_config_bytes(&cfg, u64::MAX, &mut b);
        assert_eq!(b, [0, 0], "offset overflow");
    }

    #[test]
    fn activation_checks() {
        let q = || Queue::new(16).unwrap();
        let evt = || EventFd::new(0).unwrap();
        assert!(check_activation(false, false, 1, &[q()], &[evt()]).is_ok());
        assert!(matches!(
            check_activation(true, false, 1, &[q()], &[evt()]),
            Err(ActivateError::AlreadyActive)
        ));
        assert!(check_activation(false, true, 1, &[q()], &[evt()]).is_err());
        assert!(matches!(
            check_activation(false, false, 2, &[q(), q()], &[evt()]),
            Err(ActivateError::QueueCount {
                expected: 2,
                got: 1
            })
        ));
    }

    #[test]
    fn stop_wakes_and_joins_the_worker() {
        let (kill, worker_end) = DeviceWorker::kill_pair().unwrap();
        let stopped = Arc::new(AtomicBool::new(false));
        let flag = stopped.clone();
        let w = DeviceWorker::spawn("ember-test-worker", kill, move || {
            let epoll = Epoll::new().unwrap();
            use std::os::fd::AsRawFd;
            epoll
                .ctl(
                    ControlOperation::Add,
                    worker_end.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, 0),
                )
                .unwrap();
            let mut events = [EpollEvent::default(); 1];
            epoll.wait(-1, &mut events).unwrap();
            flag.store(true, Ordering::SeqCst);
        })
        .unwrap();
        assert!(w.stop());
        assert!(stopped.load(Ordering::SeqCst));

        let (kill, _) = DeviceWorker::kill_pair().unwrap();
        let w = DeviceWorker::spawn("ember-test-panic", kill, || panic!("worker bug")).unwrap();
        assert!(!w.stop(), "a panicked worker is reported");
    }
}
