//! virtio-mmio transport (virtio spec 4.2, version 2).
