//! The shim against a hostile agent. These tests FAKE THE AGENT: a ttrpc
//! service (or, for the frame limit, a raw socket) plays guest root that
//! owns the real agent and answers with whatever it likes. The shim must
//! refuse what is out of bounds with a clear error, believe no OOM event
//! for a container that is not the pod's, and keep its memory bounded.

use std::sync::Arc;
use std::time::Duration;

use ember_proto::agent::*;
use ember_proto::agent_ttrpc::{create_agent, Agent as AgentService};
use ember_proto::client::AgentClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;
use ttrpc::r#async::TtrpcContext;
use ttrpc::Code;

use super::checks::{MAX_ERROR_MESSAGE, MAX_ID_LEN, MAX_IO_DEVICES, MAX_LISTED_PIDS};
use super::Agent;
use crate::error::Error;
use crate::events::EventSink;
use crate::sandbox::oom::{poll_oom_events, OomTracker, MAX_EVENTS_PER_SEC, MAX_PENDING};

/// The fake, hostile agent.
struct Hostile {
    /// OOM events it will send, in order; then it falls silent.
    oom: Mutex<Vec<String>>,
}

#[ember_proto::async_trait]
impl AgentService for Hostile {
    async fn create_container(
        &self,
        _: &TtrpcContext,
        _: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        Ok(CreateContainerResponse {
            pid: u32::MAX,
            ..Default::default()
        })
    }

    async fn start_container(
        &self,
        _: &TtrpcContext,
        _: StartContainerRequest,
    ) -> ttrpc::Result<StartContainerResponse> {
        let huge = "x".repeat(1 << 20);
        Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
            Code::FAILED_PRECONDITION,
            huge,
        )))
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        _: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        Ok(WaitProcessResponse {
            exit_status: 1 << 31,
            pid: 5,
            ..Default::default()
        })
    }

    async fn list_processes(
        &self,
        _: &TtrpcContext,
        _: ListProcessesRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        Ok(ListProcessesResponse {
            pids: vec![7; 4 * MAX_LISTED_PIDS],
            ..Default::default()
        })
    }

    async fn stats_container(
        &self,
        _: &TtrpcContext,
        _: StatsContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        Ok(StatsContainerResponse {
            io: vec![IoDeviceStats::new(); 10 * MAX_IO_DEVICES],
            ..Default::default()
        })
    }

    async fn get_oom_event(
        &self,
        _: &TtrpcContext,
        _: GetOOMEventRequest,
    ) -> ttrpc::Result<OOMEvent> {
        let next = {
            let mut q = self.oom.lock().await;
            (!q.is_empty()).then(|| q.remove(0))
        };
        match next {
            Some(id) => Ok(OOMEvent {
                container_id: id,
                ..Default::default()
            }),
            None => std::future::pending().await,
        }
    }
}

/// Serves `agent` on a socket in `dir` and returns the shim's client.
async fn serve(dir: &std::path::Path, agent: Hostile) -> (Agent, ttrpc::r#async::Server) {
    let path = dir.join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let mut server = ttrpc::r#async::Server::new()
        .register_service(create_agent(Arc::new(agent)))
        .add_listener(listener.into());
    server.start().await.unwrap();
    let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    let client = AgentClient::from_stream(stream);
    (Agent::new(client, Duration::from_secs(10)), server)
}

