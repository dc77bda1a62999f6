//! The hooks of a pod's containers across their life: which container has
//! hooks left to run, and the pod's network-namespace holder they share.
//!
//! - [`PodHooks::before_create`]: refuses hooks that cannot run for a VM,
//!   makes the holder, runs `prestart` then `createRuntime` (as runc does);
//!   a failure runs the container's `poststop` hooks (so that what the
//!   failed hooks set up can be undone) and fails the create;
//! - [`PodHooks::poststart`]: after the container's process started;
//! - [`PodHooks::poststop`]: after the container is deleted while the VM
//!   stays; [`PodHooks::vm_gone`] after the VM is gone: every remaining
//!   container's `poststop`, then the holder goes (and with it the
//!   namespace, unless something else holds it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::Value;

use super::netns::NetnsHolder;
use super::phase::{self, Phase, RunRequest, Status};
use super::runner;
use crate::error::{Error, Result};
use crate::resources::network::{NetworkError, PodNetwork};

/// What a VM cannot honour, and why (README, "Using Ember with nerdctl").
const IN_CONTAINER_NAMESPACE: &str = "runs in the container's namespaces, which are inside the \
    pod's VM where host binaries do not exist; the Ember runtime runs hooks on the host only \
    (createRuntime, prestart, poststart, poststop)";

#[derive(Default)]
pub struct PodHooks {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Containers with hooks, by id: their bundle.
    registered: BTreeMap<String, PathBuf>,
    holder: Option<NetnsHolder>,
}

/// Whether `spec` carries hooks of any kind.
pub fn has_hooks(spec: &Value) -> bool {
    Phase::ALL.iter().any(|p| {
        spec.get("hooks")
            .and_then(|h| h.get(p.key()))
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
    })
}

/// Refuses a spec whose hooks are malformed, or of a kind that cannot
/// run for a VM.
pub fn check(spec: &Value) -> Result<()> {
    for p in Phase::ALL {
        let hooks = phase::hooks_of(spec, p).map_err(Error::invalid)?;
        if let (Phase::CreateContainer | Phase::StartContainer, Some(h)) = (p, hooks.first()) {
            return Err(Error::invalid(format!(
                "{p} hook {} cannot run: a {p} hook {IN_CONTAINER_NAMESPACE}",
                h.path
            )));
        }
    }
    Ok(())
}

impl PodHooks {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a container's `prestart` and `createRuntime` hooks, the
    /// holder made first (in `pod_netns` if the pod has a namespace, else
    /// in a new one). Returns the holder's namespace if a hook left a
    /// network interface there (the pod's network then), `None` if the
    /// container has no hooks or the namespace is empty.
    #[tracing::instrument(skip(self, spec, bundle), fields(bundle = %bundle.display()))]
    pub async fn before_create(
        &self,
        id: &str,
        bundle: &Path,
        spec: &Value,
        pod_netns: Option<&Path>,
    ) -> Result<Option<PathBuf>> {
        if !has_hooks(spec) {
            return Ok(None);
        }
        check(spec)?;
        let (pid, netns) = {
            let mut inner = self.inner();
            if inner.holder.is_none() {
                let holder = NetnsHolder::new(pod_netns).map_err(|e| {
                    Error::Internal(
                        anyhow::Error::from(e).context("the pod's network namespace for hooks"),
                    )
                })?;
                tracing::info!(pid = holder.pid(), netns = %holder.path().display(), "network namespace holder for the pod's hooks");
                inner.holder = Some(holder);
            }
            let holder = inner.holder.as_ref().map(|h| (h.pid(), h.path()));
            inner
                .registered
                .insert(id.to_string(), bundle.to_path_buf());
            holder.unwrap_or_default()
        };
        for p in [Phase::Prestart, Phase::CreateRuntime] {
            let failures = run(RunRequest {
                bundle: bundle.to_path_buf(),
                phase: p,
                id: id.to_string(),
                status: Status::Creating,
                pid,
            })
            .await;
            if let Some(failure) = failures.into_iter().next() {
                self.poststop(id).await;
                return Err(Error::precondition(format!(
                    "creating container {id}: {failure}"
                )));
            }
        }
        match PodNetwork::inspect(&netns).await {
            Ok(_) => Ok(Some(netns)),
            Err(NetworkError::NoInterfaces(_)) => {
                tracing::info!(
                    "the hooks left no network interface in the pod's namespace; the VM gets none"
                );
                Ok(None)
            }
            Err(e) => {
                self.poststop(id).await;
                Err(Error::precondition(format!(
                    "creating container {id}: the network its hooks set up: {e}"
                )))
            }
        }
    }

    /// Runs a started container's `poststart` hooks; failures are logged.
    pub async fn poststart(&self, id: &str) {
        let Some((bundle, pid)) = self.registered(id) else {
            return;
        };
        warn_on_failures(
            id,
            Phase::Poststart,
            run(RunRequest {
                bundle,
                phase: Phase::Poststart,
                id: id.to_string(),
                status: Status::Running,
                pid,
            })
            .await,
        );
    }

