//! Returning chains to the guest and interrupting it, shared by the
//! devices whose workers do both the same way (vsock, net).

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

use super::log_limit::{warn_rl, LogLimiter};
use super::{VirtioInterrupt, VIRTIO_MMIO_INT_VRING};

/// Puts `head` in the used ring with `len` bytes written. A failure (the
/// guest broke its ring) is logged, rate-limited; returns whether it was
/// added.
pub(crate) fn add_used<M: GuestMemory>(
    q: &mut Queue,
    mem: &M,
    head: u16,
    len: u32,
    log: &mut LogLimiter,
    device: &str,
) -> bool {
    match q.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            warn_rl!(log, "{device}: cannot return chain {head}: {e}");
            false
        }
    }
}

/// Raises the device's interrupt once if any queue marked in `used` needs a
/// notification (or cannot tell).
pub(crate) fn notify_used<M: GuestMemory>(
    queues: &mut [Queue],
    used: &[bool],
    mem: &M,
    interrupt: &dyn VirtioInterrupt,
    log: &mut LogLimiter,
    device: &str,
) {
    let mut raise = false;
    for (q, &n) in queues.iter_mut().zip(used) {
        if n {
            raise |= q.needs_notification(mem).unwrap_or(true);
        }
    }
    if raise {
        if let Err(e) = interrupt.trigger(VIRTIO_MMIO_INT_VRING) {
            warn_rl!(log, "{device}: cannot interrupt the guest: {e}");
        }
    }
}