fn refused<T: std::fmt::Debug>(r: crate::error::Result<T>, what: &str) {
    match r {
        Err(e @ Error::Internal(_)) => {
            let text = format!("{e:#}");
            assert!(
                text.contains("out of bounds") && text.contains(what),
                "{text}"
            );
        }
        other => panic!("expected a refusal naming {what:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn absurd_replies_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let hostile = Hostile {
        oom: Mutex::new(Vec::new()),
    };
    let (agent, _server) = serve(dir.path(), hostile).await;

    refused(
        agent.create_container(&CreateContainerRequest::new()).await,
        "pid",
    );
    refused(agent.wait_process("c1", "").await, "exit status");
    refused(
        agent.list_processes(&ListProcessesRequest::new()).await,
        "pids listed",
    );
    refused(
        agent.stats_container(&StatsContainerRequest::new()).await,
        "devices",
    );

    // A 1 MiB error message reaches containerd cut, with its code.
    match agent.start_container(&StartContainerRequest::new()).await {
        Err(Error::Agent { code, message, .. }) => {
            assert_eq!(code, Code::FAILED_PRECONDITION);
            assert!(message.len() < MAX_ERROR_MESSAGE + 64, "{}", message.len());
            assert!(message.ends_with("bytes cut)"));
        }
        other => panic!("expected the agent's error, got {other:?}"),
    }
}

/// OOM events for containers that are not the pod's (never created, or a
/// guess at another pod's) are dropped and leave nothing behind; a flood
/// for a real one is cut to the rate limit; an oversized id is refused.
#[tokio::test]
async fn oom_events_are_believed_only_for_the_pods_containers() {
    let dir = tempfile::tempdir().unwrap();
    let mut events = vec!["foreign".to_string(), "x".repeat(MAX_ID_LEN + 1)];
    events.extend(std::iter::repeat_n(
        "c1".to_string(),
        10 * MAX_EVENTS_PER_SEC as usize,
    ));
    events.push("deleted".into());
    let hostile = Hostile {
        oom: Mutex::new(events),
    };
    let (agent, _server) = serve(dir.path(), hostile).await;
    let tracker = Arc::new(OomTracker::default());
    tracker.track("c1");
    tracker.track("deleted");
    tracker.forget("deleted");
    let (sink, recorded) = EventSink::recording();
    let poll = tokio::spawn(poll_oom_events(agent, tracker.clone(), sink));
    // Let the poller take every event (the oversized id costs it a
    // one-second pause).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    poll.abort();

    let published: Vec<String> = recorded
        .lock()
        .unwrap()
        .iter()
        .filter(|(topic, _)| topic == "/tasks/oom")
        .map(|(_, text)| text.clone())
        .collect();
    assert!(!published.is_empty(), "c1's OOM events are published");
    assert!(
        published.iter().all(|t| t.contains("\"c1\"")),
        "only c1's: {published:?}"
    );
    assert!(
        published.len() <= 2 * MAX_EVENTS_PER_SEC as usize,
        "rate limited: {} published",
        published.len()
    );
    for id in ["foreign", "deleted"] {
        assert!(!tracker.is_tracked(id), "{id} is not remembered");
        assert!(!tracker.wait_for(id, Duration::ZERO).await);
    }
    let mut kept = 0;
    while tracker.wait_for("c1", Duration::ZERO).await {
        kept += 1;
    }
    assert!((1..=MAX_PENDING).contains(&kept), "{kept} pending for c1");
}

/// A reply frame over ttrpc's 4 MiB limit is skipped (read 4 KiB at a
/// time, never held) and the call fails with a clear error: the bound the
/// checks above rely on.
#[tokio::test]
async fn a_reply_frame_over_the_limit_is_refused() {
    const ANNOUNCED: usize = 5 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raw.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let fake = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        // The request: a 10-byte header (length, stream id, type, flags).
        let mut header = [0u8; 10];
        s.read_exact(&mut header).await.unwrap();
        let len = u32::from_be_bytes(header[..4].try_into().unwrap());
        let mut body = vec![0u8; len as usize];
        s.read_exact(&mut body).await.unwrap();
        // A response on the same stream, 5 MiB of junk.
        let mut reply = Vec::new();
        reply.extend_from_slice(&(ANNOUNCED as u32).to_be_bytes());
        reply.extend_from_slice(&header[4..8]);
        reply.extend_from_slice(&[2, 0]);
        reply.resize(reply.len() + ANNOUNCED, 0xa5);
        s.write_all(&reply).await.unwrap();
        // Keep the connection open: the error must come from the limit.
        std::future::pending::<()>().await;
    });
    let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    let agent = Agent::new(AgentClient::from_stream(stream), Duration::from_secs(20));
    match agent.list_processes(&ListProcessesRequest::new()).await {
        Err(Error::Agent { message, .. }) => {
            assert!(message.contains("exceed maximum message size"), "{message}")
        }
        other => panic!("expected the frame to be refused, got {other:?}"),
    }
    fake.abort();
}
