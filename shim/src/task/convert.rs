//! Task API messages to Ember's domain types and back, in one place (as
//! Kata's `trans_from_shim.rs`): the task service's methods only call the
//! pod and translate with these. The Sandbox API's equivalent is
//! [`crate::sandbox_service::pod_config`].

use std::path::PathBuf;

use containerd_shim::api::{
    CreateTaskRequest, DeleteResponse, PidsResponse, StateResponse, StatsResponse, WaitResponse,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim::oci::ProcessDetails;
use containerd_shim_protos::types::task::ProcessInfo;

use crate::error::{Error, Result};
use crate::events;
use crate::io::StdioPaths;
use crate::metrics;
use crate::resources::mount::MountRequest;
use crate::sandbox::container::Container;
use crate::sandbox::process::{Exit, Process};
use crate::sandbox::NewContainer;

/// The container a `Create` asks for, with its bundle's parsed spec.
pub fn new_container(req: &CreateTaskRequest, spec: serde_json::Value) -> NewContainer {
    NewContainer {
        id: req.id.clone(),
        bundle: PathBuf::from(&req.bundle),
        spec,
        rootfs: req
            .rootfs
            .iter()
            .map(|m| MountRequest {
                fstype: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect(),
        stdio: stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal),
    }
}

/// A process's stdio fifos, as `Create` and `Exec` name them.
pub fn stdio(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> StdioPaths {
    StdioPaths {
        stdin: stdin.to_string(),
        stdout: stdout.to_string(),
        stderr: stderr.to_string(),
        terminal,
    }
}

/// The JSON inside an `Any` of containerd (exec process spec, update
/// resources): containerd marshals OCI types as JSON.
pub fn any_json(any: &MessageField<Any>, what: &str) -> Result<Vec<u8>> {
    match any.as_ref() {
        Some(a) if !a.value.is_empty() => {
            serde_json::from_slice::<serde_json::Value>(&a.value)
                .map_err(|e| Error::invalid(format!("{what} ({}) is not JSON: {e}", a.type_url)))?;
            Ok(a.value.clone())
        }
        _ => Err(Error::invalid(format!("{what} is missing"))),
    }
}

pub fn delete_response(pid: u32, exit: Exit) -> DeleteResponse {
    DeleteResponse {
        pid,
        exit_status: exit.status,
        exited_at: MessageField::some(events::timestamp(exit.at)),
        ..Default::default()
    }
}

pub fn wait_response(exit: Exit) -> WaitResponse {
    WaitResponse {
        exit_status: exit.status,
        exited_at: MessageField::some(events::timestamp(exit.at)),
        ..Default::default()
    }
}

/// `State` of process `p` (`exec_id` empty: the container's init).
pub fn state_response(c: &Container, p: &Process, exec_id: &str) -> StateResponse {
    let exit = p.exit();
    StateResponse {
        id: p.event_id().to_string(),
        bundle: c.bundle.display().to_string(),
        pid: p.pid(),
        status: p.status().to_task_status().into(),
        stdin: p.stdio.stdin.clone(),
        stdout: p.stdio.stdout.clone(),
        stderr: p.stdio.stderr.clone(),
        terminal: p.stdio.terminal,
        exit_status: exit.map_or(0, |e| e.status),
        exited_at: match exit {
            Some(e) => MessageField::some(events::timestamp(e.at)),
            None => MessageField::none(),
        },
        exec_id: exec_id.to_string(),
        ..Default::default()
    }
}

/// `Pids`: each guest pid, with runc's `ProcessDetails` naming the exec it
/// belongs to (what `ctr task ps` and CRI read).
pub fn pids_response(pids: Vec<(u32, Option<String>)>) -> Result<PidsResponse> {
    let mut processes = Vec::with_capacity(pids.len());
    for (pid, exec_id) in pids {
        let info = match exec_id {
            Some(exec_id) => {
                let details = ProcessDetails {
                    exec_id,
                    ..Default::default()
                };
                MessageField::some(Any {
                    type_url: "containerd.runc.v1.ProcessDetails".into(),
                    value: details.write_to_bytes().map_err(|e| {
                        Error::Internal(anyhow::anyhow!("encoding process details: {e}"))
                    })?,
                    ..Default::default()
                })
            }
            None => MessageField::none(),
        };
        processes.push(ProcessInfo {
            pid,
            info,
            ..Default::default()
        });
    }
    Ok(PidsResponse {
        processes,
        ..Default::default()
    })
}

/// `Stats`: the guest's figures as cgroup v2 metrics (what `ctr task
/// metrics` and kubelet read).
pub fn stats_response(stats: &ember_proto::agent::StatsContainerResponse) -> Result<StatsResponse> {
    let any = metrics::to_any(&metrics::to_cgroup2(stats))
        .map_err(|e| Error::Internal(anyhow::anyhow!("encoding metrics: {e}")))?;
    Ok(StatsResponse {
        stats: MessageField::some(any),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_anys() {
        let ok = MessageField::some(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            value: br#"{"args":["sh"]}"#.to_vec(),
            ..Default::default()
        });
        assert_eq!(
            any_json(&ok, "spec").unwrap(),
            br#"{"args":["sh"]}"#.to_vec()
        );
        let bad = MessageField::some(Any {
            value: b"\x01\x02".to_vec(),
            ..Default::default()
        });
        assert!(any_json(&bad, "spec").is_err());
        assert!(any_json(&MessageField::none(), "spec").is_err());
    }

    #[test]
    fn pids_name_their_exec() {
        let r = pids_response(vec![(1, None), (7, Some("e1".into()))]).unwrap();
        assert_eq!(r.processes.len(), 2);
        assert!(r.processes[0].info.is_none());
        let info = r.processes[1].info.as_ref().unwrap();
        assert_eq!(info.type_url, "containerd.runc.v1.ProcessDetails");
        let d = ProcessDetails::parse_from_bytes(&info.value).unwrap();
        assert_eq!((r.processes[1].pid, d.exec_id.as_str()), (7, "e1"));
    }
}
