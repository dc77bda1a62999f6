//! `containerd-shim-ember-v2`: a containerd shim v2 (task API v2, runtime
//! type `io.containerd.ember.v2`) that runs each pod in its own KVM microVM.
//!
//! The VMM runs inside this process (`ember-vmm`); containers run inside the
//! guest under the Ember agent, reached with ttrpc over virtio-vsock
//! (`ember-proto`).
//!
//! Layout:
//! - [`shim`]: the `containerd_shim::asynchronous::Shim` entry points:
//!   `start` (one long-lived shim per pod, grouped by the CRI sandbox id or
//!   `io.ember.group`), `delete` (cleanup after a crashed shim);
//! - [`start`]: `start` and `-info` for every containerd version (1.6 to
//!   2.3's bootstrap protocol), before containerd-shim's `run`;
//! - [`task`]: the containerd Task service, request by request;
//! - [`sandbox`]: one per VM: boot and agent handshake (shared with
//!   `ember bench boot`), the container and process registry, exits, OOM
//!   events, VM death handling and teardown;
//! - [`templates`]: VM templates, policy and store: restore a pod's VM
//!   from its template (making it first), or boot it cold;
//! - [`resources`]: host-side preparation of what a container needs in the
//!   guest: rootfs and bind mounts into the virtio-fs share, OCI spec
//!   rewriting, VM sizing;
//! - [`io`]: stdio bridging between containerd's fifos and vsock streams;
//! - [`events`], [`metrics`], [`config`], [`annotations`], [`error`],
//!   [`logging`].

pub mod annotations;
pub mod config;
pub mod containerd_config;
pub mod error;
pub mod events;
pub mod io;
pub mod logging;
pub mod metrics;
pub mod resources;
pub mod sandbox;
pub mod sandbox_service;
pub mod serve;
pub mod shim;
pub mod start;
pub mod task;
pub mod templates;

/// The runtime name containerd knows this shim by.
pub const RUNTIME_ID: &str = "io.containerd.ember.v2";

/// Version reported by `Connect` and the `ember` CLI.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
