//! The thread that creates device worker threads.
//!
//! A new thread inherits its creator's seccomp filters and capabilities,
//! and filters can never be removed. Device workers are started by
//! `activate`, which runs on the vCPU thread that wrote DRIVER_OK: created
//! there, a worker would carry the vCPU's allow-list under its own (and no
//! capability the vCPU dropped). So once confinement is enabled, workers
//! are created by this thread instead, which has only the control plane's
//! confinement; each worker then confines itself to its role.

use std::io;
use std::sync::mpsc::{channel, sync_channel, Sender, SyncSender};
use std::sync::Mutex;
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send + 'static>;

struct Request {
    name: String,
    run: Job,
    reply: SyncSender<io::Result<JoinHandle<()>>>,
}

static SPAWNER: Mutex<Option<Sender<Request>>> = Mutex::new(None);

/// Starts the spawner thread (once). Call it from a thread that has only
/// the control plane's confinement.
pub fn start() -> io::Result<()> {
    let mut slot = SPAWNER.lock().unwrap_or_else(|p| p.into_inner());
    if slot.is_some() {
        return Ok(());
    }
    let (tx, rx) = channel::<Request>();
    std::thread::Builder::new()
        .name("ember-spawner".into())
        .spawn(move || {
            for req in rx {
                let spawned = std::thread::Builder::new().name(req.name).spawn(req.run);
                // The requester waits for the reply; if it went away the
                // thread runs anyway and is simply not joined.
                let _ = req.reply.send(spawned);
            }
        })?;
    *slot = Some(tx);
    Ok(())
}

/// Starts thread `name` running `run`: through the spawner once it was
/// started, else directly (unconfined processes: tests, `ember bench`).
pub fn spawn(name: &str, run: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    let sender = SPAWNER
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .cloned();
    let Some(sender) = sender else {
        return std::thread::Builder::new().name(name.into()).spawn(run);
    };
    let (reply, answer) = sync_channel(1);
    let gone = || io::Error::other("the worker spawner thread is gone");
    sender
        .send(Request {
            name: name.into(),
            run: Box::new(run),
            reply,
        })
        .map_err(|_| gone())?;
    answer.recv().map_err(|_| gone())?
}
