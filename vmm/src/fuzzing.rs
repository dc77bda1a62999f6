//! NOT API. Device internals for the fuzz targets in `fuzz/` (see
//! `deploy/fuzz.sh`): synchronous harnesses around the device data paths,
//! test doubles of the transport seam, and the snapshot state format. Only
//! built with the `fuzzing` feature, which the shim and the CLI never
//! enable; anything here may change without notice.

pub use crate::bus::BusDevice;
pub use crate::devices::virtio::test_utils::{CountingInterrupt, DummyDevice};
pub use crate::devices::virtio::{GuestMemoryMmap, VirtioDevice};

/// The virtio-mmio transport.
pub mod mmio {
    pub use crate::devices::virtio::mmio::{
        regs, MmioInterrupt, MmioQueueState, MmioState, MmioTransport, MMIO_SIZE,
    };
}

/// virtio-net: the device worker's harness and the frame limits.
pub mod net {
    pub use crate::devices::virtio::net::device::fuzzing::NetHarness;
    pub use crate::devices::virtio::net::{
        NetBackend, MAX_FRAME_LEN, MIN_FRAME_LEN, MIN_MTU, VNET_HDR_LEN,
    };
}

/// virtio-fs: one descriptor chain served by the device's request path.
pub mod fs {
    pub use crate::devices::virtio::fs::fuzzing::FsHarness;
    pub use crate::devices::virtio::fs::FsOptions;
}

/// virtio-vsock: packet parsing and the connection muxer.
pub mod vsock {
    pub use crate::devices::virtio::vsock::fuzzing::MuxerHarness;
    pub use crate::devices::virtio::vsock::packet;
    pub use crate::devices::virtio::vsock::VsockTimeouts;
}

/// The snapshot state file and what it holds.
pub mod snapshot {
    pub use crate::snapshot::{SerialSnapshot, SnapshotState, VmState, FORMAT_VERSION};
}
