//! i8042 controller: the guest resets (reboot, `reboot=k`) by writing the
//! CPU-reset command to port 0x64; that ends the VM.

use vm_superio::I8042Device;

use crate::bus::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

/// vm-superio trigger that ends the VM.
pub struct ResetTrigger(pub ExitSignal);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        tracing::info!("guest requested a reset through the i8042");
        self.0.exit(ExitReason::GuestReset);
        Ok(())
    }
}

pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    pub fn new(exit: ExitSignal) -> Self {
        Self(I8042Device::new(ResetTrigger(exit)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.0.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            let _ = self.0.write(off, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_vm() {
        let exit = ExitSignal::new();
        let mut dev = I8042::new(exit.clone());
        dev.write(0, &[0xfe]);
        assert!(!exit.should_stop(), "data port write is not a reset");
        dev.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
        let mut b = [0xffu8; 1];
        dev.read(4, &mut b);
    }
}
