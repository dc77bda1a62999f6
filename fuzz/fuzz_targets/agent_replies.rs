//! The shim's handling of agent replies: a hostile agent answers with any
//! protobuf bytes; they are decoded as the response types the shim reads
//! and run through what the shim does with them: stats to containerd's
//! cgroup v2 metrics (`metrics::to_cgroup2`, `to_any`), a process exit to
//! a TaskExit event (`ember_proto::time::from_timestamp`,
//! `events::task_exit`), an OOM event to the tracker and a TaskOOM.
//!
//! Input: `kind: u8`, then the reply's protobuf bytes.
#![no_main]

use std::time::SystemTime;

use containerd_shim_protos::cgroups_v2::metrics::Metrics;
use ember_fuzz::Input;
use ember_proto::agent::{
    CreateContainerResponse, ExecProcessResponse, HealthResponse, ListProcessesResponse, OOMEvent,
    StartContainerResponse, StatsContainerResponse, VersionResponse, WaitProcessResponse,
};
use ember_shim::events;
use ember_shim::metrics::{to_any, to_cgroup2};
use ember_shim::sandbox::oom::OomTracker;
use libfuzzer_sys::fuzz_target;
use protobuf::Message;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let kind = input.u8();
    let bytes = input.rest();
    match kind % 6 {
        0 => {
            let Ok(stats) = StatsContainerResponse::parse_from_bytes(bytes) else {
                return;
            };
            let metrics = to_cgroup2(&stats);
            let any = to_any(&metrics).expect("metrics encode");
            let back = <Metrics as containerd_shim_protos::protobuf::Message>::parse_from_bytes(
                &any.value,
            );
            assert_eq!(
                back.ok().as_ref(),
                Some(&metrics),
                "the metrics the shim sends do not decode"
            );
        }
        1 => {
            let Ok(r) = WaitProcessResponse::parse_from_bytes(bytes) else {
                return;
            };
            // As Sandbox::watch_exit does.
            let at = r
                .exited_at
                .as_ref()
                .and_then(ember_proto::time::from_timestamp)
                .unwrap_or_else(SystemTime::now);
            let ev = events::task_exit("c", "c", 1, r.exit_status, at);
            ev.write_to_bytes().expect("TaskExit encodes");
        }
        2 => {
            let Ok(ev) = OOMEvent::parse_from_bytes(bytes) else {
                return;
            };
            let tracker = OomTracker::default();
            tracker.record(&ev.container_id);
            tracker.forget(&ev.container_id);
            events::task_oom(&ev.container_id)
                .write_to_bytes()
                .expect("TaskOOM encodes");
        }
        3 => {
            if let Ok(r) = ListProcessesResponse::parse_from_bytes(bytes) {
                let _ = r.pids.iter().filter(|&&p| p != 0).count();
            }
        }
        4 => {
            let _ = CreateContainerResponse::parse_from_bytes(bytes);
            let _ = StartContainerResponse::parse_from_bytes(bytes);
            let _ = ExecProcessResponse::parse_from_bytes(bytes);
        }
        _ => {
            let _ = HealthResponse::parse_from_bytes(bytes);
            let _ = VersionResponse::parse_from_bytes(bytes);
        }
    }
});
