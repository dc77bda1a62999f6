//! The shim's side of the agent protocol: typed calls with deadlines and
//! errors converted for containerd.
//!
//! One ttrpc connection per VM carries every call (ttrpc multiplexes), the
//! long polls (WaitProcess, GetOOMEvent) included. Ordinary calls get the
//! configured deadline, both as the ttrpc deadline (so the agent drops
//! work nobody waits for) and as a local timeout; long polls have none.
//!
//! The agent is guest code and not trusted: every reply passes the bounds
//! of [`checks`] before a caller sees it, and agent error messages are cut
//! to a bounded length.

pub mod checks;
#[cfg(test)]
mod hostile_tests;

use std::future::Future;
use std::time::Duration;

use ember_proto::agent::*;
use ember_proto::client::{self, AgentClient};

use self::checks::{bounded_error, Checked};
use crate::error::{Error, Result};

#[derive(Clone)]
pub struct Agent {
    client: AgentClient,
    timeout: Duration,
}

/// A little more than the ttrpc deadline, so that the agent's own
/// DEADLINE_EXCEEDED normally wins over the local timeout.
const LOCAL_SLACK: Duration = Duration::from_secs(2);

async fn call<T: Checked>(
    name: &'static str,
    timeout: Option<Duration>,
    fut: impl Future<Output = ttrpc::Result<T>>,
) -> Result<T> {
    let r = match timeout {
        Some(d) => tokio::time::timeout(d + LOCAL_SLACK, fut)
            .await
            .map_err(|_| {
                Error::DeadlineExceeded(format!("agent {name}: no answer within {d:?}"))
            })?,
        None => fut.await,
    };
    let reply = r.map_err(|e| Error::from_agent(name, bounded_error(e)))?;
    reply.check().map_err(|why| {
        Error::Internal(anyhow::anyhow!(
            "agent {name}: reply refused, out of bounds: {why}"
        ))
    })?;
    Ok(reply)
}

macro_rules! rpc {
    ($(#[$doc:meta])* $method:ident, $name:literal, $req:ty => $resp:ty) => {
        $(#[$doc])*
        pub async fn $method(&self, req: &$req) -> Result<$resp> {
            call(
                $name,
                Some(self.timeout),
                self.client.$method(client::context(self.timeout), req),
            )
            .await
        }
    };
}

impl Agent {
    pub fn new(client: AgentClient, timeout: Duration) -> Self {
        Agent { client, timeout }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    rpc!(create_container, "CreateContainer", CreateContainerRequest => CreateContainerResponse);
    rpc!(start_container, "StartContainer", StartContainerRequest => StartContainerResponse);
    rpc!(exec_process, "ExecProcess", ExecProcessRequest => ExecProcessResponse);
    rpc!(signal_process, "SignalProcess", SignalProcessRequest => Empty);
    rpc!(stats_container, "StatsContainer", StatsContainerRequest => StatsContainerResponse);
    rpc!(update_container, "UpdateContainer", UpdateContainerRequest => Empty);
    rpc!(pause_container, "PauseContainer", PauseContainerRequest => Empty);
    rpc!(resume_container, "ResumeContainer", ResumeContainerRequest => Empty);
    rpc!(remove_container, "RemoveContainer", RemoveContainerRequest => Empty);
    rpc!(list_processes, "ListProcesses", ListProcessesRequest => ListProcessesResponse);
    rpc!(resize_pty, "ResizePty", ResizePtyRequest => Empty);
    rpc!(close_stdin, "CloseStdin", CloseStdinRequest => Empty);
    rpc!(add_mounts, "AddMounts", AddMountsRequest => Empty);
    rpc!(update_interfaces, "UpdateInterfaces", UpdateInterfacesRequest => Empty);
    rpc!(update_routes, "UpdateRoutes", UpdateRoutesRequest => Empty);

    /// Sets the guest clock to the host's now.
    pub async fn sync_clock(&self, timeout: Duration) -> Result<Empty> {
        let mut req = SetTimeRequest::new();
        req.time = Some(ember_proto::time::now()).into();
        call(
            "SetTime",
            Some(timeout),
            self.client.set_time(client::context(timeout), &req),
        )
        .await
    }

    /// Liveness probe with its own (short) deadline.
    pub async fn health(&self, timeout: Duration) -> Result<HealthResponse> {
        call(
            "Health",
            Some(timeout),
            self.client
                .health(client::context(timeout), &HealthRequest::new()),
        )
        .await
    }

    /// Asks the guest to sync and power off. The connection drops right
    /// after the answer.
    pub async fn shutdown(&self, timeout: Duration) -> Result<Empty> {
        call(
            "Shutdown",
            Some(timeout),
            self.client
                .shutdown(client::context(timeout), &ShutdownRequest::new()),
        )
        .await
    }

    /// Long poll: returns when the process has exited and its output is
    /// drained.
    pub async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<WaitProcessResponse> {
        let mut req = WaitProcessRequest::new();
        req.container_id = container_id.to_string();
        req.exec_id = exec_id.to_string();
        call(
            "WaitProcess",
            None,
            self.client.wait_process(client::no_timeout(), &req),
        )
        .await
    }

    /// Long poll: the next container with an OOM kill.
    pub async fn get_oom_event(&self) -> Result<OOMEvent> {
        call(
            "GetOOMEvent",
            None,
            self.client
                .get_oom_event(client::no_timeout(), &GetOOMEventRequest::new()),
        )
        .await
    }
}
