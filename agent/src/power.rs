//! Ending the VM.
//!
//! The agent calls `reboot(RB_AUTOBOOT)`: the guest kernel runs with
//! `reboot=k`, so the reset goes through the i8042 keyboard controller, and
//! the VMM treats a guest reset as the end of the VM. PID 1 must never
//! exit (the kernel would panic), so [`power_off`] never returns.

use std::time::Duration;

use nix::sys::reboot::{reboot, RebootMode};

use crate::console;

/// Sync file systems and reset the VM. Only ever acts when the process is
/// PID 1; otherwise (a bug: test mode must never get here) it exits the
/// process with status 1 instead, so it can never reboot a host.
pub fn power_off() -> ! {
    if std::process::id() != 1 {
        tracing::error!("power_off called while not PID 1; exiting instead");
        std::process::exit(1);
    }
    console::line(console::POWERING_OFF);
    nix::unistd::sync();
    for mode in [
        RebootMode::RB_AUTOBOOT,
        RebootMode::RB_POWER_OFF,
        RebootMode::RB_HALT_SYSTEM,
    ] {
        let Err(e) = reboot(mode);
        tracing::error!("reboot({mode:?}) failed: {e}");
    }
    // Nothing else to try: idle forever rather than exit and panic the
    // kernel. No polling: sleep in long intervals.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
