//! Operations on a running container that are neither its lifecycle nor a
//! process': pause and resume, its pids, stats, resource updates.

use std::collections::HashMap;

use containerd_shim_protos::events::task::{TaskPaused, TaskResumed};
use ember_proto::agent::{
    ListProcessesRequest, PauseContainerRequest, ResumeContainerRequest, StatsContainerRequest,
    StatsContainerResponse, UpdateContainerRequest,
};

use super::process::Status;
use super::Sandbox;
use crate::error::{Error, Result};

impl Sandbox {
    pub async fn pause(&self, id: &str) -> Result<()> {
        self.ensure_alive()?;
        let p = self.container(id)?.init.clone();
        if p.status() != Status::Running {
            return Err(Error::precondition(format!(
                "container {id} is not running"
            )));
        }
        let mut req = PauseContainerRequest::new();
        req.container_id = id.to_string();
        self.agent.pause_container(&req).await?;
        if p.set_paused(true) {
            self.events
                .publish(TaskPaused {
                    container_id: id.to_string(),
                    ..Default::default()
                })
                .await;
        }
        Ok(())
    }

    pub async fn resume(&self, id: &str) -> Result<()> {
        self.ensure_alive()?;
        let p = self.container(id)?.init.clone();
        if p.status() != Status::Paused {
            return Err(Error::precondition(format!("container {id} is not paused")));
        }
        let mut req = ResumeContainerRequest::new();
        req.container_id = id.to_string();
        self.agent.resume_container(&req).await?;
        if p.set_paused(false) {
            self.events
                .publish(TaskResumed {
                    container_id: id.to_string(),
                    ..Default::default()
                })
                .await;
        }
        Ok(())
    }

    /// Guest pids of the container's processes, with the exec id of those
    /// that are execs.
    pub async fn pids(&self, id: &str) -> Result<Vec<(u32, Option<String>)>> {
        self.ensure_alive()?;
        let c = self.container(id)?;
        let mut req = ListProcessesRequest::new();
        req.container_id = id.to_string();
        let resp = self.agent.list_processes(&req).await?;
        let execs: HashMap<u32, String> = c
            .all_execs()
            .into_iter()
            .filter(|x| x.pid() != 0 && x.status() != Status::Stopped)
            .map(|x| (x.pid(), x.exec_id.clone()))
            .collect();
        Ok(resp
            .pids
            .into_iter()
            .map(|pid| (pid, execs.get(&pid).cloned()))
            .collect())
    }

    pub async fn stats(&self, id: &str) -> Result<StatsContainerResponse> {
        self.ensure_alive()?;
        self.container(id)?;
        let mut req = StatsContainerRequest::new();
        req.container_id = id.to_string();
        self.agent.stats_container(&req).await
    }

    /// `resources`: an OCI `linux.resources` object as JSON.
    pub async fn update(&self, id: &str, resources: Vec<u8>) -> Result<()> {
        self.ensure_alive()?;
        self.container(id)?;
        let mut req = UpdateContainerRequest::new();
        req.container_id = id.to_string();
        req.resources = resources;
        self.agent.update_container(&req).await.map(|_| ())
    }
}
