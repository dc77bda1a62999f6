//! Ember in-guest agent.
//!
//! The agent is PID 1 of the microVM (the initrd's `/init`). It mounts the
//! basic file systems, reaps orphans and serves the `ember.agent.v1.Agent`
//! ttrpc service (see `proto/agent.proto`) on vsock port 1024.
//!
//! The guest may run on an emulated-ring-0 KVM where every syscall costs
//! milliseconds: the agent runs on a current-thread tokio runtime, never
//! polls, and keeps its syscall count low.
//!
//! For host-side testing, the binary serves on a Unix socket instead when it
//! is not PID 1 and `EMBER_AGENT_TEST_LISTEN=<path>` is set ([`Mode::Test`]);
//! it then never mounts, never sets the clock and never reboots.
//!
//! Environment (see [`service::Config`]):
//! - `EMBER_AGENT_CGROUP_ROOT`: parent of the container cgroups (cgroup v2;
//!   default `/sys/fs/cgroup/ember` in the VM, no cgroups in test mode
//!   unless set);
//! - test mode only: `EMBER_AGENT_RUN_DIR` (state; the stdio listeners are
//!   Unix sockets `<run dir>/stdio-<port>.sock` instead of vsock ports) and
//!   `EMBER_AGENT_SHARED_DIR` (stands in for `/run/ember/shared`: spec
//!   and rootfs paths under `/run/ember/shared` are rewritten to it).

pub mod cmdline;
pub mod console;
pub mod container;
pub mod init;
pub mod logging;
pub mod mounts;
pub mod network;
pub mod port_forward;
pub mod power;
pub mod reaper;
pub mod sandbox;
pub mod server;
pub mod service;
pub mod transport;

use std::path::PathBuf;

/// Crate version, reported by `Version`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Environment variable that, for a non-PID-1 agent, names the Unix socket
/// to serve on (host-side testing).
pub const TEST_LISTEN_ENV: &str = "EMBER_AGENT_TEST_LISTEN";

/// How the agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of the VM: mounts, vsock, real clock, reboot on shutdown.
    Init,
    /// Host-side test: serve on this Unix socket; no mounts, no clock
    /// changes, `Shutdown` makes the process exit 0.
    Test { socket: PathBuf },
}
