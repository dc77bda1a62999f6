//! Spawning the pod's long-lived serving shim (this binary with `-socket`),
//! which `containerd_shim::asynchronous::run` then serves.
//!
//! Like containerd-shim's own `spawn`, minus what breaks on containerd 2.x:
//! it does not read stdin (`start` already has). `start` waits until the
//! child closes its stdout: the crate's serving path does that right after
//! its ttrpc server listens (or when the child dies), so on return the
//! socket answers or the child is gone.

use std::process::Stdio;

use anyhow::Context;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

pub struct ServerArgs<'a> {
    pub namespace: &'a str,
    pub id: &'a str,
    /// containerd's address (`-address`).
    pub address: &'a str,
    /// Where the serving shim listens (`unix://...`).
    pub socket: &'a str,
    pub debug: bool,
    pub env: Vec<(String, String)>,
    /// runc options' `ShimCgroup` (containerd 1.6-2.2 with runc options).
    pub shim_cgroup: Option<String>,
}

pub async fn spawn_server(args: &ServerArgs<'_>) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the shim binary")?;
    let mut command = Command::new(exe);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .envs(args.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .args([
            "-namespace",
            args.namespace,
            "-id",
            args.id,
            "-address",
            args.address,
            "-socket",
            args.socket,
        ]);
    if args.debug {
        command.arg("-debug");
    }
    let mut child = command.spawn().context("spawning the pod's shim")?;
    let pid = child.id().unwrap_or(0);
    if pid != 0 {
        if let Some(cgroup) = &args.shim_cgroup {
            if let Err(e) = containerd_shim::cgroup::add_task_to_cgroup(cgroup, pid) {
                tracing::warn!(pid, %cgroup, "moving the shim into ShimCgroup: {e}");
            }
        }
        // One above containerd's, as containerd's shims do: under memory
        // pressure the pod goes before containerd.
        if let Err(e) = containerd_shim::cgroup::adjust_oom_score(pid) {
            tracing::warn!(pid, "adjusting the shim's oom_score_adj: {e}");
        }
    }
    let mut output = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        // Bounded: the serving shim writes nothing there before it listens.
        stdout
            .take(64 << 10)
            .read_to_end(&mut output)
            .await
            .context("waiting for the pod's shim to listen")?;
    }
    if !output.is_empty() {
        tracing::warn!(
            pid,
            "the pod's shim wrote: {}",
            String::from_utf8_lossy(&output)
        );
    }
    Ok(())
}
