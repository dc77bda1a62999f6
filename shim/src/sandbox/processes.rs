//! The processes of a sandbox's containers: starting an init or an exec,
//! waiting for exits (and OOM events) and publishing them, signals, stdin,
//! terminal size, deleting an exec.

use std::sync::Arc;
use std::time::SystemTime;

use containerd_shim_protos::events::task::{TaskExecAdded, TaskExecStarted, TaskStart};
use containerd_shim_protos::protobuf::MessageField;
use ember_proto::agent::{
    CloseStdinRequest, ExecProcessRequest, ResizePtyRequest, SignalProcessRequest,
    StartContainerRequest,
};

use super::oom::OOM_GRACE;
use super::process::{Exit, Process, Status, UNKNOWN_EXIT_STATUS};
use super::{unknown_exit, Sandbox, DEAD_VM_OUTPUT, EXEC_START_FAILED_STATUS, SIGKILL};
use crate::error::{Error, Result};
use crate::events;
use crate::io::{ProcessIo, StdioPaths};

impl Sandbox {
    // ---- start, exec ----

    /// Starts a container's init (`exec_id` empty) or an exec; returns the
    /// guest pid.
    pub async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32> {
        self.ensure_alive()?;
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        match p.status() {
            Status::Created => {}
            Status::Stopped => {
                return Err(Error::precondition(format!(
                    "process {} has already exited",
                    p.label()
                )))
            }
            _ => {
                return Err(Error::precondition(format!(
                    "process {} is already started",
                    p.label()
                )))
            }
        }
        if p.is_init() {
            let mut req = StartContainerRequest::new();
            req.container_id = id.to_string();
            let resp = self.agent.start_container(&req).await?;
            p.set_running(resp.pid);
            self.events
                .publish(TaskStart {
                    container_id: id.to_string(),
                    pid: p.pid(),
                    ..Default::default()
                })
                .await;
        } else {
            if c.init.status() == Status::Stopped {
                return Err(Error::precondition(format!(
                    "cannot start exec {exec_id}: container {id} has stopped"
                )));
            }
            let mut req = ExecProcessRequest::new();
            req.container_id = id.to_string();
            req.exec_id = exec_id.to_string();
            req.process = p.spec.clone().unwrap_or_default();
            req.stdio = MessageField::some(p.stdio.request());
            let resp = match self.agent.exec_process(&req).await {
                Ok(resp) => resp,
                Err(e) => {
                    // An exec that never started has ended as far as
                    // containerd is concerned: its Wait and Delete must
                    // return at once (runc's shim closes its wait block
                    // the same way). 127: the command could not be run.
                    p.record_exit(Exit {
                        status: EXEC_START_FAILED_STATUS,
                        at: SystemTime::now(),
                    });
                    return Err(e);
                }
            };
            p.set_pid(resp.pid);
            let io = ProcessIo::connect(
                &self.paths.vsock,
                &p.stdio,
                resp.stdio_ports.get_or_default(),
                self.agent.timeout(),
                p.label(),
            )
            .await;
            p.set_running(resp.pid);
            match io {
                Ok(io) => p.attach_io(io),
                Err(e) => {
                    // Running without stdio is not what was asked for.
                    p.set_sigkill(true);
                    let _ = self.signal(id, exec_id, SIGKILL, false).await;
                    self.spawn_waiter(p.clone());
                    return Err(e);
                }
            }
            self.events
                .publish(TaskExecStarted {
                    container_id: id.to_string(),
                    exec_id: exec_id.to_string(),
                    pid: p.pid(),
                    ..Default::default()
                })
                .await;
        }
        tracing::info!(process = %p.label(), pid = p.pid(), "started");
        self.spawn_waiter(p.clone());
        Ok(p.pid())
    }

    /// Registers an exec; it runs at `start`.
    pub async fn add_exec(
        &self,
        id: &str,
        exec_id: &str,
        stdio: StdioPaths,
        spec: Vec<u8>,
    ) -> Result<()> {
        self.ensure_alive()?;
        let c = self.container(id)?;
        c.add_exec(Arc::new(Process::new(id, exec_id, stdio, Some(spec))))?;
        self.events
            .publish(TaskExecAdded {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                ..Default::default()
            })
            .await;
        Ok(())
    }

    // ---- exits ----

    pub(super) fn spawn_waiter(self: &Arc<Self>, p: Arc<Process>) {
        if !p.claim_waiter() {
            return;
        }
        let sb = self.clone();
        tokio::spawn(async move { sb.watch_exit(p).await });
    }

