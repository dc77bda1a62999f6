//! virtio-vsock device, Firecracker-style hybrid Unix-socket backend.
