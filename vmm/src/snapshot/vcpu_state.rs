//! Saving and restoring one vCPU's architectural state through KVM.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// Everything KVM holds for a vCPU, in the order it is restored.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// FPU, SSE and extended state.
    pub xsave: kvm_xsave,
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { op, source }
}

/// MSRs KVM lets us read for this vCPU, from the host's index list.
pub fn save_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, SnapshotError> {
    let mut saved = Vec::with_capacity(indices.len());
    // KVM_GET_MSRS stops at the first MSR it cannot read; read in chunks
    // and skip over the failing index.
    let mut rest: &[u32] = indices;
    while !rest.is_empty() {
        let chunk: Vec<kvm_msr_entry> = rest
            .iter()
            .take(64)
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&chunk)
            .map_err(|e| SnapshotError::Format(format!("MSR list: {e:?}")))?;
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm("GET_MSRS"))?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        // Skip the unreadable MSR (if any) that stopped this chunk.
        let consumed = if read < chunk.len() { read + 1 } else { read };
        rest = &rest[consumed.min(rest.len())..];
    }
    Ok(saved)
}

impl VcpuState {
    pub fn save(vcpu: &VcpuFd, id: u8, msr_indices: &[u32]) -> Result<Self, SnapshotError> {
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("GET_CPUID2"))?
            .as_slice()
            .to_vec();
        Ok(Self {
            id,
            cpuid,
            mp_state: vcpu.get_mp_state().map_err(kvm("GET_MP_STATE"))?,
            regs: vcpu.get_regs().map_err(kvm("GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm("GET_SREGS"))?,
            xsave: vcpu.get_xsave().map_err(kvm("GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().ok(),
            debug_regs: vcpu.get_debug_regs().map_err(kvm("GET_DEBUGREGS"))?,
            lapic: vcpu.get_lapic().map_err(kvm("GET_LAPIC"))?,
            msrs: save_msrs(vcpu, msr_indices)?,
            events: vcpu.get_vcpu_events().map_err(kvm("GET_VCPU_EVENTS"))?,
        })
    }

    /// Restores onto a freshly created vCPU.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), SnapshotError> {
        let cpuid = CpuId::from_entries(&self.cpuid)
            .map_err(|e| SnapshotError::Format(format!("CPUID entries: {e:?}")))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm("SET_CPUID2"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm("SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("SET_REGS"))?;
        vcpu.set_sregs(&self.sregs).map_err(kvm("SET_SREGS"))?;
        // SAFETY: the buffer is a complete kvm_xsave saved by KVM_GET_XSAVE
        // from a vCPU with the same CPUID, so it has the size and layout
        // KVM_SET_XSAVE expects.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm("SET_XSAVE"))?;
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(kvm("SET_XCRS"))?;
        }
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(kvm("SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic).map_err(kvm("SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&self.msrs)
            .map_err(|e| SnapshotError::Format(format!("MSR entries: {e:?}")))?;
        let set = vcpu.set_msrs(&msrs).map_err(kvm("SET_MSRS"))?;
        if set != self.msrs.len() {
            return Err(SnapshotError::Format(format!(
                "KVM_SET_MSRS restored {set} of {} MSRs (index {:#x} refused)",
                self.msrs.len(),
                self.msrs.get(set).map(|m| m.index).unwrap_or(0)
            )));
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm("SET_VCPU_EVENTS"))?;
        Ok(())
    }
}