    /// Waits for a process' exit, its output, and (for a SIGKILL nobody
    /// here sent) a possible OOM event, then records and publishes it.
    async fn watch_exit(self: Arc<Self>, p: Arc<Process>) {
        let waited = tokio::select! {
            r = self.agent.wait_process(&p.container_id, &p.exec_id) => r.map_err(|e| e.to_string()),
            reason = self.death.wait() => Err(reason),
        };
        let (exit, vm_alive) = match waited {
            Ok(r) => (
                Exit {
                    status: r.exit_status,
                    at: r
                        .exited_at
                        .as_ref()
                        .and_then(ember_proto::time::from_timestamp)
                        .unwrap_or_else(SystemTime::now),
                },
                true,
            ),
            Err(why) => {
                let alive = self.death.reason().is_none();
                if alive {
                    tracing::error!(process = %p.label(), "waiting for the exit failed: {why}; reporting status {UNKNOWN_EXIT_STATUS}");
                } else {
                    tracing::warn!(process = %p.label(), "{why}");
                }
                (unknown_exit(), alive)
            }
        };
        if let Some(out) = p.take_outputs() {
            out.wait((!vm_alive).then_some(DEAD_VM_OUTPUT)).await;
        }
        p.stop_stdin();
        if exit.status == 128 + SIGKILL && vm_alive && !p.killed_by_us() {
            let oom = self.oom.wait_for(&p.container_id, OOM_GRACE).await;
            tracing::debug!(process = %p.label(), oom, "exit by SIGKILL");
        }
        self.finish(&p, exit).await;
    }

    pub(super) async fn finish(&self, p: &Process, exit: Exit) {
        if p.record_exit(exit) {
            tracing::info!(process = %p.label(), pid = p.pid(), status = exit.status, "exited");
            self.events
                .publish(events::task_exit(
                    &p.container_id,
                    p.event_id(),
                    p.pid(),
                    exit.status,
                    exit.at,
                ))
                .await;
        }
    }

    // ---- signals ----

    pub(super) async fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let mut req = SignalProcessRequest::new();
        req.container_id = id.to_string();
        req.exec_id = exec_id.to_string();
        req.signal = signal;
        req.all = all;
        self.agent.signal_process(&req).await.map(|_| ())
    }

    /// Kill, as runc's shim answers it: a process that has exited is
    /// NOT_FOUND "process already finished".
    pub async fn kill(
        self: &Arc<Self>,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        if p.status() == Status::Stopped || self.death.reason().is_some() {
            return Err(Error::not_found("process already finished"));
        }
        // Noted before sending: the exit can be reported before the
        // agent's answer to the signal arrives.
        let targets: Vec<Arc<Process>> = if all && p.is_init() {
            std::iter::once(p.clone()).chain(c.all_execs()).collect()
        } else {
            vec![p.clone()]
        };
        if signal == SIGKILL {
            for t in &targets {
                t.set_sigkill(true);
            }
        }
        let sent = self.signal(id, exec_id, signal, all).await;
        if sent.is_err() && signal == SIGKILL {
            for t in &targets {
                t.set_sigkill(false);
            }
        }
        match sent {
            Ok(()) => {}
            Err(Error::Agent {
                code: ttrpc::Code::NOT_FOUND,
                ..
            }) => return Err(Error::not_found("process already finished")),
            Err(e) => return Err(e),
        }
        // A created (never started) process dies too: watch for it.
        if p.status() == Status::Created {
            self.spawn_waiter(p);
        }
        Ok(())
    }

    // ---- delete ----

    /// Deletes an exec; returns its pid and exit.
    pub fn delete_exec(&self, id: &str, exec_id: &str) -> Result<(u32, Exit)> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        if matches!(p.status(), Status::Running | Status::Paused) {
            return Err(Error::precondition("cannot delete a running process"));
        }
        c.remove_exec(exec_id);
        p.stop_stdin();
        let exit = p.exit().unwrap_or(Exit {
            status: 0,
            at: SystemTime::UNIX_EPOCH,
        });
        Ok((p.pid(), exit))
    }

    pub async fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        self.ensure_alive()?;
        let p = self.process(id, exec_id)?;
        if p.status() == Status::Stopped {
            return Err(Error::not_found("process already finished"));
        }
        let mut req = ResizePtyRequest::new();
        req.container_id = id.to_string();
        req.exec_id = exec_id.to_string();
        req.cols = width;
        req.rows = height;
        self.agent.resize_pty(&req).await.map(|_| ())
    }

    /// Closes a process' stdin. With a stdin stream, the stream is drained
    /// to EOF and half-closed (the guest sees EOF after the last byte; a
    /// CloseStdin call could overtake bytes still in flight); without one,
    /// the agent is asked to close it.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let p = self.process(id, exec_id)?;
        if let Some(fwd) = p.take_stdin() {
            fwd.close().await;
            return Ok(());
        }
        if p.status() == Status::Stopped || self.death.reason().is_some() {
            return Ok(());
        }
        let mut req = CloseStdinRequest::new();
        req.container_id = id.to_string();
        req.exec_id = exec_id.to_string();
        self.agent.close_stdin(&req).await.map(|_| ())
    }
}