    /// Runs a deleted container's `poststop` hooks (once); failures are
    /// logged.
    pub async fn poststop(&self, id: &str) {
        let Some((bundle, pid)) = self.registered(id) else {
            return;
        };
        self.inner().registered.remove(id);
        warn_on_failures(
            id,
            Phase::Poststop,
            run(RunRequest {
                bundle,
                phase: Phase::Poststop,
                id: id.to_string(),
                status: Status::Stopped,
                pid,
            })
            .await,
        );
    }

    /// The pod's VM is gone: every remaining `poststop`, then the holder.
    pub async fn vm_gone(&self) {
        let ids: Vec<String> = self.inner().registered.keys().cloned().collect();
        for id in ids {
            self.poststop(&id).await;
        }
        let holder = self.inner().holder.take();
        if let Some(h) = holder {
            tracing::info!(pid = h.pid(), "network namespace holder released");
            // Joins its thread: off the async workers.
            let _ = tokio::task::spawn_blocking(move || drop(h)).await;
        }
    }

    fn registered(&self, id: &str) -> Option<(PathBuf, u32)> {
        let inner = self.inner();
        let bundle = inner.registered.get(id)?.clone();
        Some((bundle, inner.holder.as_ref().map_or(0, NetnsHolder::pid)))
    }
}

async fn run(req: RunRequest) -> Vec<String> {
    let what = format!("{} hooks of {}", req.phase, req.id);
    tokio::task::spawn_blocking(move || runner::run(&req))
        .await
        .unwrap_or_else(|e| vec![format!("{what}: {e}")])
}

fn warn_on_failures(id: &str, phase: Phase, failures: Vec<String>) {
    for f in failures {
        tracing::warn!(container = %id, %phase, "{f} (ignored, as the OCI runtime spec asks)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn hooks_that_would_run_in_the_guest_are_refused() {
        for kind in ["createContainer", "startContainer"] {
            let spec = json!({"hooks": {kind: [{"path": "/usr/bin/nvidia-hook"}]}});
            assert!(has_hooks(&spec));
            let e = check(&spec).unwrap_err();
            assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
            let msg = e.to_string();
            assert!(
                msg.contains(kind) && msg.contains("/usr/bin/nvidia-hook"),
                "{msg}"
            );
            assert!(msg.contains("inside the pod's VM"), "{msg}");
        }
        let fine = json!({"hooks": {"createRuntime": [{"path": "/bin/true"}], "poststop": [], "startContainer": []}});
        assert!(check(&fine).is_ok());
        assert!(!has_hooks(&json!({"hooks": {"poststop": []}})));
        assert!(!has_hooks(&json!({})));
    }

    /// Needs root (a new network namespace), as the shim has. Hooks run
    /// in this process (no runner), as in any unconfined process.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_create_runs_poststop_and_releases_the_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("c1");
        std::fs::create_dir(&bundle).unwrap();
        let log = dir.path().join("log");
        let hook = |name: &str, body: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p.display().to_string()
        };
        let record = |phase: &str| {
            format!(
                "read s; echo \"{phase} $s\" >> {}; test -e /proc/$(echo \"$s\" | sed 's/.*\"pid\":\\([0-9]*\\).*/\\1/')/ns/net",
                log.display()
            )
        };
        let ok = hook("ok", &record("createRuntime"));
        let bad = hook("bad", "echo nope >&2; exit 7");
        let stop = hook("stop", &record("poststop"));
        let spec = json!({
            "ociVersion": "1.0.2",
            "hooks": {"createRuntime": [{"path": ok}, {"path": bad}], "poststop": [{"path": stop}]},
        });
        std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
        let hooks = PodHooks::default();
        let e = hooks
            .before_create("c1", &bundle, &spec, None)
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!(
                "createRuntime hook #1 ({bad}) exited with status 7; stderr: nope"
            )),
            "{msg}"
        );
        let got = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = got.lines().collect();
        assert_eq!(lines.len(), 2, "{got}");
        assert!(
            lines[0].starts_with("createRuntime {") && lines[0].contains("\"status\":\"creating\""),
            "{got}"
        );
        assert!(
            lines[1].starts_with("poststop {") && lines[1].contains("\"status\":\"stopped\""),
            "{got}"
        );
        // The poststop ran once; the holder goes with the (absent) VM.
        hooks.poststop("c1").await;
        assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 2);
        let pid = hooks.inner().holder.as_ref().map(NetnsHolder::pid).unwrap();
        hooks.vm_gone().await;
        assert!(!Path::new(&format!("/proc/{pid}/ns/net")).exists());
        assert!(hooks.inner().holder.is_none());
    }
}
