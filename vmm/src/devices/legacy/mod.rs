//! Legacy PC devices on port I/O: the 16550 serial console and the i8042
//! (only its CPU-reset command, which ends the VM).

pub mod console_log;
pub mod i8042;
pub mod serial;

use vmm_sys_util::eventfd::EventFd;

/// A vm-superio trigger backed by an irqfd: writing it raises the IRQ.
pub struct IrqfdTrigger(pub EventFd);

impl vm_superio::Trigger for IrqfdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
