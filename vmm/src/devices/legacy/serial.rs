//! 16550 serial console (vm-superio) on COM1. Output goes to a log file the
//! user can read; lines are scanned for boot markers and kernel panics.
//! The THRE interrupt goes through an irqfd, so user-space writes to the
//! tty (interrupt driven) appear too, not only polled printk output.

use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::console_log::CappedLog;
use super::IrqfdTrigger;
use crate::bus::BusDevice;
use crate::exit::ExitSignal;
use crate::timing::BootClock;

/// Longest line kept for marker scanning; the guest controls the output,
/// so the buffer is bounded (longer lines are still logged, just not
/// scanned past this).
const MAX_LINE: usize = 4096;
const PANIC_MARKER: &str = "Kernel panic - not syncing";

/// Where console output goes: a capped, rotated log file (or nowhere),
/// after the scan for markers.
pub struct ConsoleLog {
    file: Option<CappedLog>,
    line: Vec<u8>,
    clock: BootClock,
    exit: ExitSignal,
}

impl ConsoleLog {
    pub fn new(file: Option<CappedLog>, clock: BootClock, exit: ExitSignal) -> Self {
        Self {
            file,
            line: Vec::with_capacity(256),
            clock,
            exit,
        }
    }

    fn end_line(&mut self) {
        let line = String::from_utf8_lossy(&self.line);
        self.clock.observe_console_line(&line);
        if line.contains(PANIC_MARKER) {
            tracing::error!(console = %line.trim_end(), "guest kernel panic");
            self.exit.note_panic(&line);
        }
        self.line.clear();
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                self.end_line();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
        if let Some(f) = self.file.as_mut() {
            // A full disk (or a failed rotation) must not stop the guest:
            // log once and drop output.
            if let Err(e) = f.write_all(buf) {
                tracing::warn!("console log write failed, console output dropped: {e}");
                self.file = None;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

pub struct SerialConsole(Serial<IrqfdTrigger, NoEvents, ConsoleLog>);

impl SerialConsole {
    pub fn new(irq: IrqfdTrigger, out: ConsoleLog) -> Self {
        Self(Serial::new(irq, out))
    }

    /// Recreates the UART with the registers of a snapshot.
    pub fn from_state(
        state: &vm_superio::serial::SerialState,
        irq: IrqfdTrigger,
        out: ConsoleLog,
    ) -> Result<Self, String> {
        Serial::from_state(state, irq, NoEvents, out)
            .map(Self)
            .map_err(|e| format!("serial state: {e:?}"))
    }

    pub fn state(&self) -> vm_superio::serial::SerialState {
        self.0.state()
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.0.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.0.write(off, b) {
                tracing::warn!("serial write at offset {off}: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::legacy::console_log::{rotated_path, DEFAULT_MAX_BYTES, MIN_MAX_BYTES};
    use crate::exit::ExitReason;
    use std::time::Instant;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn output_reaches_the_log_and_markers_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let clock = BootClock::new(Instant::now());
        let exit = ExitSignal::new();
        let log = ConsoleLog::new(
            Some(CappedLog::open(&path, DEFAULT_MAX_BYTES).unwrap()),
            clock.clone(),
            exit.clone(),
        );
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut serial = SerialConsole::new(IrqfdTrigger(irq.try_clone().unwrap()), log);
        // Enable the THRE interrupt (IER bit 1), as the 8250 driver does.
        serial.write(1, &[0x02]);
        assert!(irq.read().unwrap() > 0, "enabling THRE raises it at once");
        // Reading IIR acknowledges it, as the driver's interrupt handler does.
        let mut iir = [0u8];
        serial.read(2, &mut iir);
        for &b in b"Run /init as init process\nKernel panic - not syncing: test\n" {
            serial.write(0, &[b]);
        }
        assert!(irq.read().unwrap() > 0, "THRE interrupt raised");
        assert!(clock.marks().init_started.is_some());
        exit.exit(ExitReason::GuestReset);
        assert!(matches!(exit.reason(), Some(ExitReason::GuestPanic(_))));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("Run /init"));
    }

    /// The guest floods the UART: the log files on the host stay under the
    /// cap and the newest output is there.
    #[test]
    fn a_console_flood_stays_under_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let log = ConsoleLog::new(
            Some(CappedLog::open(&path, MIN_MAX_BYTES).unwrap()),
            BootClock::default(),
            ExitSignal::new(),
        );
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut serial = SerialConsole::new(IrqfdTrigger(irq), log);
        for i in 0..(20 * MIN_MAX_BYTES) {
            serial.write(0, &[b'A' + (i % 26) as u8]);
        }
        for &b in b"\nlast line\n" {
            serial.write(0, &[b]);
        }
        let len = |p: &std::path::Path| std::fs::metadata(p).unwrap().len();
        assert!(len(&path) <= MIN_MAX_BYTES);
        assert_eq!(len(&rotated_path(&path)), MIN_MAX_BYTES);
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .ends_with("last line\n"));
    }

    #[test]
    fn endless_line_is_bounded() {
        let mut log = ConsoleLog::new(None, BootClock::default(), ExitSignal::new());
        for _ in 0..100 {
            log.write_all(&[b'x'; 1000]).unwrap();
        }
        assert!(log.line.len() <= MAX_LINE);
    }
}
