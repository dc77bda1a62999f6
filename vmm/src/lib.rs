//! Ember's in-process VMM: boots a Linux microVM on KVM.
//!
//! [`Vm::start`] builds a VM from a [`VmConfig`] (guest memory in a memfd,
//! ELF kernel, initrd, zero page, MP table, in-kernel irqchip and PIT, a
//! 16550 console, virtio-mmio devices) and runs one thread per vCPU;
//! [`Vm::wait`] resolves when the guest ends; [`Vm::shutdown`] releases
//! everything. The host reaches the guest agent through the hybrid
//! virtio-vsock socket ([`devices::virtio::vsock::connect_hybrid`]).

pub mod arch;
pub mod bus;
pub mod config;
pub mod confine;
pub mod devices;
pub mod exit;
pub mod memory;
pub mod snapshot;
pub mod timing;
pub mod vcpu;
pub mod vm;

pub use arch::x86_64::cpuid::CpuTemplate;
pub use config::{FsLimits, FsShareConfig, NetConfig, VmConfig, VsockConfig};
pub use exit::ExitReason;
pub use snapshot::{SnapshotError, SnapshotFiles, FORMAT_VERSION as SNAPSHOT_FORMAT_VERSION};
pub use timing::BootTimings;
pub use vm::{Vm, VmError};
