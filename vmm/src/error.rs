//! Every error type a [`crate::VmError`] can carry, in one place, so callers
//! can name and match them without reaching into the VMM's internals.

pub use crate::arch::x86_64::boot::BootError as KernelLoadError;
pub use crate::arch::x86_64::mptable::MptableError;
pub use crate::arch::x86_64::regs::RegsError;
pub use crate::config::ConfigError;
pub use crate::devices::virtio::fs::FsError;
pub use crate::devices::virtio::net::NetError;
pub use crate::devices::virtio::vsock::{ConnectError, VsockError};
pub use crate::memory::MemoryError;
pub use crate::snapshot::SnapshotError;
pub use crate::vm::VmError;
