//! Whose fault a failed restore is: the template's (discard it) or the
//! pod's own host resources or the host's KVM (keep it).

use ember_vmm::VmError;

/// Why a restore failed.
#[derive(Debug)]
pub(super) enum RestoreError {
    /// The template, or the guest in it, is unusable: discard it.
    Template(anyhow::Error),
    /// This pod's own host resources (socket, share, tap, console log) or
    /// the host's KVM: the template is not at fault and is kept.
    Pod(anyhow::Error),
}

impl std::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestoreError::Template(e) | RestoreError::Pod(e) => write!(f, "{e:#}"),
        }
    }
}

impl From<VmError> for RestoreError {
    fn from(e: VmError) -> Self {
        let pod_side = matches!(
            e,
            VmError::Config(_)
                | VmError::Kvm(_)
                | VmError::ConsoleLog { .. }
                | VmError::Vsock(_)
                | VmError::Net { .. }
                | VmError::Fs { .. }
                | VmError::OutOfIrqs
                | VmError::Io { .. }
                | VmError::Join(_)
        );
        let e = anyhow::Error::from(e).context("restoring the VM");
        if pod_side {
            RestoreError::Pod(e)
        } else {
            RestoreError::Template(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_template_faults_discard_the_template() {
        use ember_vmm::SnapshotError;
        let bad = VmError::Snapshot(SnapshotError::Checksum("/t/state".into()));
        assert!(matches!(RestoreError::from(bad), RestoreError::Template(_)));
        let pod = VmError::Net {
            tap: "tap0".into(),
            source: ember_vmm::net::NetError::InvalidMtu(1),
        };
        let e = RestoreError::from(pod);
        assert!(matches!(e, RestoreError::Pod(_)));
        assert!(e.to_string().contains("tap0"), "{e}");
    }
}
