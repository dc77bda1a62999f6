//! Ember's in-process VMM: boots a Linux microVM on KVM.
//!
//! The crate's API is this small facade; devices, the bus, the vCPU loop,
//! guest memory and the x86 setup are private:
//! - [`Vm`]: [`Vm::start`] builds a VM from a [`VmConfig`] (guest memory in
//!   a memfd, ELF kernel, initrd, zero page, MP table, in-kernel irqchip and
//!   PIT, a 16550 console, virtio-mmio devices) and runs one thread per
//!   vCPU; [`Vm::wait`] resolves with an [`ExitReason`] when the guest ends;
//!   [`Vm::shutdown`] releases everything. [`Vm::snapshot`] writes a VM to
//!   [`SnapshotFiles`] (ending it) and [`Vm::restore`] brings one back from
//!   them, refusing files of another format ([`SNAPSHOT_FORMAT_VERSION`]),
//!   identity or a bad checksum with a [`SnapshotError`]. Which snapshots
//!   to keep (templates) is the caller's business.
//! - Its configs: [`VmConfig`], [`VsockConfig`], [`FsShareConfig`] with
//!   [`FsLimits`], [`NetConfig`], [`CpuTemplate`], and their limits
//!   ([`MAX_VCPUS`], [`MIN_MEM_MIB`], [`MIN_GUEST_CID`], console log
//!   sizes).
//! - The host's way to the guest agent: the hybrid virtio-vsock client
//!   ([`connect_hybrid`], [`connect_hybrid_timeout`], [`ConnectError`]).
//! - [`error`]: every error a [`VmError`] carries; [`timing`]: boot phase
//!   timings; [`process_memory`]: this process' memory figures.
//! - [`confine`]: per-thread seccomp filters and capabilities of the VMM's
//!   guest-driven threads and of the shim's own.
//! - [`net`]: netns and tap helpers the shim's pod networking shares.
//!
//! The fuzz targets reach device internals through `fuzzing` (feature
//! `fuzzing`, hidden, not API).

mod arch;
mod bus;
mod config;
pub mod confine;
mod devices;
pub mod error;
mod exit;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod memory;
pub mod net;
pub mod process_memory;
mod snapshot;
pub mod timing;
mod vcpu;
mod vm;

pub use arch::x86_64::cpuid::CpuTemplate;
pub use arch::x86_64::mptable::MAX_VCPUS;
pub use config::{
    FsLimits, FsShareConfig, NetConfig, VmConfig, VsockConfig, DEFAULT_CONSOLE_LOG_MAX_BYTES,
    MIN_GUEST_CID,
};
pub use devices::legacy::console_log::MIN_MAX_BYTES as MIN_CONSOLE_LOG_MAX_BYTES;
pub use devices::virtio::vsock::{connect_hybrid, connect_hybrid_timeout, ConnectError};
pub use exit::ExitReason;
pub use memory::MIN_MEM_MIB;
pub use snapshot::{SnapshotError, SnapshotFiles, FORMAT_VERSION as SNAPSHOT_FORMAT_VERSION};
pub use timing::BootTimings;
pub use vm::{Vm, VmError};
