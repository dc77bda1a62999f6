//! Host-side resources of a pod: what has to exist on the host, and how the
//! spec has to change, so a container can run in the guest.
//!
//! - [`cgroup`]: the host cgroup the pod's VM is charged to;
//! - [`mount`]: mount(2) helpers and unmount bookkeeping;
//! - [`rootfs`]: a container's rootfs and volumes into the virtio-fs share;
//! - [`spec`]: the OCI spec from host terms into guest terms;
//! - [`sizing`]: vCPUs and memory of the pod's VM;
//! - [`network`]: the pod's CNI network namespace wired to the VM (tc redirect);
//! - [`port_forward`]: `localhost:<port>` in that namespace carried to the guest;
//! - [`hooks`]: the spec's OCI hooks, run on the host.

pub mod cgroup;
pub mod hooks;
pub mod mount;
pub mod network;
pub mod port_forward;
pub mod rootfs;
pub mod sizing;
pub mod spec;
