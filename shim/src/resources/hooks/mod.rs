//! OCI hooks of a container's spec, run on the host.
//!
//! Hooks name host binaries; Ember runs them on the host, in the runtime's
//! namespaces, never in the guest (the guest spec loses them, see
//! [`crate::resources::spec`]). Where each kind runs for a VM:
//!
//! | hook | when | `state.pid` |
//! |---|---|---|
//! | `prestart`, then `createRuntime` | at create, before the pod's VM boots (or before the container is created in a running VM); a failure fails the create | the pod's network-namespace holder |
//! | `createContainer`, `startContainer` | refused at create: they run "in the container namespace", which is in the guest, where no host binary exists | - |
//! | `poststart` | after the container's process started; failures are logged | the holder |
//! | `poststop` | after the container is deleted (after the VM is gone when it was the pod's last), and after a failed create; failures are logged | the holder (its namespace still exists) |
//!
//! The pod's *network-namespace holder* ([`netns`]) is a thread of the shim
//! living in the pod's network namespace, so that `/proc/<pid>/ns/net` is
//! that namespace: a new one, or the one CNI made for a CRI pod. What a
//! hook configures there (nerdctl's `createRuntime` hook runs CNI ADD in
//! it) becomes the pod's network, attached to the VM like a CNI pod's.
//!
//! - [`exec`]: runs one hook process (state on stdin, args, env, timeout,
//!   bounded output);
//! - [`phase`]: the hooks of one phase of one container, read from its
//!   bundle, with the state JSON;
//! - [`runner`]: the process that execs hooks for the confined serving
//!   shim (which cannot exec);
//! - [`netns`]: the namespace holder;
//! - [`lifecycle`]: the pod's hooks across create, start, delete.

pub mod exec;
pub mod lifecycle;
pub mod netns;
pub mod phase;
pub mod runner;

pub use lifecycle::PodHooks;
pub use phase::{Phase, RunRequest, Status};
