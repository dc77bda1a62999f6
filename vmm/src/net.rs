//! Host-side networking the shim shares with the VMM's virtio-net device:
//! running a closure inside a network namespace (CNI's pod netns), tap
//! devices, and MAC formatting. The device itself stays inside the crate.

pub use crate::devices::virtio::net::{
    format_mac, in_netns, NetBackend, NetError, Tap, VNET_HDR_LEN,
};
