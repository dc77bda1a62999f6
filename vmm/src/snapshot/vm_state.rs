//! VM-wide KVM state: the in-kernel PIC pair and IOAPIC, the PIT, the clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::SnapshotError;

#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { op, source }
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, SnapshotError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm("GET_IRQCHIP"))?;
    Ok(chip)
}

impl VmState {
    pub fn save(vm: &VmFd) -> Result<Self, SnapshotError> {
        let mut clock = vm.get_clock().map_err(kvm("GET_CLOCK"))?;
        // Only the value is meaningful on another host or at another time.
        clock.flags = 0;
        Ok(Self {
            pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(kvm("GET_PIT2"))?,
            clock,
        })
    }

    /// Restores onto a VM whose irqchip and PIT were just created.
    pub fn restore(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        vm.set_pit2(&self.pit).map_err(kvm("SET_PIT2"))?;
        vm.set_clock(&self.clock).map_err(kvm("SET_CLOCK"))?;
        vm.set_irqchip(&self.pic_master)
            .map_err(kvm("SET_IRQCHIP"))?;
        vm.set_irqchip(&self.pic_slave)
            .map_err(kvm("SET_IRQCHIP"))?;
        vm.set_irqchip(&self.ioapic).map_err(kvm("SET_IRQCHIP"))?;
        Ok(())
    }
}
